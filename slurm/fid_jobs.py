"""``alit fid-stats``: Inception statistics of an image set, in one process, per shard, or as a job array.

Shard ``i`` of ``n`` measures the contiguous images ``[i*N//n, (i+1)*N//n)`` and writes their exact float64
feature sums (:meth:`sampling.fid.FeatureStats.save`, ``n``/``sum``/``sum_outer``) to
``<out stem>.shard<iiii>-of-<nnnn>.npz`` beside ``--out`` (with ``--keep-features`` also the shard's
features, ``...feats.npy``). A shard file already written for the same request is reused, so a requeued
task or a re-run continues; whichever run finds every shard present writes ``--out``
(:func:`sampling.fid_io.write_fid_stats`, format ``alit-fid-stats/1``). The shard files are kept (they
are this tool's; remove them once ``--out`` exists). On a cluster the array's tasks are the shards and
the merge job (:func:`slurm.arrays.submit_with_merge`, as :mod:`slurm.tokenize_jobs`) writes ``--out``;
the jobs' logs go to ``<out stem>.jobs/slurm/<job id>/`` beside it.

    request = FidStatsRequest.from_parts("runs/samples/folder", None, "val", "stats.npz")
    request.run_shard(0, 1)                                   # everything, in this process
    submit_fid_stats(request, shards=8, slurm=cfg, cluster="slurm").wait()   # -> the stats path
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenizer.core.config import from_dict, to_dict
from tokenizer.core.data import EMOJI, DataConfig
from tokenizer.core.io import atomic_path

from .arrays import ArraySubmission, submit_shards
from .launcher import Cluster, SlurmConfig

SHARD_TARGET = "slurm.fid_jobs:stats_shard"
MERGE_TARGET = "slurm.fid_jobs:merge_stats"
REQUEST_FORMAT = "alit-fid-stats-shard/1"


@dataclass(frozen=True)
class FidStatsRequest:
    """What ``alit fid-stats`` measures, as plain values (it travels to the jobs as a dict)."""

    out: str  # absolute path of the statistics .npz to write
    data: str | None = None  # absolute path of a folder / npz; None: the dataset split below
    data_config: dict[str, Any] | None = None  # DataConfig as a dict (with split)
    split: str | None = None
    protocol: str = "torch_fidelity"
    batch_size: int = 64
    keep_features: bool = False
    device: str | None = None  # None = cuda where the job has one, else cpu

    @classmethod
    def from_parts(cls, data: str | Path | None, data_config: DataConfig | None, split: str | None,
                   out: str | Path, **kw: Any) -> FidStatsRequest:
        """A request from the command's inputs (paths made absolute: jobs may start elsewhere)."""
        cfg = None
        if data is None:
            assert data_config is not None and split is not None
            cfg = to_dict(data_config)
            if data_config.source != EMOJI and Path(data_config.source).expanduser().exists():
                cfg["source"] = str(Path(data_config.source).expanduser().absolute())
        return cls(str(Path(out).expanduser().absolute()),
                   None if data is None else str(Path(data).expanduser().absolute()), cfg, split, **kw)

    # ------------------------------------------------------------------ pieces
    def open(self) -> Any:
        """The :class:`sampling.fid_io.FidInput` to measure (it must hold images)."""
        from sampling.fid_io import FidIOError, dataset_input, open_fid_input

        if self.data is None:
            assert self.data_config is not None and self.split is not None
            item = dataset_input(from_dict(DataConfig, self.data_config), self.split)
        else:
            item = open_fid_input(self.data)
        if not item.has_images:
            raise FidIOError(f"{item.path} is {item.format}, not images: alit fid-stats measures a folder of "
                             "images, an npz batch (arr_0 / images) or a dataset split")
        return item

    @property
    def source(self) -> str:
        """What is measured, for the statistics file."""
        if self.data is not None:
            return self.data
        cfg = self.data_config or {}
        return f"data.source={cfg.get('source')} split={self.split} resolution={cfg.get('resolution')}"

    def shard_path(self, index: int, count: int) -> Path:
        out = Path(self.out)
        return out.with_name(f"{out.stem}.shard{index:04d}-of-{count:04d}.npz")

    def _key(self, index: int, count: int, total: int, protocol_id: str) -> str:
        return json.dumps({"format": REQUEST_FORMAT, "source": self.source, "images": total,
                           "shard": [index, count], "protocol": protocol_id,
                           "keep_features": self.keep_features}, sort_keys=True)

    def _extractor(self) -> Any:
        import torch

        from sampling.fid import FeatureExtractor

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return FeatureExtractor(self.protocol, device, batch_size=self.batch_size, progress=False)

    def _shard_done(self, path: Path, key: str) -> bool:
        from sampling.fid import FeatureStats

        try:
            return path.is_file() and FeatureStats.read_metadata(path).get("key") == key and \
                (not self.keep_features or path.with_suffix(".feats.npy").is_file())
        except (OSError, ValueError):
            return False

    # ------------------------------------------------------------------ runs
    def run_shard(self, index: int, count: int, progress: bool = False) -> Path | None:
        """Measure shard ``index`` of ``count`` (reusing its file), then merge if every shard is there.

        Returns ``--out`` when the set is complete, else None.
        """
        from sampling.fid import FEATURE_DIM, FeatureStats

        item, extractor = self.open(), self._extractor()
        extractor.progress = progress
        total, protocol_id = item.count, extractor.protocol_id
        path = self.shard_path(index, count) if count > 1 else None
        key = self._key(index, count, total, protocol_id)
        lo, hi = index * total // count, (index + 1) * total // count
        if path is None or not self._shard_done(path, key):
            batches = item.batches(extractor.batch_size, lo, hi)
            if self.keep_features:
                features = extractor.extract(batches, total=hi - lo) if hi > lo else np.zeros((0, FEATURE_DIM))
                stats = FeatureStats(FEATURE_DIM, protocol_id)
                if len(features):
                    stats.update(features)
            else:
                features = None
                stats = extractor.accumulate(batches, FeatureStats(FEATURE_DIM, protocol_id), total=hi - lo)
            if path is None:
                return self._write(stats, features)
            if features is not None:
                with atomic_path(path.with_suffix(".feats.npy")) as tmp, open(tmp, "wb") as f:
                    np.save(f, features.astype(np.float32))
            path.parent.mkdir(parents=True, exist_ok=True)
            stats.save(path, metadata={"key": key})
        return self.merge(count, total, protocol_id, missing_ok=True)

    def merge(self, count: int, total: int | None = None, protocol_id: str | None = None,
              missing_ok: bool = False) -> Path | None:
        """Write ``--out`` from the ``count`` shard files (None if one is missing and ``missing_ok``)."""
        from sampling.fid import FeatureStats

        if total is None or protocol_id is None:
            total, protocol_id = self.open().count, self._extractor().protocol_id
        if count == 1:  # the one task wrote --out itself
            from sampling.fid_io import stats_metadata

            out = Path(self.out)
            if out.is_file():
                meta = stats_metadata(out)
                if (meta["source"], meta["n"], meta["protocol"]) == (self.source, total, protocol_id):
                    return out
            if missing_ok:
                return None
            raise FileNotFoundError(f"{out} was not written by the array's one task: run alit fid-stats again")
        paths = [self.shard_path(i, count) for i in range(count)]
        missing = [p for i, p in enumerate(paths) if not self._shard_done(p, self._key(i, count, total, protocol_id))]
        if missing:
            if missing_ok:
                return None
            raise FileNotFoundError(f"shard files missing or stale: {', '.join(p.name for p in missing)}; run "
                                    f"alit fid-stats ... --shard i/{count} for them")
        stats = FeatureStats.merge_all(FeatureStats.load(p) for p in paths)
        features = np.concatenate([np.load(p.with_suffix(".feats.npy")) for p in paths]) \
            if self.keep_features else None
        return self._write(stats, features)

    def _write(self, stats: Any, features: np.ndarray | None) -> Path:
        from sampling.fid_io import FidIOError, write_fid_stats

        if stats.n < 2:
            raise FidIOError(f"{self.source} holds {stats.n} image(s): a covariance needs at least 2")
        return write_fid_stats(self.out, stats, protocol_name=self.protocol, source=self.source,
                               features=features)


def stats_shard(request: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """Job entry: shard ``index`` of ``count``."""
    done = FidStatsRequest(**request).run_shard(index, count)
    return {"shard": f"{index}/{count}", "complete": done is not None}


def merge_stats(request: dict[str, Any], count: int) -> str:
    """Job entry: merge the shard files into ``--out``; its path."""
    out = FidStatsRequest(**request).merge(count)
    assert out is not None  # missing_ok=False raises when a shard file is missing
    return str(out)


def submit_fid_stats(request: FidStatsRequest, *, shards: int, slurm: SlurmConfig | None = None,
                     cluster: Cluster = "slurm") -> ArraySubmission:
    """Submit ``shards`` array tasks and the merge job; ``wait()`` returns the statistics path."""
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    request.open()  # here, before anything is queued: a missing or foreign input fails now
    out = Path(request.out)
    return submit_shards(SHARD_TARGET, MERGE_TARGET, asdict(request), shards=shards,
                         out=out.with_name(f"{out.stem}.jobs"), slurm=slurm, cluster=cluster,
                         merge_kwargs={"count": shards})

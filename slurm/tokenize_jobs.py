"""``alit tokenize --cluster ...``: a tokenization as one job array over the cache's shard files plus a merge job.

Task ``i`` of ``N`` encodes the shard files ``i, i + N, ...`` of the cache (:func:`generator.cache.plan_units`);
a shard file already written is reused, so a requeued task or a re-submitted tokenization continues. The
merge job (after the array, as :mod:`slurm.arrays` chains it; logs in ``<cache>/slurm/<job id>/``) checks that every shard file is there and
writes the manifest (the last task to finish has usually written it already). The cache is the same bytes
as a one-process ``alit tokenize``.

    request = TokenizeRequest.from_parts("runs/tok/final", DataConfig(), "tokens", adaptive_threshold=0.07)
    sub = submit_tokenization(request, shards=8, slurm=cfg, cluster="slurm")
    cache_dir = sub.wait()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenizer.core.config import from_dict, to_dict
from tokenizer.core.data import EMOJI, DataConfig

from .arrays import ArraySubmission, submit_shards
from .launcher import Cluster, SlurmConfig

SHARD_TARGET = "slurm.tokenize_jobs:tokenize_shard"
MERGE_TARGET = "slurm.tokenize_jobs:merge_cache"


@dataclass(frozen=True)
class TokenizeRequest:
    """Everything that defines a tokenization, as plain values (it travels to the jobs as a dict)."""

    tokenizer: str  # absolute path of the saved tokenizer
    data: dict[str, Any]  # DataConfig as a dict
    out: str  # absolute path of the cache directory
    splits: tuple[str, ...] = ("train", "val")
    adaptive_threshold: float | None = None
    batch_size: int = 64
    shard_size: int = 8192
    num_workers: int = 0
    device: str | None = None  # None = cuda where the job has one, else cpu

    @classmethod
    def from_parts(cls, tokenizer: str | Path, data: DataConfig, out: str | Path, **kw: Any) -> TokenizeRequest:
        """A request from the command's inputs (paths made absolute: jobs may start elsewhere)."""
        data_dict = to_dict(data)
        if data.source != EMOJI and Path(data.source).expanduser().exists():
            data_dict["source"] = str(Path(data.source).expanduser().absolute())
        return cls(str(Path(tokenizer).expanduser().absolute()), data_dict,
                   str(Path(out).expanduser().absolute()), **kw)

    def build(self, shard: tuple[int, int] | None = None, encode_missing: bool = True,
              progress: bool = False) -> Path | None:
        """Run :func:`generator.cache.build_token_cache` for this request (one shard, or all)."""
        import torch

        from generator.cache import build_token_cache

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return build_token_cache(self.tokenizer, from_dict(DataConfig, self.data), self.out, tuple(self.splits),
                                 self.adaptive_threshold, self.batch_size, self.shard_size, device=device,
                                 progress=progress, shard=shard, num_workers=self.num_workers,
                                 encode_missing=encode_missing)


def tokenize_shard(request: dict[str, Any], index: int, count: int) -> dict[str, Any]:
    """Job entry: shard files ``index, index + count, ...`` of the cache."""
    done = TokenizeRequest(**request).build((index, count))
    return {"shard": f"{index}/{count}", "complete": done is not None}


def merge_cache(request: dict[str, Any]) -> str:
    """Job entry: check every shard file and write the manifest; the cache directory."""
    out = TokenizeRequest(**request).build(encode_missing=False)
    assert out is not None  # encode_missing=False raises when a shard file is missing
    return str(out)


def submit_tokenization(request: TokenizeRequest, *, shards: int, slurm: SlurmConfig | None = None,
                        cluster: Cluster = "slurm") -> ArraySubmission:
    """Submit ``shards`` array tasks and the merge job; ``wait()`` returns the cache directory."""
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    from generator.cache import prepare_token_cache

    # here, before anything is queued: a foreign --out or other inputs fail now; jobs then find request.json
    prepare_token_cache(request.tokenizer, from_dict(DataConfig, request.data), request.out,
                        tuple(request.splits), request.adaptive_threshold, request.shard_size)
    return submit_shards(SHARD_TARGET, MERGE_TARGET, asdict(request), shards=shards, out=Path(request.out),
                         slurm=slurm, cluster=cluster)

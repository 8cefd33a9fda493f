"""FID inputs and outputs in the formats papers use: ADM-format batches and precomputed statistics (.npz).

Formats, each checked against the code that writes or reads it:

ADM batch (``arr_0`` [, ``arr_1``])
    openai/guided-diffusion ``scripts/image_sample.py`` writes ``np.savez(out_path, arr, label_arr)``:
    ``arr_0`` is (N, H, W, 3) uint8 NHWC images, ``arr_1`` (N,) int class labels when class-conditional.
    ``evaluations/evaluator.py`` reads ``arr_0`` (``open_npz_array(npz_path, "arr_0")``). Its *reference*
    batches (``VIRTUAL_imagenet256_labeled.npz`` ...) also hold precomputed statistics of the whole
    dataset: ``mu`` (2048,), ``sigma`` (2048, 2048) of pool3 and ``mu_s``, ``sigma_s`` of the spatial
    features; ``read_statistics`` uses ``mu``/``sigma`` instead of the images' features when present, and
    so does :func:`open_fid_input` (the images then serve KID and precision/recall). sFID needs spatial
    features our extractor does not produce: ``mu_s``/``sigma_s`` are read but not used.
mu/sigma statistics (pytorch-fid, clean-fid)
    mseitzer/pytorch-fid ``src/pytorch_fid/fid_score.py``: ``save_fid_stats`` writes
    ``np.savez_compressed(path, mu=m1, sigma=s1)`` and ``compute_statistics_of_path`` reads ``f["mu"]``,
    ``f["sigma"]``. GaParmar/clean-fid ``cleanfid/fid.py`` ``make_custom_stats`` writes
    ``np.savez_compressed(outf, mu=mu, sigma=sigma)`` (``np.cov(feats, rowvar=False)``, unbiased) and
    ``cleanfid/features.py`` ``get_reference_statistics`` reads ``stats["mu"], stats["sigma"]``. Neither
    file says how many images or which preprocessing made it: FID against it is reported with that caveat.
clean-fid KID features (``feats``)
    ``make_custom_stats`` also writes ``<name>_kid.npz`` with ``np.savez_compressed(outf, feats=np_feats)``:
    (N, 2048) per-image features; read here as features (FID, KID and precision/recall).
alit FID statistics (``format = "alit-fid-stats/1"``), what ``alit fid-stats`` writes
    ``mu`` (2048,) float64, ``sigma`` (2048, 2048) float64 (unbiased, like ``np.cov(rowvar=False)``): the
    keys pytorch-fid and clean-fid read, so their tools accept the file; plus ``n`` (int64 scalar: images),
    ``protocol`` (str: :meth:`sampling.fid.FIDProtocol.protocol_id`, naming library, preprocessing and
    weights), ``protocol_name`` (``torch_fidelity`` / ``clean_fid``), ``source`` (str: what was measured),
    ``format``; optionally ``feats`` (N, 2048) float32 (``--keep-features``, for KID and precision/recall).
    The ADM evaluator does not accept it as a reference batch (it would also need ``mu_s``/``sigma_s``).
alit feature sums (``n``, ``sum``, ``sum_outer``, ``info``)
    :meth:`sampling.fid.FeatureStats.save` (exact float64 sums; the shard files of ``alit fid-stats``).
alit image set (``images`` [, ``labels``, ``budgets`` ...])
    ``samples.npz`` / ``reconstructions.npz`` written by :mod:`sampling.generate`: (N, H, W, 3) uint8.

Any other npz is refused in one line naming the keys found and these formats.

    write_adm_batch("samples_adm.npz", "runs/samples/folder")          # PNG folder -> arr_0 (+ arr_1)
    a, b = open_fid_input("runs/samples/folder"), open_fid_input("VIRTUAL_imagenet256_labeled.npz")
    result = compare(a, b, FeatureExtractor("torch_fidelity"))          # {"fid": ..., "kid_mean": ...}
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenizer.core.data import IMAGE_EXTENSIONS, DataConfig, build_dataset, decode_image
from tokenizer.core.errors import UserError
from tokenizer.core.io import atomic_path

from .fid import (
    ISC_NOTE,
    PRC_NOTE,
    STATS_FORMAT,
    FeatureExtractor,
    FeatureStats,
    frechet_distance,
    inception_score_available,
    kid,
    precision_recall,
)
from .inception import FEATURE_DIM

__all__ = ["FID_STATS_FORMAT", "FidIOError", "FidInput", "GaussianStats", "array_input", "compare", "dataset_input",
           "describe", "input_features", "input_stats", "list_image_files", "open_fid_input", "read_adm_batch",
           "read_stats", "stats_metadata", "write_adm_batch", "write_fid_stats"]

FID_STATS_FORMAT = "alit-fid-stats/1"
EXPECTED_FORMATS = ("an ADM batch (arr_0 uint8 N,H,W,3 [+ arr_1 labels, mu/sigma]), mu/sigma statistics "
                    "(pytorch-fid, clean-fid, alit fid-stats), clean-fid KID features (feats N,2048), "
                    "alit feature sums (n/sum/sum_outer) or an alit image set (images uint8 N,H,W,3)")


class FidIOError(UserError, ValueError):
    """An FID input (folder, npz) that is missing, empty or of no known format: the message says which."""


# ============================================================================ statistics


@dataclass
class GaussianStats:
    """Mean and covariance of features, with what is known about how they were made."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int | None = None  # number of images (None: the file does not say)
    protocol: str | None = None  # a FIDProtocol.protocol_id, or None for foreign files
    format: str = ""  # which file format they came from

    @classmethod
    def from_feature_stats(cls, stats: FeatureStats, fmt: str = "computed") -> GaussianStats:
        return cls(stats.mean, stats.cov, stats.n, stats.protocol or None, fmt)


def _check_moments(path: Path, mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FidIOError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a (D,) mean and (D, D) "
                         "covariance; the file is damaged or not FID statistics")
    if mu.shape[0] != FEATURE_DIM:
        raise FidIOError(f"{path}: statistics of dimension {mu.shape[0]}, Inception pool3 is {FEATURE_DIM}: "
                         "these come from another network or layer and cannot be compared")
    return mu, sigma


def write_fid_stats(path: str | os.PathLike[str], stats: FeatureStats, *, protocol_name: str, source: str,
                    features: np.ndarray | None = None) -> Path:
    """Write ``alit-fid-stats/1`` (module docstring) atomically; ``features`` (N, D) adds ``feats``."""
    path = Path(path)
    if path.suffix != ".npz":
        raise FidIOError(f"--out {path}: statistics are written as .npz (e.g. stats.npz)")
    arrays: dict[str, np.ndarray] = {
        "mu": stats.mean, "sigma": stats.cov, "n": np.array(stats.n, dtype=np.int64),
        "protocol": np.array(stats.protocol or ""), "protocol_name": np.array(protocol_name),
        "source": np.array(source), "format": np.array(FID_STATS_FORMAT)}
    if features is not None:
        arrays["feats"] = np.asarray(features, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, **arrays)
    return path


def _str(data: Any, key: str) -> str:
    return str(data[key]) if key in data.files else ""


def read_stats(path: str | os.PathLike[str]) -> GaussianStats:
    """Precomputed statistics from an npz in any format of the module docstring that carries them."""
    item = open_fid_input(path)
    if item.stats is None:
        item.stats = GaussianStats.from_feature_stats(FeatureStats.from_features(item.features), item.format) \
            if item.features is not None else None
    if item.stats is None:
        raise FidIOError(f"{path} is {item.format} without statistics: compute them with "
                         f"alit fid-stats {path} --out stats.npz")
    return item.stats


# ============================================================================ image sources


def list_image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden names skipped), sorted by relative path."""
    root = Path(folder)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / n for n in filenames
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class _NpzMember:
    """One array of an npz read in row slices, without loading all of it (uncompressed or compressed).

    Like ``NpzArrayReader`` of guided-diffusion's evaluator: ADM batches of 50,000 images at 256 px are
    9.8 GB, more than one wants in memory to stream through the Inception.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        with self._open() as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        self.shape, self.fortran, self.dtype = tuple(shape), fortran, np.dtype(dtype)

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.name}.npy") as member:
            yield member

    def iter_rows(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        """Rows ``[start, stop)`` in slices of ``batch_size``, read sequentially from one open member
        (a compressed member is decompressed once, not once per slice)."""
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with self._open() as f:
            f.seek(self.offset + start * row)
            for lo in range(start, stop, batch_size):
                count = min(batch_size, stop - lo)
                data = f.read(count * row)
                yield np.frombuffer(data, dtype=self.dtype).reshape((count, *self.shape[1:]))


@dataclass
class FidInput:
    """One side of an FID: images (a folder, an npz batch, a dataset split), statistics, or features.

    ``count`` images are read by :meth:`batches` (slices ``[start, stop)``); ``stats`` are precomputed
    moments used for FID instead of the images' (an ADM reference batch, a statistics file); ``features``
    precomputed per-image features (clean-fid ``feats``).
    """

    path: str
    format: str
    count: int = 0  # images readable by batches()
    labels: np.ndarray | None = None
    stats: GaussianStats | None = None
    features: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    _files: list[Path] | None = None
    _member: _NpzMember | None = None
    _array: np.ndarray | None = None
    _dataset: Any = None
    _moments: dict[str, GaussianStats] = field(default_factory=dict)  # of ``features``, per protocol id

    @property
    def has_images(self) -> bool:
        return self.count > 0

    def batches(self, batch_size: int = 64, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """(b, H, W, 3) uint8 batches of images ``[start, stop)`` (a folder's sizes may vary between batches)."""
        stop = self.count if stop is None else min(stop, self.count)
        if self._member is not None:
            yield from self._member.iter_rows(start, stop, batch_size)
            return
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            if self._files is not None:
                images = [decode_image(p) for p in self._files[lo:hi]]
                groups: list[list[np.ndarray]] = []
                for image in images:  # consecutive images of one size go together
                    if groups and groups[-1][0].shape == image.shape:
                        groups[-1].append(image)
                    else:
                        groups.append([image])
                yield from (np.stack(g) for g in groups)
            elif self._array is not None:
                yield self._array[lo:hi]
            elif self._dataset is not None:
                yield self._dataset.uint8_images(lo, hi)

    def images(self) -> np.ndarray:
        """All images as one (N, H, W, 3) uint8 array (they must share one size)."""
        parts = list(self.batches(256))
        if not parts:
            raise FidIOError(f"{self.path} holds no images ({self.format})")
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise FidIOError(f"{self.path}: images of different sizes {sorted(shapes)}; an ADM batch holds one "
                             "size: resize them first")
        return np.concatenate(parts)


def _check_images(path: Path, key: str, shape: Sequence[int], dtype: np.dtype) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        hint = " (channels-first? transpose to N,H,W,3)" if len(shape) == 4 and shape[1] == 3 else ""
        raise FidIOError(f"{path}: {key} is {dtype} {tuple(shape)}, an image batch is uint8 (N,H,W,3){hint}")
    if shape[0] < 1:
        raise FidIOError(f"{path}: {key} holds no images")


def _open_npz(path: Path) -> FidInput:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FidIOError(f"{path} is not a readable .npz ({type(e).__name__}: {e}); expected {EXPECTED_FORMATS}") \
            from None
    with data:
        keys = set(data.files)
        fmt = _str(data, "format")
        if {"mu", "sigma"} <= keys and "arr_0" not in keys:
            mu, sigma = _check_moments(path, data["mu"], data["sigma"])
            if fmt == FID_STATS_FORMAT:
                stats = GaussianStats(mu, sigma, int(data["n"]), _str(data, "protocol") or None, "alit FID statistics")
                feats = np.asarray(data["feats"], dtype=np.float64) if "feats" in keys else None
                return FidInput(str(path), stats.format, stats=stats, features=feats)
            stats = GaussianStats(mu, sigma, None, None, "mu/sigma statistics (pytorch-fid / clean-fid format)")
            return FidInput(str(path), stats.format, stats=stats, notes=[
                f"{path}: mu/sigma statistics carry no image count and no preprocessing: the FID is comparable "
                "only if they were made with the same Inception and resize as --protocol"])
        if {"n", "sum", "sum_outer"} <= keys:
            stats = FeatureStats.load(path)
            return FidInput(str(path), f"alit feature sums ({STATS_FORMAT})",
                            stats=GaussianStats.from_feature_stats(stats, "alit feature sums"))
        if "feats" in keys and "arr_0" not in keys:
            feats = np.asarray(data["feats"])
            if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM or not np.issubdtype(feats.dtype, np.floating):
                raise FidIOError(f"{path}: feats is {feats.dtype} {feats.shape}, clean-fid KID features are float "
                                 f"(N, {FEATURE_DIM})")
            return FidInput(str(path), "clean-fid KID features (feats)", features=feats.astype(np.float64),
                            notes=[f"{path}: clean-fid features carry no preprocessing: comparable only if made "
                                   "under --protocol"])
        key = "arr_0" if "arr_0" in keys else "images" if "images" in keys else None
        labels_key = "arr_1" if key == "arr_0" else "labels"
    if key is None:
        raise FidIOError(f"{path} holds keys [{', '.join(sorted(keys)) or 'none'}], not an FID input: expected "
                         f"{EXPECTED_FORMATS}")
    member = _NpzMember(path, key)
    _check_images(path, key, member.shape, member.dtype)
    item = FidInput(str(path), "ADM batch (arr_0)" if key == "arr_0" else "alit image set (images)",
                    count=member.shape[0], _member=member)
    if member.fortran:  # np.savez never writes these; read the whole array instead of slicing bytes
        with np.load(path, allow_pickle=False) as data:
            item._array, item._member = np.ascontiguousarray(data[key]), None
    with np.load(path, allow_pickle=False) as data:
        if labels_key in data.files:
            item.labels = np.asarray(data[labels_key])
        if key == "arr_0" and {"mu", "sigma"} <= set(data.files):  # an ADM reference batch
            mu, sigma = _check_moments(path, data["mu"], data["sigma"])
            item.format = "ADM reference batch (arr_0 + mu/sigma)"
            item.stats = GaussianStats(mu, sigma, None, None, item.format)
            item.notes.append(f"{path}: FID uses the batch's precomputed mu/sigma (as the ADM evaluator does; "
                              f"made by its TF Inception, closest to --protocol torch_fidelity); its {item.count} "
                              "images give KID and precision/recall")
    return item


def open_fid_input(path: str | os.PathLike[str]) -> FidInput:
    """A folder of images or an npz of any format of the module docstring; :class:`FidIOError` otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = list_image_files(p)
        if not files:
            raise FidIOError(f"{p} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}): give a folder "
                             "of images, an .npz batch or a statistics file")
        return FidInput(str(p), "image folder", count=len(files), _files=files)
    if not p.exists():
        raise FidIOError(f"{p} does not exist: give a folder of images, an .npz batch or a statistics .npz")
    if p.suffix.lower() != ".npz":
        raise FidIOError(f"{p} is neither a folder nor an .npz: give a folder of images, an .npz batch or a "
                         "statistics .npz")
    return _open_npz(p)


def dataset_input(data: DataConfig, split: str) -> FidInput:
    """A dataset split's un-augmented uint8 images (``ImageDataset.uint8_images``), as :func:`reference_stats`."""
    dataset = build_dataset(data, split)  # type: ignore[arg-type]
    return FidInput(f"{data.source}:{split}", f"dataset split ({data.resolution}px)", count=len(dataset),
                    labels=dataset.labels.numpy(), _dataset=dataset)


def array_input(images: np.ndarray, name: str = "array") -> FidInput:
    """An in-memory (N, H, W, 3) uint8 array as an FID input."""
    images = np.asarray(images)
    _check_images(Path(name), "images", images.shape, images.dtype)
    return FidInput(name, "array", count=len(images), _array=images)


# ============================================================================ ADM batches


def write_adm_batch(path: str | os.PathLike[str], images: np.ndarray | str | os.PathLike[str],
                    labels: np.ndarray | Sequence[int] | None = None) -> Path:
    """Write an ADM-format batch: ``arr_0`` (N, H, W, 3) uint8 and, with ``labels``, ``arr_1`` (N,) int64.

    ``images`` is an array or a folder of images (read in sorted order, one size). Written with
    ``np.savez`` (uncompressed, like guided-diffusion's ``image_sample.py``), atomically.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise FidIOError(f"{path}: an ADM batch is an .npz file (e.g. samples_adm.npz)")
    source = array_input(images) if isinstance(images, np.ndarray) else open_fid_input(images)
    if not source.has_images:
        raise FidIOError(f"{images} holds no images ({source.format}) to write as an ADM batch")
    arrays = {"arr_0": source.images()}
    if labels is None and source.labels is not None and source._files is None:
        labels = source.labels
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(arrays["arr_0"]),):
            raise FidIOError(f"labels {labels.shape} do not match {len(arrays['arr_0'])} images: give one per image")
        arrays["arr_1"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def read_adm_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """``(arr_0, arr_1 or None)`` of an ADM batch (also the ``images``/``labels`` of an alit image set)."""
    item = open_fid_input(path)
    if not item.has_images or item._files is not None:
        raise FidIOError(f"{path} is {item.format}, not an image batch: expected arr_0 uint8 (N,H,W,3)")
    return item.images(), item.labels


# ============================================================================ comparing two inputs


def input_features(item: FidInput, extractor: FeatureExtractor) -> np.ndarray | None:
    """Per-image features (N, 2048) of ``item``: precomputed, or extracted from its images (then kept)."""
    if item.features is None and item.has_images:
        item.features = extractor.extract(item.batches(extractor.batch_size), total=item.count,
                                          desc=f"features {Path(item.path).name}")
    return item.features


def input_stats(item: FidInput, extractor: FeatureExtractor) -> GaussianStats:
    """The moments FID uses for ``item``: precomputed ones, else those of its features."""
    if item.stats is not None:
        if item.stats.protocol and item.stats.protocol != extractor.protocol_id:
            raise FidIOError(f"{item.path} was computed under {item.stats.protocol}, this comparison uses "
                             f"{extractor.protocol_id}: pass the matching --protocol or recompute the statistics")
        return item.stats
    protocol_id = extractor.protocol_id
    if protocol_id not in item._moments:
        features = input_features(item, extractor)
        if features is None or len(features) < 2:
            raise FidIOError(f"{item.path} gives {0 if features is None else len(features)} feature vectors; FID "
                             "needs at least 2 images")
        item._moments[protocol_id] = GaussianStats.from_feature_stats(
            FeatureStats.from_features(features, protocol_id), item.format)
    return item._moments[protocol_id]


def compare(a: FidInput, b: FidInput, extractor: FeatureExtractor, *, metrics: bool = True,
            kid_subsets: int = 100, kid_subset_size: int = 1000, prc_neighborhood: int = 3,
            seed: int = 2020) -> dict[str, Any]:
    """FID between ``a`` and ``b`` (and, with ``metrics``, KID and precision/recall of ``a`` against ``b``
    where both have per-image features). Keys: protocol, protocol_id, n_a, n_b, fid, [kid_mean, kid_std,
    kid_subset_size, precision, recall, f_score, prc_note], isc_note, notes."""
    sa, sb = input_stats(a, extractor), input_stats(b, extractor)
    out: dict[str, Any] = {
        "protocol": extractor.protocol.value, "protocol_id": extractor.protocol_id, "n_a": sa.n, "n_b": sb.n,
        "fid": frechet_distance(*_check_moments(Path(a.path), sa.mu, sa.sigma),
                                *_check_moments(Path(b.path), sb.mu, sb.sigma)),
        "notes": [*a.notes, *b.notes]}
    if metrics:
        fa, fb = input_features(a, extractor), input_features(b, extractor)
        if fa is not None and fb is not None and min(len(fa), len(fb)) > prc_neighborhood:
            out["kid_mean"], out["kid_std"] = kid(fa, fb, subsets=kid_subsets, subset_size=kid_subset_size,
                                                  seed=seed)
            out["kid_subset_size"] = min(kid_subset_size, len(fa), len(fb))
            out.update(precision_recall(fa, fb, neighborhood=prc_neighborhood), prc_note=PRC_NOTE,
                       n_features_a=len(fa), n_features_b=len(fb))
        else:
            out["notes"].append("KID and precision/recall need per-image features of both sides (images, or a "
                                "statistics file written with --keep-features): not computed")
    out["isc"] = None
    out["isc_note"] = ISC_NOTE if not inception_score_available(extractor.weights_path) else \
        "Inception Score available with these weights but not computed by alit fid"
    return out


def describe(item: FidInput) -> str:
    """One line: what an input is and how many images it holds."""
    parts = [item.format]
    if item.has_images:
        parts.append(f"{item.count} images")
    elif item.stats is not None:
        parts.append(f"{item.stats.n} images" if item.stats.n is not None else "image count unknown")
    elif item.features is not None:
        parts.append(f"{len(item.features)} feature vectors")
    if item.stats is not None and item.stats.protocol:
        parts.append(f"protocol {item.stats.protocol}")
    return f"{item.path} ({', '.join(parts)})"


def stats_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``n``, ``protocol``, ``protocol_name``, ``source``, ``format`` of an ``alit-fid-stats/1`` file."""
    with np.load(path, allow_pickle=False) as data:
        if _str(data, "format") != FID_STATS_FORMAT:
            raise FidIOError(f"{path} is not an {FID_STATS_FORMAT} file")
        return {"n": int(data["n"]), **{k: _str(data, k) for k in ("protocol", "protocol_name", "source", "format")},
                "features": "feats" in data.files}


def dumps(result: dict[str, Any]) -> str:
    """``result`` as JSON (numpy scalars made plain)."""
    return json.dumps(result, sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o))

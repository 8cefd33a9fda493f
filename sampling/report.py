"""The per-token-count evaluation of a tokenizer (and optionally a prior), written to a report folder.

What is measured, per budget ``b`` of the tokenizer (and for token-count selection, "adaptive"):

- **rFID**: reconstructions of the evaluated images of a split vs that split's reference statistics
  (:func:`sampling.fid.reference_stats` of the same images: all of the split, or its seeded
  class-stratified subset of ``num_images``), under one :class:`~sampling.fid.FIDProtocol`.
- **L1** (mean absolute error in [0, 1] pixel units) and **LPIPS** (VGG16 v0.1,
  :class:`tokenizer.lpips.LPIPS`) of the same reconstructions against the originals.
- **gFID** (with a prior): ``n`` samples (classes round-robin ``i % C``, CFG scale, temperature, steps,
  seed) vs the same reference statistics. Adaptive gFID draws budgets from the prior's token cache
  (TSC lengths of its training split); without one it is ``null`` with a note.
- **adaptive**: every image at the first budget whose L1 is below ``adaptive_threshold``
  (:meth:`ALITTokenizer.encode_adaptive`): mean tokens, histogram of chosen budgets, L1, LPIPS, rFID.

Work is split into **pieces** (:class:`Piece`: reconstruction or generation x budget x shard ``i/n``),
each a pure function of its inputs that streams images chunk by chunk into float64
:class:`~sampling.fid.FeatureStats` plus metric sums (:class:`PieceResult`); no piece holds all its
images or features. Each piece is cached under ``cache_dir("features")/eval`` keyed by the checkpoint
identities, kind, budget, protocol id, number of images, shard, chunk size and (generation) seed and
sampler settings, so a re-run (or a merge job) reuses it and says so on stderr. A Slurm engineer can run
pieces as separate jobs (``Evaluation.evaluate_piece``, or ``alit eval --shard i/n``) and then
``Evaluation.merge_and_report`` (the job that completes the set writes the report)::

    ev = Evaluation.load("runs/tok/final", "runs/prior/final", DataConfig(), EvalSettings(num_images=10_000))
    results = [ev.evaluate_piece(p) for p in ev.plan(shards=8) if p.shard.index == job_index]   # per job
    report = ev.merge_and_report([ev.load_piece(p) for p in ev.plan(shards=8)], "reports/tok")   # at the end

Files of a report folder: ``report.json`` (schema below, checked by :func:`validate_report`),
``report.md`` (tables), ``fid_vs_tokens.png``, ``reconstructions.png`` (rows = images, columns =
original, each budget, adaptive), ``samples_<budget>.png`` per budget (with a prior; ``<budget>`` is
``budget032`` or ``adaptive``), ``adaptive_histogram.png`` (when adaptive is evaluated).

``report.json`` schema (version 1; ``num`` = int or float, ``?`` = may be null)::

    format            "alit-eval-report"
    format_version    1
    created           str, ISO 8601 UTC time
    git_commit        str
    versions          {str: str}: python, torch, torch-fidelity, clean-fid, numpy, scipy, alit-stack
    tokenizer         {"id": sha256 hex (64), "path": str, "tag": "<name>-<hash8>"}
    prior             ? {"id", "path", "tag", "kind": "maskgit"|"ar", "tokenizer_id": str}
    protocol          {"name": "torch_fidelity"|"clean_fid", "id": FIDProtocol.protocol_id()}
    data              {"config": DataConfig dict, "split": str, "split_size": int, "n_images": int,
                       "reference": str (reference statistics file name)}
    settings          {"budgets": [int], "num_images": int?, "seed": int, "cfg_scale": num,
                       "temperature": num, "steps": int, "chunk_size": int, "adaptive_threshold": num?,
                       "shards": int}
    budgets           [ one per budget, increasing:
                        {"budget": int, "n_images": int, "rfid": num, "l1": num, "lpips": num,
                         "gfid": num? (null without a prior), "n_samples": int?, "protocol_id": str,
                         "seed": int, "tokenizer_id": str, "prior_id": str?} ]
    adaptive          ? {"threshold": num, "n_images": int, "mean_tokens": num,
                         "histogram": {"<budget>": int, ...} (every budget, counts sum to n_images),
                         "l1": num, "lpips": num, "rfid": num, "gfid": num?, "n_samples": int?,
                         "gfid_note": str?, "protocol_id": str, "seed": int, "tokenizer_id": str,
                         "prior_id": str?}
    files             [str]: the files written into the report folder
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.cache import prior_token_cache
from generator.tokens import total_variation
from tokenizer.core.config import git_commit, to_dict
from tokenizer.core.data import DataConfig, build_dataset
from tokenizer.core.images import from_uint8, grid_array, save_grid
from tokenizer.core.io import atomic_path, atomic_write_text, package_version
from tokenizer.core.paths import cache_dir

from .fid import (
    FeatureExtractor,
    FeatureStats,
    FIDProtocol,
    reference_cache_path,
    reference_stats,
)
from .generate import (
    ADAPTIVE,
    DEFAULT_CHUNK_SIZE,
    LENGTH_MODELS,
    WHOLE,
    Budget,
    ImageChunk,
    Models,
    SampleSettings,
    Shard,
    budget_label,
    budget_probs_from_cache,
    eval_positions,
    iter_recon_chunks,
    iter_sample_chunks,
    load_models,
    parse_budgets,
    save_npz,
)
from .protocol import (
    SPATIAL_DIM,
    EvalProtocol,
    ReferenceSet,
    compute_metrics,
    file_reference,
    image_extras,
    load_protocol,
    mean_and_spread,
    spatial_features,
    split_reference,
)

REPORT_FORMAT = "alit-eval-report"
REPORT_VERSION = 2  # 2: named protocols, the standard metric set per budget, seeds
PIECE_FORMAT = "alit-eval-piece/2"  # part of every piece's cache key; bump when a piece's computation changes
LPIPS_ID = "lpips-vgg16-v0.1"
RECON, GEN = "recon", "gen"
VERSIONED = ("torch", "torch-fidelity", "clean-fid", "numpy", "scipy", "alit-stack")


class ReportError(ValueError):
    """A report dict does not follow the documented schema; the message lists every problem."""


# ============================================================================ settings and pieces
@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation measures and how (the data config is separate)."""

    budgets: tuple[int, ...] | str = ()  # token budgets to evaluate, or text ("8,16", "max"); () = all of them
    num_images: int | None = None  # evaluated images of the split (seeded stratified subset) = samples per budget
    split: str = "val"  # dataset split: reconstructed, and the reference of rFID and gFID
    # a named protocol (configs/eval/NAME.yaml), a protocol YAML, or torch_fidelity | clean_fid (sampling.protocol)
    protocol: str = FIDProtocol.torch_fidelity.value
    cfg_scale: float = 0.0  # gFID guidance scale (cond + s (cond - uncond))
    temperature: float = 1.0  # gFID sampling temperature
    steps: int = 8  # gFID MaskGIT decoding steps
    seed: int = 0  # gFID sampling seed
    adaptive_threshold: float | None = 0.07  # TSC L1 threshold ([0, 1] units); None = no adaptive entry
    chunk_size: int = DEFAULT_CHUNK_SIZE  # images per model batch and per sampling chunk (part of the identity)
    preview: int = 8  # images per row of reconstructions.png and per row of the sample grids
    feature_batch_size: int = 64  # Inception batch size
    length_model: str = "learned"  # adaptive gFID: "learned" (the prior's p(budget | class)) or "histogram" (TSC)
    # the other gFID sampler settings (sampling.presets: names, ranges, which prior kinds use them)
    cfg_schedule: str = "constant"  # how the guidance scale runs over the steps: constant | linear | linear-down
    temperature_schedule: str = "constant"  # MaskGIT
    choice_temperature: float = 4.5  # MaskGIT: confidence Gumbel noise
    choice_schedule: str = "linear-down"  # MaskGIT
    mask_schedule: str = "cosine"  # MaskGIT: cosine | arccos | linear
    top_k: int = 0  # AR: top-k filtering (0 = off)
    top_p: float = 1.0  # AR: nucleus filtering (1 = off)
    per_budget: dict[str, dict[str, Any]] = field(default_factory=dict)  # "8"/"adaptive" -> settings on top
    preset: str | None = None  # the sampling.json these settings were read from (a record, not an input)
    seeds: int = 1  # gFID repeated with seeds seed, seed+1, ...: every generated number as mean and spread
    protocol_spec: dict[str, Any] | None = None  # `protocol` resolved (EvalProtocol.to_dict()); set on creation

    def __post_init__(self) -> None:
        if self.length_model not in LENGTH_MODELS:
            raise ValueError(f"length_model must be one of {list(LENGTH_MODELS)}, got {self.length_model!r}")
        if self.num_images is not None and self.num_images < 2:
            raise ValueError(f"num_images must be >= 2 (FID needs a covariance), got {self.num_images}")
        if self.protocol_spec is None:  # resolved once: jobs and stage hashes see the whole protocol, not a name
            object.__setattr__(self, "protocol_spec", load_protocol(self.protocol).to_dict())
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.adaptive_threshold is not None and not self.adaptive_threshold >= 0:
            raise ValueError(f"adaptive_threshold is an L1 error in [0, 1] (e.g. 0.07), got {self.adaptive_threshold}")
        if self.chunk_size < 1 or self.preview < 1 or self.steps < 1 or self.feature_batch_size < 1:
            raise ValueError("chunk_size, preview, steps and feature_batch_size must be >= 1")


    @property
    def eval_protocol(self) -> EvalProtocol:
        """The resolved :class:`~sampling.protocol.EvalProtocol`."""
        assert self.protocol_spec is not None
        return EvalProtocol.from_dict(self.protocol_spec)


@dataclass(frozen=True)
class Piece:
    """One unit of work: reconstructions or samples at one budget, one shard."""

    kind: str  # RECON or GEN
    budget: Budget  # a token budget or ADAPTIVE
    shard: Shard = WHOLE
    seed_index: int = 0  # GEN: sampled with settings.seed + seed_index (--seeds)

    def __str__(self) -> str:
        seed = f" seed+{self.seed_index}" if self.seed_index else ""
        return f"{self.kind} {budget_label(self.budget)}{seed} [{self.shard}]"

    @property
    def group(self) -> tuple[Any, ...]:
        """The key of the merged result: (kind, budget), plus the seed index of repeats."""
        return (self.kind, self.budget) if not self.seed_index else (self.kind, self.budget, self.seed_index)


@dataclass
class PieceResult:
    """Feature statistics and metric sums of a piece (or of merged pieces)."""

    piece: Piece
    stats: FeatureStats  # Inception pool3 statistics of the piece's images
    n: int  # images
    l1_sum: float = 0.0  # sum of per-image L1 (reconstructions)
    lpips_sum: float = 0.0  # sum of per-image LPIPS (reconstructions)
    tokens_sum: int = 0  # sum of per-image token counts
    histogram: dict[int, int] = field(default_factory=dict)  # budget -> images
    class_histogram: dict[str, int] = field(default_factory=dict)  # "<label>:<budget>" -> images
    preview: dict[int, np.ndarray] = field(default_factory=dict)  # global index -> (H, W, 3) uint8, first images
    reused: bool = False  # loaded from the cache
    # per-image pool3 features (KID, precision/recall, IS) by global index, when the protocol asks for them
    feature_index: np.ndarray | None = None  # (n,) int64
    features: np.ndarray | None = None  # (n, 2048) float32
    spatial: FeatureStats | None = None  # ADM spatial-feature statistics (sFID), when asked for

    def sorted_features(self) -> np.ndarray | None:
        """Per-image features in global-index order (None when not kept)."""
        if self.features is None or self.feature_index is None:
            return None
        return self.features[np.argsort(self.feature_index, kind="stable")]

    def sums(self) -> dict[str, Any]:
        return {"n": self.n, "l1_sum": self.l1_sum, "lpips_sum": self.lpips_sum, "tokens_sum": self.tokens_sum,
                "histogram": {str(k): v for k, v in sorted(self.histogram.items())},
                "class_histogram": dict(sorted(self.class_histogram.items()))}

    def merge(self, other: PieceResult) -> PieceResult:
        """Both pieces together (statistics and sums add)."""
        hist = dict(self.histogram)
        for k, v in other.histogram.items():
            hist[k] = hist.get(k, 0) + v
        per_class = dict(self.class_histogram)
        for key, v in other.class_histogram.items():
            per_class[key] = per_class.get(key, 0) + v
        both = self.features is not None and other.features is not None
        return PieceResult(Piece(self.piece.kind, self.piece.budget, WHOLE, self.piece.seed_index),
                           self.stats.merge(other.stats),
                           self.n + other.n, self.l1_sum + other.l1_sum, self.lpips_sum + other.lpips_sum,
                           self.tokens_sum + other.tokens_sum, hist, per_class, {**self.preview, **other.preview},
                           self.reused and other.reused,
                           np.concatenate([self.feature_index, other.feature_index]) if both else None,  # type: ignore[list-item]
                           np.concatenate([self.features, other.features]) if both else None,  # type: ignore[list-item]
                           self.spatial.merge(other.spatial) if self.spatial and other.spatial else None)

    def preview_images(self, count: int) -> np.ndarray:
        """The first ``count`` images (global indices 0..count-1) kept for figures: (count, H, W, 3) uint8."""
        missing = [i for i in range(count) if i not in self.preview]
        if missing:
            raise ValueError(f"{self.piece}: preview images {missing} were not kept (merge every shard first)")
        return np.stack([self.preview[i] for i in range(count)])


def merge_results(results: Iterable[PieceResult | None]) -> dict[tuple[Any, ...], PieceResult]:
    """Merge shards per :attr:`Piece.group` ((kind, budget), plus the seed index of a repeat); every shard
    0..n-1 of a group must be present exactly once."""
    groups: dict[tuple[Any, ...], list[PieceResult]] = {}
    for r in results:
        if r is None:
            raise ValueError("a piece is missing (not computed yet): run its shard first, or evaluate it here")
        groups.setdefault(r.piece.group, []).append(r)
    merged = {}
    for key, parts in groups.items():
        counts = {p.piece.shard.count for p in parts}
        indices = sorted(p.piece.shard.index for p in parts)
        if len(counts) != 1 or indices != list(range(counts.pop())):
            raise ValueError(f"{key[0]} {budget_label(key[1])}: shards {[str(p.piece.shard) for p in parts]} do "
                             "not form one complete set i/n, i = 0..n-1")
        total = parts[0]
        for p in parts[1:]:
            total = total.merge(p)
        merged[key] = total
    return merged


# ============================================================================ the evaluation
class Evaluation:
    """One evaluation request bound to loaded models and a dataset split: pieces, merging, the report."""

    def __init__(self, models: Models, data: DataConfig, settings: EvalSettings, *,
                 device: str | torch.device | None = None, progress: bool = True,
                 tokens: str | Path | None = None) -> None:
        tok = models.tokenizer
        if data.resolution != tok.image_size:
            raise ValueError(f"data.resolution={data.resolution} but the tokenizer takes {tok.image_size}px images: "
                             f"pass data.resolution={tok.image_size}")
        self.models, self.data, self.settings, self.progress = models, data, settings, progress
        # the one check of the requested budgets (from the command line, a demo config or a job's request)
        self.budgets = sorted(int(b) for b in parse_budgets(settings.budgets or "all", tok.budgets,
                                                            allow_adaptive=False))
        self.eval_protocol = ep = settings.eval_protocol
        self.protocol = FIDProtocol(ep.features)
        if ep.resolution is not None and data.resolution != ep.resolution:
            raise ValueError(f"protocol {ep.name} evaluates {ep.resolution}px images, data.resolution="
                             f"{data.resolution}: pass data.resolution={ep.resolution} (and a tokenizer of that size)")
        crop = "resize" if str(data.resize) == "resize" else "center_crop"  # what evaluation splits get
        if crop != ep.resize:
            raise ValueError(f"protocol {ep.name} takes the {ep.resize} of each image, data.resize={data.resize} "
                             f"gives the {crop}: pass data.resize={ep.resize}")
        self.dataset = build_dataset(data, settings.split)  # type: ignore[arg-type]
        self.positions = eval_positions(self.dataset, settings.num_images, data.split_seed)
        if len(self.positions) < 2:
            raise ValueError(f"the {settings.split} split has {len(self.positions)} image(s); FID needs >= 2")
        self.num_samples = ep.num_samples or len(self.positions)  # generated images per budget and seed
        self.sample_classes = "all" if ep.classes == "balanced" else "none"
        self.extractor = FeatureExtractor(self.protocol, device if device is not None else models.device,
                                          batch_size=settings.feature_batch_size, progress=False)
        self._lpips: torch.nn.Module | None = None
        # the reference statistics' file name: a digest of the data's content, split, subset and protocol
        # (computed once: for an image folder it lists every file)
        self.reference_name = reference_cache_path(data, settings.split, self.protocol, self._reference_max_images(),
                                                   weights=self.extractor.weights_path).name
        self.budget_probs: torch.Tensor | None = None
        self.budget_probs_note: str | None = None
        self.length_model: str | None = None  # what chooses the adaptive samples' budgets (None: no adaptive gFID)
        self.heldout: dict[str, float | None] = {}  # the learned length model's held-out bits (from the cache)
        if models.prior is not None and settings.adaptive_threshold is not None:
            if settings.length_model == "histogram":
                self._find_budget_probs(tokens)
                self.length_model = "histogram" if self.budget_probs is not None else None
            elif models.prior.has_length_model:
                self.length_model = "learned"
                self._heldout_bits(tokens)
            else:
                self.budget_probs_note = ("adaptive gFID skipped: the prior has no length model (trained with "
                                          "data_mode=all_budgets); pass --length-model histogram to draw budgets "
                                          "from the token cache's TSC histogram, or retrain with data_mode=adaptive")

    @classmethod
    def load(cls, tokenizer_dir: str | Path, prior_dir: str | Path | None, data: DataConfig,
             settings: EvalSettings, *, device: str | torch.device = "cpu", progress: bool = True,
             tokens: str | Path | None = None) -> Evaluation:
        """Load the models (a mismatched prior is refused) and bind them to ``data`` and ``settings``."""
        return cls(load_models(tokenizer_dir, prior_dir, device), data, settings, device=device,
                   progress=progress, tokens=tokens)

    def _find_budget_probs(self, tokens: str | Path | None) -> None:
        prior = self.models.require_prior()
        cache = Path(tokens) if tokens is not None else prior_token_cache(self.models.prior_dir or ".")
        if cache is None:
            self.budget_probs_note = ("no token cache found for the prior (pass --tokens): adaptive gFID needs the "
                                      "training split's adaptive budget distribution")
            return
        try:
            self.budget_probs = budget_probs_from_cache(cache, prior.space, "train", self.models.tokenizer_identity)
        except ValueError as e:
            self.budget_probs_note = f"adaptive gFID skipped: {e}"

    def _heldout_bits(self, tokens: str | Path | None, max_images: int = 256) -> None:
        """Held-out bits of the learned length model beside the ids' bits/token, on (the first ``max_images``
        of) the token cache's val split at its TSC lengths; the histogram baseline's length bits beside."""
        from generator.cache import adaptive_lengths
        from generator.shards import open_token_cache
        from generator.tasks import PriorTask, TokenDataset, histogram_length_bits

        prior = self.models.require_prior()
        cache = Path(tokens) if tokens is not None else prior_token_cache(self.models.prior_dir or ".")
        if cache is None:
            return
        try:
            val = open_token_cache(cache, "val")
            if val.adaptive_ids is None or val.adaptive_lengths is None:
                return
            conditional = prior.space.num_classes > 0
            n = min(max_images, len(val.adaptive_lengths))
            ds = TokenDataset(val.ids_by_budget, val.labels if conditional else None, val.adaptive_ids,
                              val.adaptive_lengths).subset(torch.arange(n))
            task = PriorTask(prior, ds, eval_batch_size=self.settings.chunk_size,
                             maskgit_eval_steps=self.settings.steps)
            bits = task.adaptive_bits(prior, next(prior.parameters()).device, torch.Generator().manual_seed(0))
            train_lengths, train_labels = adaptive_lengths(cache, "train", self.models.tokenizer_identity)
            mean_tokens = float(ds.adaptive_lengths.double().mean())
            hist = histogram_length_bits(train_lengths, train_labels if conditional else None, ds.adaptive_lengths,
                                         ds.labels if conditional else None, prior.space)
        except (ValueError, KeyError, FileNotFoundError) as e:
            print(f"[eval] held-out length bits skipped: {e}", file=sys.stderr)
            return
        self.heldout = {"ids_bits_per_token": bits["bits_per_token/adaptive"],
                        "length_bits_per_token": bits["length_bits_per_token"],
                        "length_bits_per_image": bits["length_bits"],
                        "histogram_length_bits_per_token": hist / mean_tokens, "heldout_images": n}

    # ------------------------------------------------------------------ plan
    @property
    def num_images(self) -> int:
        """Images evaluated (and samples per budget)."""
        return len(self.positions)

    def plan(self, shards: int = 1) -> list[Piece]:
        """Every piece of this evaluation with each (kind, budget) split into ``shards`` shards."""
        budgets: list[Budget] = list(self.budgets)
        recon = [*budgets, ADAPTIVE] if self.settings.adaptive_threshold is not None else budgets
        gen: list[Budget] = []
        if self.models.prior is not None:
            gen = [*budgets, ADAPTIVE] if self.length_model is not None else budgets
        pieces = [Piece(RECON, b, Shard(i, shards)) for b in recon for i in range(shards)]
        return pieces + [Piece(GEN, b, Shard(i, shards), k) for k in range(self.settings.seeds) for b in gen
                         for i in range(shards)]

    def sample_settings(self, budget: Budget, seed_index: int = 0) -> SampleSettings:
        """The sampling request behind the gFID of ``budget`` (repeat ``seed_index`` of ``--seeds``)."""
        s = self.settings
        sampler = {k: getattr(s, k) for k in SAMPLER_KEYS}
        sampler.update(s.per_budget.get(str(budget), {}))  # the preset's entry for this budget
        return SampleSettings(budget=budget, num_images=self.num_samples, seed=s.seed + seed_index,
                              classes=self.sample_classes,
                              chunk_size=s.chunk_size, length_model=s.length_model, **sampler)

    # ------------------------------------------------------------------ cache
    def _reference_max_images(self) -> int | None:
        return None if self.num_images >= len(self.dataset) else self.num_images

    def piece_key(self, piece: Piece) -> dict[str, Any]:
        """Everything a piece's result depends on (its cache key)."""
        s, m = self.settings, self.models
        key: dict[str, Any] = {"format": PIECE_FORMAT, "kind": piece.kind, "budget": piece.budget,
                               "shard": [piece.shard.index, piece.shard.count], "chunk_size": s.chunk_size,
                               "num_images": self.num_images, "protocol_id": self.extractor.protocol_id,
                               "tokenizer": m.tokenizer_identity["id"]}
        extras = [k for k, on in (("pool3", self.eval_protocol.wants_features),
                                  ("spatial", self.eval_protocol.wants_spatial)) if on]
        if extras:
            key["extras"] = extras
        if piece.kind == RECON:
            key["data"] = self.reference_name
            key["lpips"] = LPIPS_ID
            if piece.budget == ADAPTIVE:
                key["threshold"] = s.adaptive_threshold
        else:
            sample = self.sample_settings(piece.budget, piece.seed_index).to_dict()
            key.update(prior=(m.prior_identity or {}).get("id"), sample=sample)
            if piece.budget == ADAPTIVE and self.budget_probs is not None:
                probs = np.asarray(self.budget_probs, dtype=np.float64).tobytes()
                key["budget_probs"] = hashlib.sha256(probs).hexdigest()[:16]
        return key

    def cache_path(self, piece: Piece) -> Path:
        """Where ``piece``'s statistics and sums are cached."""
        digest = hashlib.sha256(json.dumps(self.piece_key(piece), sort_keys=True).encode()).hexdigest()[:20]
        tag = self.models.prior_tag if piece.kind == GEN else self.models.tokenizer_tag
        seed = f"-seed{piece.seed_index}" if piece.seed_index else ""
        name = f"{piece.kind}-{budget_label(piece.budget)}{seed}{piece.shard.suffix}-{tag}-{digest}.stats.safetensors"
        return cache_dir("features") / "eval" / name

    def preview_count(self, kind: str) -> int:
        """Images a piece keeps for the figures (its global indices below this count)."""
        return min(self.settings.preview * (1 if kind == RECON else 2),
                   self.num_images if kind == RECON else self.num_samples)

    def load_piece(self, piece: Piece) -> PieceResult | None:
        """A cached piece, or None (never computes)."""
        path = self.cache_path(piece)
        preview_path = _preview_path(path)
        if not path.is_file() or not preview_path.is_file():
            return None
        try:
            meta = FeatureStats.read_metadata(path)
            if json.loads(meta.get("key", "null")) != json.loads(json.dumps(self.piece_key(piece))):
                return None
            sums = json.loads(meta["sums"])
            stats = FeatureStats.load(path)
            with np.load(preview_path, allow_pickle=False) as data:
                preview = {int(i): image for i, image in zip(data["indices"], data["images"])}
            extras = self._load_extras(path)
        except (ValueError, OSError, KeyError):  # damaged or foreign: recompute and replace
            return None
        if extras is None:
            return None
        hist = {int(k): int(v) for k, v in sums["histogram"].items()}
        per_class = {str(k): int(v) for k, v in sums.get("class_histogram", {}).items()}
        return PieceResult(piece, stats, int(sums["n"]), float(sums["l1_sum"]), float(sums["lpips_sum"]),
                           int(sums["tokens_sum"]), hist, per_class, preview, True, *extras)

    def _load_extras(self, path: Path) -> tuple[np.ndarray | None, np.ndarray | None, FeatureStats | None] | None:
        """A piece's per-image features and spatial statistics as the protocol needs them; None if missing."""
        ep = self.eval_protocol
        if not (ep.wants_features or ep.wants_spatial):
            return None, None, None
        file = _extras_path(path)
        if not file.is_file():
            return None
        with np.load(file, allow_pickle=False) as data:
            spatial = None
            if ep.wants_spatial:
                spatial = FeatureStats(int(data["spatial_sum"].shape[0]), self.extractor.protocol_id)
                spatial.n, spatial.sum, spatial.sum_outer = int(data["spatial_n"]), data["spatial_sum"], \
                    data["spatial_sum_outer"]
            if ep.wants_features:
                return data["feature_index"], data["features"], spatial
            return None, None, spatial

    # ------------------------------------------------------------------ compute
    @property
    def lpips(self) -> torch.nn.Module:
        """LPIPS-VGG16 on the models' device (loaded on first use: a fully cached run never loads it)."""
        if self._lpips is None:
            from tokenizer.lpips import LPIPS

            self._lpips = LPIPS().to(self.models.device)
        return self._lpips

    def _chunks(self, piece: Piece) -> Iterable[ImageChunk]:
        desc = str(piece)
        if piece.kind == RECON:
            return iter_recon_chunks(self.models.tokenizer, self.dataset, self.positions, piece.budget,
                                     self.settings.adaptive_threshold, self.settings.chunk_size, piece.shard,
                                     self.progress, desc)
        return iter_sample_chunks(self.models, self.sample_settings(piece.budget, piece.seed_index), piece.shard,
                                  self.budget_probs if piece.budget == ADAPTIVE else None, self.progress, desc)

    @torch.no_grad()
    def evaluate_piece(self, piece: Piece) -> PieceResult:
        """Compute one piece (or reuse its cache), streaming chunk by chunk into float64 statistics."""
        cached = self.load_piece(piece)
        if cached is not None:
            print(f"[eval] reused cached features for {piece} ({self.cache_path(piece).name})", file=sys.stderr)
            return cached
        if piece.kind == GEN and self.models.prior is None:
            raise ValueError(f"{piece} needs a prior (--prior)")
        result = PieceResult(piece, FeatureStats(protocol=self.extractor.protocol_id), 0)
        ep = self.eval_protocol
        if ep.wants_spatial:
            result.spatial = FeatureStats(SPATIAL_DIM, self.extractor.protocol_id)
        feature_indices: list[np.ndarray] = []
        features: list[np.ndarray] = []
        keep = self.preview_count(piece.kind)
        for chunk in self._chunks(piece):
            result.preview.update((int(i), im) for i, im in zip(chunk.indices, chunk.images) if i < keep)
            if result.spatial is not None:  # one Inception pass: pool3 and the spatial features
                pool3, spatial = spatial_features(self.extractor, chunk.images)
                result.spatial.update(spatial.astype(np.float64))
                result.stats.update(pool3)
            elif ep.wants_features:
                pool3 = self.extractor.extract(chunk.images)
                result.stats.update(pool3)
            else:
                self.extractor.accumulate(chunk.images, result.stats)
            if ep.wants_features:
                feature_indices.append(np.asarray(chunk.indices, dtype=np.int64))
                features.append(pool3.astype(np.float32))  # exact: the network's features are float32
            result.n += len(chunk.indices)
            result.tokens_sum += int(chunk.budgets.sum())
            for b, label in zip(chunk.budgets.tolist(), chunk.labels.tolist()):
                result.histogram[b] = result.histogram.get(b, 0) + 1
                key = f"{label}:{b}"
                result.class_histogram[key] = result.class_histogram.get(key, 0) + 1
            if piece.kind == RECON:
                result.l1_sum += float(chunk.extra["l1"].astype(np.float64).sum())
                result.lpips_sum += float(self.lpips(chunk.pixels, chunk.targets).double().sum())
        if result.n == 0:
            raise ValueError(f"{piece} owns no images: use fewer shards than chunks "
                             f"({math.ceil(self.num_images / self.settings.chunk_size)})")
        path = self.cache_path(piece)
        indices = sorted(result.preview)
        images = np.stack([result.preview[i] for i in indices]) if indices else np.zeros((0, 1, 1, 3), np.uint8)
        save_npz(_preview_path(path), {"indices": np.asarray(indices, dtype=np.int64), "images": images})
        if features:
            result.feature_index, result.features = np.concatenate(feature_indices), np.concatenate(features)
        if ep.wants_features or ep.wants_spatial:
            extra: dict[str, np.ndarray] = {}
            if result.features is not None:
                extra.update(feature_index=result.feature_index, features=result.features)
            if result.spatial is not None:
                extra.update(spatial_n=np.array(result.spatial.n), spatial_sum=result.spatial.sum,
                             spatial_sum_outer=result.spatial.sum_outer)
            save_npz(_extras_path(path), extra)
        # the statistics file is written last: its presence marks a complete piece
        result.stats.save(path, metadata={"key": json.dumps(self.piece_key(piece), sort_keys=True),
                                          "sums": json.dumps(result.sums())})
        return result

    def reference(self) -> FeatureStats:
        """The split's reference statistics (cached by :func:`sampling.fid.reference_stats`). A protocol
        that needs the images' own features or spatial moments gets them from the same Inception pass."""
        def one_pass() -> FeatureStats | None:
            stats = FeatureStats(protocol=self.extractor.protocol_id)
            self._reference_extras(stats)
            return stats if stats.n == self.num_images else None  # None: the extras came from their cache

        ep = self.eval_protocol
        return reference_stats(self.data, self.settings.split, self.protocol, self._reference_max_images(),
                               extractor=self.extractor, progress=self.progress,
                               moments=one_pass if ep.wants_features or ep.wants_spatial else None)

    def _reference_extras(self, pool3_stats: FeatureStats | None = None) -> dict[str, np.ndarray]:
        """The evaluated images' per-image pool3 features and spatial moments (cached by ``image_extras``)."""
        def batches() -> Iterable[np.ndarray]:
            step = self.extractor.batch_size
            for lo in range(0, len(self.positions), step):
                yield np.concatenate([self.dataset.uint8_images(int(p), int(p) + 1)
                                      for p in self.positions[lo:lo + step]])  # (b, R, R, 3)
        return image_extras(self.extractor, batches(), self.num_images, self.reference_name,
                            self.eval_protocol.wants_spatial, f"reference {self.settings.split}", pool3_stats)

    def reference_sets(self, ref: FeatureStats) -> tuple[ReferenceSet, ReferenceSet]:
        """The references of reconstructions (the evaluated images, whose statistics are ``ref``) and of
        samples (the protocol's: the same images, another split, an image batch or a statistics file), with
        the per-image features and spatial statistics the protocol's metrics need (cached)."""
        ep = self.eval_protocol
        recon = ReferenceSet(f"the evaluated {self.settings.split} images", ref.mean, ref.cov, ref.n,
                             protocol_id=ref.protocol)
        if ep.wants_features or ep.wants_spatial:
            extras = self._reference_extras()
            recon.features = extras["features"]
            recon.spatial_mu, recon.spatial_sigma = extras.get("spatial_mu"), extras.get("spatial_sigma")
        if ep.reference.kind == "split" and ep.reference.split is None:
            return recon, recon
        if ep.reference.kind == "split":
            return recon, split_reference(ep, self.data, self.extractor)
        return recon, file_reference(ep, self.extractor)

    def run(self, out_dir: str | Path, shard: Shard = WHOLE) -> dict[str, Any] | None:
        """Evaluate ``shard``'s pieces; when every shard's pieces are done, write the report and return it."""
        for piece in self.plan(shard.count):
            if piece.shard == shard:
                self.evaluate_piece(piece)
        results = [self.load_piece(p) for p in self.plan(shard.count)]
        if any(r is None for r in results):
            missing = sum(r is None for r in results)
            print(f"[eval] shard {shard} done; {missing} pieces of other shards are still missing, so the report "
                  "is written by the run that completes the set", file=sys.stderr)
            return None
        return self.merge_and_report(results, out_dir)

    # ------------------------------------------------------------------ report
    def merge_and_report(self, results: Sequence[PieceResult | None], out_dir: str | Path) -> dict[str, Any]:
        """Merge piece results, compute FIDs against the reference, write every report file."""
        merged = merge_results(results)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ref = self.reference()
        shards = max((r.piece.shard.count for r in results if r is not None), default=1)
        report = self._report_dict(merged, ref, shards, *self.reference_sets(ref))
        files = ["report.json", "report.md", "fid_vs_tokens.png", "reconstructions.png"]
        plot_fid_vs_tokens(report, out / "fid_vs_tokens.png")
        self._reconstructions_figure(merged, out / "reconstructions.png")
        self._specialization_figure(out / "specialization.png")
        files.append("specialization.png")
        if self.settings.adaptive_threshold is not None:
            self._complexity_figure(out / "complexity")
            files.append("complexity/complexity.png")
        for key in [*self.budgets, ADAPTIVE]:
            if (GEN, key) in merged:
                name = f"samples_{budget_label(key)}.png"
                tiles = merged[(GEN, key)].preview_images(self.preview_count(GEN))
                save_tiles(tiles, self.settings.preview, out / name)
                files.append(name)
        if report["adaptive"] is not None:
            plot_histogram(report["adaptive"], out / "adaptive_histogram.png")
            files.append("adaptive_histogram.png")
        report["files"] = files
        validate_report(report)
        atomic_write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=False))
        atomic_write_text(out / "report.md", render_markdown(report))
        print(f"[eval] report: {out / 'report.md'}", file=sys.stderr)
        return report

    def _metrics(self, result: PieceResult, ref: ReferenceSet) -> dict[str, Any]:
        return compute_metrics(self.eval_protocol, result.stats, ref, features=result.sorted_features(),
                               spatial=result.spatial, weights=self.extractor.weights_path)

    def _report_dict(self, merged: dict[tuple[Any, ...], PieceResult], ref: FeatureStats, shards: int,
                     recon_ref: ReferenceSet, gen_ref: ReferenceSet) -> dict[str, Any]:
        m, s, ep = self.models, self.settings, self.eval_protocol
        prior_id = m.prior_identity["id"] if m.prior_identity is not None else None
        common = {"protocol_id": self.extractor.protocol_id, "seed": s.seed,
                  "tokenizer_id": m.tokenizer_identity["id"], "prior_id": prior_id}

        def gen_fields(budget: Budget) -> dict[str, Any]:
            runs = [merged[key] for key in [(GEN, budget), *((GEN, budget, k) for k in range(1, s.seeds))]
                    if key in merged]
            if not runs:
                return {"gfid": None, "n_samples": None}
            metrics = mean_and_spread([self._metrics(r, gen_ref) for r in runs])
            metrics["seeds"] = [s.seed + k for k in range(len(runs))]
            return {"gfid": metrics["fid"], "n_samples": runs[0].n, "gen_metrics": metrics}

        def recon_fields(r: PieceResult) -> dict[str, Any]:
            metrics = self._metrics(r, recon_ref)
            return {"rfid": metrics["fid"], "recon_metrics": metrics}

        entries = []
        for b in self.budgets:
            r = merged[(RECON, b)]
            entries.append({"budget": b, "n_images": r.n, **recon_fields(r),
                            "l1": r.l1_sum / r.n, "lpips": r.lpips_sum / r.n, **gen_fields(b), **common})
        adaptive = None
        if (RECON, ADAPTIVE) in merged:
            r = merged[(RECON, ADAPTIVE)]
            note = None
            if m.prior is not None and (GEN, ADAPTIVE) not in merged:
                note = self.budget_probs_note
            generated = gen_fields(ADAPTIVE)
            adaptive = {"threshold": s.adaptive_threshold, "n_images": r.n, "mean_tokens": r.tokens_sum / r.n,
                        "histogram": {str(b): r.histogram.get(b, 0) for b in m.tokenizer.budgets},
                        "l1": r.l1_sum / r.n, "lpips": r.lpips_sum / r.n, **recon_fields(r),
                        **generated, "gfid_note": note, **common,
                        **self._generated_lengths(merged, entries, generated["gfid"])}
        prior = None
        if m.prior is not None and m.prior_identity is not None:
            prior = {"id": prior_id, "path": str(m.prior_dir), "tag": m.prior_tag, "kind": m.prior.kind,
                     "tokenizer_id": m.tokenizer_identity["id"]}
        return {
            "format": REPORT_FORMAT, "format_version": REPORT_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "versions": library_versions(),
            "tokenizer": {"id": m.tokenizer_identity["id"], "path": str(m.tokenizer_dir), "tag": m.tokenizer_tag},
            "prior": prior,
            "protocol": {"name": self.protocol.value, "id": self.extractor.protocol_id, "eval": ep.to_dict(),
                         "summary": ep.summary(s.split, self.num_samples if m.prior is not None else None),
                         "recon_reference": recon_ref.description, "gen_reference": gen_ref.description,
                         "notes": sorted({*recon_ref.notes, *gen_ref.notes})},
            "data": {"config": to_dict(self.data), "split": s.split, "split_size": len(self.dataset),
                     "n_images": self.num_images,
                     "reference": self.reference_name},
            "settings": {**{k: v for k, v in asdict(s).items() if k in SETTINGS_KEYS}, "budgets": self.budgets,
                         "shards": shards, "seeds": s.seeds, "num_samples": self.num_samples,
                         "classes": ep.classes},
            "budgets": entries, "adaptive": adaptive, "files": [],
        }

    def _generated_lengths(self, merged: dict[tuple[Any, ...], PieceResult], entries: list[dict[str, Any]],
                           gfid: float | None) -> dict[str, Any]:
        """The adaptive row's account of the generated lengths: which length model, the realised histogram
        beside the evaluated split's TSC histogram (overall and per class) with total-variation distances,
        gFID against every fixed budget and the budget nearest the realised mean, and held-out bits."""
        budgets = list(self.models.tokenizer.budgets)
        gen, recon = merged.get((GEN, ADAPTIVE)), merged.get((RECON, ADAPTIVE))
        out: dict[str, Any] = {"length_model": None, **{k: self.heldout.get(k) for k in HELDOUT_KEYS}}
        if gen is None or recon is None:
            return out
        realised = {str(b): gen.histogram.get(b, 0) for b in budgets}
        mean = gen.tokens_sum / gen.n
        matched = min(budgets, key=lambda b: (abs(b - mean), b))
        fixed = {e["budget"]: e["gfid"] for e in entries if e["gfid"] is not None}
        per_class_gen = _class_counts(gen.class_histogram, budgets)
        per_class_data = _class_counts(recon.class_histogram, budgets)
        tv_per_class: dict[str, float] = {}
        data_mix = np.zeros(len(budgets))
        for c, counts in per_class_gen.items():
            data = per_class_data.get(c)
            if data is None or not data.sum():
                continue
            tv_per_class[c] = total_variation(torch.from_numpy(counts), torch.from_numpy(data))
            data_mix += counts.sum() / gen.n * data / data.sum()  # the data's TSC at the samples' class mix
        hist_all = torch.tensor([realised[str(b)] for b in budgets], dtype=torch.float64)
        data_hist = torch.from_numpy(data_mix) if data_mix.sum() else \
            torch.tensor([recon.histogram.get(b, 0) for b in budgets], dtype=torch.float64)
        out.update({
            "length_model": self.length_model, "generated_histogram": realised, "generated_mean_tokens": mean,
            "generated_class_histogram": {c: v.astype(int).tolist() for c, v in per_class_gen.items()},
            "data_class_histogram": {c: v.astype(int).tolist() for c, v in per_class_data.items()},
            "length_tv": total_variation(hist_all, data_hist), "length_tv_per_class": tv_per_class,
            "matched_budget": matched, "gfid_matched": fixed.get(matched),
            "gfid_minus_budget": {str(b): gfid - g for b, g in fixed.items()} if gfid is not None else {}})
        return out

    def _reconstructions_figure(self, merged: dict[tuple[str, Budget], PieceResult], path: Path) -> None:
        k = self.preview_count(RECON)
        originals = np.concatenate([self.dataset.uint8_images(int(p), int(p) + 1) for p in self.positions[:k]])
        columns: list[tuple[str, np.ndarray]] = [("original", originals)]
        for b in [*self.budgets, ADAPTIVE]:
            if (RECON, b) in merged:
                label = f"TSC t={self.settings.adaptive_threshold:g}" if b == ADAPTIVE else f"{b} tokens"
                columns.append((label, merged[(RECON, b)].preview_images(k)))
        plot_image_table(columns, path)

    def _complexity_figure(self, folder: Path) -> None:
        """``alit analyze complexity`` on the evaluated images: the adaptive budget and every budget's L1
        against PNG/JPEG bits per pixel and the mean gradient, Spearman with bootstrap intervals, into
        ``folder`` (``complexity.png``, ``complexity.csv``, ``complexity.json``)."""
        from .analysis import complexity_analysis, measure_tokenizer

        assert self.settings.adaptive_threshold is not None
        m = measure_tokenizer(self.models.tokenizer, self.dataset, np.asarray(self.positions),
                              self.settings.adaptive_threshold, batch_size=self.settings.chunk_size)
        complexity_analysis(m, folder, reps=500, meta={"split": self.settings.split})

    def _specialization_figure(self, path: Path, images: int = 4, max_tokens: int = 16) -> None:
        """Token specialization maps of the first validation images (``alit inspect`` draws more): each
        latent token's attention over the 2D grid in the last encoder layer at the first iteration (rows =
        tokens, up to ``max_tokens``; columns = images), from the explicit-softmax inspection path."""
        from .analysis import latent_attention_maps, overlay_grid

        k = min(images, len(self.positions))
        pixels = np.concatenate([self.dataset.uint8_images(int(p), int(p) + 1) for p in self.positions[:k]])
        tok = self.models.tokenizer
        last = tok.config.depth - 1
        x = from_uint8(pixels).to(next(tok.parameters()).device)  # (k, 3, R, R) in [-1, 1]
        grid = latent_attention_maps(tok, x, "encoder", iterations=[0], layers=[last])[(0, last)]  # (k, T, G, G)
        with atomic_path(path) as tmp:
            overlay_grid(pixels, grid[:, :max_tokens].float().cpu().numpy()).save(tmp, format="PNG")


HELDOUT_KEYS = ("ids_bits_per_token", "length_bits_per_token", "length_bits_per_image",
                "histogram_length_bits_per_token", "heldout_images")


def _class_counts(class_histogram: dict[str, int], budgets: list[int]) -> dict[str, np.ndarray]:
    """``{"<label>": counts (n,)}`` from ``{"<label>:<budget>": count}`` (label -1 = null class)."""
    out: dict[str, np.ndarray] = {}
    for key, v in class_histogram.items():
        label, b = key.rsplit(":", 1)
        if int(b) in budgets:
            out.setdefault(label, np.zeros(len(budgets)))[budgets.index(int(b))] += v
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


SAMPLER_KEYS = ("cfg_scale", "cfg_schedule", "temperature", "temperature_schedule", "choice_temperature",
                "choice_schedule", "steps", "mask_schedule", "top_k", "top_p")  # = sampling.presets.KNOBS
SETTINGS_KEYS = ("num_images", "seed", "cfg_scale", "temperature", "steps", "chunk_size", "adaptive_threshold",
                 "length_model", "cfg_schedule", "temperature_schedule", "choice_temperature", "choice_schedule",
                 "mask_schedule", "top_k", "top_p", "per_budget", "preset")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries behind the numbers."""
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        out[dist] = package_version(dist)
    return out


# ============================================================================ figures and tables
def _preview_path(stats_path: Path) -> Path:
    return stats_path.with_name(stats_path.name.replace(".stats.safetensors", ".preview.npz"))


def _extras_path(stats_path: Path) -> Path:
    return stats_path.with_name(stats_path.name.replace(".stats.safetensors", ".features.npz"))


def save_tiles(tiles: np.ndarray, cols: int, path: str | Path) -> Path:
    """``(k, H, W, 3)`` uint8 images as a PNG grid with ``cols`` columns (white padding)."""
    k = len(tiles)
    cols = min(cols, k)
    rows = math.ceil(k / cols)
    pad = np.full((rows * cols - k, *tiles.shape[1:]), 255, dtype=np.uint8)
    grid = from_uint8(np.concatenate([tiles, pad])).reshape(rows, cols, 3, *tiles.shape[1:3])
    return save_grid(grid, path)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend switch

    return Figure(figsize=(width, height), layout="constrained")


def plot_fid_vs_tokens(report: dict[str, Any], path: str | Path) -> Path:
    """rFID and gFID against the token count (adaptive as single markers at its mean token count)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    entries = report["budgets"]
    x = [e["budget"] for e in entries]
    ax.plot(x, [e["rfid"] for e in entries], "o-", label="rFID (reconstructions)")
    if any(e["gfid"] is not None for e in entries):
        ax.plot(x, [e["gfid"] if e["gfid"] is not None else math.nan for e in entries], "s-",
                label="gFID (samples)")
    a = report["adaptive"]
    if a is not None:
        ax.plot([a["mean_tokens"]], [a["rfid"]], "*", markersize=12, label=f"rFID, TSC t={a['threshold']:g}")
        if a["gfid"] is not None:
            ax.plot([a["mean_tokens"]], [a["gfid"]], "P", markersize=10, label="gFID, adaptive budgets")
    ax.set_xlabel("tokens per image")
    ax.set_ylabel(f"FID (N={report['data']['n_images']}, {report['protocol']['name']})")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_histogram(adaptive: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of the budgets token-count selection chose."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    budgets = list(adaptive["histogram"])
    ax.bar(range(len(budgets)), [adaptive["histogram"][b] for b in budgets])
    ax.set_xticks(range(len(budgets)), budgets)
    ax.set_xlabel("tokens chosen")
    ax.set_ylabel("images")
    ax.set_title(f"TSC at L1 < {adaptive['threshold']:g}: mean {adaptive['mean_tokens']:.1f} tokens "
                 f"(N={adaptive['n_images']})")
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_image_table(columns: Sequence[tuple[str, np.ndarray]], path: str | Path, pad: int = 2) -> Path:
    """A labelled grid: one column per ``(label, (k, H, W, 3) uint8)``, rows = images."""
    stack = torch.stack([from_uint8(images) for _, images in columns], 1)  # (k, cols, 3, H, W)
    grid = grid_array(stack, pad)  # (rows*(H+pad)+pad, cols*(W+pad)+pad, 3)
    w = stack.shape[-1]
    fig = _figure(max(4.0, 1.1 * len(columns)), max(2.0, 1.1 * stack.shape[0]) + 0.4)
    ax = fig.add_subplot()
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([pad + c * (w + pad) + w / 2 for c in range(len(columns))], [c[0] for c in columns],
                  fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    fig.savefig(path, dpi=120)
    return Path(path)


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


METRIC_COLUMNS = ("tokens", "set", "N", "reference N", "FID", "sFID", "KID x 1e3", "precision", "recall", "IS")


def _stat(metrics: dict[str, Any], key: str, digits: int, scale: float = 1.0) -> str:
    """``metrics[key]`` (times ``scale``), with ``± std`` over seeds when there were several."""
    value = metrics.get(key)
    if value is None:
        return "n/a"
    text = f"{value * scale:.{digits}f}"
    if len(metrics.get(f"{key}_seeds", [])) > 1:
        text += f" ± {metrics[f'{key}_std'] * scale:.{digits}f}"
    elif key == "kid_mean" and metrics.get("kid_std") is not None:
        text += f" ± {metrics['kid_std'] * scale:.{digits}f}"
    return text


def metric_rows(report: dict[str, Any]) -> list[list[str]]:
    """The standard metric set per budget, reconstructions and samples, as table cells (``METRIC_COLUMNS``);
    with several seeds each generated number is "mean ± std over seeds" (KID alone: ± its subset std)."""
    rows = []
    entries = [(str(e["budget"]), e) for e in report["budgets"]]
    if report["adaptive"] is not None:
        entries.append((f"adaptive (mean {report['adaptive']['mean_tokens']:.1f})", report["adaptive"]))
    for label, e in entries:
        for kind, key in (("reconstructions", "recon_metrics"), ("samples", "gen_metrics")):
            m = e.get(key)
            if not m:
                continue
            isc = _stat(m, "isc_mean", 2)
            rows.append([label, kind, str(m["n"]), "-" if m["n_reference"] is None else str(m["n_reference"]),
                         _stat(m, "fid", 2), _stat(m, "sfid", 2), _stat(m, "kid_mean", 2, 1e3),
                         _stat(m, "precision", 3), _stat(m, "recall", 3), isc])
    return rows


def metric_notes(report: dict[str, Any]) -> list[str]:
    """Why a metric is n/a, and what the numbers rest on (deduplicated across rows)."""
    notes = list(report["protocol"]["notes"])
    for e in [*report["budgets"], *([report["adaptive"]] if report["adaptive"] else [])]:
        for key in ("recon_metrics", "gen_metrics"):
            notes += (e.get(key) or {}).get("notes", [])
    return list(dict.fromkeys(notes))


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the numbers as tables, the figures, and where they come from."""
    s, d, a = report["settings"], report["data"], report["adaptive"]
    prior = report["prior"]
    lines = [f"# Evaluation of {report['tokenizer']['tag']}" + (f" with prior {prior['tag']}" if prior else ""),
             "",
             f"Split `{d['split']}` of `{d['config']['source']}` ({d['config']['resolution']} px), "
             f"N = {d['n_images']} of {d['split_size']} images; FID protocol `{report['protocol']['name']}`"
             + (f"; samples: seed {s['seed']}, CFG {s['cfg_scale']:g}, temperature {s['temperature']:g}, "
                f"{s['steps']} steps, classes round-robin" if prior else "") + ".",
             "FID from few images is biased upwards: compare numbers only at equal N and protocol.",
             "", f"Protocol {report['protocol']['summary']}.", "",
             "| tokens | rFID | gFID | L1 | LPIPS | images |",
             "|---:|---:|---:|---:|---:|---:|"]
    for e in report["budgets"]:
        lines.append(f"| {e['budget']} | {_num(e['rfid'])} | {_num(e['gfid'])} | {e['l1']:.4f} | "
                     f"{e['lpips']:.4f} | {e['n_images']} |")
    if a is not None:
        lines.append(f"| adaptive (mean {a['mean_tokens']:.1f}) | {_num(a['rfid'])} | {_num(a['gfid'])} | "
                     f"{a['l1']:.4f} | {a['lpips']:.4f} | {a['n_images']} |")
    p = report["protocol"]
    seeds = s.get("seeds", 1)
    lines += ["", f"## Standard metrics (protocol `{p['eval']['name']}`)", "",
              f"Protocol {p['summary']}. Reconstructions against {p['recon_reference']}, samples against "
              f"{p['gen_reference']}"
              + (f"; samples: mean ± std over {seeds} seeds ({', '.join(str(s['seed'] + k) for k in range(seeds))})"
                 if seeds > 1 else "") + "; KID ± its subset std.", "",
              "| " + " | ".join(METRIC_COLUMNS) + " |", "|" + "---:|" * len(METRIC_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in metric_rows(report)]
    lines += [""] + [f"- {note}" for note in metric_notes(report)]
    if a is not None:
        lines += ["", f"## Token-count selection at L1 < {a['threshold']:g}", "",
                  f"Mean tokens {a['mean_tokens']:.2f}; L1 {a['l1']:.4f}; LPIPS {a['lpips']:.4f}.", "",
                  "| tokens | images | share |", "|---:|---:|---:|"]
        for b, count in a["histogram"].items():
            lines.append(f"| {b} | {count} | {count / a['n_images']:.1%} |")
        if a.get("gfid_note"):
            lines += ["", f"Note: {a['gfid_note']}"]
        if a.get("length_model"):
            who = "the prior's length model" if a["length_model"] == "learned" else "the token cache's TSC histogram"
            lines += ["", f"## Adaptive generation (length_model: {a['length_model']})", "",
                      f"Budgets chosen by {who}: "
                      f"mean {a['generated_mean_tokens']:.2f} tokens over {a['n_samples']} samples; total variation "
                      f"to the split's TSC lengths {a['length_tv']:.3f} overall (at the samples' class mix), "
                      + ", ".join(f"class {c}: {v:.3f}" for c, v in a["length_tv_per_class"].items()) + ".", "",
                      "| tokens | generated | TSC (data) |", "|---:|---:|---:|"]
            for b, count in a["generated_histogram"].items():
                lines.append(f"| {b} | {count} | {a['histogram'].get(b, 0)} |")
            lines += ["", f"gFID adaptive {_num(a['gfid'])}; at the nearest fixed budget to the mean "
                      f"({a['matched_budget']}) {_num(a['gfid_matched'])}; adaptive minus fixed: "
                      + ", ".join(f"{b}: {v:+.2f}" for b, v in a["gfid_minus_budget"].items()) + "."]
            if a.get("length_bits_per_token") is not None:
                lines += ["", f"Held-out bits/token on {a['heldout_images']} val images at their TSC lengths: ids "
                          f"{a['ids_bits_per_token']:.4f}, length model {a['length_bits_per_token']:.4f} "
                          f"({a['length_bits_per_image']:.3f} bits/image; TSC histogram "
                          f"{a['histogram_length_bits_per_token']:.4f})."]
    lines += ["", "## Figures", "", "![FID against tokens](fid_vs_tokens.png)", "",
              "Reconstructions (columns: original, each budget, TSC):", "", "![reconstructions](reconstructions.png)",
              "", "Token specialization (each first-iteration latent token's attention over the 2D grid, last "
              "encoder layer; rows = tokens, columns = images):", "", "![specialization](specialization.png)",
              "", "Complexity (adaptive budget and L1 against image complexity; complexity/complexity.json):", "",
              "![complexity](complexity/complexity.png)"]
    for name in report["files"]:
        if name.startswith("samples_"):
            lines += ["", f"Samples, {name[len('samples_'):-4]}:", "", f"![{name}]({name})"]
    if a is not None:
        lines += ["", "![adaptive histogram](adaptive_histogram.png)"]
    lines += ["", "## Provenance", "",
              f"- tokenizer: `{report['tokenizer']['path']}` sha256 `{report['tokenizer']['id']}`"]
    if prior:
        lines.append(f"- prior ({prior['kind']}): `{prior['path']}` sha256 `{prior['id']}`")
    lines += [f"- FID protocol: `{report['protocol']['id']}`",
              f"- reference statistics: `{d['reference']}`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
              f"- git commit: `{report['git_commit']}`; created {report['created']}", ""]
    return "\n".join(lines)


# ============================================================================ schema validation
_NUM = (int, float)
_STR, _INT = (str,), (int,)
_TOP = {"format": _STR, "format_version": _INT, "created": _STR, "git_commit": _STR, "versions": (dict,),
        "tokenizer": (dict,), "prior": (dict, type(None)), "protocol": (dict,), "data": (dict,),
        "settings": (dict,), "budgets": (list,), "adaptive": (dict, type(None)), "files": (list,)}
_IDENT = {"id": _STR, "path": _STR, "tag": _STR}
_PRIOR = {**_IDENT, "kind": _STR, "tokenizer_id": _STR}
_PROTOCOL = {"name": _STR, "id": _STR, "eval": (dict,), "summary": _STR, "recon_reference": _STR,
             "gen_reference": _STR, "notes": (list,)}
_OPT_NUM = (*_NUM, type(None))
_METRICS = {"n": _INT, "n_reference": (int, type(None)), "fid": _NUM, "sfid": _OPT_NUM, "kid_mean": _OPT_NUM,
            "kid_std": _OPT_NUM, "precision": _OPT_NUM, "recall": _OPT_NUM, "f_score": _OPT_NUM,
            "isc_mean": _OPT_NUM, "isc_std": _OPT_NUM, "notes": (list,)}
_DATA = {"config": (dict,), "split": _STR, "split_size": _INT, "n_images": _INT, "reference": _STR}
_SETTINGS = {"budgets": (list,), "num_images": (int, type(None)), "seed": _INT, "cfg_scale": _NUM,
             "temperature": _NUM, "steps": _INT, "chunk_size": _INT, "adaptive_threshold": (*_NUM, type(None)),
             "shards": _INT, "seeds": _INT, "num_samples": _INT, "classes": _STR}
_COMMON = {"protocol_id": _STR, "seed": _INT, "tokenizer_id": _STR, "prior_id": (str, type(None)),
           "gfid": (*_NUM, type(None)), "n_samples": (int, type(None)), "rfid": _NUM, "l1": _NUM, "lpips": _NUM,
           "n_images": _INT, "recon_metrics": (dict,)}
_BUDGET = {"budget": _INT, **_COMMON}
_ADAPTIVE = {"threshold": _NUM, "mean_tokens": _NUM, "histogram": (dict,), "gfid_note": (str, type(None)),
             **_COMMON}


def _check_fields(obj: Any, spec: dict[str, tuple[type, ...]], where: str, errors: list[str]) -> bool:
    if not isinstance(obj, dict):
        errors.append(f"{where}: expected an object, got {type(obj).__name__}")
        return False
    for key, types in spec.items():
        if key not in obj:
            errors.append(f"{where}.{key}: missing")
        elif isinstance(obj[key], bool) or not isinstance(obj[key], types):
            errors.append(f"{where}.{key}: expected {'/'.join(t.__name__ for t in types)}, "
                          f"got {type(obj[key]).__name__}")
        elif isinstance(obj[key], float) and not math.isfinite(obj[key]):
            errors.append(f"{where}.{key}: not finite ({obj[key]})")
    return True


def validate_report(report: dict[str, Any]) -> None:
    """Raise :class:`ReportError` listing every way ``report`` departs from the documented schema."""
    errors: list[str] = []
    if not _check_fields(report, _TOP, "report", errors) or errors:
        raise ReportError("report.json does not follow the schema:\n  " + "\n  ".join(errors))
    if report["format"] != REPORT_FORMAT or report["format_version"] != REPORT_VERSION:
        errors.append(f"report: format must be {REPORT_FORMAT!r} version {REPORT_VERSION}")
    _check_fields(report["tokenizer"], _IDENT, "tokenizer", errors)
    if report["prior"] is not None:
        _check_fields(report["prior"], _PRIOR, "prior", errors)
    _check_fields(report["protocol"], _PROTOCOL, "protocol", errors)
    _check_fields(report["data"], _DATA, "data", errors)
    _check_fields(report["settings"], _SETTINGS, "settings", errors)
    for k, v in report["versions"].items():
        if not isinstance(v, str):
            errors.append(f"versions.{k}: expected str")
    if not all(isinstance(f, str) for f in report["files"]):
        errors.append("files: expected a list of file names")
    if errors:
        raise ReportError("report.json does not follow the schema:\n  " + "\n  ".join(errors))

    has_prior = report["prior"] is not None
    protocol_id, tok_id = report["protocol"]["id"], report["tokenizer"]["id"]
    if len(tok_id) != 64:
        errors.append("tokenizer.id: expected a 64-digit sha256")

    def check_entry(entry: dict[str, Any], where: str, spec: dict[str, tuple[type, ...]]) -> None:
        if not _check_fields(entry, spec, where, errors) or any(e.startswith(where) for e in errors):
            return
        if entry["protocol_id"] != protocol_id or entry["tokenizer_id"] != tok_id:
            errors.append(f"{where}: protocol_id/tokenizer_id differ from the report's")
        if entry["n_images"] < 2 or not 0 <= entry["l1"] <= 1 or entry["lpips"] < 0:
            errors.append(f"{where}: need n_images >= 2, 0 <= l1 <= 1, lpips >= 0")
        if entry["gfid"] is not None and not has_prior:
            errors.append(f"{where}.gfid: a gFID without a prior")
        if (entry["gfid"] is None) != (entry["n_samples"] is None):
            errors.append(f"{where}: gfid and n_samples must both be set or both null")
        _check_fields(entry["recon_metrics"], _METRICS, f"{where}.recon_metrics", errors)
        if entry["gfid"] is not None:
            gm = entry.get("gen_metrics")
            if _check_fields(gm, _METRICS, f"{where}.gen_metrics", errors) and gm.get("fid") != entry["gfid"]:
                errors.append(f"{where}: gfid differs from gen_metrics.fid")
            if isinstance(gm, dict) and len(gm.get("seeds", [])) != report["settings"]["seeds"]:
                errors.append(f"{where}.gen_metrics.seeds: expected {report['settings']['seeds']} seeds")
        for key in ("recon_metrics", "gen_metrics"):
            for name in ("precision", "recall"):
                v = (entry.get(key) or {}).get(name)
                if isinstance(v, float) and not 0 <= v <= 1:
                    errors.append(f"{where}.{key}.{name}: {v} outside [0, 1]")

    budgets = []
    for i, entry in enumerate(report["budgets"]):
        check_entry(entry, f"budgets[{i}]", _BUDGET)
        if isinstance(entry, dict) and isinstance(entry.get("budget"), int):
            budgets.append(entry["budget"])
            if has_prior and entry.get("gfid") is None:
                errors.append(f"budgets[{i}].gfid: missing although a prior was evaluated")
    if not budgets or budgets != sorted(set(budgets)):
        errors.append("budgets: expected at least one entry, budgets strictly increasing")
    a = report["adaptive"]
    if a is not None:
        check_entry(a, "adaptive", _ADAPTIVE)
        hist = a.get("histogram", {}) if isinstance(a, dict) else {}
        if not all(k.isdigit() and isinstance(v, int) and v >= 0 for k, v in hist.items()):
            errors.append("adaptive.histogram: expected {\"<budget>\": count >= 0}")
        elif isinstance(a.get("n_images"), int):
            if sum(hist.values()) != a["n_images"]:
                errors.append(f"adaptive.histogram: counts sum to {sum(hist.values())}, not n_images={a['n_images']}")
            chosen = [int(k) for k, v in hist.items() if v]
            mean = a.get("mean_tokens")
            if chosen and isinstance(mean, _NUM) and not min(chosen) <= mean <= max(chosen):
                errors.append(f"adaptive.mean_tokens={mean} lies outside the chosen budgets {chosen}")
    if a is not None and isinstance(a, dict) and a.get("generated_histogram") is not None:
        gh = a["generated_histogram"]
        if a.get("length_model") not in LENGTH_MODELS:
            errors.append("adaptive.length_model: expected 'learned' or 'histogram' with generated lengths")
        if sum(gh.values()) != a.get("n_samples"):
            errors.append(f"adaptive.generated_histogram: counts sum to {sum(gh.values())}, not n_samples")
        if not 0 <= a.get("length_tv", -1) <= 1:
            errors.append("adaptive.length_tv: expected a total variation in [0, 1]")
    if "report.json" not in report["files"]:
        errors.append("files: must list report.json")
    if errors:
        raise ReportError("report.json does not follow the schema:\n  " + "\n  ".join(errors))

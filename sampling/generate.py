"""Images from a prior + tokenizer, and reconstructions of a dataset split, written to folders; shardable.

Layout (DiT ``sample_ddp`` style: a folder names checkpoint, budget, guidance and seed; files are named
by *global* image index, so shards of one request fill one folder)::

    <out>/<prior name>-<hash8>/budget032-cfg1.5-seed0/     alit sample
        000000.png 000001.png ...                           one PNG per image, by global index
        samples.npz                                         images (N,H,W,3) uint8, labels (N,), budgets (N,),
                                                            indices (N,) = arange(N)
        samples.json                                        settings (``sampler``: every sampler setting
                                                            used) and checkpoint identities
    <out>/<prior name>-<hash8>/budget032-cfg1.5-seed0-s1a2b3c/   other sampler settings than the defaults
    <out>/<prior name>-<hash8>/adaptive-cfg1.5-seed0/       budgets drawn per image (see below)
    <out>/<tokenizer name>-<hash8>/recon-budget032/         alit reconstruct: the same files, with
    <out>/<tokenizer name>-<hash8>/recon-adaptive-t0.07/    reconstructions.npz (+ l1 (N,), positions (N,))

``<hash8>`` is the first 8 hex digits of the checkpoint's identity (sha256 over its config and weight
files, :func:`tokenizer.core.checkpoint.tokenizer_identity`); ``<name>`` is the checkpoint folder's name, prefixed
by its run folder when it is a generic name such as ``final``.

**Determinism and sharding.** Images are made in fixed-size *chunks* of ``chunk_size`` global indices
(chunk ``c`` = indices ``[c * chunk_size, (c + 1) * chunk_size)``), each chunk one model batch with its
own CPU ``torch.Generator`` seeded from ``(seed, c)`` (:func:`chunk_generator`). Shard ``i`` of ``n``
owns chunks ``i, i + n, i + 2n, ...`` (:class:`Shard`) and writes ``samples-shard<iiii>-of-<nnnn>.npz``;
when every shard file is present, they are merged into ``samples.npz``, which is then exactly the
file an unsharded run writes. The result depends on ``(seed, chunk_size, num_images)`` and the
settings, never on the sharding. Class ``c`` of image ``i`` in round-robin mode is ``i % C``.

**Adaptive budgets.** ``budget="adaptive"`` lets each image's budget be chosen per sample. With
``length_model="learned"`` (the default) the prior's own length model ``p(budget | class)`` chooses it
(a prior trained with ``data_mode=adaptive|mixture``; ``budget_temperature`` and ``max_budget`` bias the
choice), folder ``adaptive-learned-...``. ``length_model="histogram"`` is the explicit baseline: budgets
drawn from a per-class distribution ``(C + 1, n)`` (:func:`generator.tokens.sample_budgets`), by default the
training split's token-count selection (TSC) lengths in the prior's token cache
(:func:`budget_probs_from_cache`), folder ``adaptive-...`` as before.

Usage::

    models = load_models("runs/tok/final", "runs/prior/final")       # refuses a mismatched pair
    folder = sample_to_folder(models, SampleSettings(budget=32, num_images=64, cfg_scale=1.5), "samples")
    folder = reconstruct_to_folder(models.tokenizer, models.tokenizer_tag, DataConfig(), "val", 32, "recon")
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.cache import (
    adaptive_lengths,
    check_identity,
    read_identity,
)
from generator.tasks import load_prior
from generator.tokens import NO_LABEL, TokenSpace, estimate_budget_probs, sample_budgets
from generator.transformer import Prior
from tokenizer.alit import ALITTokenizer
from tokenizer.core.checkpoint import tokenizer_identity
from tokenizer.core.config import to_dict
from tokenizer.core.data import DataConfig, ImageDataset, build_dataset, split_order
from tokenizer.core.errors import UsageError
from tokenizer.core.images import from_uint8, to_uint8
from tokenizer.core.io import atomic_path, atomic_write_text

from . import presets
from .ar_sampler import ARSampler
from .maskgit_sampler import MaskGITSampler
from .schedules import get_schedule

ADAPTIVE = "adaptive"  # the budget of per-image budgets (drawn for samples, chosen by TSC for reconstructions)
LENGTH_MODELS = ("learned", "histogram")  # who chooses adaptive budgets: the prior's length model, or the TSC histogram
DEFAULT_CHUNK_SIZE = 32
SAMPLES = "samples"  # file stem of generated image sets
RECONSTRUCTIONS = "reconstructions"  # file stem of reconstructed image sets
_GENERIC_NAMES = re.compile(r"^(final|ema|last|latest|best|model|step[-_]?\d+|checkpoint[-_]?\d*)$")

Budget = int | str  # a token budget, or ADAPTIVE


# ============================================================================ shards and randomness
@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: owns chunks ``index, index + count, ...`` (``0/1`` = everything)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count} is invalid: use i/n with 0 <= i < n (e.g. 0/4)")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` -> ``Shard(i, n)``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise UsageError(f"--shard {text!r} is not of the form i/n (e.g. 0/4 for the first of four shards)")
        return cls(int(match[1]), int(match[2]))

    def chunks(self, num_chunks: int) -> range:
        """The chunks this shard owns."""
        return range(self.index, num_chunks, self.count)

    def indices(self, num_images: int, chunk_size: int) -> np.ndarray:
        """The global image indices this shard owns, increasing (int64)."""
        parts = [np.arange(c * chunk_size, min((c + 1) * chunk_size, num_images))
                 for c in self.chunks(num_chunks(num_images, chunk_size))]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    @property
    def suffix(self) -> str:
        """File-name suffix of this shard's files (empty for an unsharded run)."""
        return "" if self.count == 1 else f"-shard{self.index:04d}-of-{self.count:04d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()  # the unsharded run


def num_chunks(num_images: int, chunk_size: int) -> int:
    """Chunks of ``chunk_size`` covering ``num_images``."""
    return math.ceil(num_images / chunk_size)


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed of chunk ``chunk`` of a request with ``seed`` (sha256: no overlap between seeds)."""
    digest = hashlib.sha256(f"alit-sample/{int(seed)}/{int(chunk)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """The CPU generator of one chunk (the samplers draw on the generator's device: any model device works)."""
    return torch.Generator().manual_seed(chunk_seed(seed, chunk))


# ============================================================================ checkpoints
def checkpoint_tag(path: str | Path, identity: dict[str, str]) -> str:
    """``<name>-<hash8>`` of a checkpoint directory (``run_final`` for ``.../run/final``)."""
    path = Path(path).resolve()
    name = path.name
    if _GENERIC_NAMES.match(name) and path.parent.name:
        name = f"{path.parent.name}_{name}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "checkpoint"
    return f"{name}-{identity['id'][:8]}"


@dataclass
class Models:
    """A tokenizer (and optionally a prior) loaded for inference, with their identities.

    The models are fresh copies loaded from disk, in eval mode, without gradients: nothing here changes
    a training run's state.
    """

    tokenizer: ALITTokenizer
    tokenizer_dir: Path
    tokenizer_identity: dict[str, str]  # {"id": sha256 over config and weight files, "path"}
    prior: Prior | None = None
    prior_dir: Path | None = None
    prior_identity: dict[str, str] | None = None  # sha256 of the prior directory (incl. its tokenizer record)

    @property
    def device(self) -> torch.device:
        return next(self.tokenizer.parameters()).device

    @property
    def tokenizer_tag(self) -> str:
        return checkpoint_tag(self.tokenizer_dir, self.tokenizer_identity)

    @property
    def prior_tag(self) -> str:
        if self.prior_dir is None or self.prior_identity is None:
            raise ValueError("no prior loaded: pass a prior directory (--prior) to sample")
        return checkpoint_tag(self.prior_dir, self.prior_identity)

    def require_prior(self) -> Prior:
        if self.prior is None:
            raise ValueError("no prior loaded: pass a prior directory (--prior) to sample")
        return self.prior


def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_models(tokenizer_dir: str | Path, prior_dir: str | Path | None = None,
                device: str | torch.device = "cpu") -> Models:
    """Load a tokenizer (and prior) for inference; a prior made for another tokenizer is refused.

    Raises :class:`generator.cache.TokenizerMismatch` when the prior's recorded tokenizer identity is not
    the tokenizer's (or the prior records none).
    """
    tokenizer_dir = Path(tokenizer_dir)
    tok_id = tokenizer_identity(tokenizer_dir)
    prior = prior_id = None
    if prior_dir is not None:
        prior_dir = Path(prior_dir)
        check_identity(read_identity(prior_dir), tok_id, f"prior {prior_dir}")
        prior_id = tokenizer_identity(prior_dir)  # the same file hash, over the prior's directory
    tokenizer = ALITTokenizer.from_pretrained(tokenizer_dir, map_location=device).eval().requires_grad_(False)
    if prior_dir is not None:
        prior = load_prior(prior_dir, device).eval().requires_grad_(False)
        space = prior.space
        if space.codebook_size != tokenizer.codebook_size or tuple(space.budgets) != tuple(tokenizer.budgets):
            raise ValueError(f"prior {prior_dir} (K={space.codebook_size}, budgets {space.budgets}) does not fit "
                             f"tokenizer {tokenizer_dir} (K={tokenizer.codebook_size}, budgets "
                             f"{list(tokenizer.budgets)}); retrain the prior on this tokenizer's token cache")
    return Models(tokenizer, tokenizer_dir, tok_id, prior, prior_dir, prior_id)


# ============================================================================ settings
def parse_budgets(spec: str | Iterable[int | str], valid: Iterable[int],
                  allow_adaptive: bool = True) -> list[Budget]:
    """The one reading of a budget request, checked against the model's budgets ``valid``.

    ``spec`` is text such as ``"8,16"``, ``"all"``, ``"max"``, ``"adaptive"`` or a mix, or a sequence of such
    items (``[8, 16]``). Returns ints in ``valid`` and ADAPTIVE, in the order given, without repeats; an
    item that is not one of them is a :class:`~tokenizer.core.errors.UsageError` listing the choices.
    """
    valid = [int(b) for b in valid]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Budget] = []
    for item in (str(s).strip().lower() for s in items):
        if not item:
            continue
        if item == "all":
            out += valid
        elif item == "max":
            out.append(max(valid))
        elif item == ADAPTIVE and allow_adaptive:
            out.append(ADAPTIVE)
        elif item.isdigit() and int(item) in valid:
            out.append(int(item))
        else:
            extra = ", 'adaptive'" if allow_adaptive else ""
            raise UsageError(f"budget {item!r} is not valid: use one of {valid}, 'all', 'max'{extra} "
                             "(comma-separated)")
    if not out:
        raise UsageError(f"no budgets given: use 'all', 'max' or some of {valid}")
    return list(dict.fromkeys(out))


def budget_label(budget: Budget) -> str:
    """``budget032`` or ``adaptive`` (for folder and file names)."""
    return ADAPTIVE if budget == ADAPTIVE else f"budget{int(budget):03d}"


@dataclass(frozen=True)
class SampleSettings:
    """One sampling request: everything that decides the images (with the seed and the chunk size)."""

    budget: Budget  # token budget, or "adaptive" (per-image budgets drawn from a budget distribution)
    num_images: int = 64  # N: images, global indices 0..N-1
    cfg_scale: float = 0.0  # guidance cond + s (cond - uncond); 0 = none (see sampling.schedules)
    temperature: float = 1.0  # sampling temperature
    steps: int = 8  # MaskGIT decoding steps (AR: one step per token)
    seed: int = 0  # seed of the whole request; chunk c uses chunk_seed(seed, c)
    classes: str | int = "all"  # "all" (round-robin i % C), "none" (null class), or one class id
    chunk_size: int = DEFAULT_CHUNK_SIZE  # images per chunk (= per model batch); part of the result's identity
    top_k: int = 0  # AR only: keep the k most likely ids (0 = all)
    top_p: float = 1.0  # AR only: nucleus mass (1 = all)
    length_model: str = "learned"  # adaptive: "learned" (the prior's p(budget | class)) or "histogram" (TSC)
    budget_temperature: float = 1.0  # adaptive, learned: temperature of p(budget | class) (0 = most likely)
    max_budget: int | None = None  # adaptive, learned: no budget above this one
    # the value schedules and MaskGIT's choice noise and masking (sampling.presets: names, ranges, defaults)
    cfg_schedule: str = presets.DEFAULTS["cfg_schedule"]  # constant | linear (0 up) | linear-down
    temperature_schedule: str = presets.DEFAULTS["temperature_schedule"]  # MaskGIT only
    choice_temperature: float = presets.DEFAULTS["choice_temperature"]  # MaskGIT only: confidence Gumbel noise
    choice_schedule: str = presets.DEFAULTS["choice_schedule"]  # MaskGIT only (default: down to 0)
    mask_schedule: str = presets.DEFAULTS["mask_schedule"]  # MaskGIT only: cosine | arccos | linear

    def __post_init__(self) -> None:
        if self.length_model not in LENGTH_MODELS:
            raise ValueError(f"length_model must be one of {list(LENGTH_MODELS)}, got {self.length_model!r}")
        if self.budget_temperature < 0:
            raise ValueError(f"budget temperature must be >= 0, got {self.budget_temperature}")
        if (self.budget_temperature != 1.0 or self.max_budget is not None) and not (
                self.budget == ADAPTIVE and self.length_model == "learned"):
            raise ValueError("--budget-temperature and --max-budget bias the learned length model: use them with "
                             "--budgets adaptive and --length-model learned")
        if self.budget != ADAPTIVE and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise ValueError(f"budget must be a positive token count or 'adaptive', got {self.budget!r}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.classes, str) and self.classes not in ("all", "none"):
            raise ValueError(f"classes must be 'all', 'none' or a class id, got {self.classes!r}")
        if isinstance(self.classes, int) and self.classes < 0:
            raise ValueError(f"a class id is >= 0, got {self.classes} (use 'none' for the null class)")
        presets.check_settings(self.sampler_settings())  # the schedules' names, top_k, top_p, choice noise

    @property
    def learned(self) -> bool:
        """Adaptive budgets chosen by the prior's length model."""
        return self.budget == ADAPTIVE and self.length_model == "learned"

    def sampler_settings(self, kind: str | None = None) -> dict[str, Any]:
        """The sampler settings of this request (:data:`sampling.presets.KNOBS`); only those prior kind
        ``kind`` uses when given."""
        names = presets.names_for(kind) if kind is not None else tuple(presets.DEFAULTS)
        return {n: getattr(self, n) for n in names}

    def folder_name(self) -> str:
        """``budget032-cfg1.5-seed0`` / ``adaptive-cfg1.5-seed0`` (histogram) / ``adaptive-learned-cfg1.5-seed0``
        (``-bt0.8``, ``-max64`` when the learned choice is biased); ``-s<hash6>`` of the other sampler
        settings when any differs from its default, so two settings never share a folder."""
        label = budget_label(self.budget)
        if self.learned:
            label += "-learned" + (f"-bt{self.budget_temperature:g}" if self.budget_temperature != 1.0 else "") \
                + (f"-max{self.max_budget}" if self.max_budget is not None else "")
        others = presets.non_default({k: v for k, v in self.sampler_settings().items() if k != "cfg_scale"})
        digest = hashlib.sha256(json.dumps(others, sort_keys=True).encode()).hexdigest()[:6] if others else ""
        return f"{label}-cfg{self.cfg_scale:g}-seed{self.seed}" + (f"-s{digest}" if digest else "")

    def to_dict(self) -> dict[str, Any]:
        """The request (the length-model fields only for adaptive budgets, and the schedule fields only when
        not at their defaults, so earlier requests and their folders and caches are those of before)."""
        out = asdict(self)
        if self.budget != ADAPTIVE:
            for k in ("length_model", "budget_temperature", "max_budget"):
                out.pop(k)
        for k in _LATER_FIELDS:
            if out[k] == presets.DEFAULTS[k]:
                out.pop(k)
        return out


_LATER_FIELDS = ("cfg_schedule", "temperature_schedule", "choice_temperature", "choice_schedule", "mask_schedule")


def parse_classes(text: str) -> str | int:
    """``--class`` value: ``all``, ``none`` or a class id."""
    text = text.strip().lower()
    if text in ("all", "none"):
        return text
    if text.isdigit():
        return int(text)
    raise UsageError(f"--class {text!r}: use 'all' (round-robin), 'none' (null class) or a class id")


def classes_for(indices: np.ndarray, mode: str | int, space: TokenSpace) -> torch.Tensor:
    """Class ids (B,) of global ``indices``; NO_LABEL (-1) = the null class."""
    n = len(indices)
    if space.num_classes == 0 or mode == "none":
        if isinstance(mode, int):
            raise ValueError(f"class {mode} requested but the prior is unconditional (num_classes=0); use 'none'")
        return torch.full((n,), NO_LABEL, dtype=torch.long)
    if mode == "all":
        return torch.from_numpy(indices % space.num_classes).long()
    if not 0 <= int(mode) < space.num_classes:
        raise ValueError(f"class {mode} is outside [0, {space.num_classes}): the prior has {space.num_classes} classes")
    return torch.full((n,), int(mode), dtype=torch.long)


def make_sampler(prior: Prior, settings: SampleSettings) -> MaskGITSampler | ARSampler:
    """The sampler of the prior's kind with the request's settings (a setting that kind does not use,
    away from its default, is refused)."""
    if prior.space.num_classes == 0 and settings.cfg_scale != 0:
        raise ValueError(f"cfg_scale={settings.cfg_scale} needs a class-conditional prior; this one is "
                         "unconditional: use --cfg 0")
    if prior.kind not in (presets.MASKGIT, presets.AR):
        raise ValueError(f"no sampler for prior kind '{prior.kind}' (known: maskgit, ar)")
    problem = presets.kind_problem(presets.non_default(settings.sampler_settings()), prior.kind, "the settings")
    if problem:
        raise ValueError(problem)
    s = settings
    length = {"budget_temperature": s.budget_temperature, "max_budget": s.max_budget}
    cfg = presets.value_schedule(s.cfg_schedule, s.cfg_scale)
    if prior.kind == presets.MASKGIT:
        return MaskGITSampler(steps=s.steps, schedule=get_schedule(s.mask_schedule),
                              temperature=presets.value_schedule(s.temperature_schedule, s.temperature),
                              choice_temperature=presets.value_schedule(s.choice_schedule, s.choice_temperature),
                              cfg_scale=cfg, **length)
    return ARSampler(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, cfg_scale=cfg, **length)


# ============================================================================ chunks of images
@dataclass
class ImageChunk:
    """One chunk of an image set: generated samples or reconstructions of dataset images."""

    indices: np.ndarray  # (b,) int64 global indices
    images: np.ndarray  # (b, H, W, 3) uint8
    labels: np.ndarray  # (b,) int64: class used (samples; -1 = null) or dataset label (reconstructions)
    budgets: np.ndarray  # (b,) int64 tokens of each image
    pixels: torch.Tensor | None = None  # (b, 3, H, W) float in [-1, 1] on the model device (before uint8)
    targets: torch.Tensor | None = None  # (b, 3, H, W) originals in [-1, 1] (reconstructions only)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # per-image extras (l1, positions) for the npz


@torch.no_grad()
def sample_chunk(models: Models, settings: SampleSettings, chunk: int,
                 budget_probs: torch.Tensor | None = None) -> ImageChunk:
    """Chunk ``chunk`` of a sampling request (a pure function of the models, settings and chunk index)."""
    prior = models.require_prior()
    space = prior.space
    start = chunk * settings.chunk_size
    indices = np.arange(start, min(start + settings.chunk_size, settings.num_images), dtype=np.int64)
    if not len(indices):
        raise ValueError(f"chunk {chunk} is beyond the request's {settings.num_images} images")
    generator = chunk_generator(settings.seed, chunk)
    classes = classes_for(indices, settings.classes, space)  # (b,)
    budgets: torch.Tensor | None
    if settings.learned:
        budgets = None  # the sampler draws them from the prior's length model
        prior.require_length_model()
    elif settings.budget == ADAPTIVE:
        if budget_probs is None:
            raise ValueError("budget='adaptive' needs budget_probs (C + 1, n): see budget_probs_from_cache")
        budgets = sample_budgets(budget_probs, space, classes, generator=generator)  # (b,)
    else:
        space.budget_index(torch.tensor([int(settings.budget)]))
        budgets = torch.full((len(indices),), int(settings.budget), dtype=torch.long)
    out = make_sampler(prior, settings).sample(prior, budgets, classes, generator=generator)
    pixels = models.tokenizer.decode(out.ids, out.lengths.to(out.ids.device))  # (b, 3, H, W)
    return ImageChunk(indices, to_uint8(pixels), classes.numpy(), out.lengths.cpu().numpy(), pixels)


def iter_sample_chunks(models: Models, settings: SampleSettings, shard: Shard = WHOLE,
                       budget_probs: torch.Tensor | None = None, progress: bool = False,
                       desc: str | None = None) -> Iterator[ImageChunk]:
    """The chunks of ``shard``, in increasing order, with a progress bar (images) on stderr."""
    from tqdm.auto import tqdm

    chunks = shard.chunks(num_chunks(settings.num_images, settings.chunk_size))
    total = len(shard.indices(settings.num_images, settings.chunk_size))
    with tqdm(total=total, unit="img", desc=desc or f"sample {budget_label(settings.budget)} [{shard}]",
              disable=not progress, file=sys.stderr, leave=False) as bar:
        for c in chunks:
            item = sample_chunk(models, settings, c, budget_probs)
            bar.update(len(item.indices))
            yield item


def eval_positions(dataset: ImageDataset, num_images: int | None, split_seed: int) -> np.ndarray:
    """Split positions of the evaluated images: all, or a seeded class-stratified subset of ``num_images``.

    The same rule as :func:`sampling.fid.reference_stats` with ``max_images``, so reconstructions are of
    exactly the images of the reference statistics.
    """
    n = len(dataset)
    if num_images is None or num_images >= n:
        return np.arange(n, dtype=np.int64)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return np.sort(split_order(dataset.labels.numpy(), split_seed)[:num_images]).astype(np.int64)


@torch.no_grad()
def reconstruct_chunk(tokenizer: ALITTokenizer, dataset: ImageDataset, positions: np.ndarray, chunk: int,
                      chunk_size: int, budget: Budget, threshold: float | None = None) -> ImageChunk:
    """Reconstructions of chunk ``chunk`` of ``positions`` (the split's un-augmented pixels) at ``budget``.

    ``budget="adaptive"`` picks each image's budget by token-count selection at ``threshold``
    (:meth:`ALITTokenizer.encode_adaptive`). ``extra`` holds per-image ``l1`` (mean absolute error in
    [0, 1] pixel units, of the clamped float reconstruction) and the split ``positions``.
    """
    device = next(tokenizer.parameters()).device
    start = chunk * chunk_size
    indices = np.arange(start, min(start + chunk_size, len(positions)), dtype=np.int64)
    pos = positions[indices]
    originals = np.concatenate([dataset.uint8_images(int(p), int(p) + 1) for p in pos])  # (b, R, R, 3)
    x = from_uint8(originals).to(device)  # (b, 3, R, R)
    if budget == ADAPTIVE:
        if threshold is None:
            raise ValueError("adaptive reconstruction needs a threshold (e.g. 0.07)")
        ids, lengths = tokenizer.encode_adaptive(x, threshold)  # (b, max), (b,)
        recon = tokenizer.decode(ids, lengths)
    else:
        lengths = torch.full((len(pos),), int(budget), dtype=torch.long)
        recon = tokenizer.decode(tokenizer.encode(x, int(budget)))  # (b, 3, R, R)
    l1 = (recon.float() - x.float()).abs().flatten(1).mean(1) / 2  # (b,) [0, 1] units
    labels = dataset.labels[torch.from_numpy(pos)].numpy()
    return ImageChunk(indices, to_uint8(recon), labels, lengths.cpu().numpy(), recon, x,
                      {"l1": l1.cpu().numpy().astype(np.float32), "positions": pos})


def iter_recon_chunks(tokenizer: ALITTokenizer, dataset: ImageDataset, positions: np.ndarray, budget: Budget,
                      threshold: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      shard: Shard = WHOLE, progress: bool = False, desc: str | None = None
                      ) -> Iterator[ImageChunk]:
    """The reconstruction chunks of ``shard``, in increasing order, with a progress bar on stderr."""
    from tqdm.auto import tqdm

    total = len(shard.indices(len(positions), chunk_size))
    with tqdm(total=total, unit="img", desc=desc or f"reconstruct {budget_label(budget)} [{shard}]",
              disable=not progress, file=sys.stderr, leave=False) as bar:
        for c in shard.chunks(num_chunks(len(positions), chunk_size)):
            item = reconstruct_chunk(tokenizer, dataset, positions, c, chunk_size, budget, threshold)
            bar.update(len(item.indices))
            yield item


# ============================================================================ image-set folders
def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed npz atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # to a file object: np.savez would add ".npz" to a temporary's name


def load_image_set(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an image-set npz (``images``, ``labels``, ``budgets``, ``indices``, ...)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _write_meta(folder: Path, stem: str, meta: dict[str, Any]) -> None:
    """Record the request beside the images (checkpoint ids, not paths: a moved checkpoint is the same one);
    a folder made by another request is an error."""
    path = folder / f"{stem}.json"
    text = json.dumps(meta, indent=1, sort_keys=True)
    if path.is_file():
        old = json.loads(path.read_text())
        if old != json.loads(text):
            keys = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise FileExistsError(f"{folder} holds images of another request (differs in {keys}); choose "
                                  "another --out or delete the folder")
        return
    atomic_write_text(path, text)


def shard_file(folder: Path, stem: str, shard: Shard) -> Path:
    """Where ``shard`` writes its arrays (``<stem>.npz`` for an unsharded run)."""
    return folder / f"{stem}{shard.suffix}.npz"


def write_image_set(folder: str | Path, stem: str, chunks: Iterable[ImageChunk], meta: dict[str, Any],
                    shard: Shard = WHOLE, num_images: int | None = None, png: bool = True) -> Path:
    """Write the chunks of ``shard`` into ``folder``: PNGs by global index and one npz (then merge shards).

    Returns the merged ``<stem>.npz`` when complete, else this shard's npz.
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_meta(folder, stem, meta)
    parts: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:
        if png:
            for i, image in zip(chunk.indices, chunk.images):
                Image.fromarray(image).save(folder / f"{int(i):06d}.png")
        arrays = {"images": chunk.images, "labels": chunk.labels.astype(np.int64),
                  "budgets": chunk.budgets.astype(np.int64), "indices": chunk.indices, **chunk.extra}
        for k, v in arrays.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise ValueError(f"shard {shard} owns no images (fewer chunks than shards): use fewer shards")
    path = shard_file(folder, stem, shard)
    save_npz(path, {k: np.concatenate(v) for k, v in parts.items()})
    if shard.count > 1:
        merged = merge_image_shards(folder, stem, shard.count, num_images)
        return merged if merged is not None else path
    return path


def merge_image_shards(folder: str | Path, stem: str, count: int, num_images: int | None = None) -> Path | None:
    """Merge ``<stem>-shard*-of-<count>.npz`` into ``<stem>.npz`` (sorted by global index) when all exist.

    Returns the merged path, or None while shards are missing. The merged file equals an unsharded run's.
    """
    folder = Path(folder)
    files = [shard_file(folder, stem, Shard(i, count)) for i in range(count)]
    if not all(f.is_file() for f in files):
        return None
    parts = [load_image_set(f) for f in files]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(arrays["indices"], kind="stable")
    arrays = {k: v[order] for k, v in arrays.items()}
    n = len(arrays["indices"]) if num_images is None else num_images
    if not np.array_equal(arrays["indices"], np.arange(n)):
        raise ValueError(f"the {count} shards in {folder} do not cover indices 0..{n - 1} exactly once: were they "
                         "made with the same --num-images and --batch-size?")
    out = folder / f"{stem}.npz"
    save_npz(out, arrays)
    return out


# ============================================================================ adaptive budget distributions
def budget_probs_from_cache(cache_dir: str | Path, space: TokenSpace, split: str = "train",
                            identity: dict[str, str] | None = None) -> torch.Tensor:
    """Per-class budget probabilities ``(C + 1, n)`` from a token cache's adaptive (TSC) lengths
    (:func:`generator.cache.adaptive_lengths`; ``identity``, the tokenizer's, is checked against the cache's)."""
    lengths, labels = adaptive_lengths(cache_dir, split, identity)
    return estimate_budget_probs(lengths, space, labels if space.num_classes else None)


# ============================================================================ folders end to end
def sample_to_folder(models: Models, settings: SampleSettings, out_root: str | Path, shard: Shard = WHOLE,
                     budget_probs: torch.Tensor | None = None, png: bool = True, progress: bool = True) -> Path:
    """Sample ``shard`` of a request into ``<out_root>/<prior tag>/<settings folder>/``; returns the folder.

    A folder whose npz for this shard (or the merged npz) already exists for the same request is kept.
    """
    folder = Path(out_root) / models.prior_tag / settings.folder_name()
    kind = models.prior.kind if models.prior is not None else None
    meta = {"kind": "samples", "settings": settings.to_dict(), "prior_id": (models.prior_identity or {}).get("id"),
            "sampler": {"kind": kind, **settings.sampler_settings(kind)},  # every setting the sampler ran with
            "tokenizer_id": models.tokenizer_identity["id"],
            "budget_probs": budget_probs.tolist() if budget_probs is not None else None}
    if (folder / f"{SAMPLES}.npz").is_file() or shard_file(folder, SAMPLES, shard).is_file():
        _write_meta(folder, SAMPLES, meta)  # raises if the folder holds another request
        print(f"[sample] {folder} already holds shard {shard} of this request: kept", file=sys.stderr)
        return folder
    chunks = iter_sample_chunks(models, settings, shard, budget_probs, progress)
    write_image_set(folder, SAMPLES, chunks, meta, shard, settings.num_images, png)
    return folder


def recon_folder_name(budget: Budget, threshold: float | None) -> str:
    """``recon-budget032`` or ``recon-adaptive-t0.07``."""
    return f"recon-adaptive-t{threshold:g}" if budget == ADAPTIVE else f"recon-{budget_label(budget)}"


def reconstruct_to_folder(tokenizer: ALITTokenizer, tokenizer_tag: str, data: DataConfig, split: str,
                          budget: Budget, out_root: str | Path, *, threshold: float | None = None,
                          num_images: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          shard: Shard = WHOLE, png: bool = True, progress: bool = True,
                          identity: dict[str, str] | None = None, dataset: ImageDataset | None = None) -> Path:
    """Reconstruct (``shard`` of) a split at ``budget`` into ``<out_root>/<tokenizer tag>/recon-.../``."""
    if data.resolution != tokenizer.image_size:
        raise ValueError(f"data.resolution={data.resolution} but the tokenizer takes {tokenizer.image_size}px "
                         f"images: pass data.resolution={tokenizer.image_size}")
    dataset = dataset if dataset is not None else build_dataset(data, split)  # type: ignore[arg-type]
    positions = eval_positions(dataset, num_images, data.split_seed)
    folder = Path(out_root) / tokenizer_tag / recon_folder_name(budget, threshold)
    meta = {"kind": "reconstructions", "budget": budget, "threshold": threshold if budget == ADAPTIVE else None,
            "split": split, "num_images": len(positions), "chunk_size": chunk_size, "data": to_dict(data),
            "tokenizer_id": identity["id"] if identity is not None else None}
    chunks = iter_recon_chunks(tokenizer, dataset, positions, budget, threshold, chunk_size, shard, progress)
    write_image_set(folder, RECONSTRUCTIONS, chunks, meta, shard, len(positions), png)
    return folder

"""Training a prior (MaskGIT or AR) on a token cache with the one training loop.

Entry point: ``alit train prior --config configs/prior/maskgit_emoji_cpu.yaml tokens=<cache> tokenizer=<dir>``.
The exported model (``<run>/final``) records the tokenizer identity of its token cache, so sampling
can refuse a prior paired with another tokenizer.

``data_mode`` chooses the training sequences (:class:`generator.tasks.TokenDataset`): ``all_budgets``
(default: every image at every budget, ``p(ids | budget, class)``), ``adaptive`` (each image at its TSC
length from the cache's adaptive ids) or ``mixture`` (both, a fraction ``adaptive_weight`` of the
sequences adaptive). With ``adaptive`` or ``mixture`` the prior gets a length model (``length_model``
in its config) trained on the adaptive sequences, so it learns ``p(length, ids | class)`` and chooses
its own budget at sampling time. The cache must have been tokenized with ``--adaptive-threshold``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from tokenizer.core.checkpoint import tokenizer_identity
from tokenizer.core.config import check_choice, check_overrides
from tokenizer.core.errors import UserError
from tokenizer.core.paths import runs_dir
from tokenizer.core.trainer import TrainConfig, Trainer

from .cache import check_identity, write_identity
from .shards import open_token_cache
from .tasks import (
    PRIORS,
    SIZES,
    PriorTask,
    TokenDataset,
    build_prior,
    collate_tokens,
    histogram_length_bits,
    unigram_bits_per_token,
)

CACHE_FIELDS = ("codebook_size", "tokens_per_iter", "num_budgets")  # prior fields read from the token cache


class DataMode(Enum):
    """Which sequences a prior trains on (see the module docstring)."""

    all_budgets = "all_budgets"
    adaptive = "adaptive"
    mixture = "mixture"


class PriorKind(Enum):
    """Which prior to train."""

    maskgit = "maskgit"
    ar = "ar"


@dataclass
class PriorRunConfig:
    """A stage-two training run: which prior, on which token cache, with which loop settings."""

    kind: PriorKind = PriorKind.maskgit  # maskgit | ar
    size: str = "tiny"  # registered size (generator.maskgit / generator.ar size registries)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of that size's config fields
    tokens: str = ""  # token cache directory (alit tokenize)
    tokenizer: str | None = None  # tokenizer directory; if given, must be the cache's tokenizer
    conditional: bool = True  # class-conditional (with class dropout for CFG) when the data has labels
    packed: bool = False  # train on packed sequences (block-diagonal attention, no padding compute on CUDA)
    name: str = "prior"  # run name; the run directory defaults to $ALIT_RUNS/<name>
    run_dir: str | None = None  # explicit run directory (resumed if it holds checkpoints)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int = 64  # validation batches for bits/token
    maskgit_eval_steps: int = 8  # MaskGIT code-length evaluation: forwards per sequence
    data_mode: DataMode = DataMode.all_budgets  # all_budgets | adaptive | mixture (TSC-chosen pairs)
    adaptive_weight: float = 0.5  # mixture: fraction of the training sequences that are adaptive ones

    def __post_init__(self) -> None:
        if self.data_mode is DataMode.mixture and not 0 < self.adaptive_weight < 1:
            raise ValueError(f"adaptive_weight must be in (0, 1) with data_mode=mixture, got {self.adaptive_weight}")
        if not self.tokens:
            raise ValueError("tokens=<token cache directory> is required (make one with `alit tokenize`)")
        kind = self.kind.value
        check_choice(f"size (of a {kind} prior)", self.size, SIZES[kind])
        check_overrides("model", PRIORS[kind].config_class, self.model, f"kind={kind}, size={self.size}",
                        fixed={**dict.fromkeys(CACHE_FIELDS, "the token cache (tokens=...)"),
                               "num_classes": "the token cache's labels and conditional",
                               "length_model": "data_mode (adaptive or mixture train one)"})

    @property
    def learns_length(self) -> bool:
        """Whether the prior gets a length model (trained on the TSC-chosen pairs)."""
        return self.data_mode is not DataMode.all_budgets

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else runs_dir() / self.name


@dataclass
class PriorResult:
    """What a finished prior run leaves behind, with its held-out bits/token against the unigram baseline."""

    run_dir: Path
    step: int
    bits_per_token: dict[str, float]  # the final evaluation (overall and per budget)
    unigram_bits_per_token: dict[int, float]  # add-one unigram baseline per budget, same split
    histogram_length_bits: float | None = None  # held-out bits/image of the TSC histogram (with a length model)

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"


def train_prior(cfg: PriorRunConfig) -> PriorResult:
    """Train (or resume) a prior on a token cache; writes ``final/`` with the tokenizer identity."""
    train_cache = open_token_cache(cfg.tokens, "train")  # ids memory-mapped: no copy of the cache per rank
    val_cache = open_token_cache(cfg.tokens, "val")
    if cfg.tokenizer:
        check_identity(train_cache.identity, tokenizer_identity(cfg.tokenizer), f"token cache {cfg.tokens}")
    num_classes = train_cache.num_classes if cfg.conditional else 0
    mode = cfg.data_mode.value
    if cfg.learns_length:
        for split, cache in (("train", train_cache), ("val", val_cache)):
            if cache.adaptive_ids is None or cache.adaptive_lengths is None:
                raise UserError(f"data_mode={mode} needs adaptive ids in the token cache {cfg.tokens} ({split} "
                                "split has none): re-tokenize with `alit tokenize --adaptive-threshold 0.07`, or "
                                "use data_mode=all_budgets")
    torch.manual_seed(cfg.train.seed)
    extra = {"length_model": True} if cfg.learns_length else {}
    model = build_prior(cfg.kind.value, cfg.size, codebook_size=train_cache.codebook_size,
                        tokens_per_iter=train_cache.tokens_per_iter, num_budgets=len(train_cache.budgets),
                        num_classes=num_classes, **cfg.model, **extra)
    labels = train_cache.labels if num_classes else None
    val_labels = val_cache.labels if num_classes else None
    if cfg.learns_length:
        train_set = TokenDataset(train_cache.ids_by_budget, labels, train_cache.adaptive_ids,
                                 train_cache.adaptive_lengths, mode=mode, adaptive_weight=cfg.adaptive_weight)
        val_set = TokenDataset(val_cache.ids_by_budget, val_labels, val_cache.adaptive_ids,
                               val_cache.adaptive_lengths)
    else:
        train_set = TokenDataset(train_cache.ids_by_budget, labels)
        val_set = TokenDataset(val_cache.ids_by_budget, val_labels)
    print(f"[train prior] {cfg.kind.value}/{cfg.size}: {train_set.num_images} train and {val_set.num_images} val "
          f"images x {len(train_set.budgets)} budgets, K={train_cache.codebook_size}, {num_classes} classes, "
          f"data {mode} ({len(train_set)} sequences per epoch)", file=sys.stderr)
    task = PriorTask(model, val_set, eval_batch_size=cfg.eval_batch_size,
                     maskgit_eval_steps=cfg.maskgit_eval_steps, packed=cfg.packed)
    run_dir = cfg.resolved_run_dir()
    trainer = Trainer(cfg.train, run_dir, task, train_set, collate_fn=collate_tokens, run_config=cfg)
    trainer.fit()  # raises Preempted (after checkpointing) when stopped early
    final = task.evaluate(trainer.ema_model(), trainer.step) if trainer.dist.is_main else {}
    if trainer.dist.is_main:
        write_identity(run_dir / "final", train_cache.identity)
    baseline = {b: unigram_bits_per_token(train_cache.ids_by_budget[b], val_cache.ids_by_budget[b],
                                          train_cache.codebook_size) for b in train_cache.budgets}
    length_baseline = None
    if cfg.learns_length:
        length_baseline = histogram_length_bits(train_cache.adaptive_lengths, labels, val_cache.adaptive_lengths,
                                                val_labels, model.space)
    return PriorResult(run_dir, trainer.step, final, baseline, length_baseline)

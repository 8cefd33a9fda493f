"""MaskGIT prior: a bidirectional transformer that predicts masked code ids, ``p(ids | budget, class)``.

Input ``[class, budget, x_0, ..., x_{L-1}]`` where each ``x_i`` is a code id or MASK (token space in
:mod:`generator.tokens`); output logits over the K code ids at every slot. Training masks a random
``r = schedule(u)``, ``u ~ U(0, 1)``, fraction of each sequence's real slots (at least one) and scores
the masked slots only. Sampling lives in :mod:`sampling.maskgit_sampler`.

Likelihood: MaskGIT has no exact likelihood, but decoding in a fixed random order with a fixed
reveal schedule defines a normalised distribution (each step's revealed tokens are scored under the
model given what is already revealed), so its negative log-probability is a valid code length that is
comparable with the AR prior's and the unigram baseline's (:func:`maskgit_nll`; one token per step
gives the tightest value).

Adaptive length: with a length model (``config.length_model``) MaskGIT also learns ``p(budget | class)``,
a head on the class token of a class-only pass (:meth:`~generator.transformer.Prior.budget_logits`, which
says why that design), trained with the ids on the sequences whose length is their TSC choice
(:func:`maskgit_loss` with ``chosen``); the sampler draws the budget, then the ids at that budget.

Sizes: ``MASKGIT_SIZES`` at the end (``tiny`` for CPU tests, TiTok-like ``maskgit_b`` / ``maskgit_l``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .tokens import PAD_ID, drop_classes, uniform
from .transformer import Prior, PriorConfig, PriorLoss, cross_entropy_bits, length_loss

Schedule = Callable[[torch.Tensor], torch.Tensor]


# ============================================================================ masking schedules
# A masking schedule maps t in [0, 1] (the fraction of decoding done) to the fraction of slots still
# masked: r(0) = 1, r(1) = 0, non-increasing. Training draws t ~ U(0, 1) and masks r(t) of each sequence.
def cosine(t: torch.Tensor) -> torch.Tensor:
    """``cos(pi/2 t)`` (MaskGIT's default)."""
    return torch.cos(math.pi / 2 * t).clamp(0, 1)  # fp32 cos(pi/2) is -4e-8


def arccos(t: torch.Tensor) -> torch.Tensor:
    """``arccos(t) / (pi/2)`` (masks fewer early, more late than cosine)."""
    return (torch.arccos(t.clamp(0, 1)) / (math.pi / 2)).clamp(0, 1)


def linear(t: torch.Tensor) -> torch.Tensor:
    """``1 - t``."""
    return (1 - t).clamp(0, 1)


MASK_SCHEDULES: dict[str, Schedule] = {"cosine": cosine, "arccos": arccos, "linear": linear}


def mask_counts(lengths: torch.Tensor, steps: int, schedule: Schedule) -> torch.Tensor:
    """Slots still masked before step 0 and after each of ``steps`` decoding steps: int64 ``(steps + 1, B)``.

    Row 0 is ``lengths``, the last row 0; while a sequence has masked slots, each step reveals at
    least one (so ``steps`` larger than a budget finishes that sequence early).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.arange(1, steps + 1, device=lengths.device, dtype=torch.float64) / steps  # (S,)
    target = torch.floor(lengths[None].double() * schedule(t)[:, None]).long()  # (S, B)
    rows = [lengths.long()]
    for s in range(steps):
        rows.append(torch.minimum(target[s], (rows[-1] - 1).clamp_min(0)).clamp_min(0))
    rows[-1] = torch.zeros_like(rows[-1])
    return torch.stack(rows)  # (S + 1, B)


def random_ranks(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random order of each row's real slots: int64 ``(B, L)`` ranks ``0..len-1`` on real slots
    (padded slots get ranks ``>= len``)."""
    scores = uniform(mask.shape, mask.device, generator).masked_fill(~mask, 2.0)  # padded sort last
    return scores.argsort(1).argsort(1)  # (B, L)


# ============================================================================ config
@dataclass
class MaskGITConfig(PriorConfig):
    """A MaskGIT prior: the shared prior fields plus the training masking schedule."""

    mask_schedule: str = "cosine"  # training mask-ratio schedule: one of MASK_SCHEDULES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask_schedule '{self.mask_schedule}' is not one of {sorted(MASK_SCHEDULES)}")


# ============================================================================ model
class MaskGIT(Prior):
    """Bidirectional transformer over ``[class, budget, ids]``; ``forward`` returns logits ``(B, L, K)``."""

    kind = "maskgit"
    config_class = MaskGITConfig

    def __init__(self, config: MaskGITConfig) -> None:
        super().__init__(config, input_vocab=config.codebook_size + 1)  # + MASK

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, classes: torch.Tensor | None = None,
                packed: bool = False) -> torch.Tensor:
        """``ids (B, L)`` code ids or MASK (PAD beyond ``lengths (B,)``, which are budgets) -> logits ``(B, L, K)``.

        Logits at padded slots are unspecified. ``packed=True`` runs the real tokens as one packed row
        (no padding compute on CUDA); the result equals the padded path.
        """
        b = ids.shape[0]
        mask = self.space.check_ids(ids.masked_fill(ids == self.space.mask_id, 0), lengths)  # (B, L)
        x = self.embed(ids, classes, lengths)  # (B, 2 + L, W)
        real = torch.cat([mask.new_ones(b, self.PREFIX), mask], 1)  # (B, 2 + L)
        h = self.run(x, real, causal=False, packed=packed)  # (B, 2 + L, W)
        return self.head(h[:, self.PREFIX:])  # (B, L, K)


# ============================================================================ loss and likelihood
def maskgit_loss(model: MaskGIT, ids: torch.Tensor, lengths: torch.Tensor, classes: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, packed: bool = False,
                 chosen: torch.Tensor | None = None) -> PriorLoss:
    """Masked-token cross-entropy: mask ``ceil(schedule(u) * len)`` random slots (at least one) per sequence,
    drop classes with ``config.class_dropout``, score the masked slots (mean over all masked tokens).
    With a length model and ``chosen (B,)`` (True where the length is the image's TSC choice), the length
    model's cross-entropy on those rows is added (same dropped classes)."""
    space, cfg = model.space, model.config
    mask = space.check_ids(ids, lengths)  # (B, L)
    ratio = MASK_SCHEDULES[cfg.mask_schedule](uniform(lengths.shape, ids.device, generator))  # (B,)
    n_masked = torch.minimum(torch.ceil(ratio * lengths).long().clamp_min(1), lengths)  # (B,)
    masked = random_ranks(mask, generator) < n_masked[:, None]  # (B, L), only real slots
    cond = drop_classes(space.condition(classes, len(ids), ids.device), cfg.class_dropout, space.null_class,
                        generator)
    logits = model(ids.masked_fill(masked, space.mask_id), lengths, cond, packed=packed)  # (B, L, K)
    picked, target = logits[masked], ids[masked]  # (M, K), (M,)
    loss = torch.nn.functional.cross_entropy(picked.float(), target)
    acc = (picked.argmax(-1) == target).float().mean()
    if model.budget_head is None or chosen is None:
        return PriorLoss(loss, acc.detach(), masked.sum())
    extra = length_loss(model.budget_logits(cond), lengths, chosen, space)
    return PriorLoss(loss + extra, acc.detach(), masked.sum(), extra.detach())


@torch.no_grad()
def maskgit_nll(model: MaskGIT, ids: torch.Tensor, lengths: torch.Tensor, classes: torch.Tensor | None = None,
                steps: int | None = None, schedule: Schedule = linear,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Bits of each sequence ``(B,)`` under random-order decoding (see the module docstring).

    ``steps=None`` reveals one token per step (``max(lengths)`` forwards); otherwise ``steps`` forwards with
    ``schedule`` deciding how many tokens each reveals.
    """
    space = model.space
    mask = space.check_ids(ids, lengths)  # (B, L)
    cond = space.condition(classes, len(ids), ids.device)
    if steps is None:
        steps, schedule = int(lengths.max()), linear
    remaining = mask_counts(lengths, steps, schedule)  # (S + 1, B) masked slots before/after each step
    rank = random_ranks(mask, generator)  # (B, L) reveal order
    bits = torch.zeros(len(ids), device=ids.device, dtype=torch.float32)
    for s in range(steps):
        revealed = (lengths - remaining[s])[:, None]  # (B, 1) tokens known before this step
        scored = (rank >= revealed) & (rank < (lengths - remaining[s + 1])[:, None]) & mask  # (B, L)
        if not bool(scored.any()):
            continue
        inp = torch.where(rank < revealed, ids, space.mask_id).masked_fill(~mask, PAD_ID)
        ce = cross_entropy_bits(model(inp, lengths, cond), ids.clamp_min(0))  # (B, L)
        bits += (ce * scored).sum(1)
    return bits


# ============================================================================ sizes
MASKGIT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"width": 64, "depth": 2, "heads": 4},  # CPU tests
    "maskgit_s": {"width": 512, "depth": 12, "heads": 8},
    "maskgit_b": {"width": 768, "depth": 24, "heads": 16},  # TiTok's generator size
    "maskgit_l": {"width": 1024, "depth": 24, "heads": 16},
}


def maskgit_config(size: str = "tiny", **overrides: Any) -> MaskGITConfig:
    """A :class:`MaskGITConfig` of a registered size, with field overrides (e.g. ``codebook_size=4096``)."""
    if size not in MASKGIT_SIZES:
        raise ValueError(f"unknown MaskGIT size '{size}'; choose one of {sorted(MASKGIT_SIZES)}")
    return MaskGITConfig(**{**MASKGIT_SIZES[size], **overrides})

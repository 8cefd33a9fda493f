"""MaskGIT iterative parallel decoding, scheduler-style: :meth:`MaskGITSampler.step` is one update,
:meth:`MaskGITSampler.sample` the loop around a model.

Every step starts from the current ids (MASK at unknown slots), runs the model (twice with guidance),
draws a candidate id at every unknown slot from ``softmax(guided / temperature)``, scores it by its
log-probability under ``softmax(guided)`` plus ``choice_temperature`` x Gumbel noise (MaskGIT's
choice temperature), and keeps the candidates except the lowest-scoring ones, which stay masked so
that ``mask_counts`` slots remain. After the last step every real slot holds a code id in [0, K).

**Generated budgets.** ``sample(model, None, classes)`` lets a prior with a length model choose: a budget
per row is drawn from ``p(budget | class)`` (:meth:`~generator.transformer.Prior.budget_logits`, a class-only
pass; ``budget_temperature``, at most ``max_budget``), then the ids are decoded at those budgets exactly as
for given budgets (the same randomness after the budget draw, padded rows as in any mixed batch).

Example::

    sampler = MaskGITSampler(steps=8, schedule=cosine, choice_temperature=Ramp(4.5, 0.0), cfg_scale=2.0)
    out = sampler.sample(model, budgets=128, classes=torch.tensor([1, 7]),
                         generator=torch.Generator().manual_seed(0))
    out.ids  # (2, 128), out.lengths == [128, 128]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from generator.maskgit import MaskGIT, Schedule, cosine, mask_counts
from generator.tokens import PAD_ID, TokenBatch, draw_budgets, lengths_to_mask

from .schedules import (
    Ramp,
    Sampler,
    ValueSchedule,
    as_value_schedule,
    cfg_combine,
    check_guidance,
    gumbel,
    sample_tokens,
    step_fraction,
)


@dataclass
class MaskGITSampler(Sampler):
    """Settings of MaskGIT decoding; value schedules take ``t`` = 0 at the first step, 1 at the last."""

    steps: int = 8  # decoding steps (each reveals at least one slot per unfinished sequence)
    schedule: Schedule = cosine  # fraction of slots still masked after a step: r((s + 1) / steps)
    temperature: float | ValueSchedule = 1.0  # candidate sampling temperature (0 = argmax)
    choice_temperature: float | ValueSchedule = field(default_factory=lambda: Ramp(4.5, 0.0))  # confidence noise
    cfg_scale: float | ValueSchedule = 0.0  # guidance: cond + scale (cond - uncond); 0 = no guidance
    budget_temperature: float = 1.0  # generated budgets: temperature of p(budget | class) (0 = most likely)
    max_budget: int | None = None  # generated budgets: none above this one

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.budget_temperature < 0:
            raise ValueError(f"budget_temperature must be >= 0, got {self.budget_temperature}")
        self.temperature = as_value_schedule(self.temperature)
        self.choice_temperature = as_value_schedule(self.choice_temperature)
        self.cfg_scale = as_value_schedule(self.cfg_scale)

    def decode_chosen(self, model: MaskGIT, lengths: torch.Tensor, cond: torch.Tensor,  # type: ignore[override]
                      generator: torch.Generator | None) -> TokenBatch:
        return self.decode(model, self.choose_budgets(model, cond, generator), cond, generator)

    def choose_budgets(self, model: MaskGIT, cond: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Budgets ``(B,)`` drawn from the length model for class ids ``cond (B,)``."""
        logits = model.budget_logits(cond)  # (B, n)
        return draw_budgets(logits, model.space, self.budget_temperature, self.max_budget, generator).to(cond.device)

    def mask_counts(self, lengths: torch.Tensor) -> torch.Tensor:
        """Masked slots before step 0 and after every step: int64 ``(steps + 1, B)``."""
        return mask_counts(lengths, self.steps, self.schedule)

    def step(self, logits: torch.Tensor, ids: torch.Tensor, mask_id: int, remaining: torch.Tensor, step: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One decoding update.

        ``logits (B, L, K)`` (guided), ``ids (B, L)`` with ``mask_id`` at unknown slots, ``remaining (B,)``
        the slots to leave masked (fewer than the unknown ones, unless none are unknown). Returns the new ids.
        """
        t = step_fraction(step, self.steps)
        unknown = ids == mask_id  # (B, L)
        picked = logits[unknown]  # (M, K)
        candidates = sample_tokens(picked, self.temperature(t), generator)  # (M,)
        logp = picked.float().log_softmax(-1).gather(-1, candidates[:, None])[:, 0]  # (M,)
        score = logp + self.choice_temperature(t) * gumbel(logp.shape, logp.device, generator)  # (M,)
        confidence = torch.full(ids.shape, float("inf"), device=ids.device)  # known/padded slots: never re-masked
        confidence[unknown] = score
        keep_masked = confidence.argsort(1).argsort(1) < remaining[:, None]  # (B, L) lowest scores
        proposal = ids.clone()
        proposal[unknown] = candidates
        return torch.where(keep_masked, ids, proposal)

    def decode(self, model: MaskGIT, lengths: torch.Tensor, cond: torch.Tensor,
               generator: torch.Generator | None) -> TokenBatch:
        """The decoding loop of :meth:`~sampling.schedules.Sampler.sample`: ``steps`` parallel updates."""
        space = model.space
        scales = [self.cfg_scale(step_fraction(s, self.steps)) for s in range(self.steps)]
        check_guidance(space, scales)
        mask = lengths_to_mask(lengths, int(lengths.max()))  # (B, L)
        ids = torch.where(mask, space.mask_id, PAD_ID)  # (B, L)
        remaining = self.mask_counts(lengths)  # (S + 1, B)
        null = torch.full_like(cond, space.null_class)
        for s in range(self.steps):
            if not bool((ids == space.mask_id).any()):
                break
            if scales[s] == 0:
                logits = model(ids, lengths, cond)  # (B, L, K)
            else:
                both = model(ids.repeat(2, 1), lengths.repeat(2), torch.cat([cond, null]))  # (2B, L, K)
                logits = cfg_combine(*both.chunk(2), scales[s])
            ids = self.step(logits, ids, space.mask_id, remaining[s + 1], s, generator)
        return TokenBatch(ids, lengths, cond)

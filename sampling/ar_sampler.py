"""Autoregressive decoding, scheduler-style: :meth:`ARSampler.step` turns next-slot logits into ids,
:meth:`ARSampler.sample` is the loop around a model.

Per slot: logits (guided with CFG when the scale is not 0) / temperature -> top-k -> top-p -> a
categorical draw (:func:`~sampling.schedules.sample_tokens`; argmax at temperature 0). With
``use_cache=True`` each step runs only the new position through the transformer: a static KV cache
(buffers allocated once per call, the new position written in place, attention over the filled prefix;
:meth:`~generator.transformer.Transformer.step`), the guided conditional and unconditional rows in one
batch. ``use_cache=False`` recomputes the whole prefix. Both paths consume the generator identically,
so they give the same tokens. Mixed budgets decode together
up to the largest budget; each row is cut at its own budget (later slots never influence earlier ones).

**Generated budgets.** ``sample(model, None, classes)`` lets a prior with a length model choose: the class
token runs first and its output gives ``p(budget | class)`` (:meth:`~generator.transformer.Prior.budget_logits`),
a budget is drawn (``budget_temperature``, at most ``max_budget``; from the conditional logits, also under
guidance), its token is fed next and the ids follow; each row stops at its emitted budget. With the KV cache
the class position computed for the budget is the cache's first entry, so both paths consume the same
randomness and give the same tokens and budgets.

Example::

    sampler = ARSampler(temperature=1.0, top_k=600, top_p=0.95, cfg_scale=1.5)
    out = sampler.sample(model, budgets=[32, 64, 256], classes=torch.tensor([3, 3, 9]),
                         generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from generator.ar import AR
from generator.tokens import PAD_ID, TokenBatch, draw_budgets, lengths_to_mask

from .schedules import (
    Sampler,
    ValueSchedule,
    as_value_schedule,
    cfg_combine,
    check_guidance,
    filter_logits,
    sample_tokens,
    step_fraction,
)


@dataclass
class ARSampler(Sampler):
    """Settings of AR decoding; ``cfg_scale`` may be a value schedule over ``t`` = slot / (max budget - 1)."""

    temperature: float = 1.0  # softmax temperature (0 = greedy)
    top_k: int = 0  # keep the k most likely ids (0 = all)
    top_p: float = 1.0  # nucleus: keep the smallest set with this probability (1 = all)
    cfg_scale: float | ValueSchedule = 0.0  # guidance: cond + scale (cond - uncond); 0 = no guidance
    use_cache: bool = True  # KV cache (same tokens as recomputing the prefix, faster)
    budget_temperature: float = 1.0  # generated budgets: temperature of p(budget | class) (0 = most likely)
    max_budget: int | None = None  # generated budgets: none above this one

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self.temperature}, "
                             f"{self.top_k}, {self.top_p}")
        if self.budget_temperature < 0:
            raise ValueError(f"budget_temperature must be >= 0, got {self.budget_temperature}")
        self.cfg_scale = as_value_schedule(self.cfg_scale)

    def step(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Next ids ``(B,)`` from (guided) next-slot logits ``(B, K)``."""
        if self.temperature == 0:
            return logits.argmax(-1)
        scaled = logits.float() if self.temperature == 1 else logits.float() / self.temperature
        filtered = filter_logits(scaled, self.top_k, self.top_p)  # (B, K)
        return sample_tokens(filtered, 1.0, generator)

    def decode_chosen(self, model: AR, lengths: torch.Tensor, cond: torch.Tensor,  # type: ignore[override]
                      generator: torch.Generator | None) -> TokenBatch:
        return self.decode(model, lengths, cond, generator, choose=True)

    def decode(self, model: AR, lengths: torch.Tensor, cond: torch.Tensor,
               generator: torch.Generator | None, choose: bool = False) -> TokenBatch:
        """The decoding loop of :meth:`~sampling.schedules.Sampler.sample`: one slot per step (``choose``:
        the budget token first, drawn from the length model; ``lengths`` are then replaced)."""
        space = model.space
        n = space.max_budget if choose else int(lengths.max())
        scales = [self.cfg_scale(step_fraction(t, n)) for t in range(n)]
        guided = any(scales)  # with generated budgets: whether any budget could be guided (decided before them)
        check_guidance(space, scales)
        # with guidance the unconditional rows run along for the whole sequence (they share the cache)
        cls_in = torch.cat([cond, torch.full_like(cond, space.null_class)]) if guided else cond
        cache = model.new_cache() if self.use_cache else None
        if choose:  # the class token first: its output is p(budget | class) (and the cache's first entry)
            logits = model.budget_logits(cls_in, cache=cache)[: len(cond)]  # conditional rows (B, n)
            lengths = draw_budgets(logits, space, self.budget_temperature, self.max_budget, generator).to(cond.device)
            n = int(lengths.max())  # the guidance schedule runs over the emitted budgets, as for given ones
            scales = [self.cfg_scale(step_fraction(t, n)) for t in range(n)]
        b = len(lengths)
        bud_in = lengths.repeat(2) if guided else lengths
        # the ids of every row fed to the model (guided: the B conditional rows, then the same ids again for
        # the unconditional ones), written in place: no per-step copy of the sequence so far
        fed = torch.zeros(len(cls_in), n, dtype=torch.long, device=lengths.device)  # (B or 2B, n)
        for t in range(n):
            logits = model.next_logits(fed[:, :t], cls_in, bud_in, cache)  # (B or 2B, K): CFG pairs in one batch
            if guided:
                logits = cfg_combine(logits[:b], logits[b:], scales[t])
            fed[:, t] = self.step(logits, generator).repeat(2) if guided else self.step(logits, generator)
        ids = fed[:b].masked_fill(~lengths_to_mask(lengths, n), PAD_ID)
        return TokenBatch(ids, lengths, cond)

"""Autoregressive decoding, scheduler-style: :meth:`ARSampler.step` turns next-slot logits into ids,
:meth:`ARSampler.sample` is the loop around a model.

Per slot: logits (guided with CFG when the scale is not 0) / temperature -> top-k -> top-p -> a
Gumbel-max draw (argmax at temperature 0). With ``use_cache=True`` each step runs only the new
position through the transformer (KV cache); ``use_cache=False`` recomputes the whole prefix. Both
paths consume the generator identically, so they give the same tokens. Mixed budgets decode together
up to the largest budget; each row is cut at its own budget (later slots never influence earlier ones).

Example::

    sampler = ARSampler(temperature=1.0, top_k=600, top_p=0.95, cfg_scale=1.5)
    out = sampler.sample(model, budgets=[32, 64, 256], classes=torch.tensor([3, 3, 9]),
                         generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from generator.ar import AR
from generator.tokens import PAD_ID, TokenBatch, lengths_to_mask

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

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self.temperature}, "
                             f"{self.top_k}, {self.top_p}")
        self.cfg_scale = as_value_schedule(self.cfg_scale)

    def step(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Next ids ``(B,)`` from (guided) next-slot logits ``(B, K)``."""
        if self.temperature == 0:
            return logits.argmax(-1)
        filtered = filter_logits(logits.float() / self.temperature, self.top_k, self.top_p)  # (B, K)
        return sample_tokens(filtered, 1.0, generator)

    def decode(self, model: AR, lengths: torch.Tensor, cond: torch.Tensor,
               generator: torch.Generator | None) -> TokenBatch:
        """The decoding loop of :meth:`~sampling.schedules.Sampler.sample`: one slot per step."""
        space = model.space
        device = lengths.device
        n = int(lengths.max())
        scales = [self.cfg_scale(step_fraction(t, n)) for t in range(n)]
        guided = any(scales)
        check_guidance(space, scales)
        # with guidance the unconditional rows run along for the whole sequence (they share the cache)
        cls_in = torch.cat([cond, torch.full_like(cond, space.null_class)]) if guided else cond
        bud_in = lengths.repeat(2) if guided else lengths
        cache = model.new_cache() if self.use_cache else None
        ids = torch.zeros(len(lengths), 0, dtype=torch.long, device=device)  # (B, t)
        for t in range(n):
            logits = model.next_logits(ids.repeat(2, 1) if guided else ids, cls_in, bud_in, cache)  # (B or 2B, K)
            if guided:
                logits = cfg_combine(*logits.chunk(2), scales[t])
            ids = torch.cat([ids, self.step(logits, generator)[:, None]], 1)  # (B, t + 1)
        ids = ids.masked_fill(~lengths_to_mask(lengths, n), PAD_ID)
        return TokenBatch(ids, lengths, cond)

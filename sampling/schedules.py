"""Schedules (masking, temperature, guidance) and the small primitives both samplers share.

Masking schedules map ``t`` in [0, 1] (fraction of decoding done) to the fraction of slots still
masked, ``r(0) = 1``, ``r(1) = 0``, non-increasing. They are defined next to the MaskGIT prior (its
training draws ``r(u)``, and the prior layer does not import the sampling layer) and re-exported here.

Value schedules give a number per decoding step from ``t`` in [0, 1] (first step ``t = 0``, last
``t = 1``): :class:`Constant` and :class:`Ramp` (linear). Samplers accept a plain float for a constant.

Classifier-free guidance (one definition for both priors)::

    guided = cond + scale * (cond - uncond)        # scale 0 = the conditional model, no unconditional pass

(``scale = w - 1`` in the ``uncond + w (cond - uncond)`` convention.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from generator.maskgit import MASK_SCHEDULES, Schedule, arccos, cosine, linear
from generator.tokens import TokenBatch, TokenSpace, uniform
from generator.transformer import Prior

__all__ = ["MASK_SCHEDULES", "Constant", "Ramp", "Sampler", "Schedule", "ValueSchedule", "arccos",
           "as_value_schedule", "cfg_combine", "check_guidance", "cosine", "filter_logits", "get_schedule", "gumbel", "linear", "resolve_request",
           "sample_tokens", "step_fraction"]

ValueSchedule = Callable[[float], float]


# ============================================================================ schedules
def get_schedule(name: str) -> Schedule:
    """The masking schedule called ``name`` (``cosine``, ``arccos``, ``linear``)."""
    if name not in MASK_SCHEDULES:
        raise ValueError(f"unknown masking schedule '{name}'; choose one of {sorted(MASK_SCHEDULES)}")
    return MASK_SCHEDULES[name]


@dataclass(frozen=True)
class Constant:
    """The same value at every step."""

    value: float

    def __call__(self, t: float) -> float:
        return self.value


@dataclass(frozen=True)
class Ramp:
    """Linear from ``start`` (first step) to ``end`` (last step)."""

    start: float
    end: float

    def __call__(self, t: float) -> float:
        return self.start + (self.end - self.start) * t


def as_value_schedule(value: float | ValueSchedule) -> ValueSchedule:
    """A float becomes :class:`Constant`; a callable is returned as is."""
    return value if callable(value) else Constant(float(value))


def step_fraction(step: int, steps: int) -> float:
    """``t`` of a step for value schedules: 0 at the first step, 1 at the last."""
    return step / (steps - 1) if steps > 1 else 0.0


# ============================================================================ sampling primitives
def gumbel(shape: Sequence[int], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Standard Gumbel noise (fp32)."""
    u = uniform(shape, device, generator).clamp(1e-20, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Categorical draw from ``softmax(logits / temperature)``: ``(..., K) -> (...)`` int64.

    Inverse-CDF sampling: one uniform per draw (not one per id, as Gumbel-max needs), so a CPU generator
    stays cheap for a GPU model. ``temperature == 0`` is argmax (and draws nothing).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    cdf = (logits.float() / temperature).softmax(-1).cumsum(-1)  # (..., K)
    u = uniform(logits.shape[:-1], logits.device, generator).clamp_min(1e-12) * cdf[..., -1]  # (...)
    # the first id whose cdf reaches u: never an id of probability 0 (its cdf equals its predecessor's)
    return torch.searchsorted(cdf, u[..., None].contiguous()).squeeze(-1).clamp_max(logits.shape[-1] - 1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (0 = all) and the smallest set whose probability reaches ``top_p``
    (1 = all); the rest become ``-inf``. The most likely token is always kept. ``(..., K) -> (..., K)``."""
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``cond + scale * (cond - uncond)`` (see the module docstring)."""
    return cond if scale == 0 else cond + scale * (cond - uncond)


def resolve_request(space: TokenSpace, budgets: int | Sequence[int] | torch.Tensor,
                    classes: torch.Tensor | Sequence[int] | None, batch_size: int | None,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What to sample: ``(budgets (B,), class ids (B,))`` on ``device``, validated against ``space``.

    ``budgets`` is one int (broadcast) or one per sample; ``classes`` ``None`` means the null class.
    ``B`` comes from whichever of budgets, classes and ``batch_size`` is given (they must agree).
    """
    sizes = {batch_size} if batch_size is not None else set()
    if classes is not None:
        classes = torch.as_tensor(classes, dtype=torch.long)
        sizes.add(len(classes))
    b = torch.as_tensor(budgets, dtype=torch.long)
    if b.ndim == 1:
        sizes.add(len(b))
    if len(sizes) != 1:
        raise ValueError(f"batch size is ambiguous or inconsistent ({sorted(sizes) or 'none given'}): pass "
                         "budgets per sample, classes, or batch_size, with matching sizes")
    (n,) = sizes
    b = b.expand(n).clone() if b.ndim == 0 else b
    space.budget_index(b)
    cond = space.condition(classes, n, torch.device("cpu"))
    return b.to(device), cond.to(device)


def check_guidance(space: TokenSpace, scales: Sequence[float]) -> None:
    """Guidance needs classes: any non-zero scale of an unconditional prior is an error."""
    if space.num_classes == 0 and any(scales):
        raise ValueError("cfg_scale must be 0 for an unconditional prior (num_classes=0)")


class Sampler:
    """What both samplers share: :meth:`sample` resolves the request, :meth:`decode` (per sampler) decodes it."""

    @torch.no_grad()
    def sample(self, model: Prior, budgets: int | Sequence[int] | torch.Tensor | None,
               classes: torch.Tensor | Sequence[int] | None = None, *, generator: torch.Generator | None = None,
               batch_size: int | None = None) -> TokenBatch:
        """Sample ``B`` sequences of the given budgets (one int, or one per sample: mixed budgets are fine);
        ``budgets=None``: the prior's length model chooses each one (:meth:`decode_chosen`).

        Returns a :class:`~generator.tokens.TokenBatch`: ids ``(B, max budget)`` with exactly ``budget`` code
        ids in [0, K) per row and PAD after, the budgets as lengths, the class ids used.
        """
        device = next(model.parameters()).device
        if budgets is None:
            model.require_length_model()
            lengths, cond = resolve_request(model.space, model.space.max_budget, classes, batch_size, device)
            return self.decode_chosen(model, lengths, cond, generator)
        lengths, cond = resolve_request(model.space, budgets, classes, batch_size, device)
        return self.decode(model, lengths, cond, generator)

    def decode_chosen(self, model: Prior, lengths: torch.Tensor, cond: torch.Tensor,
                      generator: torch.Generator | None) -> TokenBatch:  # pragma: no cover - each sampler has one
        """Decode sequences whose budgets the length model chooses (``lengths``: the largest, placeholders)."""
        raise NotImplementedError

    def decode(self, model: Prior, lengths: torch.Tensor, cond: torch.Tensor,
               generator: torch.Generator | None) -> TokenBatch:  # pragma: no cover - each sampler has one
        """Decode sequences of ``lengths (B,)`` for class ids ``cond (B,)`` (from :meth:`sample`)."""
        raise NotImplementedError

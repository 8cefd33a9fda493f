"""Autoregressive prior: a causal transformer, ``p(ids | budget, class) = prod_i p(x_i | class, budget, x_<i)``.

Input ``[class, budget, x_0, ..., x_{L-2}]`` (token space in :mod:`generator.tokens`), causal attention;
the output at position ``i + 1`` (the budget token for ``i = 0``) gives the logits of ``x_i``. So
``forward`` returns logits ``(B, L, K)`` aligned with ``ids``: ``logits[:, i]`` predicts ``ids[:, i]``.
The budget is known from the prefix, so there is no end token.

Adaptive length: with a length model (``config.length_model``) the output at position 0 (the class token,
which sees only itself) gives the logits of the budget token, ``p(budget | class)``
(:meth:`~generator.transformer.Prior.budget_logits`), so the sequence is generated budget first, then
the ids, and decoding stops at the emitted budget: ``p(budget, ids | class) = p(budget | class)
prod_i p(x_i | class, budget, x_<i)``. Training on the token cache's adaptive (TSC) pairs teaches it the
length each image needed (:func:`ar_loss` with ``chosen``). Padding follows the real slots and
causal attention never reaches it, so padded batches need no key mask.

Decoding: :meth:`AR.next_logits` gives the logits of the next slot, either recomputing the whole prefix
or, with a :class:`~generator.transformer.KVCache` (static buffers, written in place), running only the
positions not yet cached; one new slot in eval mode takes :meth:`~generator.transformer.Transformer.step`.
Sampling lives in :mod:`sampling.ar_sampler`. Sizes: ``AR_SIZES`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .tokens import drop_classes, lengths_to_mask
from .transformer import KVCache, Prior, PriorConfig, PriorLoss, cross_entropy_bits, length_loss


# ============================================================================ config
@dataclass
class ARConfig(PriorConfig):
    """An autoregressive prior: the shared prior fields (see :class:`~generator.transformer.PriorConfig`)."""


# ============================================================================ model
class AR(Prior):
    """Causal transformer over ``[class, budget, ids]``; ``forward`` returns next-token logits ``(B, L, K)``."""

    kind = "ar"
    config_class = ARConfig

    def __init__(self, config: ARConfig) -> None:
        super().__init__(config, input_vocab=config.codebook_size)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, classes: torch.Tensor | None = None,
                packed: bool = False) -> torch.Tensor:
        """``ids (B, L)`` (PAD beyond ``lengths (B,)``, which are budgets) -> logits ``(B, L, K)``,
        ``logits[:, i]`` = ``p(ids[:, i] | class, budget, ids[:, :i])``; unspecified at padded slots."""
        return self.forward_with_length(ids, lengths, classes, packed)[0]

    def forward_with_length(self, ids: torch.Tensor, lengths: torch.Tensor, classes: torch.Tensor | None = None,
                            packed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` and the budget logits ``(B, n)`` read at the class position of the same pass
        (None without a length model)."""
        n = ids.shape[1]
        self.space.check_ids(ids, lengths)
        x = self.embed(ids[:, : n - 1], classes, lengths)  # (B, 1 + L, W): the last slot is never an input
        real = lengths_to_mask(lengths + 1, n + 1)  # (B, 1 + L): prefix + len - 1 slots
        h = self.run(x, real, causal=True, packed=packed)  # (B, 1 + L, W)
        budget = self.budget_head(h[:, 0]) if self.budget_head is not None else None  # (B, n)
        return self.head(h[:, self.PREFIX - 1:]), budget  # (B, L, K)

    def new_cache(self) -> KVCache:
        """An empty KV cache for one decoding run (prefix + every slot but the last)."""
        return KVCache(max_len=self.PREFIX + self.space.max_budget - 1)

    def next_logits(self, ids: torch.Tensor, classes: torch.Tensor | None, budgets: torch.Tensor,
                    cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``(B, K)`` of slot ``t`` given ``ids (B, t)`` (the slots decoded so far, ``t >= 0``).

        Without ``cache`` the whole prefix is recomputed; with one, only the positions it lacks are run
        (the cache must have seen the same earlier ids, in the same batch order). Once the prefix is
        cached, one new slot per call (sampling) runs through :meth:`Transformer.step` in eval mode.
        """
        if cache is None:
            h = self.transformer(self.embed(ids, classes, budgets), causal=True)  # (B, 2 + t, W)
            return self.head(h[:, -1])  # (B, K)
        done, t = cache.length, ids.shape[1]
        if done == self.PREFIX + t - 1 and t > 0 and not self.training:  # one new slot: the fast path
            x = self.tok_emb(ids[:, -1]) + self.pos_emb[t - 1]  # (B, W); decoded ids are code ids (no PAD)
            return self.head(self.transformer.step(x, cache))  # (B, K)
        # otherwise embed only the positions the cache lacks (the prefix, or several slots at once)
        parts = [self.embed_prefix(classes, budgets.to(ids.device))[:, done:]] if done < self.PREFIX else []
        start = max(done - self.PREFIX, 0)
        parts.append(self.embed_slots(ids[:, start:], start))
        h = self.transformer(self.drop(torch.cat(parts, 1)), causal=True, cache=cache)  # (B, new, W)
        return self.head(h[:, -1])  # (B, K)


# ============================================================================ loss and likelihood
def ar_loss(model: AR, ids: torch.Tensor, lengths: torch.Tensor, classes: torch.Tensor | None = None,
            generator: torch.Generator | None = None, packed: bool = False,
            chosen: torch.Tensor | None = None) -> PriorLoss:
    """Next-token cross-entropy over every real slot (mean over tokens), classes dropped with
    ``config.class_dropout``. With a length model and ``chosen (B,)`` (True where the length is the image's
    TSC choice), the length model's cross-entropy on those rows is added (read from the same forward)."""
    space = model.space
    mask = space.check_ids(ids, lengths)  # (B, L)
    cond = drop_classes(space.condition(classes, len(ids), ids.device), model.config.class_dropout,
                        space.null_class, generator)
    logits, budget_logits = model.forward_with_length(ids, lengths, cond, packed=packed)  # (B, L, K), (B, n)
    picked, target = logits[mask], ids[mask]  # (T, K), (T,)
    loss = F.cross_entropy(picked.float(), target)
    acc = (picked.argmax(-1) == target).float().mean()
    if budget_logits is None or chosen is None:
        return PriorLoss(loss, acc.detach(), mask.sum())
    extra = length_loss(budget_logits, lengths, chosen, space)
    return PriorLoss(loss + extra, acc.detach(), mask.sum(), extra.detach())


@torch.no_grad()
def ar_nll(model: AR, ids: torch.Tensor, lengths: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Bits of each sequence ``(B,)`` (exact log-likelihood, conditioned on budget and class)."""
    mask = model.space.check_ids(ids, lengths)
    ce = cross_entropy_bits(model(ids, lengths, classes), ids.clamp_min(0))  # (B, L)
    return (ce * mask).sum(1)


# ============================================================================ sizes
AR_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"width": 64, "depth": 2, "heads": 4},  # CPU tests
    "ar_b": {"width": 768, "depth": 12, "heads": 12},  # LlamaGen-B-like
    "ar_l": {"width": 1024, "depth": 24, "heads": 16},  # LlamaGen-L-like
    "ar_xl": {"width": 1280, "depth": 36, "heads": 20},
}


def ar_config(size: str = "tiny", **overrides: Any) -> ARConfig:
    """An :class:`ARConfig` of a registered size, with field overrides (e.g. ``codebook_size=4096``)."""
    if size not in AR_SIZES:
        raise ValueError(f"unknown AR size '{size}'; choose one of {sorted(AR_SIZES)}")
    return ARConfig(**{**AR_SIZES[size], **overrides})

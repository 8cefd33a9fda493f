"""The token space of the stage-two priors, written down once.

The tokenizer turns an image into a sequence of code ids at a *budget* (a token count). Budgets are
``tpi, 2*tpi, ..., n*tpi`` (``tpi`` = tokens per ALIT iteration, 32 in the paper, ``n`` = iterations,
8 in the paper). Every budget is its own sequence: the 64-token code of an image is not its 32-token
code extended. A prior therefore models ``p(ids | budget, class)``.

Token space (K = tokenizer codebook size, 4096 in the paper; C = number of classes; n = number of budgets)::

    code ids        [0, K)    the tokenizer's VQ indices; the only ids that are ever targets or sampled
    MASK            K         MaskGIT input only: "this slot is still unknown" (embedding table K + 1 rows)
    PAD             -1        value of ``ids`` beyond a sequence's length in a padded batch; never embedded
                              (models read padded slots as id 0 and ignore their outputs)

    class ids       [0, C)    dataset labels, in their own embedding table (C + 1 rows)
    NULL class      C         "no class": the CFG unconditional branch, class dropout, and the only class of
                              an unconditional prior (C = 0). A label of -1 (NO_LABEL, "unlabelled", as in
                              tokenizer/core/data.py) is read as the null class.
    budget index    [0, n)    budget ``(index + 1) * tpi``, in its own embedding table (n rows)

Batch layout (axis letters: B batch, L slots = max length in the batch, K codebook)::

    ids      int64 (B, L)   code ids, PAD beyond each length
    lengths  int64 (B,)     the budget of each sequence (a multiple of tpi, at most n * tpi)
    classes  int64 (B,)     class ids in [0, C], -1 = no label; ``None`` = all null

:func:`lengths_to_mask` is the one helper that turns lengths into a bool ``(B, L)`` mask (True = real).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

PAD_ID = -1  # ids beyond a sequence's length
NO_LABEL = -1  # a label meaning "unlabelled"; read as the null class


# ============================================================================ masks and batches
def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``lengths (B,) -> bool (B, max_len)``, True at the first ``lengths[b]`` slots of row ``b``."""
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if len(lengths) and int(lengths.max()) > max_len:
        raise ValueError(f"a length ({int(lengths.max())}) exceeds max_len={max_len}; pad ids to the longest "
                         "sequence of the batch")
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]  # (B, L)


class TokenBatch(NamedTuple):
    """A padded batch of token sequences (a tuple, so the trainer's ``len(batch[0])`` works)."""

    ids: torch.Tensor  # int64 (B, L), PAD_ID beyond each length
    lengths: torch.Tensor  # int64 (B,)
    classes: torch.Tensor  # int64 (B,), class id, null class or NO_LABEL

    def mask(self) -> torch.Tensor:
        """bool (B, L), True at real slots."""
        return lengths_to_mask(self.lengths, self.ids.shape[1])

    def sequences(self) -> list[torch.Tensor]:
        """The ``B`` unpadded sequences."""
        return [row[:n] for row, n in zip(self.ids, self.lengths.tolist())]


def pad_sequences(seqs: Sequence[torch.Tensor], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(L_i,), ...] -> (ids (B, L) padded with PAD_ID, lengths (B,))``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = max_len if max_len is not None else int(lengths.max())
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return ids, lengths


# ============================================================================ the token space
@dataclass(frozen=True)
class TokenSpace:
    """Code ids, special ids and budgets of one prior (see the module docstring)."""

    codebook_size: int  # K: code ids are [0, K)
    tokens_per_iter: int  # tpi: budgets are multiples of it
    num_budgets: int  # n: budgets tpi, 2 tpi, ..., n tpi
    num_classes: int  # C: class ids [0, C); 0 = unconditional

    def __post_init__(self) -> None:
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2 (the tokenizer's codebook size), got {self.codebook_size}")
        if self.tokens_per_iter < 1 or self.num_budgets < 1:
            raise ValueError(f"tokens_per_iter and num_budgets must be >= 1, got {self.tokens_per_iter} and "
                             f"{self.num_budgets}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")

    @property
    def mask_id(self) -> int:
        """MaskGIT's mask input id (= K)."""
        return self.codebook_size

    @property
    def null_class(self) -> int:
        """The null class id (= C)."""
        return self.num_classes

    @property
    def max_budget(self) -> int:
        """The longest sequence, ``n * tpi``."""
        return self.tokens_per_iter * self.num_budgets

    @property
    def budgets(self) -> list[int]:
        """``[tpi, 2 tpi, ..., n tpi]``."""
        return [self.tokens_per_iter * (i + 1) for i in range(self.num_budgets)]

    def budget_index(self, budgets: torch.Tensor) -> torch.Tensor:
        """``budgets (B,) -> index (B,)`` into the budget table; invalid budgets are an error."""
        bad = (budgets < 1) | (budgets > self.max_budget) | (budgets % self.tokens_per_iter != 0)
        if bool(bad.any()):
            raise ValueError(f"budget {int(budgets[bad][0])} is not one of {self.budgets} (multiples of "
                             f"tokens_per_iter={self.tokens_per_iter} up to {self.max_budget})")
        return budgets // self.tokens_per_iter - 1

    def condition(self, classes: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Class ids for the class table: ``None`` and NO_LABEL become the null class; out of range is an error."""
        if classes is None or self.num_classes == 0:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        classes = classes.to(device=device, dtype=torch.long)
        if classes.shape != (batch,):
            raise ValueError(f"classes must have shape ({batch},), got {tuple(classes.shape)}")
        bad = (classes < NO_LABEL) | (classes > self.null_class)
        if bool(bad.any()):
            raise ValueError(f"class id {int(classes[bad][0])} is outside [0, {self.num_classes}] "
                             f"({self.num_classes} = null class, -1 = no label); check num_classes")
        return torch.where(classes == NO_LABEL, self.null_class, classes)

    def check_ids(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Validate a padded batch; returns its bool (B, L) mask."""
        if ids.ndim != 2 or lengths.shape != ids.shape[:1]:
            raise ValueError(f"expected ids (B, L) and lengths (B,), got {tuple(ids.shape)} and "
                             f"{tuple(lengths.shape)}")
        mask = lengths_to_mask(lengths, ids.shape[1])
        real = ids[mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.codebook_size):
            raise ValueError(f"code ids must be in [0, {self.codebook_size}) at real slots, got "
                             f"[{int(real.min())}, {int(real.max())}]; was the prior built for this tokenizer's "
                             "codebook size?")
        return mask


# ============================================================================ randomness
def uniform(shape: Sequence[int], device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(0, 1) fp32 of ``shape`` on ``device``, drawn on the generator's own device (the global RNG if None).

    Drawing where the generator lives makes a CPU generator give the same numbers whatever the model's device.
    """
    where = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=where).to(device)


# ============================================================================ conditioning helpers
def drop_classes(classes: torch.Tensor, prob: float, null_class: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each class by the null class with probability ``prob`` (CFG training)."""
    if prob <= 0:
        return classes
    return torch.where(uniform(classes.shape, classes.device, generator) < prob, null_class, classes)


def sample_budgets(budget_probs: torch.Tensor, space: TokenSpace, classes: torch.Tensor | None = None,
                   batch_size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a budget per sample for adaptive generation.

    ``budget_probs`` is ``(n,)`` (one distribution) or ``(C + 1, n)`` (one per class, row C for the null
    class); rows need not be normalised. Returns int64 budgets ``(B,)``.
    """
    if budget_probs.shape[-1] != space.num_budgets or budget_probs.ndim not in (1, 2):
        raise ValueError(f"budget_probs must be (n,) or (C + 1, n) with n={space.num_budgets}, got "
                         f"{tuple(budget_probs.shape)}")
    if bool((budget_probs < 0).any()) or not bool(torch.isfinite(budget_probs).all()):
        raise ValueError("budget_probs must be finite and non-negative")
    if budget_probs.ndim == 1:
        if batch_size is None:
            batch_size = len(classes) if classes is not None else None
        if batch_size is None:
            raise ValueError("sample_budgets: pass batch_size (or classes) with a 1-D budget_probs")
        rows = budget_probs[None].expand(batch_size, -1)
    else:
        if budget_probs.shape[0] != space.num_classes + 1:
            raise ValueError(f"budget_probs has {budget_probs.shape[0]} rows; a per-class table needs "
                             f"num_classes + 1 = {space.num_classes + 1} (the last for the null class)")
        if classes is None:
            raise ValueError("sample_budgets: a per-class budget_probs needs classes")
        rows = budget_probs[space.condition(classes, len(classes), budget_probs.device)]
    idx = torch.multinomial(rows.float().cpu(), 1, generator=generator)[:, 0]  # (B,)
    return (idx + 1) * space.tokens_per_iter


def estimate_budget_probs(budgets: torch.Tensor, space: TokenSpace, classes: torch.Tensor | None = None,
                          smoothing: float = 1.0) -> torch.Tensor:
    """Per-class budget frequencies ``(C + 1, n)`` (additively smoothed) from chosen budgets, e.g. by TSC.

    Row ``C`` (null class) pools every sample.
    """
    idx = space.budget_index(budgets.long()).cpu()
    cls = space.condition(classes, len(idx), torch.device("cpu"))
    counts = torch.full((space.num_classes + 1, space.num_budgets), float(smoothing))
    counts.index_put_((cls, idx), torch.ones(len(idx)), accumulate=True)
    if space.num_classes > 0:
        counts[space.null_class] = smoothing + torch.bincount(idx, minlength=space.num_budgets).float()
    return counts / counts.sum(-1, keepdim=True)


def draw_budgets(logits: torch.Tensor, space: TokenSpace, temperature: float = 1.0, max_budget: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Budgets ``(B,)`` drawn from a length model's logits ``(B, n)`` over ``space.budgets``.

    ``temperature`` sharpens (< 1) or flattens (> 1) the choice, 0 takes the most likely budget;
    ``max_budget`` forbids every budget above it (it must be one of the budgets). One uniform per row,
    drawn on the generator's device (as :func:`uniform`), so a CPU generator gives the same budgets on any
    model device.
    """
    if logits.ndim != 2 or logits.shape[1] != space.num_budgets:
        raise ValueError(f"budget logits must be (B, {space.num_budgets}), got {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"budget temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if max_budget is not None:
        if int(max_budget) not in space.budgets:
            raise ValueError(f"max budget {max_budget} is not one of {space.budgets}")
        allowed = torch.tensor(space.budgets, device=logits.device) <= int(max_budget)  # (n,)
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        idx = logits.argmax(-1)
    else:
        cdf = (logits / temperature).softmax(-1).cumsum(-1)  # (B, n)
        u = uniform(logits.shape[:1], logits.device, generator).clamp_min(1e-12) * cdf[:, -1]  # (B,)
        idx = torch.searchsorted(cdf, u[:, None].contiguous())[:, 0].clamp_max(space.num_budgets - 1)
    return (idx + 1) * space.tokens_per_iter


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """``0.5 * sum |p - q|`` of two distributions (or counts: each is normalised first)."""
    p, q = p.double(), q.double()
    if p.shape != q.shape or not float(p.sum()) > 0 or not float(q.sum()) > 0:
        raise ValueError(f"total_variation needs two non-empty distributions of one shape, got {tuple(p.shape)} "
                         f"and {tuple(q.shape)}")
    return float(0.5 * (p / p.sum() - q / q.sum()).abs().sum())

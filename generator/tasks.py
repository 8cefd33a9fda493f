"""Training either prior with the one training loop: token datasets, :class:`PriorTask`, loading, a baseline.

Data: :class:`TokenDataset` holds the tokenizer's code ids of N images at every budget
(``{budget: (N, budget)}``, e.g. from the token cache) and their labels. **Every image contributes
every budget**: item ``j`` is (image ``j % N``, budget ``budgets[j // N]``), so an epoch is
``N x n_budgets`` sequences and the trainer's shuffled batches mix budgets (and images) freely.
Items are padded to the longest budget; :func:`collate_tokens` trims a batch to its own longest.

**Data modes** (``mode``, with the cache's adaptive ``(ids, length)`` pairs, each image at the length its
reconstruction needed by token-count selection): ``all_budgets`` (the default, above), ``adaptive`` (one
item per image, at its TSC length) or ``mixture``: every all-budgets item plus
``round(w / (1 - w) * N * n_budgets)`` adaptive items cycling over the images, so a fraction
``w = adaptive_weight`` of the epoch's sequences are adaptive ones. Adaptive items carry a fourth field
``chosen`` (True: this length is the image's TSC choice), which is what the length model learns from.

Usage (tiny CPU run)::

    model = MaskGIT(maskgit_config("tiny", codebook_size=K, tokens_per_iter=8, num_budgets=2, num_classes=10))
    train, val = TokenDataset(ids_by_budget, labels).split(num_val=64)
    task = PriorTask(model, val)
    Trainer(TrainConfig(max_steps=300, batch_size=32, lr=1e-3), run_dir, task, train,
            collate_fn=collate_tokens).fit()        # writes run_dir/final (save_pretrained)
    prior = load_prior(run_dir / "final")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from tokenizer.core.trainer import Phase

from .ar import AR, AR_SIZES, ar_config, ar_loss, ar_nll
from .maskgit import MASKGIT_SIZES, MaskGIT, maskgit_config, maskgit_loss, maskgit_nll
from .tokens import NO_LABEL, PAD_ID, TokenBatch, estimate_budget_probs, lengths_to_mask
from .transformer import Prior, PriorLoss, cross_entropy_bits, read_pretrained_config

PRIORS: dict[str, type[Prior]] = {"maskgit": MaskGIT, "ar": AR}
CONFIGS = {"maskgit": maskgit_config, "ar": ar_config}
SIZES: dict[str, dict[str, dict[str, Any]]] = {"maskgit": MASKGIT_SIZES, "ar": AR_SIZES}  # size registries by kind


def build_prior(kind: str, size: str = "tiny", **overrides: Any) -> Prior:
    """A fresh prior: ``kind`` in ``PRIORS``, ``size`` in its size registry, config field overrides."""
    if kind not in PRIORS:
        raise ValueError(f"unknown prior kind '{kind}'; choose one of {sorted(PRIORS)}")
    return PRIORS[kind](CONFIGS[kind](size, **overrides))


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> Prior:
    """Load any prior written by ``save_pretrained`` (the kind is read from its config.json)."""
    kind = read_pretrained_config(path)["kind"]
    if kind not in PRIORS:
        raise ValueError(f"{path}: unknown prior kind '{kind}' (known: {sorted(PRIORS)})")
    return PRIORS[kind].from_pretrained(path, device)


# ============================================================================ data
IdArray = Any  # an (N, b) integer torch tensor, or an array-like of rows (generator.shards.ShardedArray, numpy)


def _rows(v: IdArray, index: Any) -> torch.Tensor:
    """Rows of an id array as a tensor (mapped arrays read just those rows)."""
    out = v[index]
    return out if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))


def _select(v: IdArray, images: torch.Tensor) -> IdArray:
    """The rows ``images`` of an id array: a lazy view of a mapped array, a copy of an in-memory one."""
    if torch.is_tensor(v):
        return v[images]
    return v.select(images) if hasattr(v, "select") else v[images.numpy()]


def _is_integer(v: IdArray) -> bool:
    dtype = v.dtype
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex)
    return bool(np.issubdtype(np.dtype(dtype), np.integer))


def _chunks(v: IdArray, max_elements: int = 1 << 22) -> Iterator[torch.Tensor]:
    """An id array in blocks of rows: a tensor whole, an array-like (mapped) a few MB at a time."""
    if torch.is_tensor(v):
        yield v
        return
    row = max(1, math.prod(tuple(v.shape)[1:]))
    step = max(1, max_elements // row)
    for start in range(0, len(v), step):
        yield _rows(v, slice(start, start + step))


def _min_max(v: IdArray) -> tuple[int, int] | None:
    """Smallest and largest id (None when empty), with no int64 copy of a mapped array."""
    if hasattr(v, "min_max"):
        return v.min_max()
    lo = hi = None
    for chunk in _chunks(v):
        if chunk.numel():
            lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
            hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
    return None if lo is None else (lo, hi)


DATA_MODES = ("all_budgets", "adaptive", "mixture")


class TokenDataset(Dataset):
    """Code ids of N images at several budgets; one item per (image, budget) (see the module docstring).

    Items are ``(ids (max_budget,) int64 padded with PAD, length () int64, label () int64)``; labels are
    ``NO_LABEL`` when none are given. Ids in tensors are stored in int16 when they fit (the ImageNet token
    cache at eight budgets is then ~3 GB instead of ~12 GB). Ids may also be memory-mapped arrays
    (:class:`generator.shards.ShardedArray`, e.g. from :func:`generator.shards.open_token_cache`): they are
    kept as they are, never copied, and each item reads its one row; :meth:`subset` and :meth:`split` of
    such a dataset are views holding an index of image rows.

    ``adaptive_ids (N, max_budget)`` (PAD beyond each length) and ``adaptive_lengths (N,)`` are the token
    cache's TSC choices; with them ``mode`` may be ``adaptive`` or ``mixture`` (module docstring), whose
    items are ``(ids, length, label, chosen () bool)``.
    """

    def __init__(self, ids_by_budget: dict[int, IdArray], labels: torch.Tensor | None = None,
                 adaptive_ids: IdArray | None = None, adaptive_lengths: torch.Tensor | None = None,
                 mode: str = "all_budgets", adaptive_weight: float = 0.5) -> None:
        if not ids_by_budget:
            raise ValueError("ids_by_budget is empty: pass {budget: LongTensor (N, budget)}")
        self.budgets = sorted(int(b) for b in ids_by_budget)
        sizes = {len(v) for v in ids_by_budget.values()}
        if len(sizes) != 1:
            raise ValueError(f"every budget must hold the same N images, got sizes {sorted(sizes)}")
        (self.num_images,) = sizes
        hi = 0
        for b, v in ids_by_budget.items():
            if len(v.shape) != 2 or v.shape[1] != b or not _is_integer(v):
                raise ValueError(f"ids_by_budget[{b}] must be an integer tensor (N, {b}), got {v.dtype} "
                                 f"{tuple(v.shape)}")
            bounds = _min_max(v)
            if bounds is not None:
                if bounds[0] < 0:
                    raise ValueError(f"ids_by_budget[{b}] holds negative ids; code ids are >= 0")
                hi = max(hi, bounds[1])
        dtype = torch.int16 if hi < 2**15 else torch.int32
        self.ids = {int(b): v.to(dtype).contiguous() if torch.is_tensor(v) else v for b, v in ids_by_budget.items()}
        if labels is None:
            labels = torch.full((self.num_images,), NO_LABEL, dtype=torch.long)
        if not torch.is_tensor(labels):
            labels = _rows(labels, slice(None))
        if labels.shape != (self.num_images,):
            raise ValueError(f"labels must have shape ({self.num_images},), got {tuple(labels.shape)}")
        self.labels = labels.long()
        self.max_len = max(self.budgets)
        self._set_adaptive(adaptive_ids, adaptive_lengths, dtype)
        self._set_mode(mode, adaptive_weight)

    def _set_adaptive(self, ids: IdArray | None, lengths: torch.Tensor | None, dtype: torch.dtype) -> None:
        if (ids is None) != (lengths is None):
            raise ValueError("pass adaptive_ids and adaptive_lengths together (both from the token cache)")
        self.adaptive_ids, self.adaptive_lengths = None, None
        if ids is None or lengths is None:
            return
        lengths = torch.as_tensor(lengths).long()
        if tuple(ids.shape) != (self.num_images, self.max_len) or not _is_integer(ids):
            raise ValueError(f"adaptive_ids must be an integer array (N, max budget) = ({self.num_images}, "
                             f"{self.max_len}), got {ids.dtype} {tuple(ids.shape)}")
        if lengths.shape != (self.num_images,):
            raise ValueError(f"adaptive_lengths must have shape ({self.num_images},), got {tuple(lengths.shape)}")
        bad = ~torch.isin(lengths, torch.tensor(self.budgets))
        if bool(bad.any()):
            raise ValueError(f"adaptive length {int(lengths[bad][0])} is not one of the budgets {self.budgets}")
        self.adaptive_ids = ids.to(dtype).contiguous() if torch.is_tensor(ids) else ids
        self.adaptive_lengths = lengths

    def _set_mode(self, mode: str, weight: float) -> None:
        if mode not in DATA_MODES:
            raise ValueError(f"unknown data mode {mode!r}; choose one of {list(DATA_MODES)}")
        if mode != "all_budgets" and self.adaptive_lengths is None:
            raise ValueError(f"data mode {mode!r} needs the token cache's adaptive ids and lengths: tokenize with "
                             "`alit tokenize --adaptive-threshold 0.07`, or use data_mode=all_budgets")
        if mode == "mixture" and not 0 < weight < 1:
            raise ValueError(f"adaptive_weight must be in (0, 1) for data_mode=mixture, got {weight}")
        self.mode, self.adaptive_weight = mode, float(weight)
        self.num_all = 0 if mode == "adaptive" else self.num_images * len(self.budgets)  # all-budgets items
        if mode == "all_budgets":
            self.num_adaptive = 0
        elif mode == "adaptive":
            self.num_adaptive = self.num_images
        else:
            self.num_adaptive = max(1, round(weight / (1 - weight) * self.num_all))

    @property
    def has_adaptive(self) -> bool:
        """Whether the dataset holds the TSC-chosen (ids, length) pairs."""
        return self.adaptive_lengths is not None

    def __len__(self) -> int:
        return self.num_all + self.num_adaptive

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        if index >= self.num_all:
            image = (index - self.num_all) % self.num_images
            b = int(self.adaptive_lengths[image])  # type: ignore[index]
            ids = torch.full((self.max_len,), PAD_ID, dtype=torch.long)
            ids[:b] = _rows(self.adaptive_ids, image)[:b]
            return ids, torch.tensor(b), self.labels[image], torch.tensor(True)
        image, b = index % self.num_images, self.budgets[index // self.num_images]
        ids = torch.full((self.max_len,), PAD_ID, dtype=torch.long)
        ids[:b] = _rows(self.ids[b], image)
        if self.mode == "all_budgets":
            return ids, torch.tensor(b), self.labels[image]
        return ids, torch.tensor(b), self.labels[image], torch.tensor(False)

    def subset(self, images: torch.Tensor) -> TokenDataset:
        """The dataset of the given image indices (all budgets); of a mapped dataset, a view (no ids copied)."""
        images = torch.as_tensor(images)
        adaptive = (None, None)
        if self.adaptive_ids is not None and self.adaptive_lengths is not None:
            adaptive = (_select(self.adaptive_ids, images), self.adaptive_lengths[images])
        return TokenDataset({b: _select(v, images) for b, v in self.ids.items()}, self.labels[images], *adaptive,
                            mode=self.mode, adaptive_weight=self.adaptive_weight)

    def split(self, num_val: int, seed: int = 0) -> tuple[TokenDataset, TokenDataset]:
        """``(train, val)`` by image (an image's budgets never straddle the split), seeded."""
        if not 0 < num_val < self.num_images:
            raise ValueError(f"num_val must be in [1, {self.num_images - 1}], got {num_val}")
        perm = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(seed))
        return self.subset(perm[num_val:].sort().values), self.subset(perm[:num_val].sort().values)

    def budget_batches(self, batch_size: int) -> Iterator[tuple[int, TokenBatch]]:
        """Unpadded batches ``(budget, TokenBatch)`` in a fixed order: budget by budget, images in order."""
        for b in self.budgets:
            for start in range(0, self.num_images, batch_size):
                ids = _rows(self.ids[b], slice(start, start + batch_size)).long()  # (B, b)
                yield b, TokenBatch(ids, torch.full((len(ids),), b), self.labels[start: start + batch_size])

    def adaptive_batches(self, batch_size: int) -> Iterator[TokenBatch]:
        """The TSC-chosen ``(ids, length)`` pairs in image order, padded to each batch's longest."""
        if self.adaptive_ids is None or self.adaptive_lengths is None:
            raise ValueError("this dataset holds no adaptive ids (pass adaptive_ids and adaptive_lengths)")
        for start in range(0, self.num_images, batch_size):
            lengths = self.adaptive_lengths[start: start + batch_size]
            n = int(lengths.max())
            ids = _rows(self.adaptive_ids, slice(start, start + batch_size))[:, :n].long()  # (B, n)
            ids = ids.masked_fill(~lengths_to_mask(lengths, n), PAD_ID)
            yield TokenBatch(ids, lengths, self.labels[start: start + batch_size])


def collate_tokens(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack items into ``(ids (B, L), lengths (B,), labels (B,))`` trimmed to the batch's longest sequence
    (and ``chosen (B,)`` bool when the items carry it: adaptive or mixture data).

    A plain tuple (the trainer rebuilds batches with ``type(batch)(...)`` when moving them to the device).
    """
    ids, lengths, *rest = (torch.stack(x) for x in zip(*items))
    return (ids[:, : int(lengths.max())], lengths, *rest)


# ============================================================================ baseline
def unigram_bits_per_token(train_ids: IdArray | Iterable[IdArray], val_ids: IdArray | Iterable[IdArray],
                           codebook_size: int) -> float:
    """Bits per validation token under add-one smoothed code frequencies of the training tokens.

    Ids may be tensors of any shape, mapped id arrays, or iterables of them (e.g. ``ids_by_budget.values()``);
    negative ids (PAD) are ignored. Tokens are counted block by block: a mapped cache is never copied whole.
    """
    def counts(x: IdArray | Iterable[IdArray]) -> torch.Tensor:
        total = torch.zeros(codebook_size, dtype=torch.long)
        arrays = [x] if torch.is_tensor(x) or hasattr(x, "shape") else list(x)
        for a in arrays:
            for chunk in _chunks(a):
                t = chunk.reshape(-1)
                t = t[t >= 0]
                if not t.numel():
                    continue
                if int(t.max()) >= codebook_size:
                    raise ValueError(f"an id ({int(t.max())}) is >= codebook_size={codebook_size}")
                total += torch.bincount(t.long(), minlength=codebook_size)
        return total

    train = counts(train_ids).double() + 1  # add-one
    logp = (train / train.sum()).log2()
    val = counts(val_ids)
    if not int(val.sum()):
        raise ValueError("val_ids holds no tokens")
    return float(-(val.double() * logp).sum() / val.sum())


# ============================================================================ the length model
@torch.no_grad()
def length_nll(model: Prior, lengths: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Bits ``(B,)`` of each budget under the prior's length model ``p(budget | class)``."""
    logits = model.budget_logits(classes, len(lengths))  # (B, n)
    return cross_entropy_bits(logits, model.space.budget_index(lengths.to(logits.device)))


def histogram_length_bits(train_lengths: torch.Tensor, train_labels: torch.Tensor | None,
                          val_lengths: torch.Tensor, val_labels: torch.Tensor | None, space: Any) -> float:
    """Held-out bits per image of the histogram baseline (add-one per-class TSC frequencies of the training
    split, :func:`generator.tokens.estimate_budget_probs`) on the validation split's TSC lengths."""
    probs = estimate_budget_probs(train_lengths, space, train_labels)  # (C + 1, n)
    rows = space.condition(val_labels, len(val_lengths), torch.device("cpu"))
    p = probs[rows, space.budget_index(val_lengths.long())]
    return float(-p.log2().mean())


# ============================================================================ the task
def _maskgit_bits(model: Prior, batch: TokenBatch, steps: int | None, generator: torch.Generator) -> torch.Tensor:
    return maskgit_nll(model, *batch, steps=steps, generator=generator)  # type: ignore[arg-type]


def _ar_bits(model: Prior, batch: TokenBatch, steps: int | None, generator: torch.Generator) -> torch.Tensor:
    return ar_nll(model, *batch)  # type: ignore[arg-type]  # exact: no decoding steps, no randomness


LOSS_FNS: dict[str, Callable[..., PriorLoss]] = {"maskgit": maskgit_loss, "ar": ar_loss}
BITS_FNS: dict[str, Callable[..., torch.Tensor]] = {"maskgit": _maskgit_bits, "ar": _ar_bits}


class PriorTask:
    """The :class:`~tokenizer.core.trainer.Task` of either prior: one module and optimizer, ``"model"``.

    ``evaluate`` returns held-out bits per token (overall and per budget) on ``val_set``: exact for the AR
    prior, the random-order decoding code length for MaskGIT with ``maskgit_eval_steps`` forwards per
    batch (revealing ``len / steps`` tokens per step, linearly; ``None`` = one token per step, the tightest
    value but ``len`` forwards). The MaskGIT orders come from ``eval_seed``, so every evaluation sees the
    same ones. Scores are conditional on the true labels (unlabelled = null class).
    ``packed=True`` trains on packed sequences (pays off only with xformers on CUDA; see
    :mod:`generator.transformer`).
    """

    def __init__(self, model: Prior, val_set: TokenDataset | None = None, eval_batch_size: int = 64,
                 eval_seed: int = 0, maskgit_eval_steps: int | None = 32, packed: bool = False) -> None:
        if model.kind not in PRIORS:
            raise ValueError(f"PriorTask trains {sorted(PRIORS)} priors, got kind '{model.kind}'")
        if val_set is not None:
            unknown = [b for b in val_set.budgets if b not in model.space.budgets]
            if unknown:
                raise ValueError(f"validation budgets {unknown} are not budgets of the model "
                                 f"({model.space.budgets}); check tokens_per_iter/num_budgets")
        self.model, self.val_set = model, val_set
        self.eval_batch_size, self.eval_seed = eval_batch_size, eval_seed
        self.maskgit_eval_steps, self.packed = maskgit_eval_steps, packed

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.parameters())}

    def train_step(self, batch: tuple[torch.Tensor, ...], step: int) -> Iterator[Phase]:
        """One phase: the prior's loss on ``(ids, lengths, labels[, chosen])`` from :func:`collate_tokens`
        (with ``chosen`` and a length model, the length model's loss on the TSC-chosen rows is added)."""
        ids, lengths, classes, *rest = batch
        chosen = rest[0] if rest else None
        out = LOSS_FNS[self.model.kind](self.model, ids, lengths, classes, packed=self.packed, chosen=chosen)
        logs = {"accuracy": out.accuracy, "tokens": out.num_tokens.float()}
        if out.length_loss is not None:
            logs["length_loss"] = out.length_loss
        yield Phase("model", out.loss, logs)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        if self.val_set is None:
            return {}
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.eval_seed)
        bits: dict[int, float] = {}
        tokens: dict[int, int] = {}
        was_training = model.training
        model.eval()  # no dropout while scoring; the mode is restored below
        try:
            for b, batch in self.val_set.budget_batches(self.eval_batch_size):
                batch = TokenBatch(*(t.to(device) for t in batch))
                seq_bits = BITS_FNS[model.kind](model, batch, self.maskgit_eval_steps, generator)  # (B,)
                bits[b] = bits.get(b, 0.0) + float(seq_bits.sum())
                tokens[b] = tokens.get(b, 0) + int(batch.lengths.sum())
        finally:
            model.train(was_training)
        out = {"bits_per_token": sum(bits.values()) / sum(tokens.values())}
        out.update({f"bits_per_token/{b}": bits[b] / tokens[b] for b in sorted(bits)})
        out["perplexity"] = math.pow(2.0, out["bits_per_token"])
        if self.val_set.has_adaptive:
            out.update(self.adaptive_bits(model, device, generator))
        return out

    def adaptive_bits(self, model: nn.Module, device: torch.device, generator: torch.Generator) -> dict[str, float]:
        """Held-out bits of the TSC-chosen pairs: the ids at their chosen lengths (``bits_per_token/adaptive``)
        and, with a length model, the length choice (``length_bits`` per image, ``length_bits_per_token`` =
        those bits over the same ids' token count, to read beside the ids' bits/token)."""
        assert self.val_set is not None
        ids_bits = length_bits = 0.0
        tokens = images = 0
        was_training = model.training
        model.eval()
        try:
            for batch in self.val_set.adaptive_batches(self.eval_batch_size):
                batch = TokenBatch(*(t.to(device) for t in batch))
                ids_bits += float(BITS_FNS[model.kind](model, batch, self.maskgit_eval_steps, generator).sum())
                if model.has_length_model:  # type: ignore[union-attr]
                    length_bits += float(length_nll(model, batch.lengths, batch.classes).sum())  # type: ignore[arg-type]
                tokens += int(batch.lengths.sum())
                images += len(batch.lengths)
        finally:
            model.train(was_training)
        out = {"bits_per_token/adaptive": ids_bits / tokens}
        if model.has_length_model:  # type: ignore[union-attr]
            out.update({"length_bits": length_bits / images, "length_bits_per_token": length_bits / tokens})
        return out

    def export(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)

"""The transformer shared by both priors: pre-LN blocks, a KV cache, the prior config and checkpoint I/O.

Conditioning is a *prefix*: the class and the budget are two embedded tokens in front of the code
slots (``[class, budget, x_0, ..., x_{L-1}]``). One mechanism serves both priors (the AR prior needs
a prefix anyway to predict ``x_0``), the blocks stay plain pre-LN blocks, and the class/budget are
visible to every slot through attention. Padded batches pass ``key_mask`` (MaskGIT; the AR prior is
causal, so padding that follows the real slots is never attended). Packed batches (``seqlens``) run
the real tokens of all sequences as one row: on CUDA with xformers that is its block-diagonal kernel
with no compute spent on padding, elsewhere a dense block mask; either way the result equals the padded
path. Without xformers packing costs more than padding (SDPA then attends over the whole packed row:
maskgit_b, 64 mixed-budget sequences, H200, bf16: 85 ms per training step padded, 183 ms packed), so
padding is the default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from tokenizer.core.attention import attention
from tokenizer.core.checkpoint import CheckpointError, load_module_state, load_tensors, verify_checkpoint
from tokenizer.core.config import from_dict, to_dict
from tokenizer.core.pretrained import CONFIG_FILE, WEIGHTS_FILE, save_model_dir

from .tokens import TokenSpace

MODEL_NAME = "Prior"  # config.json 'model' (directories written before the one format have none; still read)
FORMAT_VERSION = 1  # of a saved prior directory; a newer one is refused


# ============================================================================ config
@dataclass
class PriorConfig:
    """Model-only settings shared by the MaskGIT and AR priors (stored with every checkpoint)."""

    codebook_size: int = 4096  # K: the tokenizer's codebook size (code ids are [0, K))
    tokens_per_iter: int = 32  # tpi: budgets are tpi, 2 tpi, ..., num_budgets * tpi
    num_budgets: int = 8  # n: number of budgets (ALIT iterations)
    num_classes: int = 0  # C: class-conditional over [0, C); 0 = unconditional
    class_dropout: float = 0.1  # training: probability of replacing the class by the null class (CFG)
    width: int = 768  # transformer width
    depth: int = 12  # transformer blocks
    heads: int = 12  # attention heads (width must divide by it)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    dropout: float = 0.0  # dropout on attention/MLP outputs and embeddings
    length_model: bool = False  # a budget head on the class token: p(budget | class) (see Prior.budget_logits)

    def __post_init__(self) -> None:
        self.token_space()  # validates codebook_size, tokens_per_iter, num_budgets, num_classes
        if self.width < 1 or self.depth < 1 or self.heads < 1:
            raise ValueError(f"width, depth and heads must be >= 1, got {self.width}, {self.depth}, {self.heads}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads}); change either")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    def token_space(self) -> TokenSpace:
        """The code ids, special ids and budgets of this prior."""
        return TokenSpace(self.codebook_size, self.tokens_per_iter, self.num_budgets, self.num_classes)


# ============================================================================ KV cache
@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, per layer: ``(B, H, max_len, D)`` each.

    Static: each layer's buffers are allocated once, at the first :meth:`update` (device and dtype from
    the keys, so autocast's dtype is kept), and never grow. A forward over ``n`` new positions writes them
    in place at ``[length, length + n)`` in every layer and attends over the filled prefix
    ``[0, length + n)`` (a view: nothing is copied, no mask covers the empty tail); then :meth:`advance`
    moves ``length`` on. :meth:`Transformer.step` is the one-position fast path. The batch order is fixed
    for the cache's life.
    """

    max_len: int  # positions the cache can hold (prefix + slots)
    length: int = 0  # positions already cached
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, H, max_len, D)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``k, v (B, H, n, D)``; return all cached ones ``(B, H, length + n, D)``."""
        n = k.shape[2]
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {n} positions > max_len={self.max_len}")
        if layer not in self.keys:
            b, h, _, d = k.shape
            self.keys[layer] = k.new_zeros(b, h, self.max_len, d)
            self.values[layer] = v.new_zeros(b, h, self.max_len, d)
        self.keys[layer][:, :, self.length: self.length + n] = k
        self.values[layer][:, :, self.length: self.length + n] = v
        end = self.length + n
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as cached (after every layer has been updated)."""
        self.length += n

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's whole ``(B, H, max_len, D)`` key and value buffers (after its first :meth:`update`)."""
        if layer not in self.keys:
            raise ValueError(f"KV cache: layer {layer} holds nothing yet; run the prefix through the "
                             "transformer with this cache first")
        return self.keys[layer], self.values[layer]


# ============================================================================ blocks
class SelfAttention(nn.Module):
    """Multi-head self-attention through the project's one ``attention`` function."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, seqlens: list[int] | None, causal: bool,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)  # 3 x (B,H,N,D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, cached + N, D)
        # one query at the last position sees every key: no causal mask to build
        causal = causal and q.shape[2] > 1
        out = attention(q, k, v, key_mask=key_mask, seqlens=seqlens, causal=causal)  # (B, H, N, D)
        return self.drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))  # (B, N, W)

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int) -> torch.Tensor:
        """One new position per row, eval mode: ``x (B, W)`` -> ``(B, W)``; its key and value are written in
        place at ``pos`` of ``keys, values (B, H, max_len, D)``, attention runs over ``[0, pos]``."""
        b = x.shape[0]
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).view(b, 3, self.heads, 1, -1).unbind(1)  # (B,H,1,D)
        keys[:, :, pos: pos + 1] = k
        values[:, :, pos: pos + 1] = v
        out = attention(q, keys[:, :, : pos + 1], values[:, :, : pos + 1])  # (B, H, 1, D)
        return F.linear(out.reshape(b, -1), self.proj.weight, self.proj.bias)  # (B, W)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, seqlens: list[int] | None, causal: bool,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask, seqlens, causal, cache, layer)
        return x + self.mlp(self.norm2(x))

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int) -> torch.Tensor:
        """:meth:`forward` for one new position, eval mode (no dropout): ``x (B, W)`` -> ``(B, W)``; the same
        weights through functional calls (per-module call overhead dominates one position of a small model)."""
        n1, n2, fc1, fc2 = self.norm1, self.norm2, self.mlp[0], self.mlp[2]
        x = x + self.attn.step(F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps), keys, values, pos)
        h = F.layer_norm(x, n2.normalized_shape, n2.weight, n2.bias, n2.eps)
        return x + F.linear(F.gelu(F.linear(h, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)  # (B, W)


class Transformer(nn.Module):
    """A stack of :class:`Block` followed by a final LayerNorm; ``(B, N, W) -> (B, N, W)``."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, *, key_mask: torch.Tensor | None = None, seqlens: list[int] | None = None,
                causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        """``key_mask`` bool (B, N) for padded batches, ``seqlens`` for a packed (1, sum, W) batch, ``cache``
        for incremental causal decoding (``x`` then holds only the new positions)."""
        if cache is not None and (key_mask is not None or seqlens is not None):
            raise ValueError("the KV cache serves unpadded causal decoding: pass neither key_mask nor seqlens")
        for i, block in enumerate(self.blocks):
            x = block(x, key_mask, seqlens, causal, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Causal decoding of one new position per row: ``x (B, W)`` (embedded) -> ``(B, W)``, equal to
        ``forward(x[:, None], causal=True, cache=cache)[:, 0]`` in eval mode. Writes the position in place
        into the cache's static buffers (which an earlier ``forward`` with this cache allocated: the prefix)
        and advances it."""
        if self.training:
            raise ValueError("Transformer.step is eval-mode decoding (no dropout): call model.eval() or use "
                             "forward(..., cache=cache)")
        pos = cache.length
        if pos >= cache.max_len:
            raise ValueError(f"KV cache overflow: {pos} + 1 positions > max_len={cache.max_len}")
        for i, block in enumerate(self.blocks):
            x = block.step(x, *cache.buffers(i), pos)
        cache.advance(1)
        return F.layer_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)


# ============================================================================ packing
def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``x (B, N, W)`` with a bool ``(B, N)`` mask of left-aligned real positions -> ``(1, sum, W)`` and seqlens."""
    return x[mask][None], mask.sum(1).tolist()  # (1, S, W)


def unpack(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(1, S, W) -> (B, N, W)``, zeros at padded positions."""
    out = x.new_zeros(*mask.shape, x.shape[-1])  # (B, N, W)
    out[mask] = x[0]
    return out


# ============================================================================ the shared prior body
M = TypeVar("M", bound="Prior")


class Prior(nn.Module):
    """Embeddings (code ids, slot positions, class, budget) + :class:`Transformer` + a linear head to K logits.

    The base of :class:`~generator.maskgit.MaskGIT` and :class:`~generator.ar.AR`, which add ``forward``.
    """

    PREFIX: ClassVar[int] = 2  # [class, budget]
    kind: ClassVar[str]  # "maskgit" or "ar", stored in config.json
    config_class: ClassVar[type[PriorConfig]]

    def __init__(self, cfg: PriorConfig, input_vocab: int) -> None:
        super().__init__()
        self.config = cfg
        self.space = cfg.token_space()
        self.tok_emb = nn.Embedding(input_vocab, cfg.width)
        self.pos_emb = nn.Parameter(torch.zeros(self.space.max_budget, cfg.width))  # one per slot
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.width)  # last row: null class
        self.budget_emb = nn.Embedding(cfg.num_budgets, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.head = nn.Linear(cfg.width, cfg.codebook_size)
        self._init_weights(cfg.depth)
        # registered after the init above, so a prior without a length model is initialised as before
        self.budget_head = nn.Linear(cfg.width, cfg.num_budgets) if cfg.length_model else None
        if self.budget_head is not None:
            nn.init.zeros_(self.budget_head.weight)  # uniform over budgets at init
            nn.init.zeros_(self.budget_head.bias)

    def _init_weights(self, depth: int) -> None:
        """All initialisation in one place: N(0, 0.02), residual projections scaled by 1/sqrt(2 depth)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        for block in self.transformer.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.02 / (2 * depth) ** 0.5)
            nn.init.normal_(block.mlp[2].weight, std=0.02 / (2 * depth) ** 0.5)
        nn.init.zeros_(self.head.weight)  # uniform predictions at init

    def embed_prefix(self, classes: torch.Tensor | None, budgets: torch.Tensor) -> torch.Tensor:
        """The ``[class, budget]`` prefix: ``(B, 2, W)`` (classes validated, None/NO_LABEL = null)."""
        bud = self.space.budget_index(budgets)  # (B,)
        cond = self.space.condition(classes, len(bud), bud.device)
        return torch.stack([self.class_emb(cond), self.budget_emb(bud)], 1)  # (B, 2, W)

    def embed_slots(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``ids (B, N)`` at slots ``start..start+N`` -> ``(B, N, W)``; PAD (negative) is embedded as id 0
        (its outputs must be ignored by the caller)."""
        return self.tok_emb(ids.clamp_min(0)) + self.pos_emb[start: start + ids.shape[1]]  # (B, N, W)

    def embed(self, ids: torch.Tensor, classes: torch.Tensor | None, budgets: torch.Tensor) -> torch.Tensor:
        """``[class, budget, ids...]`` embedded: ``ids (B, N)`` -> ``(B, 2 + N, W)``."""
        return self.drop(torch.cat([self.embed_prefix(classes, budgets.to(ids.device)), self.embed_slots(ids)], 1))

    # ------------------------------------------------------------------ the length model
    @property
    def has_length_model(self) -> bool:
        """Whether this prior chooses budgets itself (``config.length_model``)."""
        return self.budget_head is not None

    def require_length_model(self) -> nn.Linear:
        if self.budget_head is None:
            raise ValueError(f"this {self.kind} prior has no length model (length_model=false: trained with "
                             "data_mode=all_budgets): draw budgets from the token cache's TSC histogram "
                             "(--length-model histogram) or retrain it with data_mode=adaptive|mixture")
        return self.budget_head

    def budget_logits(self, classes: torch.Tensor | None, batch: int | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """``p(budget | class)``: logits ``(B, n)`` over ``space.budgets`` from the class token alone.

        The length model is a linear head on the transformer's output at the class token of a class-only
        sequence ``[class]``. For the AR prior that *is* position 0 of its causal forward (the class token
        sees only itself), so training reads it from the same forward and decoding emits the budget token
        first, then the ids; with a ``cache`` the class position is stored for the decoding that follows.
        MaskGIT's attention is bidirectional (its class token sees the budget and the ids), so it runs this
        one-token sequence separately: one token per sequence, the same class embedding and transformer.
        This design, rather than a separate tiny categorical model, keeps one length model for both kinds
        and lets the head share what the transformer learns about each class.
        """
        head = self.require_length_model()
        n = batch if batch is not None else (len(classes) if classes is not None else None)
        if n is None:
            raise ValueError("budget_logits: pass classes or batch")
        device = self.class_emb.weight.device
        cond = self.space.condition(classes, n, device)
        h = self.transformer(self.drop(self.class_emb(cond)[:, None]), causal=True, cache=cache)  # (B, 1, W)
        return head(h[:, 0])  # (B, n)

    def run(self, x: torch.Tensor, mask: torch.Tensor, causal: bool, packed: bool) -> torch.Tensor:
        """The transformer over ``x (B, N, W)`` with real positions ``mask (B, N)``, padded or packed."""
        if packed:
            xp, seqlens = pack(x, mask)  # (1, S, W)
            return unpack(self.transformer(xp, seqlens=seqlens, causal=causal), mask)  # (B, N, W)
        # causal attention never looks at later (padded) keys, so only the bidirectional case needs the mask
        return self.transformer(x, key_mask=None if causal else mask, causal=causal)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the one model-directory format (``tokenizer.core.pretrained``) atomically; returns it."""
        return save_model_dir(out_dir, MODEL_NAME, FORMAT_VERSION, to_dict(self.config), self.state_dict(),
                              extra={"kind": self.kind})

    @classmethod
    def from_pretrained(cls: type[M], path: str | Path, device: str | torch.device = "cpu") -> M:
        """Rebuild the model from its config and load its weights (eval mode)."""
        meta = read_pretrained_config(path)
        if meta["kind"] != cls.kind:
            raise CheckpointError(f"{path} holds a '{meta['kind']}' prior, not '{cls.kind}'; load it with "
                                  "generator.tasks.load_prior")
        verify_checkpoint(path)  # truncated or modified files are refused, naming the file
        try:
            config = from_dict(cls.config_class, meta["config"])  # type: ignore[attr-defined]
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{Path(path) / CONFIG_FILE}: invalid {cls.kind} config ({e})") from None
        model = cls(config)  # type: ignore[call-arg]
        load_module_state(model, load_tensors(Path(path) / WEIGHTS_FILE), str(Path(path) / WEIGHTS_FILE))
        return model.to(device).eval()


# ============================================================================ helpers
@dataclass
class PriorLoss:
    """A training loss of either prior, with what the trainer logs."""

    loss: torch.Tensor  # scalar, mean cross-entropy (nats) over the scored tokens
    accuracy: torch.Tensor  # scalar, top-1 accuracy on the scored tokens
    num_tokens: torch.Tensor  # scalar int64: tokens scored (masked ones for MaskGIT, all real ones for AR)
    length_loss: torch.Tensor | None = None  # scalar: the length model's cross-entropy (nats per sequence)


def length_loss(budget_logits: torch.Tensor, lengths: torch.Tensor, chosen: torch.Tensor,
                space: TokenSpace) -> torch.Tensor:
    """Mean cross-entropy (nats) of the length model over the sequences whose length is a TSC choice
    (``chosen (B,)`` bool); 0 (with a graph, so every rank's parameters get a gradient) when there are none."""
    ce = F.cross_entropy(budget_logits.float(), space.budget_index(lengths), reduction="none")  # (B,)
    chosen = chosen.to(ce.dtype)
    return (ce * chosen).sum() / chosen.sum().clamp_min(1.0)


def read_pretrained_config(path: str | Path) -> dict[str, Any]:
    """``{"kind": ..., "format_version": ..., "config": {...}}`` of a ``save_pretrained`` directory."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: pass a directory written by save_pretrained (e.g. <run>/final)")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}): a truncated or damaged prior config") from None
    if not isinstance(meta, dict) or "kind" not in meta or "config" not in meta \
            or meta.get("model", MODEL_NAME) != MODEL_NAME:
        raise CheckpointError(f"{file} is not a prior config (needs 'kind' and 'config')")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{file} has format version {version}; this code reads up to {FORMAT_VERSION}: "
                              "update alit-stack")
    return meta


def cross_entropy_bits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-element cross-entropy in bits: ``logits (..., K)``, ``targets (...)`` -> ``(...)`` (fp32)."""
    ce = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none")
    return ce.view(targets.shape) / math.log(2)

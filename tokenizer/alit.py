"""ALIT: the recurrent adaptive-length image tokenizer (Duggal et al., ICLR 2025) and its index-level API.

Two modules, readable top to bottom:

- :class:`ALIT` is the recurrent latent-distillation network alone. It reads images and the base
  tokenizer's continuous features and returns, per supervised iteration, logits over the base codebook
  (plus the latent codes, their ids and the VQ loss). It holds no base tokenizer, so the trainer decides
  whether the base is frozen (stage 1) or trained (stage 2).
- :class:`ALITTokenizer` pairs an :class:`ALIT` (``.alit``) with its base 2D tokenizer (``.base``, a
  ``tokenizer.vq.BaseVQ``) and is the contract of the priors and samplers: ``encode(images, budget)``,
  ``decode(ids)``, ``encode_adaptive(images, threshold)``, ``budgets``, ``save_pretrained`` /
  ``from_pretrained``.

Axis letters and the token space (written once, used in every shape comment):

- ``B`` batch, ``G`` base grid side, ``N = G*G`` grid cells, ``W`` width, ``T`` tokens per iteration,
  ``t`` an iteration (0-based), ``k = (t+1)*T`` latent tokens after iteration ``t``, ``D`` latent code dim,
  ``Kb`` base codebook size, ``Cb`` base code dim.
- Latent ids are in ``[0, codebook_size)``; :data:`PAD_ID` (-1) pads the variable-length codes of
  :meth:`ALITTokenizer.encode_adaptive` (``(ids, lengths)``; :func:`lengths_to_mask` gives the mask).
- Budgets are ``T, 2T, ..., num_iters*T``. The ``k``-token code comes from running ``k/T`` iterations
  and taking *all* latents at that point: every budget is its own sequence, the ``2T`` code is not the
  ``T`` code extended.
- Encoder sequence: ``[class (1); 2D tokens (N); latents (k)]``. Decoder sequence:
  ``[class (1); grid mask tokens (N); latents (k)]``.

Parameter names mirror the public checkpoint (``official-alit-small-keys.tsv``), so the public ``small``
config builds a state dict with exactly its keys and shapes (base tokenizer aside).

Fixes over the public code: halting is deterministic (a threshold, no Bernoulli sampling) and never
runs after the last iteration; ``encode`` runs only the iterations its budget needs; budgets are chosen
per image; supervising iteration ``t`` runs exactly ``t+1`` encoder iterations; no CUDA-only code.
"""

from __future__ import annotations

import json
import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .core.attention import attention
from .core.checkpoint import CheckpointError
from .core.config import from_dict, to_dict
from .core.pretrained import CONFIG_FILE, load_weights, read_model_meta, save_model_dir

PAD_ID = -1  # pads variable-length id sequences (encode_adaptive)
MODEL_NAME = "ALITTokenizer"
FORMAT_VERSION = 2  # 2: the public function (channel order, [0, 1] RGB branch, LayerNorm placement, halting)
LEGACY_FORMAT = "alit-tokenizer"  # format 1 (config.json 'format' key): an earlier function, refused with a reason
BASE_DIR = "base"


# ============================================================================ configuration
@dataclass
class ALITConfig:
    """Model-only configuration of ALIT; stored with every checkpoint, so a checkpoint rebuilds its model.

    Every configuration the public constructor accepts has a value here (encoder and decoder widths,
    depths and heads set separately; patch size; tokens per iteration; iterations; latent codebook
    size and dimension; base embedding dimension). Deliberate deviations from the public code are
    switches: ``halting_sample`` (off: deterministic halting), ``reinject_2d`` (off: carried 2D tokens,
    as the public code).
    """

    width: int = 512  # encoder width W (the public encoder_width)
    depth: int = 8  # encoder layers
    heads: int = 8  # encoder attention heads; width must be divisible by heads
    decoder_width: int | None = None  # decoder width; None = width
    decoder_depth: int | None = None  # decoder layers; None = depth
    decoder_heads: int | None = None  # decoder heads; None = heads
    decoder_max_tokens: int = 256  # rows of decoder.latent_token_positional_embedding (the public code: 256)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * width
    tokens_per_iter: int = 32  # T: new latent tokens per iteration
    num_iters: int = 8  # iterations; the largest budget is num_iters * tokens_per_iter
    codebook_size: int = 4096  # latent codebook entries (shared by all iterations)
    code_dim: int = 12  # latent code dimension D
    commitment_beta: float = 0.25  # VQ commitment weight
    halting: bool = True  # dynamic halting: cells whose true base index has p >= threshold are masked
    halting_threshold: float = 0.55  # p(ground-truth base index) at or above which a cell halts
    halting_sample: bool = False  # training only: also draw Bernoulli(p), as the public code (off: deterministic)
    reinject_2d: bool = False  # each iteration reads the embedded 2D tokens afresh (False = carried, as public)
    init_std: float = 0.02  # std of the (truncated normal) Linear/Conv init; 0.02 as the public code
    dead_code_threshold: float = 0.0  # training: restart codes whose usage EMA (per call) falls below; 0 = off
    patch_size: int = 16  # pixel patch of the RGB 2D-token branch (= image_size / base_grid)
    base_grid: int = 16  # G: side of the base tokenizer's token grid (copied from the base config)
    base_code_dim: int = 256  # Cb: base feature/code channels (copied from the base config)
    base_codebook_size: int = 1024  # Kb: base codebook entries, the decoder's classes (from the base config)

    def __post_init__(self) -> None:
        positive = ("width", "depth", "heads", "tokens_per_iter", "num_iters", "codebook_size", "code_dim",
                    "patch_size", "base_grid", "base_code_dim", "base_codebook_size", "decoder_max_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"alit.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("decoder_width", "decoder_depth", "decoder_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"alit.{name} must be >= 1 or null (= the encoder's), got {getattr(self, name)}")
        for w, h, part in ((self.width, self.heads, ""), (self.dec_width, self.dec_heads, "decoder_")):
            if w % h:
                raise ValueError(f"alit.{part}width ({w}) must be divisible by alit.{part}heads ({h})")
        if self.width <= self.base_code_dim:
            raise ValueError(f"alit.width ({self.width}) must exceed alit.base_code_dim ({self.base_code_dim}): "
                             "the 2D tokens are the base features plus width - base_code_dim RGB channels; "
                             "raise the width")
        if self.decoder_max_tokens < self.max_tokens:
            raise ValueError(f"alit.decoder_max_tokens ({self.decoder_max_tokens}) must be >= the largest budget "
                             f"({self.max_tokens} = num_iters * tokens_per_iter)")
        if self.mlp_ratio <= 0:
            raise ValueError(f"alit.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.dead_code_threshold < 0:
            raise ValueError(f"alit.dead_code_threshold must be >= 0 (0 = off), got {self.dead_code_threshold}")
        if not 0 < self.init_std < 1:
            raise ValueError(f"alit.init_std must be in (0, 1), got {self.init_std}")
        if self.commitment_beta < 0:
            raise ValueError(f"alit.commitment_beta must be >= 0, got {self.commitment_beta}")
        if not 0.0 <= self.halting_threshold <= 1.0:
            raise ValueError(f"alit.halting_threshold is a probability in [0, 1], got {self.halting_threshold}")

    @property
    def image_size(self) -> int:
        """Input image side in pixels."""
        return self.patch_size * self.base_grid

    @property
    def num_cells(self) -> int:
        """N = base_grid ** 2 grid cells."""
        return self.base_grid * self.base_grid

    @property
    def max_tokens(self) -> int:
        """The largest budget, num_iters * tokens_per_iter."""
        return self.num_iters * self.tokens_per_iter

    @property
    def budgets(self) -> tuple[int, ...]:
        """Valid token budgets: T, 2T, ..., num_iters*T."""
        return tuple(self.tokens_per_iter * (i + 1) for i in range(self.num_iters))

    @property
    def dec_width(self) -> int:
        """Decoder width (``decoder_width`` or ``width``)."""
        return self.decoder_width if self.decoder_width is not None else self.width

    @property
    def decoder_layers(self) -> int:
        """Decoder depth (``decoder_depth`` or ``depth``)."""
        return self.decoder_depth if self.decoder_depth is not None else self.depth

    @property
    def dec_heads(self) -> int:
        """Decoder heads (``decoder_heads`` or ``heads``)."""
        return self.decoder_heads if self.decoder_heads is not None else self.heads


def alit_config(name: str, **overrides: Any) -> ALITConfig:
    """The registered size ``name`` (:data:`ALIT_SIZES`, end of this file) with ``overrides``."""
    if name not in ALIT_SIZES:
        raise ValueError(f"unknown ALIT size '{name}'; choose one of {sorted(ALIT_SIZES)}")
    return ALITConfig(**{**ALIT_SIZES[name], **overrides})


# ============================================================================ building blocks
class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters (packed [q; k; v] rows),
    computed by the project's one attention function."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    # Inspection only (sampling.analysis.record_attention sets it per module): when not None, the weights are
    # computed explicitly, softmax(q k^T / sqrt(d)) in fp32, passed to it as (B, H, L, L), and applied to v.
    # None (the class default, never saved) keeps the fast kernel path unchanged.
    inspect_hook: Callable[[Tensor], None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=self.heads)  # 3 x (B, H, L, W/H)
        if self.inspect_hook is None:
            out = attention(q, k, v)  # (B, H, L, W/H)
        else:
            weights = (q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, L, L)
            self.inspect_hook(weights)
            out = (weights @ v.float()).to(q.dtype)  # (B, H, L, W/H)
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))  # (B, L, W)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); exact GELU, no dropout.

    The generator's blocks (``generator/transformer.py``) are not this class: their parameter names
    are their own checkpoints' and the ALIT names must stay the public checkpoint's.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """The encoder's stack of blocks (full bidirectional attention, no LayerNorm after the stack)."""

    def __init__(self, config: ALITConfig) -> None:
        super().__init__()
        c = config
        self.transformer = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.transformer:
            x = block(x)
        return x


class LatentDecoder(nn.Module):
    """Latent codes + grid queries -> logits over the base codebook at every grid cell."""

    def __init__(self, config: ALITConfig) -> None:
        super().__init__()
        c, w = config, config.dec_width
        self.num_cells = c.num_cells
        self.decoder_embed = nn.Linear(c.code_dim, w)
        self.latent_token_positional_embedding = nn.Parameter(torch.empty(c.decoder_max_tokens, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.ModuleList(Block(w, c.dec_heads, c.mlp_ratio) for _ in range(c.decoder_layers))
        self.ln_post = nn.LayerNorm(w)
        self.ffn = nn.Sequential(nn.Linear(w, 2 * w), nn.Tanh(), nn.Linear(2 * w, c.base_codebook_size))

    def forward(self, codes: Tensor, queries: Tensor) -> Tensor:
        """``codes (B, k, D)``, ``queries (B, 1+N, Wd)`` (class + grid mask tokens) -> ``(B, N, Kb)``."""
        k = codes.shape[1]
        latents = self.decoder_embed(codes) + self.latent_token_positional_embedding[:k]  # (B, k, Wd)
        x = self.ln_pre(torch.cat([queries, latents.to(queries.dtype)], dim=1))  # (B, 1+N+k, Wd)
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, 1:1 + self.num_cells])  # (B, N, Wd)
        return self.ffn(x)  # (B, N, Kb)


class VectorQuantizer(nn.Module):
    """Cosine-similarity VQ: inputs and codes L2-normalised, codebook + beta * commitment loss,
    straight-through gradients; computed in fp32 with autocast off."""

    def __init__(self, codebook_size: int, code_dim: int, beta: float, dead_code_threshold: float = 0.0,
                 usage_decay: float = 0.99) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, code_dim)
        self.beta = beta
        self.dead_code_threshold, self.usage_decay = dead_code_threshold, usage_decay
        if dead_code_threshold > 0:  # a buffer only then: the public layout has no such key
            self.register_buffer("usage", torch.ones(codebook_size))  # EMA of assignments per call

    @torch.no_grad()
    def _track_usage(self, z: Tensor, ids: Tensor) -> None:
        counts = torch.bincount(ids.reshape(-1), minlength=self.usage.numel()).to(self.usage.dtype)
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        self._recent = z.reshape(-1, z.shape[-1])  # latents of the last call: the pool restarts draw from

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Replace codes whose usage EMA fell below the threshold by random latents of the last batch.

        The standard cure for codebook collapse (dead codes never receive gradient). Call it between
        optimizer steps (the training tasks do, after the update), never inside a forward whose graph
        still needs the codebook. Randomness comes from the global generator, which the trainer seeds
        per step, so resume stays exact; under torch.distributed rank 0's codebook is broadcast so ranks
        never diverge. Returns the number of codes replaced.
        """
        recent = getattr(self, "_recent", None)
        if self.dead_code_threshold <= 0 or recent is None:
            return 0
        dead = (self.usage < self.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel():
            pick = torch.randint(0, recent.shape[0], (dead.numel(),), device=recent.device)
            self.embedding.weight[dead] = recent[pick].to(self.embedding.weight.dtype)
            self.usage[dead] = 1.0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.embedding.weight.data, 0)
            torch.distributed.broadcast(self.usage, 0)
        self._recent = None
        return int(dead.numel())

    def codes(self, ids: Tensor) -> Tensor:
        """Unit-norm codes of ``ids (B, k)`` -> ``(B, k, D)`` (what the decoder reads)."""
        return F.embedding(ids, F.normalize(self.embedding.weight.float(), dim=-1))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``z (B, k, D)`` -> (straight-through codes ``(B, k, D)`` fp32, ids ``(B, k)``, loss ``()``)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            book = F.normalize(self.embedding.weight.float(), dim=-1)  # (K, D)
            ids = (z @ book.t()).argmax(dim=-1)  # (B, k): max cosine = nearest unit code
            z_q = F.embedding(ids, book)  # (B, k, D)
            loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()
            if self.training and self.dead_code_threshold > 0:
                self._track_usage(z.detach(), ids)
        return z_q, ids, loss




# ============================================================================ outputs
@dataclass
class EncoderState:
    """The recurrent state between encoder iterations; batch-indexable with :meth:`select`.

    ``seq`` is the encoder's raw output after ``iterations`` iterations (before that, the first input,
    after ``encoder_ln_pre``). The public transition to the next iteration (halt cells, append T new
    latents, ``encoder_ln_recursive`` over the whole sequence) is the start of :meth:`ALIT.step`.
    """

    seq: Tensor  # (B, 1+N+k, W): class token, 2D tokens, latents so far
    halted: Tensor  # (B, N) bool: grid cells masked at the input of the last iteration run
    iterations: int = 0  # encoder iterations run so far (k = iterations * T)
    inputs: Tensor | None = None  # (B, 1+N, W) the first input's [class; 2D tokens], kept when reinject_2d is on

    def select(self, keep: Tensor) -> EncoderState:
        """The state of a subset of the batch (``keep``: bool mask or indices)."""
        inputs = self.inputs[keep] if self.inputs is not None else None
        return EncoderState(self.seq[keep], self.halted[keep], self.iterations, inputs)


@dataclass
class IterationOutput:
    """What one supervised iteration ``t`` produces."""

    iteration: int  # t (0-based); the code has (t+1) * T tokens
    logits: Tensor  # (B, N, Kb) over the base codebook
    codes: Tensor  # (B, k, D) quantized latents (straight-through, fp32)
    ids: Tensor  # (B, k) long latent ids
    vq_loss: Tensor  # () codebook + beta * commitment loss of these latents


@dataclass
class BudgetCodes:
    """:meth:`ALITTokenizer.encode_budgets`: the ids of every budget from one encoder pass."""

    ids: dict[int, Tensor]  # budget -> (B, budget) long
    adaptive_ids: Tensor | None  # (B, max_budget) long padded with PAD_ID (with a threshold)
    adaptive_lengths: Tensor | None  # (B,) long: each image's chosen budget (with a threshold)


@dataclass
class ALITOutput:
    """:meth:`ALIT.forward`'s result (the same in train and eval)."""

    iterations: list[IterationOutput]  # one per supervised iteration, in increasing order
    halted: list[Tensor]  # per encoder iteration run: (B, N) bool cells masked at its input ([0] all False)
    encoder_iterations: int  # encoder iterations actually run (= last supervised iteration + 1)
    targets: Tensor | None = None  # (B, N) long base indices (halting and the losses)

    def at(self, iteration: int) -> IterationOutput:
        """The output of supervised iteration ``iteration``."""
        for out in self.iterations:
            if out.iteration == iteration:
                return out
        raise KeyError(f"iteration {iteration} was not supervised; supervised: "
                       f"{[o.iteration for o in self.iterations]}")


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``lengths (B,)`` -> bool ``(B, max_len)``, True at real tokens."""
    return torch.arange(max_len, device=lengths.device)[None] < lengths[:, None]


# ============================================================================ the model
class ALIT(nn.Module):
    """Recurrent latent distillation: images + base features -> 1D latent codes -> base-codebook logits.

    The public function, step by step (``adaptive_vqgan.py`` at the public head; the golden vectors in
    ``tests/assets/public-alit-golden`` check every step):

    1. 2D tokens: ``[base features (Cb); patch_embed(images in [0, 1]) (W - Cb)]`` per cell, L2-normalised.
    2. ``x = [class; 2D tokens] + encoder_positional_embedding``; latents ``latent_tokens +
       latent_token_positional_embedding + timestep_embedding[0]``; ``encoder_ln_pre`` once, on all.
    3. Per iteration: the encoder blocks (no LayerNorm after); the latents ``encoder_ln_post`` ->
       ``pre_quantizer_mlp`` -> cosine VQ -> decoder -> logits; halting overwrites the 2D tokens of cells
       with ``p(true base index) >= threshold`` by ``encoder_positional_embedding + encoder_mask_token``
       (not cumulative, no LayerNorm); T new latents (``timestep_embedding[t+1]``, no ``ln_pre``) are
       appended and ``encoder_ln_recursive`` normalises the whole sequence.

    Counters for tests and profiling (plain ints, reset by :meth:`embed`): ``last_encoder_iterations``
    (encoder iterations run since) and ``last_decoder_passes`` (decoder passes since).
    """

    def __init__(self, config: ALITConfig) -> None:
        super().__init__()
        self.config = c = config
        w, wd, n, t = c.width, c.dec_width, c.num_cells, c.tokens_per_iter
        # encoder inputs
        self.patch_embed = nn.Conv2d(3, w - c.base_code_dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.encoder_class_embedding = nn.Parameter(torch.empty(1, w))
        self.encoder_positional_embedding = nn.Parameter(torch.empty(1 + n, w))
        self.encoder_mask_token = nn.Parameter(torch.empty(1, 1, w))
        self.latent_tokens = nn.Parameter(torch.empty(t, w))
        self.latent_token_positional_embedding = nn.Parameter(torch.empty(t, w))
        self.timestep_embedding = nn.Parameter(torch.empty(c.num_iters, t, w))
        # encoder
        self.encoder_ln_pre = nn.LayerNorm(w)
        self.encoder = Encoder(c)
        self.encoder_ln_recursive = nn.LayerNorm(w)
        # bottleneck
        self.encoder_ln_post = nn.LayerNorm(w)
        self.pre_quantizer_mlp = nn.Linear(w, c.code_dim)
        self.quantize = VectorQuantizer(c.codebook_size, c.code_dim, c.commitment_beta, c.dead_code_threshold)
        # decoder
        self.decoder_class_embedding = nn.Parameter(torch.empty(1, wd))
        self.decoder_positional_embedding = nn.Parameter(torch.empty(1 + n, wd))
        self.decoder_mask_token = nn.Parameter(torch.empty(1, 1, wd))
        self.decoder = LatentDecoder(c)
        self.reset_parameters()
        self.last_encoder_iterations = 0
        self.last_decoder_passes = 0

    def reset_parameters(self) -> None:
        """All initialisation in one place, as the public constructor: bare embeddings ~ N(0, 1/W)
        (the decoder's latent positions 1/Wd), Linear/Conv ~ truncN(init_std), biases 0, LayerNorm 1/0,
        attention in-projections Xavier-uniform (``nn.MultiheadAttention``'s own), the latent codebook
        uniform in +-1/K."""
        scale = self.config.width ** -0.5
        for p in (self.encoder_class_embedding, self.encoder_positional_embedding, self.encoder_mask_token,
                  self.latent_tokens, self.latent_token_positional_embedding, self.timestep_embedding,
                  self.decoder_class_embedding, self.decoder_positional_embedding, self.decoder_mask_token):
            nn.init.normal_(p, std=scale)
        nn.init.normal_(self.decoder.latent_token_positional_embedding, std=self.config.dec_width ** -0.5)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=self.config.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, SelfAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        k = self.config.codebook_size
        nn.init.uniform_(self.quantize.embedding.weight, -1.0 / k, 1.0 / k)

    # ------------------------------------------------------------------ budgets
    @property
    def budgets(self) -> tuple[int, ...]:
        """Valid token budgets: T, 2T, ..., num_iters*T."""
        return self.config.budgets

    def iterations_for(self, budget: int) -> int:
        """Encoder iterations a ``budget``-token code needs; a budget not in :attr:`budgets` is an error."""
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or int(budget) not in self.budgets:
            raise ValueError(f"token budget {budget!r} is not valid: use a positive multiple of "
                             f"tokens_per_iter={self.config.tokens_per_iter} up to {self.config.max_tokens}, "
                             f"i.e. one of {list(self.budgets)}")
        return int(budget) // self.config.tokens_per_iter

    # ------------------------------------------------------------------ encoder
    def new_latents(self, t: int, batch: int, dtype: torch.dtype) -> Tensor:
        """The T latents that enter at iteration ``t``: ``(B, T, W)`` (no LayerNorm)."""
        new = self.latent_tokens + self.latent_token_positional_embedding + self.timestep_embedding[t]  # (T, W)
        return new.to(dtype).expand(batch, -1, -1)

    def embed(self, images: Tensor, base_features: Tensor) -> EncoderState:
        """The first encoder input ``ln_pre([class; 2D tokens; T latents])``; resets the counters.

        ``images`` are ``(B, 3, H, W)`` in [-1, 1] (the project's convention); the RGB branch reads them
        in [0, 1] as the public code (the one conversion, here).
        """
        c = self.config
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(f"images must be (B, 3, {c.image_size}, {c.image_size}) in [-1, 1], got "
                             f"{tuple(images.shape)}; resize to the tokenizer's image size")
        want = (images.shape[0], c.base_code_dim, c.base_grid, c.base_grid)
        if tuple(base_features.shape) != want:
            raise ValueError(f"base_features must be {want} (the base tokenizer's pre-quantization features), "
                             f"got {tuple(base_features.shape)}; is this ALIT built for this base tokenizer?")
        self.last_encoder_iterations = 0
        self.last_decoder_passes = 0
        b = images.shape[0]
        rgb = self.patch_embed((images + 1) / 2)  # (B, W-Cb, G, G) from [0, 1] pixels
        x = torch.cat([base_features.to(rgb.dtype), rgb], dim=1)  # (B, W, G, G): [base; rgb] as public
        x = F.normalize(rearrange(x, "b w g h -> b (g h) w"), dim=-1)  # (B, N, W), unit norm, raster order
        cls = self.encoder_class_embedding.expand(b, 1, -1).to(x.dtype)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.encoder_positional_embedding  # (B, 1+N, W)
        seq = self.encoder_ln_pre(torch.cat([x, self.new_latents(0, b, x.dtype)], dim=1))  # (B, 1+N+T, W)
        halted = torch.zeros(b, c.num_cells, dtype=torch.bool, device=images.device)
        return EncoderState(seq, halted, 0, seq[:, :1 + c.num_cells] if c.reinject_2d else None)

    def step(self, state: EncoderState, halt: Tensor | None = None) -> EncoderState:
        """One encoder iteration; after the first, the public transition comes first: the cells in
        ``halt (B, N)`` are overwritten by mask tokens, T new latents are appended and
        ``encoder_ln_recursive`` normalises the whole sequence."""
        c, t = self.config, state.iterations
        if t >= c.num_iters:
            raise ValueError(f"ALIT has {c.num_iters} iterations; cannot run iteration {t + 1}")
        b, n = state.seq.shape[0], c.num_cells
        seq = state.seq
        given = halt is not None  # masking only then: no device sync on halt.any() in the hot loop
        if halt is None:
            halt = torch.zeros(b, n, dtype=torch.bool, device=seq.device)
        if t > 0:
            if given:
                mask = (self.encoder_positional_embedding[1:] + self.encoder_mask_token[0]).to(seq.dtype)  # (N, W)
                grid = torch.where(halt[..., None], mask, seq[:, 1:1 + n])  # (B, N, W)
                seq = torch.cat([seq[:, :1], grid, seq[:, 1 + n:]], dim=1)
            seq = self.encoder_ln_recursive(torch.cat([seq, self.new_latents(t, b, seq.dtype)], dim=1))
            if c.reinject_2d:  # [class; 2D tokens] as first embedded (halted cells stay masked)
                inputs = state.inputs.to(seq.dtype)
                grid = torch.where(halt[..., None], seq[:, 1:1 + n], inputs[:, 1:])  # (B, N, W)
                seq = torch.cat([inputs[:, :1], grid, seq[:, 1 + n:]], dim=1)
        elif given and bool(halt.any()):
            raise ValueError("no cell can halt before the first iteration")
        seq = self.encoder(seq)  # (B, 1+N+k, W)
        self.last_encoder_iterations += 1
        return EncoderState(seq, halt, t + 1, state.inputs)

    def bottleneck(self, state: EncoderState) -> tuple[Tensor, Tensor, Tensor]:
        """All latents so far -> (codes ``(B, k, D)``, ids ``(B, k)``, vq loss ``()``)."""
        latents = state.seq[:, 1 + self.config.num_cells:]  # (B, k, W) raw encoder outputs
        return self.quantize(self.pre_quantizer_mlp(self.encoder_ln_post(latents)))  # (B, k, D)

    # ------------------------------------------------------------------ decoder
    def decode_logits(self, codes: Tensor) -> Tensor:
        """Latent codes ``(B, k, D)`` -> logits ``(B, N, Kb)`` over the base codebook."""
        b = codes.shape[0]
        n = self.config.num_cells
        cls = self.decoder_class_embedding.expand(b, 1, -1)  # (B, 1, Wd)
        masks = self.decoder_mask_token.expand(b, n, -1)  # (B, N, Wd)
        queries = torch.cat([cls, masks], dim=1) + self.decoder_positional_embedding  # (B, 1+N, Wd)
        self.last_decoder_passes += 1
        return self.decoder(codes, queries)

    def codes_from_ids(self, ids: Tensor) -> Tensor:
        """Latent ids ``(B, k)`` -> unit-norm codes ``(B, k, D)``."""
        return self.quantize.codes(ids)

    def halting_mask(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cells to halt at the next iteration: ``p(targets) >= halting_threshold`` ``(B, N)`` bool.

        Recomputed at every iteration (not cumulative), in training and at inference alike, from the
        true base indices (one quantize of the base features away). With ``halting_sample`` and in
        training, a qualifying cell also needs a Bernoulli(p) draw, as the public code.
        """
        probs = logits.detach().float().softmax(dim=-1)  # (B, N, Kb)
        p = probs.gather(-1, targets.reshape(probs.shape[0], -1, 1)).squeeze(-1)  # (B, N)
        halt = p >= self.config.halting_threshold
        if self.config.halting_sample and self.training:
            halt = halt & torch.bernoulli(p).bool()
        return halt

    # ------------------------------------------------------------------ forward
    def _supervised(self, iterations: int | None, supervise: Sequence[int] | None) -> list[int]:
        n_max = self.config.num_iters
        if iterations is not None and not 1 <= iterations <= n_max:
            raise ValueError(f"iterations must be in [1, {n_max}], got {iterations}")
        if supervise is None:
            return [(iterations or n_max) - 1]
        steps = sorted(set(int(s) for s in supervise))
        if not steps or steps[0] < 0 or steps[-1] >= n_max:
            raise ValueError(f"supervise must list iterations in [0, {n_max - 1}], got {list(supervise)}")
        if iterations is not None and steps[-1] >= iterations:
            raise ValueError(f"supervise={steps} asks for iteration {steps[-1]} but iterations={iterations}; "
                             f"drop iterations or raise it to {steps[-1] + 1}")
        return steps

    def forward(self, images: Tensor, base_features: Tensor, targets: Tensor | None = None,
                iterations: int | None = None, supervise: Sequence[int] | None = None) -> ALITOutput:
        """Run the recurrence and decode the supervised iterations.

        Args:
            images: ``(B, 3, H, W)`` in [-1, 1].
            base_features: ``(B, Cb, G, G)`` the base tokenizer's continuous pre-quantization features.
            targets: ``(B, G, G)`` or ``(B, N)`` base indices; halting needs them.
            iterations: encoder iterations to run; without ``supervise``, iteration ``iterations - 1`` is
                supervised (default: the last).
            supervise: iterations (0-based) to decode; ``max(supervise) + 1`` encoder iterations run unless
                ``iterations`` asks for more (the public code's way, kept for comparisons).
        """
        steps = self._supervised(iterations, supervise)
        n_run = max(steps[-1] + 1, iterations or 0)
        if targets is not None:
            targets = targets.reshape(targets.shape[0], -1).long()  # (B, N)
            if targets.shape != (images.shape[0], self.config.num_cells):
                raise ValueError(f"targets must be (B, {self.config.base_grid}, {self.config.base_grid}) base "
                                 f"indices, got {tuple(targets.shape)}")
        elif self.config.halting and n_run > 1:
            raise ValueError("halting needs targets= (the base indices of the images); pass them or build "
                             "the ALIT with halting=False")
        state = self.embed(images, base_features)
        outputs: list[IterationOutput] = []
        halted: list[Tensor] = []
        halt: Tensor | None = None
        for t in range(n_run):
            state = self.step(state, halt)
            halted.append(state.halted)
            halt_next = self.config.halting and t < n_run - 1  # no halting after the last iteration run
            if t in steps:
                codes, ids, vq_loss = self.bottleneck(state)
                logits = self.decode_logits(codes)
                outputs.append(IterationOutput(t, logits, codes, ids, vq_loss))
            elif halt_next:
                with torch.no_grad():
                    logits = self.decode_logits(self.bottleneck(state)[0])
            if halt_next:
                assert targets is not None
                halt = self.halting_mask(logits, targets)
        return ALITOutput(outputs, halted, n_run, targets)


# ============================================================================ the index-level API
class ALITTokenizer(nn.Module):
    """ALIT (``.alit``) + its base 2D tokenizer (``.base``): images <-> variable-length latent ids.

    ``base`` follows the ``tokenizer.vq.BaseVQ`` contract: ``encode_features(images) -> (B, Cb, G, G)``,
    ``encode_indices(images)`` or ``quantize(features).indices -> (B, G, G)`` (the targets),
    ``codebook -> (Kb, Cb)``, ``decode_codes(codes) -> images`` (soft codes accepted), ``grid_size``,
    ``code_dim``, ``codebook_size``, ``save_pretrained`` / ``from_pretrained``.
    Images are ``(B, 3, H, W)`` in [-1, 1]. Every method is deterministic.

    Why a wrapper rather than a base submodule inside :class:`ALIT`: the distillation network stays
    usable on precomputed features (stage 1 trains it alone against a frozen base), while this class
    owns everything that needs both (targets, pixels, the index-level API, the saved directory).
    """

    def __init__(self, alit: ALIT, base: nn.Module) -> None:
        super().__init__()
        c = alit.config
        got = (int(base.grid_size), int(base.code_dim), int(base.codebook_size))
        want = (c.base_grid, c.base_code_dim, c.base_codebook_size)
        if got != want:
            raise ValueError(f"base tokenizer (grid, code_dim, codebook_size) = {got} but the ALIT config expects "
                             f"{want}; build the ALIT config from this base (ALITTokenizer.build)")
        self.alit = alit
        self.base = base

    @classmethod
    def build(cls, base: nn.Module, size: str = "tiny", image_size: int | None = None,
              **overrides: Any) -> ALITTokenizer:
        """A fresh ALIT of registered ``size`` whose base fields are copied from ``base``.

        ``image_size`` (pixels) defaults to ``base.config.resolution`` (``BaseVQConfig``).
        """
        if image_size is None:
            image_size = getattr(getattr(base, "config", None), "resolution", None)
        if image_size is None:
            raise ValueError("cannot tell the base tokenizer's image size: pass image_size=")
        grid = int(base.grid_size)
        if image_size % grid:
            raise ValueError(f"image_size {image_size} is not a multiple of the base grid {grid}")
        fields = dict(patch_size=image_size // grid, base_grid=grid, base_code_dim=int(base.code_dim),
                      base_codebook_size=int(base.codebook_size))
        return cls(ALIT(alit_config(size, **{**fields, **overrides})), base)

    # ------------------------------------------------------------------ the token space
    @property
    def config(self) -> ALITConfig:
        """The ALIT config."""
        return self.alit.config

    @property
    def budgets(self) -> tuple[int, ...]:
        """Valid token budgets: T, 2T, ..., num_iters*T."""
        return self.alit.budgets

    @property
    def max_budget(self) -> int:
        """The largest budget."""
        return self.config.max_tokens

    @property
    def tokens_per_iter(self) -> int:
        """T, the budget step."""
        return self.config.tokens_per_iter

    @property
    def codebook_size(self) -> int:
        """Latent ids are in [0, codebook_size)."""
        return self.config.codebook_size

    @property
    def image_size(self) -> int:
        """Image side in pixels."""
        return self.config.image_size

    # ------------------------------------------------------------------ training-time forward
    def forward(self, images: Tensor, iterations: int | None = None,
                supervise: Sequence[int] | None = None) -> ALITOutput:
        """Base features (with gradients if the base trains) and indices, then :meth:`ALIT.forward`."""
        features, targets = self.features_and_targets(images)
        return self.alit(images, features, targets=targets, iterations=iterations, supervise=supervise)

    def features_and_targets(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The base's features ``(B, Cb, G, G)`` and their indices ``(B, N)`` (the halting targets)."""
        features = self.base.encode_features(images)  # (B, Cb, G, G)
        with torch.no_grad():
            targets = self.base.quantize(features.detach()).indices.flatten(1)  # (B, N)
        return features, targets

    def soft_codes(self, logits: Tensor) -> Tensor:
        """Logits ``(B, N, Kb)`` -> expected base codes ``softmax(logits) @ codebook`` ``(B, Cb, G, G)``."""
        g = self.config.base_grid
        book = self.base.codebook  # (Kb, Cb)
        codes = logits.softmax(dim=-1).to(book.dtype) @ book  # (B, N, Cb)
        return codes.transpose(1, 2).reshape(logits.shape[0], -1, g, g)  # (B, Cb, G, G)

    def logits_to_images(self, logits: Tensor) -> Tensor:
        """Logits ``(B, N, Kb)`` -> images ``(B, 3, H, W)`` through the base decoder (soft codes, unclamped)."""
        return self.base.decode_codes(self.soft_codes(logits))

    # ------------------------------------------------------------------ encode / decode
    def _check_images(self, images: Tensor) -> None:
        s = self.image_size
        if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, {s}, {s}) float tensor in [-1, 1], got {shape}")

    def _check_ids(self, ids: Tensor) -> None:
        if not torch.is_tensor(ids) or ids.ndim != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"ids must be a (B, k) integer tensor, got "
                             f"{tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__}")
        self.alit.iterations_for(ids.shape[1])
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"ids must be in [0, {self.codebook_size}) (got min {int(ids.min())}, max "
                             f"{int(ids.max())}); strip padding ({PAD_ID}) or pass lengths=")

    @torch.no_grad()
    def encode(self, images: Tensor, budget: int) -> Tensor:
        """Images -> latent ids ``(B, budget)`` long; runs only ``budget / T`` encoder iterations."""
        n = self.alit.iterations_for(budget)
        self._check_images(images)
        alit = self.alit
        features, targets = self.features_and_targets(images)
        state, halt = alit.embed(images, features), None
        for t in range(n):
            state = alit.step(state, halt)
            if alit.config.halting and t < n - 1:
                halt = alit.halting_mask(alit.decode_logits(alit.bottleneck(state)[0]), targets)
        return alit.bottleneck(state)[1]  # (B, budget)

    @torch.no_grad()
    def decode_logits(self, ids: Tensor) -> Tensor:
        """Latent ids ``(B, k)`` (k a valid budget) -> logits ``(B, N, Kb)`` over the base codebook."""
        self._check_ids(ids)
        return self.alit.decode_logits(self.alit.codes_from_ids(ids.long()))

    @torch.no_grad()
    def decode(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Latent ids ``(B, k)`` -> images ``(B, 3, H, W)`` in [-1, 1].

        With ``lengths (B,)`` the ids are a padded variable-length batch (``encode_adaptive``'s output):
        each group of equal length is decoded from its first ``length`` ids.
        """
        if lengths is None:
            return self.logits_to_images(self.decode_logits(ids)).float().clamp(-1, 1)
        if lengths.shape != ids.shape[:1]:
            raise ValueError(f"lengths must be (B,) = ({ids.shape[0]},), got {tuple(lengths.shape)}")
        out: Tensor | None = None
        for k in sorted(set(lengths.tolist())):
            rows = (lengths == k).nonzero().squeeze(1)
            images = self.decode(ids[rows, :k])
            if out is None:
                out = images.new_empty(ids.shape[0], *images.shape[1:])
            out[rows] = images
        assert out is not None
        return out

    @torch.no_grad()
    def encode_budgets(self, images: Tensor, threshold: float | None = None) -> BudgetCodes:
        """One encoder pass to the largest budget: the ids of every budget, and with ``threshold`` the
        adaptive choice, together.

        ``ids[k]`` equals ``encode(images, k)`` (the same iterations and halting masks, which depend only on
        the iterations before; a per-budget encode repeats them: 1 + 2 + ... + 8 = 36 iterations for 8
        budgets against 8 here). The adaptive choice is :meth:`encode_adaptive`'s rule (the first budget
        whose unclamped reconstruction L1 in [0, 1] units is below ``threshold``, else the lowest-error
        one) from one decoder pass per budget, which the halting masks need anyway. Only the images not yet
        settled are decoded to pixels: one settled at budget k is decoded at budgets T..k only."""
        self._check_images(images)
        if threshold is not None and not threshold >= 0:
            raise ValueError(f"threshold is an L1 error in [0, 1] pixel units (e.g. 0.07), got {threshold}")
        alit, b = self.alit, images.shape[0]
        n = alit.config.num_iters
        features, targets = self.features_and_targets(images)
        state, halt = alit.embed(images, features), None
        ids_by_budget: dict[int, Tensor] = {}
        best = torch.full((b,), math.inf, device=images.device)
        lengths = torch.zeros(b, dtype=torch.long, device=images.device)
        settled = torch.zeros(b, dtype=torch.bool, device=images.device)
        for t in range(n):
            state = alit.step(state, halt)
            codes, ids, _ = alit.bottleneck(state)  # (B, k, D), (B, k)
            k = ids.shape[1]
            ids_by_budget[k] = ids
            pending = threshold is not None and not bool(settled.all())  # some image still chooses
            need_logits = pending or (alit.config.halting and t < n - 1)
            logits = alit.decode_logits(codes) if need_logits else None
            if pending:  # pixel decodes of the unsettled images only
                todo = (~settled).nonzero().squeeze(1)
                recon = self.logits_to_images(logits[todo])  # unclamped, as the public selection metric
                err = (recon.float() - images[todo].float()).abs().flatten(1).mean(1) / 2  # [0, 1] units
                better = err < best[todo]
                lengths[todo[better]] = k
                best[todo[better]] = err[better]
                settled[todo[err < threshold]] = True
            if alit.config.halting and t < n - 1:
                halt = alit.halting_mask(logits, targets)
        adaptive = None
        if threshold is not None:
            adaptive = torch.full((b, n * self.tokens_per_iter), PAD_ID, dtype=torch.long, device=images.device)
            for k, ids in ids_by_budget.items():
                rows = lengths == k
                adaptive[rows, :k] = ids[rows]
        return BudgetCodes(ids_by_budget, adaptive, lengths if threshold is not None else None)

    @torch.no_grad()
    def encode_adaptive(self, images: Tensor, threshold: float,
                        max_budget: int | None = None) -> tuple[Tensor, Tensor]:
        """Per image, the first budget whose reconstruction error is below ``threshold``.

        The error is the mean absolute pixel error in [0, 1] units (images mapped from [-1, 1]; the
        paper's default threshold is 0.07), of the unclamped reconstruction, as the public code's
        ``encode`` computes it, but per image (the public code picks one budget per batch). An image that
        never gets below it takes its lowest-error budget (up to ``max_budget``). Iterations run only as
        far as some image still needs; images are dropped from the batch once settled.

        Cost: an image settling at budget ``k`` is decoded to pixels at budgets ``T..k`` only, each
        iteration's unsettled images in one batch of the (channels-last) base decoder. The worst case,
        nothing settling, is one ``encode(images, max_budget)`` (the same iterations and the decoder passes
        halting needs) plus the last iteration's decoder pass and one pixel decode per budget: all of them
        are needed, since an image that never settles takes its lowest-error budget, known only once every
        budget is decoded (``python -m bench --only encode``: ``encode.adaptive_worst.*``).

        Returns ``(ids (B, max_budget) long padded with PAD_ID, lengths (B,) long)``.
        """
        self._check_images(images)
        n_max = self.alit.iterations_for(max_budget if max_budget is not None else self.max_budget)
        if not threshold >= 0:
            raise ValueError(f"threshold is an L1 error in [0, 1] pixel units (e.g. 0.07), got {threshold}")
        alit, b, t_per = self.alit, images.shape[0], self.tokens_per_iter
        ids_out = torch.full((b, n_max * t_per), PAD_ID, dtype=torch.long, device=images.device)
        lengths = torch.zeros(b, dtype=torch.long, device=images.device)
        best = torch.full((b,), math.inf, device=images.device)
        active = torch.arange(b, device=images.device)  # rows of the batch still running
        features, targets = self.features_and_targets(images)
        state, halt = alit.embed(images, features), None
        for t in range(n_max):
            state = alit.step(state, halt)
            codes, ids, _ = alit.bottleneck(state)  # (b', k, D), (b', k)
            logits = alit.decode_logits(codes)
            recon = self.logits_to_images(logits)  # unclamped, as the public selection metric
            err = (recon.float() - images[active].float()).abs().flatten(1).mean(1) / 2  # (b',) [0,1] units
            better = err < best[active]
            rows = active[better]
            k = ids.shape[1]
            ids_out[rows] = PAD_ID
            ids_out[rows, :k] = ids[better]
            lengths[rows] = k
            best[rows] = err[better]
            keep = err >= threshold  # first budget below the threshold settles an image
            if t == n_max - 1 or not bool(keep.any()):
                break
            if alit.config.halting:
                halt = alit.halting_mask(logits, targets)[keep]
            active, state, targets = active[keep], state.select(keep), targets[keep]
        return ids_out, lengths

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the one model-directory format: ``config.json`` (the ALIT config), ``model.safetensors``
        (ALIT weights), ``manifest.json`` and ``base/`` (the base tokenizer's own directory), atomically."""
        return save_model_dir(path, MODEL_NAME, FORMAT_VERSION, to_dict(self.config), self.alit.state_dict(),
                              extra={"base_model": getattr(self.base, "model_name", type(self.base).__name__)},
                              children={BASE_DIR: self.base.save_pretrained})

    @classmethod
    def from_pretrained(cls, path: str | Path, base: nn.Module | None = None,
                        map_location: str | torch.device = "cpu") -> ALITTokenizer:
        """Rebuild from :meth:`save_pretrained`'s directory; no pickles, no loss networks.

        ``base`` replaces the saved ``base/`` (e.g. a base shared between models); by default it is
        loaded with :func:`tokenizer.bases.load_base` (either base kind).
        """
        path = Path(path)
        alit = ALIT(read_alit_config(path))
        load_weights(alit, path, map_location)
        if base is None:
            from .bases import (
                load_base,  # the base's own loader; imported here so ALIT alone needs no diffusers
            )

            base = load_base(path / BASE_DIR, map_location)
        return cls(alit.to(map_location), base.to(map_location))


def read_alit_config(path: str | Path) -> ALITConfig:
    """The :class:`ALITConfig` of a saved tokenizer directory, with clear errors for bad files."""
    path = Path(path)
    file = path / CONFIG_FILE
    if file.is_file():
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError:
            raw = None
        if isinstance(raw, dict) and raw.get("format") == LEGACY_FORMAT:
            raise CheckpointError(f"{path} is an ALIT tokenizer of format {raw.get('format_version')}, written before "
                                  "the model computed the public ALIT function (2D-token channel order, LayerNorm "
                                  "placement, halting); its weights give other codes now and cannot be converted: "
                                  "retrain it (alit train tokenizer ...) or import a public checkpoint "
                                  "(alit import-public)")
    meta = read_model_meta(path, MODEL_NAME, FORMAT_VERSION)
    try:
        return from_dict(ALITConfig, meta["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: bad ALIT config: {e}") from None


# ============================================================================ sizes
# Registered sizes. The public ones (alit.md; params without the base tokenizer) keep T=32, 8 iterations
# and a 4096 x 12 codebook. The CPU ones are for a 64x64 image / 8x8 base grid ('tiny' BaseVQ); what was
# measured on the embedded emoji set to choose them (2 CPU cores, batch 16, every iteration supervised;
# init_std, dead codes and the 8 x 4 layout before the model computed the exact public function):
# - init_std 0.08 (about 0.8/sqrt(W)): the public 0.02 init, tuned for W >= 512, leaves the latents almost
#   independent of the image and every image quantizes to the same codes for hundreds of steps (9 distinct
#   ids in 400 steps on 512 emoji).
# - dead_code_threshold: even then the latent codebook collapsed to ~20 of 1024 codes (usage 2%) within
#   750 steps; restarting dead codes from batch latents keeps ~20% in use. The public recipe has it off.
# - reinject_2d: measured with the exact public function by configs/sweeps/recurrence_emoji_cpu.yaml
#   (600 steps a point, two seeds; table in the README): carried 2D tokens (the reference) gave held-out
#   L1 0.1384 / 0.1336 / 0.1339 / 0.1347 (seed 0) and 0.1419 ... 0.1441 rising (seed 1) at 8 / 16 / 24 / 32
#   tokens; reinjected ones 0.1163 / 0.1097 / 0.1085 / 0.1081 and 0.1184 / 0.1158 / 0.1143 / 0.1134, the
#   only variant strictly decreasing (a second encoder layer or the public 0.02 init stayed at ~0.19). The
#   public sizes (depth >= 8) keep the reference's carried tokens.
# - 8 tokens x 4 iterations rather than 4 x 8: at the same 32-token maximum, 1200 steps reached val CE
#   3.10 / 2.79 / 2.67 / 2.63 at 8 / 16 / 24 / 32 tokens, while 4 x 8 was still at 3.5 with the budgets
#   0.02 apart after 600 steps, at twice the cost per step (8 encoder iterations and decoder passes).
ALIT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(width=64, depth=1, heads=2, tokens_per_iter=4, num_iters=4, codebook_size=64, code_dim=8,
                 init_std=0.08, dead_code_threshold=0.01),
    "small_cpu": dict(width=96, depth=1, heads=4, tokens_per_iter=8, num_iters=4, codebook_size=1024,
                      code_dim=12, init_std=0.08, dead_code_threshold=0.01, reinject_2d=True),
    # the public sizes: 52.8M, 174.2M, 207.5M, 409.1M
    "tiny_public": dict(width=512, depth=8, heads=8),
    "base": dict(width=768, depth=12, heads=12),
    "small": dict(width=1024, depth=8, heads=8),
    "semilarge": dict(width=1024, depth=16, heads=16),
}



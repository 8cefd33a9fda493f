"""The models and inputs the benchmarks run on: untrained, but real architectures at the demo's CPU sizes.

Tokenizer shapes (:data:`TOKENIZER_SHAPES`):

- ``small_cpu``: the demo's tokenizer, ALIT ``small_cpu`` (width 96, 1 layer, 8 tokens x 4 iterations,
  1024 x 12 codebook) over BaseVQ ``tiny`` (64 px, 8x8 grid).
- ``public_shape``: the public token layout at a small width: 32 tokens x 8 iterations (budgets 32..256)
  over a 16x16 grid (BaseVQ ``tiny`` with one level less: 64 px, 4x down), ALIT width 128, 2 layers,
  4096 x 12 codebook. Encoder sequences grow to 1 + 256 + 256 tokens, so running only the iterations a
  budget needs matters most here.

Priors: MaskGIT / AR with width 128, depth 3, 4 heads, K = 1024, 8 tokens x 4 budgets, 10 classes (the demo's
emoji priors), and for the KV cache also the public layout (32 x 8, up to 256 tokens).
The priors' output heads are zero at initialisation (uniform predictions), which would make every
output comparison trivially equal; :func:`build_prior` re-draws the head N(0, 0.02) so logits depend on
the input, as in a trained model.

Inputs are real images: the embedded Noto emoji set (``tokenizer/assets/noto_emoji_64.npz``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from generator.tasks import build_prior as _build_prior
from generator.tokens import pad_sequences
from generator.transformer import Prior
from tokenizer.alit import ALITTokenizer
from tokenizer.core.paths import ASSETS
from tokenizer.vq import BaseVQ, base_vq_config

EMOJI_FILE = ASSETS / "noto_emoji_64.npz"


@dataclass(frozen=True)
class TokenizerShape:
    """A base VQ + ALIT pair to benchmark."""

    name: str
    base: dict[str, Any] = field(default_factory=dict)  # overrides of BaseVQ 'tiny'
    alit_size: str = "small_cpu"  # registered ALIT size
    alit: dict[str, Any] = field(default_factory=dict)  # overrides of that size
    what: str = ""


TOKENIZER_SHAPES: dict[str, TokenizerShape] = {
    "small_cpu": TokenizerShape("small_cpu", what="demo size: ALIT small_cpu (W96, 8 tok x 4 it) over BaseVQ tiny 8x8"),
    "public_shape": TokenizerShape(
        "public_shape", base={"block_out_channels": [16, 32, 64]},
        alit={"width": 128, "depth": 2, "heads": 4, "tokens_per_iter": 32, "num_iters": 8, "codebook_size": 4096,
              "reinject_2d": False},
        what="public layout (32 tok x 8 it, 16x16 grid) at width 128, depth 2"),
}

PRIOR_SHAPE: dict[str, Any] = {"width": 128, "depth": 3, "heads": 4, "codebook_size": 1024, "tokens_per_iter": 8,
                               "num_budgets": 4, "num_classes": 10}
PRIOR_PUBLIC_LAYOUT: dict[str, Any] = {**PRIOR_SHAPE, "codebook_size": 4096, "tokens_per_iter": 32, "num_budgets": 8}


def build_tokenizer(shape: str, device: torch.device | str, seed: int = 0) -> ALITTokenizer:
    """A freshly initialised tokenizer of a registered shape, in eval mode on ``device``."""
    if shape not in TOKENIZER_SHAPES:
        raise ValueError(f"unknown tokenizer shape {shape!r}; choose one of {sorted(TOKENIZER_SHAPES)}")
    s = TOKENIZER_SHAPES[shape]
    torch.manual_seed(seed)
    base = BaseVQ(base_vq_config("tiny", **s.base))
    tok = ALITTokenizer.build(base, s.alit_size, **s.alit)
    return tok.to(device).eval()


def build_prior(kind: str, device: torch.device | str, seed: int = 0, **overrides: Any) -> Prior:
    """A freshly initialised MaskGIT / AR prior of :data:`PRIOR_SHAPE` (with ``overrides``), head re-drawn."""
    torch.manual_seed(seed)
    model = _build_prior(kind, "tiny", **{**PRIOR_SHAPE, **overrides})
    torch.nn.init.normal_(model.head.weight, std=0.02)  # see the module docstring
    return model.to(device).eval()


def emoji_images(n: int, device: torch.device | str, resolution: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` real emoji images ``(n, 3, R, R)`` in [-1, 1] (a seeded choice, repeated if n > 1911)."""
    with np.load(EMOJI_FILE, allow_pickle=False) as data:
        images = data["images"]  # (M, 64, 64, 3) uint8
    idx = np.random.default_rng(seed).permutation(len(images))
    idx = np.resize(idx, n)
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, 64, 64)
    if resolution != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                            align_corners=False).clamp(-1, 1)
    return x.to(device)


def emoji_uint8(n: int, seed: int = 0) -> np.ndarray:
    """``n`` real emoji images ``(n, 64, 64, 3)`` uint8 (what the FID extractor reads)."""
    with np.load(EMOJI_FILE, allow_pickle=False) as data:
        images = data["images"]
    idx = np.resize(np.random.default_rng(seed).permutation(len(images)), n)
    return np.ascontiguousarray(images[idx])


def mixed_budget_batch(model: Prior, batch: int, seed: int = 0,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch of random code ids at budgets drawn uniformly from the prior's budgets.

    Returns ``(ids (B, L) padded with PAD, lengths (B,), classes (B,))``.
    """
    space = model.space
    g = torch.Generator().manual_seed(seed)
    budgets = torch.tensor(space.budgets)[torch.randint(0, space.num_budgets, (batch,), generator=g)]
    seqs = [torch.randint(0, space.codebook_size, (int(b),), generator=g) for b in budgets]
    ids, lengths = pad_sequences(seqs, space.max_budget)  # (B, max budget)
    classes = torch.randint(0, max(space.num_classes, 1), (batch,), generator=g)
    return ids.to(device), lengths.to(device), classes.to(device)

"""The paper's analyses of a tokenizer, as functions the ``alit inspect`` / ``alit analyze`` commands call.

- Specialization maps (:func:`latent_attention_maps`, :func:`write_attention_maps`): each latent token's
  attention over the 2D grid, per iteration and layer, through an explicit-softmax path that is used only
  while :func:`record_attention` is active (the fast kernels of ``tokenizer.core.attention`` stay as they
  are). Encoder maps are the attention of each latent token (query) over the 2D tokens (keys); decoder
  maps are the attention each grid query pays to each latent token (key), i.e. where a latent is read.

Weights are averaged over heads. A map is the raw share of attention (not renormalised over the grid);
overlays scale each map to its own maximum.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tokenizer.alit import ALITTokenizer
from tokenizer.core.errors import UsageError
from tokenizer.core.io import atomic_write_text

Which = Literal["encoder", "decoder"]
WHICH: tuple[str, ...] = ("encoder", "decoder")


# ============================================================================ output folders
def claim_out(out: str | Path, marker: str) -> Path:
    """``out`` as a folder this tool may write into: new, empty, or holding ``marker`` from an earlier run.

    A folder with other content is refused (nothing the tool did not create is ever overwritten)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder (it is created if missing)")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise UsageError(f"--out {out} already holds other files and no {marker} of an earlier run; "
                         "choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def to_uint8(images: Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8 (exact for the datasets' images)."""
    x = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


# ============================================================================ attention inspection
def _blocks(tokenizer: ALITTokenizer, which: str) -> torch.nn.ModuleList:
    if which not in WHICH:
        raise UsageError(f"--which {which!r} is unknown: choose encoder or decoder")
    alit = tokenizer.alit
    return alit.encoder.transformer if which == "encoder" else alit.decoder.transformer


def check_layers(tokenizer: ALITTokenizer, which: str, layers: Sequence[int] | None) -> list[int]:
    """The layer indices to inspect (all by default); an index out of range is a :class:`UsageError`."""
    n = len(_blocks(tokenizer, which))
    chosen = list(range(n)) if layers is None else sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < n]
    if bad or not chosen:
        raise UsageError(f"--layers {bad or chosen} is out of range: the {which} has {n} layer(s), "
                         f"indices 0..{n - 1}")
    return chosen


@contextmanager
def record_attention(tokenizer: ALITTokenizer, which: str = "encoder",
                     layers: Sequence[int] | None = None) -> Iterator[dict[int, list[Tensor]]]:
    """While active, the chosen ``which`` layers compute attention explicitly and append their
    head-averaged weights ``(B, L, L)`` (fp32, CPU) to ``records[layer]``, one entry per call (per
    iteration for the encoder, per decoder pass for the decoder). Leaving restores the fast path."""
    blocks = _blocks(tokenizer, which)
    chosen = check_layers(tokenizer, which, layers)
    records: dict[int, list[Tensor]] = {i: [] for i in chosen}

    def hook(store: list[Tensor]) -> Any:
        return lambda weights: store.append(weights.mean(dim=1).cpu())

    try:
        for i in chosen:
            blocks[i].attn.inspect_hook = hook(records[i])
        yield records
    finally:
        for i in chosen:
            blocks[i].attn.__dict__.pop("inspect_hook", None)


@torch.no_grad()
def run_recurrence(tokenizer: ALITTokenizer, images: Tensor, iterations: int | None = None
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """Encode ``images`` for ``iterations`` iterations (default all) as ``encode_budgets`` does, decoding
    every iteration: (ids per iteration ``(B, k)``, decoder logits per iteration ``(B, N, Kb)``)."""
    alit = tokenizer.alit
    n = alit.config.num_iters if iterations is None else iterations
    features, targets = tokenizer.features_and_targets(images)
    state, halt = alit.embed(images, features), None
    ids_out, logits_out = [], []
    for t in range(n):
        state = alit.step(state, halt)
        codes, ids, _ = alit.bottleneck(state)
        logits = alit.decode_logits(codes)
        ids_out.append(ids)
        logits_out.append(logits)
        if alit.config.halting and t < alit.config.num_iters - 1:
            halt = alit.halting_mask(logits, targets)
    return ids_out, logits_out


@torch.no_grad()
def latent_attention_maps(tokenizer: ALITTokenizer, images: Tensor, which: str = "encoder",
                          iterations: Sequence[int] | None = None,
                          layers: Sequence[int] | None = None) -> dict[tuple[int, int], Tensor]:
    """``(iteration, layer) -> (B, k, G, G)``: each latent token's attention over the grid (see the module
    docstring for what encoder and decoder maps are). Iterations are 0-based; ``k = (t+1) * T``."""
    c = tokenizer.config
    its = list(range(c.num_iters)) if iterations is None else sorted(set(int(t) for t in iterations))
    if not its or its[0] < 0 or its[-1] >= c.num_iters:
        raise UsageError(f"--iterations {its} is out of range: the tokenizer has {c.num_iters} iterations, "
                         f"0..{c.num_iters - 1} (budget (t+1)*{c.tokens_per_iter})")
    g, n = c.base_grid, c.num_cells
    with record_attention(tokenizer, which, layers) as records:
        run_recurrence(tokenizer, images, its[-1] + 1)
    maps: dict[tuple[int, int], Tensor] = {}
    for layer, calls in records.items():
        for t in its:
            w = calls[t]  # (B, L, L), L = 1 + N + k
            if which == "encoder":
                m = w[:, 1 + n:, 1:1 + n]  # latent queries over the 2D-token keys: (B, k, N)
            else:
                m = w[:, 1:1 + n, 1 + n:].transpose(1, 2)  # grid queries' weight on each latent: (B, k, N)
            maps[(t, layer)] = m.reshape(m.shape[0], m.shape[1], g, g).contiguous()
    return maps


def _colormap(heat: np.ndarray) -> np.ndarray:
    """``(..., H, W)`` in [0, 1] -> ``(..., H, W, 3)`` float RGB in [0, 1] (matplotlib's inferno)."""
    import matplotlib

    return np.asarray(matplotlib.colormaps["inferno"](heat))[..., :3]


def overlay_grid(images: np.ndarray, maps: np.ndarray, cell: int = 64, alpha: float = 0.55,
                 gap: int = 2) -> Image.Image:
    """A PNG-ready grid: rows = latent tokens, columns = images; each cell the image with one token's map
    (scaled to its maximum, bilinear to the image) blended over it. ``images (B, H, W, 3)`` uint8,
    ``maps (B, k, G, G)``."""
    b, k = maps.shape[:2]
    side = max(cell, images.shape[1])
    canvas = np.full((k * (side + gap) + gap, b * (side + gap) + gap, 3), 255, dtype=np.uint8)
    for j in range(b):
        base = np.asarray(Image.fromarray(images[j]).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255
        for i in range(k):
            m = maps[j, i].astype(np.float32)
            m = m / m.max() if m.max() > 0 else m
            heat = np.asarray(Image.fromarray(m).resize((side, side), Image.BILINEAR)).clip(0, 1)
            cell_rgb = (1 - alpha) * base + alpha * _colormap(heat)
            y, x = gap + i * (side + gap), gap + j * (side + gap)
            canvas[y:y + side, x:x + side] = (cell_rgb * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(canvas)


INSPECT_INDEX = "index.json"


def _forget_earlier_maps(out: Path) -> None:
    """Remove the PNGs an earlier run listed in ``out``'s index (only those: they are this tool's)."""
    try:
        earlier = json.loads((out / INSPECT_INDEX).read_text())["maps"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for entry in earlier:
        name = Path(str(entry.get("file", ""))).name if isinstance(entry, dict) else ""
        if name.endswith(".png") and name.split("-")[0] in WHICH:
            (out / name).unlink(missing_ok=True)


def write_attention_maps(tokenizer: ALITTokenizer, images: Tensor, out: str | Path, *,
                         which: Sequence[str] = ("encoder",), iterations: Sequence[int] | None = None,
                         layers: Sequence[int] | None = None, max_tokens: int = 32,
                         meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """One overlay grid PNG per (which, iteration, layer), ``attention.npz`` with the maps and
    :data:`INSPECT_INDEX` describing them; returns the index."""
    if max_tokens < 1:
        raise UsageError(f"--max-tokens {max_tokens} must be >= 1")
    out = claim_out(out, INSPECT_INDEX)
    _forget_earlier_maps(out)
    pixels = to_uint8(images)
    entries, arrays = [], {}
    for part in which:
        maps = latent_attention_maps(tokenizer, images, part, iterations,
                                     None if layers is None else check_layers(tokenizer, part, layers))
        for (t, layer), m in sorted(maps.items()):
            k = m.shape[1]
            shown = m[:, :max_tokens].numpy()
            name = f"{part}-iter{t}-layer{layer}"
            overlay_grid(pixels, shown).save(out / f"{name}.png")
            arrays[name] = m.numpy().astype(np.float32)
            grid_share = m.flatten(2).sum(-1)  # (B, k): the share of attention on the grid
            entries.append(dict(file=f"{name}.png", which=part, iteration=t, budget=(t + 1) * tokenizer.tokens_per_iter,
                                layer=layer, tokens=k, rows_shown=int(shown.shape[1]),
                                mean_grid_share=round(float(grid_share.mean()), 6)))
    np.savez_compressed(out / "attention.npz", **arrays)
    index = dict(kind="attention-maps", rows="latent tokens (first rows_shown)", columns="images",
                 encoder="attention of each latent token (query) over the 2D tokens (keys), heads averaged",
                 decoder="attention each grid query pays to each latent token (key), heads averaged",
                 grid=tokenizer.config.base_grid, images=len(pixels), maps=entries, **(meta or {}))
    write_json(out / INSPECT_INDEX, index)
    return index

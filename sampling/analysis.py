"""The paper's analyses of a tokenizer, as functions the ``alit inspect`` / ``alit analyze`` commands call.

- Complexity (:func:`measure_tokenizer`, :func:`complexity_analysis`): per image, the adaptive budget and
  the L1 of every budget (one ``encode_budgets`` pass) against PNG / JPEG bits per pixel, the mean gradient
  and user scores, as Spearman correlations with seeded bootstrap intervals, a table and a plot.
- Familiarity (:func:`familiarity_analysis`): the same per-image measurements on an out-of-distribution
  set against the in-distribution split: means, seeded permutation tests, a table and a plot.
- Token selection by task (:func:`measure_tasks`, :func:`tsc_choices`, :func:`tsc_analysis`): token-count
  criteria beyond L1 (an LPIPS threshold; the smallest budget at which a classifier, a plug-in, keeps its
  class), with each criterion's mean token count and task accuracy, as the paper's Fig. 5.
- Specialization maps (:func:`latent_attention_maps`, :func:`write_attention_maps`): each latent token's
  attention over the 2D grid, per iteration and layer, through an explicit-softmax path that is used only
  while :func:`record_attention` is active (the fast kernels of ``tokenizer.core.attention`` stay as they
  are). Encoder maps are the attention of each latent token (query) over the 2D tokens (keys); decoder
  maps are the attention each grid query pays to each latent token (key), i.e. where a latent is read.

Weights are averaged over heads. A map is the raw share of attention (not renormalised over the grid);
overlays scale each map to its own maximum.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from tokenizer.alit import ALITTokenizer
from tokenizer.core.data import ImageDataset
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


# ============================================================================ measuring a tokenizer on a set
@dataclass
class Measured:
    """A tokenizer on a set of images: the adaptive choice and the L1 of every budget, per image."""

    positions: np.ndarray  # (n,) split positions
    source_indices: np.ndarray  # (n,) indices in the source (the tables' 'index' column)
    labels: np.ndarray  # (n,) class labels
    budgets: tuple[int, ...]
    lengths: np.ndarray  # (n,) the adaptive budget (encode_budgets' choice at the threshold)
    l1: np.ndarray  # (n, len(budgets)) reconstruction L1 in [0, 1] units of the clamped decode, per budget
    pixels: np.ndarray  # (n, R, R, 3) uint8 originals

    def l1_at(self, budget: int) -> np.ndarray:
        return self.l1[:, self.budgets.index(budget)]


@torch.no_grad()
def measure_tokenizer(tokenizer: ALITTokenizer, dataset: ImageDataset, positions: np.ndarray,
                      threshold: float, batch_size: int = 32) -> Measured:
    """One ``encode_budgets`` pass per batch (every budget's ids and the adaptive choice), then one decode
    per budget: the per-image table the complexity and familiarity analyses read."""
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be >= 1")
    device = next(tokenizer.parameters()).device
    budgets = tuple(tokenizer.budgets)
    lengths, l1, pixels, labels = [], [], [], []
    for start in range(0, len(positions), batch_size):
        items = [dataset[int(p)] for p in positions[start:start + batch_size]]
        images = torch.stack([x for x, _ in items]).to(device)
        codes = tokenizer.encode_budgets(images, threshold)
        assert codes.adaptive_lengths is not None
        lengths.append(codes.adaptive_lengths.cpu().numpy())
        errs = [(tokenizer.decode(codes.ids[k]) - images).abs().flatten(1).mean(1).div(2).cpu().numpy()
                for k in budgets]
        l1.append(np.stack(errs, axis=1))
        pixels.append(to_uint8(images))
        labels.extend(y for _, y in items)
    positions = np.asarray(positions, dtype=np.int64)
    return Measured(positions, dataset.indices[positions], np.asarray(labels, dtype=np.int64), budgets,
                    np.concatenate(lengths).astype(np.int64), np.concatenate(l1).astype(np.float64),
                    np.concatenate(pixels))


# ============================================================================ complexity
def complexity_measures(pixels: np.ndarray, jpeg_quality: int = 75) -> dict[str, np.ndarray]:
    """Per image of ``pixels (n, H, W, 3)`` uint8: PNG-compressed bits per pixel (zlib level 9), JPEG bits
    per pixel at ``jpeg_quality``, and the mean gradient magnitude of the grey image in [0, 1] units."""
    png, jpeg, grad = [], [], []
    for arr in pixels:
        image = Image.fromarray(arr)
        area = arr.shape[0] * arr.shape[1]
        for fmt, store, kwargs in (("PNG", png, dict(compress_level=9)),
                                   ("JPEG", jpeg, dict(quality=jpeg_quality))):
            buf = io.BytesIO()
            image.save(buf, format=fmt, **kwargs)
            store.append(8 * buf.tell() / area)
        grey = arr.astype(np.float64).mean(-1) / 255
        gx, gy = np.diff(grey, axis=1)[:-1], np.diff(grey, axis=0)[:, :-1]
        grad.append(float(np.sqrt(gx ** 2 + gy ** 2).mean()))
    return {"png_bpp": np.asarray(png), f"jpeg_q{jpeg_quality}_bpp": np.asarray(jpeg),
            "gradient": np.asarray(grad)}


def read_scores(path: str | Path, source_indices: np.ndarray) -> dict[str, np.ndarray]:
    """A user CSV of per-image scores: an ``index`` column (the source index, the tables' ``index``) and
    one or more numeric columns -> ``{column: (n,) float}`` aligned to ``source_indices`` (NaN if absent)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--scores {path} does not exist; pass a CSV with an 'index' column and score columns")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0].keys() if rows else []) if c != "index"]
    if not rows or "index" not in rows[0] or not columns:
        raise UsageError(f"--scores {path} needs a header with 'index' (the source index of each image, as in "
                         "the complexity table) and at least one score column, and one row per image")
    pos = {int(i): k for k, i in enumerate(source_indices)}
    scores = {c: np.full(len(source_indices), np.nan) for c in columns}
    for line, row in enumerate(rows, start=2):
        try:
            i = int(row["index"])
            values = {c: float(row[c]) for c in columns if row[c] not in ("", None)}
        except (TypeError, ValueError):
            raise UsageError(f"--scores {path} line {line}: 'index' must be an integer and scores numbers, got "
                             f"{dict(row)}") from None
        if i in pos:
            for c, v in values.items():
                scores[c][pos[i]] = v
    if all(np.isnan(v).all() for v in scores.values()):
        raise UsageError(f"--scores {path}: no row's index is one of the analysed images' source indices "
                         f"(e.g. {source_indices[:3].tolist()}); index the rows by the table's 'index' column")
    return scores


def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a ** 2).sum(-1) * (b ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1), np.nan)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    return float(_pearson_rows(_rank_rows(x), _rank_rows(y)))


def spearman_ci(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, reps: int = 1000,
                seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Spearman's rho over the pairs where both are finite, with a seeded percentile-bootstrap interval
    (pairs resampled with replacement; resamples with a constant side are dropped)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    rho = spearman(x, y) if len(x) >= 2 else float("nan")
    lo = hi = float("nan")
    if len(x) >= 3 and reps > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(x), size=(reps, len(x)))
        boot = _pearson_rows(_rank_rows(x[idx]), _rank_rows(y[idx]))
        boot = boot[np.isfinite(boot)]
        if len(boot):
            q = (1 - level) / 2
            lo, hi = (float(v) for v in np.quantile(boot, [q, 1 - q]))
    return dict(rho=rho, ci=[lo, hi], n=len(x))


def _targets(m: Measured) -> dict[str, np.ndarray]:
    return {"adaptive_budget": m.lengths.astype(np.float64),
            **{f"l1_{k}": m.l1_at(k) for k in m.budgets}}


def _nan_to_none(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 6)


def _plot(path: Path, draw: Any, rows: int, cols: int, size: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    try:
        draw(axes)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


COMPLEXITY_SUMMARY = "complexity.json"


def complexity_analysis(m: Measured, out: str | Path, scores: dict[str, np.ndarray] | None = None,
                        reps: int = 1000, seed: int = 0, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """``complexity.csv`` (one row per image), :data:`COMPLEXITY_SUMMARY` (Spearman rho of the adaptive
    budget and of each budget's L1 against each measure, with bootstrap intervals) and ``complexity.png``."""
    out = claim_out(out, COMPLEXITY_SUMMARY)
    measures = {**complexity_measures(m.pixels), **(scores or {})}
    targets = _targets(m)
    table = {"index": m.source_indices, "position": m.positions, "label": m.labels, **targets, **measures}
    _write_csv(out / "complexity.csv", table)
    correlations = []
    for j, (mname, mvals) in enumerate(measures.items()):
        for i, (tname, tvals) in enumerate(targets.items()):
            r = spearman_ci(mvals, tvals, reps=reps, seed=seed + 1000 * j + i)
            correlations.append(dict(measure=mname, target=tname, rho=_nan_to_none(r["rho"]),
                                     ci95=[_nan_to_none(v) for v in r["ci"]], n=r["n"]))
    summary = dict(kind="complexity", images=len(m.positions), budgets=list(m.budgets),
                   mean_adaptive_budget=round(float(m.lengths.mean()), 4),
                   mean_l1={str(k): round(float(m.l1_at(k).mean()), 6) for k in m.budgets},
                   measures=list(measures), bootstrap=dict(reps=reps, seed=seed, level=0.95),
                   correlations=correlations, table="complexity.csv", plot="complexity.png", **(meta or {}))

    def rho_of(measure: str, target: str) -> str:
        r = next(c for c in correlations if c["measure"] == measure and c["target"] == target)["rho"]
        return "n/a" if r is None else f"{r:+.2f}"

    def draw(axes: Any) -> None:
        rng = np.random.default_rng(seed)
        jitter = rng.uniform(-0.25, 0.25, len(m.lengths)) * m.budgets[0]
        for row, (mname, mvals) in enumerate(measures.items()):
            ax = axes[row][0]
            ax.scatter(mvals, m.lengths + jitter, s=10, alpha=0.6)
            ax.set_xlabel(mname)
            ax.set_ylabel("adaptive budget (tokens)")
            ax.set_yticks(list(m.budgets))
            ax.set_title(f"budget vs {mname}: Spearman {rho_of(mname, 'adaptive_budget')}")
            ax = axes[row][1]
            for k in m.budgets:
                ax.scatter(mvals, m.l1_at(k), s=8, alpha=0.6, label=f"{k} tokens ({rho_of(mname, f'l1_{k}')})")
            ax.set_xlabel(mname)
            ax.set_ylabel("L1 (clamped decode, [0, 1])")
            ax.set_title(f"L1 vs {mname}")
            ax.legend(fontsize=7, title="budget (Spearman)", title_fontsize=7)

    _plot(out / "complexity.png", draw, len(measures), 2, (5.0, 3.6))
    write_json(out / COMPLEXITY_SUMMARY, summary)
    return summary


def _write_csv(path: Path, columns: dict[str, np.ndarray]) -> None:
    names = list(columns)
    n = len(next(iter(columns.values())))
    lines = [",".join(names)]
    for r in range(n):
        cells = []
        for c in names:
            v = columns[c][r]
            if isinstance(v, (float, np.floating)):
                cells.append("" if not math.isfinite(float(v)) else f"{float(v):.6g}")
            else:
                cells.append(str(v))
        lines.append(",".join(cells))
    atomic_write_text(path, "\n".join(lines) + "\n")


# ============================================================================ familiarity
def permutation_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, reps: int = 2000,
                     seed: int = 0) -> float:
    """Two-sided p-value of the difference of means of ``a`` and ``b`` under a seeded permutation test:
    ``(1 + #{|perm diff| >= |observed diff|}) / (1 + reps)``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("permutation_test: both samples need at least one value")
    if reps < 1:
        raise UsageError(f"--permutations {reps} must be >= 1")
    pooled = np.concatenate([a, b])
    observed = abs(a.mean() - b.mean())
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((reps, len(pooled))), axis=1)
    shuffled = pooled[perms]
    diffs = np.abs(shuffled[:, :len(a)].mean(1) - shuffled[:, len(a):].mean(1))
    return float((1 + np.count_nonzero(diffs >= observed - 1e-12)) / (1 + reps))


FAMILIARITY_SUMMARY = "familiarity.json"


def familiarity_analysis(ind: Measured, ood: Measured, out: str | Path, reps: int = 2000, seed: int = 0,
                         meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """In-distribution vs out-of-distribution: the mean adaptive budget and each budget's mean L1 of both
    sets with permutation-test p-values (``familiarity.json``), one row per image (``familiarity.csv``)
    and a plot (``familiarity.png``: budget histograms, L1 against budget)."""
    if ind.budgets != ood.budgets:
        raise ValueError("familiarity: both sets must be measured with the same tokenizer")
    out = claim_out(out, FAMILIARITY_SUMMARY)
    t_in, t_ood = _targets(ind), _targets(ood)
    comparisons = []
    for i, name in enumerate(t_in):
        a, b = t_in[name], t_ood[name]
        comparisons.append(dict(target=name, mean_in=round(float(a.mean()), 6), mean_ood=round(float(b.mean()), 6),
                                difference=round(float(b.mean() - a.mean()), 6),
                                p_value=round(permutation_test(a, b, reps, seed + i), 6)))
    sets = np.array(["in"] * len(ind.positions) + ["ood"] * len(ood.positions))
    table = {"set": sets, "index": np.concatenate([ind.source_indices, ood.source_indices]),
             "label": np.concatenate([ind.labels, ood.labels]),
             **{k: np.concatenate([t_in[k], t_ood[k]]) for k in t_in}}
    _write_csv(out / "familiarity.csv", table)
    budgets = list(ind.budgets)

    def hist(m: Measured) -> list[float]:
        return [float((m.lengths == k).mean()) for k in budgets]

    summary = dict(kind="familiarity", images_in=len(ind.positions), images_ood=len(ood.positions),
                   budgets=budgets, budget_histogram_in=hist(ind), budget_histogram_ood=hist(ood),
                   permutations=dict(reps=reps, seed=seed, statistic="|difference of means|, two-sided"),
                   comparisons=comparisons, table="familiarity.csv", plot="familiarity.png", **(meta or {}))

    def draw(axes: Any) -> None:
        ax = axes[0][0]
        x = np.arange(len(budgets))
        ax.bar(x - 0.2, hist(ind), 0.4, label=f"in-distribution (mean {ind.lengths.mean():.1f})")
        ax.bar(x + 0.2, hist(ood), 0.4, label=f"out-of-distribution (mean {ood.lengths.mean():.1f})")
        ax.set_xticks(x, [str(k) for k in budgets])
        ax.set_xlabel("adaptive budget (tokens)")
        ax.set_ylabel("share of images")
        ax.set_title(f"adaptive budget (permutation p = {comparisons[0]['p_value']:.3g})")
        ax.legend(fontsize=8)
        ax = axes[0][1]
        for m, label in ((ind, "in-distribution"), (ood, "out-of-distribution")):
            sem = m.l1.std(0, ddof=1) / np.sqrt(len(m.l1)) if len(m.l1) > 1 else np.zeros(len(budgets))
            ax.errorbar(budgets, m.l1.mean(0), yerr=sem, marker="o", capsize=3, label=label)
        ax.set_xticks(budgets)
        ax.set_xlabel("tokens")
        ax.set_ylabel("mean L1 (clamped decode, [0, 1])")
        ax.set_title("L1 against budget (± s.e.m.)")
        ax.legend(fontsize=8)

    _plot(out / "familiarity.png", draw, 1, 2, (5.0, 3.8))
    write_json(out / FAMILIARITY_SUMMARY, summary)
    return summary


# ============================================================================ token selection by task
@dataclass
class TaskMeasured:
    """Per image and budget what the token-count-selection (TSC) criteria read."""

    budgets: tuple[int, ...]
    labels: np.ndarray  # (n,) true classes
    l1_lengths: np.ndarray  # (n,) the L1 criterion's budget (encode_budgets at the threshold)
    l1: np.ndarray  # (n, nb) L1 of the clamped decode, [0, 1] units
    distance: np.ndarray | None  # (n, nb) perceptual distance (LPIPS) of each budget's reconstruction
    pred_recon: np.ndarray  # (n, nb) the classifier's class on each budget's reconstruction
    pred_orig: np.ndarray  # (n,) the classifier's class on the original


@torch.no_grad()
def measure_tasks(tokenizer: ALITTokenizer, dataset: ImageDataset, positions: np.ndarray, classifier: Any,
                  l1_threshold: float, distance: Any | None = None, batch_size: int = 32) -> TaskMeasured:
    """One ``encode_budgets`` pass per batch, one decode per budget; ``classifier`` maps images in [-1, 1]
    to logits, ``distance(x, y) -> (B,)`` (e.g. :class:`tokenizer.lpips.LPIPS`) is optional."""
    from .classifier import predict

    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be >= 1")
    device = next(tokenizer.parameters()).device
    budgets = tuple(tokenizer.budgets)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("labels", "len", "l1", "dist", "pr", "po")}
    for start in range(0, len(positions), batch_size):
        items = [dataset[int(p)] for p in positions[start:start + batch_size]]
        images = torch.stack([x for x, _ in items]).to(device)
        codes = tokenizer.encode_budgets(images, l1_threshold)
        assert codes.adaptive_lengths is not None
        l1, dist, pred = [], [], []
        for k in budgets:
            recon = tokenizer.decode(codes.ids[k])
            l1.append((recon - images).abs().flatten(1).mean(1).div(2).cpu().numpy())
            pred.append(predict(classifier, recon).cpu().numpy())
            if distance is not None:
                dist.append(distance(recon, images).float().cpu().numpy())
        parts["labels"].append(np.asarray([y for _, y in items], dtype=np.int64))
        parts["len"].append(codes.adaptive_lengths.cpu().numpy())
        parts["l1"].append(np.stack(l1, 1))
        parts["pr"].append(np.stack(pred, 1))
        parts["po"].append(predict(classifier, images).cpu().numpy())
        if distance is not None:
            parts["dist"].append(np.stack(dist, 1))
    cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    return TaskMeasured(budgets, cat["labels"], cat["len"].astype(np.int64), cat["l1"].astype(np.float64),
                        None if cat["dist"] is None else cat["dist"].astype(np.float64),
                        cat["pr"].astype(np.int64), cat["po"].astype(np.int64))


def first_budget(ok: np.ndarray, budgets: Sequence[int], fallback: np.ndarray) -> np.ndarray:
    """Per row of ``ok (n, nb)`` the first budget where it holds, else ``fallback (n,)`` (a budget)."""
    ok = np.asarray(ok, dtype=bool)
    b = np.asarray(budgets)
    return np.where(ok.any(1), b[ok.argmax(1)], fallback)


def tsc_choices(m: TaskMeasured, lpips_threshold: float | None = None,
                task_target: str = "prediction") -> dict[str, np.ndarray]:
    """Each criterion's budget per image: ``l1`` (encode_budgets' choice), ``lpips`` (first budget with the
    distance below ``lpips_threshold``, else the lowest-distance one), ``task`` (first budget whose
    reconstruction the classifier puts in the original's predicted class, or with ``task_target='label'``
    the true class; else the largest budget)."""
    if task_target not in ("prediction", "label"):
        raise UsageError(f"--task-target {task_target!r} is unknown: choose prediction or label")
    b = np.asarray(m.budgets)
    out = {"l1": m.l1_lengths}
    if m.distance is not None and lpips_threshold is not None:
        out["lpips"] = first_budget(m.distance < lpips_threshold, m.budgets, b[m.distance.argmin(1)])
    target = m.pred_orig if task_target == "prediction" else m.labels
    out["task"] = first_budget(m.pred_recon == target[:, None], m.budgets, np.full(len(target), b[-1]))
    return out


TSC_SUMMARY = "tsc.json"


def tsc_analysis(m: TaskMeasured, out: str | Path, lpips_threshold: float | None = None,
                 task_target: str = "prediction", meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mean token count and the task accuracy (the classifier's class on the reconstruction at the chosen
    budget against the true label) per criterion and per fixed budget: :data:`TSC_SUMMARY`, ``tsc.csv``
    and ``tsc.png`` (accuracy against mean tokens, as the paper's Fig. 5)."""
    out = claim_out(out, TSC_SUMMARY)
    choices = tsc_choices(m, lpips_threshold, task_target)
    col = {k: i for i, k in enumerate(m.budgets)}
    rows = np.arange(len(m.labels))

    def row(budgets: np.ndarray) -> dict[str, float]:
        pred = m.pred_recon[rows, [col[int(k)] for k in budgets]]
        return dict(mean_tokens=round(float(budgets.mean()), 4),
                    accuracy=round(float((pred == m.labels).mean()), 4),
                    agreement=round(float((pred == m.pred_orig).mean()), 4))

    criteria = {name: row(b) for name, b in choices.items()}
    fixed = {str(k): row(np.full(len(rows), k)) for k in m.budgets}
    summary = dict(kind="tsc", images=len(rows), budgets=list(m.budgets), task_target=task_target,
                   lpips_threshold=lpips_threshold,
                   original_accuracy=round(float((m.pred_orig == m.labels).mean()), 4),
                   criteria=criteria, fixed_budgets=fixed, table="tsc.csv", plot="tsc.png", **(meta or {}))
    table: dict[str, np.ndarray] = {"label": m.labels, "pred_original": m.pred_orig,
                                    **{f"budget_{name}": b for name, b in choices.items()},
                                    **{f"pred_{k}": m.pred_recon[:, i] for i, k in enumerate(m.budgets)},
                                    **{f"l1_{k}": m.l1[:, i] for i, k in enumerate(m.budgets)}}
    if m.distance is not None:
        table.update({f"lpips_{k}": m.distance[:, i] for i, k in enumerate(m.budgets)})
    _write_csv(out / "tsc.csv", table)

    def draw(axes: Any) -> None:
        ax = axes[0][0]
        ax.plot(list(m.budgets), [fixed[str(k)]["accuracy"] for k in m.budgets], "o-", color="grey",
                label="fixed budget")
        for name, r in criteria.items():
            ax.scatter([r["mean_tokens"]], [r["accuracy"]], s=60, zorder=3, label=f"TSC {name}")
        ax.axhline(summary["original_accuracy"], ls="--", color="k", lw=1, label="originals")
        ax.set_xlabel("mean tokens per image")
        ax.set_ylabel("classification accuracy")
        ax.set_title("task accuracy against token count")
        ax.legend(fontsize=8)

    _plot(out / "tsc.png", draw, 1, 1, (5.5, 4.0))
    write_json(out / TSC_SUMMARY, summary)
    return summary

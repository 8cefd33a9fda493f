"""Loading a token cache: peak RSS of today's int64 load vs the memory-mapped cache through TokenDataset.

A synthetic cache of the public shape (32 tokens x 8 iterations: budgets 32, 64, ..., 256; int16 ids,
int64 labels, shards of 8192 images; 200,000 images, ~0.46 GB) is written once under
``$ALIT_HOME/bench/token_cache_200k`` and reused while complete. Each way then runs in a **fresh
subprocess** (this file run as ``cache_bench measure <way> <cache> <draws>``) that loads the train split, builds the
:class:`~generator.tasks.TokenDataset` prior training builds, draws random items and reports its peak RSS
(``VmHWM``), the private (``RssAnon``) and file-backed (``RssFile``: mapped cache pages, shared by every
process of a node) parts at the end, and the seconds taken:

- ``int64``: the way of ``load_token_cache`` before the mapped reader: every shard read, ``.long()``,
  ``torch.cat``; the int64 arrays stay referenced while training (as ``train_prior`` held them).
- ``mapped``: :func:`generator.shards.open_token_cache` (read-only maps of the shards) into TokenDataset.

Both ways must draw identical items (a digest of every item is compared). The check compares what the
load adds to each process's RSS after its imports (``VmHWM`` at the end minus ``VmHWM`` before loading):
the imports (torch and its shared libraries, ~0.7-0.8 GB here, file-backed and shared too) are the same
both ways and do not grow with the cache; the totals are reported beside it. ``--quick`` uses a cache of
16,384 images (in the quick run's ALIT_HOME).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokenizer.core.io import atomic_path, atomic_write_text
from tokenizer.core.paths import cache_dir

if TYPE_CHECKING:  # run as a file by the measuring subprocess, so that it does not import the bench package
    from .report import Report
    from .timing import Settings

GROUP = "token cache: memory-mapped vs int64 load"
TOKENS_PER_ITER, NUM_ITERS = 32, 8  # the public shape
BUDGETS = tuple(TOKENS_PER_ITER * (i + 1) for i in range(NUM_ITERS))  # 32 ... 256
CODEBOOK = 4096
SHARD_SIZE = 8192
FULL_IMAGES, QUICK_IMAGES = 200_000, 16_384
WAYS = ("int64", "mapped")
KEYS = ("cache.peak_rss.mapped_over_int64", "cache.load_s.int64", "cache.load_s.mapped", "cache.draw_s.int64",
        "cache.draw_s.mapped")


# ============================================================================ the synthetic cache
def write_synthetic_cache(out: Path, num_images: int, shard_size: int = SHARD_SIZE,
                          budgets: tuple[int, ...] = BUDGETS, seed: int = 0) -> Path:
    """A token cache directory of random int16 ids (train split only), reused when complete with these sizes."""
    from generator.cache import FORMAT, FORMAT_VERSION, MANIFEST
    from tokenizer.core.checkpoint import save_tensors

    request = {"synthetic": True, "num_images": num_images, "shard_size": shard_size, "budgets": list(budgets),
               "codebook_size": CODEBOOK, "seed": seed}
    manifest_file = out / MANIFEST
    if manifest_file.is_file():
        try:
            if json.loads(manifest_file.read_text()).get("request") == request:
                return out
        except ValueError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards = []
    for s, start in enumerate(range(0, num_images, shard_size)):
        n = min(shard_size, num_images - start)
        tensors = {f"ids_{b}": torch.randint(0, CODEBOOK, (n, b), generator=g, dtype=torch.int16) for b in budgets}
        tensors["labels"] = torch.randint(0, 1000, (n,), generator=g)
        name = f"train-{s:05d}.safetensors"
        with atomic_path(out / name) as tmp:
            save_tensors(tmp, tensors)
        shards.append(name)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "request": request,
                "tokenizer": {"id": "synthetic", "path": ""}, "codebook_size": CODEBOOK,
                "tokens_per_iter": TOKENS_PER_ITER, "budgets": list(budgets), "num_classes": 1000,
                "adaptive_threshold": None, "splits": {"train": {"n": num_images, "shards": shards}}}
    atomic_write_text(manifest_file, json.dumps(manifest, indent=1))
    return out


# ============================================================================ one way, in this process
def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in bytes (ru_maxrss where /proc is missing)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    out.setdefault("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


def _load(way: str, cache: Path) -> tuple[Any, Any]:
    """(what training holds of the cache, the TokenDataset over it)."""
    from generator.tasks import TokenDataset

    if way == "int64":  # load_token_cache before the mapped reader: every shard to int64, concatenated
        from generator.cache import read_manifest
        from tokenizer.core.checkpoint import load_tensors

        manifest = read_manifest(cache)
        parts: dict[str, list[torch.Tensor]] = {}
        for shard in manifest["splits"]["train"]["shards"]:
            for k, v in load_tensors(cache / shard).items():
                parts.setdefault(k, []).append(v.long())
        cat = {k: torch.cat(v) for k, v in parts.items()}
        del parts
        ids = {int(k.split("_")[1]): v for k, v in cat.items() if k.startswith("ids_")}
        return cat, TokenDataset(ids, cat["labels"])
    if way == "mapped":
        from generator.shards import open_token_cache

        tc = open_token_cache(cache, "train")
        return tc, TokenDataset(tc.ids_by_budget, tc.labels)
    raise ValueError(f"unknown way {way!r}; choose from {WAYS}")


def measure(way: str, cache: Path, draws: int, seed: int = 0) -> dict[str, Any]:
    """Load ``cache`` ``way``, draw ``draws`` random items; peak RSS, timings and a digest of the items."""
    for module in ("generator.cache", "generator.shards", "generator.tasks", "tokenizer.core.checkpoint"):
        importlib.import_module(module)  # every import before the baseline RSS is taken
    base = _status()
    t0 = time.perf_counter()
    held, ds = _load(way, cache)
    load_s = time.perf_counter() - t0
    order = torch.randint(0, len(ds), (draws,), generator=torch.Generator().manual_seed(seed)).tolist()
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    for i in order:
        ids, length, label = ds[i]
        digest.update(ids.numpy().tobytes())
        digest.update(length.numpy().tobytes() + label.numpy().tobytes())
    draw_s = time.perf_counter() - t0
    end = _status()
    held_types = sorted({type(v).__name__ for v in ds.ids.values()})
    del held
    return {"way": way, "base": base, "end": end, "load_s": load_s, "draw_s": draw_s, "draws": draws,
            "digest": digest.hexdigest(), "items": len(ds), "held": held_types,
            "dtypes": sorted({str(v.dtype) for v in ds.ids.values()})}


def measure_in_subprocess(way: str, cache: Path, draws: int, seed: int = 0, timeout: float = 900) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (its peak RSS is that of this one load; it imports this file
    and what the load needs, not the bench package)."""
    root = Path(__file__).resolve().parents[1]
    script = ("import runpy, sys; sys.argv = ['cache_bench'] + sys.argv[1:]; "
              f"runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", script, "measure", way, str(cache), str(draws), str(seed)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring the {way} load failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ============================================================================ the benchmark
def bench_cache(settings: Settings, report: Report) -> None:
    """Peak RSS and item-draw time of both ways on the synthetic cache, each in its own process."""
    n = settings.pick(FULL_IMAGES, QUICK_IMAGES)
    draws = settings.pick(10_000, 1_000)
    cache = write_synthetic_cache(cache_dir("bench") / ("token_cache_200k" if n == FULL_IMAGES
                                                        else f"token_cache_{n}"), n)
    runs = {way: measure_in_subprocess(way, cache, draws, settings.seed) for way in WAYS}
    gb = 1e9
    peak = {w: r["end"]["VmHWM"] for w, r in runs.items()}
    grown = {w: r["end"]["VmHWM"] - r["base"]["VmHWM"] for w, r in runs.items()}
    ids_bytes = n * sum(BUDGETS) * 2
    desc = f"{n} images x budgets {BUDGETS[0]}..{BUDGETS[-1]} (int16 ids {ids_bytes / gb:.2f} GB)"
    note = (f"peak RSS {peak['mapped'] / gb:.2f} GB mapped vs {peak['int64'] / gb:.2f} GB int64; above the "
            f"post-import RSS {grown['mapped'] / gb:.2f} vs {grown['int64'] / gb:.2f} GB")
    report.add("cache.peak_rss.mapped_over_int64", peak["mapped"] / peak["int64"], "frac", GROUP,
               f"peak RSS of loading the cache into TokenDataset + {draws} random items, mapped / int64, {desc}",
               note=note, peak_bytes=peak, growth_bytes=grown, runs=runs)
    for w in WAYS:
        report.add(f"cache.load_s.{w}", runs[w]["load_s"], "s", GROUP,
                   f"seconds to open the cache and build TokenDataset ({w}; the mapped way scans the ids once)")
    for w in WAYS:
        report.add(f"cache.draw_s.{w}", runs[w]["draw_s"], "s", GROUP,
                   f"seconds to draw {draws} random (image, budget) items ({w})")
    anon = {w: r["end"].get("RssAnon", 0) - r["base"].get("RssAnon", 0) for w, r in runs.items()}
    report.table(f"token cache load ({n} images, {len(BUDGETS)} budgets)",
                 ["way", "peak RSS GB", "peak grown GB", "RssAnon grown GB", "RssFile end GB", "load s",
                  "draw s", "held"],
                 [[w, peak[w] / gb, grown[w] / gb, anon[w] / gb, r["end"].get("RssFile", 0) / gb, r["load_s"],
                   r["draw_s"], "/".join(r["held"] + r["dtypes"])] for w, r in runs.items()])
    report.check("cache.same_items", runs["int64"]["digest"] == runs["mapped"]["digest"],
                 f"digest of {draws} random items, both ways")
    ratio = grown["mapped"] / max(1, grown["int64"])
    report.check("cache.mapped_peak_rss_below_quarter", ratio < 0.25,
                 f"peak RSS added by the load (over the post-import RSS): mapped / int64 = {ratio:.3f} (must be "
                 f"< 0.25; totals {peak['mapped'] / gb:.2f} / {peak['int64'] / gb:.2f} GB = "
                 f"{peak['mapped'] / peak['int64']:.3f})")


def _main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "measure":
        seed = int(argv[4]) if len(argv) > 4 else 0
        print(json.dumps(measure(argv[1], Path(argv[2]), int(argv[3]), seed)))
        return 0
    print("usage: python bench/cache_bench.py measure int64|mapped <cache dir> <draws> [seed]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))

"""The image-folder data path: a start with the folder index built vs read from the cache, and the
images/s a torch DataLoader delivers with 0 and 2 worker processes.

The folder is synthetic: ``FULL_FILES`` small JPEGs (10 class folders, 64-96 px a side, smooth random
colour fields with a rectangle and noise, so every file decodes differently), generated once under
``$ALIT_HOME/bench/data/`` (never the source tree) and reused while its ``.complete`` marker matches.

- first start: the cached index removed, then :func:`scan_source` (list the folder, open and check every
  file, write the index). The files are in the page cache after generation, so on a cold network file
  system the first start is slower still and the ratio larger.
- second start: :func:`scan_source` again (list the directories, read the index, open no image file).
- loading: the train split at 64 px with ``random_resized_crop`` + ``hflip`` (the public augmentation),
  batches of 64 through ``DataLoader`` with ``(epoch, index)`` items as the trainer's sampler yields them.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tokenizer.core import data as data_mod
from tokenizer.core.data import DataConfig, ResizePolicy, build_dataset, folder_index, index_file, scan_source
from tokenizer.core.paths import cache_dir

from .report import Report
from .timing import Settings, compare, measure

GROUP = "data path: image-folder index and loading"
FULL_FILES, QUICK_FILES = 50_000, 300
CLASSES = 10
MARKER = ".complete"  # hidden: not an image, not indexed
FOLDER_VERSION = 1  # bump when the generated content changes


def _synthetic_image(rng: np.random.Generator) -> Image.Image:
    """A 64-96 px image: a smooth random colour field, a rectangle, a little noise."""
    w, h = (int(v) for v in rng.integers(64, 97, size=2))
    grid = rng.integers(0, 256, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    field[y0:y0 + int(rng.integers(8, h // 2 + 8)), x0:x0 + int(rng.integers(8, w // 2 + 8))] = rng.integers(0, 256, 3)
    field += rng.integers(-6, 7, size=field.shape, dtype=np.int16)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))


def synthetic_folder(files: int, seed: int = 0) -> Path:
    """``$ALIT_HOME/bench/data/jpeg<files>``: ``files`` JPEGs in ``CLASSES`` class folders (made once)."""
    name = f"jpeg{files // 1000}k" if files % 1000 == 0 else f"jpeg{files}"
    root = cache_dir("bench") / "data" / name
    spec = f"files={files} classes={CLASSES} seed={seed} version={FOLDER_VERSION}\n"
    marker = root / MARKER
    if marker.is_file() and marker.read_text() == spec:
        return root
    if root.exists():  # an interrupted or older generation
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True)
    for k in range(files):
        _synthetic_image(rng).save(root / f"class{k % CLASSES:02d}" / f"img{k:06d}.jpg", quality=90)
    marker.write_text(spec)
    return root


def _loader_pass(loader: DataLoader) -> int:
    n = 0
    for x, _ in loader:
        n += len(x)
    return n


def bench_data(settings: Settings, report: Report) -> None:
    """First vs second start of an image folder, and DataLoader images/s with 0 and 2 workers."""
    files = settings.pick(FULL_FILES, QUICK_FILES)
    root = synthetic_folder(files, settings.seed)
    cfg = DataConfig(source=str(root), resolution=64, resize=ResizePolicy.random_resized_crop, hflip=True,
                     val_fraction=0.0)

    def first_start() -> data_mod.Source:
        index_file(root).unlink(missing_ok=True)
        return scan_source(cfg)

    # no warm-up round: the first round's "first" side is what builds the cache the "second" side reads
    tim = compare({"first": first_start, "second": lambda: scan_source(cfg)},
                  dataclasses.replace(settings, warmup=0))
    first, second = tim["first"], tim["second"]
    source = second.result
    index = folder_index(root)
    what = f"{files} JPEGs in {CLASSES} class folders, 64-96 px"
    details = {"files": files, "folder": str(root), "index_bytes": index.file.stat().st_size if index.file else 0,
               "path_table_bytes": source.paths.nbytes if source.paths is not None else 0}
    report.add("data.index.first_start_s", first.median, "s", GROUP,
               f"first start: list the folder, open and check every file, write the index ({what})",
               timing=first.to_json(), **details)
    report.add("data.index.second_start_s", second.median, "s", GROUP,
               "second start: list the directories, read the cached index (no image file opened)",
               note=f"{second.median * 1e3:.1f} ms", timing=second.to_json())
    speedup = first.median / second.median
    report.add("data.index.cached_speedup", speedup, "x", GROUP, "first start time / second start time")
    report.add("data.index.second_over_first", second.median / first.median, "frac", GROUP,
               "second start time / first start time")
    same = (index.cached and len(source) == len(index.paths) == files
            and source.paths is not None and source.paths.relative_paths() == index.paths.relative_paths())
    report.check("data.index.second_start_cached", same,
                 f"the second start read the cached index ({len(source)} of {files} files, no file opened)")
    if not settings.quick:
        report.check("data.index.second_start_10x", speedup >= 10.0,
                     f"second start {speedup:.1f}x faster than the first (needs >= 10x)")

    ds = build_dataset(cfg, "train", seed=settings.seed, source=source)
    batch = settings.pick(64, 16)
    n_batches = settings.pick(4096, 32) // batch
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    batches = [[(0, i) for i in order[b * batch:(b + 1) * batch]] for b in range(n_batches)]
    for workers in (0, 2):
        loader = DataLoader(ds, batch_sampler=batches, num_workers=workers, persistent_workers=workers > 0,
                            prefetch_factor=4 if workers else None)
        tim_w = measure(lambda ld=loader: _loader_pass(ld), settings)
        images = n_batches * batch
        report.add(f"data.loader.images_per_s.w{workers}", images / tim_w.median, "img/s", GROUP,
                   f"DataLoader, {workers} workers: train split at 64 px, random_resized_crop + hflip, "
                   f"batch {batch} ({images} images a pass)", timing=tim_w.to_json(), workers=workers,
                   torch_threads=torch.get_num_threads())
        assert tim_w.result == images
        del loader

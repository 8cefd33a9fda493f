"""``alit data``: what a data source holds, how it splits, and which files were skipped.

CPU examples:
  alit data                                   # the embedded emoji set
  alit data --source path/to/images --resolution 128 --resize resize
  alit data --source images.npz --val-fraction 0.2 --split-seed 1
"""

from __future__ import annotations

import argparse

from tokenizer.core.data import DataConfig, DataError, ResizePolicy, build_dataset, scan_source

DEFAULTS = DataConfig()


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the data options (the fields of :class:`DataConfig`)."""
    parser.add_argument("--source", default=DEFAULTS.source,
                        help="'emoji' (embedded), a folder of images or an .npz file (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=DEFAULTS.resolution,
                        help="side of the square images (default: %(default)s)")
    parser.add_argument("--resize", choices=[p.value for p in ResizePolicy], default=DEFAULTS.resize.value,
                        help="how other sizes become square (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULTS.val_fraction,
                        help="share held out for validation (default: %(default)s)")
    parser.add_argument("--split-seed", type=int, default=DEFAULTS.split_seed,
                        help="seed of the train/val split (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=None, help="cap on the images of each split")
    parser.add_argument("--max-skipped", type=int, default=20,
                        help="skipped files to list (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Print the dataset summary (a data or config error is a DataError: exit 2)."""
    try:
        cfg = DataConfig(source=args.source, resolution=args.resolution, resize=ResizePolicy(args.resize),
                         val_fraction=args.val_fraction, split_seed=args.split_seed,
                         max_images=args.max_images)
    except ValueError as e:  # DataConfig's own checks (--resolution, --val-fraction, ...)
        raise DataError(str(e)) from None
    source = scan_source(cfg)
    splits = {name: build_dataset(cfg, name, source=source) for name in ("train", "val")
              if name == "train" or cfg.val_fraction > 0}
    train, val = splits["train"], splits.get("val")
    n_val = len(val) if val is not None else 0
    print(f"source      {source.description}")
    print(f"images      {len(source)} usable, {len(source.skipped)} skipped -> {len(train)} train / {n_val} val "
          f"(val_fraction {cfg.val_fraction}, split_seed {cfg.split_seed}"
          f"{f', max_images {cfg.max_images}' if cfg.max_images else ''})")
    print(f"resolution  {cfg.resolution}x{cfg.resolution} ({cfg.resize.value})")
    names = source.class_names or ["unlabeled"]
    train_counts, val_counts = train.class_counts(), (val.class_counts() if val is not None else {})
    width = max(len(n) for n in names)
    print(f"classes     {len(source.class_names) or 'none (unlabeled)'}")
    print(f"  {'class':<{width}}  {'train':>6} {'val':>6}")
    for name in names:
        print(f"  {name:<{width}}  {train_counts.get(name, 0):>6} {val_counts.get(name, 0):>6}")
    skipped = source.skipped
    print(f"skipped     {len(skipped) or 'none'}")
    for path, reason in skipped[:args.max_skipped]:
        print(f"  {path}: {reason}")
    if len(skipped) > args.max_skipped:
        print(f"  ... and {len(skipped) - args.max_skipped} more")
    return 0

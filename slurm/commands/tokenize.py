"""``alit tokenize``: encode a dataset once with a tokenizer, at every budget (and adaptively), into a token cache.

    alit tokenize --tokenizer <tokenizer run>/final --out <cache dir> [--adaptive-threshold 0.07] [data.source=emoji]
"""

from __future__ import annotations

import argparse

from tokenizer.core.data import DataSpec

from . import prologue

TAKES_OVERRIDES = True  # data.* overrides, e.g. data.source=/path/to/images


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit tokenize --tokenizer DIR --out DIR [--adaptive-threshold T] [data.key=value ...]"
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--out", required=True, help="the token cache directory to write (reused if up to date)")
    parser.add_argument("--config", default=None, help="YAML with a data: section (defaults: the emoji set)")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits (default train,val)")
    parser.add_argument("--adaptive-threshold", type=float, default=None,
                        help="also store per-image adaptive budgets at this L1 threshold ([0, 1] units)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from generator.cache import build_token_cache

    spec, _ = prologue(args, DataSpec, args.config)
    out = build_token_cache(args.tokenizer, spec.data, args.out, tuple(args.splits.split(",")),
                            args.adaptive_threshold, args.batch_size, device=args.device)
    print(f"[tokenize] token cache: {out}")
    return 0

"""``alit reconstruct``: reconstructions of a dataset split at each budget, and adaptively; shardable.

    alit reconstruct --tokenizer runs/tok/final --out recon --budgets 8,16,adaptive --adaptive-threshold 0.07 \\
        --num-images 64 [data.source=emoji]

Writes ``<out>/<tokenizer name>-<hash8>/recon-budget008/`` and ``recon-adaptive-t0.07/`` (PNGs by global
index, ``reconstructions.npz`` with images, labels, per-image budgets, L1 and split positions); the
evaluated images are the split, or its seeded class-stratified subset of ``--num-images``.
"""

from __future__ import annotations

import argparse

from tokenizer.core.data import DataSpec

from . import add_image_set_options, prologue, write_adm_copy

TAKES_OVERRIDES = True  # data.* overrides, e.g. data.source=/path/to/images
USER_ERRORS = (ValueError, KeyError)  # a budget, shard or resolution that does not fit the tokenizer


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit reconstruct --tokenizer DIR --out DIR [options] [data.key=value ...]"
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--out", required=True, help="output root; one folder per checkpoint and budget")
    parser.add_argument("--budgets", default="all,adaptive",
                        help="comma-separated budgets, 'all' and/or 'adaptive' (default all,adaptive)")
    parser.add_argument("--adaptive-threshold", type=float, default=0.07,
                        help="token-count selection: first budget with L1 below this ([0, 1] units)")
    parser.add_argument("--split", default="val", help="dataset split (train, val, all)")
    parser.add_argument("--num-images", type=int, default=None, help="a seeded stratified subset (default: all)")
    parser.add_argument("--config", default=None, help="YAML with a data: section (default: the emoji set)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per chunk and model batch")
    add_image_set_options(parser)


def run(args: argparse.Namespace) -> int:
    from sampling.generate import (
        RECONSTRUCTIONS,
        Shard,
        default_device,
        load_models,
        parse_budgets,
        reconstruct_to_folder,
    )
    from tokenizer.core.data import build_dataset

    spec, _ = prologue(args, DataSpec, args.config)
    shard = Shard.parse(args.shard)
    models = load_models(args.tokenizer, None, args.device or default_device())
    budgets = parse_budgets(args.budgets, models.tokenizer.budgets)
    dataset = build_dataset(spec.data, args.split)
    for budget in budgets:
        folder = reconstruct_to_folder(
            models.tokenizer, models.tokenizer_tag, spec.data, args.split, budget, args.out,
            threshold=args.adaptive_threshold, num_images=args.num_images, chunk_size=args.batch_size,
            shard=shard, png=not args.no_png, progress=not args.no_progress,
            identity=models.tokenizer_identity, dataset=dataset)
        print(f"[reconstruct] {folder}")
        if args.adm:
            write_adm_copy(folder, RECONSTRUCTIONS)
    return 0

"""``alit analyze``: the paper's analyses of a tokenizer's adaptive token counts.

    alit analyze complexity --tokenizer runs/tok/final --out runs/analysis/complexity [--data emoji] \\
        [--scores scores.csv] [--num-images N] [--adaptive-threshold 0.07] [data.key=value ...]

``complexity``: per image of the split, the adaptive budget and the L1 of every budget (one encode pass)
against PNG bits per pixel, JPEG bits per pixel at quality 75, the mean gradient magnitude and the columns
of ``--scores`` (a CSV with an ``index`` column: the source index, as in the table), as Spearman
correlations with seeded bootstrap 95% intervals: ``complexity.csv``, ``complexity.json``, ``complexity.png``.
"""

from __future__ import annotations

import argparse

from tokenizer.core.errors import UsageError

from .inspect import add_data_options, load_spec

TAKES_OVERRIDES = True  # data.* overrides, e.g. data.max_images=64
USER_ERRORS = (ValueError, KeyError)
ANALYSES = ("complexity",)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("alit analyze {" + ",".join(ANALYSES) + "} --tokenizer DIR --out DIR [options] "
                    "[data.key=value ...]")
    parser.add_argument("analysis", choices=ANALYSES, help="which analysis")
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--out", required=True, help="output folder (created; refused if it holds other files)")
    parser.add_argument("--num-images", type=int, default=None, help="a seeded stratified subset (default: all)")
    parser.add_argument("--adaptive-threshold", type=float, default=0.07,
                        help="token-count selection: first budget with L1 below this ([0, 1] units)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap / permutations")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each correlation")
    parser.add_argument("--scores", default=None, help="complexity: a CSV of per-image scores (index,score,...)")
    add_data_options(parser)


def run(args: argparse.Namespace) -> int:
    from sampling.analysis import complexity_analysis, measure_tokenizer, read_scores
    from sampling.generate import default_device, eval_positions, load_models
    from tokenizer.core.data import build_dataset

    if args.num_images is not None and args.num_images < 1:
        raise UsageError(f"--num-images {args.num_images} must be >= 1")
    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap {args.bootstrap} must be >= 0")
    spec = load_spec(args)
    models = load_models(args.tokenizer, None, args.device or default_device())
    dataset = build_dataset(spec.data, args.split)
    positions = eval_positions(dataset, args.num_images, spec.data.split_seed)
    scores = read_scores(args.scores, dataset.indices[positions]) if args.scores else None
    meta = dict(tokenizer=str(args.tokenizer), tokenizer_id=models.tokenizer_identity["id"],
                data=spec.data.source, split=args.split, threshold=args.adaptive_threshold)
    measured = measure_tokenizer(models.tokenizer, dataset, positions, args.adaptive_threshold, args.batch_size)
    summary = complexity_analysis(measured, args.out, scores, reps=args.bootstrap, seed=args.seed, meta=meta)
    for c in summary["correlations"]:
        if c["target"] == "adaptive_budget":
            print(f"[analyze] Spearman(adaptive budget, {c['measure']}) = {c['rho']} "
                  f"(95% CI {c['ci95'][0]}..{c['ci95'][1]}, n={c['n']})")
    print(f"[analyze] complexity of {summary['images']} images -> {args.out}")
    return 0

"""``alit analyze``: the paper's analyses of a tokenizer's adaptive token counts.

    alit analyze complexity --tokenizer runs/tok/final --out runs/analysis/complexity [--data emoji] \\
        [--scores scores.csv] [--num-images N] [--adaptive-threshold 0.07] [data.key=value ...]

``complexity``: per image of the split, the adaptive budget and the L1 of every budget (one encode pass)
against PNG bits per pixel, JPEG bits per pixel at quality 75, the mean gradient magnitude and the columns
of ``--scores`` (a CSV with an ``index`` column: the source index, as in the table), as Spearman
correlations with seeded bootstrap 95% intervals: ``complexity.csv``, ``complexity.json``, ``complexity.png``.

    alit analyze familiarity --tokenizer runs/tok/final --ood DATA --out runs/analysis/familiarity

``familiarity``: the same measurements on ``--ood`` (a folder of images or an .npz, all of it by default:
``--ood-split``) against the in-distribution split (``--split``, default val), with the means, seeded
permutation-test p-values and a plot: ``familiarity.csv``, ``familiarity.json``, ``familiarity.png``.
"""

from __future__ import annotations

import argparse
import dataclasses

from tokenizer.core.errors import UsageError

from .inspect import add_data_options, load_spec

TAKES_OVERRIDES = True  # data.* overrides, e.g. data.max_images=64
USER_ERRORS = (ValueError, KeyError)
ANALYSES = ("complexity", "familiarity")


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
    parser.add_argument("--ood", default=None, help="familiarity: the out-of-distribution images (folder or .npz)")
    parser.add_argument("--ood-split", default="all", help="familiarity: the split of --ood (default all)")
    parser.add_argument("--permutations", type=int, default=2000, help="familiarity: permutations per test")
    add_data_options(parser)


def run(args: argparse.Namespace) -> int:
    from sampling.analysis import complexity_analysis, familiarity_analysis, measure_tokenizer, read_scores
    from sampling.generate import default_device, eval_positions, load_models
    from tokenizer.core.data import build_dataset

    if args.num_images is not None and args.num_images < 1:
        raise UsageError(f"--num-images {args.num_images} must be >= 1")
    if args.permutations < 1:
        raise UsageError(f"--permutations {args.permutations} must be >= 1")
    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap {args.bootstrap} must be >= 0")
    if args.analysis == "familiarity" and not args.ood:
        raise UsageError("analyze familiarity needs --ood DATA: a folder of images or an .npz of "
                         "out-of-distribution images")
    if args.analysis != "familiarity" and args.ood:
        raise UsageError(f"--ood is for analyze familiarity, not {args.analysis}")
    if args.analysis != "complexity" and args.scores:
        raise UsageError(f"--scores is for analyze complexity, not {args.analysis}")
    spec = load_spec(args)
    models = load_models(args.tokenizer, None, args.device or default_device())
    dataset = build_dataset(spec.data, args.split)
    positions = eval_positions(dataset, args.num_images, spec.data.split_seed)
    scores = read_scores(args.scores, dataset.indices[positions]) if args.scores else None
    meta = dict(tokenizer=str(args.tokenizer), tokenizer_id=models.tokenizer_identity["id"],
                data=spec.data.source, split=args.split, threshold=args.adaptive_threshold)
    measured = measure_tokenizer(models.tokenizer, dataset, positions, args.adaptive_threshold, args.batch_size)
    if args.analysis == "familiarity":
        ood_data = dataclasses.replace(spec.data, source=str(args.ood))
        ood = build_dataset(ood_data, args.ood_split)
        ood_positions = eval_positions(ood, args.num_images, ood_data.split_seed)
        ood_measured = measure_tokenizer(models.tokenizer, ood, ood_positions, args.adaptive_threshold,
                                         args.batch_size)
        meta.update(ood=str(args.ood), ood_split=args.ood_split)
        summary = familiarity_analysis(measured, ood_measured, args.out, reps=args.permutations, seed=args.seed,
                                       meta=meta)
        for c in summary["comparisons"]:
            print(f"[analyze] {c['target']}: in {c['mean_in']} vs ood {c['mean_ood']} (p = {c['p_value']})")
        print(f"[analyze] familiarity of {summary['images_in']} + {summary['images_ood']} images -> {args.out}")
        return 0
    summary = complexity_analysis(measured, args.out, scores, reps=args.bootstrap, seed=args.seed, meta=meta)
    for c in summary["correlations"]:
        if c["target"] == "adaptive_budget":
            print(f"[analyze] Spearman(adaptive budget, {c['measure']}) = {c['rho']} "
                  f"(95% CI {c['ci95'][0]}..{c['ci95'][1]}, n={c['n']})")
    print(f"[analyze] complexity of {summary['images']} images -> {args.out}")
    return 0

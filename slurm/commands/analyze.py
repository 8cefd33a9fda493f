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

    alit analyze train-classifier [--out DIR] [--steps 400]
    alit analyze tsc --tokenizer runs/tok/final --out runs/analysis/tsc [--classifier DIR] [--lpips-threshold 0.2]

``train-classifier``: the default task classifier, a small CNN trained on the dataset's classes (the
embedded emoji set's 10 categories; never downloaded), saved to ``--out`` (default
``$ALIT_HOME/models/classifier-emoji``). ``tsc``: token-count selection by L1 (``--adaptive-threshold``),
by LPIPS (``--lpips-threshold``) and by task (the smallest budget whose reconstruction the classifier puts
in the original's predicted class, ``--task-target label``: the true class), with each criterion's mean
token count and task accuracy: ``tsc.csv``, ``tsc.json``, ``tsc.png``.
"""

from __future__ import annotations

import argparse
import dataclasses

from tokenizer.core.data import DataSpec
from tokenizer.core.errors import UsageError

from .inspect import add_data_options, load_spec

TAKES_OVERRIDES = True  # data.* overrides, e.g. data.max_images=64
USER_ERRORS = (ValueError, KeyError)
ANALYSES = ("complexity", "familiarity", "tsc", "train-classifier")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("alit analyze {" + ",".join(ANALYSES) + "} --tokenizer DIR --out DIR [options] "
                    "[data.key=value ...]")
    parser.add_argument("analysis", choices=ANALYSES, help="which analysis")
    parser.add_argument("--tokenizer", default=None, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--out", default=None, help="output folder (created; refused if it holds other files)")
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
    parser.add_argument("--classifier", default=None,
                        help="tsc: a classifier directory (default: $ALIT_HOME/models/classifier-emoji)")
    parser.add_argument("--lpips-threshold", type=float, default=None,
                        help="tsc: also the LPIPS criterion, first budget with LPIPS below this (e.g. 0.2)")
    parser.add_argument("--task-target", default="prediction", choices=("prediction", "label"),
                        help="tsc: the task criterion keeps the original's predicted class, or the true label")
    parser.add_argument("--steps", type=int, default=400, help="train-classifier: optimizer steps")
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
    if args.analysis == "train-classifier":
        return _train_classifier(args)
    for flag in ("tokenizer", "out"):
        if getattr(args, flag) is None:
            raise UsageError(f"analyze {args.analysis} needs --{flag}")
    spec = load_spec(args)
    if args.analysis == "tsc":
        return _tsc(args, spec)
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


def _train_classifier(args: argparse.Namespace) -> int:
    from sampling.classifier import default_classifier_dir, train_classifier
    from sampling.generate import default_device
    from tokenizer.core.data import build_dataset

    spec = load_spec(args)
    out = args.out or default_classifier_dir()
    train, val = build_dataset(spec.data, "train"), build_dataset(spec.data, "val")
    model, stats = train_classifier(train, val, steps=args.steps, batch_size=args.batch_size * 2,
                                    seed=args.seed, device=args.device or default_device())
    stats.update(data=spec.data.source)
    model.save_pretrained(out, stats)
    print(f"[analyze] classifier ({len(model.config.class_names)} classes): val accuracy "
          f"{stats['val_accuracy']} (chance {stats['chance']}) -> {out}")
    return 0


def _tsc(args: argparse.Namespace, spec: DataSpec) -> int:
    from sampling.analysis import measure_tasks, tsc_analysis
    from sampling.classifier import TinyClassifier, default_classifier_dir
    from sampling.generate import default_device, eval_positions, load_models
    from tokenizer.core.data import build_dataset
    from tokenizer.core.pretrained import is_model_dir

    classifier_dir = args.classifier or default_classifier_dir()
    if not is_model_dir(classifier_dir):
        raise UsageError(f"no classifier at {classifier_dir}: train one with alit analyze train-classifier "
                         f"(--out {classifier_dir}) or pass --classifier DIR")
    device = args.device or default_device()
    models = load_models(args.tokenizer, None, device)
    classifier = TinyClassifier.from_pretrained(classifier_dir, device)
    data = spec.data
    dataset = build_dataset(data, args.split)
    if classifier.config.resolution != dataset.resolution or classifier.config.num_classes != dataset.num_classes:
        raise UsageError(f"classifier {classifier_dir} is for {classifier.config.num_classes} classes at "
                         f"{classifier.config.resolution} px, the data has {dataset.num_classes} at "
                         f"{dataset.resolution}; train one on this data (alit analyze train-classifier)")
    distance = None
    if args.lpips_threshold is not None:
        from tokenizer.lpips import LPIPS

        distance = LPIPS().to(device)
    positions = eval_positions(dataset, args.num_images, data.split_seed)
    measured = measure_tasks(models.tokenizer, dataset, positions, classifier, args.adaptive_threshold, distance,
                             args.batch_size)
    meta = dict(tokenizer=str(args.tokenizer), tokenizer_id=models.tokenizer_identity["id"],
                classifier=str(classifier_dir), data=data.source, split=args.split,
                l1_threshold=args.adaptive_threshold)
    summary = tsc_analysis(measured, args.out, args.lpips_threshold, args.task_target, meta)
    for name, r in summary["criteria"].items():
        print(f"[analyze] TSC {name}: {r['mean_tokens']} tokens, accuracy {r['accuracy']} "
              f"(agreement {r['agreement']})")
    print(f"[analyze] originals accuracy {summary['original_accuracy']}; tsc of {summary['images']} images "
          f"-> {args.out}")
    return 0

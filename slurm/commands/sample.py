"""``alit sample``: images from a prior + tokenizer at one or more budgets (or adaptive budgets); shardable.

    alit sample --tokenizer runs/tok/final --prior runs/prior/final --budgets 16,adaptive --num-images 64 \\
        --cfg 1.5 --out samples
    alit sample ... --shard 0/4      # one of four jobs: the same images as one job; samples.npz appears
                                     # when the last of the four finishes

Writes ``<out>/<prior name>-<hash8>/budget016-cfg1.5-seed0/`` (PNGs by global index, ``samples.npz``,
``samples.json``); see :mod:`sampling.generate`. A prior trained for another tokenizer is refused.
"""

from __future__ import annotations

import argparse

from tokenizer.core.errors import UsageError

from . import add_image_set_options

USER_ERRORS = (ValueError, KeyError)  # a budget, class or shard that does not fit the prior


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--prior", required=True, help="a saved prior directory (a prior run's final/)")
    parser.add_argument("--out", required=True, help="output root; one folder per checkpoint and request")
    parser.add_argument("--budgets", default="max",
                        help="comma-separated token budgets, 'all', 'max' (default) and/or 'adaptive' (budgets "
                             "drawn per class from the token cache's adaptive lengths)")
    parser.add_argument("--num-images", type=int, default=64, help="images per budget (global indices 0..N-1)")
    parser.add_argument("--class", dest="classes", default="all",
                        help="'all' (round-robin over classes, default), 'none' (null class) or a class id")
    parser.add_argument("--cfg", type=float, default=0.0, help="guidance scale: cond + s (cond - uncond); 0 = none")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--steps", type=int, default=8, help="MaskGIT decoding steps")
    parser.add_argument("--top-k", type=int, default=0, help="AR priors: top-k filtering (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="AR priors: nucleus filtering (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request (chunk c uses (seed, c))")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per chunk and model batch; part of the result (keep it fixed across shards)")
    parser.add_argument("--tokens", default=None,
                        help="token cache for 'adaptive' (default: the one the prior was trained on)")
    add_image_set_options(parser)


def run(args: argparse.Namespace) -> int:
    from generator.cache import prior_token_cache
    from sampling.generate import (
        ADAPTIVE,
        SampleSettings,
        Shard,
        budget_probs_from_cache,
        default_device,
        load_models,
        parse_budgets,
        parse_classes,
        sample_to_folder,
    )

    shard = Shard.parse(args.shard)
    classes = parse_classes(args.classes)
    models = load_models(args.tokenizer, args.prior, args.device or default_device())
    prior = models.require_prior()
    budgets = parse_budgets(args.budgets, prior.space.budgets)
    probs = None
    if ADAPTIVE in budgets:
        cache = args.tokens or prior_token_cache(args.prior)
        if cache is None:
            raise UsageError("'adaptive' needs the prior's token cache: pass --tokens <cache dir>")
        probs = budget_probs_from_cache(cache, prior.space, "train", models.tokenizer_identity)
    for budget in budgets:
        settings = SampleSettings(budget=budget, num_images=args.num_images, cfg_scale=args.cfg,
                                  temperature=args.temperature, steps=args.steps, seed=args.seed,
                                  classes=classes, chunk_size=args.batch_size, top_k=args.top_k,
                                  top_p=args.top_p)
        folder = sample_to_folder(models, settings, args.out, shard, probs if budget == ADAPTIVE else None,
                                  png=not args.no_png, progress=not args.no_progress)
        print(f"[sample] {folder}")
    return 0

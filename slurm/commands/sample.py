"""``alit sample``: images from a prior + tokenizer at one or more budgets (or adaptive budgets); shardable.

    alit sample --tokenizer runs/tok/final --prior runs/prior/final --budgets 16,adaptive --num-images 64 \\
        --cfg 1.5 --out samples
    alit sample ... --shard 0/4      # one of four jobs: the same images as one job; samples.npz appears
                                     # when the last of the four finishes

``--budgets adaptive`` lets the prior's length model choose each image's budget (a prior trained with
``data_mode=adaptive|mixture``; ``--budget-temperature`` and ``--max-budget`` bias it); ``--length-model
histogram`` draws them from the token cache's TSC histogram instead (the baseline, and the only choice for a
prior without a length model).

Every sampler setting has a flag (``--cfg --cfg-schedule --temperature --temperature-schedule
--choice-temperature --choice-schedule --steps --mask-schedule`` for MaskGIT, ``--top-k --top-p`` for AR;
a flag the prior's kind does not use is refused). Unset ones come from the prior's ``sampling.json`` (its
``default``, then the budget's own entry; ``--preset FILE`` for another file, ``--no-preset`` for none), then
the samplers' defaults; see :mod:`sampling.presets`.

Writes ``<out>/<prior name>-<hash8>/budget016-cfg1.5-seed0/`` (PNGs by global index, ``samples.npz``,
``samples.json`` with every setting sampled with); see :mod:`sampling.generate`. A prior trained for another
tokenizer is refused.
"""

from __future__ import annotations

import argparse
import sys

from sampling.presets import add_sampler_arguments
from tokenizer.core.errors import UsageError

from . import add_image_set_options, write_adm_copy

USER_ERRORS = (ValueError, KeyError)  # a budget, class or shard that does not fit the prior


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--prior", required=True, help="a saved prior directory (a prior run's final/)")
    parser.add_argument("--out", required=True, help="output root; one folder per checkpoint and request")
    parser.add_argument("--budgets", default="max",
                        help="comma-separated token budgets, 'all', 'max' (default) and/or 'adaptive' (the prior "
                             "chooses each image's budget; see --length-model)")
    parser.add_argument("--length-model", choices=("learned", "histogram"), default="learned",
                        help="adaptive budgets: 'learned' (the prior's p(budget | class), default) or 'histogram' "
                             "(drawn per class from the token cache's TSC lengths: the baseline)")
    parser.add_argument("--budget-temperature", type=float, default=1.0,
                        help="adaptive, learned: temperature of the budget choice (< 1 sharper, 0 = most likely)")
    parser.add_argument("--max-budget", type=int, default=None,
                        help="adaptive, learned: never choose a budget above this one")
    parser.add_argument("--num-images", type=int, default=64, help="images per budget (global indices 0..N-1)")
    parser.add_argument("--class", dest="classes", default="all",
                        help="'all' (round-robin over classes, default), 'none' (null class) or a class id")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request (chunk c uses (seed, c))")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per chunk and model batch; part of the result (keep it fixed across shards)")
    parser.add_argument("--tokens", default=None,
                        help="token cache for 'adaptive' (default: the one the prior was trained on)")
    add_image_set_options(parser)
    add_sampler_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from generator.cache import prior_token_cache
    from sampling.generate import (
        ADAPTIVE,
        SAMPLES,
        SampleSettings,
        Shard,
        budget_probs_from_cache,
        default_device,
        load_models,
        parse_budgets,
        parse_classes,
        sample_to_folder,
    )
    from sampling.presets import command_settings, for_budget

    shard = Shard.parse(args.shard)
    classes = parse_classes(args.classes)
    models = load_models(args.tokenizer, args.prior, args.device or default_device())
    prior = models.require_prior()
    budgets = parse_budgets(args.budgets, prior.space.budgets)
    base, per_budget, preset = command_settings(args, args.prior, prior.kind, prior.space.budgets)
    if preset.path is not None:
        print(f"[sample] sampler settings from {preset.path} (flags override them)", file=sys.stderr)
    probs = None
    learned = args.length_model == "learned"
    if (args.budget_temperature != 1.0 or args.max_budget is not None) and not (ADAPTIVE in budgets and learned):
        raise UsageError("--budget-temperature and --max-budget bias the learned length model: use them with "
                         "--budgets adaptive (and --length-model learned)")
    if args.max_budget is not None and args.max_budget not in prior.space.budgets:
        raise UsageError(f"--max-budget {args.max_budget} is not one of the prior's budgets {prior.space.budgets}")
    if ADAPTIVE in budgets and learned and not prior.has_length_model:
        raise UsageError(f"'adaptive' with the learned length model: prior {args.prior} has none (trained with "
                         "data_mode=all_budgets); pass --length-model histogram to draw budgets from the token "
                         "cache's TSC histogram, or retrain the prior with data_mode=adaptive or mixture")
    if ADAPTIVE in budgets and not learned:
        cache = args.tokens or prior_token_cache(args.prior)
        if cache is None:
            raise UsageError("'adaptive' with --length-model histogram needs the prior's token cache: pass "
                             "--tokens <cache dir>")
        probs = budget_probs_from_cache(cache, prior.space, "train", models.tokenizer_identity)
    for budget in budgets:
        adaptive = budget == ADAPTIVE
        settings = SampleSettings(budget=budget, num_images=args.num_images, seed=args.seed,
                                  classes=classes, chunk_size=args.batch_size, length_model=args.length_model,
                                  budget_temperature=args.budget_temperature if adaptive else 1.0,
                                  max_budget=args.max_budget if adaptive else None,
                                  **for_budget(base, per_budget, budget))
        folder = sample_to_folder(models, settings, args.out, shard, probs if budget == ADAPTIVE else None,
                                  png=not args.no_png, progress=not args.no_progress)
        print(f"[sample] {folder}")
        if args.adm:
            write_adm_copy(folder, SAMPLES)
    return 0

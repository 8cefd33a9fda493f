"""``alit eval``: the per-token-count evaluation of a tokenizer (and optionally a prior) into a report folder.

    alit eval --tokenizer runs/tok/final --num-images 64 --out reports/tok            # rFID, L1, LPIPS, TSC
    alit eval --tokenizer runs/tok/final --prior runs/prior/final --cfg 1.5 --out reports/tok_prior  # + gFID
    alit eval ... --shard 3/8         # one of eight jobs; the job that completes the set writes the report

Writes ``report.json``, ``report.md``, ``fid_vs_tokens.png``, ``reconstructions.png``,
``samples_<budget>.png`` and ``adaptive_histogram.png`` (see :mod:`sampling.report`). Feature statistics
of every (kind, budget, shard) piece are cached under ``$ALIT_HOME/features/eval``: a re-run reuses them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizer.core.checkpoint import CheckpointError
from tokenizer.core.config import ConfigError, load_config
from tokenizer.core.data import DataError

from .reconstruct_cmd import DataSpec

TAKES_OVERRIDES = True  # data.* overrides, e.g. data.source=/path/to/images


def _threshold(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "off") else float(text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit eval --tokenizer DIR [--prior DIR] [options] [data.key=value ...]"
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--prior", default=None, help="a saved prior directory: adds gFID per budget")
    parser.add_argument("--out", default=None,
                        help="report folder (default: $ALIT_RUNS/eval/<tokenizer>[+<prior>])")
    parser.add_argument("--budgets", default="all", help="comma-separated token budgets or 'all' (default)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="evaluated images of the split (seeded stratified subset) and samples per budget "
                             "(default: the whole split)")
    parser.add_argument("--split", default="val", help="dataset split (train, val, all)")
    parser.add_argument("--protocol", default="torch_fidelity", help="FID protocol: torch_fidelity | clean_fid")
    parser.add_argument("--cfg", type=float, default=0.0, help="gFID guidance scale (0 = none)")
    parser.add_argument("--temperature", type=float, default=1.0, help="gFID sampling temperature")
    parser.add_argument("--steps", type=int, default=8, help="gFID MaskGIT decoding steps")
    parser.add_argument("--seed", type=int, default=0, help="gFID sampling seed")
    parser.add_argument("--adaptive-threshold", type=_threshold, default=0.07,
                        help="token-count selection threshold (L1, [0, 1] units), or 'none' to skip")
    parser.add_argument("--tokens", default=None,
                        help="the prior's token cache, for adaptive gFID (default: from the prior run's config)")
    parser.add_argument("--config", default=None, help="YAML with a data: section (default: the emoji set)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per chunk and model batch")
    parser.add_argument("--shard", default="0/1", help="i/n: evaluate shard i of n of every piece (default 0/1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from sampling.generate import Shard, default_device, load_models, parse_budgets
    from sampling.report import EvalSettings, Evaluation
    from tokenizer.core.paths import runs_dir

    try:
        spec = load_config(DataSpec, args.config, args.overrides)
        shard = Shard.parse(args.shard)
        device = args.device or default_device()
        models = load_models(args.tokenizer, args.prior, device)
        budgets = parse_budgets(args.budgets, models.tokenizer.budgets, allow_adaptive=False)
        settings = EvalSettings(budgets=tuple(int(b) for b in budgets), num_images=args.num_images,
                                split=args.split, protocol=args.protocol, cfg_scale=args.cfg,
                                temperature=args.temperature, steps=args.steps, seed=args.seed,
                                adaptive_threshold=args.adaptive_threshold, chunk_size=args.batch_size)
        evaluation = Evaluation(models, spec.data, settings, device=device, progress=not args.no_progress,
                                tokens=args.tokens)
        name = models.tokenizer_tag + (f"+{models.prior_tag}" if models.prior is not None else "")
        out = Path(args.out) if args.out else runs_dir() / "eval" / name
        report = evaluation.run(out, shard)
    except (ConfigError, DataError, ValueError, KeyError, FileNotFoundError, CheckpointError) as e:
        print(f"alit eval: {e}", file=sys.stderr)
        return 2
    if report is None:
        return 0
    print(f"[eval] {out}")
    print("budget    rFID    gFID      L1   LPIPS")
    for e in report["budgets"]:
        gfid = f"{e['gfid']:7.2f}" if e["gfid"] is not None else "      -"
        print(f"{e['budget']:6d} {e['rfid']:7.2f} {gfid} {e['l1']:7.4f} {e['lpips']:7.4f}")
    a = report["adaptive"]
    if a is not None:
        gfid = f"{a['gfid']:7.2f}" if a["gfid"] is not None else "      -"
        print(f"  TSC {a['rfid']:7.2f} {gfid} {a['l1']:7.4f} {a['lpips']:7.4f}  (mean {a['mean_tokens']:.1f} tokens)")
    return 0

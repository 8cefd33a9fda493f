"""``python -m bench`` (``make bench``): run the benchmarks, print the table, write the JSON report.

    python -m bench                       # everything, ~5 minutes on 2 CPU cores
    python -m bench --quick               # smoke-test sizes (seconds; the numbers mean nothing)
    python -m bench --only encode packing # some groups (the matmul peak always runs)
    python -m bench --device cuda         # on a GPU: bf16 figures and xformers vs SDPA too

Exit status 1 when a correctness check that rides along (equal ids, equal tokens, equal logits) fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import GROUPS, default_output, run
from .timing import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (the smoke test)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison, at most")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop adding rounds to a comparison after this long (at least 3 rounds)")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=None, help="run only these groups")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report path (default $ALIT_HOME/bench/results/bench-<date>.json)")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings.quick_settings(device, args.threads) if args.quick else Settings(device=device,
                                                                                          threads=args.threads)
    if args.repeats is not None:
        settings.repeats = args.repeats
        settings.min_repeats = min(settings.min_repeats, args.repeats)
    if args.max_seconds is not None:
        settings.max_seconds = args.max_seconds
    report = run(settings, tuple(args.only) if args.only else None)
    out = args.out or default_output(args.quick)
    report.write(out)
    print(report.render())
    print(f"[bench] JSON report: {out}")
    failed = [name for name, c in report.checks.items() if not c["ok"]]
    if failed:
        print(f"[bench] FAILED checks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

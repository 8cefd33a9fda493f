"""``alit sweep``: one training command over a grid of overrides, as one Slurm job array.

    alit sweep configs/sweeps/distill_lr_emoji_cpu.yaml base=<vq run>/final      # submit, wait, summarize
    alit sweep configs/sweeps/distill_lr_emoji_cpu.yaml base=... --no-wait       # submit, print the array id
    alit sweep --status $ALIT_RUNS/sweeps/distill_lr_emoji_cpu                   # refresh the summary
    alit sweep configs/sweeps/distill_lr_emoji_cpu.yaml base=... --cluster local # no Slurm: subprocesses here

The sweep file format is described in :mod:`slurm.sweep`. Trailing ``key=value`` overrides apply to every
point; ``slurm.key=value`` ones and the resource flags set the jobs' resources. Points that finished in
an earlier submission are reused, never rerun; unfinished ones resume from their checkpoints.
"""

from __future__ import annotations

import argparse
import sys

from tokenizer.core.errors import EXIT_FAILED, UsageError

from ..launcher import SlurmJobError, add_cluster_arguments, slurm_config_from_args
from ..sweep import (
    ACTIVE_STATES,
    SUMMARY_MD,
    load_sweep,
    plan,
    print_summary,
    read_state,
    submit_sweep,
    sweep_dir_of,
    write_summary,
)
from . import check_job_flags, split_overrides

TAKES_OVERRIDES = True  # trailing key=value pairs arrive as args.overrides


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("alit sweep SWEEP.yaml [--cluster slurm|local|debug] [options] [key=value ...]\n"
                    "       alit sweep --status SWEEP_DIR")
    parser.add_argument("sweep", nargs="?", help="sweep YAML (see configs/sweeps/ and slurm/sweep.py)")
    parser.add_argument("--status", metavar="SWEEP_DIR", default=None,
                        help="refresh and print the summary of a submitted sweep (while it runs or after)")
    parser.add_argument("--out", default=None,
                        help="sweep directory (default: the file's out:, else $ALIT_RUNS/sweeps/<name>)")
    parser.add_argument("--dry-run", action="store_true", help="list the points and their run directories only")
    parser.add_argument("--refresh", type=float, default=30.0,
                        help="seconds between summary refreshes while waiting (default 30)")
    add_cluster_arguments(parser, default="slurm")


def run(args: argparse.Namespace) -> int:
    own, slurm_overrides = split_overrides(args)
    if args.status is not None:
        if args.sweep or own or slurm_overrides:
            raise UsageError("--status takes a sweep directory only (no sweep file, no overrides)")
        summary = write_summary(args.status)
        print_summary(summary)
        return 0
    if not args.sweep:
        raise UsageError("name a sweep file (alit sweep SWEEP.yaml) or --status SWEEP_DIR")
    check_job_flags(args, [])  # the resources are the jobs' (--cluster is slurm by default)
    sweep = load_sweep(args.sweep, own)
    slurm = slurm_config_from_args(args, slurm_overrides, section=sweep.slurm)
    if args.dry_run:
        sweep_dir = sweep_dir_of(sweep, args.out)
        points = plan(sweep, sweep_dir)
        print(f"{len(points)} points of sweep '{sweep.name}' (alit {sweep.command}) in {sweep_dir}:")
        for p in points:
            print(f"  {p.name}: {p.overrides}")
        return 0
    submitted = submit_sweep(sweep, cluster=args.cluster, slurm=slurm, out=args.out)
    ids = sorted({j.job_id.split("_")[0] if args.cluster == "slurm" else j.job_id for j in submitted.jobs.values()})
    state = read_state(submitted.dir) or {}
    print(f"[sweep] {state.get('name')}: {len(state.get('points', []))} points in {submitted.dir}", file=sys.stderr)
    if submitted.jobs:
        what = "array" if args.cluster == "slurm" else "jobs"
        print(f"[sweep] submitted {len(submitted.jobs)} point(s) as {args.cluster} {what} {', '.join(ids)}; "
              f"logs: {submitted.dir / 'slurm'}", file=sys.stderr)
    if submitted.reused:
        print(f"[sweep] reused {len(submitted.reused)} finished point(s): {', '.join(submitted.reused)}",
              file=sys.stderr)
    if submitted.running:
        busy = ", ".join(f"{n} (job {j})" for n, j in submitted.running.items())
        print(f"[sweep] left alone, still running from an earlier submission: {busy}", file=sys.stderr)
    print(f"[sweep] summary: {submitted.dir / SUMMARY_MD} (refresh: alit sweep --status {submitted.dir})",
          file=sys.stderr, flush=True)
    if args.no_wait:
        if ids:
            print(" ".join(ids))
        return 0
    try:
        summary = submitted.wait(refresh_s=args.refresh)
    except SlurmJobError as e:
        print_summary(submitted.refresh())
        print(f"alit sweep: {e}", file=sys.stderr)
        return EXIT_FAILED
    print_summary(summary)
    failed = set(summary["counts"]) - {"COMPLETED"} - ACTIVE_STATES  # points still running from before are no failure
    return EXIT_FAILED if failed else 0

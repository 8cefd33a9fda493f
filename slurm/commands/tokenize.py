"""``alit tokenize``: encode a dataset once with a tokenizer, at every budget (and adaptively), into a token cache.

    alit tokenize --tokenizer <tokenizer run>/final --out <cache dir> [--adaptive-threshold 0.07] [data.source=emoji]
    alit tokenize ... --shard 2/8                        # shard files 2, 10, 18, ... in this process
    alit tokenize ... --cluster slurm --shards 8 --gpus 1  # a job array of 8 tasks and a merge job

One encoder pass per batch gives the ids of every budget and the adaptive choice; images are read by a
DataLoader with ``--num-workers`` workers. Shard files already written are reused, so a requeued task or
a re-submitted command continues; the run that completes the set writes the manifest.
"""

from __future__ import annotations

import argparse

from tokenizer.core.data import DataSpec
from tokenizer.core.errors import UsageError

from ..launcher import add_cluster_arguments, slurm_config_from_args
from . import prologue, shard_flags_problem

TAKES_OVERRIDES = True  # data.* overrides, e.g. data.source=/path/to/images; slurm.* ones set job resources


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("alit tokenize --tokenizer DIR --out DIR [--adaptive-threshold T] [--shard i/n | --cluster "
                    "C --shards N] [data.key=value ...]")
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--out", required=True, help="the token cache directory to write (reused if up to date)")
    parser.add_argument("--config", default=None, help="YAML with a data: section (defaults: the emoji set)")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits (default train,val)")
    parser.add_argument("--adaptive-threshold", type=float, default=None,
                        help="also store per-image adaptive budgets at this L1 threshold ([0, 1] units)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8192, help="images per shard file (default 8192)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers reading the images")
    parser.add_argument("--shard", default=None,
                        help="i/n: encode shard files i, i+n, ... in this process (the last run writes the manifest)")
    parser.add_argument("--shards", type=int, default=None, help="with --cluster: array tasks (default 1)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu; with --cluster: in each job)")
    add_cluster_arguments(parser)


def _flag_problem(args: argparse.Namespace, slurm_overrides: list[str]) -> str | None:
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.num_workers < 0:
        return f"--num-workers must be >= 0, got {args.num_workers}"
    return shard_flags_problem(args, slurm_overrides)


def run(args: argparse.Namespace) -> int:
    from sampling.generate import Shard, default_device

    from ..tokenize_jobs import TokenizeRequest, submit_tokenization

    spec, slurm_overrides = prologue(args, DataSpec, args.config, check=_flag_problem)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    request = TokenizeRequest.from_parts(args.tokenizer, spec.data, args.out, splits=splits,
                                         adaptive_threshold=args.adaptive_threshold, batch_size=args.batch_size,
                                         shard_size=args.shard_size, num_workers=args.num_workers,
                                         device=args.device)
    if args.cluster == "none":
        shard = Shard.parse(args.shard or "0/1")
        request = TokenizeRequest(**{**request.__dict__, "device": args.device or default_device()})
        out = request.build((shard.index, shard.count), progress=True)
        print(f"[tokenize] token cache: {out}" if out is not None else
              f"[tokenize] shard {shard.index}/{shard.count} written to {args.out}")
        return 0
    slurm = slurm_config_from_args(args, slurm_overrides)
    if slurm.num_tasks > 1:
        raise UsageError(f"each tokenization job is one process, not {slurm.num_tasks} (--nodes/--tasks): "
                         "spread the work with --shards N instead")
    from ..arrays import announce_and_wait

    shards = args.shards or 1
    sub = submit_tokenization(request, shards=shards, slurm=slurm, cluster=args.cluster)
    rc, out = announce_and_wait("tokenize", sub, f"{shards} task(s)", args.no_wait)
    if out is None:
        return rc
    print(f"[tokenize] token cache: {out}")
    return 0

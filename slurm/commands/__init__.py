"""The ``alit`` subcommands, one module each, registered in :data:`slurm.cli.COMMANDS`.

A command module has ``configure(parser)`` (adds its arguments) and ``run(args) -> int`` (the exit code),
and may set ``TAKES_OVERRIDES = True`` (trailing ``key=value`` pairs arrive as ``args.overrides``),
``USER_ERRORS`` (more exception types that mean bad input for it: exit 2) and ``RUN_FAILURES`` (types
that mean the run started and failed: exit 1). Bad input is raised, never printed here:
:func:`slurm.cli.main` reports every :class:`~tokenizer.core.errors.UserError` in one place.
:func:`prologue` is what every command with overrides does first; :func:`add_image_set_options` the
options of the commands that write image sets.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tokenizer.core.config import load_config
from tokenizer.core.errors import UsageError

T = TypeVar("T")

FlagCheck = Callable[[argparse.Namespace, list[str]], str | None]  # why the flags do not go together, or None


def add_image_set_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that write image sets (``alit sample``, ``alit reconstruct``)."""
    parser.add_argument("--shard", default="0/1", help="i/n: make shard i of n (default 0/1 = everything)")
    parser.add_argument("--no-png", action="store_true", help="write only the npz, no PNG per image")
    parser.add_argument("--adm", action="store_true",
                        help="also write the finished set as an ADM-format batch <stem>_adm.npz (arr_0 uint8 NHWC, "
                             "arr_1 labels), what guided-diffusion's evaluator reads")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def split_overrides(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``args.overrides`` as (the command's own, the ``slurm.*`` ones); without ``--cluster`` all are its own."""
    overrides = list(getattr(args, "overrides", None) or [])
    if not hasattr(args, "cluster"):
        return overrides, []
    from ..launcher import split_slurm_overrides

    return split_slurm_overrides(overrides)


def check_job_flags(args: argparse.Namespace, slurm_overrides: Sequence[str],
                    check: FlagCheck | None = None) -> None:
    """Refuse job-only flags (resources, ``slurm.*`` overrides) without ``--cluster``: :class:`UsageError`."""
    if not hasattr(args, "cluster"):
        return
    from ..launcher import job_flags_problem

    problem = (check or job_flags_problem)(args, list(slurm_overrides))
    if problem:
        raise UsageError(problem)


def prologue(args: argparse.Namespace, schema: type[T], config: str | Path | None,
             check: FlagCheck | None = None) -> tuple[T, list[str]]:
    """Split the overrides, check the job-only flags, load ``schema`` from ``config`` and the overrides.

    Returns (the validated config, the ``slurm.*`` overrides for the job's resources).
    """
    own, slurm_overrides = split_overrides(args)
    check_job_flags(args, slurm_overrides, check)
    return load_config(schema, config, own), slurm_overrides


def write_adm_copy(folder: Path, stem: str) -> Path | None:
    """``alit sample/reconstruct --adm``: the finished ``<stem>.npz`` of ``folder`` also as an ADM batch
    ``<stem>_adm.npz``; None (and a note) while shards are still missing."""
    from sampling.fid_io import write_adm_batch
    from sampling.generate import load_image_set

    done = folder / f"{stem}.npz"
    if not done.is_file():
        print(f"[adm] {folder}: the set is not complete yet (other shards missing); the run that completes it "
              "writes the ADM batch", file=sys.stderr)
        return None
    arrays = load_image_set(done)
    out = write_adm_batch(folder / f"{stem}_adm.npz", arrays["images"], arrays.get("labels"))
    print(f"[adm] {out}", file=sys.stderr)
    return out


def shard_flags_problem(args: argparse.Namespace, slurm_overrides: Sequence[str]) -> str | None:
    """Why the sharding flags of a command with ``--shard i/n`` (one shard here) and ``--cluster ... --shards N``
    (an array and a merge job) do not go together, or None (``alit tokenize``, ``alit fid-stats``)."""
    from ..launcher import job_flags_problem

    if args.cluster == "none":
        if args.shard is not None:
            from sampling.generate import Shard

            try:
                Shard.parse(args.shard)
            except ValueError as e:
                return str(e)
        return job_flags_problem(args, slurm_overrides, ["--shards"] if args.shards is not None else [], "jobs")
    if args.shard is not None:
        return "--shard i/n runs one shard in this process: with --cluster use --shards N"
    if args.shards is not None and args.shards < 1:
        return f"--shards must be >= 1, got {args.shards}"
    if args.no_wait and args.cluster != "slurm":
        return "--no-wait needs --cluster slurm (elsewhere the merge job is submitted after the array finished)"
    return None

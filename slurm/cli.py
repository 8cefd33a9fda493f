"""The ``alit`` command line. Every subcommand is registered in :data:`COMMANDS`, here and nowhere else.

A subcommand is a module of :mod:`slurm.commands` with ``configure(parser)`` (adds its arguments) and
``run(args) -> int``. Modules are imported only when their subcommand is used, so ``alit --help`` stays
fast. Errors are reported here, once for every command: bad input (a
:class:`~tokenizer.core.errors.UserError`, or a type the command lists in ``USER_ERRORS``) is one line
``alit <command>: <message>`` on stderr and exit code 2; a run that failed (``RUN_FAILURES``) exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

from tokenizer.core.errors import EXIT_FAILED, EXIT_USAGE, UserError, one_line


@dataclass(frozen=True)
class Command:
    """One ``alit`` subcommand: where it lives, what it does, and a CPU example."""

    name: str
    module: str
    summary: str
    example: str


COMMANDS: tuple[Command, ...] = (
    Command("demo", "slurm.commands.demo",
            "the whole pipeline on the embedded emoji set, ending in an HTML report", "alit demo"),
    Command("status", "slurm.commands.status",
            "the stages of a pipeline directory: job ids, states, reuse and logs", "alit status $ALIT_HOME/demo"),
    Command("weights", "slurm.commands.weights", "report and verify the offline FID/LPIPS weights",
            "alit weights"),
    Command("data", "slurm.commands.data", "inspect a dataset (the embedded emoji set by default)",
            "alit data --source emoji"),
    Command("train", "slurm.commands.train", "train a tokenizer stage (vq, distill, finetune) or a prior",
            "alit train tokenizer --config configs/tokenizer/vq_emoji_cpu.yaml train.max_steps=50"),
    Command("sweep", "slurm.commands.sweep",
            "one training command over a grid of overrides, as one Slurm job array",
            "alit sweep configs/sweeps/vq_lr_emoji_cpu.yaml --cluster local"),
    Command("tokenize", "slurm.commands.tokenize",
            "encode a dataset at every budget into a token cache for priors",
            "alit tokenize --tokenizer runs/emoji_finetune/final --out runs/emoji_tokens --adaptive-threshold 0.07"),
    Command("sample", "slurm.commands.sample", "images from a prior + tokenizer at token budgets (shardable)",
            "alit sample --tokenizer runs/emoji_finetune/final --prior runs/prior/final --budgets 16 --num-images 16 "
            "--out runs/samples"),
    Command("reconstruct", "slurm.commands.reconstruct",
            "reconstructions of a dataset split at each budget (shardable)",
            "alit reconstruct --tokenizer runs/emoji_finetune/final --num-images 16 --out runs/recon"),
    Command("eval", "slurm.commands.eval",
            "rFID/gFID, L1, LPIPS per token count and adaptively, into a report folder",
            "alit eval --tokenizer runs/emoji_finetune/final --prior runs/prior/final --num-images 64 "
            "--out runs/eval/emoji"),
    Command("import-public", "slurm.commands.import_public",
            "a released ALIT checkpoint (.pth) as a tokenizer directory of this stack, with a one-line check",
            "alit import-public alit_small_vqgan_quantized_latents.pth --out $ALIT_HOME/models/alit_small"),
    Command("fid-stats", "slurm.commands.fid_stats",
            "Inception statistics (mu, sigma, count, protocol) of images, an npz batch or a split (shardable)",
            "alit fid-stats runs/samples/folder --out runs/samples/stats.npz"),
    Command("fid", "slurm.commands.fid",
            "FID, KID, precision/recall between two image folders, npz batches or statistics files",
            "alit fid runs/samples/folder runs/samples/stats.npz"),
    Command("inspect", "slurm.commands.inspect",
            "token specialization maps: each latent token's attention over the 2D grid, as image overlays",
            "alit inspect --tokenizer runs/emoji_finetune/final --images 4 --out runs/inspect"),
    Command("analyze", "slurm.commands.analyze",
            "the paper's analyses: token counts against complexity and familiarity (OOD), selection by task",
            "alit analyze complexity --tokenizer runs/emoji_finetune/final --out runs/analysis/complexity"),
    Command("doctor", "slurm.commands.doctor",
            "per device: the attention kernel the stack will use and why, torch/xformers builds, bf16, matmul rates",
            "alit doctor"),
)


# Bad input whatever the command: a path that is missing, already taken or of the wrong kind.
_PATH_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, NotADirectoryError,
                                                  IsADirectoryError)


def version() -> str:
    """The installed version of the ``alit-stack`` distribution (``unknown`` when it is not installed)."""
    from tokenizer.core.io import package_version

    return package_version("alit-stack")


def _user_errors(module: ModuleType) -> tuple[type[BaseException], ...]:
    """What counts as bad input for ``module`` (evaluated only once something was raised)."""
    from tokenizer.core.checkpoint import CheckpointError  # a missing, foreign or damaged model directory

    return (UserError, CheckpointError, *_PATH_ERRORS, *getattr(module, "USER_ERRORS", ()))


def _run(name: str, module: ModuleType, args: argparse.Namespace) -> int:
    """``module.run(args)`` with its failures reported as one line and an exit code."""
    try:
        return int(module.run(args) or 0)
    except _user_errors(module) as e:
        print(f"alit {name}: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except tuple(getattr(module, "RUN_FAILURES", ())) as e:
        print(f"alit {name}: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED


def _by_name() -> dict[str, Command]:
    return {c.name: c for c in COMMANDS}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only the subcommand named ``load`` has its arguments imported."""
    parser = argparse.ArgumentParser(
        prog="alit",
        description="Adaptive-length image tokens: tokenizer, priors, sampling, FID, Slurm.",
        epilog="Each subcommand shows a CPU example: alit <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alit {version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.summary, description=cmd.summary,
                           epilog=f"CPU example:\n  {cmd.example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if cmd.name == load:
            importlib.import_module(cmd.module).configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``alit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Idle OpenMP threads sleep instead of spinning (set before torch loads; an explicit setting wins):
    # on a shared or oversubscribed CPU, spinning made 2-thread runs up to 30x slower (see bench/).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # xformers 0.0.35's own compiled extension does not load against torch 2.14 (it then uses the kernels
    # PyTorch provides); its import-time warning says nothing actionable.
    logging.getLogger("xformers").setLevel(logging.ERROR)
    name = next((a for a in argv if not a.startswith("-")), None)
    if name is not None and name not in _by_name():
        build_parser().print_usage(sys.stderr)
        print(f"alit: unknown command '{name}'; choose from: {', '.join(_by_name())}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser(load=name)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(_by_name()[args.command].module)
    # Commands with configs take dotted key=value overrides anywhere on the line (argparse cannot mix a
    # trailing nargs='*' positional with options, so they are collected here).
    takes_overrides = getattr(module, "TAKES_OVERRIDES", False)
    bad = [a for a in extra if a.startswith("-") or "=" not in a] if takes_overrides else extra
    if bad:
        hint = " (overrides look like train.lr=1e-4)" if takes_overrides else ""
        print(f"alit {args.command}: unrecognized arguments: {' '.join(bad)}{hint}; see alit {args.command} --help",
              file=sys.stderr)
        return EXIT_USAGE
    if takes_overrides:
        args.overrides = extra
    return _run(args.command, module, args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

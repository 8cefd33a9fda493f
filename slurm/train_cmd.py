"""``alit train``: train a stage-one tokenizer (base VQ, ALIT distill, ALIT finetune) or a stage-two prior.

    alit train tokenizer --config configs/tokenizer/vq_emoji_cpu.yaml
    alit train tokenizer --config configs/tokenizer/distill_emoji_cpu.yaml base=<vq run>/final
    alit train tokenizer --config configs/tokenizer/finetune_emoji_cpu.yaml init=<distill run>/final
    alit train prior --config configs/prior/maskgit_emoji_cpu.yaml tokens=<token cache> tokenizer=<dir>
    torchrun --nproc_per_node 8 -m slurm.cli train tokenizer --config configs/tokenizer/distill_imagenet_gpu.yaml ...
    alit train tokenizer --config ... --cluster slurm --partition gpu --gpus 8 --tasks 8 --time 4:00:00 [--no-wait]

A run directory that already holds checkpoints is resumed. Overrides are dotted ``key=value`` pairs;
``slurm.key=value`` ones set the job's resources (with ``--cluster``; see ``slurm.launcher.SlurmConfig``).
"""

from __future__ import annotations

import argparse
import sys

from generator.cache import TokenizerMismatch
from tokenizer.core.checkpoint import CheckpointError
from tokenizer.core.config import ConfigError, load_config
from tokenizer.core.data import DataError
from tokenizer.core.trainer import Preempted, RunLocked, TrainingDiverged

from .launcher import add_cluster_arguments, job_flags_problem, split_slurm_overrides

# Failures that name their cause and fix in the message; anything else is a bug and keeps its traceback.
EXPECTED_FAILURES = (RunLocked, TrainingDiverged, CheckpointError, DataError, TokenizerMismatch, FileNotFoundError)

TARGETS = ("tokenizer", "prior")
TAKES_OVERRIDES = True  # trailing key=value pairs arrive as args.overrides


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit train {tokenizer,prior} --config CONFIG [key=value ...]"
    parser.add_argument("target", choices=TARGETS, help="what to train")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    add_cluster_arguments(parser)  # --cluster slurm|local|debug|none (default none: this process) + resources


def run(args: argparse.Namespace) -> int:
    if args.target == "tokenizer":
        from tokenizer.train import TokenizerRunConfig as schema
        from tokenizer.train import train_tokenizer as train
    else:
        from generator.train import PriorRunConfig as schema
        from generator.train import train_prior as train
    overrides, slurm_overrides = split_slurm_overrides(args.overrides)
    problem = job_flags_problem(args, slurm_overrides)
    if problem:
        print(f"alit train: {problem}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(schema, args.config, overrides)
    except ConfigError as e:
        print(f"alit train: {e}", file=sys.stderr)
        return 2
    if args.cluster != "none":
        from .jobs import run_on_cluster

        cfg.run_dir = str(cfg.resolved_run_dir().absolute())  # the job may start in another directory
        return run_on_cluster(args, args.target, cfg, slurm_overrides)
    try:
        result = train(cfg)
    except Preempted as e:
        print(f"alit train: {e}", file=sys.stderr)
        return 3
    except EXPECTED_FAILURES as e:  # problems with the run's inputs or state: a message, not a traceback
        print(f"alit train: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"[train] finished at step {result.step}; run directory: {result.run_dir}")
    if args.target == "prior":
        bpt = result.bits_per_token
        print("budget  bits/token  unigram")
        for b, uni in result.unigram_bits_per_token.items():
            print(f"{b:6d}  {bpt.get(f'bits_per_token/{b}', float('nan')):10.3f}  {uni:7.3f}")
    return 0

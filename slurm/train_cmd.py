"""``alit train``: train a stage-one tokenizer (base VQ, ALIT distill, ALIT finetune) or a stage-two prior.

    alit train tokenizer --config configs/tokenizer/vq_emoji_cpu.yaml
    alit train tokenizer --config configs/tokenizer/distill_emoji_cpu.yaml base=<vq run>/final
    alit train tokenizer --config configs/tokenizer/finetune_emoji_cpu.yaml init=<distill run>/final
    torchrun --nproc_per_node 8 -m slurm.cli train tokenizer --config configs/tokenizer/distill_imagenet.yaml ...

A run directory that already holds checkpoints is resumed. Overrides are dotted ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import sys

from tokenizer.core.config import ConfigError, load_config
from tokenizer.core.trainer import Preempted

TARGETS = ("tokenizer",)
TAKES_OVERRIDES = True  # trailing key=value pairs arrive as args.overrides


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=TARGETS, help="what to train")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.usage = "alit train {tokenizer} --config CONFIG [key=value ...]"


def run(args: argparse.Namespace) -> int:
    from tokenizer.train import TokenizerRunConfig, train_tokenizer

    try:
        cfg = load_config(TokenizerRunConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"alit train: {e}", file=sys.stderr)
        return 2
    try:
        result = train_tokenizer(cfg)
    except Preempted as e:
        print(f"alit train: {e}", file=sys.stderr)
        return 3
    print(f"[train] finished at step {result.step}; run directory: {result.run_dir}")
    return 0

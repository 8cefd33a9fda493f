"""``alit train``: train a stage-one tokenizer (base VQ, ALIT distill, ALIT finetune) or a stage-two prior.

    alit train tokenizer --config configs/tokenizer/vq_emoji_cpu.yaml
    alit train tokenizer --config configs/tokenizer/distill_emoji_cpu.yaml base=<vq run>/final
    alit train tokenizer --config configs/tokenizer/finetune_emoji_cpu.yaml init=<distill run>/final
    alit train prior --config configs/prior/maskgit_emoji_cpu.yaml tokens=<token cache> tokenizer=<dir>
    torchrun --nproc_per_node 8 -m slurm.cli train tokenizer --config configs/tokenizer/distill_imagenet_gpu.yaml ...

A run directory that already holds checkpoints is resumed. Overrides are dotted ``key=value`` pairs.
"""

from __future__ import annotations

import argparse
import sys

from tokenizer.core.config import ConfigError, load_config
from tokenizer.core.trainer import Preempted

TARGETS = ("tokenizer", "prior")
TAKES_OVERRIDES = True  # trailing key=value pairs arrive as args.overrides


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit train {tokenizer,prior} --config CONFIG [key=value ...]"
    parser.add_argument("target", choices=TARGETS, help="what to train")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")


def run(args: argparse.Namespace) -> int:
    if args.target == "tokenizer":
        from tokenizer.train import TokenizerRunConfig as schema
        from tokenizer.train import train_tokenizer as train
    else:
        from generator.train import PriorRunConfig as schema
        from generator.train import train_prior as train
    try:
        cfg = load_config(schema, args.config, args.overrides)
    except ConfigError as e:
        print(f"alit train: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except Preempted as e:
        print(f"alit train: {e}", file=sys.stderr)
        return 3
    print(f"[train] finished at step {result.step}; run directory: {result.run_dir}")
    if args.target == "prior":
        bpt = result.bits_per_token
        print("budget  bits/token  unigram")
        for b, uni in result.unigram_bits_per_token.items():
            print(f"{b:6d}  {bpt.get(f'bits_per_token/{b}', float('nan')):10.3f}  {uni:7.3f}")
    return 0

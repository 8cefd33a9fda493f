"""``alit demo``: the whole pipeline on the embedded emoji set on CPU, ending in a self-contained HTML report.

    alit demo                      # about half an hour on 2 CPU cores; re-running reuses finished stages
    alit demo --fresh              # start over
    alit demo --config configs/demo/emoji_cpu.yaml eval.num_images=64

Stages: base VQ -> ALIT distill -> ALIT finetune (LPIPS + GAN) -> token cache -> MaskGIT prior ->
rFID/gFID/L1/LPIPS per token count and token-count selection -> report.html (see slurm/pipeline.py).
"""

from __future__ import annotations

import argparse
import sys

from tokenizer.core.config import ConfigError, load_config

TAKES_OVERRIDES = True  # dotted key=value overrides of the DemoConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit demo [--config YAML] [--fresh] [key=value ...]"
    parser.add_argument("--config", default="configs/demo/emoji_cpu.yaml", help="a DemoConfig YAML")
    parser.add_argument("--fresh", action="store_true", help="delete the demo directory and start over")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    from slurm.pipeline import DemoConfig, run_demo

    try:
        cfg = load_config(DemoConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"alit demo: {e}", file=sys.stderr)
        return 2
    run_demo(cfg, fresh=args.fresh, device=args.device)
    return 0

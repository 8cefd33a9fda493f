"""``alit demo``: the whole pipeline on the embedded emoji set on CPU, ending in a self-contained HTML report.

    alit demo                      # about half an hour on 2 CPU cores; re-running reuses finished stages
    alit demo --fresh              # start over
    alit demo --config configs/demo/emoji_cpu.yaml eval.num_images=64
    alit demo --config configs/demo/imagenet_gpu.yaml data.source=/data/imagenet/train --cluster slurm --gpus 1

Stages: base VQ -> ALIT distill -> ALIT finetune (LPIPS + GAN) -> token cache -> MaskGIT prior ->
rFID/gFID/L1/LPIPS per token count and token-count selection -> report.html (see slurm/pipeline.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import TYPE_CHECKING

from tokenizer.core.config import to_dict

from ..launcher import JobSpec, add_cluster_arguments, slurm_config_from_args, submit_and_wait
from . import prologue

if TYPE_CHECKING:
    from ..pipeline import DemoConfig

TAKES_OVERRIDES = True  # dotted key=value overrides of the DemoConfig (slurm.key=value: the job's resources)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit demo [--config YAML] [--fresh] [key=value ...]"
    parser.add_argument("--config", default="configs/demo/emoji_cpu.yaml", help="a DemoConfig YAML")
    parser.add_argument("--fresh", action="store_true", help="delete the demo directory and start over")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_cluster_arguments(parser)  # --cluster slurm|local|debug: the whole pipeline as one requeueable job


def run(args: argparse.Namespace) -> int:
    from ..pipeline import DemoConfig, check_inputs, run_demo

    cfg, slurm_overrides = prologue(args, DemoConfig, args.config)
    # a missing stage config or data source fails here, before any stage runs (a job's data may be a path
    # only its machine mounts)
    check_inputs(cfg, data=args.cluster == "none")
    if args.cluster != "none":
        return _submit(cfg, args, slurm_overrides)
    run_demo(cfg, fresh=args.fresh, device=args.device)
    return 0


def _submit(cfg: DemoConfig, args: argparse.Namespace, slurm_overrides: list[str]) -> int:
    """The pipeline as one job (logs under ``<demo dir>/slurm/<job id>``); wait for it unless --no-wait."""
    from ..pipeline import for_job

    slurm = slurm_config_from_args(args, slurm_overrides)
    cfg = for_job(cfg)
    root = cfg.root()
    if args.fresh and root.exists():  # here, not in the job: a requeued job must continue, not start over
        print(f"[demo] --fresh: removing {root}", file=sys.stderr)
        shutil.rmtree(root)
    spec = JobSpec("slurm.pipeline:run_demo_job", {"config": to_dict(cfg), "device": args.device})
    rc, page = submit_and_wait("demo", spec, run_dir=root, cfg=slurm, cluster=args.cluster, no_wait=args.no_wait)
    if rc == 0 and page is not None:
        print(f"demo job finished; report: {page}")
    return rc

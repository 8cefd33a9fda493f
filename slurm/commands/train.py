"""``alit train``: train a stage-one tokenizer (base VQ, ALIT distill, ALIT finetune) or a stage-two prior.

    alit train tokenizer --config configs/tokenizer/vq_emoji_cpu.yaml
    alit train tokenizer --config configs/tokenizer/distill_emoji_cpu.yaml base=<vq run>/final
    alit train tokenizer --config configs/tokenizer/finetune_emoji_cpu.yaml init=<distill run>/final
    alit train prior --config configs/prior/maskgit_emoji_cpu.yaml tokens=<token cache> tokenizer=<dir>
    torchrun --nproc_per_node 8 -m slurm.cli train tokenizer --config configs/tokenizer/distill_imagenet_gpu.yaml ...
    alit train tokenizer --config ... --cluster slurm --partition gpu --gpus 8 --tasks 8 --time 4:00:00 [--no-wait]

A run directory that already holds checkpoints is resumed; a resume whose config differs from the run's
``config.yaml`` is refused (exit 2, the changed keys named) unless ``--allow-config-change KEY,...`` lists
every changed key (see ``tokenizer.core.trainer.RESUME_FREE_KEYS`` for the keys that may always change).
Overrides are dotted ``key=value`` pairs;
``slurm.key=value`` ones set the job's resources (with ``--cluster``; see ``slurm.launcher.SlurmConfig``).
"""

from __future__ import annotations

import argparse

from tokenizer.core.trainer import Preempted, RunLocked, TrainingDiverged

from ..launcher import add_cluster_arguments
from . import prologue

# The run started and failed; the message names the cause and the fix (exit 1). Bad input (config, data,
# checkpoint, a prior's tokenizer) is a UserError (exit 2); anything else is a bug and keeps its traceback.
RUN_FAILURES = (RunLocked, TrainingDiverged, Preempted)

TARGETS = ("tokenizer", "prior")
TAKES_OVERRIDES = True  # trailing key=value pairs arrive as args.overrides


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit train {tokenizer,prior} --config CONFIG [--allow-config-change KEY,...] [key=value ...]"
    parser.add_argument("target", choices=TARGETS, help="what to train")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--allow-config-change", default="", metavar="KEY,...",
                        help="resume a run directory even though these dotted config keys changed since it "
                             "started (the change is recorded in config_changes.jsonl); without it such a "
                             "resume is refused, naming the keys")
    add_cluster_arguments(parser)  # --cluster slurm|local|debug|none (default none: this process) + resources


def run(args: argparse.Namespace) -> int:
    if args.target == "tokenizer":
        from tokenizer.train import TokenizerRunConfig as schema
        from tokenizer.train import train_tokenizer as train
    else:
        from generator.train import PriorRunConfig as schema
        from generator.train import train_prior as train
    cfg, slurm_overrides = prologue(args, schema, args.config)
    allowed = [k.strip() for k in args.allow_config_change.split(",") if k.strip()]
    cfg.train.allow_config_change = sorted({*cfg.train.allow_config_change, *allowed})
    if args.cluster != "none":
        from ..jobs import run_on_cluster

        cfg.run_dir = str(cfg.resolved_run_dir().absolute())  # the job may start in another directory
        return run_on_cluster(args, args.target, cfg, slurm_overrides)
    from ..jobs import check_allocation_cpus

    check_allocation_cpus(cfg)  # inside a Slurm allocation (srun/sbatch): enough CPUs for the data workers
    result = train(cfg)
    print(f"[train] finished at step {result.step}; run directory: {result.run_dir}")
    if args.target == "prior":
        bpt = result.bits_per_token
        print("budget  bits/token  unigram")
        for b, uni in result.unigram_bits_per_token.items():
            print(f"{b:6d}  {bpt.get(f'bits_per_token/{b}', float('nan')):10.3f}  {uni:7.3f}")
    return 0

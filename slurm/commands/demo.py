"""``alit demo``: the whole pipeline on the embedded emoji set on CPU, ending in a self-contained HTML report.

    alit demo                      # about half an hour on 2 CPU cores; re-running reuses unchanged stages
    alit demo --fresh              # start over (only in a directory alit demo created)
    alit demo --config configs/demo/emoji_cpu.yaml eval.num_images=64
    alit demo --config configs/demo/imagenet_gpu.yaml data.source=/data/imagenet/train --cluster slurm
    alit status $ALIT_HOME/demo    # each stage's job id, state and log

Stages: base VQ -> ALIT distill -> ALIT finetune (LPIPS + GAN) -> token cache -> MaskGIT prior ->
rFID/gFID/L1/LPIPS per token count and token-count selection -> report.html (see slurm/pipeline.py).
With ``--cluster slurm`` every stage that runs is its own job with the resources of its
``stages.<stage>.slurm`` section, queued at once and chained by ``afterok`` dependencies; ``local`` and
``debug`` run the stage jobs one after another. A stage is reused only when its config and inputs are
unchanged (a hash); the command says which stage runs again and why.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tokenizer.core.config import save_config, to_dict
from tokenizer.core.errors import EXIT_FAILED, UsageError

from ..launcher import (
    JobSpec,
    SlurmJobError,
    add_cluster_arguments,
    job_flags_problem,
    slurm_config_from_args,
    submit,
    wait_with_errors,
)
from . import prologue

if TYPE_CHECKING:
    from ..pipeline import DemoConfig

TAKES_OVERRIDES = True  # dotted key=value overrides of the DemoConfig (slurm.key=value: every stage's resources)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit demo [--config YAML] [--fresh] [key=value ...]"
    parser.add_argument("--config", default="configs/demo/emoji_cpu.yaml", help="a DemoConfig YAML")
    parser.add_argument("--fresh", action="store_true",
                        help="empty the demo directory (only one alit demo created) and start over")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_cluster_arguments(parser)  # --cluster slurm|local|debug: each stage its own job


def _flag_problem(args: argparse.Namespace, slurm_overrides: list[str]) -> str | None:
    if args.no_wait and args.cluster == "local":
        return "--no-wait needs --cluster slurm (local stage jobs run one after another, waited for)"
    return job_flags_problem(args, slurm_overrides, jobs="stage jobs")


def run(args: argparse.Namespace) -> int:
    from ..pipeline import DemoConfig, check_inputs, run_demo

    cfg, slurm_overrides = prologue(args, DemoConfig, args.config, check=_flag_problem)
    # a missing stage config or data source fails here, before any stage runs (a job's data may be a path
    # only its machine mounts)
    check_inputs(cfg, data=args.cluster == "none")
    if args.cluster != "none":
        return _submit(cfg, args, slurm_overrides)
    run_demo(cfg, fresh=args.fresh, device=args.device)
    return 0


def _stage_slurm(cfg: DemoConfig, stage: str, args: argparse.Namespace, slurm_overrides: list[str]) -> Any:
    """A stage's resources: its ``stages.<stage>.slurm`` section < --slurm-config < slurm.* < flags; a sharded
    tokenize/eval stage's own job is one CPU that submits the array (which gets the section's resources)."""
    job = getattr(cfg.stages, stage)
    slurm = slurm_config_from_args(args, slurm_overrides, section=job.slurm)
    slurm = replace(slurm, job_name=f"{slurm.job_name}-{stage}")
    if stage in ("tokenize", "eval"):
        if slurm.num_tasks > 1:
            raise UsageError(f"stages.{stage}.slurm: each {stage} job is one process, not {slurm.num_tasks} "
                             f"(nodes/tasks_per_node): spread the work with stages.{stage}.shards=N instead")
        if job.shards > 1:
            job.slurm = to_dict(slurm)  # what the array tasks get
            slurm = replace(slurm, gpus_per_node=0, cpus_per_task=1, mem_gb=None)
    return slurm


def _submit(cfg: DemoConfig, args: argparse.Namespace, slurm_overrides: list[str]) -> int:
    """Every stage that runs as its own job (logs under ``<out>/stages/<stage>/slurm/<job id>``): on Slurm queued at
    once with afterok dependencies, elsewhere one after another; wait for them unless --no-wait."""
    from ..pipeline import (
        announce,
        apply_plan,
        for_job,
        plan,
        prepare_root,
        record_entry,
        stage_job_dir,
        summary,
        write_record,
    )

    cfg = for_job(cfg)
    stage_slurm = {s: _stage_slurm(cfg, s, args, slurm_overrides) for s in
                   ("vq", "distill", "finetune", "tokenize", "prior", "eval")}
    root = prepare_root(cfg, fresh=args.fresh)  # here, not in a job: a requeued job continues
    plans = plan(cfg)
    announce(plans)
    apply_plan(root, plans)
    save_config(cfg, root, "demo.yaml")
    entries = [record_entry(p) for p in plans]
    write_record(root, args.cluster, entries)
    config = to_dict(cfg)
    jobs: list[Any] = []
    previous: list[str] = []
    for p, entry in zip(plans, entries):
        if p.reuse:
            continue
        slurm = stage_slurm[p.stage.name]
        if args.cluster == "slurm" and previous:
            slurm = replace(slurm, extra={**slurm.extra, "dependency": "afterok:" + ":".join(previous),
                                          "kill_on_invalid_dep": "yes"})
        spec = JobSpec("slurm.pipeline:run_stage_job", {"config": config, "stage": p.stage.name,
                                                        "stage_hash": p.hash, "device": args.device,
                                                        "cluster": args.cluster})
        try:
            job = submit(spec, run_dir=stage_job_dir(root, p.stage.name), cfg=slurm, cluster=args.cluster)
        except BaseException:
            for earlier in jobs:  # a half-queued chain would run stages nobody waits for
                earlier.cancel(check=False)
            raise
        entry.update(jobs=[str(job.job_id)], log=str(job.paths.stderr))
        write_record(root, args.cluster, entries)
        print(f"[demo] {p.stage.label}: job {job.job_id} ({args.cluster}"
              f"{', after ' + ', '.join(previous) if args.cluster == 'slurm' and previous else ''}); "
              f"log: {job.paths.stderr}", file=sys.stderr, flush=True)
        jobs.append(job)
        previous = [str(job.job_id)]
        if args.cluster != "slurm":  # no dependencies there: each stage waits for the one before
            try:
                wait_with_errors([job])
            except SlurmJobError as e:
                print(f"alit demo: {p.stage.label} failed: {e}", file=sys.stderr)
                return EXIT_FAILED
    if args.no_wait:
        for job in jobs:
            print(job.job_id)
        print(f"[demo] {len(jobs)} stage job(s) queued; follow them with: alit status {root}", file=sys.stderr)
        return 0
    if args.cluster == "slurm":
        try:
            wait_with_errors(jobs)
        except SlurmJobError as e:
            print(f"alit demo: {e}\n(see alit status {root})", file=sys.stderr)
            return EXIT_FAILED
    print(f"demo finished ({len(jobs)} stage job(s), {len(plans) - len(jobs)} reused): {summary(root)}")
    return 0

"""What Slurm (or local/debug) jobs run, and submitting a training run as one.

The job entry functions are imported by name inside the job (``JobSpec("slurm.jobs:train", ...)``),
so they take plain, picklable arguments: a training target and its resolved config as a dict.

    job = submit_training("tokenizer", cfg, SlurmConfig(partition="gpu", gpus_per_node=8, tasks_per_node=8))
    [result] = wait_with_errors([job])     # {"run_dir": ..., "step": ..., "metrics": {...}}

A run that finishes writes ``<run_dir>/result.json`` (its config, step, metrics and job id): sweeps use
it to tell finished points from unfinished ones. A run stopped by a signal has checkpointed and raised
``Preempted``; on USR2 (the time limit is near, or a preemption) the launcher requeues the job and the
Trainer resumes from ``<run_dir>/checkpoints/latest``; after a user's ``scancel`` (SIGTERM) or SIGINT
the job ends without a requeue and the same command resumes (``slurm.launcher.stop_action``).

A training job needs a CPU per data-loading worker plus one for the training process: submitting with
a Slurm ``cpus_per_task`` below ``train.num_workers + 1`` is refused (:func:`check_job_cpus`), and so is
training inside a Slurm allocation whose ``SLURM_CPUS_PER_TASK`` is too small
(:func:`check_allocation_cpus`), before any work.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import submitit

from tokenizer.core.config import ConfigError, from_dict, load_config, to_dict
from tokenizer.core.io import atomic_write_text

from .launcher import (
    Cluster,
    JobSpec,
    SlurmConfig,
    slurm_config_from_args,
    submit,
    submit_and_wait,
)

# target -> (module, config schema, train function)
TRAINERS: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("tokenizer.train", "TokenizerRunConfig", "train_tokenizer"),
    "prior": ("generator.train", "PriorRunConfig", "train_prior"),
}
RESULT_FILE = "result.json"


def _trainer(target: str) -> tuple[type, Any]:
    if target not in TRAINERS:
        raise ValueError(f"training target must be one of {sorted(TRAINERS)}, got '{target}'")
    module_name, schema, fn = TRAINERS[target]
    module = importlib.import_module(module_name)
    return getattr(module, schema), getattr(module, fn)


def run_schema(target: str) -> type:
    """The config dataclass of a training target (``tokenizer`` or ``prior``)."""
    return _trainer(target)[0]


def load_run_config(target: str, config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The validated config of one run, with its run directory made absolute (jobs may start elsewhere)."""
    cfg = load_config(run_schema(target), config, overrides)
    cfg.run_dir = str(cfg.resolved_run_dir().absolute())
    return cfg


def result_path(run_dir: str | Path) -> Path:
    """Where a finished run records its result."""
    return Path(run_dir) / RESULT_FILE


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """The result a finished run recorded, or None (not finished, or the file is unreadable)."""
    try:
        data = json.loads(result_path(run_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _job_id() -> str | None:
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return os.environ.get("SLURM_JOB_ID")


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _summarize(target: str, result: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"target": target, "run_dir": str(result.run_dir), "step": int(result.step)}
    if target == "prior":
        out["metrics"] = {k: float(v) for k, v in result.bits_per_token.items()}
        out["unigram_bits_per_token"] = {int(b): float(v) for b, v in result.unigram_bits_per_token.items()}
    else:
        out["metrics"] = {k: float(v) for k, v in result.metrics.items()}
    return out


# ============================================================================ job entry functions
def train(target: str, config: dict[str, Any]) -> dict[str, Any]:
    """Job entry: train (or resume) one run from its resolved config dict (``to_dict`` of the schema).

    Every task of a multi-task job runs this (the Trainer joins the process group); rank 0 writes
    ``result.json``. ``Preempted`` propagates; the launcher decides whether the job requeues.
    """
    schema, fn = _trainer(target)
    cfg = from_dict(schema, config)
    check_allocation_cpus(cfg)  # the allocation's CPUs, before any work
    print(f"[job] train {target} in {cfg.resolved_run_dir()} (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')})", file=sys.stderr, flush=True)
    result = fn(cfg)
    out = _summarize(target, result)
    out["job_id"] = _job_id()
    if _rank() == 0:
        record = {**out, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "config": to_dict(cfg)}
        # atomic: a point is finished exactly when this file exists
        atomic_write_text(result_path(result.run_dir), json.dumps(record, indent=1))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return out


# ============================================================================ CPUs for the data workers
def cpus_needed(cfg: Any) -> int:
    """CPUs per task a training run needs: one per DataLoader worker plus the training process itself."""
    return int(cfg.train.num_workers) + 1


def check_job_cpus(cfg: Any, slurm: SlurmConfig | None, cluster: Cluster = "slurm", point: str | None = None) -> None:
    """Refuse to submit ``cfg`` as a Slurm job whose ``cpus_per_task`` is below ``train.num_workers + 1``
    (:class:`ConfigError`: one line with the values and the fix). Other clusters are not checked: they do
    not allocate CPUs (``cpus_per_task`` only sets their OMP_NUM_THREADS)."""
    if cluster != "slurm":
        return
    cpus = (slurm or SlurmConfig()).cpus_per_task
    need = cpus_needed(cfg)
    if cpus < need:
        where = f"sweep point '{point}': " if point else ""
        raise ConfigError(f"{where}train.num_workers={cfg.train.num_workers} needs slurm cpus_per_task >= {need} "
                          f"({cfg.train.num_workers} data workers + the training process), got {cpus}: raise slurm "
                          f"cpus_per_task (--cpus {need} or slurm.cpus_per_task={need}) or lower train.num_workers "
                          f"(e.g. train.num_workers={cpus - 1})")


def check_allocation_cpus(cfg: Any, environ: Mapping[str, str] | None = None) -> None:
    """Inside a Slurm allocation (``SLURM_CPUS_PER_TASK`` set), refuse a run whose ``train.num_workers + 1``
    exceeds the CPUs each task was given (:class:`ConfigError`, one line). Outside one: nothing to check."""
    text = (os.environ if environ is None else environ).get("SLURM_CPUS_PER_TASK", "").strip()
    if not text.isdigit():
        return  # not in an allocation, or one that did not set a CPU count per task
    cpus, need = int(text), cpus_needed(cfg)
    if cpus < need:
        raise ConfigError(f"this Slurm allocation gives SLURM_CPUS_PER_TASK={cpus} CPU(s) per task but "
                          f"train.num_workers={cfg.train.num_workers} needs {need} ({cfg.train.num_workers} data "
                          f"workers + the training process): ask for --cpus-per-task={need} (or slurm "
                          f"cpus_per_task={need} / --cpus {need} with --cluster slurm) or lower train.num_workers "
                          f"(e.g. train.num_workers={cpus - 1})")


# ============================================================================ submitting
def training_spec(target: str, cfg: Any) -> JobSpec:
    """The :class:`JobSpec` that trains ``cfg`` (a validated run config with an absolute run_dir)."""
    _trainer(target)
    return JobSpec("slurm.jobs:train", {"target": target, "config": to_dict(cfg)})


def submit_training(target: str, cfg: Any, slurm: SlurmConfig | None = None,
                    cluster: Cluster = "slurm") -> submitit.Job:
    """Submit one training run as a job; logs go to ``<run_dir>/slurm/<job id>/``."""
    check_job_cpus(cfg, slurm, cluster)
    run_dir = Path(cfg.resolved_run_dir()).absolute()
    cfg.run_dir = str(run_dir)
    return submit(training_spec(target, cfg), run_dir=run_dir, cfg=slurm, cluster=cluster)


def format_result(result: dict[str, Any]) -> str:
    """The lines ``alit train`` prints for a finished run (a job's result dict)."""
    lines = [f"[train] finished at step {result['step']}; run directory: {result['run_dir']}"]
    if result.get("target") == "prior":
        lines.append("budget  bits/token  unigram")
        for b, uni in result.get("unigram_bits_per_token", {}).items():
            bpt = result["metrics"].get(f"bits_per_token/{b}", float("nan"))
            lines.append(f"{int(b):6d}  {bpt:10.3f}  {uni:7.3f}")
    return "\n".join(lines)


def run_on_cluster(args: argparse.Namespace, target: str, cfg: Any, slurm_overrides: list[str]) -> int:
    """``alit train ... --cluster slurm|local|debug``: submit the run, then wait for it or print its job id."""
    slurm = slurm_config_from_args(args, slurm_overrides)  # bad resources: a UserError, reported by the CLI
    check_job_cpus(cfg, slurm, args.cluster)  # too few CPUs for the data workers: refused before submitting
    run_dir = Path(cfg.resolved_run_dir()).absolute()
    cfg.run_dir = str(run_dir)
    rc, result = submit_and_wait("train", training_spec(target, cfg), run_dir=run_dir, cfg=slurm,
                                 cluster=args.cluster, no_wait=args.no_wait)
    if rc == 0 and result is not None:
        print(format_result(result[0] if isinstance(result, list) else result))
    return rc

"""What SIGTERM, SIGUSR2 and ``scancel`` do to a training job under Slurm, and the CPU check for data workers.

- USR2 (Slurm's warning before the time limit, or a preemption that sends the user signal): the run
  checkpoints, the job is requeued and the next attempt resumes.
- ``scancel`` (SIGTERM, the job marked CANCELLED): the run checkpoints and the job ends CANCELLED, never
  requeued; the same command resumes it.
- a SIGTERM from Slurm's own preemption or time limit is told from a cancel by asking the controller
  (``slurm.launcher.stop_action``; tested here against the controller's possible answers, since the dev
  cluster has no preemption configured).
- ``cpus_per_task`` below ``train.num_workers + 1``: refused at submission, and inside an allocation
  (``SLURM_CPUS_PER_TASK``) before any work.

The cluster test trains the tiny ALIT distillation stage on 64 emoji (as tests/test_sweep.py does).
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import submitit
import torch
import yaml
from safetensors.torch import load_file

from slurm import cli
from slurm.jobs import check_allocation_cpus, check_job_cpus, load_run_config
from slurm.launcher import (
    CONTROLLER_REQUEUES,
    REQUEUE,
    STOP,
    SlurmConfig,
    SlurmJobError,
    SlurmJobView,
    job_folder,
    stop_action,
    wait_with_errors,
)
from tests.slurm_fixtures import wait_until
from tests.test_sweep import last_step
from tokenizer.core.config import ConfigError

WAIT_S = 180  # upper bound for one job (they take seconds; this only turns a hang into an error)
STEPS = 24  # a job is signalled after 3 steps; most of a job's time is Python starting, not training
TINY_TRAIN = {"batch_size": 8, "max_steps": STEPS, "eval_every": 0, "progress": False, "tensorboard": False,
              "num_workers": 0, "log_every": 1, "warmup_steps": 2, "lr": 3.0e-3}


# ============================================================================ helpers
def write_config(path: Path, base: Path, **train: Any) -> Path:
    body = {"stage": "distill", "base": str(base), "alit_size": "tiny", "data": {"max_images": 64},
            "train": {**TINY_TRAIN, **train}}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def ckpt_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else 0


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"no final/*.safetensors in {run_dir}"
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


def sacct_states(job_id: str) -> list[str]:
    """Every attempt's state of a job (``--duplicates``: a requeued job has one line per attempt)."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


# ============================================================================ the decision (no cluster)
def view(accounting: str | None = None, controller: str | None = None, preempt: str | None = None):
    return lambda job_id: SlurmJobView(accounting, controller, preempt)


@pytest.mark.parametrize("signal_name, job_view, action, reason", [
    # USR2: requeue, unless the job was cancelled meanwhile (the Trainer keeps the first signal)
    ("SIGUSR2", view("RUNNING", "RUNNING"), REQUEUE, "time limit is near or the job is preempted"),
    ("SIGUSR2", view(None, None), REQUEUE, "time limit is near"),
    ("SIGUSR2", view("CANCELLED", "COMPLETING"), STOP, "cancelled (scancel)"),
    # scancel: accounting already says CANCELLED while squeue/scontrol show COMPLETING
    ("SIGTERM", view("CANCELLED", "COMPLETING"), STOP, "cancelled (scancel)"),
    # Slurm's own preemption and time limit
    ("SIGTERM", view("PREEMPTED", "COMPLETING"), REQUEUE, "preempted"),
    ("SIGTERM", view("RUNNING", "RUNNING", "2026-01-01T00:00:00"), REQUEUE, "preempted"),  # in its GraceTime
    ("SIGTERM", view("REQUEUED", "COMPLETING"), CONTROLLER_REQUEUES, "PreemptMode=REQUEUE"),
    ("SIGTERM", view(None, "PENDING"), CONTROLLER_REQUEUES, "controller requeued"),
    ("SIGTERM", view("TIMEOUT", "COMPLETING"), REQUEUE, "time limit"),
    # anything the controller cannot name, or no answer: the safe default, no requeue
    ("SIGTERM", view("RUNNING", "RUNNING"), STOP, "safe default"),  # `scancel --signal=TERM`, `kill`
    ("SIGTERM", view(None, None), STOP, "did not answer"),
    ("SIGINT", view("RUNNING", "RUNNING"), STOP, "interactive"),
    (None, view("RUNNING", "RUNNING"), STOP, "requested by code"),
])
def test_stop_action_by_signal_and_controller_state(signal_name: str | None, job_view, action: str,
                                                    reason: str) -> None:
    decision = stop_action(signal_name, "123", view=job_view)
    assert (decision.action, reason in decision.reason) == (action, True), decision


def test_stop_action_outside_slurm_asks_no_controller() -> None:
    def no_controller(job_id: str) -> SlurmJobView:
        raise AssertionError("asked a controller outside a Slurm job")

    assert stop_action("SIGUSR2", None, view=no_controller).action == REQUEUE  # e.g. the local executor
    assert stop_action("SIGTERM", None, view=no_controller).action == STOP
    assert stop_action("SIGINT", "7", view=no_controller).action == STOP


# ============================================================================ CPUs for the data workers
def test_too_few_cpus_for_the_workers_is_refused_at_submission(tmp_path: Path, base_vq: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path / "tiny.yaml", base_vq)
    run = tmp_path / "run"
    rc = cli.main(["train", "tokenizer", "--config", str(cfg_file), "--cluster", "slurm", "--cpus", "2",
                   "train.num_workers=2", f"run_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "train.num_workers=2 needs slurm cpus_per_task >= 3" in err and "got 2" in err
    assert "raise slurm cpus_per_task (--cpus 3 or slurm.cpus_per_task=3) or lower train.num_workers" in err
    assert "Traceback" not in err and not run.exists()
    # the default cpus_per_task (1) through slurm.* overrides, and a sweep (one point too many workers)
    rc = cli.main(["train", "tokenizer", "--config", str(cfg_file), "--cluster", "slurm", "slurm.cpus_per_task=1",
                   "train.num_workers=1", f"run_dir={run}"])
    assert rc == 2 and "train.num_workers=1 needs slurm cpus_per_task >= 2" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "command": "train tokenizer", "config": "tiny.yaml", "grid": {"train.num_workers": [0, 3]},
        "slurm": {"cpus_per_task": 2}}))
    rc = cli.main(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "sweep point 'num_workers=3': train.num_workers=3 needs slurm cpus_per_task >= 4" in err
    assert not (tmp_path / "sweep" / "slurm").exists(), "something was submitted"
    # enough CPUs, or a cluster that does not allocate CPUs: no refusal
    cfg = load_run_config("tokenizer", cfg_file, ["train.num_workers=2"])
    check_job_cpus(cfg, SlurmConfig(cpus_per_task=3))
    check_job_cpus(cfg, SlurmConfig(cpus_per_task=1), cluster="local")


def test_too_few_cpus_in_the_allocation_is_refused_before_any_work(
        tmp_path: Path, base_vq: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path / "tiny.yaml", base_vq)
    run = tmp_path / "run"
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    rc = cli.main(["train", "tokenizer", "--config", str(cfg_file), "train.num_workers=2", f"run_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "this Slurm allocation gives SLURM_CPUS_PER_TASK=2 CPU(s) per task but train.num_workers=2 needs 3" in err
    assert "ask for --cpus-per-task=3" in err and "or lower train.num_workers (e.g. train.num_workers=1)" in err
    assert not run.exists(), "the run started"
    # the job entry function checks too (a job started by sbatch/srun with too few CPUs per task)
    from slurm.jobs import train
    from tokenizer.core.config import to_dict

    cfg = load_run_config("tokenizer", cfg_file, ["train.num_workers=2", f"run_dir={run}"])
    with pytest.raises(ConfigError, match="SLURM_CPUS_PER_TASK=2"):
        train("tokenizer", to_dict(cfg))
    assert not run.exists()
    check_allocation_cpus(cfg, {"SLURM_CPUS_PER_TASK": "3"})  # enough
    check_allocation_cpus(cfg, {})  # not in an allocation


# ============================================================================ on the dev cluster
def _submit_no_wait(cfg_file: Path, run_dir: Path, capsys: pytest.CaptureFixture[str], name: str) -> str:
    rc = cli.main(["train", "tokenizer", "--config", str(cfg_file), "--cluster", "slurm", "--time", "5",
                   "--cpus", "1", "--job-name", name, "--no-wait", f"run_dir={run_dir}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out.strip()


@pytest.mark.slurm
def test_scancel_stops_without_requeue_and_usr2_requeues(tmp_path: Path, base_vq: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path / "tiny.yaml", base_vq)
    cancelled, warned = tmp_path / "cancelled", tmp_path / "warned"
    a = _submit_no_wait(cfg_file, cancelled, capsys, "alit-test-scancel")
    b = _submit_no_wait(cfg_file, warned, capsys, "alit-test-usr2")
    job_a = submitit.SlurmJob(folder=job_folder(cancelled), job_id=a)
    job_b = submitit.SlurmJob(folder=job_folder(warned), job_id=b)
    # each job is signalled once it has trained 3 steps: what a user does (scancel: the job CANCELLED, then
    # SIGTERM) and what Slurm does before the time limit (USR2 to the job's steps, as --signal=USR2@N)
    commands = {cancelled: ["scancel", a], warned: ["scancel", "--signal=USR2", b]}

    def signal_when_trained() -> bool:
        for run_dir in [r for r in commands if last_step(r) >= 3]:
            subprocess.run(commands.pop(run_dir), check=True, timeout=30)
        return not commands

    wait_until(signal_when_trained, 90, "both jobs to make progress")

    # scancel: checkpointed, ended CANCELLED, never requeued
    with pytest.raises(SlurmJobError) as err:
        wait_with_errors([job_a], timeout_s=WAIT_S)
    assert "not requeued: job " in str(err.value) and "was cancelled (scancel)" in str(err.value)
    log_a = job_a.paths.stderr.read_text()
    stopped_at = ckpt_step(cancelled)
    assert 3 <= stopped_at < STEPS and not (cancelled / "final").exists(), log_a[-2000:]
    assert f"[train] stop requested (SIGTERM): checkpointing at step {stopped_at}" in log_a
    assert "not requeued (run the same command again to resume)" in log_a and "attempt 2" not in log_a

    with ThreadPoolExecutor(1) as pool:
        # the same command again (waited for) resumes from that checkpoint, while the USR2 job requeues
        again = pool.submit(cli.main, ["train", "tokenizer", "--config", str(cfg_file), "--cluster", "slurm",
                                       "--time", "5", "--cpus", "1", "--job-name", "alit-test-rerun",
                                       f"run_dir={cancelled}"])
        [result_b] = wait_with_errors([job_b], timeout_s=WAIT_S)
        assert again.result(timeout=WAIT_S) == 0
    states = sacct_states(a)
    assert len(states) == 1 and states[0].startswith("CANCELLED"), states  # one attempt, cancelled
    assert subprocess.run(["squeue", "-h", "-j", a], capture_output=True, text=True).stdout.strip() == ""
    final_log_a = job_a.paths.stderr.read_text()  # (srun may have added its exit line since)
    assert final_log_a.count("[launcher] slurm.jobs:train: attempt ") == 1, "the cancelled job ran again"
    rerun_logs = [p for p in (cancelled / "slurm").glob("*/*_log.err") if p.parent.name != a]
    assert len(rerun_logs) == 1
    assert f"[train] resumed from {cancelled / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" \
        in rerun_logs[0].read_text()

    # USR2: checkpointed, requeued, the second attempt resumed and finished
    assert result_b["step"] == STEPS
    log_b = job_b.paths.stderr.read_text()
    assert "stopped early for preemption: requeueing (SIGUSR2 (the time limit is near" in log_b and "attempt 2 of job" in log_b
    assert len([line for line in log_b.splitlines() if "[train] resumed from" in line]) == 1
    states = sacct_states(b)  # the second attempt may still be ending (its result is written first)
    assert len(states) == 2 and states[0] == "REQUEUED", states

    # both stopped at some step and resumed: both equal the same uninterrupted run, bit for bit
    x, y = final_tensors(cancelled), final_tensors(warned)
    assert x.keys() == y.keys() and len(x) > 10
    assert [k for k in x if not torch.equal(x[k], y[k])] == []

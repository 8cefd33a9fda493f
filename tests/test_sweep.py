"""Training as Slurm jobs: `alit train --cluster`, `alit sweep` (one job array), requeue with exact resume,
and a 2-task distributed training job, against the REAL dev Slurm cluster (tests/slurm_fixtures.py).

Every run is the tiny ALIT distillation stage on 64 emoji from a freshly saved, untrained tiny base VQ
(seconds per run). Each test uses its own run and submitit folders (``tmp_path``). Jobs get
``OMP_NUM_THREADS=1`` (= ``cpus_per_task``) from the executor's setup lines, so several of them share
the 2-core machine. The functions at the top are what the distributed job runs (imported by name).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import submitit
import torch
import yaml
from safetensors.torch import load_file

from slurm import cli
from slurm.jobs import load_run_config, read_result
from slurm.launcher import (
    JobSpec,
    SlurmConfig,
    job_folder,
    parse_time_min,
    slurm_config,
    submit,
    wait_with_errors,
)
from slurm.sweep import load_sweep, plan, point_names, points_of
from tests.slurm_fixtures import wait_until
from tokenizer.core.config import ConfigError, to_dict

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 180  # upper bound for one test's jobs (they take seconds; this only turns a hang into an error)
TINY_TRAIN = {"batch_size": 8, "max_steps": 6, "eval_every": 0, "progress": False, "tensorboard": False,
              "num_workers": 0, "log_every": 2, "warmup_steps": 2, "lr": 3.0e-3}


# ============================================================================ what the 2-task job runs
def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def distributed_distill(config: dict[str, Any], average: bool = True) -> dict[str, Any]:
    """Run slurm.jobs.train on this rank with a task that remembers its model and its first batch.

    ``average=False`` is the control: the Trainer's DDP is switched off, so ranks drift.
    """
    import tokenizer.core.trainer
    import tokenizer.train as tt
    from slurm.jobs import train

    if not average:
        tokenizer.core.trainer.replicate = lambda modules, dist_info: None

    seen: dict[str, Any] = {}

    class Recording(tt.DistillTask):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen["task"] = self

        def train_step(self, batch: Any, step: int):  # type: ignore[no-untyped-def]
            seen.setdefault("first_batch", _digest({"images": batch[0]}))
            return super().train_step(batch, step)

    tt.TASKS[tt.Stage.distill] = Recording
    out = train("tokenizer", config)
    return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
            "weights": _digest(seen["task"].model.alit.state_dict()), "first_batch": seen["first_batch"],
            "omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads(), "step": out["step"]}


# ============================================================================ helpers
def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False)  # keys keep their order (grid order = point name order)


def write_config(path: Path, base: Path, **train: Any) -> Path:
    """A tiny distill config (64 images, 8 per batch) with ``train`` settings on top of TINY_TRAIN."""
    body = {"stage": "distill", "base": str(base), "alit_size": "tiny", "data": {"max_images": 64},
            "train": {**TINY_TRAIN, **train}}
    path.write_text(dump_yaml(body))
    return path


def alit(argv: list[str]) -> int:
    """Run an `alit` command in this process (errors are reported by slurm.cli.main, as on the command line)."""
    return cli.main(argv)


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)
    except (OSError, ValueError):
        return 0


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"no final/*.safetensors in {run_dir}"
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(str(f)).items()}


# ============================================================================ no cluster needed
def test_points_names_and_sweep_file_errors(tmp_path: Path, base_vq: Path) -> None:
    write_config(tmp_path / "tiny.yaml", base_vq)
    (tmp_path / "s.yaml").write_text(dump_yaml({
        "command": "train tokenizer", "config": "tiny.yaml", "overrides": {"train": {"max_steps": 4}},
        "grid": {"train": {"lr": [0.001, 0.003]}, "distill.code_mse_weight": [1.0]},
        "variants": [{"alit_size": "tiny"}, {"alit_size": "tiny", "data.hflip": False}]}))
    sweep = load_sweep(tmp_path / "s.yaml", ["train.seed=3"])
    assert sweep.target == "tokenizer" and sweep.name == "s"
    assert sweep.overrides == {"train.max_steps": 4, "train.seed": 3}
    points = points_of(sweep)
    assert len(points) == 4 and points[3] == {"alit_size": "tiny", "data.hflip": False, "train.lr": 0.003,
                                              "distill.code_mse_weight": 1.0}
    names = point_names(points)
    assert names[0] == "alit_size=tiny,lr=0.001,code_mse_weight=1.0"
    assert names[3] == "alit_size=tiny,hflip=false,lr=0.003,code_mse_weight=1.0"
    # clashing last components keep their full keys; odd characters are replaced; long names end in a hash
    assert point_names([{"a.lr": 1, "b.lr": 2}]) == ["a.lr=1,b.lr=2"]
    assert point_names([{"base": "/x/y z"}]) == ["base=_x_y_z"]
    long = point_names([{"k": "v" * 200}, {"k": "v" * 201}])
    assert all(len(n) <= 80 for n in long) and long[0] != long[1]

    def bad(body: dict[str, Any], match: str) -> None:
        (tmp_path / "bad.yaml").write_text(dump_yaml(body))
        with pytest.raises(ConfigError, match=match):
            load_sweep(tmp_path / "bad.yaml")

    ok = {"command": "train tokenizer", "config": "tiny.yaml"}
    bad({**ok, "command": "train gan"}, "sweep command must be one of")
    bad({**ok, "config": "missing.yaml"}, "base config .*missing.yaml not found")
    bad({**ok, "grids": {}}, r"unknown key\(s\) \['grids'\]")
    bad({**ok, "grid": {"train.lr": 0.1}}, r"grid.train.lr must be a non-empty list")
    bad({**ok, "grid": {"train.lr": [0.1]}, "variants": [{"train.lr": 0.2}]}, "both set")
    bad({**ok, "grid": {"train.lr": [0.1]}, "overrides": {"train.lr": 0.2}}, "set each key in one place")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_sweeps_plan(path: Path, tmp_path: Path) -> None:
    """Every shipped sweep file loads and every point's config validates (inputs given as on the CLI)."""
    inputs = {"train tokenizer": ["base=/runs/vq/final"], "train prior": ["tokens=/runs/tokens"]}
    sweep = load_sweep(path, inputs[yaml.safe_load(path.read_text())["command"]])
    points = plan(sweep, tmp_path / sweep.name)
    assert len(points) >= 4 and len({p.name for p in points}) == len(points)
    assert all(Path(p.config.run_dir) == tmp_path / sweep.name / p.name for p in points)
    slurm_config(sweep.slurm)  # its slurm section is valid


def test_slurm_settings_precedence_and_errors(tmp_path: Path) -> None:
    assert [parse_time_min(t) for t in ("90", "1:30:00", "0:30", "1-00:00:00")] == [90, 90, 1, 1440]
    with pytest.raises(ValueError, match="not minutes or a Slurm time"):
        parse_time_min("soon")
    cfg = slurm_config({"partition": "a", "cpus_per_task": 4, "env": {"X": "1"}}, ["slurm.partition=b"], qos="hi")
    assert (cfg.partition, cfg.cpus_per_task, cfg.qos) == ("b", 4, "hi")
    assert cfg.job_env() == {"OMP_NUM_THREADS": "4", "X": "1"}
    with pytest.raises(ConfigError, match=r"slurm\.bogus"):
        slurm_config({}, ["slurm.bogus=1"])
    with pytest.raises(ConfigError, match=r"slurm\.tasks_per_node must be >= 1"):
        slurm_config({"tasks_per_node": 0})
    (tmp_path / "c.yaml").write_text("slurm:\n  partition: gpu\n  time_min: 30\n")
    args = argparse.Namespace(slurm_config=str(tmp_path / "c.yaml"), time="2:00:00", partition=None)
    from slurm.launcher import slurm_config_from_args

    assert (lambda c: (c.partition, c.time_min))(slurm_config_from_args(args)) == ("gpu", 120)
    (tmp_path / "n.yaml").write_text("partition: gpu\n")
    with pytest.raises(ConfigError, match="no 'slurm:' mapping"):
        slurm_config_from_args(argparse.Namespace(slurm_config=str(tmp_path / "n.yaml")))


def test_train_refuses_job_options_without_a_cluster(tmp_path: Path, base_vq: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "tiny.yaml", base_vq)
    rc = alit(["train", "tokenizer", "--config", str(cfg), "--partition", "gpu", "slurm.qos=x",
               f"run_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert "--partition slurm.qos=x only apply to a job: add --cluster slurm" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ============================================================================ on the dev cluster
@pytest.mark.slurm
def test_sweep_of_four_runs_is_one_array_and_finished_points_are_reused(
        tmp_path: Path, base_vq: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(tmp_path / "tiny.yaml", base_vq)
    sweep_file = tmp_path / "lr.yaml"
    sweep_file.write_text(dump_yaml({
        "command": "train tokenizer", "config": "tiny.yaml",
        "grid": {"train.lr": [0.001, 0.003], "train.seed": [0, 1]},
        "slurm": {"time_min": 5, "cpus_per_task": 1}}))
    out = tmp_path / "sweep"
    assert alit(["sweep", str(sweep_file), "--out", str(out), "--refresh", "2"]) == 0
    printed = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    points = summary["points"]
    assert [p["point"] for p in points] == ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.003,seed=0",
                                            "lr=0.003,seed=1"]
    assert points[3]["overrides"] == {"train.lr": 0.003, "train.seed": 1}
    assert summary["counts"] == {"COMPLETED": 4} and summary["reused"] == 0
    arrays = {p["job_id"].split("_")[0] for p in points}
    assert len(arrays) == 1, f"not ONE job array: {[p['job_id'] for p in points]}"
    assert sorted(p["job_id"].split("_")[1] for p in points) == ["0", "1", "2", "3"]
    for p in points:
        run_dir = Path(p["run_dir"])
        assert run_dir == out / p["point"] and (run_dir / "final" / "model.safetensors").exists()
        assert p["step"] == 6 and p["state"] == "COMPLETED" and not p["reused"]
        assert torch.isfinite(torch.tensor(p["metrics"]["loss/model"]))
        log = Path(p["log"]).read_text()
        assert "(OMP_NUM_THREADS=1)" in log, "the job did not get OMP_NUM_THREADS=1 from the executor"
        result = read_result(run_dir)
        assert result is not None and result["job_id"] == p["job_id"] and result["step"] == 6
    # different learning rates and seeds gave different runs
    assert len({p["metrics"]["loss/model"] for p in points}) == 4
    md = (out / "summary.md").read_text()
    assert "4 points: 4 COMPLETED" in md and all(f"`{p['point']}`" in md for p in points)
    assert "| `lr=0.001,seed=0` | COMPLETED |" in printed.out

    # the same sweep again: nothing is submitted, the four points are reported as reused
    job_dirs = sorted((out / "slurm").iterdir())
    assert alit(["sweep", str(sweep_file), "--out", str(out), "--no-wait"]) == 0
    again = capsys.readouterr()
    assert again.out.strip() == "" and "reused 4 finished point(s)" in again.err
    assert sorted((out / "slurm").iterdir()) == job_dirs, "a finished point was submitted again"
    status = json.loads((out / "summary.json").read_text())
    assert status["counts"] == {"COMPLETED": 4} and status["reused"] == 4
    assert [p["job_id"] for p in status["points"]] == [p["job_id"] for p in points]

    # a grown sweep runs only its new point; finished ones are reused, never clobbered
    before = {p: (out / p / "final" / "model.safetensors").read_bytes() for p in ("lr=0.001,seed=0",)}
    sweep_file.write_text(dump_yaml({
        "command": "train tokenizer", "config": "tiny.yaml",
        "grid": {"train.lr": [0.001], "train.seed": [0, 1, 2]}, "slurm": {"time_min": 5}}))
    assert alit(["sweep", str(sweep_file), "--out", str(out), "--refresh", "2"]) == 0
    grown = json.loads((out / "summary.json").read_text())
    assert [(p["point"], p["state"], p["reused"]) for p in grown["points"]] == [
        ("lr=0.001,seed=0", "COMPLETED", True), ("lr=0.001,seed=1", "COMPLETED", True),
        ("lr=0.001,seed=2", "COMPLETED", False)]
    assert grown["points"][2]["job_id"].split("_")[0] not in arrays
    assert (out / "lr=0.001,seed=0" / "final" / "model.safetensors").read_bytes() == before["lr=0.001,seed=0"]
    # --status from a fresh process view (no live job handles) agrees
    assert alit(["sweep", "--status", str(out)]) == 0
    assert "3 points: 3 COMPLETED (2 reused)" in capsys.readouterr().out


@pytest.mark.slurm
def test_preempted_training_job_resumes_to_the_same_weights(tmp_path: Path, base_vq: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path / "tiny.yaml", base_vq, max_steps=40, log_every=1)
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    # the run to stop goes through the command line (--no-wait prints the job id) ...
    rc = alit(["train", "tokenizer", "--config", str(cfg_file), "--cluster", "slurm", "--time", "5", "--cpus", "1",
               "--no-wait", f"run_dir={stopped}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    job_id = out.out.strip()
    assert job_id.isdigit() and f"submitted job {job_id} (slurm)" in out.err
    job = submitit.SlurmJob(folder=job_folder(stopped), job_id=job_id)
    # ... the uninterrupted reference runs at the same time, as a job the command line waits for
    with ThreadPoolExecutor(1) as pool:
        reference_rc = pool.submit(alit, ["train", "tokenizer", "--config", str(cfg_file), "--cluster", "slurm",
                                          "--time", "5", "--job-name", "alit-test-ref", f"run_dir={reference}"])
        wait_until(lambda: last_step(stopped) >= 3, 90, "the job to make progress")
        job._interrupt(timeout=True)  # USR2 alone, as Slurm sends before the time limit or on preemption
        [stopped_result] = wait_with_errors([job], timeout_s=WAIT_S)
        assert reference_rc.result(timeout=WAIT_S) == 0
    assert stopped_result["step"] == 40
    assert f"[train] finished at step 40; run directory: {reference}" in capsys.readouterr().out

    log = job.paths.stderr.read_text()
    assert "stopped early for preemption: requeueing" in log and "attempt 2 of job" in log
    resumed = [line for line in log.splitlines() if "[train] resumed from" in line]
    assert len(resumed) == 1, log[-3000:]
    at = int(resumed[0].rsplit("at step", 1)[1])
    assert 3 <= at < 40, resumed
    assert job.paths.stderr.is_relative_to(stopped / "slurm")
    a, b = final_tensors(stopped), final_tensors(reference)
    assert a.keys() == b.keys() and len(a) > 10
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed run differs from the uninterrupted one in {len(differ)} tensors, e.g. {differ[:3]}"


@pytest.mark.slurm
def test_two_task_job_trains_distributed_and_ranks_agree(tmp_path: Path, base_vq: Path) -> None:
    cfg_file = write_config(tmp_path / "tiny.yaml", base_vq)
    resources = SlurmConfig(tasks_per_node=2, cpus_per_task=1, time_min=5, job_name="alit-test-dist")
    jobs = []
    for name, average in (("run", True), ("control", False)):
        cfg = load_run_config("tokenizer", cfg_file, [f"run_dir={tmp_path / name}"])
        spec = JobSpec("tests.test_sweep:distributed_distill", {"config": to_dict(cfg), "average": average},
                       pythonpath=(str(ROOT),))
        jobs.append(submit(spec, run_dir=tmp_path / name, cfg=resources))
    [per_rank, control] = wait_with_errors(jobs, timeout_s=WAIT_S)
    assert control[0]["weights"] != control[1]["weights"], "the control cannot tell averaged from not"
    assert sorted(r["rank"] for r in per_rank) == [0, 1] and all(r["world"] == 2 for r in per_rank)
    assert all(r["omp"] == "1" and r["threads"] == 1 and r["step"] == 6 for r in per_rank), per_rank
    r0, r1 = per_rank
    assert r0["first_batch"] != r1["first_batch"], "both ranks trained on the same images"
    assert r0["weights"] == r1["weights"], "the ranks' weights diverged: gradients were not averaged"
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert read_result(tmp_path / "run")["step"] == 6


@pytest.mark.slurm
def test_failed_point_is_reported_with_its_log_locally(tmp_path: Path, base_vq: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--cluster local: the same sweep without Slurm; a failing point names its log and stderr tail."""
    write_config(tmp_path / "tiny.yaml", base_vq)
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(dump_yaml({
        "command": "train tokenizer", "config": "tiny.yaml",
        "variants": [{"train.seed": 5}, {"base": str(tmp_path / "no_such_vq")}]}))
    out = tmp_path / "sweep"
    assert alit(["sweep", str(sweep_file), "--out", str(out), "--cluster", "local", "--refresh", "1"]) == 1
    err = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    ok, bad = summary["points"]
    assert (ok["point"], ok["state"], ok["step"]) == ("seed=5", "COMPLETED", 6)
    assert bad["point"].startswith("base=") and bad["state"] == "FAILED"
    assert "1 of 2 job(s) failed" in err and bad["log"] in err and "no_such_vq" in err
    assert bad["log"] in bad["error"] and "last 20 lines of stderr" in bad["error"]
    assert "## Failures" in (out / "summary.md").read_text()


@pytest.mark.slurm
def test_missing_partition_is_a_clear_error_and_submits_nothing(tmp_path: Path, base_vq: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path / "tiny.yaml", base_vq)
    rc = alit(["train", "tokenizer", "--config", str(cfg_file), "--cluster", "slurm", "--partition", "nope",
               f"run_dir={tmp_path / 'run'}"])
    assert rc == 2 and "partition 'nope' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (tmp_path / "s.yaml").write_text(dump_yaml({"command": "train tokenizer", "config": "tiny.yaml",
                                                     "grid": {"train.seed": [0, 1]}}))
    rc = alit(["sweep", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "sweep"), "slurm.partition=nope"])
    assert rc == 2 and "partition 'nope' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()

"""The dev Slurm cluster script and the submitit launcher, against a REAL single-node Slurm.

Tests marked ``slurm`` run on the project's dev cluster (tests/slurm_fixtures.py starts it, or uses the
one ``make test`` started). Each test uses its own run directory (``tmp_path``): job ids restart when a
cluster is wiped, and submitit would return an old result from a reused folder.

The functions at the top are what the jobs run (imported by name inside the job).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slurm.cluster import NO_SBATCH, ClusterError, DevCluster, parse_exports, require_sbatch
from slurm.launcher import (
    JobSpec,
    Preempted,
    SlurmConfig,
    SlurmJobError,
    make_executor,
    submit,
    submit_array,
    wait_with_errors,
)
from tests.slurm_fixtures import wait_until

ROOT = Path(__file__).resolve().parents[1]
QUICK = SlurmConfig(time_min=5, job_name="alit-test")  # <= 10 min: every USR2 counts as a timeout
WAIT_S = 120  # upper bound for one test's jobs (they take seconds; this only turns a hang into an error)


# ============================================================================ what the jobs run
def square(x: int) -> int:
    return x * x


def fail_loudly(code: int) -> None:
    for i in range(30):
        print(f"noise line {i}", file=sys.stderr)
    raise ValueError(f"bad input {code}")


def allreduce_ranks() -> dict:
    """Join the job's process group (gloo) through init_distributed() and sum rank + 1 over ranks."""
    import torch
    import torch.distributed as dist

    from tokenizer.core.distributed import init_distributed

    info = init_distributed("cpu")
    total = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(total)
    out = {"rank": info.rank, "world": info.world_size, "sum": float(total.item()),
           "master": f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"}
    dist.destroy_process_group()
    return out


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # atomic: a kill never leaves half a state file


def count_steps(state_file: str, total: int, step_s: float, own_handler: bool) -> dict:
    """A stand-in for training: ``total`` steps, state saved after each, resumed from the state file.

    ``own_handler=True`` behaves like the Trainer: it catches USR2 itself, stops at the next step
    boundary with its state saved and raises Preempted. Otherwise submitit's handler interrupts it.
    """
    path = Path(state_file)
    state = json.loads(path.read_text()) if path.exists() else {"step": 0, "resumed_from": []}
    state["resumed_from"].append(state["step"])
    _save_state(path, state)
    stop: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: stop.append(signum)) if own_handler else None
    try:
        while state["step"] < total and not stop:
            time.sleep(step_s)
            state["step"] += 1
            _save_state(path, state)
    finally:
        if own_handler:
            signal.signal(signal.SIGUSR2, old)
    if stop:  # like the Trainer, name the signal: the launcher requeues on USR2 only
        raise Preempted(f"stopped at step {state['step']} of {total}", signal.Signals(stop[0]).name)
    return state


def spec(name: str, **kwargs: object) -> JobSpec:
    return JobSpec(f"tests.test_slurm:{name}", kwargs, pythonpath=(str(ROOT),))


# ============================================================================ no cluster needed
def test_no_sbatch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ClusterError) as err:
        require_sbatch()
    assert str(err.value) == NO_SBATCH and "--cluster local/debug" in NO_SBATCH
    with pytest.raises(ClusterError, match="no sbatch found"):
        make_executor("slurm", tmp_path / "jobs", QUICK)


def test_config_and_spec_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"slurm\.tasks_per_node"):
        SlurmConfig(tasks_per_node=0)
    with pytest.raises(ValueError, match=r"slurm\.mem_gb"):
        SlurmConfig(mem_gb=0)
    with pytest.raises(ValueError, match=r"slurm\.extra"):
        SlurmConfig(extra={"--constraint": "a100"})
    with pytest.raises(ValueError, match=r"package\.module:function"):
        JobSpec("tests.test_slurm.square")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        JobSpec("tests.test_slurm:nope").resolve()
    with pytest.raises(ValueError, match="cluster must be one of"):
        make_executor("kubernetes", "unused-folder", QUICK)  # type: ignore[arg-type]
    assert SlurmConfig(nodes=2, tasks_per_node=4).num_tasks == 8


@pytest.mark.parametrize("key", ["partition", "account", "qos", "job_name", "extra.constraint", "extra.comment",
                                 "env.NOTE"])
def test_control_characters_in_any_slurm_value_are_refused(key: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """A newline would end the job script's #SBATCH block and run the rest as shell: refused for every value,
    from the API and from the command line, before anything is submitted."""
    from slurm.cli import main as alit
    from slurm.launcher import slurm_config
    from tokenizer.core.config import ConfigError

    value = "a100\ntouch injected #"
    section: dict[str, object] = {}
    *parents, leaf = key.split(".")
    node = section
    for part in parents:
        node = node.setdefault(part, {})  # type: ignore[assignment]
    node[leaf] = value
    with pytest.raises(ConfigError, match=rf"slurm\.{key}=.*control character"):
        slurm_config(section)
    for bad in ("tab\there", "bell\x07"):
        with pytest.raises(ConfigError, match="control character"):
            slurm_config({"job_name": bad})
    rc = alit(["train", "tokenizer", "--config", "configs/tokenizer/vq_emoji_cpu.yaml", "--cluster", "slurm",
               f"run_dir={tmp_path / 'run'}", f"slurm.{key}=" + '"a100\\ntouch injected #"'])  # YAML's \n: a newline
    err = capsys.readouterr().err
    assert rc == 2 and "control character" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() and not Path("injected").exists()


def test_gpus_mean_one_process_each_and_requeues_are_a_flag() -> None:
    import argparse

    from slurm.launcher import add_cluster_arguments, slurm_config_from_args

    parser = argparse.ArgumentParser()
    add_cluster_arguments(parser)

    def cfg(*argv: str) -> SlurmConfig:
        return slurm_config_from_args(parser.parse_args(["--cluster", "slurm", *argv]))

    assert cfg("--gpus", "2").tasks_per_node == 2 and cfg("--gpus", "2").num_tasks == 2
    assert cfg("--gpus", "8", "--nodes", "2").num_tasks == 16
    assert cfg("--gpus", "2", "--tasks", "1").tasks_per_node == 1  # --tasks says otherwise
    assert cfg().tasks_per_node == 1 and SlurmConfig(gpus_per_node=4).tasks_per_node == 4
    c = cfg("--max-requeues", "5", "--time", "2:00:00")
    assert c.max_num_timeout == 5 and c.total_time_min == 720
    assert "120 min per attempt, up to 5 requeue(s)" in c.describe_time() and "at most 12h00" in c.describe_time()


def test_a_process_outside_srun_in_an_allocation_runs_alone(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """The batch script of a 2-task allocation has SLURM_NTASKS=2 but no job step: one rank, said so (it would
    wait forever for a second rank); under srun the step's variables give the ranks."""
    from tokenizer.core.distributed import _ranks_from_env

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert _ranks_from_env() == (1, 0, 0)
    assert "not started by srun" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert _ranks_from_env() == (2, 1, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert _ranks_from_env()[:2] == (4, 3)  # torchrun's variables first


def test_parse_exports() -> None:
    text = "export SLURM_CONF=/var/a\\ b/etc/slurm.conf\n# comment\nnoise\nexport X='1 2' Y=3\n"
    assert parse_exports(text) == {"SLURM_CONF": "/var/a b/etc/slurm.conf", "X": "1 2", "Y": "3"}


def test_debug_and_local_executors_run_a_spec(tmp_path: Path) -> None:
    # the cluster is pinned: submitit would pick Slurm by itself wherever srun is installed
    assert make_executor("local", tmp_path / "x", QUICK).cluster == "local"
    job = submit(spec("square", x=5), run_dir=tmp_path / "debug", cfg=QUICK, cluster="debug")
    assert wait_with_errors([job]) == [25]
    job = submit(spec("square", x=6), run_dir=tmp_path / "local", cfg=QUICK, cluster="local")
    assert wait_with_errors([job], timeout_s=WAIT_S) == [36]
    assert job.paths.stdout.is_relative_to(tmp_path / "local" / "slurm")


# ============================================================================ the dev cluster script
def _free_port_base() -> int:
    for base in range(17817, 19817, 10):
        try:
            for port in range(base, base + 4):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError("no four free ports in 17817-19817")


def _pids(directory: Path) -> dict[str, int]:
    files = {"munged": "munge/munged.pid", "mariadbd": "mysql/mysqld.pid", "slurmdbd": "run/slurmdbd.pid",
             "slurmctld": "run/slurmctld.pid", "slurmd": "run/slurmd.pid"}
    return {name: int((directory / f).read_text().strip()) for name, f in files.items()
            if (directory / f).exists() and (directory / f).read_text().strip()}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slurm
def test_script_starts_and_stops_only_its_own(slurm_cluster: DevCluster, tmp_path: Path) -> None:
    """A second cluster (own dir and ports, no accounting) starts, runs a job, and stops without touching
    the session's cluster or a same-named process whose PID sits in its pid file."""
    session_pids = _pids(Path(slurm_cluster.directory))
    assert {"munged", "slurmctld", "slurmd"} <= set(session_pids)
    other = DevCluster(directory=os.path.join(tempfile.gettempdir(), f"alit-slurm-t{os.getpid()}"), accounting=False, port_base=_free_port_base())
    decoy_bin = tmp_path / "slurmd"
    shutil.copy("/bin/sleep", decoy_bin)
    decoy = subprocess.Popen([str(decoy_bin), "120"])
    try:
        env = other.start()
        assert env == {"SLURM_CONF": str(other.conf)}
        assert other.is_up() and other.start() == env  # a second start is a no-op
        own = _pids(Path(other.directory))
        assert set(own) == {"munged", "slurmctld", "slurmd"}
        for pid in own.values():
            assert f"ALIT_SLURM_MARKER={other.directory}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
        out = subprocess.run(["srun", "-t", "1", "hostname"], env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        other.stop()
        assert not other.is_up()
        assert not any(_alive(pid) for pid in own.values()), "a daemon of the stopped cluster survived"
        # a stale pid file pointing at a same-named process that is not ours: stop must leave it alone
        (Path(other.directory) / "run" / "slurmd.pid").write_text(str(decoy.pid))
        other.stop()
        assert decoy.poll() is None, "stop killed a process that was not its own"
        assert all(_alive(pid) for pid in session_pids.values()), "stopping one cluster hurt another"
        assert slurm_cluster.is_up()
        assert subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    finally:
        decoy.kill()
        decoy.wait()
        other.purge()
    assert not Path(other.directory).exists()


# ============================================================================ jobs on the dev cluster
@pytest.mark.slurm
def test_job_returns_its_result_and_logs_under_the_run_dir(tmp_path: Path) -> None:
    job = submit(spec("square", x=7), run_dir=tmp_path, cfg=QUICK)
    assert wait_with_errors([job], timeout_s=WAIT_S) == [49]
    assert job.paths.folder == tmp_path / "slurm" / job.job_id
    assert job.paths.stdout.exists() and job.paths.stderr.exists()


@pytest.mark.slurm
def test_array_of_four_jobs(tmp_path: Path) -> None:
    jobs = submit_array([spec("square", x=i) for i in range(4)], run_dir=tmp_path, cfg=QUICK)
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1, "not one Slurm array"
    assert [j.job_id.split("_")[1] for j in jobs] == ["0", "1", "2", "3"]
    assert wait_with_errors(jobs, timeout_s=WAIT_S) == [0, 1, 4, 9]


@pytest.mark.slurm
def test_failed_job_error_names_its_logs_and_shows_stderr(tmp_path: Path) -> None:
    ok = submit(spec("square", x=3), run_dir=tmp_path, cfg=QUICK)
    bad = submit(spec("fail_loudly", code=42), run_dir=tmp_path, cfg=QUICK)
    with pytest.raises(SlurmJobError) as err:
        wait_with_errors([ok, bad], timeout_s=WAIT_S)
    message = str(err.value)
    assert message.startswith("1 of 2 job(s) failed")
    assert f"job {bad.job_id} " in message and f"job {ok.job_id} " not in message
    assert "ValueError: bad input 42" in message
    assert str(bad.paths.stderr) in message and str(bad.paths.stdout) in message
    assert "last 20 lines of stderr" in message
    tail = message.split("last 20 lines of stderr:")[1].strip().splitlines()
    assert len(tail) == 20 and tail[-1].strip() == bad.paths.stderr.read_text().strip().splitlines()[-1].strip()


@pytest.mark.slurm
def test_unknown_partition_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match=r"partition 'no_such_part' does not exist.*\['debug'\]"):
        submit(spec("square", x=1), run_dir=tmp_path, cfg=SlurmConfig(partition="no_such_part", time_min=5))
    assert not (tmp_path / "slurm").exists(), "something was submitted"


@pytest.mark.slurm
def test_two_tasks_join_one_process_group(tmp_path: Path) -> None:
    cfg = SlurmConfig(tasks_per_node=2, cpus_per_task=1, time_min=5, job_name="alit-test-dist")
    job = submit(spec("allreduce_ranks"), run_dir=tmp_path, cfg=cfg)
    [per_task] = wait_with_errors([job], timeout_s=WAIT_S)
    assert sorted(r["rank"] for r in per_task) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in per_task)
    assert per_task[0]["master"] == per_task[1]["master"]


@pytest.mark.slurm
@pytest.mark.parametrize("own_handler", [False, True], ids=["submitit-handler", "trainer-style"])
def test_preempted_job_is_requeued_and_resumes(tmp_path: Path, own_handler: bool) -> None:
    state_file = tmp_path / "state.json"
    job = submit(spec("count_steps", state_file=str(state_file), total=30, step_s=0.2, own_handler=own_handler),
                 run_dir=tmp_path, cfg=QUICK)

    def progress() -> int:
        try:
            return json.loads(state_file.read_text())["step"]
        except (OSError, ValueError):
            return 0

    wait_until(lambda: progress() >= 3, 60, "the job to make progress")
    job._interrupt(timeout=True)  # USR2 alone, as Slurm sends before the time limit
    [state] = wait_with_errors([job], timeout_s=WAIT_S)
    assert state["step"] == 30
    first, second = state["resumed_from"]  # exactly two attempts
    assert first == 0 and 3 <= second < 30, state["resumed_from"]
    log = job.paths.stderr.read_text()
    assert "attempt 2 of job" in log
    assert ("stopped early for preemption: requeueing" in log) == own_handler

"""Multi-node training on the two-node dev cluster, and the safety of the cluster's state directory.

The two-node cluster (``ALIT_SLURM_NODES=2 bash slurm/cluster.sh start``; tests/slurm_fixtures.py
``two_node_cluster``) runs two slurmd, ``alitn1`` and ``alitn2``, each in its own network namespace with
its own address and hostname. ``alit train --cluster slurm --nodes 2`` there is a real 2-node x 1-task
gloo job: rank 0's node is MASTER_ADDR for rank 1 on the other node. Its final weights must equal, tensor
for tensor, those of a 1-node x 2-task run of the same config (same world size, same data shards, same
averaging), and each rank's log names a different node.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from slurm.cluster import MARKER, REFUSED, SCRIPT, DevCluster
from tests.test_sweep import _digest, alit, final_tensors, last_step, write_config

# submitit's first line in each task's log: "Starting with JobEnvironment(job_id=.., hostname=alitn1, ...,
# global_rank=0(2))" -- hostname is socket.gethostname() of the task (the node name in its namespace)
STARTING = re.compile(r"Starting with JobEnvironment\(job_id=(\d+), hostname=([^,]+), .*global_rank=(\d+)\((\d+)\)\)")


def ranks_and_hosts(run_dir: Path) -> dict[int, str]:
    """global rank -> the hostname its task logged (from the run's submitit task logs)."""
    found: dict[int, str] = {}
    for log in sorted((run_dir / "slurm").glob("*/*_log.*")):  # submitit logs it to <job>_<task>_log.out
        for m in STARTING.finditer(log.read_text()):
            found[int(m.group(3))] = m.group(2)
            assert int(m.group(4)) == 2, f"{log}: world size {m.group(4)}, not 2"
    return found


# ============================================================================ on the two-node cluster
@pytest.mark.slurm
def test_two_node_job_matches_one_node_two_tasks(tmp_path: Path, base_vq: Path, monkeypatch: pytest.MonkeyPatch,
                                                 two_node_cluster: tuple[DevCluster, dict[str, str]]) -> None:
    cluster, env = two_node_cluster
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    cfg = write_config(tmp_path / "tiny.yaml", base_vq)
    common = ["train", "tokenizer", "--config", str(cfg), "--cluster", "slurm", "--cpus", "1", "--time", "5"]
    runs = {"nodes2": ["--nodes", "2", "--tasks", "1"], "nodes1": ["--nodes", "1", "--tasks", "2"]}
    with ThreadPoolExecutor(2) as pool:  # both jobs at once (each node advertises >= 4 CPUs)
        rcs = {name: pool.submit(alit, [*common, *flags, f"run_dir={tmp_path / name}"]) for name, flags in runs.items()}
        assert {name: rc.result(timeout=300) for name, rc in rcs.items()} == {"nodes2": 0, "nodes1": 0}

    two, one = ranks_and_hosts(tmp_path / "nodes2"), ranks_and_hosts(tmp_path / "nodes1")
    print(f"\n2 nodes x 1 task: rank -> node {two}\n1 node x 2 tasks: rank -> node {one}")
    assert sorted(two) == [0, 1] and sorted(one) == [0, 1], (two, one)
    assert two[0] != two[1], f"the 2-node job's ranks ran on the same node: {two}"
    assert set(two.values()) == set(cluster.node_names)
    assert one[0] == one[1], f"the 1-node job's ranks ran on different nodes: {one}"

    for name in runs:  # both trained as 2 DDP ranks (rank 0 says so in its log)
        logs = "".join(p.read_text() for p in (tmp_path / name / "slurm").glob("*/*_0_log.err"))
        assert "global batch 16 = 2 rank(s) x 8" in logs, logs[-2000:]
    assert last_step(tmp_path / "nodes2") == last_step(tmp_path / "nodes1") == 6
    a, b = final_tensors(tmp_path / "nodes2"), final_tensors(tmp_path / "nodes1")
    assert a.keys() == b.keys() and len(a) > 10
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"2-node weights differ from the 1-node 2-task run's in {len(differ)} tensors: {differ[:3]}"
    assert _digest(a) == _digest(b)


# ============================================================================ the state directory (no cluster)
def script(command: str, directory: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), command], env={**os.environ, "ALIT_SLURM_DIR": str(directory), **env},
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (cluster.sh refuses paths too long for unix sockets before anything)."""
    path = Path(tempfile.mkdtemp(prefix="alit-t", dir=tempfile.gettempdir()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_state_dir_not_made_by_the_script_is_refused_and_untouched(short_tmp: Path) -> None:
    tmp_path = short_tmp
    uid = os.geteuid()
    unmarked = tmp_path / "unmarked"
    unmarked.mkdir(mode=0o700)
    (unmarked / "precious.txt").write_text("keep me")
    foreign = tmp_path / "foreign"  # a marker, but of another uid
    foreign.mkdir(mode=0o700)
    (foreign / MARKER).write_text(f"created by slurm/cluster.sh uid={uid + 1}\n")
    marked = tmp_path / "marked"  # a marker of ours, but reached through a symlink
    marked.mkdir(mode=0o700)
    (marked / MARKER).write_text(f"created by slurm/cluster.sh uid={uid}\n")
    link = tmp_path / "link"
    link.symlink_to(marked)
    open_dir = tmp_path / "open"  # ours and marked, but writable by everyone
    open_dir.mkdir()
    (open_dir / MARKER).write_text(f"created by slurm/cluster.sh uid={uid}\n")
    open_dir.chmod(0o777)
    commands = ["stop", "status", "env", "purge"]
    if uid == 0 and shutil.which("slurmctld") and shutil.which("munged"):
        commands.append("start")
    for directory, why in ((unmarked, "no marker file"), (foreign, f"not written by uid {uid}"),
                           (link, "symbolic link"), (open_dir, "writable by others")):
        before = listing(directory)
        for command in commands:
            proc = script(command, directory, ALIT_SLURM_ACCOUNTING="0")
            assert proc.returncode == REFUSED, (command, directory, proc.stderr)
            assert f"refusing to use {directory}: " in proc.stderr and why in proc.stderr, proc.stderr
            assert listing(directory) == before, f"{command} changed {directory}"
        for nodes in ("1", "2"):  # the two-node mode checks the same way
            assert script("purge", directory, ALIT_SLURM_NODES=nodes).returncode == REFUSED
    assert (unmarked / "precious.txt").read_text() == "keep me" and link.is_symlink() and marked.is_dir()


def test_purge_deletes_a_directory_the_script_marked(tmp_path: Path) -> None:
    marked = tmp_path / "m"
    marked.mkdir(mode=0o700)
    (marked / MARKER).write_text(f"created by slurm/cluster.sh uid={os.geteuid()}\n")
    (marked / "log").mkdir()
    proc = script("purge", marked, ALIT_SLURM_ACCOUNTING="0")
    assert proc.returncode == 0, proc.stderr
    assert not marked.exists()
    assert script("purge", marked).returncode == 0  # nothing there: nothing to do


@pytest.mark.slurm
def test_running_clusters_dirs_are_private_and_marked(slurm_cluster: DevCluster) -> None:
    directory = Path(slurm_cluster.directory)
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert (directory / MARKER).read_text().strip() == f"created by slurm/cluster.sh uid={os.geteuid()}"

"""pytest plugin: the project's dev Slurm cluster for tests marked ``@pytest.mark.slurm``.

Registered in tests/conftest.py with ``pytest_plugins = ["tests.slurm_fixtures"]``.

The session fixture :func:`slurm_cluster` uses a cluster that is already up (``make test`` / CI start
one with ``slurm/cluster.sh``) and leaves it running; otherwise it installs the packages if needed
(root, apt-get), starts one, exports ``SLURM_CONF`` and stops it at the end of the session. When no
cluster can be had, the Slurm tests are skipped with the reason (shown by ``-ra``), or fail when
``ALIT_REQUIRE_SLURM=1`` or ``CI=true`` (set by CI), so a broken cluster cannot pass as "skipped".

:func:`two_node_cluster` does the same for the separate two-node cluster (``ALIT_SLURM_NODES=2``: nodes
alitn1/alitn2 in network namespaces, its own directory and ports), used if up, else started for the
session (about 3 s) and stopped at its end. It does not export ``SLURM_CONF``: a test points its jobs
at it with ``monkeypatch.setenv("SLURM_CONF", ...)``.

Under pytest-xdist (``python -m tests.run`` runs the suite on two workers) each cluster is started once for all
workers: the first worker that needs it starts it under a file lock in the session's shared temporary
directory and leaves a marker there; workers never stop it, the controller does at the end of the session
(:func:`pytest_sessionfinish`), and only a cluster a worker started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from filelock import FileLock

from slurm.cluster import ClusterError, DevCluster
from tests.needs import unavailable

# Advertise at least this many CPUs: 1-CPU test jobs (an array of 4, two 2-task jobs) then run side by
# side even on a 2-core machine.
MIN_TEST_CPUS = 4


def _unavailable(reason: str) -> NoReturn:
    unavailable("dev Slurm cluster", reason, "ALIT_REQUIRE_SLURM")


def _one_cluster() -> DevCluster:
    return DevCluster(cpus=max(MIN_TEST_CPUS, os.cpu_count() or 1))


def _two_node_cluster() -> DevCluster:
    return DevCluster(nodes=2, cpus=max(MIN_TEST_CPUS, os.cpu_count() or 1))


CLUSTERS: dict[str, Callable[[], DevCluster]] = {"slurm": _one_cluster, "two-node": _two_node_cluster}


def _shared_dir(factory: pytest.TempPathFactory) -> Path | None:
    """The directory every xdist worker of this session shares (None outside xdist)."""
    return factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None


@contextlib.contextmanager
def _started_once(name: str, factory: pytest.TempPathFactory) -> Iterator[Callable[[], bool]]:
    """Serialise the start of cluster ``name`` across xdist workers. Yields ``started()``, called by the
    process that started it: it returns whether that process stops it at the end (outside xdist), else
    leaves the marker by which the controller stops it."""
    shared = _shared_dir(factory)
    if shared is None:
        yield lambda: True
        return
    def started() -> bool:
        (shared / f"cluster-{name}.started").touch()
        return False  # the controller stops it

    with FileLock(str(shared / f"cluster-{name}.lock")):
        yield started


def pytest_sessionfinish(session: pytest.Session) -> None:
    """xdist controller: stop the clusters that a worker started for this session."""
    if session.config.pluginmanager.getplugin("dsession") is None:  # not the controller of xdist workers
        return
    shared = session.config._tmp_path_factory.getbasetemp()
    for name, make in CLUSTERS.items():
        marker = shared / f"cluster-{name}.started"
        if marker.exists():
            with contextlib.suppress(ClusterError):
                make().stop()
            marker.unlink()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """A running dev cluster with ``SLURM_CONF`` exported into ``os.environ`` for the session."""
    with _started_once("slurm", tmp_path_factory) as mark_started:
        cluster, env, started_here = _up_or_started(mark_started)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started_here:
            cluster.stop()


def _up_or_started(mark_started: Callable[[], bool]) -> tuple[DevCluster, dict[str, str], bool]:
    """(the dev cluster, its variables, whether this process must stop it at the end)."""
    cluster = _one_cluster()
    started_here = False
    root = os.geteuid() == 0
    # root can check every daemon; a user can only see whether a cluster root started answers
    if cluster.is_up() if root else cluster.answers():
        env = cluster.env()
    else:
        if not root:
            _unavailable("starting it needs root (run `sudo bash slurm/cluster.sh install && "
                         "sudo bash slurm/cluster.sh start`, or run the tests as root)")
        if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
            _unavailable("Slurm is not installed and there is no apt-get to install it")
        try:
            cluster.install()
            env = cluster.start()
        except ClusterError as e:
            with contextlib.suppress(ClusterError):  # a failed start may have left some daemons up
                cluster.stop()
            _unavailable(str(e))
        started_here = mark_started()
    return cluster, env, started_here


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevCluster, dict[str, str]]]:
    """The two-node dev cluster (started here if it is not up) and its variables (``SLURM_CONF``)."""
    cluster = _two_node_cluster()
    started_here = False
    if os.geteuid() != 0:
        _unavailable("the two-node cluster needs root (network namespaces)")
    with _started_once("two-node", tmp_path_factory) as mark_started:
        if cluster.is_up():
            env = cluster.env()
        else:
            if shutil.which("apt-get") is None and shutil.which("ip") is None:
                _unavailable("the two-node cluster needs iproute2 (ip) and there is no apt-get to install it")
            try:  # install() adds iproute2 if missing
                cluster.install()
                env = cluster.start()
            except ClusterError as e:
                with contextlib.suppress(ClusterError):
                    cluster.stop()
                _unavailable(f"two-node cluster: {e}")
            started_here = mark_started()
    try:
        yield cluster, env
    finally:
        if started_here:
            cluster.stop()


@pytest.fixture(autouse=True)
def _slurm_marker(request: pytest.FixtureRequest) -> None:
    """Tests marked ``slurm`` get the cluster without naming the fixture."""
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 0.1 s; fail the test naming ``what`` after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)

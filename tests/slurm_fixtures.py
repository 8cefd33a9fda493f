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
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from slurm.cluster import ClusterError, DevCluster

# Advertise at least this many CPUs: 1-CPU test jobs (an array of 4, two 2-task jobs) then run side by
# side even on a 2-core machine.
MIN_TEST_CPUS = 4


def _unavailable(reason: str) -> None:
    message = f"dev Slurm cluster unavailable: {reason}"
    print(f"\n[slurm_cluster] {message}", file=sys.stderr)
    if os.environ.get("ALIT_REQUIRE_SLURM") == "1" or os.environ.get("CI") == "true":
        pytest.fail(f"{message} (ALIT_REQUIRE_SLURM=1 requires it)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[DevCluster]:
    """A running dev cluster with ``SLURM_CONF`` exported into ``os.environ`` for the session."""
    cluster = DevCluster(cpus=max(MIN_TEST_CPUS, os.cpu_count() or 1))
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
        started_here = True
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


@pytest.fixture(scope="session")
def two_node_cluster() -> Iterator[tuple[DevCluster, dict[str, str]]]:
    """The two-node dev cluster (started here if it is not up) and its variables (``SLURM_CONF``)."""
    cluster = DevCluster(nodes=2, cpus=max(MIN_TEST_CPUS, os.cpu_count() or 1))
    started_here = False
    if os.geteuid() != 0:
        _unavailable("the two-node cluster needs root (network namespaces)")
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
        started_here = True
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

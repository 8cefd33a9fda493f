"""The project's dev Slurm cluster from Python, and the check that a Slurm client is installed.

``slurm/cluster.sh`` does the work (one real Slurm on this machine, started without systemd, stopped by
saved PID: a single node on localhost, or with ``nodes=2`` a separate cluster whose two compute nodes
``alitn1``/``alitn2`` run each in its own network namespace); :class:`DevCluster` runs it::

    cluster = DevCluster()            # directory: $ALIT_SLURM_DIR or <tempdir>/alit-slurm
    cluster.install()                 # apt-get the packages if missing (root, Debian/Ubuntu)
    os.environ.update(cluster.start())  # {"SLURM_CONF": ".../etc/slurm.conf"}
    ...                               # sbatch / srun / submitit
    cluster.stop()

    two = DevCluster(nodes=2)         # directory <tempdir>/alit-slurm2n, ports 6827-6830: runs beside it

The directory is made fresh with mode 0700 and a marker file (the creating uid); the script refuses
(exit 2, :class:`ClusterError` here) a directory that exists without it, and never deletes one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenizer.core.errors import UserError

SCRIPT = Path(__file__).with_name("cluster.sh")
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "alit-slurm")  # short: unix socket paths < 108 bytes
DEFAULT_DIR_2N = os.path.join(tempfile.gettempdir(), "alit-slurm2n")  # the two-node cluster's
TWO_NODE_NAMES = ("alitn1", "alitn2")  # the two-node cluster's nodes (= their hostnames inside the namespaces)
MARKER = ".alit-slurm-dir"  # the file cluster.sh writes into a directory it creates
REFUSED = 2  # cluster.sh's exit status when it refuses a directory it did not create

NO_SBATCH = ("no sbatch found: install Slurm or use --cluster local/debug; for a laptop dev cluster run "
             "`bash slurm/cluster.sh install && eval $(bash slurm/cluster.sh start)`")


class ClusterError(UserError, RuntimeError):
    """The dev cluster could not be installed, started or stopped, or no Slurm client is available."""


def require_sbatch() -> str:
    """The path of ``sbatch``; :class:`ClusterError` with what to do when it is not on ``PATH``."""
    path = shutil.which("sbatch")
    if path is None:
        raise ClusterError(NO_SBATCH)
    return path


def parse_exports(text: str) -> dict[str, str]:
    """The variables of ``export NAME=VALUE`` lines (shell-quoted values, as ``cluster.sh env`` prints)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if len(words) >= 2 and words[0] == "export":
            for word in words[1:]:
                name, sep, value = word.partition("=")
                if sep:
                    env[name] = value
    return env


@dataclass
class DevCluster:
    """One dev cluster: its directory and settings (``None`` = the script's default)."""

    directory: str | Path | None = None  # all config, state, logs and sockets; keep it short (< ~55 chars)
    nodes: int = 1  # 1: node "localhost"; 2: nodes alitn1 + alitn2 in network namespaces (own dir and ports)
    accounting: bool = True  # run mariadbd + slurmdbd so that sacct (and so submitit's job states) works
    cpus: int | None = None  # CPUs the node advertises (more than the hardware lets more jobs run at once)
    port_base: int | None = None  # slurmctld port; slurmd, slurmdbd and mariadbd use the next three
    partition: str | None = None  # name of the single (default) partition; default "debug"
    smoke: bool = True  # run `srun true` at the end of start
    timeout_s: float = 300.0  # limit for one script call (install may download packages)

    def __post_init__(self) -> None:
        if self.nodes not in (1, 2):
            raise ValueError(f"DevCluster.nodes must be 1 or 2, got {self.nodes}")
        # $ALIT_SLURM_DIR names the single-node cluster's directory; the two-node one has its own default
        default = (os.environ.get("ALIT_SLURM_DIR") or DEFAULT_DIR) if self.nodes == 1 else DEFAULT_DIR_2N
        self.directory = Path(self.directory or default)
        if len(str(self.directory)) > 55:
            raise ValueError(f"DevCluster.directory '{self.directory}' is too long for unix socket paths: "
                             "use a path under ~55 characters (e.g. <tempdir>/alit-slurm)")
        if self.cpus is not None and self.cpus < 1:
            raise ValueError(f"DevCluster.cpus must be >= 1 (or None for the hardware's), got {self.cpus}")

    @property
    def conf(self) -> Path:
        """The cluster's ``slurm.conf`` (what ``SLURM_CONF`` points to)."""
        return Path(self.directory) / "etc" / "slurm.conf"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, ALIT_SLURM_DIR=str(self.directory), ALIT_SLURM_NODES=str(self.nodes),
                   ALIT_SLURM_ACCOUNTING="1" if self.accounting else "0", ALIT_SLURM_SMOKE="1" if self.smoke else "0")
        for name, value in (("ALIT_SLURM_CPUS", self.cpus), ("ALIT_SLURM_PORT_BASE", self.port_base),
                            ("ALIT_SLURM_PARTITION", self.partition)):
            if value is not None:
                env[name] = str(value)
        return env

    def run(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cluster.sh COMMAND``; :class:`ClusterError` with its log tail if it fails and ``check``."""
        try:
            proc = subprocess.run(["bash", str(SCRIPT), command], env=self._env(), capture_output=True,
                                  text=True, timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"`bash {SCRIPT} {command}` did not finish in {self.timeout_s:.0f} s "
                               f"(logs: {self.directory}/log)") from e
        if check and proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
            raise ClusterError(f"`bash {SCRIPT} {command}` failed (exit {proc.returncode}; logs: "
                               f"{self.directory}/log):\n{tail}")
        return proc

    def install(self) -> None:
        """Install the Slurm, munge (and accounting) packages if missing; needs root and apt-get."""
        self.run("install")

    def start(self) -> dict[str, str]:
        """Start the cluster (a no-op if it runs) and return the variables to export (``SLURM_CONF``)."""
        env = parse_exports(self.run("start").stdout)
        if "SLURM_CONF" not in env:
            raise ClusterError(f"`bash {SCRIPT} start` printed no 'export SLURM_CONF=...' line")
        return env

    def env(self) -> dict[str, str]:
        """The variables to export for an already configured cluster."""
        return parse_exports(self.run("env").stdout)

    def stop(self) -> None:
        """Cancel all jobs and stop the daemons of this cluster only (by saved PID); idempotent."""
        self.run("stop")

    def purge(self) -> None:
        """Stop the cluster and delete its directory."""
        self.run("purge")

    def is_up(self) -> bool:
        """Whether every daemon of this cluster runs (a check that needs root when root started them)."""
        return self.run("status", check=False).returncode == 0

    @property
    def node_names(self) -> tuple[str, ...]:
        """The cluster's node names."""
        return TWO_NODE_NAMES if self.nodes == 2 else ("localhost",)

    def answers(self) -> bool:
        """Whether this cluster's controller answers (what a user can check of a cluster root started)."""
        if not self.conf.exists() or shutil.which("scontrol") is None:
            return False
        try:
            proc = subprocess.run(["scontrol", "ping"], env=dict(os.environ, SLURM_CONF=str(self.conf)),
                                  capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0 and "is UP" in proc.stdout

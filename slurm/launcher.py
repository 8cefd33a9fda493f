"""The one launcher: any ``module:function`` as a Slurm job (or a local/debug one) through submitit.

Every job runs a :class:`JobSpec` inside a :class:`ResumableJob`. Before the time limit (and on a
preemption configured to send the user signal) Slurm sends USR2; submitit then calls
:meth:`ResumableJob.checkpoint`, which requeues the same job, and the function picks up where it stopped
from its run directory (the Trainer resumes from ``run_dir/checkpoints/latest`` by itself). A function
that catches the signal itself (the Trainer stops at the next step boundary and checkpoints on SIGTERM,
SIGUSR2 and SIGINT) raises :class:`Preempted` naming the signal, and :func:`stop_action` decides what
the job does next: SIGUSR2 requeues; a user's ``scancel`` (SIGTERM, the job marked CANCELLED) and SIGINT
stop without a requeue (run the same command again to resume); a SIGTERM from Slurm's own preemption
or time limit requeues (the controller is asked which it was; see "what a stopping signal means").

Usage::

    spec = JobSpec("package.module:function", {"run_dir": run_dir, "steps": 1000})
    job = submit(spec, run_dir=run_dir, cfg=SlurmConfig(partition="gpu", gpus_per_node=8,
                                                          tasks_per_node=8), cluster="slurm")
    [result] = wait_with_errors([job])          # or "local" / "debug" on a laptop
    jobs = submit_array([spec_a, spec_b], run_dir=run_dir)   # one Slurm array

Logs of a job go to ``<run_dir>/slurm/<job id>/`` (stdout ``*_log.out``, stderr ``*_log.err``).
Slurm and local jobs export ``OMP_NUM_THREADS=<cpus_per_task>`` and ``SlurmConfig.env`` before Python
starts (the executor's setup lines). :func:`add_cluster_arguments` and :func:`slurm_config_from_args`
give commands the ``--cluster`` option and the resource flags.
In a job of several tasks every task runs the function with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set, so ``init_distributed()`` joins one process group.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import FailedJobError, UncompletedJobError

from tokenizer.core.errors import EXIT_FAILED, UsageError
from tokenizer.core.trainer import Preempted  # raised by a stopped training run; requeues the job

from .cluster import ClusterError, require_sbatch

Cluster = Literal["slurm", "local", "debug"]
CLUSTERS: tuple[str, ...] = ("slurm", "local", "debug")


class SlurmJobError(RuntimeError):
    """One or more jobs failed; the message names each job, its logs and the end of its stderr."""


# ============================================================================ configuration
@dataclass
class SlurmConfig:
    """Resources of one job (per node / per task as in sbatch)."""

    partition: str | None = None  # Slurm partition; None = the cluster's default partition
    nodes: int = 1  # nodes of one job
    tasks_per_node: int | None = None  # processes per node, each running the function; None = one per GPU
    #                                    asked for (gpus_per_node), at least 1
    gpus_per_node: int = 0  # GPUs per node (0 = do not ask for any)
    cpus_per_task: int = 1  # CPU cores per process (data-loading workers + 1)
    mem_gb: float | None = None  # memory per node in GB; None = the partition's default
    time_min: int = 60  # time limit of one attempt, in minutes (requeues start the clock again)
    account: str | None = None  # Slurm account to charge
    qos: str | None = None  # Slurm quality of service
    max_num_timeout: int = 3  # requeues allowed after reaching the time limit (--max-requeues)
    signal_delay_s: int = 90  # USR2 comes this long before the time limit (time to checkpoint)
    job_name: str = "alit"  # name shown by squeue
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {"constraint": "a100"}
    env: dict[str, str] = field(default_factory=dict)  # variables exported before Python starts (slurm, local)

    def __post_init__(self) -> None:
        if self.tasks_per_node is None:
            self.tasks_per_node = max(1, self.gpus_per_node)
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"slurm.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "max_num_timeout", "signal_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"slurm.{name} must be >= 0, got {getattr(self, name)}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"slurm.mem_gb must be > 0 (or null for the partition's default), got {self.mem_gb}")
        if not self.job_name.strip():
            raise ValueError("slurm.job_name must not be empty")
        if self.partition is not None and not self.partition.strip():
            raise ValueError("slurm.partition must be a name or null (the default partition), not empty")
        bad = [k for k in self.extra if not isinstance(k, str) or not k or k.startswith("-")]
        if bad:
            raise ValueError(f"slurm.extra keys must be sbatch option names without dashes "
                             f"(e.g. 'constraint'), got {bad}")
        bad = [k for k in self.env if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise ValueError(f"slurm.env keys must be environment variable names (e.g. OMP_NUM_THREADS), got {bad}")
        # every value ends up in the job script (#SBATCH lines, export lines): a newline there would end the
        # #SBATCH block and run what follows as shell, so no control character is accepted anywhere
        values = {"partition": self.partition, "account": self.account, "qos": self.qos, "job_name": self.job_name,
                  **{f"extra.{k}": v for k, v in self.extra.items()}, **{f"env.{k}": v for k, v in self.env.items()}}
        for key, value in values.items():
            if value is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in str(value)):
                raise ValueError(f"slurm.{key}={str(value)!r} holds a control character (newline, tab, ...), "
                                 "which would break the job script: give a plain one-line value")

    @property
    def total_time_min(self) -> int:
        """The longest a job can run in all: its first attempt and every requeue after a time limit."""
        return self.time_min * (1 + self.max_num_timeout)

    def describe_time(self) -> str:
        """``60 min per attempt, up to 3 requeues after the time limit: at most 4h00 in all``."""
        total = self.total_time_min
        return (f"{self.time_min} min per attempt, up to {self.max_num_timeout} requeue(s) after the time limit "
                f"(--max-requeues; preemptions do not count): at most {total // 60}h{total % 60:02d} in all")

    @property
    def num_tasks(self) -> int:
        """Processes of one job in all."""
        return self.nodes * self.tasks_per_node

    def job_env(self) -> dict[str, str]:
        """What a job exports: ``OMP_NUM_THREADS`` = ``cpus_per_task`` (one intra-op thread per CPU the task
        was given, so tasks do not oversubscribe a node), then :attr:`env`."""
        return {"OMP_NUM_THREADS": str(self.cpus_per_task), **{k: str(v) for k, v in self.env.items()}}


@dataclass(frozen=True)
class JobSpec:
    """What a job runs: ``target(**kwargs)``; picklable, so it travels to the job and back on requeue."""

    target: str  # "package.module:function", importable where the job runs
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments (picklable values)
    requeue: bool = True  # requeue on preemption/timeout; False = the job ends there
    pythonpath: tuple[str, ...] = ()  # directories put in front of sys.path before importing target

    def __post_init__(self) -> None:
        module, sep, name = self.target.partition(":")
        if not (sep and module and name.isidentifier()):
            raise ValueError(f"JobSpec.target must look like 'package.module:function', got '{self.target}'")

    def resolve(self) -> Callable[..., Any]:
        """Import the target function (a clear error if it cannot be found)."""
        for entry in reversed(self.pythonpath):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        module_name, _, name = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"JobSpec.target '{self.target}': cannot import '{module_name}' ({e}); "
                             "install the package or add its directory to JobSpec.pythonpath") from e
        fn = getattr(module, name, None)
        if not callable(fn):
            raise ValueError(f"JobSpec.target '{self.target}': '{module_name}' has no function '{name}'")
        return fn


# ============================================================================ the job
class ResumableJob(submitit.helpers.Checkpointable):
    """Runs a :class:`JobSpec`; on preemption or timeout it is requeued as it is, and resumes from disk."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.starts = 0  # attempts so far (kept across requeues: the requeued job is this object, pickled)

    def __call__(self) -> Any:
        self.starts += 1
        env = _job_environment()
        if env is not None:
            print(f"[launcher] {self.spec.target}: attempt {self.starts} of job {env.job_id} "
                  f"(task {env.global_rank}/{env.num_tasks})", file=sys.stderr, flush=True)
            if env.num_tasks > 1:
                _export_torch_distributed_env(env)
        fn = self.spec.resolve()
        # submitit installed its USR2 handler (checkpoint + requeue) before calling us; keep it, since
        # the function may install its own handlers (the Trainer does) and restore this one on return.
        handler = signal.getsignal(_preempt_signal())
        try:
            return fn(**self.spec.kwargs)
        except Preempted as stopped:
            if env is None or not isinstance(getattr(handler, "__self__", None), SignalHandler):
                raise  # not inside a submitit job: nothing to requeue
            # the run has checkpointed before raising: nothing is lost whatever is decided (or however long
            # the controller takes to answer) from here on
            decision = stop_action(stopped.signal, str(env.job_id) if env.cluster == "slurm" else None)
            if decision.action == STOP:
                print(f"[launcher] {self.spec.target} stopped by {stopped.signal or 'a call'}: {decision.reason}; "
                      "not requeued (run the same command again to resume)", file=sys.stderr, flush=True)
                raise Preempted(f"{stopped}; not requeued: {decision.reason}", stopped.signal) from None
            if decision.action == CONTROLLER_REQUEUES:
                print(f"[launcher] {self.spec.target} stopped by {stopped.signal}: {decision.reason}; the "
                      "controller restarts the job itself: exiting without a result", file=sys.stderr, flush=True)
                sys.exit(-1)  # like submitit after its own requeue: no result file, so the next attempt runs
            print(f"[launcher] {self.spec.target} stopped early for preemption: requeueing ({decision.reason})",
                  file=sys.stderr, flush=True)
            handler(_preempt_signal(), None)  # task 0: checkpoint() + `scontrol requeue`, then exits
            return None  # other tasks: the requeue ends them

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Requeue this same job (None = do not requeue); the function resumes from its run directory."""
        if not self.spec.requeue:
            return None
        return super().checkpoint(*args, **kwargs)


def _preempt_signal() -> signal.Signals:
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


# ============================================================================ what a stopping signal means
# The Trainer treats SIGTERM, SIGUSR2 and SIGINT alike (checkpoint at the next step boundary, raise
# Preempted naming the signal); what the JOB does next depends on who sent the signal:
#
#   SIGUSR2  Slurm's warning before the time limit (`--signal=USR2@signal_delay_s`, which submitit sets on
#            every job) or a preemption configured to send the user signal (PreemptParameters=
#            send_user_signal): requeue. This is submitit's own rule: JobEnvironment._handle_signals binds
#            USR2 to SignalHandler.checkpoint_and_try_requeue and SIGTERM to SignalHandler.bypass (logged,
#            ignored), i.e. submitit never requeues on SIGTERM.
#   SIGTERM  first of all a user's `scancel`: the controller marks the job CANCELLED, then sends SIGCONT +
#            SIGTERM to every task and SIGKILL KillWait seconds later. Stop, no requeue: `scontrol requeue`
#            of a cancelled job succeeds (checked on Slurm 22.05) and would bring back a job its user
#            cancelled. But Slurm also sends SIGTERM when it preempts a job without send_user_signal
#            (PreemptMode=CANCEL or REQUEUE, at once or after GraceTime) and at the time limit itself (when
#            USR2 did not come first), and a signal alone cannot tell these apart: so the controller is
#            asked (slurm_job_view) and the job requeues only for a preemption or a time limit it can name.
#   SIGINT   Ctrl-C of an interactive run (srun forwards it): stop.
#   None     Trainer.request_stop() called by code: stop.
#
# Asking the controller: while a cancelled job's tasks are being signalled, squeue and scontrol show it as
# COMPLETING (the flag hides the base state), but accounting (sacct) already has "CANCELLED by <uid>";
# a preempted job is PREEMPTED there (PreemptMode=CANCEL) or REQUEUED/PENDING (PreemptMode=REQUEUE: the
# controller requeues it itself, so the job must not requeue a second time), a job at its time limit is
# TIMEOUT, and scontrol shows a PreemptTime during a preemption's GraceTime. The safe default, when the
# answer is anything else or no answer comes (no accounting, a busy controller): stop without a requeue. A
# missed requeue costs a resubmission of the same command, which resumes from the checkpoint; a wrong one
# resurrects a job its user cancelled and spends their allocation. Even a USR2 is checked, for one case:
# a job cancelled after USR2 arrived (the Trainer keeps the first signal) must not requeue either.
# The cancel case is checked on the dev cluster (tests/test_slurm_signals.py); the preemption and
# time-limit answers follow Slurm's documentation (the dev cluster has no preemption configured), and are
# tested against those answers only. Since only the first signal counts, a SIGTERM followed by USR2 within
# one step (submitit's `job._interrupt()` without timeout=True) stops; preemption meant to requeue should
# send the user signal (PreemptParameters=send_user_signal) or use PreemptMode=REQUEUE.
REQUEUE, STOP, CONTROLLER_REQUEUES = "requeue", "stop", "controller-requeues"
CONTROLLER_QUERY_TIMEOUT_S = 5.0  # per command; the checkpoint is already written, so a slow answer loses nothing
_REQUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
_NO_PREEMPT_TIME = frozenset({"", "None", "Unknown", "N/A", "0"})


@dataclass(frozen=True)
class SlurmJobView:
    """What the controller says of a job: its accounting state (``sacct``: the base state, e.g. CANCELLED
    while the tasks are still being signalled), its controller state (``scontrol``: e.g. COMPLETING) and
    whether a preemption is under way (a PreemptTime). None = not known (the command failed)."""

    accounting_state: str | None = None
    controller_state: str | None = None
    preempt_time: str | None = None


@dataclass(frozen=True)
class StopDecision:
    """What a job whose run stopped on a signal does next (:data:`REQUEUE`, :data:`STOP` or
    :data:`CONTROLLER_REQUEUES`) and why, in words for its log."""

    action: str
    reason: str


def _query(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CONTROLLER_QUERY_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def slurm_job_view(job_id: str) -> SlurmJobView:
    """Ask ``sacct`` and ``scontrol`` about ``job_id`` (``123`` or an array task ``123_4``); fields that
    cannot be had are None."""
    accounting = None
    out = _query(["sacct", "--noheader", "--allocations", "--parsable2", "--jobs", job_id, "--format", "State"])
    lines = [line.strip() for line in (out or "").splitlines() if line.strip()]
    if lines:  # "CANCELLED by 1000" -> "CANCELLED"; the last line is the latest attempt
        accounting = lines[-1].split()[0].rstrip("+")
    controller = preempt = None
    out = _query(["scontrol", "show", "job", "--oneliner", job_id])
    if out:
        fields = dict(word.split("=", 1) for word in out.split() if "=" in word)
        controller = fields.get("JobState")
        preempt = fields.get("PreemptTime")
        preempt = None if preempt in _NO_PREEMPT_TIME else preempt
    return SlurmJobView(accounting, controller, preempt)


def stop_action(signal_name: str | None, job_id: str | None,
                view: Callable[[str], SlurmJobView] = slurm_job_view) -> StopDecision:
    """What a job does after its run stopped and checkpointed on ``signal_name`` ("SIGUSR2", "SIGTERM",
    "SIGINT"; None = a call). ``job_id`` is the Slurm job (None: not a Slurm job, e.g. the local executor,
    where no controller can be asked); ``view`` asks the controller about it (see the block comment above)."""
    preempt_signal = _preempt_signal().name
    if signal_name not in (preempt_signal, "SIGTERM"):
        return StopDecision(STOP, "SIGINT (interactive stop)" if signal_name == "SIGINT" else
                            f"{signal_name or 'a stop requested by code'}: not a preemption or time-limit signal")
    if job_id is None:
        if signal_name == preempt_signal:
            return StopDecision(REQUEUE, f"{signal_name} (the time limit is near or the job is preempted)")
        return StopDecision(STOP, "SIGTERM outside a Slurm job (e.g. kill): stopped, no requeue")
    job = view(job_id)
    if job.accounting_state == "CANCELLED":
        return StopDecision(STOP, f"job {job_id} was cancelled (scancel)")
    if signal_name == preempt_signal:
        return StopDecision(REQUEUE, f"{signal_name} (the time limit is near or the job is preempted)")
    if job.accounting_state in _REQUEUED_STATES or job.controller_state in _REQUEUED_STATES:
        return StopDecision(CONTROLLER_REQUEUES, f"SIGTERM: the controller requeued job {job_id} "
                                                 "(PreemptMode=REQUEUE or scontrol requeue)")
    if job.accounting_state == "PREEMPTED" or job.preempt_time is not None:
        return StopDecision(REQUEUE, f"SIGTERM: Slurm preempted job {job_id}")
    if job.accounting_state == "TIMEOUT":
        return StopDecision(REQUEUE, f"SIGTERM: job {job_id} reached its time limit")
    state = job.accounting_state or job.controller_state or "unknown (the controller did not answer)"
    return StopDecision(STOP, f"SIGTERM while job {job_id} is {state}: not a cancel, preemption or time "
                              "limit the controller names, so no requeue (the safe default)")


def _job_environment() -> submitit.JobEnvironment | None:
    """submitit's view of the current job, or None outside a submitit job (e.g. the debug executor)."""
    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


def _export_torch_distributed_env(env: submitit.JobEnvironment) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the job (the same port on every task).

    The master is the job's first node, or the loopback address when the job has one node (nothing then
    depends on the host name resolving). CUDA_VISIBLE_DEVICES is left alone: init_distributed() picks
    ``cuda:LOCAL_RANK`` itself.
    """
    dist_env = submitit.helpers.TorchDistributedEnvironment()
    if env.num_nodes == 1:
        dist_env.master_addr = "127.0.0.1"
    dist_env.export(set_cuda_visible_devices=False, overwrite=True)


# ============================================================================ executors
def job_folder(run_dir: str | Path) -> Path:
    """Where submitit keeps a run's job files and logs: ``<run_dir>/slurm/<job id>``."""
    return Path(run_dir) / "slurm" / "%j"


def check_partition(partition: str | None) -> None:
    """Make sure the controller answers and ``partition`` (None = the default one) exists."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-a", "-o", "%P"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ClusterError(f"sinfo failed ({e}): is the Slurm controller up?") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise ClusterError(f"sinfo cannot reach the Slurm controller ({last}); is SLURM_CONF set and the "
                           "controller up? (dev cluster: `eval $(bash slurm/cluster.sh start)`)")
    listed = proc.stdout.split()  # the default partition carries a '*'
    names = [p.rstrip("*") for p in listed]
    if partition is None:
        if not any(p.endswith("*") for p in listed):
            raise ClusterError(f"this Slurm cluster has no default partition: set slurm.partition to one of {names}")
        return
    # asked by name: `sinfo -p` prints nothing for a partition that does not exist
    found = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%P"], capture_output=True, text=True, timeout=60)
    if found.returncode != 0 or not found.stdout.strip():
        raise ClusterError(f"Slurm partition '{partition}' does not exist on this cluster; "
                           f"set slurm.partition to one of {names} (or null for the default)")


def make_executor(cluster: Cluster, folder: str | Path, cfg: SlurmConfig | None = None) -> submitit.AutoExecutor:
    """A submitit executor for ``cluster`` ("slurm", "local" = subprocesses here, "debug" = in this process).

    The cluster is always named explicitly: submitit would otherwise pick Slurm whenever ``srun`` exists.
    For "slurm" the client and the partition are checked first.
    """
    cfg = cfg or SlurmConfig()
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster must be one of {CLUSTERS}, got '{cluster}'")
    if cluster == "slurm":
        require_sbatch()
        check_partition(cfg.partition)
    # max_num_timeout is an executor argument of slurm and local (the debug executor never requeues)
    requeues = {f"{cluster}_max_num_timeout": cfg.max_num_timeout} if cluster != "debug" else {}
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, **requeues)
    params: dict[str, Any] = {"name": cfg.job_name, "timeout_min": cfg.time_min, "nodes": cfg.nodes,
                              "tasks_per_node": cfg.tasks_per_node, "cpus_per_task": cfg.cpus_per_task}
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    if cluster == "slurm":
        params.update(slurm_partition=cfg.partition, slurm_account=cfg.account, slurm_qos=cfg.qos,
                      slurm_signal_delay_s=cfg.signal_delay_s,
                      slurm_additional_parameters=dict(cfg.extra) or None)
    if cluster != "debug":  # the debug executor runs in this process: nothing to export before it starts
        params[f"{cluster}_setup"] = [f"export {k}={shlex.quote(v)}" for k, v in cfg.job_env().items()]
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def _submission_env() -> Iterator[None]:
    """Submit without the variables of an enclosing job (sbatch would pass them on), keeping SLURM_CONF."""
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        yield


# ============================================================================ submitting and waiting
def _say_time(cfg: SlurmConfig | None, cluster: Cluster, specs: Sequence[JobSpec]) -> None:
    if cluster == "slurm" and any(s.requeue for s in specs):
        print(f"[slurm] time: {(cfg or SlurmConfig()).describe_time()}", file=sys.stderr, flush=True)


def submit(spec: JobSpec, *, run_dir: str | Path, cfg: SlurmConfig | None = None,
           cluster: Cluster = "slurm") -> submitit.Job:
    """Submit one :class:`ResumableJob` running ``spec``; logs under ``<run_dir>/slurm/<job id>``."""
    spec.resolve()  # fail here, not in the queue, if the target does not exist
    executor = make_executor(cluster, job_folder(run_dir), cfg)
    _say_time(cfg, cluster, [spec])
    with _submission_env():
        return executor.submit(ResumableJob(spec))


def submit_array(specs: Sequence[JobSpec], *, run_dir: str | Path, cfg: SlurmConfig | None = None,
                 cluster: Cluster = "slurm") -> list[submitit.Job]:
    """Submit one job per spec with the same resources, as one Slurm job array."""
    if not specs:
        raise ValueError("submit_array needs at least one JobSpec")
    for spec in specs:
        spec.resolve()
    executor = make_executor(cluster, job_folder(run_dir), cfg)
    _say_time(cfg, cluster, specs)
    with _submission_env(), executor.batch():
        jobs = [executor.submit(ResumableJob(spec)) for spec in specs]
    return jobs


def submit_and_wait(command: str, spec: JobSpec, *, run_dir: str | Path, cfg: SlurmConfig | None,
                    cluster: Cluster, no_wait: bool = False) -> tuple[int, Any]:
    """What ``alit <command> --cluster ...`` does with one job: submit ``spec``, say where its logs go, then
    wait for it (or, with ``no_wait``, print its id). Returns (exit code, the job's result or None); a failed
    job is printed as ``alit <command>: ...`` with exit code 1 (cluster problems raise :class:`ClusterError`)."""
    job = submit(spec, run_dir=run_dir, cfg=cfg, cluster=cluster)  # a ClusterError is reported by the CLI (2)
    print(f"[{command}] submitted job {job.job_id} ({cluster}); directory: {run_dir}; "
          f"logs: {job.paths.stderr.parent}", file=sys.stderr, flush=True)
    if no_wait:
        print(job.job_id)
        return 0, None
    try:
        [result] = wait_with_errors([job])
    except SlurmJobError as e:
        print(f"alit {command}: {e}", file=sys.stderr)
        return EXIT_FAILED, None
    return 0, result


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"    ({path} cannot be read)"
    return "\n".join("    " + line for line in lines[-n:]) or "    (empty)"


def _headline(error: BaseException) -> str:
    """One line for a job's error: the exception line of its traceback when there is one."""
    text = str(error).strip()
    parts = text.split("-" * 22)
    if isinstance(error, FailedJobError) and len(parts) >= 3 and parts[1].strip():
        return parts[1].strip().splitlines()[-1]  # e.g. "ValueError: bad input"
    if isinstance(error, UncompletedJobError) and "has not produced any output" in text:
        return "it ended without a result (killed, cancelled, out of time or memory?)"
    return text.splitlines()[0] if text else type(error).__name__


def describe_failure(job: submitit.Job, error: BaseException, tail_lines: int = 20) -> str:
    """A failed job in a few lines: its id and state, its log paths and the end of its stderr."""
    failed = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    with contextlib.suppress(Exception):  # the task that failed first, when it can be told
        failed = [t for t in failed if t.exception() is not None] or failed
    task = failed[0]
    if isinstance(error, FailedJobError):
        state = "raised an exception"
    else:  # ended without a result: killed, cancelled, out of time or memory; ask Slurm how
        try:
            state = job.get_info(mode="force").get("State", "state unknown")
        except Exception:  # the state is decoration: never hide the failure behind a failing sacct
            state = "state unknown"
    message = str(error).strip()
    lines = [f"job {job.job_id} ({state}) failed: {_headline(error)}",
             f"  stdout: {task.paths.stdout}", f"  stderr: {task.paths.stderr}"]
    if task.paths.stderr.exists() and task.paths.stderr.stat().st_size:
        lines += [f"  last {tail_lines} lines of stderr:", _tail(task.paths.stderr, tail_lines)]
    else:
        lines += ["  (no stderr written) the error was:",
                  "\n".join("    " + line for line in message.splitlines()[-tail_lines:])]
    return "\n".join(lines)


def wait_with_errors(jobs: Sequence[submitit.Job], timeout_s: float | None = None,
                     tail_lines: int = 20) -> list[Any]:
    """Wait for every job; their results in order (a list per task for multi-task jobs).

    Raises :class:`SlurmJobError` naming each failed job, its logs and the last ``tail_lines`` lines of
    its stderr (after all jobs have ended), or TimeoutError naming the jobs still running.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(jobs)
    while pending:
        pending = [j for j in pending if not j.done()]
        if pending and deadline is not None and time.monotonic() > deadline:
            names = ", ".join(f"{j.job_id} ({j.state}, stderr {j.paths.stderr})" for j in pending)
            raise TimeoutError(f"{len(pending)} job(s) still unfinished after {timeout_s:.0f} s: {names}; "
                               "cancel them with `scancel <job id>` if they are stuck")
        if pending:
            time.sleep(0.5)
    results: list[Any] = []
    failures: list[str] = []
    for job in jobs:
        try:
            out = job.results()
            results.append(out[0] if len(out) == 1 else out)
        except (FailedJobError, UncompletedJobError) as e:
            results.append(None)
            failures.append(describe_failure(job, e, tail_lines))
    if failures:
        raise SlurmJobError(f"{len(failures)} of {len(jobs)} job(s) failed:\n" + "\n".join(failures))
    return results


# ============================================================================ resources from files and the command line
# command-line flag (argparse dest) -> SlurmConfig field; shared by `alit train --cluster ...` and `alit sweep`
SLURM_FLAGS: dict[str, str] = {"partition": "partition", "nodes": "nodes", "tasks": "tasks_per_node",
                               "gpus": "gpus_per_node", "cpus": "cpus_per_task", "mem": "mem_gb",
                               "time": "time_min", "account": "account", "qos": "qos", "job_name": "job_name",
                               "max_requeues": "max_num_timeout"}


def parse_time_min(text: str) -> int:
    """A Slurm time limit in whole minutes (rounded up): ``90``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``."""
    days, dash, rest = text.strip().rpartition("-")
    try:
        d = int(days) if dash else 0
        parts = [int(p) for p in rest.split(":")]
    except ValueError:
        parts = []
    if dash:  # D-HH, D-HH:MM, D-HH:MM:SS
        hms = [*parts, 0, 0][:3] if 1 <= len(parts) <= 3 else []
    else:  # MM, MM:SS, HH:MM:SS
        hms = {1: [0, *parts, 0], 2: [0, *parts], 3: parts}.get(len(parts), [])
    if not hms or min(d, *hms) < 0:
        raise UsageError(f"time limit '{text}' is not minutes or a Slurm time ([D-]HH:MM:SS, MM:SS); "
                         "e.g. --time 90 or --time 1:30:00")
    h, m, s = hms
    return d * 1440 + h * 60 + m + (1 if s > 0 else 0)


def read_slurm_section(path: str | Path) -> dict[str, Any]:
    """The ``slurm:`` mapping of a YAML file (a cluster profile, or any config holding one)."""
    from tokenizer.core.config import ConfigError, read_yaml_file

    file = Path(path)
    raw = read_yaml_file(file, "slurm config file")
    if not isinstance(raw, dict) or not isinstance(raw.get("slurm"), dict):
        raise ConfigError(f"slurm config {file} has no 'slurm:' mapping; write e.g.\n"
                          "slurm:\n  partition: gpu\n  gpus_per_node: 8\n  tasks_per_node: 8\n  time_min: 240")
    return dict(raw["slurm"])


def slurm_config(section: dict[str, Any] | None = None, overrides: Sequence[str] = (),
                 **fields: Any) -> SlurmConfig:
    """A validated :class:`SlurmConfig`: the defaults, then ``section`` (a ``slurm:`` mapping), then dotted
    ``overrides`` (``slurm.partition=gpu`` or ``partition=gpu``), then ``fields`` given (None = not given).

    Unknown keys and bad values are :class:`~tokenizer.core.config.ConfigError` naming ``slurm.<key>``.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tokenizer.core.config import ConfigError, from_dict, parse_overrides

    stripped = [o[len("slurm."):] if o.startswith("slurm.") else o for o in overrides]
    try:
        merged = OmegaConf.merge(OmegaConf.create(dict(section or {})), parse_overrides(stripped),
                                 OmegaConf.create({k: v for k, v in fields.items() if v is not None}))
        data = OmegaConf.to_container(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"slurm settings: {e}") from None
    try:
        return from_dict(SlurmConfig, data)  # type: ignore[arg-type]
    except ConfigError as e:
        raise ConfigError(str(e).replace("bad config key '", "bad config key 'slurm.")) from None
    except (ValueError, TypeError) as e:  # SlurmConfig.__post_init__
        raise ConfigError(f"slurm settings: {e}") from None


def split_slurm_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``key=value`` pairs split into (the run's own, the ``slurm.*`` ones)."""
    own = [o for o in overrides if not o.startswith("slurm.")]
    return own, [o for o in overrides if o.startswith("slurm.")]


def add_cluster_arguments(parser: argparse.ArgumentParser, default: str = "none") -> None:
    """``--cluster`` and the Slurm resource options (``--partition --gpus --cpus --time --account --qos`` ...).

    ``default="none"`` offers ``none`` (run in this process); the cluster is never guessed from the machine.
    """
    choices = ("none", *CLUSTERS) if default == "none" else CLUSTERS
    g = parser.add_argument_group("cluster", "where the work runs and with which resources (submitit). "
                                  "Resources: SlurmConfig defaults < --slurm-config < slurm.key=value < flags")
    g.add_argument("--cluster", choices=choices, default=default,
                   help=f"slurm = a Slurm job; local = subprocesses here; debug = in this process through "
                        f"submitit{'; none = plain in-process run' if default == 'none' else ''} "
                        f"(default: {default})")
    g.add_argument("--slurm-config", default=None, metavar="YAML", help="a YAML file with a 'slurm:' section")
    g.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    g.add_argument("--nodes", type=int, default=None, help="nodes per job")
    g.add_argument("--tasks", type=int, default=None, help="tasks (processes) per node, e.g. one per GPU")
    g.add_argument("--gpus", type=int, default=None,
                   help="GPUs per node; without --tasks also the processes per node (one per GPU)")
    g.add_argument("--cpus", type=int, default=None, help="CPUs per task (also the job's OMP_NUM_THREADS)")
    g.add_argument("--mem", type=float, default=None, help="memory per node in GB")
    g.add_argument("--time", default=None, help="time limit per attempt: minutes or [D-]HH:MM:SS")
    g.add_argument("--account", default=None, help="Slurm account")
    g.add_argument("--qos", default=None, help="Slurm quality of service")
    g.add_argument("--job-name", default=None, help="job name shown by squeue")
    g.add_argument("--max-requeues", type=int, default=None,
                   help="requeues after reaching the time limit (default 3); the total time is printed at submit")
    g.add_argument("--no-wait", action="store_true", help="submit, print the job id and return")


def cluster_flags_given(args: argparse.Namespace) -> list[str]:
    """The resource options the command line set (to refuse them where nothing is submitted)."""
    given = [f"--{dest.replace('_', '-')}" for dest in SLURM_FLAGS if getattr(args, dest, None) is not None]
    if getattr(args, "slurm_config", None):
        given.append("--slurm-config")
    if getattr(args, "no_wait", False):
        given.append("--no-wait")
    return given


def job_flags_problem(args: argparse.Namespace, slurm_overrides: Sequence[str] = (), extra: Sequence[str] = (),
                      jobs: str = "a job") -> str | None:
    """Why the job options of a command line do not go together, or None: resource flags, ``slurm.*``
    overrides (or the command's ``extra`` job-only options) without ``--cluster``, or ``--no-wait`` with the
    debug cluster, whose jobs run in this process."""
    if args.cluster == "none":
        given = [*cluster_flags_given(args), *slurm_overrides, *extra]
        return f"{' '.join(given)} only apply to {jobs}: add --cluster slurm (or local/debug)" if given else None
    if getattr(args, "no_wait", False) and args.cluster == "debug":
        return "--no-wait needs --cluster slurm or local (debug jobs run in this process when waited for)"
    return None


def slurm_config_from_args(args: argparse.Namespace, slurm_overrides: Sequence[str] = (),
                           section: dict[str, Any] | None = None) -> SlurmConfig:
    """Resources from (in order) ``section``, ``--slurm-config``, ``slurm.*`` overrides, then the flags."""
    merged = dict(section or {})
    if getattr(args, "slurm_config", None):
        merged.update(read_slurm_section(args.slurm_config))
    flags = {field_name: getattr(args, dest, None) for dest, field_name in SLURM_FLAGS.items()}
    if flags["time_min"] is not None:
        flags["time_min"] = parse_time_min(str(flags["time_min"]))
    return slurm_config(merged, slurm_overrides, **flags)

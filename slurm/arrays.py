"""A job array and the merge job that runs after it: the shape of ``alit eval`` and ``alit tokenize``.

On Slurm the merge job is queued at once with ``--dependency=afterok:<array>`` (and
``--kill-on-invalid-dep=yes``: a failed task cancels it); local and debug jobs have no dependencies, so
there :meth:`ArraySubmission.wait` submits it once the array has succeeded.

    sub = submit_with_merge(task_specs, merge_spec, out=folder, slurm=cfg, cluster="slurm")
    result = sub.wait()            # what the merge job returned
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit

from tokenizer.core.errors import EXIT_FAILED
from tokenizer.core.paths import alit_home

from .launcher import Cluster, JobSpec, SlurmConfig, SlurmJobError, submit, submit_array, wait_with_errors


def shared_env() -> dict[str, str]:
    """What every job exports so that all of them share the submitter's caches: ``ALIT_HOME`` (the pieces'
    feature cache) and, when set, ``ALIT_WEIGHTS_CACHE`` (the converted Inception/LPIPS weights)."""
    env = {"ALIT_HOME": str(alit_home().absolute())}
    if os.environ.get("ALIT_WEIGHTS_CACHE"):
        env["ALIT_WEIGHTS_CACHE"] = str(Path(os.environ["ALIT_WEIGHTS_CACHE"]).expanduser().absolute())
    return env


def array_id(jobs: list[submitit.Job]) -> str:
    """The Slurm array's job id of its tasks' jobs (``1234_0`` -> ``1234``)."""
    return str(jobs[0].job_id).split("_")[0]


@dataclass
class ArraySubmission:
    """A submitted array (one job per task) and its merge job."""

    out: Path  # the folder the jobs write (job logs under out/slurm/<job id>/)
    cluster: Cluster
    slurm: SlurmConfig  # resources of every job
    array: list[submitit.Job]  # one per task
    merge_spec: JobSpec  # what the merge job runs
    merge: submitit.Job | None = None  # None until submitted (local/debug: after the array succeeded)
    results: list[Any] = field(default_factory=list)  # the tasks' results once waited for

    @property
    def array_id(self) -> str:
        """The Slurm array's job id (the first task's job id on local/debug, which have no arrays)."""
        return array_id(self.array) if self.cluster == "slurm" else str(self.array[0].job_id)

    def submit_merge(self) -> submitit.Job:
        """Submit the merge job (on Slurm: held until every array task succeeded)."""
        cfg = replace(self.slurm, job_name=f"{self.slurm.job_name}-merge")
        if self.cluster == "slurm":
            cfg = replace(cfg, extra={**cfg.extra, "dependency": f"afterok:{self.array_id}",
                                      "kill_on_invalid_dep": "yes"})
        self.merge = submit(self.merge_spec, run_dir=self.out, cfg=cfg, cluster=self.cluster)
        return self.merge

    def wait(self, timeout_s: float | None = None) -> Any:
        """Wait for the array, then (submitting it now on local/debug) the merge job; its result.

        Raises :class:`SlurmJobError` naming each failed job, its logs and its stderr tail (a failed task
        cancels the merge job), or TimeoutError.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            self.results = wait_with_errors(self.array, timeout_s)
        except SlurmJobError:
            if self.merge is not None:  # Slurm cancels it too (kill_on_invalid_dep); do not leave it pending
                with contextlib.suppress(Exception):
                    self.merge.cancel(check=False)
            raise
        if self.merge is None:
            self.submit_merge()
        assert self.merge is not None
        left = None if deadline is None else max(1.0, deadline - time.monotonic())
        [result] = wait_with_errors([self.merge], left)
        return result


def submit_with_merge(specs: list[JobSpec], merge_spec: JobSpec, *, out: Path, slurm: SlurmConfig,
                      cluster: Cluster = "slurm") -> ArraySubmission:
    """Submit the array of ``specs`` and, on Slurm, the dependent merge job (cancelling the array if that
    submission fails: nothing would ever merge its results)."""
    out.mkdir(parents=True, exist_ok=True)
    sub = ArraySubmission(out, cluster, slurm, submit_array(specs, run_dir=out, cfg=slurm, cluster=cluster),
                          merge_spec)
    if cluster == "slurm":
        try:
            sub.submit_merge()
        except BaseException:
            for job in sub.array:
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
            raise
    return sub


def announce_and_wait(command: str, sub: ArraySubmission, what: str, no_wait: bool) -> tuple[int, Any]:
    """What ``alit <command> --cluster ... --shards N`` does after submitting: say what was queued (``what``:
    the array's tasks) and where the logs go, then print both job ids (``no_wait``) or wait for the merge
    job's result. ``(exit code, result or None)``; a failed job is ``alit <command>: ...`` and exit 1."""
    merge = f"merge job {sub.merge.job_id} (after the array succeeds)" if sub.merge is not None else \
        "the merge job once the array has succeeded"
    print(f"[{command}] submitted array {sub.array_id} ({sub.cluster}; {what}) and {merge}; logs: "
          f"{sub.out / 'slurm'}", file=sys.stderr, flush=True)
    if no_wait:  # only on Slurm, where the merge job is queued already
        print(sub.array_id)
        print(sub.merge.job_id if sub.merge is not None else "")
        return 0, None
    try:
        return 0, sub.wait()
    except SlurmJobError as e:
        print(f"alit {command}: {e}", file=sys.stderr)
        return EXIT_FAILED, None


def submit_shards(shard_target: str, merge_target: str, request: dict[str, Any], *, shards: int, out: Path,
                  slurm: SlurmConfig | None, cluster: Cluster, merge_kwargs: dict[str, Any] | None = None
                  ) -> ArraySubmission:
    """The array of ``shard_target(request=, index=i, count=shards)`` for every shard and the merge job
    ``merge_target(request=, **merge_kwargs)``, every job exporting the submitter's caches (``shared_env``):
    how ``alit tokenize`` and ``alit fid-stats`` split their work."""
    cfg = slurm or SlurmConfig()
    cfg = replace(cfg, env={**shared_env(), **cfg.env})
    specs = [JobSpec(shard_target, {"request": request, "index": i, "count": shards}) for i in range(shards)]
    merge = JobSpec(merge_target, {"request": request, **(merge_kwargs or {})})
    return submit_with_merge(specs, merge, out=out, slurm=cfg, cluster=cluster)

"""Sweeps: one training command over a grid of config overrides, as ONE Slurm job array.

A sweep file (YAML)::

    command: train tokenizer            # or: train prior
    config: ../tokenizer/distill_emoji_cpu.yaml   # base config, relative to this file
    name: distill_lr                    # default: the file name; the sweep directory is
    out: null                           #   out, or $ALIT_RUNS/sweeps/<name>
    overrides: {train.max_steps: 500}   # applied to every point (not part of point names)
    grid:                               # cartesian product (nested mappings are dotted keys)
      train.lr: [1.0e-3, 3.0e-4]
      train.seed: [0, 1]
    variants:                           # each one is crossed with every grid point
      - {alit_size: tiny}
      - {alit_size: small_cpu}
    slurm: {time_min: 60, cpus_per_task: 2}      # SlurmConfig fields for every job

Each point trains in ``<sweep dir>/<point name>`` where the name encodes the point's overrides
(``lr=0.001,seed=0``; the full key where last components clash). ``sweep.json`` records the points and
their jobs; ``summary.json`` and ``summary.md`` list point, overrides, job id, state and the final
metrics of each run's ``metrics.jsonl``, and :func:`write_summary` refreshes them at any time (also
from another process: ``alit sweep --status <sweep dir>``). Submitting a sweep again skips points that
finished (their ``result.json`` exists; reported as reused), leaves points whose job still runs alone,
and resubmits the rest, which resume from their checkpoints. A point whose earlier run used another
config is an error, never silently mixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.core.utils import FailedJobError, JobPaths, UncompletedJobError

from tokenizer.core.config import ConfigError, read_yaml_file, to_dict
from tokenizer.core.io import atomic_write_text
from tokenizer.core.paths import runs_dir

from .jobs import TRAINERS, check_job_cpus, load_run_config, read_result, training_spec
from .launcher import (
    CLUSTERS,
    Cluster,
    SlurmConfig,
    describe_failure,
    job_folder,
    slurm_config,
    submit_array,
    wait_with_errors,
)

STATE_FILE = "sweep.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SWEEP_KEYS = ("command", "config", "name", "out", "overrides", "grid", "variants", "slurm")
COMMANDS = {f"train {t}": t for t in TRAINERS}  # "train tokenizer" -> "tokenizer"
# Slurm states of a job that has not ended (its point must not be submitted a second time)
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT", "SIGNALING"}
MAX_NAME = 80  # longer point names are cut and end in a hash of the overrides


# ============================================================================ the sweep file
@dataclass
class SweepConfig:
    """A sweep: a base training command and config, and the override points to run."""

    command: str  # "train tokenizer" or "train prior"
    config: str  # base YAML config (a relative path is relative to the sweep file)
    name: str = "sweep"  # sweep name (default: the sweep file's name)
    out: str | None = None  # sweep directory; None = $ALIT_RUNS/sweeps/<name>
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value for every point
    grid: dict[str, list[Any]] = field(default_factory=dict)  # dotted key -> values (cartesian product)
    variants: list[dict[str, Any]] = field(default_factory=list)  # override dicts, each crossed with the grid
    slurm: dict[str, Any] = field(default_factory=dict)  # SlurmConfig fields of every job

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ConfigError(f"sweep command must be one of {sorted(COMMANDS)}, got '{self.command}'")
        if not self.config:
            raise ConfigError("sweep config must name the base YAML config of the runs")
        if not re.fullmatch(r"[A-Za-z0-9._+=,-]+", self.name or ""):
            raise ConfigError(f"sweep name '{self.name}' must be letters, digits and ._+=,- only")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep grid.{key} must be a non-empty list of values, got {values!r}")
        swept = set(self.grid).union(*self.variants)
        both = sorted(swept & set(self.overrides))
        if both:
            raise ConfigError(f"{both} set both for every point (overrides) and per point (grid/variants): "
                              "set each key in one place")
        points_of(self)  # a key set by both a variant and the grid is an error

    @property
    def target(self) -> str:
        """The training target: ``tokenizer`` or ``prior``."""
        return COMMANDS[self.command]


def _flatten(value: Any, where: str, prefix: str = "", leaf_lists: bool = False) -> dict[str, Any]:
    """Nested mappings as dotted keys; with ``leaf_lists`` every leaf must be a list (grid)."""
    if not isinstance(value, dict):
        raise ConfigError(f"sweep {where} must be a mapping of dotted keys to values, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or k.startswith(".") or k.endswith("."):
            raise ConfigError(f"sweep {where}: bad key {k!r} (use dotted config keys like train.lr)")
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not leaf_lists and not v:
            out[key] = v
        elif isinstance(v, dict):
            out.update(_flatten(v, where, key + ".", leaf_lists))
        else:
            out[key] = v
    return out


def _overrides_mapping(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, list):  # ["train.lr=1e-3", ...]
        out: dict[str, Any] = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item or item.startswith("="):
                raise ConfigError(f"sweep {where}: '{item}' is not of the form dotted.key=value")
            k, _, v = item.partition("=")
            out[k] = yaml.safe_load(v) if v else ""
        return out
    return _flatten(value or {}, where)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    """Read and check a sweep file; ``overrides`` (``key=value``) are added to every point."""
    file = Path(path)
    raw = read_yaml_file(file, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {file} must be a mapping (command, config, grid, ...)")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"sweep file {file}: unknown key(s) {unknown}; allowed: {list(SWEEP_KEYS)}")
    for key in ("command", "config"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"sweep file {file} needs '{key}:' (e.g. command: train tokenizer, "
                              "config: ../tokenizer/distill_emoji_cpu.yaml)")
    config = Path(raw["config"])
    if not config.is_absolute():
        config = (file.parent / config).absolute()
    if not config.is_file():
        raise ConfigError(f"sweep file {file}: base config {config} not found (relative paths are relative "
                          "to the sweep file)")
    variants = raw.get("variants") or []
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ConfigError(f"sweep file {file}: 'variants' must be a list of override mappings")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise ConfigError(f"sweep file {file}: 'slurm' must be a mapping of SlurmConfig fields")
    common = _overrides_mapping(raw.get("overrides"), "overrides")
    common.update(_overrides_mapping(list(overrides), "command-line overrides"))
    try:
        return SweepConfig(command=raw["command"].strip(), config=str(config), name=str(raw.get("name") or file.stem),
                           out=raw.get("out"), overrides=common,
                           grid=_flatten(raw.get("grid") or {}, "grid", leaf_lists=True),
                           variants=[_flatten(v, f"variants[{i}]") for i, v in enumerate(variants)],
                           slurm=dict(slurm))
    except ConfigError as e:
        raise ConfigError(f"sweep file {file}: {e}") from None


# ============================================================================ points
def points_of(sweep: SweepConfig) -> list[dict[str, Any]]:
    """The override dict of every point: each variant crossed with the grid's cartesian product."""
    keys = list(sweep.grid)
    grid_points = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))]
    points = []
    for i, variant in enumerate(sweep.variants or [{}]):
        for g in grid_points:
            both = sorted(set(variant) & set(g))
            if both:
                raise ConfigError(f"sweep variants[{i}] and grid both set {both}: set each key in one place")
            points.append({**variant, **g})
    return points


def format_value(value: Any) -> str:
    """A value as it appears in point names and override strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _override_value(value: Any) -> str:
    """A value for a ``key=value`` override that YAML reads back as ``value``."""
    text = format_value(value)
    if isinstance(value, str):
        try:
            same = yaml.safe_load(text) == value
        except yaml.YAMLError:
            same = False
        if not same:
            text = json.dumps(value)  # quoted: "a: b", "true", "1" stay strings
    return text


def override_list(overrides: dict[str, Any]) -> list[str]:
    """``{"train.lr": 0.001}`` -> ``["train.lr=0.001"]``."""
    return [f"{k}={_override_value(v)}" for k, v in overrides.items()]


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def point_names(points: list[dict[str, Any]]) -> list[str]:
    """A short, unique, filesystem-safe name per point that encodes its overrides (``lr=0.001,seed=1``)."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
    names = []
    for p in points:
        name = ",".join(f"{short[k]}={format_value(v)}" for k, v in p.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
        if len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME - 9]}-{_digest(p)}"
        names.append(name)
    for i, name in enumerate(names):  # two points sanitised to one name: tell them apart by hash
        if names.count(name) > 1:
            names[i] = f"{name[:MAX_NAME - 9]}-{_digest(points[i])}"
    if len(set(names)) != len(names):
        raise ConfigError("the sweep lists the same point twice: remove the duplicate variant or grid value")
    return names


@dataclass
class Point:
    """One run of a sweep."""

    name: str  # directory name, encodes the overrides
    overrides: dict[str, Any]  # the point's own overrides (the sweep's common overrides come first)
    run_dir: Path  # <sweep dir>/<name>
    config: Any = None  # the resolved, validated run config


def sweep_dir_of(sweep: SweepConfig, out: str | Path | None = None) -> Path:
    """Where a sweep's runs and summary go: ``out``, the file's ``out:``, or ``$ALIT_RUNS/sweeps/<name>``."""
    return Path(out or sweep.out or runs_dir() / "sweeps" / sweep.name).absolute()


def plan(sweep: SweepConfig, sweep_dir: Path) -> list[Point]:
    """Every point with its validated config (a bad point is a ConfigError naming it; nothing is submitted)."""
    raw = points_of(sweep)
    points = []
    for name, overrides in zip(point_names(raw), raw):
        run_dir = sweep_dir / name
        items = [*override_list(sweep.overrides), *override_list(overrides), f"run_dir={json.dumps(str(run_dir))}"]
        try:
            cfg = load_run_config(sweep.target, sweep.config, items)
        except ConfigError as e:
            raise ConfigError(f"sweep point '{name}': {e}") from None
        points.append(Point(name, overrides, run_dir, cfg))
    return points


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def stored_config(run_dir: Path) -> dict[str, Any] | None:
    """The config an earlier run of this directory used (``result.json``, else ``config.yaml``), or None."""
    result = read_result(run_dir)
    if result is not None and isinstance(result.get("config"), dict):
        return result["config"]
    with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
        body = yaml.safe_load((run_dir / "config.yaml").read_text())
        return body.get("config") if isinstance(body.get("config"), dict) else None
    return None


def check_same_config(point: Point) -> None:
    """Refuse to reuse or resume a run directory that an earlier run filled with another config."""
    old = stored_config(point.run_dir)
    if old is None:
        return
    new_flat, old_flat = _flat(to_dict(point.config)), _flat(old)
    differ = sorted(k for k in set(new_flat) | set(old_flat) if new_flat.get(k) != old_flat.get(k))
    if differ:
        shown = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"sweep point '{point.name}': its run directory {point.run_dir} holds a run with "
                          f"another config ({shown}{', ...' if len(differ) > 5 else ''}); delete that directory "
                          "to rerun the point, or give the sweep another name or --out")


# ============================================================================ state of jobs
def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_state(sweep_dir: str | Path) -> dict[str, Any] | None:
    """The sweep's ``sweep.json`` (points and jobs), or None if the directory holds no sweep."""
    try:
        return json.loads((Path(sweep_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: str) -> bool:
    """Whether a local job's controller process still runs (a zombie does not)."""
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _handle(record: dict[str, Any], sweep_dir: Path) -> submitit.Job | None:
    """A submitit handle for a job recorded by an earlier process (its paths and result; Slurm: its state)."""
    if not record.get("job_id"):
        return None
    if record.get("cluster") == "slurm":
        return submitit.SlurmJob(folder=job_folder(sweep_dir), job_id=str(record["job_id"]))
    if record.get("cluster") == "local":
        return submitit.LocalJob(folder=job_folder(sweep_dir), job_id=str(record["job_id"]))
    return None  # debug jobs lived in the process that submitted them


def job_state(record: dict[str, Any] | None, sweep_dir: Path, live: submitit.Job | None = None) -> str:
    """The state of a point's job that has not (yet) written its result: Slurm's word for it (PENDING,
    RUNNING, FAILED, CANCELLED, TIMEOUT, ...), RUNNING/FAILED for local jobs, UNKNOWN when it cannot be told."""
    if not record or not record.get("job_id"):
        return "NOT SUBMITTED"
    cluster = record.get("cluster")
    if cluster == "slurm":
        job = live or _handle(record, sweep_dir)
        try:
            raw = job.state if job is not None else "UNKNOWN"
        except Exception:  # sacct trouble must not break a summary
            raw = "UNKNOWN"
        return (raw or "UNKNOWN").split()[0].upper()  # "CANCELLED by 0" -> CANCELLED
    if cluster == "local":
        running = live.state == "RUNNING" if live is not None else _pid_alive(str(record["job_id"]))
        return "RUNNING" if running else "FAILED"
    if live is not None:  # debug: runs in this process when waited for
        return "PENDING" if live.state == "QUEUED" else "FAILED"
    return "UNKNOWN"


def read_metrics(run_dir: Path) -> tuple[int | None, dict[str, float], dict[str, float]]:
    """(last step, last training metrics, last evaluation metrics) of a run's ``metrics.jsonl``."""
    step, train, evals = None, {}, {}
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if not isinstance(rec, dict):
                continue
            values = {k: v for k, v in rec.items() if k not in ("step", "kind") and isinstance(v, (int, float))}
            if rec.get("kind") == "eval":
                evals = values
            else:
                train = values
            step = rec.get("step", step)
    return step, train, evals


def _failure(job: submitit.Job) -> str | None:
    """describe_failure() of a finished job that failed (None if it did not, or cannot be told yet)."""
    if isinstance(job, submitit.DebugJob):  # results() of a failed debug job would open pdb
        error = job.exception() if job.state == "DONE" else None
        return f"job {job.job_id} (debug, in this process) failed: {type(error).__name__}: {error}" if error else None
    if not job.paths.result_pickle.exists():
        return None
    try:
        job.results()
    except (FailedJobError, UncompletedJobError) as e:
        return describe_failure(job, e)
    except Exception as e:  # a summary reports, it does not crash
        return f"job {job.job_id}: {type(e).__name__}: {e}"
    return None


def write_summary(sweep_dir: str | Path, live: dict[str, submitit.Job] | None = None) -> dict[str, Any]:
    """Refresh ``summary.json`` and ``summary.md`` from ``sweep.json``, the runs and the cluster; returns it.

    ``live`` are the job handles of this process (point name -> job); jobs of earlier processes are
    looked up by id (sacct for Slurm, the controller's PID for local jobs).
    """
    sweep_dir = Path(sweep_dir).absolute()
    state = read_state(sweep_dir)
    if state is None:
        raise ConfigError(f"{sweep_dir} holds no sweep ({STATE_FILE} missing): pass the directory a sweep "
                          "wrote (its default is $ALIT_RUNS/sweeps/<name>)")
    live = live or {}
    entries = []
    for p in state["points"]:
        run_dir = Path(p["run_dir"])
        record = state["jobs"].get(p["name"])
        result = read_result(run_dir)
        job = live.get(p["name"])
        error = None
        if result is not None:
            status = "COMPLETED"
        else:
            status = job_state(record, sweep_dir, job)
            if read_result(run_dir) is not None:  # finished while we asked
                result, status = read_result(run_dir), "COMPLETED"
            elif status not in ACTIVE_STATES | {"NOT SUBMITTED", "UNKNOWN"}:
                handle = job or (_handle(record, sweep_dir) if record else None)
                error = _failure(handle) if handle is not None else None
        step, train, evals = read_metrics(run_dir)
        job_id = (record or {}).get("job_id") or (result or {}).get("job_id")
        log = None
        if record and record.get("cluster") in ("slurm", "local") and job_id:
            log = str((job.paths if job is not None else JobPaths(job_folder(sweep_dir), str(job_id))).stderr)
        entry = {"point": p["name"], "overrides": p["overrides"], "run_dir": str(run_dir), "job_id": job_id,
                 "state": status, "reused": bool(record and record.get("reused")), "step": step,
                 "metrics": train, "eval": evals, "log": log}
        if error:
            entry["error"] = error
        entries.append(entry)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["state"]] = counts.get(e["state"], 0) + 1
    summary = {"sweep": state["name"], "command": state["command"], "config": state["config"],
               "dir": str(sweep_dir), "cluster": state.get("cluster"), "updated": _now(), "counts": counts,
               "reused": sum(e["reused"] for e in entries), "points": entries}
    atomic_write_text(sweep_dir / SUMMARY_JSON, json.dumps(summary, indent=1))
    atomic_write_text(sweep_dir / SUMMARY_MD, summary_markdown(summary))
    return summary


def _columns(entries: list[dict[str, Any]], limit: int = 8) -> list[tuple[str, str]]:
    train = list(dict.fromkeys(k for e in entries for k in e["metrics"] if k.startswith("loss/")))
    evals = list(dict.fromkeys(k for e in entries for k in e["eval"]))
    return ([("metrics", k) for k in train] + [("eval", k) for k in evals])[:limit]


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown page: counts, then one table row per point."""
    entries = summary["points"]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items()))
    lines = [f"# Sweep {summary['sweep']}", "",
             f"`alit {summary['command']}` on `{summary['config']}` ({summary['cluster']}); "
             f"updated {summary['updated']}", "",
             f"{len(entries)} points: {counts}" + (f" ({summary['reused']} reused)" if summary["reused"] else ""), ""]
    cols = _columns(entries)
    head = ["point", "state", "job", "step"] + [("eval " if kind == "eval" else "") + k for kind, k in cols]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        state = e["state"] + (" (reused)" if e["reused"] else "")
        row = [f"`{e['point']}`", state, str(e["job_id"] or "-"), str(e["step"] if e["step"] is not None else "-")]
        row += [f"{e[kind][k]:.4g}" if k in e[kind] else "-" for kind, k in cols]
        lines.append("| " + " | ".join(row) + " |")
    failed = [e for e in entries if e.get("error")]
    if failed:
        lines += ["", "## Failures", ""]
        for e in failed:
            lines += [f"### {e['point']}", "", "```", e["error"], "```", ""]
    lines += ["", f"Runs: `{summary['dir']}/<point>`; metrics of every point in `{SUMMARY_JSON}`.", ""]
    return "\n".join(lines)


# ============================================================================ submitting
@dataclass
class SweepRun:
    """A submitted sweep: its directory, the jobs submitted now, and the points left alone."""

    dir: Path
    jobs: dict[str, submitit.Job]  # point name -> job submitted by this call (one array)
    reused: list[str]  # points that had finished: not submitted again
    running: dict[str, str]  # points whose earlier job still runs: name -> job id

    def refresh(self) -> dict[str, Any]:
        """Rewrite the summary with the current states and metrics."""
        return write_summary(self.dir, self.jobs)

    def wait(self, refresh_s: float = 30.0, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait for the jobs, refreshing the summary every ``refresh_s``; the final summary.

        Raises :class:`SlurmJobError` (each failed job, its logs and stderr tail) after writing the summary.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = time.monotonic()
        jobs = list(self.jobs.values())
        while True:
            pending = [j for j in jobs if not j.done()]
            if not pending:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.refresh()
                raise TimeoutError(f"{len(pending)} sweep job(s) unfinished after {timeout_s:.0f} s "
                                   f"({', '.join(j.job_id for j in pending)}); see {self.dir / SUMMARY_MD}")
            if time.monotonic() - last >= refresh_s:
                self.refresh()
                last = time.monotonic()
            time.sleep(min(1.0, refresh_s))
        try:
            wait_with_errors(jobs)
        finally:
            summary = self.refresh()
        return summary


def submit_sweep(sweep: SweepConfig, *, cluster: Cluster = "slurm", slurm: SlurmConfig | None = None,
                 out: str | Path | None = None) -> SweepRun:
    """Submit every unfinished point of ``sweep`` as one job array; writes ``sweep.json`` and the summary."""
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster must be one of {CLUSTERS}, got '{cluster}'")
    sweep_dir = sweep_dir_of(sweep, out)
    slurm = slurm or slurm_config(sweep.slurm)
    if slurm.job_name == SlurmConfig.job_name:  # the default name: say which sweep in squeue
        slurm = dataclasses.replace(slurm, job_name=f"alit-{sweep.name}")
    points = plan(sweep, sweep_dir)
    for p in points:
        check_same_config(p)
        check_job_cpus(p.config, slurm, cluster, point=p.name)  # before anything is submitted
    state = read_state(sweep_dir) or {}
    old_jobs: dict[str, Any] = state.get("jobs", {})
    reused = [p.name for p in points if read_result(p.run_dir) is not None]
    running = {}
    for p in points:
        record = old_jobs.get(p.name)
        if p.name not in reused and record and job_state(record, sweep_dir) in ACTIVE_STATES:
            running[p.name] = str(record["job_id"])
    todo = [p for p in points if p.name not in reused and p.name not in running]
    jobs: dict[str, submitit.Job] = {}
    if todo:
        submitted = submit_array([training_spec(sweep.target, p.config) for p in todo], run_dir=sweep_dir,
                                 cfg=slurm, cluster=cluster)
        jobs = {p.name: j for p, j in zip(todo, submitted)}
    records = {}
    for p in points:
        if p.name in jobs:
            records[p.name] = {"job_id": jobs[p.name].job_id, "cluster": cluster, "submitted": _now(), "reused": False}
        elif p.name in old_jobs or p.name in reused:
            records[p.name] = {**old_jobs.get(p.name, {}), "reused": p.name in reused}
    new_state = {
        "name": sweep.name, "command": sweep.command, "config": sweep.config, "cluster": cluster,
        "slurm": to_dict(slurm), "overrides": sweep.overrides,
        "points": [{"name": p.name, "overrides": p.overrides, "run_dir": str(p.run_dir)} for p in points],
        "jobs": records,
        "submissions": [*state.get("submissions", []),
                        {"at": _now(), "cluster": cluster, "jobs": {n: j.job_id for n, j in jobs.items()},
                         "reused": reused, "running": running}],
    }
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / STATE_FILE, json.dumps(new_state, indent=1, default=str))
    run = SweepRun(sweep_dir, jobs, reused, running)
    run.refresh()
    return run


def print_summary(summary: dict[str, Any], file: Any = None) -> None:
    """The summary's table on ``file`` (default stdout)."""
    text = summary_markdown(summary)
    body = text.split("\n## Failures")[0].rstrip()
    print(body, file=file or sys.stdout)

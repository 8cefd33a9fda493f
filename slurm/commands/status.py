"""``alit status``: the stages of a pipeline directory (``alit demo``): job ids, states, reuse and logs.

    alit status $ALIT_HOME/demo

States come from Slurm (``sacct``, else ``squeue``) for a pipeline submitted with ``--cluster slurm``,
and from the stages' own records (``<out>/stages/<stage>.json``) otherwise or when Slurm does not answer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

from tokenizer.core.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit status DIR"
    parser.add_argument("run", help="a pipeline directory (the out= of alit demo)")


def _query(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state, from ``sacct`` (accounting) and, for what it does not know, ``squeue``."""
    if not job_ids:
        return {}
    states: dict[str, str] = {}
    out = _query(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)])
    for line in (out or "").splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            states[parts[0]] = parts[1].split()[0]  # "CANCELLED by 0" -> CANCELLED
    missing = [j for j in job_ids if j not in states]
    if missing:
        out = _query(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(missing)])
        for line in (out or "").splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2:
                states[parts[0]] = parts[1]
    return states


def stage_rows(root: Path) -> list[dict[str, object]]:
    """One row per stage of the pipeline in ``root``: stage, jobs, state, reused, reason, log."""
    from ..pipeline import RECORD, read_stage_record

    path = root / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{root} has no {RECORD}: it is not a pipeline directory (pass the out= of alit demo)") \
            from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}): run alit demo again in {root} to rewrite it") from None
    entries = record.get("stages", [])
    on_slurm = record.get("cluster") == "slurm"
    ids = [j for e in entries for j in e.get("jobs", [])]
    states = slurm_states(ids) if on_slurm else {}
    rows = []
    for e in entries:
        own = read_stage_record(root, e["stage"]) or {}
        if e.get("reused"):
            state = "reused"
        elif e.get("jobs") and all(j in states for j in e["jobs"]):
            state = ",".join(states[j] for j in e["jobs"])
        elif own.get("hash") == e.get("hash"):
            state = {"done": "COMPLETED", "running": "RUNNING", "submitted": "PENDING"}.get(own.get("state", ""),
                                                                                              "UNKNOWN")
        else:
            state = "UNKNOWN"
        rows.append({"stage": e["stage"], "jobs": e.get("jobs", []) + own.get("subjobs", []), "state": state,
                     "reused": bool(e.get("reused")), "reason": e.get("reason", ""), "log": e.get("log")})
    return rows


def run(args: argparse.Namespace) -> int:
    root = Path(args.run).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass a pipeline directory (the out= of alit demo)")
    rows = stage_rows(root)
    record = json.loads((root / "pipeline.json").read_text())
    print(f"pipeline {root.absolute()} ({record.get('cluster')}, submitted {record.get('submitted')})")
    width = max(len(str(r["stage"])) for r in rows) if rows else 5
    for r in rows:
        jobs = ",".join(str(j) for j in r["jobs"]) or "-"  # type: ignore[union-attr]
        what = f"reused ({r['reason']})" if r["reused"] else f"ran: {r['reason']}"
        print(f"  {r['stage']!s:<{width}}  {r['state']:<10}  job {jobs:<12}  {what}; log: {r['log'] or '-'}")
    return 0

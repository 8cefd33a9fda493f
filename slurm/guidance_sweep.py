"""``alit eval --sweep``: gFID over a grid of sampler settings, as one job array and a merge job.

    alit eval --tokenizer T --prior P --sweep cfg=1,1.5,2,3 temperature=0.9,1 --cluster slurm --shards 4
    alit eval --tokenizer T --prior P --sweep sweep.yaml --save-best      # here, one piece after another

A sweep file is a mapping of settings to lists (``{cfg: [1, 1.5, 2], cfg_schedule: [constant, linear]}``,
optionally under ``grid:``). Keys are the settings of :data:`sampling.presets.KNOBS` (``cfg``, ``temperature``,
``choice_temperature``, ``steps``, ``mask_schedule``, ``top_k``, ...); the grid is their cartesian product,
in the order given. Every other setting is the evaluation's own (defaults < the prior's ``sampling.json`` <
the command line); a swept setting overrides them all.

**The jobs.** One array holds a task per (point x budget x shard) for the samples and, once for the whole
sweep, a task per (budget x shard) for the reconstructions (they do not depend on sampler settings); every
task is :func:`slurm.eval_jobs.evaluate_shard` of one evaluation request, restricted to one piece kind. A merge
job (:func:`merge_sweep`), held until the array succeeded, loads every piece from the feature cache (a piece's
key holds every sampler setting, so no point reuses another's samples, while a point already computed, or
the reconstructions of an earlier sweep or ``alit eval``, are reused) and writes into the sweep folder:

- ``sweep.json`` (format ``alit-guidance-sweep/1``): the grid, one row per (point, budget) with gFID, samples,
  rFID of that budget and the full settings sampled with, the best point per budget;
- ``sweep.md`` and ``sweep.csv``: the same rows as a table;
- ``gfid_vs_<setting>.png`` per swept setting: gFID against its values, a line per budget (with several
  settings swept, each value's best gFID over the others).

``--save-best`` writes each budget's lowest-gFID settings into ``<prior>/sampling.json`` as that budget's
entry (:func:`sampling.presets.save_best`), which ``alit sample`` and ``alit eval`` then use.
"""

from __future__ import annotations

import copy
import csv
import datetime
import io
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from sampling import presets
from sampling.fid import fid_from_stats
from sampling.generate import ADAPTIVE, Budget, Shard
from sampling.protocol import compute_metrics, mean_and_spread
from sampling.report import GEN, RECON, Evaluation, PieceResult, merge_results
from tokenizer.core.config import git_commit
from tokenizer.core.errors import UsageError, one_line
from tokenizer.core.io import atomic_write_text

from .arrays import ArraySubmission, shared_env, submit_with_merge
from .eval_jobs import SHARD_TARGET, EvalRequest, load_cached_pieces, plan_tasks
from .launcher import Cluster, JobSpec, SlurmConfig

SWEEP_FORMAT = "alit-guidance-sweep/1"
MERGE_TARGET = "slurm.guidance_sweep:merge_sweep"


# ============================================================================ the grid
@dataclass(frozen=True)
class SweepGrid:
    """Swept settings (field names, in the order given) and their values."""

    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]

    def points(self) -> list[dict[str, Any]]:
        """The cartesian product, first key slowest."""
        return [dict(zip(self.keys, combo)) for combo in itertools.product(*self.values)]

    def to_dict(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in zip(self.keys, self.values)}


def _file_entries(path: Path) -> list[tuple[str, Any]]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"--sweep {path}: not a readable YAML file ({one_line(e)})") from None
    if isinstance(data, dict) and set(data) == {"grid"}:
        data = data["grid"]
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--sweep {path}: expected a mapping of settings to lists, e.g. {{cfg: [1, 2]}}")
    return [(str(k), v if isinstance(v, list) else [v]) for k, v in data.items()]


def parse_sweep(items: Sequence[str]) -> SweepGrid:
    """``["cfg=1,1.5", "temperature=0.9,1"]`` or ``["sweep.yaml"]`` (or a mix) as a grid; an unknown key, an
    empty list, a repeated key or a value out of range is a one-line UsageError."""
    entries: list[tuple[str, Any]] = []
    for item in items:
        if "=" in item:
            key, _, text = item.partition("=")
            entries.append((key, [v for v in text.split(",") if v.strip()]))
        elif Path(item).expanduser().is_file():
            entries += _file_entries(Path(item).expanduser())
        else:
            raise UsageError(f"--sweep {item!r}: expected KEY=V1,V2,... (e.g. cfg=1,1.5,2) or a YAML file that exists")
    if not entries:
        raise UsageError("--sweep needs at least one KEY=V1,V2,... (e.g. cfg=1,1.5,2) or a YAML file")
    keys: list[str] = []
    values: list[tuple[Any, ...]] = []
    for key, raw in entries:
        name = presets.canonical(key, "--sweep")
        if name in keys:
            raise UsageError(f"--sweep: {key} is given twice: list all its values once (e.g. {key}=1,2)")
        if not raw:
            raise UsageError(f"--sweep {key}: no values: give at least one (e.g. {key}=1,2)")
        parsed = [presets.parse_value(name, v, f"--sweep {key}") for v in raw]
        keys.append(name)
        values.append(tuple(dict.fromkeys(parsed)))
    return SweepGrid(tuple(keys), tuple(values))


def check_grid(grid: SweepGrid, kind: str, num_classes: int) -> None:
    """Refuse settings the prior's sampler does not use, and guidance for an unconditional prior."""
    problem = presets.kind_problem(grid.keys, kind, "--sweep")
    if problem:
        raise UsageError(problem)
    if num_classes == 0 and "cfg_scale" in grid.keys and any(v != 0 for v in grid.values[grid.keys.index("cfg_scale")]):
        raise UsageError("--sweep cfg: this prior is unconditional (num_classes=0), so guidance cannot apply: "
                         "sweep other settings")


def point_name(point: dict[str, Any]) -> str:
    """``cfg=1.5,temperature=0.9`` (short names)."""
    def text(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ",".join(f"{presets.BY_NAME[k].short or k}={text(v)}" for k, v in point.items())


# ============================================================================ the plan
@dataclass(frozen=True)
class SweepTask:
    """One array task: the reconstructions (``point`` None) or one point's samples, at one budget and shard."""

    kind: str  # RECON or GEN
    point: int | None  # index into the grid's points (GEN)
    budget: Budget
    shard: int


@dataclass(frozen=True)
class SweepPlan:
    """A sweep: the base evaluation request, the grid and the shards per piece."""

    request: EvalRequest  # the evaluation every point varies (its settings: defaults < preset < flags)
    grid: SweepGrid
    shards: int = 1

    @property
    def points(self) -> list[dict[str, Any]]:
        return self.grid.points()

    def point_request(self, point: dict[str, Any]) -> EvalRequest:
        """The evaluation of one point: its settings override the base's and the preset's per-budget ones."""
        per_budget = {b: {k: v for k, v in s.items() if k not in point}
                      for b, s in self.request.settings.get("per_budget", {}).items()}
        return replace(self.request, settings={**self.request.settings, **point, "per_budget": per_budget})

    def tasks(self, evaluation: Evaluation) -> list[SweepTask]:
        """The array's tasks: reconstructions (budget x shard) once, then every point x budget x shard."""
        budgets = list(dict.fromkeys(b for b, _ in plan_tasks(evaluation, self.shards)))  # checks --shards
        kinds = {(p.kind, p.budget) for p in evaluation.plan(1)}
        out = [SweepTask(RECON, None, b, i) for b in budgets if (RECON, b) in kinds for i in range(self.shards)]
        out += [SweepTask(GEN, j, b, i) for j in range(len(self.points)) for b in budgets if (GEN, b) in kinds
                for i in range(self.shards)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"request": asdict(self.request), "grid": self.grid.to_dict(), "shards": self.shards}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepPlan:
        grid = data["grid"]
        return cls(EvalRequest.from_dict(data["request"]),
                   SweepGrid(tuple(grid), tuple(tuple(v) for v in grid.values())), int(data["shards"]))


def for_point(evaluation: Evaluation, request: EvalRequest) -> Evaluation:
    """``evaluation`` with a point's settings: what they change (the samples' settings, hence the gen pieces'
    keys) is read from ``settings`` on use; the models, data, reference and budgets are shared."""
    ev = copy.copy(evaluation)
    ev.settings = request.eval_settings()
    return ev


def describe(plan: SweepPlan, tasks: list[SweepTask]) -> str:
    """``12 task(s): 2 recon + 2 point(s) x budgets 4, 8 x 1 shard(s)``."""
    recon = sum(t.kind == RECON for t in tasks)
    budgets = list(dict.fromkeys(t.budget for t in tasks if t.kind == GEN))
    return (f"{len(tasks)} task(s): {recon} recon + {len(plan.points)} point(s) x budgets "
            f"{', '.join(str(b) for b in budgets)} x {plan.shards} shard(s)")


# ============================================================================ running
def run_here(plan: SweepPlan, evaluation: Evaluation, out: Path, save_best: bool) -> dict[str, Any]:
    """The sweep in this process: every task's pieces, one after another, then the merge."""
    for task in plan.tasks(evaluation):
        ev = evaluation if task.point is None else for_point(evaluation, plan.point_request(plan.points[task.point]))
        for piece in ev.plan(plan.shards):  # the task's pieces (with --seeds, one per seed), as evaluate_shard
            if (piece.kind, piece.budget, piece.shard) == (task.kind, task.budget, Shard(task.shard, plan.shards)):
                ev.evaluate_piece(piece)
    return write_sweep(plan, evaluation, out, save_best)


def submit_sweep(plan: SweepPlan, evaluation: Evaluation, *, out: Path, save_best: bool,
                 slurm: SlurmConfig | None = None, cluster: Cluster = "slurm") -> tuple[ArraySubmission, str]:
    """Submit the array of the plan's tasks and the merge job (on Slurm at once, held by ``afterok``);
    returns the submission and a description of its tasks."""
    tasks = plan.tasks(evaluation)
    base = asdict(plan.request)
    specs = []
    for t in tasks:
        request = base if t.point is None else asdict(plan.point_request(plan.points[t.point]))
        specs.append(JobSpec(SHARD_TARGET, {"request": request, "budget": t.budget,
                                            "shard": f"{t.shard}/{plan.shards}", "kinds": [t.kind]}))
    out = out.expanduser().absolute()
    merge = JobSpec(MERGE_TARGET, {"plan": plan.to_dict(), "out": str(out), "save_best": save_best})
    cfg = slurm or SlurmConfig()
    cfg = replace(cfg, env={**shared_env(), **cfg.env})
    return submit_with_merge(specs, merge, out=out, slurm=cfg, cluster=cluster), describe(plan, tasks)


def merge_sweep(plan: dict[str, Any], out: str, save_best: bool) -> dict[str, Any]:
    """Job entry: load every piece of the sweep from the feature cache and write its table and plots."""
    sweep = SweepPlan.from_dict(plan)
    return write_sweep(sweep, sweep.request.build(), Path(out), save_best)


# ============================================================================ the table
def _merged(evaluation: Evaluation, kind: str, shards: int) -> dict[tuple[Any, ...], PieceResult]:
    pieces = [p for p in evaluation.plan(shards) if p.kind == kind]
    return merge_results(load_cached_pieces(evaluation, pieces, "sweep", kind))


def write_sweep(plan: SweepPlan, evaluation: Evaluation, out: Path, save_best: bool) -> dict[str, Any]:
    """Merge the pieces, compute every (point, budget) gFID, write the sweep folder (and ``--save-best``)."""
    out.mkdir(parents=True, exist_ok=True)
    models = evaluation.models
    prior = models.require_prior()
    ref = evaluation.reference()
    _, gen_ref = evaluation.reference_sets(ref)  # the protocol's reference of samples, as in the report
    ep, seeds = evaluation.eval_protocol, evaluation.settings.seeds
    recon = _merged(evaluation, RECON, plan.shards)
    rfid = {key[1]: fid_from_stats(r.stats, ref) for key, r in recon.items()}
    rows: list[dict[str, Any]] = []
    for j, point in enumerate(plan.points):
        ev = for_point(evaluation, plan.point_request(point))
        merged = _merged(ev, GEN, plan.shards)
        for budget in sorted({key[1] for key in merged}, key=_order):
            runs = [merged[key] for key in [(GEN, budget), *((GEN, budget, k) for k in range(1, seeds))]]
            metrics = mean_and_spread([compute_metrics(ep, r.stats, gen_ref, features=r.sorted_features(),
                                                       spatial=r.spatial, weights=ev.extractor.weights_path)
                                       for r in runs])  # the report's gen metrics: mean over --seeds
            rows.append({"point": j, "name": point_name(point), "setting": point, "budget": budget,
                         "gfid": metrics["fid"], "gfid_std": metrics.get("fid_std", 0.0), "n_samples": runs[0].n,
                         "mean_tokens": sum(r.tokens_sum for r in runs) / sum(r.n for r in runs),
                         "rfid": rfid.get(budget), "metrics": metrics,
                         "settings": ev.sample_settings(budget).sampler_settings(prior.kind)})
    rows.sort(key=lambda row: (_order(row["budget"]), row["point"]))
    best: dict[str, dict[str, Any]] = {}
    for row in rows:  # the lowest gFID per budget; the first point in grid order on a tie
        key = str(row["budget"])
        if key not in best or row["gfid"] < best[key]["gfid"]:
            best[key] = row
    for row in rows:
        row["best"] = best[str(row["budget"])] is row
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report: dict[str, Any] = {
        "format": SWEEP_FORMAT, "created": created, "git_commit": git_commit(),
        "tokenizer": {"id": models.tokenizer_identity["id"], "path": str(models.tokenizer_dir),
                      "tag": models.tokenizer_tag},
        "prior": {"id": (models.prior_identity or {}).get("id"), "path": str(models.prior_dir),
                  "tag": models.prior_tag, "kind": prior.kind},
        "protocol": {"name": evaluation.protocol.value, "id": evaluation.extractor.protocol_id,
                     "eval": evaluation.eval_protocol.to_dict()},
        "data": {"split": evaluation.settings.split, "n_images": evaluation.num_images,
                 "n_samples": evaluation.num_samples, "reference": evaluation.reference_name,
                 "sample_reference": gen_ref.description},
        "grid": plan.grid.to_dict(), "shards": plan.shards, "seed": evaluation.settings.seed, "seeds": seeds,
        "base_settings": {k: plan.request.settings.get(k) for k in (*presets.names_for(prior.kind), "per_budget",
                                                                      "preset")},
        "rows": rows,
        "best": {b: {k: r[k] for k in ("point", "name", "setting", "gfid", "n_samples", "settings")}
                 for b, r in best.items()},
        "saved": None, "files": [],
    }
    files = ["sweep.json", "sweep.md", "sweep.csv"]
    for key in plan.grid.keys:
        name = f"gfid_vs_{presets.BY_NAME[key].short or key}.png"
        plot_gfid_vs(report, key, out / name)
        files.append(name)
    if save_best:
        notes = {b: {"sweep": str((out / "sweep.json").absolute()), "setting": r["name"], "gfid": r["gfid"],
                     "n_samples": r["n_samples"], "protocol": report["protocol"]["id"], "created": created}
                 for b, r in best.items()}
        path = presets.save_best(models.prior_dir or ".", {b: r["settings"] for b, r in best.items()}, notes)
        report["saved"] = str(path)
    report["files"] = files
    atomic_write_text(out / "sweep.csv", render_csv(report))
    atomic_write_text(out / "sweep.md", render_markdown(report))
    atomic_write_text(out / "sweep.json", json.dumps(report, indent=1, allow_nan=False))
    return report


def _order(budget: Budget) -> tuple[bool, int]:
    return (budget == ADAPTIVE, 0 if budget == ADAPTIVE else int(budget))


def _text(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def render_csv(report: dict[str, Any]) -> str:
    """One line per (point, budget): the swept settings, budget, gFID, samples, rFID, best."""
    keys = list(report["grid"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*keys, "budget", "gfid", "n_samples", "rfid", "best"])
    for row in report["rows"]:
        writer.writerow([*(_text(row["setting"][k]) for k in keys), row["budget"], f"{row['gfid']:.6f}",
                         row["n_samples"], "" if row["rfid"] is None else f"{row['rfid']:.6f}", int(row["best"])])
    return buf.getvalue()


def render_markdown(report: dict[str, Any]) -> str:
    """``sweep.md``: the grid, the table (best per budget in bold) and the plots."""
    grid = ", ".join(f"{presets.BY_NAME[k].short or k} in {{{', '.join(_text(v) for v in vs)}}}"
                     for k, vs in report["grid"].items())
    lines = [f"# Guidance sweep of {report['prior']['tag']}", "",
             f"Grid: {grid}; {report['data']['n_samples']} samples per budget and point (seeds "
             f"{report['seed']}..{report['seed'] + report['seeds'] - 1}: mean gFID), reference "
             f"{report['data']['sample_reference']}, "
             f"split `{report['data']['split']}`, FID protocol `{report['protocol']['name']}`. Other settings: "
             + ", ".join(f"{k} {_text(v)}" for k, v in report["base_settings"].items()
                         if k not in report["grid"] and k not in ("per_budget", "preset")) + ".", "",
             "| setting | budget | gFID | samples | rFID |", "|---|---:|---:|---:|---:|"]
    for row in report["rows"]:
        gfid = f"{row['gfid']:.2f}"
        rfid = "-" if row["rfid"] is None else f"{row['rfid']:.2f}"
        mark = "**" if row["best"] else ""
        lines.append(f"| {mark}{row['name']}{mark} | {row['budget']} | {mark}{gfid}{mark} | {row['n_samples']} | "
                     f"{rfid} |")
    lines += ["", "Best per budget: " + "; ".join(f"{b}: {r['name']} (gFID {r['gfid']:.2f})"
                                                  for b, r in report["best"].items()) + "."]
    if report["saved"]:
        lines += ["", f"Saved into `{report['saved']}` (used by `alit sample` and `alit eval` unless flags override)."]
    lines += [""] + [f"![{name}]({name})" for name in report["files"] if name.endswith(".png")] + [""]
    return "\n".join(lines)


def plot_gfid_vs(report: dict[str, Any], key: str, path: Path) -> Path:
    """gFID against the values of ``key``, one line per budget (the best over the other swept settings)."""
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend

    values = report["grid"][key]
    numeric = all(isinstance(v, (int, float)) for v in values)
    order = sorted(values) if numeric else list(values)
    xs = order if numeric else list(range(len(order)))
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    budgets = list(dict.fromkeys(row["budget"] for row in report["rows"]))
    for b in budgets:
        ys = [min((r["gfid"] for r in report["rows"] if r["budget"] == b and r["setting"][key] == v),
                  default=math.nan) for v in order]
        ax.plot(xs, ys, "o-", label=f"{b} tokens" if b != ADAPTIVE else "adaptive")
    others = [k for k in report["grid"] if k != key]
    short = presets.BY_NAME[key].short or key
    ax.set_xlabel(short + (f" (best over {', '.join(others)})" if others else ""))
    ax.set_xticks(xs, [_text(v) for v in order])
    ax.set_ylabel(f"gFID (N={report['data']['n_samples']}, {report['protocol']['name']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    return path


def print_sweep_table(report: dict[str, Any], out: Path) -> None:
    """The rows as ``alit eval --sweep`` prints them (best per budget marked with *)."""
    print(f"[eval] sweep {out}")
    width = max(len(r["name"]) for r in report["rows"])
    print(f"{'setting':<{width}} budget    gFID")
    for r in report["rows"]:
        print(f"{r['name']:<{width}} {r['budget']!s:>6} {r['gfid']:7.2f}{' *' if r['best'] else ''}")
    if report["saved"]:
        print(f"[eval] best settings per budget saved into {report['saved']}")

"""``alit eval``: the per-token-count evaluation of a tokenizer (and optionally a prior) into a report folder.

    alit eval --tokenizer runs/tok/final --num-images 64 --out reports/tok            # rFID, L1, LPIPS, TSC
    alit eval --tokenizer runs/tok/final --prior runs/prior/final --cfg 1.5 --out reports/tok_prior  # + gFID
    alit eval ... --shard 3/8         # one of eight runs by hand; the run that completes the set writes the report
    alit eval ... --cluster slurm --shards 4 --gpus 1 --time 1:00:00   # as Slurm jobs (see slurm.eval_jobs)
    alit eval ... --prior P --sweep cfg=1,1.5,2 temperature=0.9,1 --save-best   # a guidance sweep

gFID samples with the prior's ``sampling.json`` (see :mod:`sampling.presets`) unless a flag overrides a
setting: defaults < ``sampling.json`` (every budget, then the budget's own entry) < flags. ``--sweep`` runs
one evaluation per point of a grid of sampler settings (one job array of (point x budget x shard) tasks and
the reconstructions once, plus a merge job, with ``--cluster``) and writes a table and ``gfid_vs_<setting>.png``
(see :mod:`slurm.guidance_sweep`); ``--save-best`` writes each budget's best settings into ``sampling.json``.

With ``--cluster slurm`` one job array gets a task per (budget x shard) (adaptive counts as one more budget)
and a merge job that depends on it writes the report; ``--no-wait`` prints both job ids and returns.
``local`` runs the same jobs as subprocesses here, ``debug`` in this process (the merge job is submitted once
the array has succeeded). Resource flags and ``slurm.key=value`` overrides apply to every job.

Writes ``report.json``, ``report.md``, ``fid_vs_tokens.png``, ``reconstructions.png``,
``samples_<budget>.png`` and ``adaptive_histogram.png`` (see :mod:`sampling.report`). Feature statistics
of every (kind, budget, shard) piece are cached under ``$ALIT_HOME/features/eval``: a re-run reuses them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sampling.presets import add_sampler_arguments
from tokenizer.core.data import DataSpec
from tokenizer.core.errors import UsageError

from ..launcher import (
    SlurmConfig,
    add_cluster_arguments,
    job_flags_problem,
    slurm_config_from_args,
)
from . import prologue

if TYPE_CHECKING:
    from sampling.report import Evaluation

    from ..eval_jobs import EvalRequest

TAKES_OVERRIDES = True  # data.* overrides, e.g. data.source=/path/to/images; slurm.* ones set job resources
USER_ERRORS = (ValueError, KeyError)  # a budget, shard, protocol or resolution that does not fit


def _threshold(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "off") else float(text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit eval --tokenizer DIR [--prior DIR] [options] [data.key=value ...] [slurm.key=value ...]"
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--prior", default=None, help="a saved prior directory: adds gFID per budget")
    parser.add_argument("--out", default=None,
                        help="report folder (default: $ALIT_RUNS/eval/<tokenizer>[+<prior>])")
    parser.add_argument("--budgets", default="all", help="comma-separated token budgets or 'all' (default)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="evaluated images of the split (seeded stratified subset) and samples per budget "
                             "(default: the whole split)")
    parser.add_argument("--split", default="val", help="dataset split (train, val, all)")
    parser.add_argument("--protocol", default="torch_fidelity",
                        help="evaluation protocol: a name from configs/eval/ (demo_emoji, gfid50k_imagenet), a "
                             "protocol YAML, or the Inception preprocessing alone, torch_fidelity | clean_fid "
                             "(the evaluated images as reference; default torch_fidelity)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="sample every gFID with N seeds (--seed, --seed+1, ...): mean and spread (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="gFID sampling seed")
    parser.add_argument("--adaptive-threshold", type=_threshold, default=0.07,
                        help="token-count selection threshold (L1, [0, 1] units), or 'none' to skip")
    parser.add_argument("--tokens", default=None,
                        help="the prior's token cache: held-out length bits, and the histogram's budgets "
                             "(default: from the prior run's config)")
    parser.add_argument("--length-model", choices=("learned", "histogram"), default="learned",
                        help="who chooses the adaptive samples' budgets: 'learned' (the prior's length model, "
                             "default) or 'histogram' (the token cache's TSC histogram: the baseline)")
    parser.add_argument("--config", default=None, help="YAML with a data: section (default: the emoji set)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per chunk and model batch")
    parser.add_argument("--shard", default=None,
                        help="i/n: evaluate shard i of n of every piece in this process (default 0/1); "
                             "for jobs use --cluster with --shards")
    parser.add_argument("--shards", type=int, default=None,
                        help="with --cluster: shards per budget, i.e. array tasks = budgets x shards (default 1)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu; with --cluster: in each job)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--sweep", nargs="+", default=None, metavar="KEY=V1,V2|FILE",
                        help="a guidance sweep over a grid of sampler settings (e.g. cfg=1,1.5,2 temperature=0.9,1, "
                             "or a YAML file {cfg: [1, 1.5]}): gFID per point and budget, a table and plots")
    parser.add_argument("--save-best", action="store_true",
                        help="with --sweep: write each budget's lowest-gFID settings into <prior>/sampling.json")
    add_sampler_arguments(parser, " for gFID")
    add_cluster_arguments(parser)  # --cluster slurm|local|debug|none (default none: this process) + resources


def _opt(value: float | None, width: int, digits: int, scale: float = 1.0) -> str:
    return f"{value * scale:{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"


def _gen_columns(entry: dict[str, Any]) -> str:
    """The samples' KID (x 1e3), precision and recall of one report entry (``-`` where not computed)."""
    m = entry.get("gen_metrics") or {}
    return (f" {_opt(m.get('kid_mean'), 9, 2, 1e3)} {_opt(m.get('precision'), 5, 3)} "
            f"{_opt(m.get('recall'), 7, 3)}")


def print_report_table(report: dict[str, Any], out: str | Path) -> None:
    """The numbers of a report as the table ``alit eval`` prints (local and job runs alike)."""
    print(f"[eval] {out}")
    # gKID, precision and recall of the samples, when the protocol computes them (report.md has every metric)
    print("budget    rFID    gFID      L1   LPIPS  gKIDx1e3  prec  recall")
    for e in report["budgets"]:
        print(f"{e['budget']:6d} {e['rfid']:7.2f} {_opt(e['gfid'], 7, 2)} {e['l1']:7.4f} {e['lpips']:7.4f}"
              f"{_gen_columns(e)}")
    a = report["adaptive"]
    if a is not None:
        print(f"  TSC {a['rfid']:7.2f} {_opt(a['gfid'], 7, 2)} {a['l1']:7.4f} {a['lpips']:7.4f}{_gen_columns(a)}"
              f"  (mean {a['mean_tokens']:.1f} tokens)")
        if a.get("length_model"):
            print(f"  adaptive samples: length_model {a['length_model']}, mean {a['generated_mean_tokens']:.1f} tokens, "
                  f"TV to TSC {a['length_tv']:.3f}, nearest fixed budget {a['matched_budget']} gFID "
                  + (f"{a['gfid_matched']:.2f}" if a.get("gfid_matched") is not None else "-"))


def _flag_problem(args: argparse.Namespace, slurm_overrides: list[str]) -> str | None:
    """Why the flags do not go together, or None."""
    if args.save_best and not args.sweep:
        return "--save-best writes the best settings of a sweep: add --sweep KEY=V1,V2 (e.g. --sweep cfg=1,2)"
    if args.sweep and args.prior is None:
        return "--sweep varies the sampler settings of gFID: pass --prior DIR"
    if args.sweep and args.shard is not None:
        return "--sweep runs every piece of every point: drop --shard (with --cluster, --shards N splits them)"
    if args.cluster == "none":
        return job_flags_problem(args, slurm_overrides, ["--shards"] if args.shards is not None else [], "jobs")
    if args.shard is not None:
        return ("--shard i/n runs one shard in this process and cannot be combined with --cluster: "
                "use --shards N to split every budget into N array tasks")
    if args.shards is not None and args.shards < 1:
        return f"--shards must be >= 1, got {args.shards}"
    if args.no_wait and args.cluster != "slurm":
        return ("--no-wait needs --cluster slurm (local and debug jobs have no dependencies: the merge job is "
                "submitted after the array has finished, so this command must wait)")
    return None


def run(args: argparse.Namespace) -> int:
    from sampling.generate import Shard, default_device, load_models
    from sampling.report import EvalSettings, Evaluation
    from tokenizer.core.paths import runs_dir

    from ..eval_jobs import EvalRequest

    _take_overrides(args)
    spec, slurm_overrides = prologue(args, DataSpec, args.config, check=_flag_problem)
    jobs = args.cluster != "none"
    shard = Shard.parse(args.shard or "0/1")
    slurm = slurm_config_from_args(args, slurm_overrides) if jobs else None
    if slurm is not None and slurm.num_tasks > 1:
        raise UsageError(f"each evaluation job is one process, not {slurm.num_tasks} (--nodes/--tasks): "
                         "spread the work with --shards N instead")
    # with jobs this process only plans (on the CPU); each job picks its own device
    device = "cpu" if jobs else (args.device or default_device())
    models = load_models(args.tokenizer, args.prior, device)
    sampler, per_budget, preset = _sampler_settings(args, models)
    grid = None
    if args.sweep:
        from ..guidance_sweep import check_grid, parse_sweep

        grid = parse_sweep(args.sweep)
        prior = models.require_prior()
        check_grid(grid, prior.kind, prior.space.num_classes)
    settings = EvalSettings(budgets=args.budgets, num_images=args.num_images,  # checked by the Evaluation
                            split=args.split, protocol=args.protocol, seed=args.seed,
                            adaptive_threshold=args.adaptive_threshold, chunk_size=args.batch_size,
                            length_model=args.length_model, per_budget=per_budget, preset=preset, seeds=args.seeds,
                            **sampler)
    name = models.tokenizer_tag + (f"+{models.prior_tag}" if models.prior is not None else "")
    if grid is not None:
        folder = "sweep-" + "-".join(k.replace("_", "-") for k in grid.keys)
        out = Path(args.out) if args.out else runs_dir() / "eval" / name / folder
        return _run_sweep(args, spec.data, settings, models, grid, out, device, slurm)
    out = Path(args.out) if args.out else runs_dir() / "eval" / name
    if jobs:  # the plan is made here (bad input fails before anything is queued); the jobs rebuild it
        request = EvalRequest.from_parts(args.tokenizer, args.prior, spec.data, settings, args.tokens,
                                         args.device)
        return _run_jobs(args, request, request.build(device, models=models), out, slurm)
    evaluation = Evaluation(models, spec.data, settings, device=device, progress=not args.no_progress,
                            tokens=args.tokens)
    report = evaluation.run(out, shard)
    if report is None:
        return 0
    print_report_table(report, out)
    return 0


def _take_overrides(args: argparse.Namespace) -> None:
    """``--sweep`` takes every word after it: dotted ``data.*`` / ``slurm.*`` overrides among them are the
    command's overrides, not sweep keys."""
    if args.sweep:
        dotted = [w for w in args.sweep if "." in w.partition("=")[0] and "=" in w]
        args.sweep = [w for w in args.sweep if w not in dotted]
        args.overrides = [*getattr(args, "overrides", []), *dotted]


def _sampler_settings(args: argparse.Namespace, models: Any) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """gFID's sampler settings ``(base, per_budget, preset path)``: defaults < the prior's sampling.json <
    flags; without a prior, any sampler flag is refused (nothing would read it)."""
    from sampling import presets

    if models.prior is None:
        given = presets.explicit_settings(args)
        if given or args.preset:
            flags = [presets.BY_NAME[k].flag for k in given] + (["--preset"] if args.preset else [])
            raise UsageError(f"{', '.join(flags)} set how gFID samples: pass --prior DIR (or drop them)")
        return dict(presets.DEFAULTS), {}, None
    prior = models.prior
    base, per_budget, preset = presets.command_settings(args, models.prior_dir, prior.kind, prior.space.budgets)
    if preset.path is not None:
        print(f"[eval] sampler settings from {preset.path} (flags override them)", file=sys.stderr)
    return base, per_budget, None if preset.path is None else str(preset.path)


def _run_sweep(args: argparse.Namespace, data: Any, settings: Any, models: Any, grid: Any, out: Path,
               device: str, slurm: SlurmConfig | None) -> int:
    """The sweep here (one piece after another) or as one array + a merge job; print its table."""
    from sampling.report import Evaluation

    from ..arrays import announce_and_wait
    from ..eval_jobs import EvalRequest
    from ..guidance_sweep import SweepPlan, print_sweep_table, run_here, submit_sweep

    request = EvalRequest.from_parts(args.tokenizer, args.prior, data, settings, args.tokens, args.device)
    plan = SweepPlan(request, grid, args.shards or 1)
    if args.cluster == "none":
        evaluation = Evaluation(models, data, settings, device=device, progress=not args.no_progress,
                                tokens=args.tokens)
        report = run_here(plan, evaluation, out, args.save_best)
    else:
        evaluation = request.build(device, models=models)
        plan.tasks(evaluation)  # bad input (e.g. --shards) fails before anything is queued
        sub, what = submit_sweep(plan, evaluation, out=out, save_best=args.save_best, slurm=slurm,
                                 cluster=args.cluster)
        rc, report = announce_and_wait("eval", sub, what, args.no_wait)
        if report is None:
            return rc
    print_sweep_table(report, out)
    return 0


def _run_jobs(args: argparse.Namespace, request: EvalRequest, evaluation: Evaluation, out: Path,
              slurm: SlurmConfig | None) -> int:
    """Submit the evaluation as jobs; wait and print the table, or (``--no-wait``) print the job ids."""
    from ..arrays import announce_and_wait
    from ..eval_jobs import describe_tasks, submit_evaluation

    shards = args.shards or 1
    sub = submit_evaluation(request, evaluation, shards=shards, out=out, slurm=slurm, cluster=args.cluster)
    rc, report = announce_and_wait("eval", sub, describe_tasks(sub.tasks, shards), args.no_wait)
    if report is None:
        return rc
    print_report_table(report, out)
    return 0

"""``alit eval --cluster ...``: an evaluation as one job array over (budget x shard) plus a merge job.

The submitting process builds the :class:`~sampling.report.Evaluation` once (bad input fails before anything
is queued) and submits

- one **job array** with a task per (budget, shard) (the adaptive entry counts as one more budget); a task
  evaluates every piece of its budget and shard (reconstructions and, with a prior, samples) through
  :meth:`Evaluation.evaluate_piece`, whose feature cache makes a requeued task cheap;
- one **merge job** that loads every piece from that cache, refuses if any is missing, and writes the report
  (:meth:`Evaluation.merge_and_report`), chained as :mod:`slurm.arrays` does.

Job logs go to ``<report folder>/slurm/<job id>/``. Jobs export the submitter's ``ALIT_HOME`` (and
``ALIT_WEIGHTS_CACHE`` when set) unless ``slurm.env`` sets them, so the array and the merge job share one
feature cache (on a cluster: a shared filesystem).

    request = EvalRequest.from_parts(tokenizer_dir, prior_dir, DataConfig(), EvalSettings(num_images=10_000))
    evaluation = request.build(device="cpu")             # to plan: models loaded, no features computed
    sub = submit_evaluation(request, evaluation, shards=4, out="reports/tok", slurm=cfg, cluster="slurm")
    report = sub.wait()                                  # the report dict the merge job wrote
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from sampling.generate import ADAPTIVE, Budget, Models, Shard, budget_label, num_chunks
from sampling.report import EvalSettings, Evaluation
from tokenizer.core.config import from_dict, to_dict
from tokenizer.core.data import EMOJI, DataConfig
from tokenizer.core.paths import cache_dir

from .arrays import ArraySubmission, shared_env, submit_with_merge
from .launcher import Cluster, JobSpec, SlurmConfig

SHARD_TARGET = "slurm.eval_jobs:evaluate_shard"
MERGE_TARGET = "slurm.eval_jobs:merge_report"


# ============================================================================ what a job rebuilds
@dataclass(frozen=True)
class EvalRequest:
    """Everything that defines an evaluation, as plain values (it travels to the jobs as a dict)."""

    tokenizer: str  # absolute path of the saved tokenizer
    prior: str | None  # absolute path of the saved prior, or None
    data: dict[str, Any]  # DataConfig as a dict (to_dict)
    settings: dict[str, Any]  # EvalSettings as a dict (asdict)
    tokens: str | None = None  # the prior's token cache (adaptive gFID), or None = found from the prior
    device: str | None = None  # torch device of the jobs; None = cuda where the job has one, else cpu

    @classmethod
    def from_parts(cls, tokenizer: str | Path, prior: str | Path | None, data: DataConfig,
                   settings: EvalSettings, tokens: str | Path | None = None,
                   device: str | None = None) -> EvalRequest:
        """A request from the command's inputs (paths made absolute: jobs may start elsewhere)."""
        def absolute(p: str | Path) -> str:
            return str(Path(p).expanduser().absolute())

        data_dict = to_dict(data)
        if data.source != EMOJI and Path(data.source).expanduser().exists():  # a folder or .npz of images
            data_dict["source"] = absolute(data.source)
        budgets = settings.budgets if isinstance(settings.budgets, str) else [int(b) for b in settings.budgets]
        plain = {**asdict(settings), "budgets": budgets}  # JSON values only
        return cls(absolute(tokenizer), None if prior is None else absolute(prior), data_dict, plain,
                   None if tokens is None else absolute(tokens), device)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalRequest:
        """The inverse of ``asdict(request)``."""
        return cls(**data)

    def eval_settings(self) -> EvalSettings:
        """The :class:`EvalSettings` of this request."""
        budgets = self.settings.get("budgets", ())
        return EvalSettings(**{**self.settings, "budgets": budgets if isinstance(budgets, str) else tuple(budgets)})

    def build(self, device: str | None = None, progress: bool = False, models: Models | None = None) -> Evaluation:
        """Load the models (unless given, loaded from this request's paths) and bind them to the data and
        settings; ``device`` overrides the request's."""
        from sampling.generate import default_device, load_models

        dev = device or self.device or default_device()
        models = models or load_models(self.tokenizer, self.prior, dev)
        return Evaluation(models, from_dict(DataConfig, self.data), self.eval_settings(), device=dev,
                          progress=progress, tokens=self.tokens)


def plan_tasks(evaluation: Evaluation, shards: int) -> list[tuple[Budget, int]]:
    """The array's tasks: (budget, shard index) for every budget of the plan (adaptive last) and shard."""
    if shards < 1:
        raise ValueError(f"--shards must be >= 1, got {shards}")
    chunks = num_chunks(evaluation.num_images, evaluation.settings.chunk_size)
    if shards > chunks:
        raise ValueError(f"--shards {shards} is more than the {chunks} chunks of {evaluation.num_images} images "
                         f"at --batch-size {evaluation.settings.chunk_size}: a shard would own no images; use "
                         f"--shards <= {chunks} (or a smaller --batch-size)")
    budgets: list[Budget] = []
    for piece in evaluation.plan(1):
        if piece.budget not in budgets:
            budgets.append(piece.budget)
    budgets.sort(key=lambda b: (b == ADAPTIVE, b if b != ADAPTIVE else 0))
    return [(b, i) for b in budgets for i in range(shards)]


# ============================================================================ job entry functions
def evaluate_shard(request: dict[str, Any], budget: Budget, shard: str,
                   kinds: list[str] | None = None) -> dict[str, Any]:
    """Job entry: every piece (recon, and gen with a prior) of ``budget`` and ``shard`` ("i/n"); only those
    of ``kinds`` (``["recon"]``, ``["gen"]``) when given, as a guidance sweep's tasks split them."""
    evaluation = EvalRequest.from_dict(request).build()
    part = Shard.parse(shard)
    pieces = [p for p in evaluation.plan(part.count) if p.budget == budget and p.shard == part
              and (kinds is None or p.kind in kinds)]
    if not pieces:
        raise ValueError(f"the evaluation has no {'/'.join(kinds or ['recon', 'gen'])} piece of budget "
                         f"{budget_label(budget)} and shard {shard}")
    done = []
    for piece in pieces:
        result = evaluation.evaluate_piece(piece)
        done.append({"piece": str(piece), "n": result.n, "reused": result.reused})
        print(f"[eval] {piece}: {result.n} images{' (cached)' if result.reused else ''}", file=sys.stderr,
              flush=True)
    return {"budget": budget, "shard": shard, "pieces": done}


def merge_report(request: dict[str, Any], shards: int, out: str) -> dict[str, Any]:
    """Job entry: load every piece of the plan from the feature cache and write the report into ``out``."""
    evaluation = EvalRequest.from_dict(request).build()
    return evaluation.merge_and_report(load_cached_pieces(evaluation, evaluation.plan(shards), "evaluation"), out)


def load_cached_pieces(evaluation: Evaluation, pieces: list[Any], what: str, kind: str = "") -> list[Any]:
    """Every piece's result from the feature cache (what a merge job reads), or a ValueError naming the
    missing pieces and the fix (resubmitting ``what``, whose finished pieces are reused)."""
    results = [evaluation.load_piece(p) for p in pieces]
    missing = [str(p) for p, r in zip(pieces, results) if r is None]
    if missing:
        raise ValueError(f"{len(missing)} of {len(pieces)} {kind + ' ' if kind else ''}pieces are not in the feature "
                         f"cache {cache_dir('features') / 'eval'}: {', '.join(missing)}. The array tasks write there "
                         f"(ALIT_HOME must be the same shared folder for every job); resubmit the {what}, whose "
                         "finished pieces are reused")
    return results


# ============================================================================ submitting and waiting
@dataclass(kw_only=True)
class EvalSubmission(ArraySubmission):
    """A submitted evaluation: the array's jobs (one per (budget, shard) task) and the merge job."""

    request: EvalRequest
    shards: int  # shards per budget
    tasks: list[tuple[Budget, int]]  # (budget, shard index) per array task, in order


def submit_evaluation(request: EvalRequest, evaluation: Evaluation, *, shards: int, out: str | Path,
                      slurm: SlurmConfig | None = None, cluster: Cluster = "slurm") -> EvalSubmission:
    """Submit the array of (budget x shard) tasks and, on Slurm, the dependent merge job.

    ``evaluation`` is the request built in this process (its plan decides the tasks; nothing is queued when
    it is wrong). On local/debug the merge job is submitted by :meth:`EvalSubmission.wait`.
    """
    tasks = plan_tasks(evaluation, shards)
    out_dir = Path(out).expanduser().absolute()
    cfg = slurm or SlurmConfig()
    cfg = replace(cfg, env={**shared_env(), **cfg.env})
    specs = [JobSpec(SHARD_TARGET, {"request": asdict(request), "budget": b, "shard": f"{i}/{shards}"})
             for b, i in tasks]
    merge = JobSpec(MERGE_TARGET, {"request": asdict(request), "shards": shards, "out": str(out_dir)})
    sub = submit_with_merge(specs, merge, out=out_dir, slurm=cfg, cluster=cluster)
    return EvalSubmission(**{f.name: getattr(sub, f.name) for f in fields(ArraySubmission)},
                          request=request, shards=shards, tasks=tasks)


def describe_tasks(tasks: list[tuple[Budget, int]], shards: int) -> str:
    """``6 task(s): budgets 4, 8, adaptive x 2 shard(s)``."""
    budgets = list(dict.fromkeys(b for b, _ in tasks))
    return f"{len(tasks)} task(s): budgets {', '.join(str(b) for b in budgets)} x {shards} shard(s)"

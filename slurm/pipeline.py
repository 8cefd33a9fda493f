"""The whole pipeline as stages: base VQ -> ALIT distill -> ALIT finetune -> token cache -> prior ->
per-token-count evaluation (rFID, gFID, L1, LPIPS, token-count selection) -> an HTML report.

Every stage writes into its own folder under the pipeline directory (``out``, default ``$ALIT_HOME/<name>``).
Stages are the same library calls as the ``alit train``/``tokenize``/``eval`` commands, configured by the
YAML files a :class:`DemoConfig` names, so the same pipeline runs on GPUs by pointing it at other configs.

**Reuse.** Each stage has a hash (:func:`plan`): its resolved config (the stage YAML with the overrides and
the data section, without the paths the pipeline sets) and the hashes of the stages it reads. A stage is
reused only when it finished, its record (``<out>/stages/<stage>.json``) holds the same hash, and its output
(the saved model's files, the cache manifest, the report) is still what that run wrote; otherwise it runs
again, and so does every stage after it, and the plan says why. A changed stage's folder is removed before
it reruns; an unfinished stage with the same hash continues (training resumes from its checkpoint).

**Jobs.** ``--cluster slurm`` queues every stage that runs as its own job, with its own resources
(``stages.<stage>.slurm``), chained by ``--dependency=afterok:<previous job>`` with
``kill_on_invalid_dep``; ``local``/``debug`` submit stage after stage, waiting for each. Tokenize and eval
with ``stages.<stage>.shards > 1`` are a job array and a merge job, submitted by the stage's own (one-CPU)
job once its inputs exist, since both need the trained tokenizer to plan their tasks. What was submitted is
recorded in ``pipeline.json`` (``alit status <dir>`` reads it).

**Safety.** The pipeline writes a marker file (:data:`MARKER`) into a directory it creates (or adopts while
empty), refuses to write into a non-empty directory without it, and ``fresh`` removes only the contents of a
marked directory, never following a symbolic link out of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizer.core.config import (
    ConfigError,
    from_dict,
    load_config,
    locate_config,
    read_yaml_file,
    save_config,
    to_dict,
)
from tokenizer.core.data import DataConfig, source_path
from tokenizer.core.errors import UserError
from tokenizer.core.paths import alit_home

MARKER = ".alit-pipeline"  # written into a pipeline directory the pipeline created; --fresh needs it
RECORD = "pipeline.json"  # what the last `alit demo` planned and submitted (alit status reads it)
STAGES_DIR = "stages"  # <out>/stages/<stage>.json: the hash of a stage's run, its state and its output's identity;
# <out>/stages/<stage>/slurm/<job id>/: the logs of its jobs (the stage folders hold only what the stage writes)


@dataclass
class StageSpec:
    """One training stage: a config file and overrides (the run directory is set by the pipeline)."""

    config: str = ""  # YAML config of the stage (absolute, or relative to the working directory or the repository)
    overrides: list[str] = field(default_factory=list)  # dotted key=value overrides


@dataclass
class EvalSpec:
    """What the final evaluation measures."""

    budgets: list[int] = field(default_factory=list)  # token budgets; [] = all of the tokenizer's
    num_images: int | None = None  # images of the split (and samples per budget); None = the whole split
    split: str = "val"  # evaluated split, also the FID reference
    cfg_scale: float = 1.5  # gFID guidance scale
    temperature: float = 1.0  # gFID sampling temperature
    steps: int = 8  # MaskGIT decoding steps
    seed: int = 0  # sampling seed
    protocol: str = "torch_fidelity"  # FID protocol
    length_model: str = "learned"  # adaptive gFID: the prior's learned p(budget | class), or "histogram" (TSC)


@dataclass
class StageJob:
    """How one stage runs as a job (``--cluster``): its resources and, for tokenize and eval, its array size."""

    slurm: dict[str, Any] = field(default_factory=dict)  # SlurmConfig fields, e.g. {gpus_per_node: 8, tasks_per_node: 8}
    shards: int = 1  # tokenize, eval: > 1 = a job array of this many tasks (each with `slurm`) and a merge job


@dataclass
class StagesConfig:
    """Per-stage job settings (only used with ``--cluster``)."""

    vq: StageJob = field(default_factory=StageJob)
    distill: StageJob = field(default_factory=StageJob)
    finetune: StageJob = field(default_factory=StageJob)
    tokenize: StageJob = field(default_factory=StageJob)
    prior: StageJob = field(default_factory=StageJob)
    eval: StageJob = field(default_factory=StageJob)


@dataclass
class DemoConfig:
    """The stages of the pipeline and where it writes."""

    out: str | None = None  # pipeline directory; default $ALIT_HOME/<name>
    name: str = "demo"  # default directory name under $ALIT_HOME (configs of other datasets use their own)
    data: DataConfig = field(default_factory=DataConfig)  # dataset of every stage
    vq: StageSpec = field(default_factory=lambda: StageSpec("configs/tokenizer/vq_emoji_cpu.yaml"))
    distill: StageSpec = field(default_factory=lambda: StageSpec("configs/tokenizer/distill_emoji_cpu.yaml"))
    finetune: StageSpec = field(default_factory=lambda: StageSpec("configs/tokenizer/finetune_emoji_cpu.yaml"))
    prior: StageSpec = field(default_factory=lambda: StageSpec("configs/prior/maskgit_emoji_cpu.yaml"))
    seed: int = 0  # train.seed of every training stage (a stage's own overrides win); the sampling seed is eval.seed
    ranks: int = 1  # processes per training stage run in this process's machine (gloo DDP on CPU, one thread
    #                 each: two 1-thread ranks train ~1.6x faster than one 2-thread process on 2 cores). Each
    #                 stage's global batch stays its batch_size (train.global_batch), so the results are those
    #                 of one process; capped at the CPUs this process may use
    adaptive_threshold: float = 0.07  # token-count selection: L1 threshold in [0, 1] units
    eval: EvalSpec = field(default_factory=EvalSpec)
    stages: StagesConfig = field(default_factory=StagesConfig)  # per-stage jobs: resources, array sizes
    title: str = "alit-stack demo: ALIT + MaskGIT on the embedded emoji set"  # of the HTML report

    def root(self) -> Path:
        return Path(self.out).expanduser() if self.out else alit_home() / self.name


# ============================================================================ the stages
@dataclass(frozen=True)
class Stage:
    """One stage: its name, its folder, the file that says it finished, and the stages it reads."""

    name: str
    label: str
    folder: str
    done: str  # relative to the pipeline directory
    output: str  # what its identity is taken of (a model directory, or a file)
    inputs: tuple[str, ...]


STAGES: tuple[Stage, ...] = (
    Stage("vq", "1/6 base VQ tokenizer", "vq", "vq/final/manifest.json", "vq/final", ()),
    Stage("distill", "2/6 ALIT distill", "distill", "distill/final/manifest.json", "distill/final", ("vq",)),
    Stage("finetune", "3/6 ALIT finetune", "finetune", "finetune/final/manifest.json", "finetune/final",
          ("distill",)),
    Stage("tokenize", "4/6 token cache", "tokens", "tokens/manifest.json", "tokens/manifest.json", ("finetune",)),
    Stage("prior", "5/6 prior", "prior", "prior/final/manifest.json", "prior/final", ("finetune", "tokenize")),
    Stage("eval", "6/6 evaluation", "report", "report/report.html", "report/report.json",
          ("finetune", "tokenize", "prior")),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _data_overrides(data: DataConfig) -> list[str]:
    return [f"data.{k}={'null' if v is None else v}" for k, v in to_dict(data).items()]


def _tokenizer_run(cfg: DemoConfig, name: str, root: Path) -> Any:
    from tokenizer.train import TokenizerRunConfig

    spec: StageSpec = getattr(cfg, name)
    extra = {"distill": [f"base={root / 'vq' / 'final'}"], "finetune": [f"init={root / 'distill' / 'final'}"]}
    run = load_config(TokenizerRunConfig, spec.config, [*_data_overrides(cfg.data), f"train.seed={cfg.seed}",
                                                        *spec.overrides,
                                                        *extra.get(name, []), f"run_dir={root / name}"])
    return _split_batch(run, name, cfg)


def _prior_run(cfg: DemoConfig, root: Path) -> Any:
    from generator.train import PriorRunConfig

    run = load_config(PriorRunConfig, cfg.prior.config, [f"train.seed={cfg.seed}", *cfg.prior.overrides,
                                                         f"tokens={root / 'tokens'}",
                                                         f"tokenizer={root / 'finetune' / 'final'}",
                                                         f"run_dir={root / 'prior'}"])
    return _split_batch(run, "prior", cfg)


def local_ranks(cfg: DemoConfig) -> int:
    """Training processes per stage in this machine: ``cfg.ranks`` capped at the CPUs this process may use."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cfg.ranks, cpus))


def _split_batch(run: Any, stage: str, cfg: DemoConfig) -> Any:
    """With ``ranks`` > 1 the stage's global batch is its batch (``train.global_batch``, else
    ``train.batch_size``), each rank holding an equal share: one process or several train the same steps."""
    if cfg.ranks <= 1:
        return run
    total = run.train.global_batch or run.train.batch_size
    if total % cfg.ranks:
        raise ConfigError(f"ranks={cfg.ranks} does not divide the {stage} stage's batch of {total}: choose ranks "
                          f"that divide it, or set {stage}.overrides=[train.global_batch=...]")
    run.train.global_batch = total
    run.train.batch_size = total // cfg.ranks
    return run


def _eval_settings(cfg: DemoConfig) -> Any:
    from sampling.report import EvalSettings

    e = cfg.eval
    return EvalSettings(budgets=tuple(e.budgets), num_images=e.num_images, split=e.split, protocol=e.protocol,
                        cfg_scale=e.cfg_scale, temperature=e.temperature, steps=e.steps, seed=e.seed,
                        adaptive_threshold=cfg.adaptive_threshold, length_model=e.length_model)


_PATH_KEYS = ("run_dir", "base", "init", "tokens", "tokenizer")  # set by the pipeline: upstream hashes cover them


def resolved_stage_config(cfg: DemoConfig, stage: str) -> dict[str, Any]:
    """What defines a stage's output apart from its inputs: the resolved config, without the pipeline's paths."""
    root = cfg.root()
    if stage in ("vq", "distill", "finetune"):
        resolved = to_dict(_tokenizer_run(cfg, stage, root))
    elif stage == "prior":
        resolved = to_dict(_prior_run(cfg, root))
    elif stage == "tokenize":
        resolved = {"data": to_dict(cfg.data), "adaptive_threshold": cfg.adaptive_threshold}
    else:
        from dataclasses import asdict

        settings = asdict(_eval_settings(cfg))
        resolved = {"data": to_dict(cfg.data), "settings": {**settings, "budgets": list(settings["budgets"])}}
    return {k: v for k, v in resolved.items() if k not in _PATH_KEYS}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def output_identity(path: Path) -> str | None:
    """The identity of a stage's output: a model directory's :func:`tokenizer_identity`, a file's sha256;
    None when it is missing."""
    from tokenizer.core.checkpoint import tokenizer_identity

    try:
        if path.is_dir():
            return tokenizer_identity(path)["id"]
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, FileNotFoundError):
        return None


def stage_record_path(root: Path, stage: str) -> Path:
    return root / STAGES_DIR / f"{stage}.json"


def stage_job_dir(root: Path, stage: str) -> Path:
    """Where a stage's jobs write their logs (``<this>/slurm/<job id>/``)."""
    return root / STAGES_DIR / stage


def read_stage_record(root: Path, stage: str) -> dict[str, Any] | None:
    try:
        return json.loads(stage_record_path(root, stage).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _config_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if old is None:
        return "its config changed"
    a, b = _flat(old), _flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not keys:
        return "its config changed"
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3])
    return f"config changed ({shown}{', ...' if len(keys) > 3 else ''})"


@dataclass
class StagePlan:
    """What the pipeline does with one stage."""

    stage: Stage
    hash: str
    config: dict[str, Any]
    reuse: bool
    reason: str  # why it runs again (or where the reused output is)
    resume: bool = False  # runs, continuing an unfinished run of the same hash (checkpoints kept)


def plan(cfg: DemoConfig) -> list[StagePlan]:
    """Each stage's hash and whether it is reused (and why not); reads the stage records, changes nothing."""
    root = cfg.root()
    hashes: dict[str, str] = {}
    rerun: set[str] = set()
    plans: list[StagePlan] = []
    for stage in STAGES:
        config = resolved_stage_config(cfg, stage.name)
        h = _digest({"stage": stage.name, "config": config, "inputs": {i: hashes[i] for i in stage.inputs}})
        hashes[stage.name] = h
        record = read_stage_record(root, stage.name)
        upstream = [i for i in stage.inputs if i in rerun]
        done = (root / stage.done).is_file()
        resume = False
        if record is None:
            reason = "no earlier run" if not (root / stage.folder).exists() else "no record of an earlier run"
        elif record.get("hash") != h:
            reason = (f"input {upstream[0]} runs again" if upstream else _config_change(record.get("config"), config))
        elif upstream:
            reason = f"input {upstream[0]} runs again"
        elif not done or record.get("state") != "done":
            reason, resume = "its earlier run did not finish (continuing it)", True
        elif output_identity(root / stage.output) != record.get("output"):
            reason = f"its output {stage.output} changed since its run"
        else:
            plans.append(StagePlan(stage, h, config, True, f"finished earlier: {root / stage.folder}"))
            continue
        rerun.add(stage.name)
        plans.append(StagePlan(stage, h, config, False, reason, resume))
    return plans


# ============================================================================ the directory
def _remove(path: Path) -> None:
    """Remove ``path`` without following a symbolic link (a link is unlinked, never its target)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)  # removes links inside, never what they point to


def prepare_root(cfg: DemoConfig, fresh: bool = False) -> Path:
    """Create (or check) the pipeline directory and its marker; ``fresh`` empties a marked directory.

    Raises :class:`UserError` (nothing touched) for ``fresh`` on a directory without the marker, a symbolic
    link, or a non-empty directory the pipeline did not create."""
    root = cfg.root().absolute()
    if root.is_symlink():
        raise UserError(f"the pipeline directory {root} is a symbolic link: pass the directory it points to "
                        "(out=...), which --fresh may then empty if alit demo created it")
    if root.exists() and not root.is_dir():
        raise UserError(f"the pipeline directory {root} is a file: pass a new directory (out=...)")
    marked = (root / MARKER).is_file() and not (root / MARKER).is_symlink()
    if root.exists() and not marked and any(root.iterdir()):
        what = "--fresh refused" if fresh else "refused"
        raise UserError(f"{what}: {root} is not empty and has no {MARKER} marker (alit demo did not create it), "
                        "so it was left untouched: pass a new or empty directory as out=...")
    if fresh and root.exists():
        _log(f"--fresh: emptying {root} (created by alit demo)")
        for entry in root.iterdir():
            if entry.name != MARKER:
                _remove(entry)
    root.mkdir(parents=True, exist_ok=True)
    if not marked:
        _write_json(root / MARKER, {"created_by": "alit demo", "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return root


def apply_plan(root: Path, plans: list[StagePlan]) -> None:
    """Remove the folder of every stage that runs again from scratch (inside a marked directory) and record
    the new hash as submitted."""
    for p in plans:
        if p.reuse:
            continue
        folder = root / p.stage.folder
        if not p.resume and (folder.exists() or folder.is_symlink()):
            _remove(folder)
        _write_json(stage_record_path(root, p.stage.name), {"stage": p.stage.name, "hash": p.hash, "config": p.config,
                                            "state": "submitted"})


def announce(plans: list[StagePlan]) -> None:
    for p in plans:
        _log(f"{p.stage.label}: reused ({p.reason})" if p.reuse else f"{p.stage.label}: runs ({p.reason})")


# ============================================================================ running one stage
def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _spawn_ranks(cfg: DemoConfig, device: str | None, cluster: str) -> int:
    """How many local training processes this process starts for a stage (1 = train in this process): only
    for a CPU run outside a job (a job's ranks are its Slurm tasks) and outside a process group."""
    from sampling.generate import default_device

    if cluster != "none" or "WORLD_SIZE" in os.environ or (device or default_device()) != "cpu":
        return 1
    return local_ranks(cfg)


def _train_in_ranks(cfg: DemoConfig, stage: str, device: str | None, ranks: int) -> None:
    """Train ``stage`` in ``ranks`` spawned processes (gloo DDP, one thread each); rank 0 prints, the others
    log to ``<stage>/rank<r>.log``. A failing rank fails the stage with its traceback."""
    import socket

    with socket.socket() as sock:  # a free port for the process group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _spawn(_rank_main, ranks, (ranks, port, to_dict(cfg), stage, device), stage)


def _spawn(fn: Any, n: int, args: tuple[Any, ...], stage: str) -> None:
    """``fn(i, *args)`` in ``n`` spawned processes, waited for; a failing one fails the stage with its traceback."""
    import torch.multiprocessing as mp

    try:
        mp.start_processes(fn, args=args, nprocs=n, start_method="spawn", join=True)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        raise RuntimeError(f"the {stage} stage failed in one of its {n} processes:\n{e}") from None


def _quiet_rank(rank: int, root: Path, stage: str) -> None:
    """One thread per process; ranks after the first write their output to ``<stage>/rank<r>.log``."""
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if rank:
        (root / stage).mkdir(parents=True, exist_ok=True)
        log = open(root / stage / f"rank{rank}.log", "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        os.dup2(log.fileno(), 1)  # C++ warnings too
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log


def _eval_rank_main(rank: int, n: int, config: dict[str, Any], device: str | None) -> None:
    """Process ``rank`` of ``n`` of the evaluation stage: the pieces of shard ``rank`` (cached for the merge)."""
    from sampling.generate import Shard, default_device
    from sampling.report import Evaluation

    cfg = from_dict(DemoConfig, config)
    root = cfg.root()
    _quiet_rank(rank, root, "report")
    evaluation = Evaluation.load(root / "finetune" / "final", root / "prior" / "final", cfg.data, _eval_settings(cfg),
                                 device=device or default_device(), tokens=root / "tokens", progress=rank == 0)
    for piece in evaluation.plan(n):
        if piece.shard == Shard(rank, n):
            evaluation.evaluate_piece(piece)


def _rank_main(rank: int, world: int, port: int, config: dict[str, Any], stage: str, device: str | None) -> None:
    """One training process of :func:`_train_in_ranks`."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = from_dict(DemoConfig, config)
    root = cfg.root()
    _quiet_rank(rank, root, stage)
    try:  # the stage's own code: with WORLD_SIZE set, _run_stage trains here as one rank
        _run_stage(cfg, stage, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _log_prior(result: Any) -> None:
    rows = [f"{b}: {result.bits_per_token.get(f'bits_per_token/{b}', float('nan')):.3f} "
            f"(unigram {u:.3f})" for b, u in result.unigram_bits_per_token.items()]
    _log("prior held-out bits/token per budget: " + ", ".join(rows))


def _run_stage(cfg: DemoConfig, stage: str, device: str | None, cluster: str = "none") -> str:
    """Run stage ``stage`` (its inputs finished); returns its output's path."""
    from sampling.generate import default_device

    root = cfg.root()
    tokenizer_dir, tokens, prior = root / "finetune" / "final", root / "tokens", root / "prior"
    job: StageJob = getattr(cfg.stages, stage)
    ranks = _spawn_ranks(cfg, device, cluster)
    if stage in ("vq", "distill", "finetune", "prior") and ranks > 1:
        _train_in_ranks(cfg, stage, device, ranks)
        return str(root / stage / "final")
    if stage in ("vq", "distill", "finetune"):
        from tokenizer.train import train_tokenizer

        train_tokenizer(_tokenizer_run(cfg, stage, root))
        return str(root / stage / "final")
    if stage == "tokenize":
        if job.shards > 1 and cluster != "none":
            from .launcher import slurm_config
            from .tokenize_jobs import TokenizeRequest, submit_tokenization

            request = TokenizeRequest.from_parts(tokenizer_dir, cfg.data, tokens,
                                                 adaptive_threshold=cfg.adaptive_threshold, device=device)
            sub = submit_tokenization(request, shards=job.shards, slurm=slurm_config(job.slurm),
                                      cluster=cluster)  # type: ignore[arg-type]
            _record_subjobs(root, stage, [str(j.job_id) for j in sub.array])
            return str(sub.wait())
        from generator.cache import build_token_cache

        build_token_cache(tokenizer_dir, cfg.data, tokens, adaptive_threshold=cfg.adaptive_threshold,
                          device=device or default_device(), progress=False)
        return str(tokens)
    if stage == "prior":
        from generator.train import train_prior

        _log_prior(train_prior(_prior_run(cfg, root)))
        return str(prior / "final")
    from sampling.html import render_html

    report_dir = root / "report"
    if job.shards > 1 and cluster != "none":
        from .eval_jobs import EvalRequest, submit_evaluation
        from .launcher import slurm_config

        request = EvalRequest.from_parts(tokenizer_dir, prior / "final", cfg.data, _eval_settings(cfg), tokens,
                                         device)
        sub = submit_evaluation(request, request.build(device="cpu"), shards=job.shards, out=report_dir,
                                slurm=slurm_config(job.slurm), cluster=cluster)  # type: ignore[arg-type]
        _record_subjobs(root, stage, [str(j.job_id) for j in sub.array])
        sub.wait()
    else:
        from sampling.generate import Shard
        from sampling.report import Evaluation

        evaluation = Evaluation.load(tokenizer_dir, prior / "final", cfg.data, _eval_settings(cfg),
                                     device=device or default_device(), tokens=tokens)
        # every shard needs a chunk of images and of samples
        chunks = -(-min(evaluation.num_images, evaluation.num_samples) // evaluation.settings.chunk_size)
        n = min(ranks, chunks)
        if n > 1:  # the pieces of shard i in process i (one thread each); then this process merges and reports
            _spawn(_eval_rank_main, n, (n, to_dict(cfg), device), "eval")
            evaluation.run(report_dir, Shard(0, n))  # shard 0's pieces are cached: this only merges
        else:
            evaluation.run(report_dir)
    extra = {}
    for s in STAGES[:-1]:
        rec = read_stage_record(root, s.name) or {}
        if "seconds" in rec:
            extra[f"time: {s.label}"] = f"{rec['seconds'] / 60:.1f} min"
    return str(render_html(report_dir, cfg.title, extra))


def _record_subjobs(root: Path, stage: str, ids: list[str]) -> None:
    if not _is_rank0():
        return
    record = read_stage_record(root, stage) or {}
    _write_json(stage_record_path(root, stage), {**record, "subjobs": ids})


def run_stage(cfg: DemoConfig, stage: str, stage_hash: str, device: str | None = None,
              cluster: str = "none") -> str:
    """Run one stage unless its record says this hash already finished; then record its output's identity."""
    root = cfg.root()
    info = _BY_NAME[stage]
    record = read_stage_record(root, stage) or {}
    if (record.get("hash") == stage_hash and record.get("state") == "done" and (root / info.done).is_file()):
        _log(f"{info.label}: finished already (a requeued job)")
        return str(root / info.output)
    if _is_rank0():
        _write_json(stage_record_path(root, stage), {**record, "hash": stage_hash, "state": "running",
                                                        "started": time.time()})
    _log(f"{info.label}: running")
    t0 = time.perf_counter()
    out = _run_stage(cfg, stage, device, cluster)
    seconds = time.perf_counter() - t0
    if _is_rank0():
        record = read_stage_record(root, stage) or {}
        _write_json(stage_record_path(root, stage),
                    {**record, "hash": stage_hash, "state": "done", "seconds": seconds,
                     "output": output_identity(root / info.output), "finished": time.time()})
    _log(f"{info.label}: done in {seconds / 60:.1f} min")
    return out


def run_stage_job(config: dict[str, Any], stage: str, stage_hash: str, device: str | None = None,
                  cluster: str = "none") -> str:
    """Job entry of one stage of ``alit demo --cluster ...`` (``config`` a DemoConfig as a dict, paths
    absolute); a requeued job continues (training resumes from its checkpoint)."""
    return run_stage(from_dict(DemoConfig, config), stage, stage_hash, device, cluster)


# ============================================================================ the record
def write_record(root: Path, cluster: str, entries: list[dict[str, Any]]) -> None:
    """``pipeline.json``: per stage its hash, whether it was reused and why it runs, its job ids and logs."""
    _write_json(root / RECORD, {"cluster": cluster, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "stages": entries})


def record_entry(p: StagePlan, jobs: list[str] | None = None, log: str | None = None) -> dict[str, Any]:
    return {"stage": p.stage.name, "label": p.stage.label, "folder": p.stage.folder, "hash": p.hash,
            "reused": p.reuse, "reason": p.reason, "jobs": jobs or [], "log": log}


def summary(root: Path) -> str:
    """The closing line of a finished pipeline (from its report)."""
    report = json.loads((root / "report" / "report.json").read_text())
    first, best = report["budgets"][0], report["budgets"][-1]
    return (f"rFID {first['rfid']:.1f} -> {best['rfid']:.1f} from {first['budget']} to {best['budget']} tokens; "
            f"report: {root / 'report' / 'report.html'}")


def run_demo(cfg: DemoConfig, fresh: bool = False, device: str | None = None) -> Path:
    """Run (or finish) every stage in this process; returns the path of ``report.html``."""
    t_start = time.perf_counter()
    cfg = for_job(cfg)
    root = prepare_root(cfg, fresh)
    cfg.out = str(root)
    plans = plan(cfg)
    announce(plans)
    apply_plan(root, plans)
    save_config(cfg, root, "demo.yaml")
    write_record(root, "none", [record_entry(p) for p in plans])
    for p in plans:
        if not p.reuse:
            run_stage(cfg, p.stage.name, p.hash, device)
    total = time.perf_counter() - t_start
    print(f"demo finished in {total / 60:.1f} min: {summary(root)}")
    return root / "report" / "report.html"


def check_inputs(cfg: DemoConfig, data: bool = True) -> None:
    """Refuse a missing stage config or (``data``) data source, a UserError, before any stage runs or writes."""
    if data:
        source_path(cfg.data)
    for name in ("vq", "distill", "finetune", "prior"):
        read_yaml_file(getattr(cfg, name).config, f"{name} stage config ({name}.config)")
    for stage in STAGE_NAMES:
        job: StageJob = getattr(cfg.stages, stage)
        if job.shards < 1:
            raise ConfigError(f"stages.{stage}.shards must be >= 1, got {job.shards}")
        if job.shards > 1 and stage not in ("tokenize", "eval"):
            raise ConfigError(f"stages.{stage}.shards: only tokenize and eval run as arrays; remove it "
                              f"(use stages.{stage}.slurm.tasks_per_node for several processes)")


def for_job(cfg: DemoConfig) -> DemoConfig:
    """``cfg`` with every path absolute (the demo directory, the stage configs, a data folder): a job may
    start in another directory."""
    cfg.out = str(cfg.root().expanduser().absolute())
    for spec in (cfg.vq, cfg.distill, cfg.finetune, cfg.prior):
        spec.config = str(locate_config(spec.config).absolute())
    source = Path(cfg.data.source).expanduser()
    if source.exists():  # else the name the job's machine knows (e.g. a path only the compute nodes mount)
        cfg.data.source = str(source.absolute())
    return cfg


"""The whole pipeline as one run: base VQ -> ALIT distill -> ALIT finetune -> token cache -> prior ->
per-token-count evaluation (rFID, gFID, L1, LPIPS, token-count selection) -> an HTML report.

Every stage writes into its own folder under the demo directory and is skipped when it already finished
(its export or manifest exists), so a re-run continues where the last one stopped; ``fresh=True``
starts over. Stages are the same library calls as the ``alit train``/``tokenize``/``eval`` commands,
configured by the YAML files a :class:`DemoConfig` names, so the same pipeline runs on a GPU by pointing
it at other configs (``alit demo --config configs/demo/imagenet_gpu.yaml data.source=...``), and as one
Slurm job with ``--cluster slurm`` (:func:`run_demo_job`): a preempted or timed-out job is requeued and
continues, finished stages reused and the interrupted training resumed from its last checkpoint.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenizer.core.config import from_dict, load_config, locate_config, read_yaml_file, save_config
from tokenizer.core.data import DataConfig, source_path
from tokenizer.core.paths import alit_home


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


@dataclass
class DemoConfig:
    """The stages of the pipeline and where it writes."""

    out: str | None = None  # demo directory; default $ALIT_HOME/demo
    data: DataConfig = field(default_factory=DataConfig)  # dataset of every stage
    vq: StageSpec = field(default_factory=lambda: StageSpec("configs/tokenizer/vq_emoji_cpu.yaml"))
    distill: StageSpec = field(default_factory=lambda: StageSpec("configs/tokenizer/distill_emoji_cpu.yaml"))
    finetune: StageSpec = field(default_factory=lambda: StageSpec("configs/tokenizer/finetune_emoji_cpu.yaml"))
    prior: StageSpec = field(default_factory=lambda: StageSpec("configs/prior/maskgit_emoji_cpu.yaml"))
    adaptive_threshold: float = 0.07  # token-count selection: L1 threshold in [0, 1] units
    eval: EvalSpec = field(default_factory=EvalSpec)

    def root(self) -> Path:
        return Path(self.out) if self.out else alit_home() / "demo"


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _data_overrides(data: DataConfig) -> list[str]:
    from tokenizer.core.config import to_dict

    return [f"data.{k}={'null' if v is None else v}" for k, v in to_dict(data).items()]


def _stage(name: str, done: Path, timings: dict[str, float], fn) -> None:
    if done.exists():
        _log(f"{name}: reused (finished earlier: {done.parent})")
        timings[name] = 0.0
        return
    _log(f"{name}: running")
    t0 = time.perf_counter()
    fn()
    timings[name] = time.perf_counter() - t0
    _log(f"{name}: done in {timings[name] / 60:.1f} min")


def run_demo(cfg: DemoConfig, fresh: bool = False, device: str | None = None) -> Path:
    """Run (or finish) every stage; returns the path of ``report.html``."""
    from generator.cache import build_token_cache
    from generator.train import PriorRunConfig, train_prior
    from sampling.generate import default_device
    from sampling.html import render_html
    from sampling.report import EvalSettings, Evaluation
    from tokenizer.train import TokenizerRunConfig, train_tokenizer

    root = cfg.root()
    if fresh and root.exists():
        _log(f"--fresh: removing {root}")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root, "demo.yaml")
    data = _data_overrides(cfg.data)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    def tok_stage(spec: StageSpec, name: str, *extra: str) -> None:
        run_cfg = load_config(TokenizerRunConfig, spec.config, [*data, *spec.overrides, *extra,
                                                                f"run_dir={root / name}"])
        train_tokenizer(run_cfg)

    vq, distill, finetune = root / "vq", root / "distill", root / "finetune"
    _stage("1/6 base VQ tokenizer", vq / "final" / "manifest.json", timings, lambda: tok_stage(cfg.vq, "vq"))
    _stage("2/6 ALIT distill", distill / "final" / "manifest.json", timings,
           lambda: tok_stage(cfg.distill, "distill", f"base={vq / 'final'}"))
    _stage("3/6 ALIT finetune", finetune / "final" / "manifest.json", timings,
           lambda: tok_stage(cfg.finetune, "finetune", f"init={distill / 'final'}"))
    tokenizer_dir = finetune / "final"
    tokens = root / "tokens"
    _stage("4/6 token cache", tokens / "manifest.json", timings,
           lambda: build_token_cache(tokenizer_dir, cfg.data, tokens, adaptive_threshold=cfg.adaptive_threshold))
    prior = root / "prior"

    def prior_stage() -> None:
        run_cfg = load_config(PriorRunConfig, cfg.prior.config, [*cfg.prior.overrides, f"tokens={tokens}",
                                                                  f"tokenizer={tokenizer_dir}", f"run_dir={prior}"])
        result = train_prior(run_cfg)
        rows = [f"{b}: {result.bits_per_token.get(f'bits_per_token/{b}', float('nan')):.3f} "
                f"(unigram {u:.3f})" for b, u in result.unigram_bits_per_token.items()]
        _log("prior held-out bits/token per budget: " + ", ".join(rows))

    _stage("5/6 prior", prior / "final" / "manifest.json", timings, prior_stage)
    report_dir = root / "report"
    e = cfg.eval
    settings = EvalSettings(budgets=tuple(e.budgets), num_images=e.num_images, split=e.split, protocol=e.protocol,
                            cfg_scale=e.cfg_scale, temperature=e.temperature, steps=e.steps, seed=e.seed,
                            adaptive_threshold=cfg.adaptive_threshold)
    _log("6/6 evaluation (cached pieces are reused)")
    t0 = time.perf_counter()
    evaluation = Evaluation.load(tokenizer_dir, prior / "final", cfg.data, settings,
                                 device=device or default_device(), tokens=tokens)
    report = evaluation.run(report_dir)
    timings["6/6 evaluation"] = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    extra = {f"time: {k}": f"{v / 60:.1f} min" + (" (reused)" if v == 0 else "") for k, v in timings.items()}
    extra["time: total"] = f"{total / 60:.1f} min"
    page = render_html(report_dir, "alit-stack demo: ALIT + MaskGIT on the embedded emoji set", extra)
    best = report["budgets"][-1]
    print(f"demo finished in {total / 60:.1f} min: rFID {report['budgets'][0]['rfid']:.1f} -> {best['rfid']:.1f} "
          f"from {report['budgets'][0]['budget']} to {best['budget']} tokens; report: {page}")
    return page


def check_inputs(cfg: DemoConfig, data: bool = True) -> None:
    """Refuse a missing stage config or (``data``) data source, a UserError, before any stage runs or writes."""
    if data:
        source_path(cfg.data)
    for name in ("vq", "distill", "finetune", "prior"):
        read_yaml_file(getattr(cfg, name).config, f"{name} stage config ({name}.config)")


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


def run_demo_job(config: dict, device: str | None = None) -> str:
    """Job entry of ``alit demo --cluster ...``: run or continue the pipeline of ``config`` (a ``DemoConfig`` as
    a dict, paths absolute); returns the report page's path. ``--fresh`` is applied before submitting, never
    here, so a requeued job continues instead of starting over."""
    return str(run_demo(from_dict(DemoConfig, config), fresh=False, device=device))

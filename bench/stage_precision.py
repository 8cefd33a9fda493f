"""Each demo stage trained in fp32 and in bf16 autocast, side by side in one process: speed and held-out loss.

For every training stage of ``make demo`` (base VQ, ALIT distillation, ALIT finetuning, MaskGIT prior) the
real stage (its YAML from ``configs/``, the real Task and Trainer) trains ``steps`` optimizer steps from the
same seed twice: ``train.precision=fp32`` and ``train.precision=bf16``. Reported per stage:

- ``demo_stage.<stage>.bf16_speedup``: fp32 images/s over bf16 images/s inverted (bf16 / fp32 rate; > 1 =
  bf16 faster), from the trainer's own images/s windows after the first (the warm-up window is dropped);
- ``demo_stage.<stage>.<metric>.fp32`` / ``.bf16``: the stage's held-out metric after those steps (base VQ:
  validation L1; distillation: validation cross-entropy at the largest budget; finetuning: validation L1 at
  the largest budget; prior: held-out bits/token), same seed, same data order.

The later stages start from a finished ``make demo`` when ``$ALIT_HOME/demo`` holds one (its base VQ, distilled
tokenizer and token cache: representative inputs), else from the *fp32* result of the stage before (a short
chain whose prior row then scores a nearly constant token cache); either way the two sides of a stage differ
only in its own precision, and the note says which inputs were used. Whether ``precision: auto`` picks bf16 on this CPU is
:func:`tokenizer.core.hardware.cpu_bf16_pays`; this group is the evidence a stage's config keeps it or pins
fp32. Runs go under ``$ALIT_HOME/bench/demo_stages`` (deleted afterwards).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tokenizer.core.paths import alit_home, cache_dir

from .report import Report
from .timing import Settings

GROUP = "demo stages: bf16 autocast vs fp32 (same steps, same seed)"
STAGES = ("vq", "distill", "finetune", "prior")
METRIC = {"vq": "val_l1", "distill": "val_ce", "finetune": "val_l1", "prior": "bits_per_token"}
KEYS = tuple(k for s in STAGES for k in (f"demo_stage.{s}.bf16_speedup", f"demo_stage.{s}.{METRIC[s]}.fp32",
                                         f"demo_stage.{s}.{METRIC[s]}.bf16"))
CONFIGS = {"vq": "configs/tokenizer/vq_emoji_cpu.yaml", "distill": "configs/tokenizer/distill_emoji_cpu.yaml",
           "finetune": "configs/tokenizer/finetune_emoji_cpu.yaml", "prior": "configs/prior/maskgit_emoji_cpu.yaml"}


def _loop_overrides(steps: int, precision: str, run_dir: Path) -> list[str]:
    window = max(1, steps // 4)
    return [f"train.max_steps={steps}", f"train.precision={precision}", f"train.log_every={window}",
            f"train.eval_every={steps}", f"train.ckpt_every={steps}", "train.progress=false",
            "train.tensorboard=false", "train.warmup_steps=0" if steps < 20 else f"train.warmup_steps={steps // 5}",
            f"run_dir={run_dir}"]


def _rate(history: list[dict[str, float]]) -> float:
    """Median images/s of the logged windows after the first (which holds start-up and warm-up)."""
    rates = [h["images_per_s"] for h in history if "images_per_s" in h]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def _eval_metric(run_dir: Path, stage: str) -> float:
    """The stage's held-out metric at its last evaluation (from the run's metrics.jsonl)."""
    import json

    last: dict[str, Any] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            last = rec
    if stage == "vq":
        return float(last["val_l1"])
    key = "val_ce" if stage == "distill" else "val_l1"
    top = max(k for k in last if k.startswith(f"{key}/"))
    return float(last[top])


def _train_tokenizer_stage(stage: str, overrides: list[str]) -> tuple[float, Path]:
    import torch

    from tokenizer.core.config import load_config
    from tokenizer.core.data import build_dataset, scan_source
    from tokenizer.core.trainer import Trainer
    from tokenizer.train import TASKS, TokenizerRunConfig, validation_batch

    cfg = load_config(TokenizerRunConfig, CONFIGS[stage], overrides)
    source = scan_source(cfg.data)
    train_set = build_dataset(cfg.data, "train", seed=cfg.train.seed, source=source)
    torch.manual_seed(cfg.train.seed)
    task = TASKS[cfg.stage](cfg, validation_batch(cfg, source))
    trainer = Trainer(cfg.train, cfg.resolved_run_dir(), task, train_set, run_config=cfg)
    trainer.fit()
    return _rate(trainer.history), cfg.resolved_run_dir()


def bench_demo_stages(settings: Settings, report: Report) -> None:
    """Every demo training stage in fp32 and bf16 (see the module docstring)."""
    from generator.cache import build_token_cache
    from tokenizer.core.config import load_config
    from tokenizer.core.data import DataConfig

    steps = settings.pick(60, 4)
    data = ["data.max_images=160"] if settings.quick else []
    root = Path(tempfile.mkdtemp(prefix="demo_stages-", dir=cache_dir("bench")))
    demo = alit_home() / "demo"
    finished = not settings.quick and all((demo / p).exists() for p in (
        "vq/final/manifest.json", "distill/final/manifest.json", "tokens/manifest.json"))
    source = f"inputs from the finished demo {demo}" if finished else "inputs from the fp32 sides of this chain"
    try:
        base, init = ((demo / "vq" / "final", demo / "distill" / "final") if finished
                      else (root / "vq-fp32" / "final", root / "distill-fp32" / "final"))
        inputs: dict[str, list[str]] = {"vq": [], "distill": [f"base={base}"], "finetune": [f"init={init}"]}
        if settings.quick:  # the smoke test: tiny sides that still run every phase (GAN from step 2)
            inputs["vq"] += ["loss.gan_start_step=2"]
            inputs["finetune"] += ["loss.gan_start_step=2", "train.batch_size=4"]
        else:  # the discriminator phases run in the second half, as in the demo's later steps
            inputs["vq"] += [f"loss.gan_start_step={steps // 2}"]
            inputs["finetune"] += [f"loss.gan_start_step={steps // 2}"]
        for stage in ("vq", "distill", "finetune"):
            rates, metrics = {}, {}
            for precision in ("fp32", "bf16"):
                run_dir = root / f"{stage}-{precision}"
                rates[precision], _ = _train_tokenizer_stage(
                    stage, [*data, *inputs[stage], *_loop_overrides(steps, precision, run_dir)])
                metrics[precision] = _eval_metric(run_dir, stage)
            _record(report, stage, rates, metrics, steps, source)
        # the prior: a token cache of the fp32-finetuned tokenizer, then the MaskGIT prior both ways
        from generator.train import PriorRunConfig, train_prior

        data_cfg = load_config(DataConfig, None, [o.removeprefix("data.") for o in data] + ["source=emoji",
                                                                                           "resolution=64"])
        tokens = demo / "tokens" if finished else root / "tokens"
        if not finished:
            build_token_cache(root / "finetune-fp32" / "final", data_cfg, tokens, progress=False)
        rates, metrics = {}, {}
        for precision in ("fp32", "bf16"):
            run_dir = root / f"prior-{precision}"
            cfg = load_config(PriorRunConfig, CONFIGS["prior"],
                              [f"tokens={tokens}", *_loop_overrides(steps, precision, run_dir)])
            result = train_prior(cfg)
            rates[precision] = _rate(_history(run_dir))
            metrics[precision] = float(result.bits_per_token["bits_per_token"])
        _record(report, "prior", rates, metrics, steps, source)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _history(run_dir: Path) -> list[dict[str, float]]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("kind", "train") == "train"]


def _record(report: Report, stage: str, rates: dict[str, float], metrics: dict[str, float], steps: int,
            source: str) -> None:
    name = METRIC[stage]
    speedup = rates["bf16"] / rates["fp32"]
    rel = (metrics["bf16"] - metrics["fp32"]) / abs(metrics["fp32"]) if metrics["fp32"] else 0.0
    report.add(f"demo_stage.{stage}.bf16_speedup", speedup, "x", GROUP,
               f"demo {stage} stage ({CONFIGS[stage]}): bf16 images/s / fp32 images/s over {steps} steps",
               note=f"{rates['fp32']:.1f} vs {rates['bf16']:.1f} img/s; held-out {name} {metrics['fp32']:.4f} (fp32) "
                    f"vs {metrics['bf16']:.4f} (bf16), {100 * rel:+.1f}%; {source if stage != 'vq' else 'from scratch'}",
               fp32_images_per_s=rates["fp32"], bf16_images_per_s=rates["bf16"], steps=steps)
    for precision in ("fp32", "bf16"):
        report.add(f"demo_stage.{stage}.{name}.{precision}", metrics[precision], "abs", GROUP,
                   f"demo {stage} stage: held-out {name} after {steps} steps in {precision} (same seed)")

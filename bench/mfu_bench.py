"""Model FLOP utilisation of the stack's steps, and the GPU-hours of the public recipes derived from it.

Each step is the project's own code, timed under bf16 autocast (as the GPU recipes train):

- ``distill``: one ``DistillTask`` step (base frozen, every iteration supervised, CE + code MSE + VQ).
- ``finetune``: a cycle of ``FinetuneTask`` steps t = 0..n-1 (t+1 iterations each; L1 + LPIPS + adaptive
  hinge GAN with the discriminator update, i.e. the GAN-on phase, 90% of the public recipe's steps).
- ``maskgit`` / ``ar``: one prior training step on a batch of mixed budgets drawn uniformly (MaskGIT packed
  as its ImageNet recipe trains).
- ``tokenize``: ``encode_budgets`` (one encoder pass gives every budget, what ``alit tokenize`` runs) and
  ``encode(x, b)`` per budget, images/s.

FLOPs are counted by ``torch.utils.flop_counter`` on one call with attention on the SDPA path (the counter
knows SDPA's kernels, not xformers'; the arithmetic is the same); MFU = counted FLOPs / step time / the dense
bf16 matmul peak measured on the same device (``bench.hardware.matmul_peak``). Scales (:data:`SCALES`):
``public`` = the sizes of ``configs/*/*imagenet_gpu.yaml`` (one GPU; ``scripts/gpu_check.py`` runs it),
``tiny`` = the CPU demo sizes (what the CPU bench and the tests run; the same code paths).

:func:`recipe_hours` turns images/s into GPU-hours of the public recipes, reading steps and batches from the
configs; every assumption is a line of the printed table.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode, _FlopCounterMode

from generator.tasks import LOSS_FNS, build_prior
from tokenizer.alit import ALITTokenizer
from tokenizer.core import attention as attention_module
from tokenizer.core.data import DataConfig
from tokenizer.core.weights import WeightsNotFound
from tokenizer.losses import ReconstructionLossConfig
from tokenizer.train import DistillTask, FinetuneTask, Stage, TokenizerRunConfig
from tokenizer.vq import BaseVQ, base_vq_config

from .hardware import matmul_peak
from .models import PRIOR_SHAPE
from .report import Report
from .timing import Settings, _custom_flop_formulas, measure

ROOT = Path(__file__).resolve().parents[1]
GROUP_MFU = "MFU: steps vs measured bf16 matmul peak"
KINDS = ("distill", "finetune", "maskgit", "ar")
IMAGENET100_TRAIN = 126_689  # ImageNet-100 (the CMC class list) training images
IMAGENET1K_TRAIN = 1_281_167  # ILSVRC-2012 training images


@dataclass(frozen=True)
class Scale:
    """Model sizes and per-step batches of one measurement."""

    name: str
    base: str  # BaseVQ size (tokenizer.vq)
    alit: str  # ALIT size (tokenizer.alit)
    resolution: int
    prior: dict[str, str]  # kind -> prior size
    prior_fields: dict[str, Any]  # token layout of the priors (codebook, tokens per iteration, budgets, classes)
    batch: dict[str, int]  # kind -> per-step batch (images or sequences)
    discriminators: int  # the finetune stage's discriminators (one per iteration in the public recipe)
    what: str = ""


SCALES: dict[str, Scale] = {
    "public": Scale("public", "maskgit", "small", 256, {"maskgit": "maskgit_b", "ar": "ar_b"},
                    {"codebook_size": 4096, "tokens_per_iter": 32, "num_budgets": 8, "num_classes": 1000},
                    {"distill": 32, "finetune": 12, "maskgit": 256, "ar": 256, "tokenize": 64}, 8,
                    "public sizes: BaseVQ maskgit (256 px, 16x16), ALIT small (W1024, 8 layers, 32 x 8 tokens), "
                    "MaskGIT maskgit_b (W768, 24 layers) / AR ar_b (W768, 12 layers) over 4096 codes, 1000 classes; "
                    "the recipes' per-GPU batches"),
    "tiny": Scale("tiny", "tiny", "small_cpu", 64, {"maskgit": "tiny", "ar": "tiny"},
                  {k: PRIOR_SHAPE[k] for k in ("codebook_size", "tokens_per_iter", "num_budgets", "num_classes")},
                  {"distill": 4, "finetune": 2, "maskgit": 16, "ar": 16, "tokenize": 4}, 2,
                  "CPU demo sizes: BaseVQ tiny (64 px), ALIT small_cpu, tiny priors (8 x 4 tokens)"),
}


@dataclass
class StepCost:
    """One measured step: what ran, its FLOPs and time, and the utilisation they give."""

    kind: str
    what: str
    items: int  # images (or sequences) per timed call
    flops: int  # counted per timed call
    seconds: float  # median seconds per timed call
    peak_gflops: float  # bf16 matmul peak of the device
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds

    @property
    def achieved_tflops(self) -> float:
        return self.flops / self.seconds / 1e12

    @property
    def mfu(self) -> float:
        return self.flops / self.seconds / 1e9 / self.peak_gflops

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "what": self.what, "items": self.items, "flops": self.flops,
                "seconds": self.seconds, "items_per_s": self.items_per_s, "achieved_tflops": self.achieved_tflops,
                "peak_gflops": self.peak_gflops, "mfu": self.mfu, **self.extra}


@contextmanager
def sdpa_only() -> Iterator[None]:
    """Attention on the SDPA path while FLOPs are counted (torch's counter has no formula for xformers)."""
    with mock.patch.object(attention_module, "xformers_usable", lambda device: False):
        yield


class _GlobalFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` without its per-module tracker: the tracker's autograd hooks fail on the finetune
    step ("Expected gradient function to be set"), and only the total is wanted here."""

    def __enter__(self) -> _GlobalFlopCounter:
        self.flop_counts.clear()
        self.mode = _FlopCounterMode(self)  # counts into self.flop_counts['Global'] (the idle tracker's parent)
        self.mode.__enter__()
        return self

    def __exit__(self, *args: Any) -> Any:
        out = self.mode.__exit__(*args)
        self.mode = None
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (as ``bench.timing.count_flops``, without per-module attribution)."""
    with _GlobalFlopCounter(display=False, custom_mapping=_custom_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _run_phases(phases: Iterator[Any], opts: dict[str, torch.optim.Optimizer], device: torch.device,
                clip: float) -> None:
    """Drive a task's ``train_step`` as the trainer does: each phase's loss under autocast, its backward and
    its optimizer outside, then the task's after-update code."""
    while True:
        with _autocast(device):
            phase = next(phases, None)
        if phase is None:
            return
        opt = opts[phase.optimizer]
        opt.zero_grad(set_to_none=True)
        phase.loss.backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()


def _images(n: int, resolution: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1).to(device)


def _tokenizer_tasks(scale: Scale, device: torch.device, tmp: Path) -> tuple[DistillTask, FinetuneTask, str]:
    """The project's distill and finetune tasks at ``scale`` (untrained weights; LPIPS from the offline
    resolver, or off with a note when its weights are not found)."""
    torch.manual_seed(0)
    base = BaseVQ(base_vq_config(scale.base))
    base.save_pretrained(tmp / "base")
    data = DataConfig(resolution=scale.resolution)
    val = _images(1, scale.resolution, torch.device("cpu"))
    distill = DistillTask(TokenizerRunConfig(stage=Stage.distill, base=str(tmp / "base"), alit_size=scale.alit,
                                             data=data, val_images=1), val)
    distill.model.save_pretrained(tmp / "init")
    loss = dict(perceptual_weight=1.0, gan_weight=0.2, gan_start_step=0, num_discriminators=scale.discriminators,
                disc_layers=3)
    note = "L1 + LPIPS + GAN"
    try:
        finetune = FinetuneTask(TokenizerRunConfig(stage=Stage.finetune, init=str(tmp / "init"), data=data,
                                                   loss=ReconstructionLossConfig(**loss), val_images=1), val)
    except WeightsNotFound:
        loss["perceptual_weight"] = 0.0
        note = "L1 + GAN (LPIPS weights not found, see alit weights: perceptual FLOPs missing)"
        finetune = FinetuneTask(TokenizerRunConfig(stage=Stage.finetune, init=str(tmp / "init"), data=data,
                                                   loss=ReconstructionLossConfig(**loss), val_images=1), val)
    for task in (distill, finetune):
        task.model.to(device).train()
        task.setup(device)
    distill.model.base.eval()
    return distill, finetune, note


def _prior_batch(model: Any, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    from .models import mixed_budget_batch

    return mixed_budget_batch(model, batch, seed=0, device=device)


def _cost(kind: str, what: str, items: int, fn: Callable[[], Any], settings: Settings, peak: float,
          **extra: Any) -> StepCost:
    if not settings.quick:
        fn()  # warm-up outside the counter (lazy allocations, cuDNN autotuning)
    with sdpa_only():
        flops = count_flops(fn)
    tim = measure(fn, settings)
    return StepCost(kind, what, items, flops, tim.median, peak, {**extra, "timing": tim.to_json()})


def measure_steps(device: torch.device | str, scale: str, settings: Settings | None = None,
                  kinds: tuple[str, ...] = KINDS, peak_gflops: float | None = None) -> dict[str, Any]:
    """Measure the steps ``kinds`` (and tokenization) at ``scale`` on ``device``; returns
    ``{"peak_bf16_gflops", "scale", "steps": {kind: StepCost}, "tokenize": {...}}``."""
    device = torch.device(device)
    s = SCALES[scale]
    if settings is not None and settings.quick:  # smoke-test sizes: a quarter of the batches, one finetune step
        s = replace(s, batch={k: max(1, v // 4) for k, v in s.batch.items()})
    settings = settings or Settings(device=str(device), repeats=5, min_repeats=3, max_seconds=10.0, warmup=0)
    peak = peak_gflops if peak_gflops is not None else matmul_peak(settings)["bf16"]["gflops"]
    steps: dict[str, StepCost] = {}
    errors: dict[str, str] = {}
    out: dict[str, Any] = {"peak_bf16_gflops": peak, "scale": scale, "scale_what": s.what, "steps": steps,
                           "errors": errors, "prior_sizes": dict(s.prior),
                           "budgets": [s.prior_fields["tokens_per_iter"] * (i + 1)
                                       for i in range(s.prior_fields["num_budgets"])]}

    def attempt(kind: str, fn: Callable[[], StepCost]) -> None:
        """One kind's measurement; a failure (out of memory at a recipe's batch...) is recorded, not raised."""
        try:
            steps[kind] = fn()
        except Exception as e:
            errors[kind] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if device.type == "cuda":
            torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory(prefix="alit-mfu-") as tmp:
        distill, finetune, ft_note = _tokenizer_tasks(s, device, Path(tmp))
    if "distill" in kinds:
        opt = torch.optim.AdamW(distill.model.alit.parameters(), lr=1e-5)
        x = _images(s.batch["distill"], s.resolution, device)
        attempt("distill", lambda: _cost(
            "distill", f"distill step, ALIT {s.alit} over BaseVQ {s.base}, batch {len(x)}, bf16 autocast", len(x),
            lambda: _run_phases(distill.train_step((x,), 0), {"model": opt}, device, 3.0), settings, peak))
    if "finetune" in kinds:
        opts = {"model": torch.optim.AdamW(finetune.model.parameters(), lr=1e-5),
                "disc": torch.optim.AdamW(finetune.loss.discriminator_parameters(), lr=1e-5)}
        x = _images(s.batch["finetune"], s.resolution, device)
        n = 1 if settings.quick else finetune.model.config.num_iters

        def cycle() -> None:  # t = 0..n-1, each with its discriminator update (step >= gan_start_step)
            for step in range(n):
                _run_phases(finetune.train_step((x,), step), opts, device, 3.0)

        attempt("finetune", lambda: _cost("finetune", f"finetune cycle t=0..{n - 1}, batch {len(x)}, {ft_note}",
                                          n * len(x), cycle, settings, peak, steps_per_call=n))
    for kind in ("maskgit", "ar"):
        if kind not in kinds:
            continue
        torch.manual_seed(0)
        model = build_prior(kind, s.prior[kind], **s.prior_fields).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids, lengths, classes = _prior_batch(model, s.batch[kind], device)
        packed = kind == "maskgit"

        def prior_step(model: Any = model, opt: torch.optim.Optimizer = opt, ids: torch.Tensor = ids,
                       lengths: torch.Tensor = lengths, classes: torch.Tensor = classes, kind: str = kind,
                       packed: bool = packed) -> None:
            with _autocast(device):
                loss = LOSS_FNS[kind](model, ids, lengths, classes, packed=packed).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        attempt(kind, lambda kind=kind, ids=ids, lengths=lengths, packed=packed, prior_step=prior_step: _cost(
            kind, f"{kind} {s.prior[kind]} step, batch {len(ids)} mixed budgets"
                  f"{' packed' if packed else ' padded'}, bf16 autocast", len(ids), prior_step,
            settings, peak, mean_tokens=float(lengths.float().mean())))
    out["tokenize"] = tokenize_rates(distill.model, s, device, settings, peak)
    return out


@torch.no_grad()
def tokenize_rates(tok: ALITTokenizer, scale: Scale, device: torch.device, settings: Settings,
                   peak: float) -> dict[str, Any]:
    """Images/s of ``encode_budgets`` (every budget from one pass) and of ``encode`` at each budget, bf16."""
    tok = tok.eval()
    x = _images(scale.batch["tokenize"], scale.resolution, device)

    def rate(fn: Callable[[], Any]) -> float:
        with _autocast(device):
            return len(x) / measure(fn, settings).median

    with _autocast(device):
        every = _cost("tokenize", f"encode_budgets, batch {len(x)}, bf16 autocast", len(x),
                      lambda: tok.encode_budgets(x), settings, peak)
    per_budget = {int(b): rate(lambda b=b: tok.encode(x, b)) for b in tok.budgets}
    return {"all_budgets": every.to_json(), "per_budget_images_per_s": per_budget}


# ============================================================================ GPU-hours of the public recipes
def _train(path: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / path).read_text())["train"]


def recipe_hours(result: dict[str, Any]) -> list[dict[str, Any]]:
    """GPU-hours of the public recipes from measured images/s (one GPU's rate x GPUs = linear scaling)."""
    steps, rows = result["steps"], []
    epochs_note = "the ImageNet-1K rows keep the ImageNet-100 recipe's epochs (its images x 1281167/126689)"
    for kind, path in (("distill", "configs/tokenizer/distill_imagenet_gpu.yaml"),
                       ("finetune", "configs/tokenizer/finetune_imagenet_gpu.yaml")):
        if kind not in steps:
            continue
        t = _train(path)
        images = t["max_steps"] * t["global_batch"]
        ips = steps[kind].items_per_s
        for data, factor in (("ImageNet-100", 1.0), ("ImageNet-1K", IMAGENET1K_TRAIN / IMAGENET100_TRAIN)):
            seen = images * factor
            rows.append({"recipe": f"tokenizer stage {1 if kind == 'distill' else 2} ({kind}), {data}",
                         "work": f"{seen / 1e6:.1f}M images ({seen / (IMAGENET100_TRAIN * factor):.0f} epochs)",
                         "rate": f"{ips:.1f} img/s", "gpu_hours": seen / ips / 3600,
                         "assumes": f"{path}: {t['max_steps']} steps x global batch {t['global_batch']}"
                                    + ("" if factor == 1 else f"; {epochs_note}")
                                    + ("; GAN-on step cost throughout (the first 10% skip the discriminator)"
                                       if kind == "finetune" else "")})
    tok = result["tokenize"]["all_budgets"]
    for data, n in (("ImageNet-100", IMAGENET100_TRAIN), ("ImageNet-1K", IMAGENET1K_TRAIN)):
        rows.append({"recipe": f"alit tokenize (every budget), {data}", "work": f"{n / 1e6:.2f}M images",
                     "rate": f"{tok['items_per_s']:.1f} img/s", "gpu_hours": n / tok["items_per_s"] / 3600,
                     "assumes": "one encode_budgets pass per training image (no hflip copies)"})
    if "maskgit" in steps:
        path = "configs/prior/maskgit_imagenet_gpu.yaml"
        t = _train(path)
        seqs = t["max_steps"] * t["global_batch"]
        sps = steps["maskgit"].items_per_s
        budgets = result["budgets"]
        rows.append({"recipe": f"MaskGIT prior ({result['prior_sizes']['maskgit']}), ImageNet-1K tokens",
                     "work": f"{seqs / 1e6:.0f}M sequences", "rate": f"{sps:.0f} seq/s", "gpu_hours": seqs / sps / 3600,
                     "assumes": f"{path}: {t['max_steps']} steps x global batch {t['global_batch']}, budgets "
                                f"uniform over {budgets[0]}..{budgets[-1]} (the measured batch)"})
    return rows


def render_hours(result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The cost table: measured steps (images/s, MFU) and the recipes' GPU-hours, with their assumptions."""
    lines = [f"cost model ({result['scale']}: {result['scale_what']})",
             f"bf16 dense matmul peak measured on this device: {result['peak_bf16_gflops'] / 1e3:.1f} TFLOP/s", "",
             "| step | items/s | TFLOP/s | MFU (bf16 peak) |", "|---|---|---|---|"]
    for c in result["steps"].values():
        lines.append(f"| {c.what} | {c.items_per_s:.1f} | {c.achieved_tflops:.2f} | {100 * c.mfu:.1f}% |")
    tok = result["tokenize"]
    lines.append(f"| {tok['all_budgets']['what']} | {tok['all_budgets']['items_per_s']:.1f} | "
                 f"{tok['all_budgets']['achieved_tflops']:.2f} | {100 * tok['all_budgets']['mfu']:.1f}% |")
    lines.append("")
    lines.append("encode(x, b) images/s: " + ", ".join(f"{b}: {r:.1f}"
                                                       for b, r in tok["per_budget_images_per_s"].items()))
    for kind, err in result.get("errors", {}).items():
        lines.append(f"| {kind}: FAILED ({err}) | | | |")
    lines += ["", "| recipe | work | rate (1 device) | GPU-hours | 8-GPU days | assumes |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['work']} | {r['rate']} | {r['gpu_hours']:.3g} | "
                     f"{r['gpu_hours'] / 8 / 24:.3g} | {r['assumes']} |")
    lines.append("GPU-hours = work / the one-GPU rate above; several GPUs are assumed to scale linearly "
                 "(DDP, no data-loading stall); bf16 autocast as the recipes train; untrained weights (same FLOPs).")
    return "\n".join(lines)


# ============================================================================ the bench rows
def bench_mfu(settings: Settings, report: Report) -> None:
    """Bench rows ``mfu.<kind>.bf16``: each step's achieved FLOP/s as a fraction of the bf16 matmul peak
    (public sizes on CUDA, the CPU demo sizes elsewhere), and ``mfu.tokenize.images_per_s``."""
    dev = settings.torch_device
    scale = "public" if dev.type == "cuda" and not settings.quick else "tiny"
    result = measure_steps(dev, scale, settings)
    for kind, c in result["steps"].items():
        report.add(f"mfu.{kind}.bf16", c.mfu, "frac", GROUP_MFU, f"{c.what}: achieved / bf16 matmul peak",
                   note=f"{c.achieved_tflops * 1e3:.1f} of {c.peak_gflops:.0f} GFLOP/s, {c.items_per_s:.1f} items/s",
                   **{k: v for k, v in c.to_json().items() if k not in ("what", "mfu")})
    tok = result["tokenize"]["all_budgets"]
    report.add("mfu.tokenize.images_per_s", tok["items_per_s"], "img/s", GROUP_MFU,
               f"{tok['what']} ({scale} sizes)", note=f"{100 * tok['mfu']:.1f}% of the bf16 peak",
               per_budget=result["tokenize"]["per_budget_images_per_s"])


KEYS = (*(f"mfu.{k}.bf16" for k in KINDS), "mfu.tokenize.images_per_s")

"""Training stages of stage one, as Tasks of the one training loop (``tokenizer.core.trainer``).

- ``vq``: the base 2D tokenizer from scratch: L1 + LPIPS + adaptively weighted hinge GAN + VQ loss.
- ``distill``: ALIT latent distillation, base frozen: per-iteration cross-entropy on the base indices
  (iteration weights), MSE between soft and true base codes, VQ loss. All iterations are supervised
  in one recurrent pass (iteration t's loss reads the state after t+1 iterations).
- ``finetune``: everything trainable; each step supervises one iteration t (cycling) and runs only
  t+1 encoder iterations: L1 + LPIPS + adaptively weighted GAN (one discriminator per iteration,
  delayed start) + VQ loss. The discriminators and their optimizer belong to this task, never to the
  tokenizer's optimizer.

Entry point: ``alit train tokenizer --config configs/tokenizer/<stage>_emoji_cpu.yaml [key=value ...]``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .alit import ALIT_SIZES, ALITConfig, ALITTokenizer
from .bases import base_config_class, base_sizes, build_base, load_base
from .core.config import check_choice, check_overrides
from .core.data import DataConfig, ImageDataset, build_dataset, scan_source
from .core.images import save_grid
from .core.paths import runs_dir
from .core.trainer import Phase, TrainConfig, Trainer
from .losses import ReconstructionLoss, ReconstructionLossConfig
from .vq import codebook_stats

PUBLIC_ITER_WEIGHTS = [2.5, 2.0, 1.5, 1.25, 1.0, 1.0, 1.0, 1.0]
# the ALIT fields ALITTokenizer.build copies from the base tokenizer: not overridable
BASE_FIELDS = ("patch_size", "base_grid", "base_code_dim", "base_codebook_size")


class Stage(Enum):
    """Which stage-one model a run trains."""

    vq = "vq"
    distill = "distill"
    finetune = "finetune"


@dataclass
class DistillConfig:
    """Loss weights of the distillation stage (alit.md, stage 1)."""

    iter_weights: list[float] = field(default_factory=lambda: list(PUBLIC_ITER_WEIGHTS))  # CE weight of iteration t (missing = 1.0)
    code_mse_weight: float = 1.0  # MSE(softmax(logits) @ base codebook, true base codes)

    def weight(self, t: int) -> float:
        return self.iter_weights[t] if t < len(self.iter_weights) else 1.0


@dataclass
class TokenizerRunConfig:
    """A stage-one training run: data, loop, model sizes, losses, and where its inputs come from."""

    stage: Stage = Stage.distill  # vq | distill | finetune
    name: str = "tokenizer"  # run name; the run directory defaults to $ALIT_RUNS/<name>
    run_dir: str | None = None  # explicit run directory (resumed if it holds checkpoints)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vq_size: str = "tiny"  # stage vq: registered base size (tokenizer.vq.BASE_VQ_SIZES, tokenizer.vqgan.MAGE_VQGAN_SIZES)
    vq: dict[str, Any] = field(default_factory=dict)  # stage vq: overrides of that size's fields
    alit_size: str = "tiny"  # stage distill: registered ALIT size (tokenizer.alit.ALIT_SIZES)
    alit: dict[str, Any] = field(default_factory=dict)  # stage distill: overrides of that size's fields
    base: str | None = None  # stage distill: directory of a trained base VQ (a vq run's final/)
    init: str | None = None  # stage finetune: directory of a distilled tokenizer (a distill run's final/)
    loss: ReconstructionLossConfig = field(default_factory=ReconstructionLossConfig)  # vq and finetune
    distill: DistillConfig = field(default_factory=DistillConfig)
    vq_loss_weight: float = 1.0  # weight of the quantizers' codebook + commitment losses
    lpips_weights: str | None = None  # explicit LPIPS weights file (else the offline resolver)
    val_images: int = 16  # fixed validation batch for the per-budget L1 and the final grid

    def __post_init__(self) -> None:
        if self.stage == Stage.distill and not self.base:
            raise ValueError("stage distill needs base=<directory of a trained base VQ> (a vq run's final/)")
        if self.stage == Stage.finetune and not self.init:
            raise ValueError("stage finetune needs init=<directory of a distilled tokenizer> "
                             "(a distill run's final/)")
        if self.val_images < 1:
            raise ValueError(f"val_images must be >= 1, got {self.val_images}")
        check_choice("vq_size", self.vq_size, base_sizes())
        check_overrides("vq", base_config_class(self.vq_size), self.vq, f"vq_size={self.vq_size}",
                        fixed={"resolution": "data.resolution"})
        check_choice("alit_size", self.alit_size, ALIT_SIZES)
        check_overrides("alit", ALITConfig, self.alit, f"alit_size={self.alit_size}",
                        fixed=dict.fromkeys(BASE_FIELDS, "the base tokenizer (base=...)"))

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else runs_dir() / self.name


def _perceptual(cfg: TokenizerRunConfig) -> nn.Module | None:
    if cfg.loss.perceptual_weight <= 0:
        return None
    from .lpips import LPIPS

    return LPIPS(cfg.lpips_weights)


def l1_01(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in [0, 1] pixel units of two batches in [-1, 1], per image ``(B,)``."""
    return (a.float() - b.float()).abs().flatten(1).mean(1) / 2


# ============================================================================ tasks
class _StageTask:
    """Shared parts of the stage-one tasks: validation batch, device move, export."""

    def __init__(self, cfg: TokenizerRunConfig, val_images: torch.Tensor) -> None:
        self.cfg = cfg
        self.val_images = val_images  # (V, 3, R, R) in [-1, 1]
        self.extra: list[nn.Module] = []  # modules that follow the device but are not checkpointed

    def setup(self, device: torch.device) -> None:
        self.val_images = self.val_images.to(device)
        for m in self.extra:
            m.to(device)

    def export(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)


class _GANStageTask(_StageTask):
    """A stage trained against discriminators: the model's optimizer and the discriminators' own."""

    model: nn.Module
    loss: ReconstructionLoss

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "disc": self.loss.discriminators}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.parameters()), "disc": self.loss.discriminator_parameters()}


class VQTask(_GANStageTask):
    """Base 2D VQ tokenizer from scratch."""

    def __init__(self, cfg: TokenizerRunConfig, val_images: torch.Tensor) -> None:
        super().__init__(cfg, val_images)
        self.model = build_base(cfg.vq_size, resolution=cfg.data.resolution, **cfg.vq)
        self.loss = ReconstructionLoss(cfg.loss, _perceptual(cfg))
        self.extra = [self.loss]
        self.lr_scales = {"disc": cfg.loss.disc_lr_factor}

    def train_step(self, batch: Any, step: int) -> Iterator[Phase]:
        images = batch[0]
        out = self.model(images)
        g_loss, logs = self.loss.generator_loss(images, out.recon, step, last_layer=self.model.last_layer)
        logs["vq"] = out.vq_loss.detach()
        yield Phase("model", g_loss + self.cfg.vq_loss_weight * out.vq_loss, logs)
        if self.loss.gan_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(images, out.recon.detach(), step)
            yield Phase("disc", d_loss, d_logs)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        model.eval()
        out = model(self.val_images)
        stats = codebook_stats(out.indices, model.codebook_size)
        return {"val_l1": float(l1_01(out.recon.clamp(-1, 1), self.val_images).mean()),
                "codebook_usage": stats["usage"], "codebook_perplexity": stats["perplexity"]}


class DistillTask(_StageTask):
    """ALIT latent distillation with the base tokenizer frozen."""

    def __init__(self, cfg: TokenizerRunConfig, val_images: torch.Tensor) -> None:
        super().__init__(cfg, val_images)
        base = load_base(cfg.base).eval().requires_grad_(False)
        self.model = ALITTokenizer.build(base, cfg.alit_size, image_size=cfg.data.resolution, **cfg.alit)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.alit.parameters())}

    def train_step(self, batch: Any, step: int) -> Iterator[Phase]:
        images = batch[0]
        tok, base = self.model, self.model.base
        base.eval()
        with torch.no_grad():
            features = base.encode_features(images)  # (B, Cb, G, G)
            q = base.quantize(features)
            targets = q.indices.flatten(1)  # (B, N)
            true_codes = q.codes.float()  # (B, Cb, G, G)
        n = tok.config.num_iters
        out = tok.alit(images, features, targets=targets, supervise=list(range(n)))
        total = images.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        for it in out.iterations:
            ce = F.cross_entropy(it.logits.float().transpose(1, 2), targets)  # logits (B, N, Kb) -> (B, Kb, N)
            mse = F.mse_loss(tok.soft_codes(it.logits.float()), true_codes)
            total = total + self.cfg.distill.weight(it.iteration) * ce \
                + self.cfg.distill.code_mse_weight * mse + self.cfg.vq_loss_weight * it.vq_loss
            logs[f"ce/iter{it.iteration}"] = ce.detach()
            logs[f"acc/iter{it.iteration}"] = (it.logits.argmax(-1) == targets).float().mean().detach()
        logs["code_mse/last"] = mse.detach()
        logs["vq/last"] = out.iterations[-1].vq_loss.detach()
        yield Phase("model", total, logs)
        tok.alit.quantize.restart_dead_codes()  # after the update, outside any graph

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return evaluate_budgets(model, self.val_images)


class FinetuneTask(_GANStageTask):
    """Full finetuning with reconstruction, perceptual and GAN losses; one iteration per step."""

    def __init__(self, cfg: TokenizerRunConfig, val_images: torch.Tensor) -> None:
        super().__init__(cfg, val_images)
        self.model = ALITTokenizer.from_pretrained(cfg.init)
        self.model.requires_grad_(True)
        self.loss = ReconstructionLoss(cfg.loss, _perceptual(cfg))
        self.extra = [self.loss]
        self.lr_scales = {"disc": cfg.loss.disc_lr_factor}

    def iteration_at(self, step: int) -> int:
        """The iteration supervised at ``step`` (cycling 0, 1, ..., n-1)."""
        return step % self.model.config.num_iters

    def train_step(self, batch: Any, step: int) -> Iterator[Phase]:
        images = batch[0]
        t = self.iteration_at(step)
        out = self.model(images, supervise=[t])  # runs exactly t+1 encoder iterations
        it = out.at(t)
        recon = self.model.logits_to_images(it.logits)
        d = t % self.cfg.loss.num_discriminators
        g_loss, logs = self.loss.generator_loss(images, recon, step, last_layer=self.model.base.last_layer,
                                                disc_index=d)
        logs = {f"{k}/iter{t}" if k in ("l1", "perceptual") else k: v for k, v in logs.items()}
        logs["vq"] = it.vq_loss.detach()
        yield Phase("model", g_loss + self.cfg.vq_loss_weight * it.vq_loss, logs)
        self.model.alit.quantize.restart_dead_codes()  # after the update, outside any graph
        if self.loss.gan_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(images, recon.detach(), step, disc_index=d)
            yield Phase("disc", d_loss, d_logs)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return evaluate_budgets(model, self.val_images)


@torch.no_grad()
def evaluate_budgets(model: ALITTokenizer, images: torch.Tensor) -> dict[str, float]:
    """Reconstruction L1 ([0, 1] units) and cross-entropy on the base indices (nats) at every budget, and
    codebook use of the largest budget's ids."""
    model.eval()
    metrics: dict[str, float] = {}
    ids = None
    targets = model.features_and_targets(images)[1]  # (V, N) the base indices ALIT predicts
    for budget in model.budgets:
        ids = model.encode(images, budget)
        logits = model.decode_logits(ids)  # (V, N, Kb): one decoder pass for both metrics
        recon = model.logits_to_images(logits).float().clamp(-1, 1)  # what decode(ids) returns
        metrics[f"val_l1/{budget:04d}"] = float(l1_01(recon, images).mean())
        metrics[f"val_ce/{budget:04d}"] = float(F.cross_entropy(logits.float().transpose(1, 2), targets))
    stats = codebook_stats(ids, model.codebook_size)
    metrics.update({"codebook_usage": stats["usage"], "codebook_perplexity": stats["perplexity"]})
    return metrics


TASKS = {Stage.vq: VQTask, Stage.distill: DistillTask, Stage.finetune: FinetuneTask}


# ============================================================================ running a stage
@dataclass
class TrainResult:
    """What a finished stage-one run leaves behind."""

    run_dir: Path
    step: int
    metrics: dict[str, float]  # the last logged training metrics

    @property
    def final_dir(self) -> Path:
        return self.run_dir / "final"


def validation_batch(cfg: TokenizerRunConfig, source: Any) -> torch.Tensor:
    """The fixed validation images of a run (the first ``val_images`` of the val split)."""
    val = build_dataset(cfg.data, "val", seed=cfg.train.seed, source=source)
    n = min(cfg.val_images, len(val))
    return torch.stack([val[i][0] for i in range(n)])  # (V, 3, R, R)


def train_tokenizer(cfg: TokenizerRunConfig) -> TrainResult:
    """Train (or resume) one stage-one run; writes config, metrics, checkpoints, ``final/`` and a grid."""
    run_dir = cfg.resolved_run_dir()
    source = scan_source(cfg.data)
    train_set: ImageDataset = build_dataset(cfg.data, "train", seed=cfg.train.seed, source=source)
    print(f"[train {cfg.stage.value}] {train_set.summary()}", file=sys.stderr)
    torch.manual_seed(cfg.train.seed)  # model initialisation
    task = TASKS[cfg.stage](cfg, validation_batch(cfg, source))
    trainer = Trainer(cfg.train, run_dir, task, train_set, run_config=cfg)
    last = trainer.fit()  # raises Preempted (after checkpointing) when stopped early
    if trainer.dist.is_main:
        model = type(task.model).from_pretrained(run_dir / "final")
        write_reconstruction_grid(model, task.val_images.cpu()[:8], run_dir / "reconstructions.png")
    return TrainResult(run_dir, trainer.step, last)


@torch.no_grad()
def write_reconstruction_grid(model: nn.Module, images: torch.Tensor, path: Path) -> Path:
    """Rows = images; columns = the input then each budget's reconstruction (base VQ: one column)."""
    model.eval()
    columns = [images]
    if isinstance(model, ALITTokenizer):
        columns += [model.decode(model.encode(images, b)) for b in model.budgets]
    else:
        columns.append(model(images).recon.clamp(-1, 1))
    grid = torch.stack(columns, dim=1)  # (rows, cols, 3, R, R)
    return save_grid(grid, path)

"""The reconstruction loss shared by base-VQ training and ALIT finetuning: L1 + perceptual + GAN.

The trainer owns this module (and so the discriminator); models never see it, and loading a model
never builds it. Two phases per step, each with its own optimizer:

    generator:      loss, logs = rec.generator_loss(real, fake, step, last_layer=model.last_layer)
                    (+ the model's VQ loss)  -> optimizer over the MODEL's parameters only
    discriminator:  loss, logs = rec.discriminator_loss(real, fake.detach(), step)
                    -> optimizer over ``rec.discriminator_parameters()`` only

Two defects of the public ALIT code are avoided by construction:
- its stage-2 generator optimizer also held every discriminator parameter (defect 4). Here the
  generator optimizer must hold model parameters only, and in addition the generator loss runs the
  discriminator with *detached* parameters (``torch.func.functional_call``), so it accumulates no
  gradient into the discriminator at all: no stale gradient can leak into the discriminator step either.
  The discriminator step sees ``fake.detach()``, so it never reaches generator parameters.
- it fed LPIPS images in [0, 1] (defect 3). Here ``real`` and ``fake`` are in [-1, 1], the range
  LPIPS expects, and go to the perceptual network unchanged.

Images: (B, 3, H, W) float in [-1, 1]. Logs are detached 0-d tensors (the trainer reduces them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# ============================================================================ discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming-transformers layout): (B, C, H, W) -> (B, 1, h', w') real/fake logits.

    Conv(4, stride 2) + LeakyReLU, then ``n_layers - 1`` strided Conv-Norm-LeakyReLU blocks with
    doubling width (capped at 8x), one stride-1 block, and a stride-1 conv to one logit per patch.
    GroupNorm replaces taming's BatchNorm: no running statistics, so running the discriminator in the
    generator phase changes none of its state, and results do not depend on how batches are split.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm_groups: int = 32) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if channels % norm_groups:
            raise ValueError(f"channels={channels} must be a multiple of norm_groups={norm_groups}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution (70x70 receptive field at 3)
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(norm_groups, channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1, h', w') logits."""
        return self.main(images)


# ============================================================================ config


@dataclass
class ReconstructionLossConfig:
    """Weights and GAN schedule of :class:`ReconstructionLoss` (ALIT stage 2 in the comments)."""

    l1_weight: float = 1.0  # weight of mean |real - fake|
    perceptual_weight: float = 1.0  # weight of the mean perceptual (LPIPS) distance; 0 = no perceptual net
    gan_weight: float = 0.2  # GAN weight from gan_start_step on (ALIT: 0.2 from epoch 20)
    gan_start_step: int = 0  # steps with no GAN at all, discriminator not even run (ALIT: 20 epochs)
    gan_late_weight: float = 0.8  # GAN weight from gan_late_step on (ALIT: 0.8 after epoch 100)
    gan_late_step: int | None = None  # step where gan_late_weight takes over; None = never
    adaptive_weight: bool = True  # VQGAN rule: scale the GAN term by |grad nll| / |grad gan| at last_layer
    adaptive_weight_max: float = 1e4  # clamp of the adaptive weight
    hinge: bool = True  # hinge GAN loss; False = non-saturating (softplus) loss
    disc_lr_factor: float = 1.0  # discriminator lr = generator lr * this (read by the trainer)
    disc_channels: int = 64  # width of the first discriminator layer
    disc_layers: int = 3  # strided blocks of the PatchGAN
    disc_norm_groups: int = 32  # GroupNorm groups in the discriminator
    num_discriminators: int = 1  # independent discriminators (ALIT stage 2: one per iteration, 8)
    in_channels: int = 3  # image channels

    def __post_init__(self) -> None:
        for name in ("l1_weight", "perceptual_weight", "gan_weight", "gan_late_weight", "disc_lr_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.gan_start_step < 0:
            raise ValueError(f"gan_start_step must be >= 0, got {self.gan_start_step}")
        if self.gan_late_step is not None and self.gan_late_step < self.gan_start_step:
            raise ValueError(f"gan_late_step={self.gan_late_step} is before gan_start_step={self.gan_start_step}; "
                             "set it later or to None")
        if self.adaptive_weight_max <= 0:
            raise ValueError(f"adaptive_weight_max must be > 0, got {self.adaptive_weight_max}")
        if self.num_discriminators < 1:
            raise ValueError(f"num_discriminators must be >= 1, got {self.num_discriminators}")
        if self.disc_channels % self.disc_norm_groups:
            raise ValueError(f"disc_channels={self.disc_channels} must be a multiple of disc_norm_groups="
                             f"{self.disc_norm_groups}")

    def gan_weight_at(self, step: int) -> float:
        """The scheduled GAN weight at ``step``: 0, then ``gan_weight``, then ``gan_late_weight``."""
        if step < self.gan_start_step:
            return 0.0
        if self.gan_late_step is not None and step >= self.gan_late_step:
            return self.gan_late_weight
        return self.gan_weight


# ============================================================================ GAN losses


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator logistic loss: ``(mean softplus(-real) + mean softplus(fake)) / 2``."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_gan_weight(nll: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: ``|d nll / d W| / (|d gan / d W| + 1e-4)`` at the decoder's last layer W,
    clamped to [0, max_weight] and detached (a constant for the backward pass)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True, allow_unused=True)[0]
    gan_grad = torch.autograd.grad(gan, last_layer, retain_graph=True, allow_unused=True)[0]
    if nll_grad is None or gan_grad is None:
        raise ValueError("last_layer does not influence the losses; pass the decoder's output weight "
                         "(e.g. BaseVQ.last_layer) of the model that produced `fake`")
    weight = nll_grad.float().norm() / (gan_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# ============================================================================ loss module


class ReconstructionLoss(nn.Module):
    """L1 + perceptual + adaptively weighted GAN loss, with the discriminator(s) it trains.

    ``perceptual`` maps two (B, 3, H, W) batches in [-1, 1] to (B,) distances (e.g. ``LPIPS()``); it
    is frozen and always kept in eval mode. It is a submodule (it follows ``.to(device)``), so this
    module's ``state_dict`` holds it too: checkpoint ``discriminators.state_dict()`` instead.
    """

    def __init__(self, cfg: ReconstructionLossConfig, perceptual: nn.Module | None = None) -> None:
        super().__init__()
        if cfg.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 but no perceptual network given; pass "
                             "perceptual=LPIPS() (tokenizer.lpips) or set perceptual_weight=0")
        self.cfg = cfg
        self.perceptual = perceptual
        if perceptual is not None:
            perceptual.requires_grad_(False)
            perceptual.eval()
        self.discriminators = nn.ModuleList(
            PatchDiscriminator(cfg.in_channels, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm_groups)
            for _ in range(cfg.num_discriminators)
        )

    def train(self, mode: bool = True) -> ReconstructionLoss:
        """Switch the discriminators' mode; the perceptual network stays in eval mode."""
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """The parameters for the discriminator's own optimizer (never the generator's)."""
        return list(self.discriminators.parameters())

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms (and so the discriminator step) run at ``step``."""
        return self.cfg.gan_weight_at(step) > 0

    def _discriminator(self, index: int) -> PatchDiscriminator:
        if not 0 <= index < len(self.discriminators):
            raise ValueError(f"disc_index={index} out of range: the loss has {len(self.discriminators)} "
                             "discriminator(s) (ReconstructionLossConfig.num_discriminators)")
        return self.discriminators[index]

    @staticmethod
    def _check_pair(real: torch.Tensor, fake: torch.Tensor) -> None:
        if real.shape != fake.shape or real.dim() != 4:
            raise ValueError(f"real and fake must be (B, C, H, W) of one shape, got {tuple(real.shape)} and "
                             f"{tuple(fake.shape)}")

    def generator_loss(self, real: torch.Tensor, fake: torch.Tensor, step: int,
                       last_layer: nn.Parameter | None = None, disc_index: int = 0,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the model that produced ``fake`` from ``real`` (both in [-1, 1]).

        ``last_layer``: the decoder's output weight, for the adaptive GAN weight; with None (or under
        ``torch.no_grad``) the weight is 1. ``disc_index`` picks the discriminator (one per ALIT iteration).
        Before ``gan_start_step`` the GAN term is 0 and the discriminator is not run.
        """
        self._check_pair(real, fake)
        cfg = self.cfg
        zero = fake.new_zeros((), dtype=torch.float32)
        l1 = (fake - real).abs().mean()
        perceptual = self.perceptual(fake, real).mean() if cfg.perceptual_weight > 0 else zero
        nll = cfg.l1_weight * l1 + cfg.perceptual_weight * perceptual
        gan_weight = cfg.gan_weight_at(step)
        gan, adaptive = zero, zero
        if gan_weight > 0:
            disc = self._discriminator(disc_index)
            # Detached parameters: gradient reaches `fake` (the generator), never the discriminator.
            frozen = {name: p.detach() for name, p in disc.named_parameters()}
            logits_fake = functional_call(disc, frozen, (fake,))  # (B, 1, h', w')
            gan = -logits_fake.mean() if cfg.hinge else F.softplus(-logits_fake).mean()
            if cfg.adaptive_weight and last_layer is not None and torch.is_grad_enabled() and nll.requires_grad:
                adaptive = adaptive_gan_weight(nll, gan, last_layer, cfg.adaptive_weight_max)
            else:
                adaptive = torch.ones_like(zero)
        loss = nll + gan_weight * adaptive * gan
        logs = {"l1": l1, "perceptual": perceptual, "nll": nll, "gan_g": gan,
                "gan_weight": zero + gan_weight, "adaptive_weight": adaptive, "generator": loss}
        return loss, {k: v.detach().float() for k, v in logs.items()}

    def discriminator_loss(self, real: torch.Tensor, fake_detached: torch.Tensor, step: int,
                           disc_index: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator loss on ``real`` vs ``fake_detached`` (detached again here, to be safe).

        Before ``gan_start_step`` nothing runs and the loss is a constant 0 without a graph: skip the
        discriminator update when ``gan_active(step)`` is False.
        """
        self._check_pair(real, fake_detached)
        if not self.gan_active(step):
            zero = real.new_zeros((), dtype=torch.float32)
            return zero, {"discriminator": zero, "logits_real": zero, "logits_fake": zero}
        disc = self._discriminator(disc_index)
        logits_real = disc(real.detach())  # (B, 1, h', w')
        logits_fake = disc(fake_detached.detach())  # (B, 1, h', w')
        d_loss = hinge_d_loss if self.cfg.hinge else vanilla_d_loss
        loss = d_loss(logits_real.float(), logits_fake.float())
        logs = {"discriminator": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach().float() for k, v in logs.items()}

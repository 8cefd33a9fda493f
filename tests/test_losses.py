"""The reconstruction loss: GAN schedule, separation of generator and discriminator updates,
adaptive weight, hinge values, perceptual inputs in [-1, 1]."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenizer.losses import (
    PatchDiscriminator,
    ReconstructionLoss,
    ReconstructionLossConfig,
    adaptive_gan_weight,
    hinge_d_loss,
)


class StandInPerceptual(nn.Module):
    """LPIPS-shaped stand-in: frozen random conv features, (B,) distances; records what it was fed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.5))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append((x, y))
        return (self.conv(x) - self.conv(y)).square().mean(dim=(1, 2, 3))  # (B,)


class Generator(nn.Module):
    """A tiny image-to-image model whose last layer feeds the adaptive weight."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(self.body(x)))


class CountCalls:
    """Counts forward calls of every discriminator of a loss module."""

    def __init__(self, loss: ReconstructionLoss) -> None:
        self.n = 0
        for d in loss.discriminators:
            d.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.n += 1


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _cfg(**kw: object) -> ReconstructionLossConfig:
    base = {"gan_start_step": 10, "disc_channels": 16, "disc_norm_groups": 8}
    return ReconstructionLossConfig(**{**base, **kw})


def _clone(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


# ------------------------------------------------------------------------------------------ schedule


def test_gan_schedule_and_config_checks() -> None:
    cfg = ReconstructionLossConfig(gan_start_step=100, gan_weight=0.2, gan_late_step=500, gan_late_weight=0.8)
    assert [cfg.gan_weight_at(s) for s in (0, 99, 100, 499, 500, 10_000)] == [0, 0, 0.2, 0.2, 0.8, 0.8]
    assert ReconstructionLossConfig(gan_start_step=5).gan_weight_at(10**9) == 0.2  # no late step
    with pytest.raises(ValueError, match="gan_late_step"):
        ReconstructionLossConfig(gan_start_step=100, gan_late_step=50)
    with pytest.raises(ValueError, match="perceptual"):
        ReconstructionLoss(ReconstructionLossConfig(), perceptual=None)


def test_patch_discriminator_shapes() -> None:
    d = PatchDiscriminator(channels=16, n_layers=3, norm_groups=8)
    assert d(_images(2, 64)).shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6 patches
    assert PatchDiscriminator(channels=16, n_layers=2, norm_groups=8)(_images(2, 64)).shape == (2, 1, 14, 14)


# ------------------------------------------------------------------------------- before the GAN starts


def test_before_gan_start_no_discriminator_forward() -> None:
    perceptual = StandInPerceptual()
    loss_mod = ReconstructionLoss(_cfg(), perceptual)
    calls = CountCalls(loss_mod)
    real, fake = _images(seed=1), _images(seed=2).requires_grad_()
    loss, logs = loss_mod.generator_loss(real, fake, step=9, last_layer=None)
    assert calls.n == 0 and logs["gan_g"] == 0 and logs["gan_weight"] == 0
    expected = (fake - real).abs().mean() + perceptual(fake, real).mean()
    assert torch.allclose(loss, expected)
    d_loss, d_logs = loss_mod.discriminator_loss(real, fake.detach(), step=9)
    assert d_logs["discriminator"] == 0
    assert calls.n == 0 and not d_loss.requires_grad and d_loss == 0 and not loss_mod.gan_active(9)
    assert loss_mod.gan_active(10)
    loss_mod.generator_loss(real, fake, step=10)
    assert calls.n == 1  # the hooks do count discriminator calls


def test_perceptual_gets_the_images_unchanged_in_minus_one_one_and_stays_eval() -> None:
    perceptual = StandInPerceptual()
    loss_mod = ReconstructionLoss(_cfg(), perceptual).train()
    assert not perceptual.training and not any(p.requires_grad for p in perceptual.parameters())
    real, fake = _images(seed=1), _images(seed=2)
    perceptual.seen.clear()
    loss_mod.generator_loss(real, fake, step=0)
    (x, y), = perceptual.seen
    assert x is fake and y is real  # no [0, 1] rescaling (the public code's defect 3)
    assert float(real.min()) < -0.9  # the inputs do use the negative half of the range
    a, _ = loss_mod.generator_loss(real, fake, step=0)
    b, _ = loss_mod.generator_loss(real, fake, step=0)
    assert torch.equal(a, b)  # dropout in the perceptual net is off although the loss module trains


# --------------------------------------------------------------------- generator vs discriminator steps


def test_generator_and_discriminator_steps_touch_only_their_own_parameters() -> None:
    torch.manual_seed(0)
    gen = Generator()
    loss_mod = ReconstructionLoss(_cfg(), StandInPerceptual())
    g_opt = torch.optim.Adam(gen.parameters(), lr=1e-2)  # model parameters only
    d_opt = torch.optim.Adam(loss_mod.discriminator_parameters(), lr=1e-2)
    gen_ids = {id(p) for p in gen.parameters()}
    assert not gen_ids & {id(p) for p in loss_mod.discriminator_parameters()}
    real = _images(seed=1)

    # Generator step after the GAN started: the discriminator is run but gets no gradient.
    disc_before, gen_before = _clone(loss_mod.discriminators), _clone(gen)
    fake = gen(real)
    loss, logs = loss_mod.generator_loss(real, fake, step=20, last_layer=gen.out.weight)
    assert logs["gan_g"] != 0 and logs["gan_weight"] == pytest.approx(0.2)
    g_opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in loss_mod.discriminator_parameters())
    g_opt.step()
    assert _same(loss_mod.discriminators, disc_before) and not _same(gen, gen_before)

    # Discriminator step: the generator's weights and gradients stay as they are.
    g_opt.zero_grad(set_to_none=True)
    disc_before, gen_before = _clone(loss_mod.discriminators), _clone(gen)
    fake = gen(real)
    d_loss, d_logs = loss_mod.discriminator_loss(real, fake.detach(), step=20)
    assert d_loss.requires_grad and set(d_logs) == {"discriminator", "logits_real", "logits_fake"}
    d_opt.zero_grad()
    d_loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    d_opt.step()
    assert _same(gen, gen_before) and not _same(loss_mod.discriminators, disc_before)

    # Even a non-detached fake cannot reach the generator through the discriminator loss.
    d_loss, _ = loss_mod.discriminator_loss(real, gen(real), step=20)
    d_loss.backward()
    assert all(p.grad is None for p in gen.parameters())


def test_adaptive_weight_is_finite_positive_and_vqgan_ratio() -> None:
    torch.manual_seed(0)
    gen = Generator()
    loss_mod = ReconstructionLoss(_cfg(perceptual_weight=0.0), None)
    real = _images(seed=1)
    fake = gen(real)
    _, logs = loss_mod.generator_loss(real, fake, step=50, last_layer=gen.out.weight)
    w = logs["adaptive_weight"]
    assert torch.isfinite(w) and w > 0
    # Recompute by hand: |d nll/dW| / (|d gan/dW| + 1e-4).
    fake = gen(real)
    nll = (fake - real).abs().mean()
    gan = -loss_mod.discriminators[0](fake).mean()
    g_nll = torch.autograd.grad(nll, gen.out.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, gen.out.weight)[0]
    assert torch.allclose(w, g_nll.norm() / (g_gan.norm() + 1e-4), rtol=1e-4)
    fake = gen(real)
    big_nll, tiny_gan = 1e6 * (fake - real).abs().mean(), -1e-9 * loss_mod.discriminators[0](fake).mean()
    assert adaptive_gan_weight(big_nll, tiny_gan, gen.out.weight, max_weight=3.0) == 3.0  # clamped
    # No last layer (or no grad): weight 1.
    _, logs = loss_mod.generator_loss(real, gen(real), step=50, last_layer=None)
    assert logs["adaptive_weight"] == 1.0
    with pytest.raises(ValueError, match="last_layer"):
        loss_mod.generator_loss(real, gen(real), step=50, last_layer=nn.Parameter(torch.ones(3)))


# ------------------------------------------------------------------------------------------- values


class FixedLogits(nn.Module):
    """A 'discriminator' returning given logits (kept in the graph of its input)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits + 0 * images.sum()


def test_hinge_values_on_hand_made_logits() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2    -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2      -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0  # margins met

    loss_mod = ReconstructionLoss(_cfg(adaptive_weight=False, perceptual_weight=0.0, gan_weight=0.5), None)
    loss_mod.discriminators[0] = FixedLogits(fake)
    x, y = _images(seed=1), _images(seed=2)
    loss, logs = loss_mod.generator_loss(x, y, step=10)
    assert logs["gan_g"].item() == pytest.approx(-fake.mean().item())  # hinge generator: -mean(D(fake))
    assert loss.item() == pytest.approx((y - x).abs().mean().item() + 0.5 * -fake.mean().item())

    seq = iter([real, fake])  # D(real) first, then D(fake)
    loss_mod.discriminators[0] = type("Seq", (nn.Module,), {"forward": lambda self, im: next(seq)})()
    d_loss, d_logs = loss_mod.discriminator_loss(x, y, step=10)
    assert d_loss.item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert d_logs["logits_real"].item() == pytest.approx(real.mean().item())


def test_one_discriminator_per_iteration() -> None:
    loss_mod = ReconstructionLoss(_cfg(num_discriminators=3, perceptual_weight=0.0), None)
    assert len(loss_mod.discriminator_parameters()) == 3 * len(list(loss_mod.discriminators[0].parameters()))
    calls = [0, 0, 0]
    for i, d in enumerate(loss_mod.discriminators):
        d.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    real, fake = _images(seed=1), _images(seed=2)
    loss_mod.generator_loss(real, fake, step=10, disc_index=2)
    loss_mod.discriminator_loss(real, fake, step=10, disc_index=1)
    assert calls == [0, 2, 1]
    with pytest.raises(ValueError, match="disc_index"):
        loss_mod.generator_loss(real, fake, step=10, disc_index=3)

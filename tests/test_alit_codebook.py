"""Dead-code restarts of ALIT's latent quantizer: collapse is undone from batch latents, deterministically,
only in training, and the public layout (threshold 0) keeps its exact keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenizer.alit import ALIT, VectorQuantizer, alit_config


def _collapsed_batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(8, generator=g)
    return center + 0.05 * torch.randn(64, 16, 8, generator=g)  # (B, k, D): every latent near one point


def test_dead_codes_are_restarted_from_batch_latents() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(256, 8, 0.25, dead_code_threshold=0.5, usage_decay=0.5).train()
    z = _collapsed_batch()
    used_before = vq(z)[1].unique().numel()
    for _ in range(3):  # usage of never-chosen codes decays 1 -> 0.0625 < 0.5: they are restarted
        vq(z)
    assert vq.restart_dead_codes() > 200
    used_after = vq(z)[1].unique().numel()
    assert used_before <= 3 and used_after > 10 * used_before
    # restarted codes are batch latents (the few codes in use are kept): almost all now sit in the z cloud
    book = F.normalize(vq.embedding.weight.detach(), dim=-1)
    zn = F.normalize(z.reshape(-1, 8), dim=-1)
    assert ((book @ zn.t()).amax(1) > 0.999).float().mean() > 0.95


def test_restarts_are_deterministic_and_training_only() -> None:
    def run() -> torch.Tensor:
        torch.manual_seed(1)
        vq = VectorQuantizer(128, 8, 0.25, dead_code_threshold=0.5, usage_decay=0.5).train()
        for s in range(4):
            torch.manual_seed(100 + s)  # the trainer seeds each step
            loss = vq(_collapsed_batch(s))[2]
            loss.backward()  # the graph is intact: restarts happen between steps, not inside forward
            vq.restart_dead_codes()
        return vq.embedding.weight.detach().clone()

    assert torch.equal(run(), run())
    torch.manual_seed(1)
    vq = VectorQuantizer(128, 8, 0.25, dead_code_threshold=0.5, usage_decay=0.5).eval()
    before = vq.embedding.weight.detach().clone()
    for _ in range(4):
        vq(_collapsed_batch())
        assert vq.restart_dead_codes() == 0
    assert torch.equal(vq.embedding.weight, before)  # encoding never changes the codebook


def test_public_layout_has_no_usage_buffer() -> None:
    assert "quantize.usage" not in ALIT(alit_config("base", base_grid=2, patch_size=8)).state_dict()
    assert "quantize.usage" in ALIT(alit_config("tiny", base_grid=2, patch_size=8, base_code_dim=8)).state_dict()

"""The base 2D VQ tokenizer: index-level API contract, quantizer, persistence, a real-data sanity run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import VQModel

from tokenizer.core.paths import ASSETS
from tokenizer.vq import (
    BASE_VQ_SIZES,
    BaseVQ,
    BaseVQConfig,
    VQForward,
    VQOut,
    base_vq_config,
    codebook_stats,
)

LPIPS_EXAMPLES = ASSETS / "lpips-examples"


@pytest.fixture(scope="module")
def tiny() -> BaseVQ:
    torch.manual_seed(0)
    return BaseVQ(base_vq_config("tiny")).eval()


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def real_images(n: int) -> torch.Tensor:
    """``n`` real 64x64 images in [-1, 1]: emoji from the embedded set, else crops of the LPIPS examples."""
    npz = ASSETS / "noto_emoji_64.npz"
    if npz.is_file():
        with np.load(npz) as data:
            images = data["images"]  # (N, 64, 64, 3) uint8
        pick = np.random.default_rng(0).choice(len(images), size=n, replace=False)
        arr = images[pick]
    elif LPIPS_EXAMPLES.is_dir():
        from PIL import Image

        srcs = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(LPIPS_EXAMPLES.glob("*.png"))]
        # 32x32 crops upsampled to 64: real image statistics, as many as asked for.
        rng = np.random.default_rng(0)
        crops = []
        for i in range(n):
            src = srcs[i % len(srcs)]
            y, x = rng.integers(0, src.shape[0] - 32), rng.integers(0, src.shape[1] - 32)
            crops.append(np.asarray(Image.fromarray(src[y:y + 32, x:x + 32]).resize((64, 64), Image.BICUBIC)))
        arr = np.stack(crops)
    else:
        pytest.skip("no real images: tokenizer/assets/noto_emoji_64.npz and tokenizer/assets/lpips-examples missing")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float()  # (N, 3, 64, 64)
    return x / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- API


def test_api_shapes_and_dtypes(tiny: BaseVQ) -> None:
    x = _images(2)
    g, c, k = tiny.grid_size, tiny.code_dim, tiny.codebook_size
    assert (g, c, k) == (8, 32, 512)
    with torch.no_grad():
        feats = tiny.encode_features(x)
        assert feats.shape == (2, c, g, g) and feats.dtype == torch.float32
        q = tiny.quantize(feats)
        assert isinstance(q, VQOut)
        assert q.codes.shape == (2, c, g, g) and q.indices.shape == (2, g, g)
        assert q.indices.dtype == torch.long and q.loss.dim() == 0 and torch.isfinite(q.loss)
        assert int(q.indices.min()) >= 0 and int(q.indices.max()) < k
        assert torch.equal(tiny.encode_indices(x), q.indices)
        assert tiny.codebook.shape == (k, c)
        assert torch.allclose(tiny.codebook.norm(dim=-1), torch.ones(k), atol=1e-5)  # cosine: unit codes
        assert tiny.decode_codes(q.codes).shape == (2, 3, 64, 64)
        assert tiny.decode_indices(q.indices).shape == (2, 3, 64, 64)
        out = tiny(x)
    assert isinstance(out, VQForward)
    assert out.recon.shape == x.shape and torch.equal(out.indices, q.indices)
    assert torch.equal(out.vq_loss, q.loss)


def test_soft_codes_decode(tiny: BaseVQ) -> None:
    """ALIT's path: softmax(logits) @ codebook decodes; a one-hot softmax equals decode_indices."""
    idx = torch.randint(0, tiny.codebook_size, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    logits = F.one_hot(idx, tiny.codebook_size).float() * 1e4  # (B, h, w, K), softmax is one-hot
    soft = (logits.softmax(-1) @ tiny.codebook).permute(0, 3, 1, 2)  # (B, C, h, w)
    with torch.no_grad():
        assert torch.allclose(tiny.decode_codes(soft), tiny.decode_indices(idx), atol=1e-5)


def test_bad_inputs_are_named(tiny: BaseVQ) -> None:
    with pytest.raises(ValueError, match="multiple of the downsampling"):
        tiny.encode_features(_images(1, size=60))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode_features(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="must lie in"):
        tiny.decode_indices(torch.full((1, 8, 8), tiny.codebook_size, dtype=torch.long))
    with pytest.raises(ValueError, match="long"):
        tiny.decode_indices(torch.zeros(1, 8, 8, dtype=torch.int32))


def test_straight_through_reaches_encoder_and_codebook_gets_vq_loss() -> None:
    torch.manual_seed(0)
    model = BaseVQ(base_vq_config("tiny"))
    out = model(_images(2))
    out.recon.square().mean().backward()  # reconstruction only: gradient must pass the quantizer
    assert model.vq.encoder.conv_in.weight.grad is not None
    assert model.vq.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.vq.quantize.embedding.weight.grad is None  # the decoder path does not train the codebook
    model.zero_grad()
    model(_images(2)).vq_loss.backward()
    assert model.vq.quantize.embedding.weight.grad.abs().sum() > 0  # the codebook term does
    assert model.vq.encoder.conv_in.weight.grad.abs().sum() > 0  # and the commitment term the encoder


def test_decode_indices_of_encode_indices_equals_forward(tiny: BaseVQ) -> None:
    x = _images(3, seed=2)
    with torch.no_grad():
        assert torch.equal(tiny.decode_indices(tiny.encode_indices(x)), tiny(x).recon)


# ---------------------------------------------------------------------------------------- quantizer


def test_cosine_quantizer_picks_max_cosine_code() -> None:
    torch.manual_seed(0)
    cfg = base_vq_config("tiny", num_vq_embeddings=64, latent_channels=8)
    model = BaseVQ(cfg)
    with torch.no_grad():
        model.vq.quantize.embedding.weight.normal_()  # raw codes of varied norms
    feats = torch.randn(2, 8, 4, 4)
    q = model.quantize(feats)
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 8)
    raw = model.vq.quantize.embedding.weight
    expected = F.cosine_similarity(flat[:, None], raw[None], dim=-1).argmax(-1).view(2, 4, 4)
    assert torch.equal(q.indices, expected)
    # Cosine lookup ignores feature norms; Euclidean lookup on the raw codebook does not agree with it.
    assert torch.equal(model.quantize(feats * torch.rand(2, 1, 4, 4) * 10).indices, expected)
    euclid = torch.cdist(flat, raw).argmin(-1).view(2, 4, 4)
    assert not torch.equal(euclid, expected)
    # Codes are the unit-norm codebook entries; loss = codebook term + 0.25 * commitment term.
    z = F.normalize(flat, dim=-1)
    zq = F.normalize(raw, dim=-1)[expected.reshape(-1)]
    assert torch.allclose(q.codes.permute(0, 2, 3, 1).reshape(-1, 8), zq, atol=1e-6)
    assert torch.allclose(q.loss, 1.25 * F.mse_loss(z, zq), atol=1e-6)


def test_euclidean_quantizer_and_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    model = BaseVQ(base_vq_config("tiny", l2_normalized=False, num_vq_embeddings=32, latent_channels=8))
    with torch.no_grad():
        model.vq.quantize.embedding.weight.normal_()
    feats = torch.randn(2, 8, 4, 4)
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = ((flat[:, None] - model.codebook[None]) ** 2).sum(-1).argmin(-1).view(2, 4, 4)
    assert torch.equal(model.quantize(feats).indices, expected)
    # Loss gradients: the codebook term moves the codes (weight 1), the commitment term the features
    # (weight beta = 0.25), so summed over positions grad(features) = -0.25 * grad(codebook).
    leaf = feats.clone().requires_grad_()
    model.quantize(leaf).loss.backward()
    book_grad = model.vq.quantize.embedding.weight.grad
    per_channel = leaf.grad.sum(dim=(0, 2, 3))  # (C,)
    assert per_channel.abs().max() > 1e-4
    assert torch.allclose(per_channel, -0.25 * book_grad.sum(0), rtol=1e-4, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = model.quantize(feats.bfloat16())
    assert q.loss.dtype == torch.float32 and q.codes.dtype == torch.bfloat16
    assert torch.equal(q.indices, model.quantize(feats.bfloat16().float()).indices)


def test_codebook_stats_on_known_indices() -> None:
    s = codebook_stats(torch.tensor([[0, 0], [1, 1]]), 4)
    assert s["usage"] == pytest.approx(0.5) and s["perplexity"] == pytest.approx(2.0)
    s = codebook_stats(torch.arange(8).view(2, 2, 2), 8)
    assert s["usage"] == pytest.approx(1.0) and s["perplexity"] == pytest.approx(8.0)
    s = codebook_stats(torch.tensor([3, 3, 3, 3, 3, 3, 1, 2]), 16)  # p = 6/8, 1/8, 1/8
    entropy = -(0.75 * np.log(0.75) + 2 * 0.125 * np.log(0.125))
    assert s["usage"] == pytest.approx(3 / 16) and s["perplexity"] == pytest.approx(np.exp(entropy))
    with pytest.raises(ValueError, match="codebook size"):
        codebook_stats(torch.tensor([5]), 4)


# -------------------------------------------------------------------------------------- config/sizes


def test_sizes_registry_and_validation() -> None:
    assert set(BASE_VQ_SIZES) >= {"tiny", "maskgit"}
    m = base_vq_config("maskgit")
    assert (m.resolution, m.grid_size, m.code_dim, m.num_vq_embeddings) == (256, 16, 256, 1024)
    assert m.downsample_factor == 16 and not m.mid_block_attention
    t = base_vq_config("tiny")
    assert (t.resolution, t.grid_size) == (64, 8)
    t.block_out_channels.append(64)  # a fresh copy: the registry is untouched
    assert len(BASE_VQ_SIZES["tiny"].block_out_channels) == 4
    with pytest.raises(ValueError, match="norm_num_groups"):
        BaseVQConfig(block_out_channels=[12, 24], norm_num_groups=8)
    with pytest.raises(ValueError, match="resolution"):
        BaseVQConfig(resolution=60)
    with pytest.raises(ValueError, match="unknown base VQ size"):
        base_vq_config("huge")


# -------------------------------------------------------------------------------------- persistence


def test_save_load_roundtrip_is_exact(tmp_path: Path, tiny: BaseVQ) -> None:
    cfg = dataclasses.replace(base_vq_config("tiny"), num_vq_embeddings=256, commitment_beta=0.5)
    torch.manual_seed(3)
    model = BaseVQ(cfg).eval()
    model.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    loaded = BaseVQ.from_pretrained(tmp_path / "vq").eval()
    assert loaded.config == cfg
    x = _images(2, seed=4)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.recon, b.recon) and torch.equal(a.indices, b.indices) and torch.equal(a.vq_loss, b.vq_loss)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        BaseVQ.from_pretrained(tmp_path / "nothing")


def test_from_diffusers_matches_vqmodel(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = VQModel(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=8, vq_embed_dim=6,
        num_vq_embeddings=64, norm_num_groups=8, sample_size=32, mid_block_add_attention=True,
    ).eval()
    with torch.no_grad():
        ref.quantize.embedding.weight.normal_()  # spread codes so nearest-code choices are clear-cut
    ref.save_pretrained(tmp_path / "dvq", safe_serialization=True)
    with pytest.raises(FileNotFoundError, match="from_diffusers"):
        BaseVQ.from_pretrained(tmp_path / "dvq")
    model = BaseVQ.from_diffusers(tmp_path / "dvq").eval()
    assert (model.grid_size, model.code_dim, model.codebook_size) == (8, 6, 64)
    assert model.config.mid_block_attention and not model.config.l2_normalized
    x = _images(2, size=32, seed=5)
    with torch.no_grad():
        h = ref.encode(x).latents
        _, _, (_, _, ref_idx) = ref.quantize(h)
        expected = ref(x).sample
        out = model(x)
    assert torch.equal(model.encode_features(x), h)
    assert torch.equal(out.indices.reshape(-1), ref_idx.reshape(-1))
    assert torch.allclose(out.recon, expected, atol=1e-5)  # diffusers' z + (zq - z) rounds; ours is zq


# ---------------------------------------------------------------------------------------- real data


def test_tiny_l1_training_on_real_images_decreases_loss() -> None:
    torch.manual_seed(0)
    x = real_images(32)
    model = BaseVQ(base_vq_config("tiny"))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = F.l1_loss(model(x).recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    # Measured: about 0.78 -> 0.39 in 15 steps on the emoji (random init, seed 0).
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:2]), losses

"""The MAGE VQGAN base (tokenizer/vqgan.py): the public layout, the base contract, persistence, and training
by the same VQ task as the diffusers base."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tokenizer.bases import build_base, load_base
from tokenizer.core.config import load_config
from tokenizer.train import TokenizerRunConfig, VQTask
from tokenizer.vqgan import MageVQGAN, MageVQGANConfig, mage_vqgan_config

GOLDEN = Path(__file__).parent / "assets" / "public-alit-golden" / "halting_off"


def _golden_base() -> MageVQGAN:
    state = load_file(str(GOLDEN / "weights.safetensors"))
    prefix = "base_tokenizer.vqgan."
    base = MageVQGAN(MageVQGANConfig(resolution=64, ch=32, ch_mult=[1, 2, 1], num_res_blocks=1, z_channels=32,
                                     n_embed=128))
    base.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return base.eval()


def test_public_layout_and_encoder() -> None:
    """The public key names load strictly, the encoder gives the public vqgan_h and the Euclidean argmin."""
    base = _golden_base()
    manifest = json.loads((GOLDEN / "manifest.json").read_text())["state_dict"]["keys"]
    public = {k[len("base_tokenizer.vqgan."):]: tuple(v) for k, v in manifest.items() if k.startswith("base_tokenizer.")}
    assert {k: tuple(v.shape) for k, v in base.state_dict().items()} == public
    gold = load_file(str(GOLDEN / "outputs.safetensors"))
    x01 = load_file(str(GOLDEN / "inputs.safetensors"))["images"]
    with torch.no_grad():
        feats = base.encode_features(x01 * 2 - 1)
        torch.testing.assert_close(feats, gold["vqgan_h"], atol=1e-4, rtol=1e-4)
        assert torch.equal(base.quantize(feats).indices.flatten(1), gold["gt_indices"])
        soft = base.decode_codes01(gold["soft_code_0"])  # the public pixel path of iteration 0
        torch.testing.assert_close(soft, gold["recon_0"], atol=5e-4, rtol=1e-4)


def test_contract_and_persistence(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = build_base("mage_tiny").eval()
    assert isinstance(base, MageVQGAN) and (base.grid_size, base.code_dim, base.codebook_size) == (8, 32, 512)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = base(x)
    assert out.recon.shape == x.shape and out.indices.shape == (2, 8, 8) and torch.isfinite(out.vq_loss)
    base.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model"] == "MageVQGAN"
    again = load_base(tmp_path / "b").eval()
    assert isinstance(again, MageVQGAN) and again.config == mage_vqgan_config("mage_tiny")
    with torch.no_grad():
        assert torch.equal(again(x).recon, out.recon)


def test_trained_by_the_vq_task(tmp_path: Path) -> None:
    cfg = load_config(TokenizerRunConfig, "configs/tokenizer/vq_emoji_cpu.yaml",
                      ["vq_size=mage_tiny", f"run_dir={tmp_path / 'run'}"])
    task = VQTask(cfg, torch.rand(2, 3, 64, 64) * 2 - 1)
    task.setup(torch.device("cpu"))
    assert isinstance(task.model, MageVQGAN)
    batch = (torch.rand(4, 3, 64, 64) * 2 - 1,)
    phases = list(task.train_step(batch, 0))
    phases[0].loss.backward()
    assert torch.isfinite(phases[0].loss)
    assert float(task.model.encoder.conv_in.weight.grad.abs().sum()) > 0
    assert float(task.model.quantize.embedding.weight.grad.abs().sum()) > 0

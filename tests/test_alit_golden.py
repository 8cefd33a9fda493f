"""ALIT computes the public function: the golden vectors of the public code (tests/assets/public-alit-golden).

For both cases (halting off and on; identical weights) the public checkpoint is imported as a user
would (``alit import-public``'s code path) and every step is compared with the README's tolerances:
integers exactly (base targets, 1D ids, halting masks), floats within ``1e-4 + 1e-4 |b|`` (the pixels
``5e-4 + 1e-4 |b|``). Also: the safe reader refuses foreign objects and truncated files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import alit_here
from tokenizer.alit import ALITTokenizer
from tokenizer.core.checkpoint import CheckpointError
from tokenizer.public import infer_configs, read_public_checkpoint, tokenizer_from_public

GOLDEN = Path(__file__).parent / "assets" / "public-alit-golden"
CASES = ("halting_off", "halting_on")
HEADS = 4  # the golden models' heads (manifest.json config); args.model is not a public factory name


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, name: str) -> None:
    bound = atol + 1e-4 * b.abs()
    err = (a.float() - b.float()).abs()
    assert bool((err <= bound).all()), f"{name}: max excess {float((err - bound).max()):.3g} (max |a-b| {float(err.max()):.3g})"


def _load(case: str, source: str = "checkpoint.pth") -> tuple[ALITTokenizer, torch.Tensor, dict[str, torch.Tensor]]:
    ckpt = read_public_checkpoint(GOLDEN / case / source)
    tok = tokenizer_from_public(ckpt, HEADS, HEADS, halting=case == "halting_on")
    images01 = load_file(str(GOLDEN / case / "inputs.safetensors"))["images"]
    return tok, images01, load_file(str(GOLDEN / case / "outputs.safetensors"))


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the golden files were produced with one thread
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", CASES)
def test_public_forward_step_by_step(case: str) -> None:
    tok, x01, gold = _load(case)
    images = x01 * 2 - 1  # the project's convention; ALIT converts back to [0, 1] once, inside
    n_iter = tok.config.num_iters
    with torch.no_grad():
        feats, targets = tok.features_and_targets(images)
        _close(feats, gold["vqgan_h"], 1e-4, "vqgan_h")
        assert torch.equal(targets, gold["gt_indices"])
        out = tok(images, supervise=range(n_iter))  # every iteration decoded, as the public eval forward
        for it in out.iterations:
            t = it.iteration
            assert torch.equal(it.ids, gold[f"latent_vq_indices_{t}"]), t
            _close(it.codes, gold[f"latent_quantized_{t}"], 1e-4, f"latent_quantized_{t}")
            _close(it.logits, gold[f"decoder_logits_{t}"], 1e-4, f"decoder_logits_{t}")
            p = it.logits.softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
            _close(p, gold[f"pred_gt_prob_{t}"], 1e-4, f"pred_gt_prob_{t}")
            recon01 = (tok.logits_to_images(it.logits) + 1) / 2  # unclamped, back in the public [0, 1]
            _close(recon01, gold[f"recon_{t}"], 5e-4, f"recon_{t}")
            l1 = (recon01 - x01).abs().flatten(1).mean(1)
            _close(l1, gold[f"recon_l1_per_image_{t}"], 1e-4, f"recon_l1_per_image_{t}")
            if case == "halting_on":
                halt = out.halted[t + 1] if t + 1 < n_iter else p >= tok.config.halting_threshold
                assert torch.equal(halt, gold[f"halt_mask_{t}"].bool()), t  # the last mask acts on nothing
                assert 0 < int(halt.sum()) < halt.numel()
            else:
                assert not any(h.any() for h in out.halted)


@pytest.mark.parametrize("case", CASES)
def test_index_api_reproduces_the_public_codes(case: str, tmp_path: Path) -> None:
    tok, x01, gold = _load(case)
    images = x01 * 2 - 1
    tok.save_pretrained(tmp_path / "tok")  # what alit tokenize / reconstruct / eval load
    loaded = ALITTokenizer.from_pretrained(tmp_path / "tok").eval()
    for t, budget in enumerate(tok.budgets):
        ids = loaded.encode(images, budget)  # early exit: only t + 1 iterations run
        assert loaded.alit.last_encoder_iterations == t + 1
        assert torch.equal(ids, gold[f"latent_vq_indices_{t}"]), budget
        recon = 2 * gold[f"recon_{t}"] - 1  # the project's convention
        _close(loaded.logits_to_images(loaded.decode_logits(ids)), recon, 1e-3, f"decode {budget}")
        _close(loaded.decode(ids), recon.clamp(-1, 1), 1e-3, f"decode {budget} (clamped)")


def test_per_image_selection_follows_the_public_metric() -> None:
    """encode_adaptive picks, per image, the first budget whose public L1 (recon_l1_per_image) is below the
    threshold, else the lowest-error one; the public code picks one budget for the whole batch."""
    tok, x01, gold = _load("halting_on")
    errs = torch.stack([gold[f"recon_l1_per_image_{t}"] for t in range(tok.config.num_iters)], 1)  # (B, T)
    budgets = torch.tensor(tok.budgets)
    for thr in (0.0, float(errs.median()), float(errs.max()) + 1):
        below = errs < thr
        want = torch.where(below.any(1), budgets[below.float().argmax(1)], budgets[errs.argmin(1)])
        ids, lengths = tok.encode_adaptive(x01 * 2 - 1, thr)
        assert torch.equal(lengths, want), thr
        for i, k in enumerate(lengths.tolist()):
            assert torch.equal(ids[i, :k], gold[f"latent_vq_indices_{k // tok.tokens_per_iter - 1}"][i])


def test_sampled_halting_is_a_training_switch() -> None:
    """halting_sample (the public Bernoulli draw) acts in training only: in eval the golden case holds."""
    ckpt = read_public_checkpoint(GOLDEN / "halting_on" / "checkpoint.pth")
    tok = tokenizer_from_public(ckpt, HEADS, HEADS)
    tok.alit.config.halting_sample = True
    _, x01, gold = _load("halting_on")
    with torch.no_grad():
        assert torch.equal(tok.eval().encode(x01 * 2 - 1, 32), gold["latent_vq_indices_3"])
        torch.manual_seed(0)
        out = tok.train()(x01 * 2 - 1, supervise=[0, 1])
    sampled, rule = out.halted[1], gold["halt_mask_0"].bool()
    assert bool((sampled <= rule).all()) and int(sampled.sum()) < int(rule.sum())  # a subset: p >= thr and a draw


def test_safetensors_layout_and_inferred_architecture() -> None:
    manifest = json.loads((GOLDEN / "halting_on" / "manifest.json").read_text())["config"]["alit"]
    for source in ("checkpoint.pth", "weights.safetensors"):
        ckpt = read_public_checkpoint(GOLDEN / "halting_on" / source)
        assert not any(k.startswith("gan_losses.") for k in ckpt.state)
        alit, base = infer_configs(ckpt, HEADS, HEADS)
        assert (alit.width, alit.depth, alit.dec_width, alit.decoder_layers) == (
            manifest["encoder_width"], manifest["encoder_num_layers"], manifest["decoder_width"],
            manifest["decoder_num_layers"])
        assert (alit.tokens_per_iter, alit.num_iters, alit.codebook_size, alit.code_dim, alit.patch_size) == (
            manifest["num_init_latent_tokens"], manifest["max_rollout_iters"], manifest["vq_codebook_size"],
            manifest["vq_token_dim"], manifest["patch_size"])
        assert (base.ch, base.ch_mult, base.num_res_blocks, base.z_channels, base.n_embed) == (32, [1, 2, 1], 1, 32, 128)
    tok, x01, gold = _load("halting_on", "weights.safetensors")
    assert torch.equal(tok.encode(x01 * 2 - 1, 32), gold["latent_vq_indices_3"])


def test_heads_are_required_when_the_name_is_no_factory() -> None:
    ckpt = read_public_checkpoint(GOLDEN / "halting_off" / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="--encoder-heads"):
        infer_configs(ckpt)
    ckpt.args["model"] = "alit_small"  # a public factory with another width: the file is inconsistent
    with pytest.raises(CheckpointError, match="inconsistent"):
        infer_configs(ckpt)


class Foreign:  # a class a pickle may name: never to be instantiated by a checkpoint read
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_foreign_objects_and_truncated_files_are_refused(tmp_path: Path) -> None:
    raw = torch.load(GOLDEN / "halting_off" / "checkpoint.pth", weights_only=False)  # our own asset
    assert isinstance(raw["args"], argparse.Namespace)
    for name, bad in (("object", Foreign()), ("set", {1, 2}), ("bytes", b"abc"), ("numpy", __import__("numpy").zeros(2))):
        path = tmp_path / f"{name}.pth"
        torch.save({**raw, "extra": bad}, path)
        with pytest.raises(CheckpointError, match=r"not allowed|holds only"):
            read_public_checkpoint(path)
    data = (GOLDEN / "halting_off" / "checkpoint.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_public_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "cut.safetensors").write_bytes((GOLDEN / "halting_off" / "weights.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_public_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="try --weights model"):
        torch.save({"model": raw["model"], "args": raw["args"]}, tmp_path / "noema.pth")
        read_public_checkpoint(tmp_path / "noema.pth")
    assert read_public_checkpoint(tmp_path / "noema.pth", weights="model").source == "model"


def test_format_1_directories_are_refused_with_the_reason(tmp_path: Path) -> None:
    tok, _, _ = _load("halting_off")
    tok.save_pretrained(tmp_path / "tok")
    cfg = tmp_path / "tok" / "config.json"
    cfg.write_text(json.dumps({"format": "alit-tokenizer", "format_version": 1, "alit": {}}))
    with pytest.raises(CheckpointError, match="retrain it"):
        ALITTokenizer.from_pretrained(tmp_path / "tok")


def _alit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ALIT_HOME": str(cwd / "home"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "slurm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_import_public_command_and_reuse(tmp_path: Path) -> None:
    """``alit import-public`` as a user runs it (from another directory), then ``alit reconstruct`` on its output."""
    ckpt = str(GOLDEN / "halting_on" / "checkpoint.pth")
    # the refusals in this process (tests/test_cli.py: the same entry point, without a subprocess's imports)
    bad = alit_here(["import-public", ckpt, "--out", str(tmp_path / "tok")], tmp_path)
    assert bad.returncode == 2 and "--encoder-heads" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    (tmp_path / "cut.pth").write_bytes((GOLDEN / "halting_on" / "checkpoint.pth").read_bytes()[:5000])
    cut = alit_here(["import-public", str(tmp_path / "cut.pth"), "--out", str(tmp_path / "tok")], tmp_path)
    assert cut.returncode == 2 and "truncated" in cut.stderr and "Traceback" not in cut.stderr
    assert not (tmp_path / "tok").exists()  # nothing written on a failure
    ok = _alit("import-public", ckpt, "--out", str(tmp_path / "tok"), "--encoder-heads", "4", "--decoder-heads", "4",
               cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "check: emoji val image 0 at 8 tokens -> ids [" in ok.stdout and "reconstruction L1" in ok.stdout
    tok = ALITTokenizer.from_pretrained(tmp_path / "tok")
    _, x01, gold = _load("halting_on")
    assert torch.equal(tok.encode(x01 * 2 - 1, 8), gold["latent_vq_indices_0"])
    rec = _alit("reconstruct", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "recon"),
                "--budgets", "8,adaptive", "--num-images", "4", "--no-png", "--no-progress", cwd=tmp_path)
    assert rec.returncode == 0, rec.stderr
    assert len(list((tmp_path / "recon").rglob("*.npz"))) == 2

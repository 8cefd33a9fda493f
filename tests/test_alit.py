"""ALIT and its index-level API: shapes, budgets, early exit, halting, per-image budgets, persistence,
and the public 'small' layout (parameter count and key names against official-alit-small-keys.tsv)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tokenizer.alit import (
    ALIT,
    ALIT_SIZES,
    PAD_ID,
    ALITConfig,
    ALITTokenizer,
    alit_config,
    lengths_to_mask,
    read_alit_config,
)
from tokenizer.core.checkpoint import CheckpointError, write_manifest
from tokenizer.vq import BaseVQ, base_vq_config

_TSV = "official-alit-small-keys.tsv"
KEYS_TSV = Path(__file__).parent / "assets" / _TSV
PUBLIC_BASE = dict(patch_size=16, base_grid=16, base_code_dim=256, base_codebook_size=1024)


# ============================================================================ fixtures
def _images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Structured images in [-1, 1]: ramps, a checkerboard, a disc, noise, flat colour, a wave."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    kinds = [
        torch.stack([xx, yy, -xx]),
        torch.stack([((xx * 4).floor() + (yy * 4).floor()) % 2 * 2 - 1] * 3),
        torch.stack([(xx ** 2 + yy ** 2 < 0.4).float() * 1.6 - 0.8, yy * 0.5, xx * 0.2]),
        torch.rand(3, size, size, generator=g) * 2 - 1,
        torch.full((3, size, size), 0.3) * torch.tensor([1.0, -1.0, 0.5])[:, None, None],
        torch.sin(6 * xx + 3 * yy).expand(3, size, size) * torch.tensor([0.9, 0.4, -0.6])[:, None, None],
    ]
    return torch.stack([kinds[i % len(kinds)] for i in range(n)]).clamp(-1, 1)


@pytest.fixture(scope="module")
def base() -> BaseVQ:
    torch.manual_seed(0)
    return BaseVQ(base_vq_config("tiny")).eval()


def _excite(model: torch.nn.Module, gain: float = 2.0, seed: int = 3) -> None:
    """Re-draw every matrix with std gain/sqrt(fan_in). At the 0.02-std training init an untrained
    model's codes and reconstructions barely depend on the input; these tests need them to."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(p.shape[-1]))


@pytest.fixture(scope="module")
def tok(base: BaseVQ) -> ALITTokenizer:
    torch.manual_seed(1)
    model = ALITTokenizer.build(base, "tiny").eval()
    _excite(model.alit)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return _images()


def _l1(tok: ALITTokenizer, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The selection metric: unclamped reconstruction error ``(B,)`` in [0, 1] pixel units."""
    with torch.no_grad():
        return (tok.logits_to_images(tok.decode_logits(ids)) - x).abs().flatten(1).mean(1) / 2


def _with_threshold(tok: ALITTokenizer, thr: float, halting: bool = True) -> ALITTokenizer:
    """A copy of ``tok``'s ALIT (same weights) with another halting setting; the base is shared."""
    cfg = ALITConfig(**{**tok.config.__dict__, "halting_threshold": thr, "halting": halting})
    alit = ALIT(cfg)
    alit.load_state_dict(tok.alit.state_dict())
    return ALITTokenizer(alit.eval(), tok.base)


# ============================================================================ configuration
def test_config_sizes_and_validation(base: BaseVQ) -> None:
    assert {"tiny", "small_cpu", "tiny_public", "base", "small", "semilarge"} <= set(ALIT_SIZES)
    cfg = alit_config("small", **PUBLIC_BASE)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.tokens_per_iter, cfg.num_iters) == (1024, 8, 8, 32, 8)
    assert (cfg.codebook_size, cfg.code_dim, cfg.halting_threshold, cfg.commitment_beta) == (4096, 12, 0.55, 0.25)
    assert cfg.budgets == (32, 64, 96, 128, 160, 192, 224, 256) and cfg.image_size == 256
    with pytest.raises(ValueError, match="base_code_dim"):
        ALITConfig(width=64, heads=2, base_code_dim=64)
    with pytest.raises(ValueError, match="divisible"):
        ALITConfig(width=100, heads=8, base_code_dim=32)
    with pytest.raises(ValueError, match="halting_threshold"):
        ALITConfig(halting_threshold=1.5)
    with pytest.raises(ValueError, match="unknown ALIT size"):
        alit_config("huge")
    tok = ALITTokenizer.build(base, "tiny")  # base fields copied from the base VQ
    assert (tok.config.base_grid, tok.config.base_code_dim, tok.config.base_codebook_size) == (8, 32, 512)
    assert tok.config.patch_size == 8 and tok.image_size == 64
    with pytest.raises(ValueError, match="expects"):
        ALITTokenizer(ALIT(alit_config("tiny", base_grid=4, patch_size=16, base_code_dim=32,
                                       base_codebook_size=512)), base)


# ============================================================================ index-level API
def test_encode_decode_shapes_every_budget(tok: ALITTokenizer, images: torch.Tensor) -> None:
    assert tok.budgets == (4, 8, 12, 16) and tok.max_budget == 16
    for budget in tok.budgets:
        ids = tok.encode(images, budget)
        assert ids.shape == (4, budget) and ids.dtype == torch.long
        assert int(ids.min()) >= 0 and int(ids.max()) < tok.codebook_size
        logits = tok.decode_logits(ids)
        assert logits.shape == (4, 64, 512) and logits.dtype == torch.float32
        out = tok.decode(ids)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert float(out.min()) >= -1 and float(out.max()) <= 1


def test_encode_matches_forward_and_decode(tok: ALITTokenizer, images: torch.Tensor) -> None:
    feats, targets = tok.features_and_targets(images)
    with torch.no_grad():
        out = tok.alit(images, feats, targets=targets, supervise=[2])  # halting reads the true base indices
    ids = tok.encode(images, 12)
    assert torch.equal(out.at(2).ids, ids)
    torch.testing.assert_close(tok.decode_logits(ids), out.at(2).logits, atol=1e-4, rtol=1e-4)


def test_reinjected_2d_tokens(tok: ALITTokenizer, images: torch.Tensor) -> None:
    """With reinject_2d every iteration reads the embedded [class; 2D] tokens afresh (halted cells masked),
    the latents are still refined across iterations, and encode / forward / encode_adaptive agree."""
    cfg = ALITConfig(**{**tok.config.__dict__, "reinject_2d": True})
    alit = ALIT(cfg).eval()
    alit.load_state_dict(tok.alit.state_dict())  # same keys: the option adds no parameters
    re = ALITTokenizer(alit, tok.base)
    feats = tok.base.encode_features(images)
    n = cfg.num_cells
    with torch.no_grad():
        state = alit.embed(images, feats)
        first = alit.step(state)
        seen: list[torch.Tensor] = []
        hook = alit.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, :1 + n].clone()))
        second = alit.step(first)
        hook.remove()
        torch.testing.assert_close(seen[0], state.seq[:, :1 + n])  # nothing halted yet: exactly the embedding
        assert not torch.allclose(first.seq[:, :1 + n], state.seq[:, :1 + n])  # carried would read these instead
        out = alit(images, feats, targets=tok.features_and_targets(images)[1], supervise=[2])
    assert second.seq.shape[1] == 1 + n + 2 * cfg.tokens_per_iter
    ids = re.encode(images, 12)
    assert torch.equal(out.at(2).ids, ids)
    assert not torch.equal(ids, tok.encode(images, 12))  # the option changes the code
    ids_a, lengths = re.encode_adaptive(images, 0.0)  # all iterations; select() keeps the inputs per image
    for i, k in enumerate(lengths.tolist()):
        assert torch.equal(ids_a[i, :k], re.encode(images[i:i + 1], k)[0])


def test_deterministic(tok: ALITTokenizer, images: torch.Tensor, tmp_path: Path) -> None:
    assert torch.equal(tok.encode(images, 8), tok.encode(images, 8))
    assert torch.equal(tok.decode(tok.encode(images, 8)), tok.decode(tok.encode(images, 8)))
    tok.save_pretrained(tmp_path)
    a, b = ALITTokenizer.from_pretrained(tmp_path), ALITTokenizer.from_pretrained(tmp_path)
    for budget in (4, 16):
        assert torch.equal(a.encode(images, budget), b.encode(images, budget))
    ids_a, len_a = a.encode_adaptive(images, 0.2)
    ids_b, len_b = b.encode_adaptive(images, 0.2)
    assert torch.equal(ids_a, ids_b) and torch.equal(len_a, len_b)


def test_early_exit_is_counted(tok: ALITTokenizer, images: torch.Tensor) -> None:
    tok.encode(images, 4)
    assert tok.alit.last_encoder_iterations == 1 and tok.alit.last_decoder_passes == 0
    tok.encode(images, 12)
    assert tok.alit.last_encoder_iterations == 3
    assert tok.alit.last_decoder_passes == 2  # halting after iterations 0 and 1, none after the last
    off = _with_threshold(tok, 0.55, halting=False)
    off.encode(images, 12)
    assert off.alit.last_encoder_iterations == 3 and off.alit.last_decoder_passes == 0


def test_supervising_t_runs_t_plus_1_iterations(tok: ALITTokenizer, images: torch.Tensor) -> None:
    feats, targets = tok.features_and_targets(images)
    alit = tok.alit
    for t in range(alit.config.num_iters):
        out = alit(images, feats, targets=targets, supervise=[t])
        assert out.encoder_iterations == t + 1 == alit.last_encoder_iterations == len(out.halted)
        assert alit.last_decoder_passes == t + 1  # t halting passes + the supervised one
        step = out.at(t)
        assert step.logits.shape == (4, 64, 512)
        assert step.ids.shape == (4, 4 * (t + 1)) and step.codes.shape == (4, 4 * (t + 1), 8)
        assert step.vq_loss.ndim == 0 and torch.isfinite(step.vq_loss)
    out = alit(images, feats, targets=targets, supervise=[0, 2])
    assert [o.iteration for o in out.iterations] == [0, 2] and out.encoder_iterations == 3
    out = alit(images, feats, targets=targets, iterations=2)
    assert [o.iteration for o in out.iterations] == [1] and alit.last_encoder_iterations == 2
    short = alit(images, feats, targets=targets, supervise=[1])
    full = alit(images, feats, targets=targets, iterations=4, supervise=[1])  # the public code's way
    assert full.encoder_iterations == 4 == alit.last_encoder_iterations and [o.iteration for o in full.iterations] == [1]
    torch.testing.assert_close(full.at(1).logits, short.at(1).logits)  # later iterations change nothing before
    for bad in ([4], [-1], []):
        with pytest.raises(ValueError, match="supervise"):
            alit(images, feats, supervise=bad)
    with pytest.raises(ValueError, match="iterations"):
        alit(images, feats, iterations=2, supervise=[3])


def test_each_budget_is_its_own_sequence(tok: ALITTokenizer, images: torch.Tensor) -> None:
    for t in (tok, _with_threshold(tok, 0.55, halting=False)):
        short, long = t.encode(images, 4), t.encode(images, 8)
        assert not torch.equal(long[:, :4], short)  # earlier latents are updated, not kept


def test_bad_budgets_and_ids(tok: ALITTokenizer, images: torch.Tensor) -> None:
    for bad in (0, 5, 20, -4, 4.0, True):
        with pytest.raises(ValueError, match=r"one of \[4, 8, 12, 16\]"):
            tok.encode(images, bad)
    with pytest.raises(ValueError, match="one of"):
        tok.decode(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 64\)"):
        tok.decode(torch.full((2, 4), 64))
    with pytest.raises(ValueError, match="integer"):
        tok.decode(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="images must be"):
        tok.encode(images[:, :, :32], 4)
    with pytest.raises(ValueError, match="one of"):
        tok.encode_adaptive(images, 0.1, max_budget=6)


# ============================================================================ per-image budgets
@pytest.fixture(scope="module")
def per_budget(tok: ALITTokenizer, images: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Each budget's ids, and the reconstruction errors ``(B, budgets)`` in [0, 1] pixel units."""
    codes = {b: tok.encode(images, b) for b in tok.budgets}
    return codes, torch.stack([_l1(tok, images, codes[b]) for b in tok.budgets], 1)


def test_encode_adaptive_per_image(tok: ALITTokenizer, images: torch.Tensor, per_budget) -> None:
    codes, errs = per_budget
    budgets = torch.tensor(tok.budgets)

    def expected(thr: float) -> torch.Tensor:
        below = errs < thr
        first = below.float().argmax(1)
        return torch.where(below.any(1), budgets[first], budgets[errs.argmin(1)])

    # thresholds halfway between distinct errors (far from numerical noise), plus the two extremes
    flat = errs.flatten().sort().values
    gaps = flat[1:] - flat[:-1]
    mids = ((flat[1:] + flat[:-1]) / 2)[gaps > 1e-4]
    candidates = [0.0, math.inf, *mids[torch.linspace(0, len(mids) - 1, 6).long()].tolist()]
    differing = 0
    for thr in candidates:
        ids, lengths = tok.encode_adaptive(images, thr)
        assert ids.shape == (4, 16) and ids.dtype == torch.long and lengths.dtype == torch.long
        assert torch.equal(lengths, expected(thr)), thr
        mask = lengths_to_mask(lengths, 16)
        assert bool((ids[~mask] == PAD_ID).all()) and bool((ids[mask] >= 0).all())
        for i, k in enumerate(lengths.tolist()):
            assert torch.equal(ids[i, :k], codes[k][i])  # the same code as encode(images, k)
        differing += int(len(set(lengths.tolist())) > 1)
        if thr == math.inf:  # every image settles at the first budget: one iteration only
            assert tok.alit.last_encoder_iterations == 1 and lengths.eq(4).all()
        if thr == 0.0:  # nobody gets below zero: all iterations, each image's lowest-error budget
            assert tok.alit.last_encoder_iterations == 4
    assert differing > 0, "no threshold separated the images' budgets"
    # the decoded padded batch equals decoding each image at its own budget
    ids, lengths = tok.encode_adaptive(images, float(errs[:, 1].median()))
    recon = tok.decode(ids, lengths)
    for i, k in enumerate(lengths.tolist()):
        torch.testing.assert_close(recon[i], tok.decode(codes[k][i:i + 1])[0], atol=1e-4, rtol=1e-4)


def test_encode_adaptive_stops_when_settled(tok: ALITTokenizer, images: torch.Tensor, per_budget) -> None:
    errs = per_budget[1]
    # a threshold every image reaches by the second budget: at most 2 iterations run
    thr = float(torch.maximum(errs[:, 0], errs[:, 1]).max()) + 1e-4
    _, lengths = tok.encode_adaptive(images, thr)
    assert tok.alit.last_encoder_iterations == int(lengths.max()) // 4 <= 2


def test_encode_budgets_is_one_pass_with_every_budget_and_the_adaptive_choice(
        tok: ALITTokenizer, images: torch.Tensor, per_budget, monkeypatch: pytest.MonkeyPatch) -> None:
    """One encoder pass gives encode(images, k) for every k and encode_adaptive's choice, with halting on
    (cells masked from the second iteration on) and off."""
    errs = per_budget[1]
    for model in (tok, _with_threshold(tok, 0.02), _with_threshold(tok, 0.5, halting=False)):
        want = {b: model.encode(images, b) for b in model.budgets}
        for thr in (None, 0.0, float(errs[:, 1].median()), math.inf):
            out = model.encode_budgets(images, thr)
            assert model.alit.last_encoder_iterations == 4, "one pass: as many iterations as budgets"
            assert sorted(out.ids) == list(model.budgets)
            for b in model.budgets:
                assert torch.equal(out.ids[b], want[b]), (b, thr)
            if thr is None:
                assert out.adaptive_ids is None and out.adaptive_lengths is None
                continue
            ids, lengths = model.encode_adaptive(images, thr)
            assert torch.equal(out.adaptive_lengths, lengths) and torch.equal(out.adaptive_ids, ids), thr
    assert len(set(tok.encode_budgets(images, float(errs[:, 1].median())).adaptive_lengths.tolist())) > 1
    # settled images are not decoded to pixels again (rows per pixel decode, one decode per budget at most)
    decoded: list[int] = []
    real = tok.logits_to_images
    monkeypatch.setattr(tok, "logits_to_images", lambda logits: decoded.append(len(logits)) or real(logits))
    b, n = len(images), len(tok.budgets)
    for thr, want in ((math.inf, [b]), (0.0, [b] * n)):  # all settle at the first budget / none ever settles
        decoded.clear()
        tok.encode_budgets(images, thr)
        assert decoded == want, (thr, decoded)
    decoded.clear()
    tok.encode_budgets(images, float(errs[:, 1].median()))  # about half settle by the second budget
    assert decoded[0] == b and decoded == sorted(decoded, reverse=True) and decoded[-1] < b, decoded
    with pytest.raises(ValueError, match="threshold"):
        tok.encode_budgets(images, -1.0)


# ============================================================================ halting
def _target_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1).gather(-1, targets.reshape(targets.shape[0], -1, 1)).squeeze(-1)


def test_halting_threshold_masks_cells(tok: ALITTokenizer, images: torch.Tensor) -> None:
    feats = tok.base.encode_features(images).detach()
    targets = tok.base.encode_indices(images)
    with torch.no_grad():
        p0 = _target_prob(tok.alit(images, feats, targets=targets, supervise=[0]).at(0).logits, targets)
    thr = float(p0.median())
    on = _with_threshold(tok, thr)
    with torch.no_grad():
        out = on.alit(images, feats, targets=targets, supervise=[0, 1, 2, 3])
        assert not out.halted[0].any()
        assert torch.equal(out.halted[1], p0 >= thr)  # the probability of the true base index, as public
        assert 0 < int(out.halted[1].sum()) < out.halted[1].numel()
        for t in (1, 2):  # recomputed at every iteration, not cumulative (the public rule)
            assert torch.equal(out.halted[t + 1], _target_prob(out.at(t).logits, targets) >= thr)
        ids = on.encode(images, 16)  # inference halts the same cells as training (no other rule)
        assert torch.equal(ids, out.at(3).ids)
    off = _with_threshold(tok, 0.0, halting=False)
    with torch.no_grad():
        out_off = off.alit(images, feats, targets=targets, supervise=[0, 3])
        assert all(not h.any() for h in out_off.halted)
        # the same weights: identical until halting acts, different after
        ref = on.alit(images, feats, targets=targets, supervise=[0, 3])
    torch.testing.assert_close(out_off.at(0).logits, ref.at(0).logits)
    assert not torch.allclose(out_off.at(3).logits, ref.at(3).logits, atol=1e-3)


def test_halting_all_cells_and_gradients(tok: ALITTokenizer, images: torch.Tensor) -> None:
    on = _with_threshold(tok, 0.0).train()  # every cell halts after the first iteration
    feats = tok.base.encode_features(images).detach()
    targets = tok.base.encode_indices(images)
    out = on.alit(images, feats, targets=targets, supervise=[0, 1, 2])
    assert out.halted[1].all() and out.halted[2].all()
    loss = sum(F.cross_entropy(o.logits.flatten(0, 1), targets.flatten()) + o.vq_loss for o in out.iterations)
    loss.backward()
    named = dict(on.alit.named_parameters())
    for name in ("patch_embed.weight", "encoder_mask_token", "latent_tokens", "timestep_embedding",
                 "encoder.transformer.0.attn.in_proj_weight", "pre_quantizer_mlp.weight",
                 "quantize.embedding.weight", "decoder.ffn.2.weight", "decoder_mask_token"):
        grad = named[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert float(named["timestep_embedding"].grad[3].abs().sum()) == 0  # iteration 3 never ran


def test_tokenizer_forward_trains_base(base: BaseVQ, images: torch.Tensor) -> None:
    torch.manual_seed(2)
    tok = ALITTokenizer.build(BaseVQ(base.config), "tiny")
    tok.base.load_state_dict(base.state_dict())
    out = tok(images[:2], supervise=[1])
    assert torch.equal(out.targets, tok.base.encode_indices(images[:2]).flatten(1))
    recon = tok.logits_to_images(out.at(1).logits)
    assert recon.shape == (2, 3, 64, 64)
    (F.l1_loss(recon, images[:2]) + out.at(1).vq_loss).backward()
    assert float(tok.base.vq.encoder.conv_in.weight.grad.abs().sum()) > 0  # stage 2: the base trains too
    assert float(tok.alit.patch_embed.weight.grad.abs().sum()) > 0


# ============================================================================ persistence
def test_save_load_roundtrip(tok: ALITTokenizer, images: torch.Tensor, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(f.endswith((".json", ".safetensors")) for f in files), files  # no pickles
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model"] == "ALITTokenizer" and meta["format_version"] == 2 and meta["config"]["width"] == 64
    base_meta = json.loads((tmp_path / "base" / "config.json").read_text())
    assert base_meta["model"] == "BaseVQ" and base_meta["config"]["num_vq_embeddings"] == 512
    assert read_alit_config(tmp_path) == tok.config
    loaded = ALITTokenizer.from_pretrained(tmp_path)
    for budget in tok.budgets:
        ids = tok.encode(images, budget)
        assert torch.equal(loaded.encode(images, budget), ids)
        assert torch.equal(loaded.decode(ids), tok.decode(ids))


def test_load_mismatch_names_keys(tok: ALITTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    good_cfg = (tmp_path / "config.json").read_text()

    cfg = json.loads(good_cfg)
    cfg["config"]["code_dim"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json .*manifest"):  # an edited file is refused first
        ALITTokenizer.from_pretrained(tmp_path)
    write_manifest(tmp_path, ["model.safetensors", "config.json"])  # a consistent but mismatched directory
    with pytest.raises(CheckpointError, match=r"other shapes .*decoder.decoder_embed.weight"):
        ALITTokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(good_cfg)
    seal = lambda: write_manifest(tmp_path, ["model.safetensors", "config.json"])  # noqa: E731

    missing = {k: v for k, v in weights.items() if k != "encoder_mask_token"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    seal()
    with pytest.raises(CheckpointError, match=r"missing .*encoder_mask_token"):
        ALITTokenizer.from_pretrained(tmp_path)
    save_file({**weights, "extra.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    seal()
    with pytest.raises(CheckpointError, match=r"unexpected .*extra\.weight"):
        ALITTokenizer.from_pretrained(tmp_path)

    cfg = json.loads(good_cfg)
    cfg["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    seal()
    with pytest.raises(CheckpointError, match="format version 99"):
        ALITTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        ALITTokenizer.from_pretrained(tmp_path / "nowhere")


# ============================================================================ the public layout
def _official() -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines() if line and not line.startswith("#")]
    return {k: tuple(int(d) for d in shape.split("x")) for k, shape in rows if not k.startswith("base_tokenizer.")}


def test_public_small_keys_match_official() -> None:
    with torch.device("meta"):
        model = ALIT(alit_config("small", **PUBLIC_BASE))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = _official()
    assert ours == official  # the same key names and shapes as the public checkpoint (base aside)
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in official.values())


def test_public_sizes_parameter_counts() -> None:
    for size, published in (("small", 207.5e6), ("tiny_public", 52.8e6), ("base", 174.2e6),
                            ("semilarge", 409.1e6)):
        with torch.device("meta"):  # no memory: shapes only
            model = ALIT(alit_config(size, **PUBLIC_BASE))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n / published - 1) < 0.001, (size, n)  # alit.md's table, to its rounding
        w, ours = model.config.width, model.state_dict()
        blocks = {k.split(".")[2] for k in ours if k.startswith("encoder.transformer.")}
        assert len(blocks) == model.config.depth
        per_block = sum(math.prod(v.shape) for k, v in ours.items() if k.startswith("encoder.transformer.0."))
        assert per_block == 12 * w * w + 13 * w  # qkv + out proj + MLP(4W) + two LayerNorms, as the public code
        assert len([k for k in ours if k.startswith("decoder.transformer.0.")]) == 12  # 12 tensors per block


def test_encoder_and_decoder_set_separately(base: BaseVQ, images: torch.Tensor) -> None:
    """The public constructor takes encoder and decoder width, depth and heads separately; so does ALITConfig."""
    tok = ALITTokenizer.build(base, "tiny", decoder_width=48, decoder_depth=2, decoder_heads=3).eval()
    c, sd = tok.config, tok.alit.state_dict()
    assert (c.dec_width, c.decoder_layers, c.dec_heads) == (48, 2, 3)
    assert tuple(sd["decoder_positional_embedding"].shape) == (1 + c.num_cells, 48)
    assert tuple(sd["decoder.decoder_embed.weight"].shape) == (48, c.code_dim)
    assert tuple(sd["decoder.latent_token_positional_embedding"].shape) == (256, 48)  # the public 256 rows
    assert tuple(sd["encoder_positional_embedding"].shape) == (1 + c.num_cells, 64)
    assert {k.split(".")[2] for k in sd if k.startswith("decoder.transformer.")} == {"0", "1"}
    ids = tok.encode(images, 8)
    assert tok.decode(ids).shape == images.shape
    with pytest.raises(ValueError, match="decoder_width"):
        ALITConfig(width=64, heads=2, decoder_width=50, decoder_heads=4, base_code_dim=32)

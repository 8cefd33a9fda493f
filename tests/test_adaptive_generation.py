"""Adaptive-length generation (issue 16): training on the token cache's TSC-chosen (ids, length) pairs, the
priors' length model p(budget | class), generated budgets in both samplers, and what it learns on synthetic
tokens whose length depends on the class or on the ids themselves (where the histogram baseline fails)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from generator.tasks import TokenDataset, build_prior, collate_tokens, load_prior
from generator.tokens import PAD_ID
from generator.transformer import FORMAT_VERSION, MODEL_NAME
from tokenizer.core.config import to_dict
from tokenizer.core.pretrained import save_model_dir
from tokenizer.core.trainer import TrainConfig

K, TPI, NB, C = 16, 4, 3, 3  # codebook, tokens per iteration, budgets (4, 8, 12), classes
KINDS = ("maskgit", "ar")
BUDGETS = (4, 8, 12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_data(n: int, g: torch.Generator, lengths: torch.Tensor | None = None
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids at every budget, labels, and adaptive (ids, lengths): the adaptive ids are the ids at the chosen
    budget, padded (as the token cache stores them)."""
    ids = {b: torch.randint(0, K, (n, b), generator=g) for b in BUDGETS}
    labels = torch.randint(0, C, (n,), generator=g)
    if lengths is None:
        lengths = torch.tensor(BUDGETS)[torch.randint(0, NB, (n,), generator=g)]
    adaptive = torch.full((n, max(BUDGETS)), PAD_ID)
    for i, b in enumerate(lengths.tolist()):
        adaptive[i, :b] = ids[b][i]
    return ids, labels, adaptive, lengths


# ============================================================================ part 1: the data modes
def test_data_modes() -> None:
    g = torch.Generator().manual_seed(0)
    ids, labels, adaptive, lengths = _random_data(10, g)
    plain = TokenDataset(ids, labels)
    assert len(plain) == 30 and len(plain[0]) == 3 and not plain.has_adaptive  # today's items, unchanged
    same = TokenDataset(ids, labels, adaptive, lengths)  # adaptive data held, default mode: the same items
    assert len(same) == 30 and all(torch.equal(a, b) for a, b in zip(same[17], plain[17]))

    ad = TokenDataset(ids, labels, adaptive, lengths, mode="adaptive")
    assert len(ad) == 10
    for i in range(10):
        seq, length, label, chosen = ad[i]
        b = int(lengths[i])
        assert int(length) == b and bool(chosen) and int(label) == int(labels[i])
        assert torch.equal(seq[:b], ids[b][i]) and (seq[b:] == PAD_ID).all()

    mix = TokenDataset(ids, labels, adaptive, lengths, mode="mixture", adaptive_weight=0.25)
    assert len(mix) == 30 + 10  # 30 all-budget items + round(0.25 / 0.75 * 30) adaptive ones
    flags = torch.stack([mix[i][3] for i in range(len(mix))])
    assert flags.float().mean() == pytest.approx(0.25) and not flags[:30].any()
    assert torch.equal(mix[30][0], ad[0][0]) and torch.equal(mix[35][0], ad[5][0])
    batch = collate_tokens([mix[0], mix[31], mix[12]])
    assert len(batch) == 4 and batch[3].tolist() == [False, True, False]
    assert batch[0].shape == (3, int(batch[1].max()))

    train, val = mix.split(3, seed=1)  # the adaptive pairs and the mode travel with the images
    assert train.mode == "mixture" and train.num_images == 7 and val.has_adaptive
    rows = list(val.adaptive_batches(2))
    assert sum(len(r.lengths) for r in rows) == 3
    for r in rows:
        assert r.ids.shape[1] == int(r.lengths.max()) and ((r.ids >= 0) == (r.mask())).all()

    with pytest.raises(ValueError, match="adaptive-threshold"):
        TokenDataset(ids, labels, mode="adaptive")
    with pytest.raises(ValueError, match="adaptive_weight"):
        TokenDataset(ids, labels, adaptive, lengths, mode="mixture", adaptive_weight=1.0)
    with pytest.raises(ValueError, match="not one of the budgets"):
        TokenDataset(ids, labels, adaptive, torch.full((10,), 6))


def test_length_model_is_optional_and_old_priors_load(tmp_path: Path) -> None:
    """A prior without a length model is built (and initialised) exactly as before and loads as before; one
    with it saves and loads its head; asking a prior without one for budgets names the fix."""
    torch.manual_seed(0)
    old = build_prior("ar", "tiny", codebook_size=K, tokens_per_iter=TPI, num_budgets=NB, num_classes=C)
    torch.manual_seed(0)
    new = build_prior("ar", "tiny", codebook_size=K, tokens_per_iter=TPI, num_budgets=NB, num_classes=C,
                      length_model=True)
    assert not old.has_length_model and new.has_length_model
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert torch.equal(a, b), name  # the same init for every shared weight
    config = to_dict(old.config)
    del config["length_model"]  # a checkpoint written before the field existed
    save_model_dir(tmp_path / "old", MODEL_NAME, FORMAT_VERSION, config, old.state_dict(), extra={"kind": "ar"})
    assert "length_model" not in json.loads((tmp_path / "old" / "config.json").read_text())["config"]
    loaded = load_prior(tmp_path / "old")
    assert not loaded.has_length_model
    new.save_pretrained(tmp_path / "new")
    again = load_prior(tmp_path / "new")
    assert again.has_length_model and torch.equal(again.budget_head.weight, new.budget_head.weight)
    with pytest.raises(ValueError, match="--length-model histogram"):
        loaded.budget_logits(torch.tensor([0]))


@pytest.mark.parametrize("kind", KINDS)
def test_length_loss_only_on_chosen_rows(kind: str) -> None:
    from generator.ar import ar_loss
    from generator.maskgit import maskgit_loss

    torch.manual_seed(0)
    model = build_prior(kind, "tiny", codebook_size=K, tokens_per_iter=TPI, num_budgets=NB, num_classes=C,
                        length_model=True, class_dropout=0.0)
    g = torch.Generator().manual_seed(0)
    _, labels, adaptive, lengths = _random_data(6, g)
    loss_fn = ar_loss if kind == "ar" else maskgit_loss
    batch = (adaptive, lengths, labels)
    none = loss_fn(model, *batch, generator=torch.Generator().manual_seed(1), chosen=torch.zeros(6, dtype=torch.bool))
    some = loss_fn(model, *batch, generator=torch.Generator().manual_seed(1), chosen=torch.ones(6, dtype=torch.bool))
    plain = loss_fn(model, *batch, generator=torch.Generator().manual_seed(1))
    assert none.length_loss == 0 and plain.length_loss is None
    assert float(some.length_loss) == pytest.approx(float(torch.log(torch.tensor(3.0))), abs=1e-5)  # zero head
    torch.testing.assert_close(some.loss - some.length_loss, plain.loss)
    # the AR length head reads position 0 of the same forward: equal to the class-only pass
    if kind == "ar":
        with torch.no_grad():
            model.budget_head.weight.normal_()
        _, from_forward = model.forward_with_length(adaptive, lengths, labels)
        torch.testing.assert_close(from_forward, model.budget_logits(labels), atol=1e-5, rtol=1e-5)


def _tokenizer(out: Path, seed: int = 0) -> Path:
    from tokenizer.alit import ALITTokenizer
    from tokenizer.vq import BaseVQ, base_vq_config

    torch.manual_seed(seed)
    tok = ALITTokenizer.build(BaseVQ(base_vq_config("tiny")), "tiny", image_size=64)
    for p in tok.parameters():  # spread the init so codes depend on the input (an untrained tokenizer)
        p.data.normal_(0, 0.2) if p.ndim > 1 else None
    return tok.eval().save_pretrained(out)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny tokenizer and two emoji token caches of it: with adaptive (TSC) pairs and without."""
    from generator.cache import build_token_cache
    from tokenizer.core.data import DataConfig

    root = tmp_path_factory.mktemp("adaptive")
    tok = _tokenizer(root / "tok")
    data = DataConfig(source="emoji", max_images=48, val_fraction=0.25)
    return {"tok": tok,
            "cache": build_token_cache(tok, data, root / "cache", adaptive_threshold=0.2, batch_size=24,
                                       progress=False),
            "plain": build_token_cache(tok, data, root / "plain", batch_size=24, progress=False)}


@pytest.mark.parametrize("kind", KINDS)
def test_train_prior_on_adaptive_codes(kind: str, caches: dict[str, Path], tmp_path: Path) -> None:
    from generator.cache import load_token_cache
    from generator.train import DataMode, PriorKind, PriorRunConfig, train_prior
    from tokenizer.core.errors import UserError

    small = {"width": 32, "depth": 1, "heads": 2}
    train = TrainConfig(max_steps=6, batch_size=8, eval_every=0, progress=False, tensorboard=False,
                        warmup_steps=1)
    cfg = PriorRunConfig(kind=PriorKind(kind), tokens=str(caches["cache"]), tokenizer=str(caches["tok"]),
                         run_dir=str(tmp_path / "mix"), model=small, train=train, data_mode=DataMode.mixture,
                         adaptive_weight=0.5)
    result = train_prior(cfg)
    prior = load_prior(result.final_dir)
    assert prior.has_length_model and prior.config.length_model
    bits = result.bits_per_token
    assert {"bits_per_token", "bits_per_token/4", "bits_per_token/adaptive", "length_bits",
            "length_bits_per_token"} <= set(bits)
    assert 0 < bits["length_bits"] < 3 and result.histogram_length_bits is not None
    val = load_token_cache(caches["cache"], "val")
    assert bits["length_bits_per_token"] == pytest.approx(
        bits["length_bits"] * len(val.adaptive_lengths) / float(val.adaptive_lengths.sum()), rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert any("length_loss" in r for r in rows if r["kind"] == "train")

    plain = train_prior(PriorRunConfig(kind=PriorKind(kind), tokens=str(caches["cache"]), model=small,
                                       run_dir=str(tmp_path / "plain"), train=train))  # the default: as before
    assert not load_prior(plain.final_dir).has_length_model and "length_bits" not in plain.bits_per_token
    with pytest.raises(UserError, match="adaptive-threshold"):
        train_prior(PriorRunConfig(kind=PriorKind(kind), tokens=str(caches["plain"]), model=small,
                                   run_dir=str(tmp_path / "no"), train=train, data_mode=DataMode.adaptive))
    with pytest.raises(ValueError, match="length_model cannot be overridden"):
        PriorRunConfig(tokens="x", model={"length_model": True})

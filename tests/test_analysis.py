"""The paper's analyses (sampling.analysis, alit inspect / alit analyze) on tiny untrained tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sampling.analysis import latent_attention_maps, record_attention, run_recurrence
from slurm.cli import main as alit
from tokenizer.alit import ALITTokenizer
from tokenizer.vq import BaseVQ, base_vq_config

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = ["data.max_images=24", "data.val_fraction=0.5"]  # 12 val images a command reads


def _tok(seed: int = 0, **overrides: object) -> ALITTokenizer:
    torch.manual_seed(seed)
    tok = ALITTokenizer.build(BaseVQ(base_vq_config("tiny")), "tiny", image_size=64, **overrides)
    for p in tok.parameters():  # spread the init so codes depend on the input (an untrained tokenizer)
        p.data.normal_(0, 0.2) if p.ndim > 1 else None
    return tok.eval()


@pytest.fixture(scope="module")
def tok() -> ALITTokenizer:
    return _tok(0, depth=2, decoder_depth=2)


@pytest.fixture(scope="module")
def tok_dir(tok: ALITTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tok.save_pretrained(tmp_path_factory.mktemp("tok") / "final")


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g) * 2 - 1


# ============================================================================ specialization maps
def test_recorded_attention_rows_sum_to_one_and_restore_the_fast_path(tok: ALITTokenizer) -> None:
    images = _images()
    for which in ("encoder", "decoder"):
        with record_attention(tok, which) as records:
            run_recurrence(tok, images)
        assert sorted(records) == [0, 1]
        calls = records[0]
        assert len(calls) == tok.config.num_iters  # one per iteration (encoder) or decoder pass (decoder)
        n, t = tok.config.num_cells, tok.tokens_per_iter
        for i, w in enumerate(calls):
            assert w.shape == (3, 1 + n + (i + 1) * t, 1 + n + (i + 1) * t)
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5, rtol=0)
            assert bool((w >= 0).all())
    assert all("inspect_hook" not in vars(b.attn) for b in [*tok.alit.encoder.transformer,
                                                          *tok.alit.decoder.transformer])


def test_inspection_forward_equals_the_fast_path(tok: ALITTokenizer) -> None:
    images = _images()
    fast_ids, fast_logits = run_recurrence(tok, images)
    with record_attention(tok, "encoder"), record_attention(tok, "decoder") as dec:
        slow_ids, slow_logits = run_recurrence(tok, images)
    assert len(dec[0]) == tok.config.num_iters  # the explicit path really ran
    for a, b in zip(fast_logits, slow_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(fast_ids, slow_ids, strict=True):
        assert (a == b).float().mean() > 0.95  # argmax over cosines: a rare near-tie may flip
    codes = tok.encode_budgets(images)
    for k, ids in codes.ids.items():  # the recurrence here is encode_budgets'
        assert torch.equal(ids, fast_ids[k // tok.tokens_per_iter - 1])


def test_latent_maps_locate_the_attended_cells(tok: ALITTokenizer) -> None:
    images = _images(2)
    maps = latent_attention_maps(tok, images, "encoder", iterations=[0, 3], layers=[1])
    assert sorted(maps) == [(0, 1), (3, 1)]
    g, t = tok.config.base_grid, tok.tokens_per_iter
    assert maps[(3, 1)].shape == (2, 4 * t, g, g)
    share = maps[(0, 1)].flatten(2).sum(-1)
    assert bool((share > 0).all()) and bool((share <= 1 + 1e-6).all())
    dec = latent_attention_maps(tok, images, "decoder", iterations=[1])
    assert sorted(dec) == [(1, 0), (1, 1)] and dec[(1, 0)].shape == (2, 2 * t, g, g)


def test_cli_inspect_writes_overlays_and_index(tok_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "inspect"
    rc = alit(["inspect", "--tokenizer", str(tok_dir), "--out", str(out), "--images", "3", "--iterations", "0,3",
               "--layers", "1", "--which", "both", "--max-tokens", "8", "--device", "cpu", *DATA])
    assert rc == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert [m["file"] for m in index["maps"]] == ["encoder-iter0-layer1.png", "encoder-iter3-layer1.png",
                                                  "decoder-iter0-layer1.png", "decoder-iter3-layer1.png"]
    assert len(index["positions"]) == 3
    png = Image.open(out / "encoder-iter3-layer1.png")
    assert png.size == (3 * 66 + 2, 8 * 66 + 2)  # columns = 3 images, rows = 8 of the 16 tokens (64 px + 2)
    first = Image.open(out / "encoder-iter0-layer1.png")
    assert first.size == (3 * 66 + 2, 4 * 66 + 2)  # iteration 0 has T = 4 tokens
    maps = np.load(out / "attention.npz")
    assert maps["encoder-iter3-layer1"].shape == (3, 16, 8, 8)
    # a rerun into its own folder is fine; a folder of other files is refused in one line
    assert alit(["inspect", "--tokenizer", str(tok_dir), "--out", str(out), "--images", "1", "--iterations", "0",
                 "--device", "cpu", *DATA]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["encoder-iter0-layer0.png", "encoder-iter0-layer1.png"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    capsys.readouterr()
    assert alit(["inspect", "--tokenizer", str(tok_dir), "--out", str(other), "--device", "cpu", *DATA]) == 2
    err = capsys.readouterr().err
    assert "already holds other files" in err and len(err.strip().splitlines()) == 1
    assert (other / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("flags, words", [(["--layers", "5"], "out of range"),
                                          (["--iterations", "9"], "out of range"),
                                          (["--iterations", "x"], "comma-separated")])
def test_cli_inspect_bad_flags(tok_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                               flags: list[str], words: str) -> None:
    rc = alit(["inspect", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o"), "--device", "cpu",
               *flags, *DATA])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

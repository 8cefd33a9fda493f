"""The paper's analyses (sampling.analysis, alit inspect / alit analyze) on tiny untrained tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sampling.analysis import (
    TaskMeasured,
    complexity_measures,
    latent_attention_maps,
    measure_tasks,
    permutation_test,
    record_attention,
    run_recurrence,
    spearman,
    spearman_ci,
    tsc_choices,
)
from slurm.cli import main as alit
from tokenizer.alit import ALITTokenizer
from tokenizer.core.data import DataConfig, build_dataset
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


# ============================================================================ complexity
def test_spearman_on_known_rank_correlations() -> None:
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)  # monotone: ranks agree
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    y = np.array([2, 1, 4, 3, 6, 5, 8, 7, 10, 9], dtype=float)  # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    assert spearman(x, y) == pytest.approx(1 - 6 * 10 / (10 * 99))
    ties = np.array([1, 1, 2, 2, 3.0])  # average ranks 1.5, 1.5, 3.5, 3.5, 5 against 1..5
    ranks = np.array([1.5, 1.5, 3.5, 3.5, 5])
    assert spearman(np.arange(5.0), ties) == pytest.approx(np.corrcoef(np.arange(5.0), ranks)[0, 1])
    assert np.isnan(spearman(x, np.ones(10)))
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    r = spearman_ci(a, a + rng.normal(scale=0.5, size=200), reps=300, seed=3)
    assert r["ci"][0] < r["rho"] < r["ci"][1] and r["ci"][0] > 0.7 and r["n"] == 200
    assert spearman_ci(a, a + rng.normal(scale=0.5, size=200), reps=300, seed=3)["ci"] != r["ci"]  # other data
    b = np.where(np.arange(200) % 7 == 0, np.nan, a)  # NaN pairs are dropped
    assert spearman_ci(a, b, reps=50)["n"] == 200 - 29


def test_complexity_measures_rank_flat_below_busy_images() -> None:
    rng = np.random.default_rng(0)
    flat = np.full((64, 64, 3), 200, dtype=np.uint8)
    ramp = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, 0).repeat(3, 2)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    m = complexity_measures(np.stack([flat, ramp, noise]))
    assert set(m) == {"png_bpp", "jpeg_q75_bpp", "gradient"}
    for values in m.values():
        assert values[0] < values[2] and values[1] < values[2]
    assert m["gradient"][0] == 0 and m["gradient"][1] == pytest.approx(1 / 63, rel=1e-6)  # a ramp of 1/63 per pixel


def test_cli_analyze_complexity_writes_table_summary_and_plot(tok_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    scores = tmp_path / "scores.csv"
    out = tmp_path / "cx"
    rc = alit(["analyze", "complexity", "--tokenizer", str(tok_dir), "--out", str(out), "--device", "cpu",
               "--bootstrap", "200", "--adaptive-threshold", "0.2", *DATA])
    assert rc == 0, capsys.readouterr().err
    lines = (out / "complexity.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["index", "position", "label", "adaptive_budget"] and len(lines) == 13
    assert {"l1_4", "l1_16", "png_bpp", "jpeg_q75_bpp", "gradient"} <= set(header)
    summary = json.loads((out / "complexity.json").read_text())
    assert summary["images"] == 12 and summary["budgets"] == [4, 8, 12, 16]
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    # the summary rounds to 4 decimals
    assert summary["mean_adaptive_budget"] == pytest.approx(np.mean([int(r["adaptive_budget"]) for r in rows]),
                                                            abs=5e-5)
    budget_png = next(c for c in summary["correlations"]
                      if c["measure"] == "png_bpp" and c["target"] == "adaptive_budget")
    if budget_png["rho"] is not None:  # a constant budget has no rank correlation
        x = [float(r["png_bpp"]) for r in rows]
        y = [float(r["adaptive_budget"]) for r in rows]
        assert budget_png["rho"] == pytest.approx(spearman(x, y), abs=1e-6)
    l1_png = next(c for c in summary["correlations"] if c["measure"] == "png_bpp" and c["target"] == "l1_16")
    assert l1_png["n"] == 12 and l1_png["ci95"][0] <= l1_png["rho"] <= l1_png["ci95"][1]
    assert Image.open(out / "complexity.png").size[0] > 500
    # a user score column: the source index of each row, a score equal to png_bpp gives rho = +1 against it
    scores.write_text("index,mine\n" + "".join(f"{r['index']},{r['png_bpp']}\n" for r in rows))
    rc = alit(["analyze", "complexity", "--tokenizer", str(tok_dir), "--out", str(out), "--device", "cpu",
               "--bootstrap", "0", "--scores", str(scores), *DATA])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "complexity.json").read_text())
    mine = {c["target"]: c for c in summary["correlations"] if c["measure"] == "mine"}
    png = {c["target"]: c for c in summary["correlations"] if c["measure"] == "png_bpp"}
    assert mine["l1_8"]["rho"] == pytest.approx(png["l1_8"]["rho"], abs=1e-6) and mine["l1_8"]["n"] == 12
    scores.write_text("name,mine\na,1\n")
    capsys.readouterr()
    assert alit(["analyze", "complexity", "--tokenizer", str(tok_dir), "--out", str(out), "--device", "cpu",
                 "--scores", str(scores), *DATA]) == 2
    err = capsys.readouterr().err
    assert "'index'" in err and len(err.strip().splitlines()) == 1


# ============================================================================ familiarity
def test_permutation_test_separates_shifted_samples() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    assert permutation_test(a, a + 2.0, reps=500) == pytest.approx(1 / 501)  # no permutation is as extreme
    p_same = permutation_test(a, rng.normal(size=40), reps=500, seed=1)
    assert 0.05 < p_same <= 1.0
    assert permutation_test([1.0, 2.0], [1.0, 2.0], reps=100) == 1.0  # observed difference 0: every one ties
    assert permutation_test(a, a + 0.3, reps=300, seed=5) == permutation_test(a, a + 0.3, reps=300, seed=5)


def test_cli_analyze_familiarity_against_noise_images(tok_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    ood = tmp_path / "noise.npz"  # the out-of-distribution set: uniform RGB noise, 10 images
    np.savez(ood, images=rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8))
    out = tmp_path / "fam"
    rc = alit(["analyze", "familiarity", "--tokenizer", str(tok_dir), "--ood", str(ood), "--out", str(out),
               "--device", "cpu", "--permutations", "300", "--adaptive-threshold", "0.2", *DATA])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "familiarity.json").read_text())
    assert (summary["images_in"], summary["images_ood"]) == (12, 10)
    lines = (out / "familiarity.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert [r["set"] for r in rows] == ["in"] * 12 + ["ood"] * 10
    by = {c["target"]: c for c in summary["comparisons"]}
    assert list(by) == ["adaptive_budget", "l1_4", "l1_8", "l1_12", "l1_16"]
    for target in by:
        for side in ("in", "ood"):
            mean = np.mean([float(r[target]) for r in rows if r["set"] == side])
            assert by[target][f"mean_{side}"] == pytest.approx(mean, abs=1e-5)
        assert 0 < by[target]["p_value"] <= 1
    budgets = {s: [float(r["adaptive_budget"]) for r in rows if r["set"] == s] for s in ("in", "ood")}
    assert by["adaptive_budget"]["p_value"] == pytest.approx(permutation_test(budgets["in"], budgets["ood"], 300, 0),
                                                             abs=1e-6)  # the --seed 0 test of the table's values
    assert sum(summary["budget_histogram_ood"]) == pytest.approx(1.0)
    assert Image.open(out / "familiarity.png").size[0] > 500
    capsys.readouterr()
    assert alit(["analyze", "familiarity", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "x"),
                 "--device", "cpu", *DATA]) == 2
    err = capsys.readouterr().err
    assert "needs --ood" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing written for bad input


# ============================================================================ token selection by task
class _Constant(torch.nn.Module):
    """A classifier that always says class ``c``: it agrees with itself at every budget."""

    def __init__(self, c: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.c, self.classes = c, classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((len(images),), self.c), self.classes).float()


def test_task_criterion_never_exceeds_l1_when_the_classifier_always_agrees(tok: ALITTokenizer) -> None:
    data = build_dataset(DataConfig(max_images=24, val_fraction=0.5), "val")
    m = measure_tasks(tok, data, np.arange(len(data)), _Constant(), l1_threshold=0.2,
                      distance=lambda x, y: (x - y).pow(2).flatten(1).mean(1))
    choice = tsc_choices(m, lpips_threshold=0.3)
    assert set(choice) == {"l1", "lpips", "task"}
    assert (choice["task"] <= choice["l1"]).all() and (choice["task"] == tok.budgets[0]).all()
    assert len(set(choice["l1"].tolist())) > 1  # the L1 criterion varies: the comparison is not vacuous
    assert set(choice["lpips"].tolist()) <= set(tok.budgets)
    # a classifier that keeps the class only from 12 tokens on: the task criterion picks 12 (or the largest)
    b = np.array(tok.budgets)
    pred = np.where(b[None] >= 12, 5, 0).repeat(4, 0)
    synthetic = TaskMeasured(tok.budgets, np.full(4, 5), np.full(4, 4), np.zeros((4, 4)), None, pred, np.full(4, 5))
    assert tsc_choices(synthetic)["task"].tolist() == [12] * 4
    synthetic.pred_recon[:] = 0  # never right: the largest budget
    assert tsc_choices(synthetic, task_target="label")["task"].tolist() == [16] * 4


def test_cli_train_classifier_then_tsc_report(tok_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sampling.classifier import TinyClassifier
    from tokenizer.lpips import resolve_lpips

    clf = tmp_path / "clf"
    rc = alit(["analyze", "train-classifier", "--out", str(clf), "--steps", "20", "--batch-size", "8",
               "--device", "cpu", "data.max_images=40", "data.val_fraction=0.25"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((clf / "config.json").read_text())
    assert meta["config"]["num_classes"] == 10 and meta["training"]["steps"] == 20
    assert TinyClassifier.from_pretrained(clf)(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
    try:
        resolve_lpips()
        lpips = ["--lpips-threshold", "0.3"]
    except Exception:  # no LPIPS weights offline here: the LPIPS criterion is left out
        lpips = []
    out = tmp_path / "tsc"
    rc = alit(["analyze", "tsc", "--tokenizer", str(tok_dir), "--classifier", str(clf), "--out", str(out),
               "--device", "cpu", "--adaptive-threshold", "0.2", *lpips, *DATA])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "tsc.json").read_text())
    assert set(summary["criteria"]) == ({"l1", "lpips", "task"} if lpips else {"l1", "task"})
    lines = (out / "tsc.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert len(rows) == 12
    for name, r in summary["criteria"].items():
        chosen = [int(row[f"budget_{name}"]) for row in rows]
        assert r["mean_tokens"] == pytest.approx(np.mean(chosen), abs=1e-4)
        right = [row[f"pred_{k}"] == row["label"] for row, k in zip(rows, chosen, strict=True)]
        assert r["accuracy"] == pytest.approx(np.mean(right), abs=1e-4)
    # the task criterion keeps the original's class wherever some budget does: no fixed budget agrees more
    assert summary["criteria"]["task"]["agreement"] >= max(v["agreement"] for v in summary["fixed_budgets"].values())
    assert ("lpips" in summary["criteria"]) == bool(lpips)
    assert Image.open(out / "tsc.png").size[0] > 300
    capsys.readouterr()
    assert alit(["analyze", "tsc", "--tokenizer", str(tok_dir), "--classifier", str(tmp_path / "none"),
                 "--out", str(tmp_path / "t2"), "--device", "cpu", *DATA]) == 2
    err = capsys.readouterr().err
    assert "train-classifier" in err and len(err.strip().splitlines()) == 1

"""Sampling, reconstruction and evaluation (sampling/generate.py, sampling/report.py, alit sample/reconstruct/eval).

Tiny but real models: an untrained tiny ALIT tokenizer (weights spread so codes depend on the input) and a
tiny class-conditional MaskGIT prior recording that tokenizer's identity; the real emoji data and the real
offline FID Inception (about 12 images/s here, so N stays at 16).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from generator.cache import TokenizerMismatch, build_token_cache, write_identity
from generator.tasks import build_prior
from sampling import fid
from sampling.generate import (
    ADAPTIVE,
    SAMPLES,
    SampleSettings,
    Shard,
    budget_probs_from_cache,
    chunk_seed,
    eval_positions,
    load_image_set,
    load_models,
    sample_chunk,
    sample_to_folder,
)
from sampling.report import (
    GEN,
    RECON,
    EvalSettings,
    Evaluation,
    Piece,
    ReportError,
    merge_results,
    validate_report,
)
from slurm.cli import main as alit
from tokenizer.alit import ALITTokenizer
from tokenizer.core.checkpoint import tokenizer_identity
from tokenizer.core.data import DataConfig, build_dataset
from tokenizer.core.images import from_uint8
from tokenizer.vq import BaseVQ, base_vq_config


def _tokenizer(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    tok = ALITTokenizer.build(BaseVQ(base_vq_config("tiny")), "tiny", image_size=64)
    for p in tok.parameters():  # spread the init so codes depend on the input (an untrained tokenizer)
        p.data.normal_(0, 0.2) if p.ndim > 1 else None
    return tok.eval().save_pretrained(out)


def _prior(out: Path, tokenizer_dir: Path, seed: int = 0, kind: str = "maskgit", length_model: bool = False) -> Path:
    torch.manual_seed(seed)
    tok = ALITTokenizer.from_pretrained(tokenizer_dir)
    prior = build_prior(kind, "tiny", codebook_size=tok.codebook_size, tokens_per_iter=tok.tokens_per_iter,
                        num_budgets=len(tok.budgets), num_classes=10, length_model=length_model)
    for p in prior.parameters():  # non-uniform predictions that depend on class and budget
        p.data.normal_(0, 0.3) if p.ndim > 1 else None
    prior.save_pretrained(out)
    write_identity(out, tokenizer_identity(tokenizer_dir))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    a, b = _tokenizer(root / "tok_a", 0), _tokenizer(root / "tok_b", 1)
    return {"tok_a": a, "tok_b": b, "prior_a": _prior(root / "prior_a", a)}


def _npz_equal(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> None:
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


# ============================================================================ sampling
def test_sharded_sampling_equals_unsharded(ckpts: dict[str, Path], tmp_path: Path) -> None:
    models = load_models(ckpts["tok_a"], ckpts["prior_a"])
    settings = SampleSettings(budget=8, num_images=22, cfg_scale=1.5, chunk_size=4, seed=3)
    whole = sample_to_folder(models, settings, tmp_path / "one", progress=False)
    assert whole == tmp_path / "one" / models.prior_tag / "budget008-cfg1.5-seed3"
    assert whole.parent.name.startswith("prior_a-") and len(whole.parent.name) == len("prior_a-") + 8
    ref = load_image_set(whole / f"{SAMPLES}.npz")
    assert ref["images"].shape == (22, 64, 64, 3) and ref["images"].dtype == np.uint8
    assert np.array_equal(ref["indices"], np.arange(22)) and np.array_equal(ref["labels"], np.arange(22) % 10)
    assert (ref["budgets"] == 8).all()
    assert not np.array_equal(ref["images"][0], ref["images"][4])  # chunks differ: their seeds differ
    assert sorted(p.name for p in whole.glob("*.png")) == [f"{i:06d}.png" for i in range(22)]

    # two shards through the library: nothing merged until the second one is done
    two = tmp_path / "two"
    folder = sample_to_folder(models, settings, two, Shard(1, 2), progress=False)
    assert not (folder / f"{SAMPLES}.npz").exists()
    assert sorted(load_image_set(folder / f"{SAMPLES}-shard0001-of-0002.npz")["indices"].tolist()) == \
        Shard(1, 2).indices(22, 4).tolist()
    sample_to_folder(models, settings, two, Shard(0, 2), progress=False)
    _npz_equal(load_image_set(folder / f"{SAMPLES}.npz"), ref)

    # three shards through the command line, in any order
    three = tmp_path / "three"
    for i in (2, 0, 1):
        assert alit(["sample", "--tokenizer", str(ckpts["tok_a"]), "--prior", str(ckpts["prior_a"]),
                     "--budgets", "8", "--num-images", "22", "--cfg", "1.5", "--seed", "3", "--batch-size", "4",
                     "--shard", f"{i}/3", "--out", str(three), "--device", "cpu", "--no-progress"]) == 0
    merged = three / models.prior_tag / whole.name
    _npz_equal(load_image_set(merged / f"{SAMPLES}.npz"), ref)
    for i in (0, 13, 21):  # the PNGs are the npz images
        assert np.array_equal(np.asarray(Image.open(merged / f"{i:06d}.png")), ref["images"][i])


def test_same_seed_same_images(ckpts: dict[str, Path]) -> None:
    models = load_models(ckpts["tok_a"], ckpts["prior_a"])
    settings = SampleSettings(budget=16, num_images=8, chunk_size=4, seed=0, classes=7, temperature=1.0)
    a, b = sample_chunk(models, settings, 1), sample_chunk(models, settings, 1)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.indices, [4, 5, 6, 7])
    assert (a.labels == 7).all() and (a.budgets == 16).all()
    other = sample_chunk(models, SampleSettings(**{**settings.to_dict(), "seed": 1}), 1)
    assert not np.array_equal(a.images, other.images)
    assert chunk_seed(0, 1) != chunk_seed(1, 0) and chunk_seed(0, 1) == chunk_seed(0, 1)
    with pytest.raises(ValueError, match="outside"):
        sample_chunk(models, SampleSettings(budget=4, num_images=2, classes=10), 0)


def test_adaptive_budgets_from_token_cache(ckpts: dict[str, Path], tmp_path: Path) -> None:
    data = DataConfig(source="emoji", max_images=24, val_fraction=0.25)
    cache = build_token_cache(ckpts["tok_a"], data, tmp_path / "cache", adaptive_threshold=0.3, batch_size=24,
                              progress=False)
    models = load_models(ckpts["tok_a"], ckpts["prior_a"])
    space = models.require_prior().space
    probs = budget_probs_from_cache(cache, space, "train", models.tokenizer_identity)
    assert probs.shape == (11, 4) and torch.allclose(probs.sum(-1), torch.ones(11))
    with pytest.raises(TokenizerMismatch):
        budget_probs_from_cache(cache, space, "train", tokenizer_identity(ckpts["tok_b"]))
    point = torch.zeros(11, 4)
    point[:, 1] = 1.0  # every class: 8 tokens
    point[3] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # class 3: 16 tokens
    settings = SampleSettings(budget=ADAPTIVE, num_images=12, chunk_size=4, length_model="histogram")
    whole = sample_to_folder(models, settings, tmp_path / "one", budget_probs=point, png=False, progress=False)
    out = load_image_set(whole / f"{SAMPLES}.npz")
    assert whole.name == "adaptive-cfg0-seed0"
    assert np.array_equal(out["budgets"], np.where(out["labels"] == 3, 16, 8))
    for i in (1, 0):
        sample_to_folder(models, settings, tmp_path / "two", Shard(i, 2), budget_probs=point, png=False,
                         progress=False)
    _npz_equal(load_image_set(tmp_path / "two" / whole.relative_to(tmp_path / "one") / f"{SAMPLES}.npz"), out)


def test_identity_check_refuses_mismatched_prior(ckpts: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(TokenizerMismatch, match="re-tokenize"):
        load_models(ckpts["tok_b"], ckpts["prior_a"])
    rc = alit(["sample", "--tokenizer", str(ckpts["tok_b"]), "--prior", str(ckpts["prior_a"]), "--out",
               str(tmp_path), "--device", "cpu"])
    assert rc == 2 and "was made with tokenizer" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
    bare = tmp_path / "bare_prior"
    build_prior("maskgit", "tiny", codebook_size=64, tokens_per_iter=4, num_budgets=4).save_pretrained(bare)
    with pytest.raises(TokenizerMismatch, match="records no tokenizer"):
        load_models(ckpts["tok_a"], bare)


# ============================================================================ reconstruction
def test_reconstruct_layout(ckpts: dict[str, Path], tmp_path: Path) -> None:
    assert alit(["reconstruct", "--tokenizer", str(ckpts["tok_a"]), "--budgets", "4,adaptive",
                 "--adaptive-threshold", "0.2", "--num-images", "6", "--batch-size", "4", "--out", str(tmp_path),
                 "--device", "cpu", "--no-progress", "data.source=emoji"]) == 0
    tag = f"tok_a-{tokenizer_identity(ckpts['tok_a'])['id'][:8]}"
    assert sorted(p.name for p in (tmp_path / tag).iterdir()) == ["recon-adaptive-t0.2", "recon-budget004"]
    tok = ALITTokenizer.from_pretrained(ckpts["tok_a"]).eval()
    ds = build_dataset(DataConfig(), "val")
    positions = eval_positions(ds, 6, 0)
    x = from_uint8(np.concatenate([ds.uint8_images(int(p), int(p) + 1) for p in positions]))
    for name in ("recon-budget004", "recon-adaptive-t0.2"):
        folder = tmp_path / tag / name
        assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
        rec = load_image_set(folder / "reconstructions.npz")
        assert set(rec) == {"images", "labels", "budgets", "indices", "l1", "positions"}
        assert rec["images"].shape == (6, 64, 64, 3) and np.array_equal(rec["positions"], positions)
        assert np.array_equal(rec["labels"], ds.labels[positions].numpy())
        assert json.loads((folder / "reconstructions.json").read_text())["num_images"] == 6
    rec = load_image_set(tmp_path / tag / "recon-budget004" / "reconstructions.npz")
    expected = tok.decode(tok.encode(x, 4))
    assert np.abs(rec["images"].astype(int) - ((expected + 1) * 127.5).round().numpy().transpose(0, 2, 3, 1)).max() <= 1
    assert np.allclose(rec["l1"], (expected - x).abs().flatten(1).mean(1).numpy() / 2, atol=1e-5)
    adaptive = load_image_set(tmp_path / tag / "recon-adaptive-t0.2" / "reconstructions.npz")
    _, lengths = tok.encode_adaptive(x, 0.2)
    assert np.array_equal(adaptive["budgets"], lengths.numpy())
    # --adm: the set also as an ADM batch (arr_0 uint8 NHWC, arr_1 labels), which the FID tools read back
    assert alit(["reconstruct", "--tokenizer", str(ckpts["tok_a"]), "--budgets", "4", "--num-images", "6",
                 "--batch-size", "4", "--out", str(tmp_path), "--device", "cpu", "--no-progress", "--adm",
                 "data.source=emoji"]) == 0
    with np.load(tmp_path / tag / "recon-budget004" / "reconstructions_adm.npz", allow_pickle=False) as adm:
        assert sorted(adm.files) == ["arr_0", "arr_1"] and np.array_equal(adm["arr_0"], rec["images"])
        assert adm["arr_0"].dtype == np.uint8 and np.array_equal(adm["arr_1"], rec["labels"])
    from sampling.fid_io import read_adm_batch

    assert np.array_equal(read_adm_batch(tmp_path / tag / "recon-budget004" / "reconstructions_adm.npz")[0],
                          rec["images"])


# ============================================================================ evaluation
def test_eval_report_and_feature_cache(ckpts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report"
    before = {k: tokenizer_identity(v)["id"] for k, v in ckpts.items()}
    argv = ["eval", "--tokenizer", str(ckpts["tok_a"]), "--prior", str(ckpts["prior_a"]), "--budgets", "4,8",
            "--num-images", "16", "--adaptive-threshold", "0.2", "--batch-size", "8",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    assert alit(argv) == 0
    first = capsys.readouterr()
    assert "reused cached features" not in first.err and "rFID" in first.out
    files = {"report.json", "report.md", "fid_vs_tokens.png", "reconstructions.png", "samples_budget004.png",
             "samples_budget008.png", "adaptive_histogram.png", "specialization.png"}
    assert {p.name for p in out.iterdir()} == files | {"complexity"}
    files.add("complexity/complexity.png")
    assert (out / "complexity" / "complexity.csv").is_file()
    assert json.loads((out / "complexity" / "complexity.json").read_text())["images"] == 16
    for name in files - {"report.json", "report.md"}:
        with Image.open(out / name) as im:
            assert im.size[0] > 100 and im.size[1] > 50, name
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert set(report["files"]) == files
    assert [e["budget"] for e in report["budgets"]] == [4, 8]
    for e in report["budgets"]:
        assert e["n_images"] == e["n_samples"] == 16 and e["rfid"] > 0 and e["gfid"] > 0 and 0 < e["l1"] < 1
        assert e["tokenizer_id"] == before["tok_a"] and e["prior_id"] == before["prior_a"]
        assert e["protocol_id"] == report["protocol"]["id"] and "torch-fidelity==" in e["protocol_id"]
    a = report["adaptive"]
    assert sum(a["histogram"].values()) == 16 and set(a["histogram"]) == {"4", "8", "12", "16"}
    assert a["gfid"] is None and "token cache" in a["gfid_note"]  # the prior has no run directory
    assert report["versions"]["torch-fidelity"] and report["data"]["n_images"] == 16
    md = (out / "report.md").read_text()
    assert "| 4 |" in md and "![reconstructions](reconstructions.png)" in md
    with Image.open(out / "specialization.png") as im:  # rows = the 4 first-iteration tokens, columns = 4 images
        assert im.size == (4 * 66 + 2, 4 * 66 + 2), im.size

    # the validator catches departures from the schema
    for break_it in (lambda r: r["budgets"][0].pop("rfid"), lambda r: r["adaptive"]["histogram"].update({"4": 99}),
                     lambda r: r["budgets"][1].update(gfid=None), lambda r: r.update(format_version=99),
                     lambda r: r["budgets"].reverse()):
        bad = copy.deepcopy(report)
        break_it(bad)
        with pytest.raises(ReportError):
            validate_report(bad)

    # a re-run extracts no features: every piece and the reference come from the cache
    def no_network(self: fid.FeatureExtractor, batch: np.ndarray) -> np.ndarray:
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(fid.FeatureExtractor, "_forward", no_network)
    assert alit(argv) == 0
    again = capsys.readouterr().err
    assert again.count("reused cached features") == 5  # recon 4, 8, adaptive; gen 4, 8
    rerun = json.loads((out / "report.json").read_text())
    assert [e["rfid"] for e in rerun["budgets"]] == [e["rfid"] for e in report["budgets"]]
    assert [e["gfid"] for e in rerun["budgets"]] == [e["gfid"] for e in report["budgets"]]
    assert {k: tokenizer_identity(v)["id"] for k, v in ckpts.items()} == before  # checkpoints untouched


def test_eval_pieces_merge_across_shards(ckpts: dict[str, Path], tmp_path: Path) -> None:
    settings = EvalSettings(budgets=(8,), num_images=8, adaptive_threshold=None, chunk_size=4, preview=4)
    ev = Evaluation.load(ckpts["tok_a"], ckpts["prior_a"], DataConfig(), settings, progress=False)
    assert [str(p) for p in ev.plan(2)] == ["recon budget008 [0/2]", "recon budget008 [1/2]",
                                           "gen budget008 [0/2]", "gen budget008 [1/2]"]
    whole = ev.evaluate_piece(Piece(RECON, 8))
    parts = [ev.evaluate_piece(Piece(RECON, 8, Shard(i, 2))) for i in (1, 0)]
    assert [p.n for p in parts] == [4, 4] and not any(p.reused for p in parts)
    merged = merge_results(parts)[(RECON, 8)]
    assert merged.n == whole.n == 8 and merged.histogram == whole.histogram == {8: 8}
    assert np.allclose(merged.stats.mean, whole.stats.mean, rtol=1e-10, atol=1e-12)
    assert np.allclose(merged.stats.cov, whole.stats.cov, rtol=1e-8, atol=1e-10)
    assert merged.l1_sum == pytest.approx(whole.l1_sum, rel=1e-9)
    assert merged.lpips_sum == pytest.approx(whole.lpips_sum, rel=1e-5)
    assert np.array_equal(merged.preview_images(4), whole.preview_images(4))
    with pytest.raises(ValueError, match="complete set"):
        merge_results(parts[:1])
    originals = np.concatenate([ev.dataset.uint8_images(int(p), int(p) + 1) for p in ev.positions])
    assert np.array_equal(ev.extractor.accumulate(originals).mean, ev.reference().mean)  # rFID's images
    assert ev.load_piece(Piece(GEN, 8, Shard(0, 2))) is None  # never computed: no cache entry
    assert ev.run(tmp_path, Shard(0, 2)) is None  # shard 1/2 still missing: no report yet
    assert not (tmp_path / "report.json").exists()


# ============================================================================ adaptive generation (issue 16)
def test_learned_adaptive_sampling_and_eval_row(ckpts: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """``alit sample --budgets adaptive`` and ``alit eval`` use the prior's length model; the report's adaptive
    row names it and compares the generated lengths with the split's TSC lengths; a prior without one is
    refused in one line naming --length-model histogram, which still works as the explicit baseline."""
    prior = _prior(tmp_path / "prior_len", ckpts["tok_a"], kind="ar", length_model=True)
    data = DataConfig(source="emoji", max_images=24, val_fraction=0.25)
    cache = build_token_cache(ckpts["tok_a"], data, tmp_path / "cache", adaptive_threshold=0.3, batch_size=24,
                              progress=False)
    base = ["sample", "--tokenizer", str(ckpts["tok_a"]), "--num-images", "8", "--batch-size", "4",
            "--device", "cpu", "--no-progress", "--no-png", "--budgets", "adaptive"]
    assert alit([*base, "--prior", str(prior), "--out", str(tmp_path / "s"), "--max-budget", "12"]) == 0
    models = load_models(ckpts["tok_a"], prior)
    out = load_image_set(tmp_path / "s" / models.prior_tag / "adaptive-learned-max12-cfg0-seed0" / f"{SAMPLES}.npz")
    assert set(out["budgets"].tolist()) <= {4, 8, 12} and len(out["budgets"]) == 8
    capsys.readouterr()
    assert alit([*base, "--prior", str(ckpts["prior_a"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has none" in err and "--length-model histogram" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert alit([*base, "--prior", str(ckpts["prior_a"]), "--out", str(tmp_path / "h"), "--length-model",
                 "histogram", "--tokens", str(cache)]) == 0
    assert (tmp_path / "h" / load_models(ckpts["tok_a"], ckpts["prior_a"]).prior_tag / "adaptive-cfg0-seed0").is_dir()
    assert alit([*base, "--prior", str(ckpts["prior_a"]), "--out", str(tmp_path / "y"), "--budgets", "8",
                 "--budget-temperature", "0.5"]) == 2

    report_dir = tmp_path / "report"
    assert alit(["eval", "--tokenizer", str(ckpts["tok_a"]), "--prior", str(prior), "--num-images", "12",
                 "--adaptive-threshold", "0.3", "--batch-size", "6", "--tokens", str(cache), "--out",
                 str(report_dir), "--device", "cpu", "--no-progress"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    validate_report(report)
    a = report["adaptive"]
    assert a["length_model"] == "learned" and a["gfid"] is not None and a["n_samples"] == 12
    assert sum(a["generated_histogram"].values()) == 12 and 0 <= a["length_tv"] <= 1
    assert a["matched_budget"] in (4, 8, 12, 16) and a["gfid_matched"] == next(
        e["gfid"] for e in report["budgets"] if e["budget"] == a["matched_budget"])
    assert set(a["gfid_minus_budget"]) == {"4", "8", "12", "16"}
    assert a["length_tv_per_class"] and all(0 <= v <= 1 for v in a["length_tv_per_class"].values())
    assert a["ids_bits_per_token"] > 0 and a["length_bits_per_token"] > 0 and a["heldout_images"] > 0
    assert a["histogram_length_bits_per_token"] > 0
    md = (report_dir / "report.md").read_text()
    assert "length_model: learned" in md and "| tokens | generated | TSC (data) |" in md
    printed = capsys.readouterr().out
    assert "adaptive samples: length_model learned" in printed
    # the printed table: every budget's numbers, with the samples' KID x 1e3, precision and recall
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("[eval] "))
    assert lines[start + 1].split() == ["budget", "rFID", "gFID", "L1", "LPIPS", "gKIDx1e3", "prec", "recall"]
    for line, e in zip(lines[start + 2:], report["budgets"], strict=False):
        m = e["gen_metrics"]
        assert line.split() == [str(e["budget"]), f"{e['rfid']:.2f}", f"{e['gfid']:.2f}", f"{e['l1']:.4f}",
                                f"{e['lpips']:.4f}", f"{m['kid_mean'] * 1e3:.2f}", f"{m['precision']:.3f}",
                                f"{m['recall']:.3f}"], line

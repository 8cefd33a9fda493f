"""Named evaluation protocols (sampling/protocol.py) and the standard metric set in the report.

What the tests prove:
- protocols load by name, by YAML and as the bare feature protocols; bad ones are refused naming the key;
- the sFID hook reads the ADM evaluator's tensor: ``Mixed_6d.branch1x1``, first 7 channels, NHWC order
  (checked against a forward pass run by hand through the trunk);
- ``compute_metrics`` gives fid.kid / fid.precision_recall / the Frechet distance of its inputs, and says
  why a metric is missing;
- an evaluation under a protocol reports FID, sFID, KID and precision/recall per budget with the protocol
  named, ``seeds=2`` gives the mean and spread of the per-seed numbers, and an ADM-format npz reference
  of the same images gives the same generated numbers as the split reference;
- the Inception Score equals torch-fidelity's with a classifier head (slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from sampling import fid
from sampling.fid_io import write_adm_batch
from sampling.protocol import (
    SPATIAL_DIM,
    EvalProtocol,
    ReferenceSet,
    compute_metrics,
    load_protocol,
    mean_and_spread,
    spatial_features,
)
from sampling.report import EvalSettings, Evaluation, validate_report
from tests.test_sampling_eval import _prior, _tokenizer
from tokenizer.core.config import ConfigError
from tokenizer.core.data import DataConfig, build_dataset
from tokenizer.core.paths import alit_home

pytestmark = pytest.mark.usefixtures("one_thread")


def test_protocols_by_name_yaml_and_feature_name(tmp_path: Path) -> None:
    demo = load_protocol("demo_emoji")
    assert demo.name == "demo_emoji" and demo.reference.kind == "split" and demo.reference.split is None
    assert demo.metrics == ["fid", "sfid", "kid", "prc", "isc"] and demo.resolution == 64
    imagenet = load_protocol("gfid50k_imagenet")
    assert imagenet.num_samples == 50_000 and imagenet.classes == "balanced" and imagenet.reference.kind == "npz"
    assert imagenet.reference.file() == alit_home() / "references" / "VIRTUAL_imagenet256_labeled.npz"
    assert "50000 samples" in imagenet.summary("val") and "gfid50k_imagenet" in imagenet.summary("val")
    bare = load_protocol("clean-fid")
    assert bare.features == "clean_fid" and bare.name == "split-clean_fid"
    custom = tmp_path / "mine.yaml"
    custom.write_text("name: mine\nnum_samples: 10\nmetrics: [fid, kid]\nreference: {kind: split, split: train}\n")
    mine = load_protocol(str(custom))
    assert (mine.name, mine.num_samples, mine.metrics, mine.reference.split) == ("mine", 10, ["fid", "kid"], "train")
    assert EvalProtocol.from_dict(mine.to_dict()) == mine  # what travels to jobs and into stage hashes
    with pytest.raises(ConfigError, match="choose one of demo_emoji"):
        load_protocol("imagenet50k")
    for bad, match in (("metrics: [fid, fvd]", "choose from"), ("classes: some", "classes"),
                       ("reference: {kind: npz}", "needs reference.path"), ("nonsense: 1", "nonsense")):
        custom.write_text(f"name: bad\n{bad}\n")
        with pytest.raises(ConfigError, match=match):
            load_protocol(str(custom))
    settings = EvalSettings(protocol="demo_emoji")
    assert settings.eval_protocol == demo and EvalSettings(**{**settings.__dict__}).protocol_spec == demo.to_dict()


def test_spatial_features_are_mixed_6d_branch1x1_nhwc() -> None:
    images = build_dataset(DataConfig(), "val").uint8_images(0, 3)  # (3, 64, 64, 3)
    extractor = fid.FeatureExtractor("torch_fidelity", "cpu", progress=False)
    pool3, spatial = spatial_features(extractor, images)
    assert pool3.shape == (3, 2048) and spatial.shape == (3, SPATIAL_DIM)
    np.testing.assert_allclose(pool3, extractor.extract(images), rtol=1e-6)  # the hook changes nothing
    net = extractor._load().net
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)  # torch-fidelity's
    x = (x - 128) / 128
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            x = getattr(net, name)(x)
        by_hand = net.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).reshape(3, -1).numpy()  # (3, 2023)
        wrong_layout = net.Mixed_6d.branch1x1(x)[:, :7].reshape(3, -1).numpy()  # NCHW flattening
    np.testing.assert_allclose(spatial, by_hand, rtol=1e-5, atol=1e-5)
    assert not np.allclose(spatial, wrong_layout, atol=1e-3)


def test_compute_metrics_is_the_fid_module_on_its_inputs() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 64)), rng.normal(0.3, 1.0, size=(30, 64))  # any dimension: small is fast
    sa, sb = rng.normal(size=(40, 48)), rng.normal(size=(30, 48))
    stats, ref_stats = fid.FeatureStats.from_features(a), fid.FeatureStats.from_features(b)
    spatial_ref = fid.FeatureStats.from_features(sb)
    ref = ReferenceSet("b", ref_stats.mean, ref_stats.cov, 30, features=b, spatial_mu=spatial_ref.mean,
                       spatial_sigma=spatial_ref.cov)
    protocol = EvalProtocol(metrics=["fid", "sfid", "kid", "prc"], kid_subsets=10, kid_subset_size=20)
    out = compute_metrics(protocol, stats, ref, features=a, spatial=fid.FeatureStats.from_features(sa))
    assert out["fid"] == pytest.approx(fid.fid_from_stats(stats, ref_stats), rel=1e-9)
    assert out["sfid"] == pytest.approx(fid.frechet_distance(sa.mean(0), np.cov(sa, rowvar=False), sb.mean(0),
                                                             np.cov(sb, rowvar=False)), rel=1e-6)
    assert (out["kid_mean"], out["kid_std"]) == fid.kid(a, b, subsets=10, subset_size=20)
    prc = fid.precision_recall(a, b)
    assert (out["precision"], out["recall"]) == (prc["precision"], prc["recall"]) and out["n_reference"] == 30
    bare = ReferenceSet("stats only", ref_stats.mean, ref_stats.cov, None)
    out = compute_metrics(protocol, stats, bare, features=a, spatial=fid.FeatureStats.from_features(sa))
    assert out["kid_mean"] is None and out["sfid"] is None and len(out["notes"]) == 2
    runs = [{"fid": 1.0, "n": 5, "kid_mean": None, "notes": ["x"]}, {"fid": 3.0, "n": 5, "kid_mean": None,
                                                                    "notes": ["x"]}]
    spread = mean_and_spread(runs)
    assert spread["fid"] == 2.0 and spread["fid_std"] == pytest.approx(2 ** 0.5) and spread["fid_seeds"] == [1, 3]
    assert spread["kid_mean"] is None and spread["notes"] == ["x"] and spread["n"] == 5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("protocol_models")
    tok = _tokenizer(root / "tok", 0)
    return {"tok": tok, "prior": _prior(root / "prior", tok)}


def evaluate(models: dict[str, Path], out: Path, protocol: str = "demo_emoji", seeds: int = 2,
             num_images: int = 8) -> dict:
    """A small real evaluation (``num_images``, budget 4, ``seeds``) under ``protocol``; returns report.json."""
    settings = EvalSettings(budgets=(4,), num_images=num_images, adaptive_threshold=None, chunk_size=8,
                            preview=4, protocol=protocol, seeds=seeds)
    ev = Evaluation.load(models["tok"], models["prior"], DataConfig(), settings, progress=False)
    report = ev.run(out)
    assert report is not None
    return report


def test_reference_moments_and_extras_share_one_inception_pass(models: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIT_HOME", str(tmp_path))  # an empty feature cache (the weights have their own)
    settings = EvalSettings(budgets=(4,), num_images=8, adaptive_threshold=None, chunk_size=8, protocol="demo_emoji")
    ev = Evaluation.load(models["tok"], None, DataConfig(), settings, progress=False)
    ev.extractor.batch_size = 3  # several batches
    ref = ev.reference()
    recon, _ = ev.reference_sets(ref)
    assert ev.extractor.images_processed == 8  # one pass gave the moments, the features and the spatial moments
    # the moments are those of reference_stats' own pass over the same images, and are its cache entry
    separate = fid.FeatureExtractor(ev.protocol, "cpu", batch_size=3, progress=False)
    images = np.concatenate([ev.dataset.uint8_images(int(p), int(p) + 1) for p in ev.positions])
    expected = separate.accumulate(images)
    assert ref.n == expected.n == 8
    np.testing.assert_allclose(ref.mean, expected.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.cov, expected.cov, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(recon.features, ref_features := separate.extract(images), rtol=1e-6, atol=1e-6)
    assert recon.spatial_mu is not None and ref_features.shape == (8, 2048)
    again = Evaluation.load(models["tok"], None, DataConfig(), settings, progress=False)
    np.testing.assert_array_equal(again.reference().mean, ref.mean)
    again.reference_sets(ref)
    assert again.extractor.images_processed == 0  # both caches hit


@pytest.mark.slow  # ~25 s on an idle 2-core machine: two evaluations, eight Frechet distances
def test_report_has_the_metric_set_per_budget_with_seeds(models: dict[str, Path], tmp_path: Path) -> None:
    report = evaluate(models, tmp_path / "report")
    validate_report(report)
    assert report["format_version"] == 2 and report["protocol"]["eval"]["name"] == "demo_emoji"
    assert report["settings"]["seeds"] == 2 and report["settings"]["num_samples"] == 8
    (entry,) = report["budgets"]
    recon, gen = entry["recon_metrics"], entry["gen_metrics"]
    for m in (recon, gen):
        assert m["n"] == 8 and m["n_reference"] == 8
        assert m["sfid"] > 0 and m["kid_mean"] is not None and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
        assert m["isc_mean"] is None and any("Inception Score" in n for n in m["notes"])
    assert recon["fid"] == entry["rfid"] and gen["fid"] == entry["gfid"]
    assert gen["seeds"] == [0, 1] and len(gen["fid_seeds"]) == 2 and gen["fid_seeds"][0] != gen["fid_seeds"][1]
    assert gen["fid"] == pytest.approx(np.mean(gen["fid_seeds"])) and gen["fid_std"] == pytest.approx(
        np.std(gen["fid_seeds"], ddof=1))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Standard metrics (protocol `demo_emoji`)" in md and "KID x 1e3" in md and " ± " in md
    assert "| 4 | samples | 8 | 8 |" in md and "Protocol demo_emoji:" in md

    # the same images as an ADM-format npz reference give the same generated numbers
    ds = build_dataset(DataConfig(), "val")
    ev_positions = Evaluation.load(models["tok"], None, DataConfig(), EvalSettings(budgets=(4,), num_images=8),
                                   progress=False).positions
    images = np.concatenate([ds.uint8_images(int(p), int(p) + 1) for p in ev_positions])
    write_adm_batch(alit_home() / "references" / "same8.npz", images)
    yaml = tmp_path / "npz.yaml"
    yaml.write_text("name: npz8\nreference: {kind: npz, path: references/same8.npz}\nresolution: 64\n")
    other = evaluate(models, tmp_path / "npz", str(yaml))
    (npz_entry,) = other["budgets"]
    assert other["protocol"]["gen_reference"].startswith("ADM/npz image batch")
    for key in ("fid", "sfid", "precision", "recall"):
        assert npz_entry["gen_metrics"][key] == pytest.approx(gen[key], rel=1e-6, abs=1e-9), key
    assert npz_entry["rfid"] == entry["rfid"]
    assert json.loads((tmp_path / "npz" / "report.json").read_text())["protocol"]["eval"]["name"] == "npz8"


def test_protocol_refuses_a_mismatched_resolution(models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="gfid50k_imagenet evaluates 256px images"):
        Evaluation.load(models["tok"], None, DataConfig(), EvalSettings(protocol="gfid50k_imagenet"), progress=False)


@pytest.mark.slow
def test_inception_score_equals_torch_fidelity_with_a_head(tmp_path: Path) -> None:
    import torch_fidelity
    from PIL import Image

    from sampling.inception import load_inception_state, resolve_inception, torch_fidelity_kwargs
    from sampling.protocol import inception_score

    state = load_inception_state(resolve_inception().path)
    generator = torch.Generator().manual_seed(0)
    head = {"fc.weight": torch.randn(1008, 2048, generator=generator) * 0.05, "fc.bias": torch.zeros(1008)}
    weights = tmp_path / "with_fc.pth"
    torch.save({**state, **head}, weights)
    images = build_dataset(DataConfig(), "val").uint8_images(0, 8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:02d}.png")
    features = fid.FeatureExtractor("torch_fidelity", "cpu", weights=weights, progress=False).extract(images)
    ours = inception_score(features, weights, splits=2)
    theirs = torch_fidelity.calculate_metrics(input1=str(folder), isc=True, isc_splits=2, cuda=False, cache=False,
                                              verbose=False, **torch_fidelity_kwargs(weights))
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-4, abs=1e-6)

"""ADM-format batches, foreign statistics files, ``alit fid-stats`` and ``alit fid`` (sampling/fid_io.py).

Real images: 24 emoji flags (A) and 24 smileys (B) of the embedded Noto set, written by the test as PNG
folders and npz batches, through the real offline FID Inception. Each image set's features are extracted
once per module (the ``FidInput`` objects keep them); the commands extract again where that is what is
tested (a folder vs its own npz batch, a statistics file written by ``alit fid-stats``).

Foreign formats are written here the way their own code writes them (see sampling/fid_io.py):
guided-diffusion ``np.savez(path, arr, labels)`` (``arr_0``/``arr_1``) and reference batches with
``mu``/``sigma``/``mu_s``/``sigma_s``; pytorch-fid ``np.savez_compressed(path, mu=, sigma=)``; clean-fid
the same for FID and ``np.savez_compressed(outf, feats=)`` for KID.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sampling.fid import FeatureExtractor, FeatureStats, FIDProtocol, frechet_distance
from sampling.fid_io import (
    FID_STATS_FORMAT,
    FidIOError,
    GaussianStats,
    compare,
    input_features,
    open_fid_input,
    read_adm_batch,
    read_stats,
    write_adm_batch,
    write_fid_stats,
)
from slurm.cli import main as alit
from tokenizer.core.data import DataConfig, build_dataset

N = 24
CATEGORIES = ("Flags", "Smileys & Emotion")
KID_SUBSETS = 10  # torch-fidelity's KID loop costs ~0.05 s per subset at D = 2048 here

pytestmark = pytest.mark.usefixtures("one_thread")  # faster on this loaded 2-core machine

def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------------------------
# fixtures: real images as folders and batches, one extractor, inputs whose features are kept
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    dataset = build_dataset(DataConfig(), "all")  # the embedded emoji set, 64 px
    labels = dataset.labels.numpy()
    out = {}
    for key, category in zip("ab", CATEGORIES):
        positions = np.flatnonzero(labels == dataset.class_names.index(category))[:N]
        out[key] = (np.concatenate([dataset.uint8_images(int(p), int(p) + 1) for p in positions]), labels[positions])
    assert all(images.shape == (N, 64, 64, 3) and images.dtype == np.uint8 for images, _ in out.values())
    return out


@pytest.fixture(scope="module")
def files(image_sets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid_io")
    out = {}
    for key, (images, labels) in image_sets.items():
        folder = root / f"{key}_png"
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:03d}.png")  # lossless
        out[f"{key}_png"] = folder
        out[f"{key}_npz"] = write_adm_batch(root / f"{key}_adm.npz", folder, labels)
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(FIDProtocol.torch_fidelity, "cpu", batch_size=N, progress=False)


@pytest.fixture(scope="module")
def a_stats(files) -> Path:
    """``alit fid-stats`` of A's npz batch, with its features: the one extraction of the npz path."""
    out = files["root"] / "a_stats.npz"
    assert alit(["fid-stats", str(files["a_npz"]), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--batch-size", str(N), "--keep-features"]) == 0
    return out


@pytest.fixture(scope="module")
def inputs(files, extractor, a_stats) -> dict:
    items = {key: open_fid_input(files[key]) for key in ("a_png", "b_png", "a_npz")}
    for key in ("a_png", "b_png"):
        input_features(items[key], extractor)  # once per module
    with np.load(a_stats, allow_pickle=False) as data:  # as alit fid-stats extracted them from the npz batch
        items["a_npz"].features = data["feats"].astype(np.float64)  # the network's float32, exactly
    return items


def _fid_line(text: str) -> float:
    match = re.search(r"^FID: ([0-9.eE+-]+)", text, re.M)
    assert match, text
    return float(match[1])


# ---------------------------------------------------------------------------------------------------------
# formats (no Inception)
# ---------------------------------------------------------------------------------------------------------


def test_adm_batch_written_and_read_back_identically(image_sets, files, tmp_path):
    images, labels = image_sets["a"]
    with np.load(files["a_npz"], allow_pickle=False) as data:  # what guided-diffusion's evaluator reads
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (N, 64, 64, 3)
        np.testing.assert_array_equal(data["arr_0"], images)  # the folder, in sorted order
        np.testing.assert_array_equal(data["arr_1"], labels)
    path = write_adm_batch(tmp_path / "from_array.npz", images)
    got, got_labels = read_adm_batch(path)
    np.testing.assert_array_equal(got, images)
    assert got_labels is None
    # guided-diffusion's image_sample.py: np.savez(out_path, arr, label_arr); compressed members stream too
    np.savez_compressed(tmp_path / "theirs.npz", images, labels)
    item = open_fid_input(tmp_path / "theirs.npz")
    assert item.format.startswith("ADM batch") and item.count == N
    np.testing.assert_array_equal(np.concatenate(list(item.batches(5, 3, 20))), images[3:20])
    np.testing.assert_array_equal(item.labels, labels)
    # an alit image set (sampling/generate.py samples.npz) is a batch too
    np.savez(tmp_path / "samples.npz", images=images, labels=labels, budgets=np.zeros(N, dtype=np.int64))
    np.testing.assert_array_equal(read_adm_batch(tmp_path / "samples.npz")[0], images)


def test_unknown_or_bad_npz_is_refused_in_one_line(tmp_path, capsys):
    np.savez(tmp_path / "foo.npz", weights=np.zeros(3), bias=np.ones(2))
    with pytest.raises(FidIOError, match=r"holds keys \[bias, weights\].*ADM batch \(arr_0.*mu/sigma.*feats"):
        open_fid_input(tmp_path / "foo.npz")
    np.savez(tmp_path / "chw.npz", arr_0=np.zeros((2, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(FidIOError, match="channels-first"):
        open_fid_input(tmp_path / "chw.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(FidIOError, match="dimension 64, Inception pool3 is 2048"):
        open_fid_input(tmp_path / "small.npz")
    assert alit(["fid", str(tmp_path / "foo.npz"), str(tmp_path / "chw.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alit fid: ") and "Traceback" not in err
    assert "weights" in err and "expected" in err
    assert alit(["fid", str(tmp_path / "missing"), str(tmp_path / "foo.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert alit(["fid-stats", "--out", str(tmp_path / "s.npz")]) == 2  # neither DATA nor --split
    assert "give either DATA" in capsys.readouterr().err
    assert alit(["fid-stats", str(tmp_path / "foo.npz"), "--out", str(tmp_path / "s.txt")]) == 2
    assert ".npz" in capsys.readouterr().err
    assert alit(["fid-stats", str(tmp_path), "--out", str(tmp_path / "s.npz"), "data.resolution=32"]) == 2
    assert "use them with --split" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.txt").exists()


# ---------------------------------------------------------------------------------------------------------
# FID between inputs of every kind (real Inception)
# ---------------------------------------------------------------------------------------------------------


def test_fid_self_symmetric_and_folder_equals_its_batch(inputs, extractor):
    a, b, a_npz = inputs["a_png"], inputs["b_png"], inputs["a_npz"]
    ab = compare(a, b, extractor, kid_subsets=KID_SUBSETS)
    assert ab["fid"] > 50  # two different categories: far apart (a broken path giving 0 fails here)
    assert abs(compare(a, a, extractor, metrics=False)["fid"]) < 1e-3
    assert _rel(compare(b, a, extractor, metrics=False)["fid"], ab["fid"]) < 1e-6
    assert _rel(compare(a_npz, b, extractor, metrics=False)["fid"], ab["fid"]) < 1e-9
    assert ab["n_a"] == ab["n_b"] == N and ab["protocol"] == "torch_fidelity"
    assert ab["protocol_id"].startswith("torch-fidelity==")
    assert ab["kid_mean"] > 0.05 and ab["kid_subset_size"] == N  # KID and PRC of the same features
    assert 0.0 <= ab["precision"] <= 1.0 and 0.0 <= ab["recall"] <= 1.0
    self_metrics = compare(a, a_npz, extractor, kid_subsets=KID_SUBSETS)
    assert self_metrics["precision"] == self_metrics["recall"] == 1.0
    assert self_metrics["kid_mean"] < 0.5 * ab["kid_mean"]  # unbiased: slightly negative for one set


def test_foreign_statistics_give_the_fid_of_the_images(inputs, extractor, image_sets, tmp_path):
    a, b = inputs["a_png"], inputs["b_png"]
    want = compare(a, b, extractor, metrics=False)["fid"]
    feats_a = a.features
    mu, sigma = feats_a.mean(axis=0), np.cov(feats_a, rowvar=False)
    # pytorch-fid save_fid_stats / clean-fid make_custom_stats: np.savez_compressed(path, mu=, sigma=)
    np.savez_compressed(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
    stats_item = open_fid_input(tmp_path / "pytorch_fid.npz")
    assert stats_item.stats is not None and stats_item.stats.n is None and not stats_item.has_images
    got = compare(stats_item, b, extractor, kid_subsets=KID_SUBSETS)
    assert _rel(got["fid"], want) < 1e-9
    assert "kid_mean" not in got and any("carry no image count" in n for n in got["notes"])
    # clean-fid's KID file: np.savez_compressed(outf, feats=np_feats) -> FID and KID as from the images
    np.savez_compressed(tmp_path / "cleanfid_kid.npz", feats=feats_a.astype(np.float32))
    got = compare(open_fid_input(tmp_path / "cleanfid_kid.npz"), b, extractor, kid_subsets=KID_SUBSETS)
    full = compare(a, b, extractor, kid_subsets=KID_SUBSETS)
    assert _rel(got["fid"], want) < 1e-4  # float32 features
    assert _rel(got["kid_mean"], full["kid_mean"]) < 1e-3
    # an ADM reference batch: arr_0 (here B's images) + precomputed mu/sigma (here A's): FID uses the latter
    np.savez(tmp_path / "adm_ref.npz", arr_0=image_sets["b"][0], mu=mu, sigma=sigma, mu_s=mu[:8],
             sigma_s=np.eye(8))
    ref = open_fid_input(tmp_path / "adm_ref.npz")
    assert ref.format.startswith("ADM reference batch") and ref.count == N
    assert _rel(compare(ref, b, extractor, metrics=False)["fid"], want) < 1e-9
    assert _rel(read_stats(tmp_path / "adm_ref.npz").mu.sum(), mu.sum()) < 1e-12


def test_fid_stats_file_vs_batch_equals_batch_vs_batch(files, inputs, extractor, a_stats, tmp_path, capsys):
    out = a_stats
    with np.load(out, allow_pickle=False) as data:  # readable the way pytorch-fid / clean-fid read stats
        mu, sigma = data["mu"][:], data["sigma"][:]
        assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
        assert int(data["n"]) == N and str(data["format"]) == FID_STATS_FORMAT
        assert str(data["protocol"]) == extractor.protocol_id and str(data["protocol_name"]) == "torch_fidelity"
        assert data["feats"].shape == (N, 2048)
    batch_vs_batch = compare(inputs["a_npz"], inputs["b_png"], extractor, kid_subsets=KID_SUBSETS)
    stats_vs_batch = compare(open_fid_input(out), inputs["b_png"], extractor, kid_subsets=KID_SUBSETS)
    assert _rel(stats_vs_batch["fid"], batch_vs_batch["fid"]) < 1e-9
    assert _rel(stats_vs_batch["kid_mean"], batch_vs_batch["kid_mean"]) < 1e-3
    # the command, A's stats file vs B's (written here from B's features: no extraction): FID, KID,
    # precision/recall, the image counts and the protocol
    b_stats = write_fid_stats(tmp_path / "b_stats.npz", FeatureStats.from_features(inputs["b_png"].features,
                              extractor.protocol_id), protocol_name="torch_fidelity", source="B",
                              features=inputs["b_png"].features)
    report = tmp_path / "fid.json"
    assert alit(["fid", str(out), str(b_stats), "--device", "cpu", "--kid-subsets", str(KID_SUBSETS), "--json",
                 str(report)]) == 0
    text = capsys.readouterr().out
    assert _rel(_fid_line(text), batch_vs_batch["fid"]) < 1e-5
    assert f"protocol: torch_fidelity ({extractor.protocol_id})" in text
    assert f"n_A={N}, n_B={N}" in text and re.search(r"^KID: ", text, re.M) and "precision: " in text
    assert "Inception Score" in text
    assert _rel(json.loads(report.read_text())["fid"], batch_vs_batch["fid"]) < 1e-9
    # a statistics file of one protocol is refused under another, before any image is read
    assert alit(["fid", str(out), str(files["b_png"]), "--protocol", "clean_fid", "--device", "cpu"]) == 2
    assert "pass the matching --protocol" in capsys.readouterr().err


def test_fid_stats_shards_and_debug_job_array_equal_one_pass(files, inputs, image_sets, tmp_path, capsys):
    folder = tmp_path / "a12"  # the first 12 images of A
    folder.mkdir()
    for i, image in enumerate(image_sets["a"][0][:12]):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    out = tmp_path / "sharded.npz"
    common = [str(folder), "--out", str(out), "--device", "cpu", "--no-progress", "--batch-size", "4"]
    assert alit(["fid-stats", *common, "--shard", "0/2"]) == 0
    shard0 = tmp_path / "sharded.shard0000-of-0002.npz"
    assert shard0.is_file() and not out.exists()
    written = shard0.stat().st_mtime_ns
    # the array's task 0 reuses the shard file written above; task 1 and the merge job do the rest
    assert alit(["fid-stats", *common, "--cluster", "debug", "--shards", "2"]) == 0
    assert "12 images" in capsys.readouterr().out
    assert shard0.stat().st_mtime_ns == written  # reused, not recomputed
    merged = read_stats(out)
    features = inputs["a_png"].features[:12]  # one pass over the same images (other batch sizes)
    assert merged.n == 12 and merged.protocol is not None
    np.testing.assert_allclose(merged.mu, features.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(merged.sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-6)
    one_pass = GaussianStats.from_feature_stats(FeatureStats.from_features(features))
    b = inputs["b_png"].features
    mu_b, sigma_b = b.mean(axis=0), np.cov(b, rowvar=False)
    assert _rel(frechet_distance(merged.mu, merged.sigma, mu_b, sigma_b),
                frechet_distance(one_pass.mu, one_pass.sigma, mu_b, sigma_b)) < 1e-5


def test_fid_stats_of_a_dataset_split_under_clean_fid(tmp_path, capsys):
    out = tmp_path / "all_clean.npz"
    assert alit(["fid-stats", "--split", "all", "data.source=emoji", "data.max_images=6", "--protocol", "clean_fid",
                 "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    stats = read_stats(out)
    assert stats.n == 6 and stats.protocol.startswith("clean-fid==")
    assert "split=all" in str(np.load(out)["source"])
    assert alit(["fid", str(out), str(out), "--device", "cpu"]) == 0  # the protocol comes from the file
    text = capsys.readouterr().out
    assert "protocol: clean_fid (clean-fid==" in text and abs(_fid_line(text)) < 1e-3
    assert "KID and precision/recall need per-image features" in text
    assert alit(["fid-stats", str(tmp_path), "--split", "val", "--out", str(tmp_path / "x.npz")]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.slow
def test_alit_fid_of_two_folders_equals_torch_fidelity_calculate_metrics(files, tmp_path, capsys):
    from torch_fidelity import calculate_metrics

    from sampling.inception import torch_fidelity_kwargs

    report = tmp_path / "fid.json"
    assert alit(["fid", str(files["a_png"]), str(files["b_png"]), "--device", "cpu", "--no-progress",
                 "--kid-subset-size", str(N), "--json", str(report)]) == 0
    ours = json.loads(report.read_text())
    theirs = calculate_metrics(input1=str(files["a_png"]), input2=str(files["b_png"]), fid=True, kid=True,
                               cuda=False, cache=False, verbose=False, batch_size=N, kid_subset_size=N,
                               **torch_fidelity_kwargs())
    assert ours["fid"] > 50
    assert _rel(ours["fid"], theirs["frechet_inception_distance"]) <= 1e-4
    assert _rel(ours["kid_mean"], theirs["kernel_inception_distance_mean"]) <= 1e-4

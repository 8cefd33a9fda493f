"""The dataset layer: the embedded emoji set, folders, npz files, odd pixel modes, bad files, splits, CLI."""

from __future__ import annotations

import logging
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

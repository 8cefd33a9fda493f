"""The one dataset layer: the embedded emoji set, ``.npz`` arrays and image folders, one split rule.

Every item is ``(image, label)``: ``image`` float32 ``(3, R, R)`` in [-1, 1], ``label`` an int (-1 when the
source has no labels; the default collate makes a batch of them an int64 tensor).

Sources (``DataConfig.source``)
    ``"emoji"``      the embedded Noto emoji set (1,911 colour images, 64x64, 10 categories;
                     ``tokenizer/assets/noto_emoji_64.npz``, rebuilt by ``scripts/build_emoji_dataset.py``).
    ``*.npz``        ``images`` uint8 (N,H,W,C) or (N,H,W) (C in 1, 3, 4; uint16 is scaled), optional
                     ``labels`` (N,) ints and ``class_names``. Held in memory.
    a folder         ``root/<class>/**/*.png|jpg|...`` (labels from the sorted class folder names) or a flat
                     ``root/*.png`` (labels -1). Scanned once at construction (header + integrity check, bad
                     files skipped and listed in ``.skipped``), decoded lazily with PIL in ``__getitem__``.

Pixels: every PIL mode becomes RGB uint8 (:func:`to_rgb_uint8`): alpha is composited on white, 16-bit
greyscale is scaled (65535 -> 255), palettes are expanded. Geometry (:class:`ResizePolicy`) never upscales
unless the policy is ``resize``: a too-small image is a :class:`DataError` naming the file.

Determinism: the train/val split is a stratified order computed from ``split_seed`` with a fixed integer
hash (splitmix64), the same in every process and every numpy version. Random crops and flips come from a
hash of ``(seed, epoch, image index)``; there is no hidden RNG state, so a resumed run sees the same pixels.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .errors import UserError
from .paths import ASSETS

log = logging.getLogger(__name__)

EMOJI = "emoji"
EMOJI_FILE = "noto_emoji_64.npz"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                              ".pgm", ".pbm", ".pnm"})
MAX_PIXELS = 64_000_000  # larger images are skipped (decompression-bomb guard), well below PIL's own limit
Split = Literal["train", "val", "all"]
SPLITS: tuple[str, ...] = ("train", "val", "all")


class DataError(UserError, ValueError):
    """A dataset problem; the message names the file or setting and how to fix it."""


class ResizePolicy(StrEnum):
    """How an image of any size becomes ``R x R`` (R = ``DataConfig.resolution``)."""

    center_crop = "center_crop"  # shorter side scaled down to R, then the central R x R (ADM/DiT protocol)
    resize = "resize"  # the whole image scaled to R x R (aspect not kept; the only policy that upscales)
    random_crop = "random_crop"  # as center_crop, but the train split takes a seeded random R x R window


@dataclass
class DataConfig:
    """Which images to train and evaluate on, and how they become R x R tensors."""

    source: str = EMOJI  # "emoji" (embedded set), a folder of images, or an .npz file with `images`
    resolution: int = 64  # side R of the square images the models see
    resize: ResizePolicy = ResizePolicy.center_crop  # how images of other sizes become R x R
    val_fraction: float = 0.1  # share of images held out for validation (stratified by label)
    split_seed: int = 0  # seed of the train/val split (and of the max_images subset)
    hflip: bool = False  # random horizontal flips on the train split
    max_images: int | None = None  # cap on the images of each split (a fixed seeded subset), for quick runs

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError("data.source is empty: use 'emoji', a folder of images or an .npz file")
        if isinstance(self.resize, str) and not isinstance(self.resize, ResizePolicy):
            try:
                self.resize = ResizePolicy(self.resize)
            except ValueError:
                choices = ", ".join(p.value for p in ResizePolicy)
                raise ValueError(f"data.resize={self.resize!r} is unknown: choose one of {choices}") from None
        if not 8 <= self.resolution <= 4096:
            raise ValueError(f"data.resolution={self.resolution} is out of range: use 8..4096 (e.g. 64)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1), e.g. 0.1")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"data.max_images={self.max_images} must be >= 1, or null for no cap")


@dataclass
class DataSpec:
    """A config holding only a dataset (``data:``): what ``alit tokenize/reconstruct/eval --config`` read."""

    data: DataConfig = field(default_factory=DataConfig)


# ============================================================================ pixels
# any PIL mode or array layout -> RGB uint8

def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` (..., 3) uint8 over a white background with ``alpha`` (...) uint8 -> (..., 3) uint8 (rounded)."""
    a = alpha.astype(np.uint32)[..., None]  # (..., 1)
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _scale16(x: np.ndarray) -> np.ndarray:
    """Integers in [0, 65535] -> uint8 with rounding (65535 -> 255, 32768 -> 128)."""
    x = np.clip(x.astype(np.int64), 0, 65535)
    return ((x * 255 + 32767) // 65535).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)  # (..., H, W) -> (..., H, W, 3)


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> (H, W, 3) uint8 RGB.

    Alpha (RGBA, LA, PA, palette transparency) is composited on white; 16-bit and 32-bit integer
    greyscale ("I;16*", "I") are read as 16-bit and scaled, not clipped; float ("F") is read as [0, 1]
    when its maximum is at most 1, else as [0, 255]; everything else goes through PIL's RGB conversion.
    """
    mode = image.mode
    if (mode == "P" and "transparency" in image.info) or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "RGBa"):
        arr = np.asarray(image.convert("RGBA"))
        return composite_on_white(arr[..., :3], arr[..., 3])
    if mode == "LA":
        arr = np.asarray(image)
        return _grey_to_rgb(composite_on_white(arr[..., :1], arr[..., 1])[..., 0])
    if mode.startswith("I;16") or mode == "I":
        return _grey_to_rgb(_scale16(np.asarray(image)))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return _grey_to_rgb(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8))
    if mode == "L":
        return _grey_to_rgb(np.asarray(image))
    return np.asarray(image.convert("RGB"))


def array_to_rgb_uint8(images: np.ndarray, what: str = "images") -> np.ndarray:
    """A stack (N,H,W), (N,H,W,1|3|4) of uint8 (or uint16, scaled) -> (N,H,W,3) uint8, alpha on white."""
    if images.dtype == np.uint16:
        images = _scale16(images)
    elif images.dtype != np.uint8:
        raise DataError(f"{what}: dtype {images.dtype} is not supported; store uint8 (0..255) pixels")
    if images.ndim == 3:
        return _grey_to_rgb(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        hint = " (channels-first? transpose to N,H,W,C)" if images.ndim == 4 and images.shape[1] in (1, 3, 4) \
            else ""
        raise DataError(f"{what}: shape {images.shape} is not (N,H,W) or (N,H,W,C) with C in 1,3,4{hint}")
    if images.shape[-1] == 1:
        return _grey_to_rgb(images[..., 0])
    if images.shape[-1] == 4:
        return composite_on_white(images[..., :3], images[..., 3])
    return images


# ============================================================================ geometry

def _needs_upscale(width: int, height: int, resolution: int, policy: ResizePolicy) -> bool:
    return policy is not ResizePolicy.resize and min(width, height) < resolution


def _too_small(what: str, width: int, height: int, resolution: int, policy: ResizePolicy) -> DataError:
    return DataError(f"{what} is {width}x{height}, smaller than data.resolution={resolution}, and policy "
                     f"'{policy.value}' never upscales: lower data.resolution or use data.resize=resize")


def fit_image(arr: np.ndarray, resolution: int, policy: ResizePolicy) -> np.ndarray:
    """(H, W, 3) uint8 -> the policy's stored form: (R, R, 3), or for random_crop shorter side R.

    The caller has checked that no upscaling is needed unless the policy is ``resize``.
    """
    h, w = arr.shape[:2]
    if policy is ResizePolicy.resize:
        size = (resolution, resolution)
    else:
        scale = resolution / min(h, w)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))  # (W', H')
    if (w, h) != size:
        arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC))  # (H', W', 3)
    if policy is ResizePolicy.center_crop:
        arr = crop(arr, resolution, None)  # (R, R, 3)
    return arr


def crop(arr: np.ndarray, resolution: int, offset: tuple[int, int] | None) -> np.ndarray:
    """The R x R window of (H, W, 3) ``arr`` at ``offset`` (top, left), or the centred one when None."""
    h, w = arr.shape[:2]
    if offset is None:
        offset = ((h - resolution) // 2, (w - resolution) // 2)
    top, left = offset
    return arr[top:top + resolution, left:left + resolution]  # (R, R, 3)


# ============================================================================ deterministic hashing
# splitmix64: split order and per-item augmentation, no RNG state anywhere

_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_keys(seed: int, values: np.ndarray, salt: int = 0) -> np.ndarray:
    """A uint64 pseudo-random key per value, fixed by ``(seed, salt)``."""
    base = _mix64(np.array([(seed & _MASK64) ^ (salt * 0x2545F4914F6CDD1D & _MASK64)], dtype=np.uint64))
    return _mix64(np.asarray(values).astype(np.uint64) ^ base)


def split_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of ``range(N)`` that is stratified: every prefix holds each class in proportion.

    Items are ordered by their quantile within their class, ``(rank + 0.5) / class_size``, where the rank
    comes from the seeded hash; ties break by the hash. The validation split is a prefix of this order.
    """
    n = len(labels)
    keys = hash_keys(seed, np.arange(n), salt=1)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    by_class = np.lexsort((keys, inverse))  # class-major, hash order within each class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - starts[inverse[by_class]]
    quantile = (rank + 0.5) / counts[inverse]
    return np.lexsort((keys, quantile))


def split_indices(labels: np.ndarray, val_fraction: float, seed: int,
                  max_images: int | None = None) -> dict[str, np.ndarray]:
    """Sorted source indices of the ``train``, ``val`` and ``all`` (= train + val) splits.

    The split is computed on the full source; ``max_images`` then keeps a stratified prefix of each
    split (``val_fraction`` of the cap for val, the rest for train), so a cap never moves a validation
    image into training and a capped run validates on a subset of the full run's validation images.
    """
    n = len(labels)

    def n_val_of(total: int) -> int:
        k = math.floor(val_fraction * total + 0.5)
        return min(max(k, 1), total - 1) if val_fraction > 0 and total >= 2 else k

    order = split_order(labels, seed)
    n_val = n_val_of(n)
    val, train = order[:n_val], order[n_val:]
    if max_images is not None and max_images < n:
        cap_val = n_val_of(max_images)
        val, train = val[:cap_val], train[:max_images - cap_val]
    train, val = np.sort(train), np.sort(val)
    return {"train": train, "val": val, "all": np.sort(np.concatenate([train, val]))}


@dataclass
class Source:
    """Everything a scan of ``DataConfig.source`` found; splits index into it."""

    description: str  # a one-line name for summaries
    labels: np.ndarray  # (N,) int64, -1 when unlabeled
    class_names: list[str]  # names of labels 0..C-1 (empty when unlabeled)
    resolution: int  # the R the images were checked / prepared for
    policy: ResizePolicy
    images: np.ndarray | None = None  # (N, H, W, 3) uint8 prepared by fit_image (in-memory backend)
    paths: list[Path] | None = None  # N good files (lazy backend)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files left out
    origin: str = ""  # the DataConfig.source this came from

    def __len__(self) -> int:
        return len(self.labels)


def _emoji_path() -> Path:
    path = ASSETS / EMOJI_FILE
    if not path.is_file():
        raise DataError(f"the embedded emoji set {path} is missing: rebuild it with "
                        "`python scripts/build_emoji_dataset.py` or reinstall the package")
    return path


def _in_memory(images: np.ndarray, labels: np.ndarray, class_names: list[str], description: str,
               cfg: DataConfig, what: str) -> Source:
    images = array_to_rgb_uint8(images, what)  # (N, H, W, 3)
    n, h, w = images.shape[:3]
    if n == 0:
        raise DataError(f"{what} holds no images")
    if _needs_upscale(w, h, cfg.resolution, cfg.resize):
        raise _too_small(f"every image of {what}", w, h, cfg.resolution, cfg.resize)
    target = fit_image(images[0], cfg.resolution, cfg.resize).shape
    if images.shape[1:] != target:
        images = np.stack([fit_image(im, cfg.resolution, cfg.resize) for im in images])  # (N, *target)
    return Source(description, labels, class_names, cfg.resolution, cfg.resize, images=images,
                  origin=cfg.source)


def _labels_from(data: np.lib.npyio.NpzFile, n: int, what: str) -> tuple[np.ndarray, list[str]]:
    if "labels" not in data.files:
        return np.full(n, -1, dtype=np.int64), []
    labels = np.asarray(data["labels"])
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: 'labels' must be {n} integers (one per image), got {labels.dtype} "
                        f"{labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < -1:
        raise DataError(f"{what}: 'labels' must be >= 0 (or -1 for unlabeled), found {labels.min()}")
    num = int(labels.max()) + 1 if labels.size else 0
    if "class_names" in data.files:
        names = [str(s) for s in np.asarray(data["class_names"]).tolist()]
        if len(names) < num:
            raise DataError(f"{what}: {len(names)} class_names for labels up to {num - 1}; "
                            "give one name per class")
    else:
        names = [str(i) for i in range(num)]
    return labels, names


def _load_npz(path: Path, cfg: DataConfig, name: str | None = None) -> Source:
    what = str(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"{what} is not a readable .npz file ({type(e).__name__}: {e})") from None
    with data:
        if "images" not in data.files:
            raise DataError(f"{what} has no 'images' array (found: {', '.join(data.files) or 'nothing'}); "
                            "save one with np.savez(path, images=uint8 (N,H,W,C), labels=...)")
        images = data["images"]
        labels, names = _labels_from(data, len(images), what)
        origin = f", {data['source']}" if "source" in data.files else ""
        description = f"{name or path} (npz{origin})"
        return _in_memory(images, labels, names, description, cfg, what)


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden entries left out), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if _is_image_file(Path(f)))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _open_image(path: Path) -> Image.Image:
    """PIL's open with the decompression-bomb guard of this module (a too-large image raises)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(path)
    w, h = image.size
    if w * h > MAX_PIXELS:
        image.close()
        raise DataError(f"too large: {w}x{h} = {w * h / 1e6:.1f} megapixels > {MAX_PIXELS / 1e6:g} "
                        "(decompression-bomb guard); downscale it first")
    return image


def _check_file(path: Path) -> tuple[int, int] | str:
    """The (width, height) of a readable image, else the reason it is not."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with _open_image(path) as image:
            size = image.size
            image.verify()
        return size
    except DataError as e:
        return str(e)
    except Exception as e:  # PIL raises many types for corrupt files; any of them means "skip"
        return f"unreadable: {type(e).__name__}: {e}"


def load_image(path: Path, resolution: int, policy: ResizePolicy) -> np.ndarray:
    """Decode one file -> the policy's stored form (see :func:`fit_image`); raises on any problem."""
    with _open_image(path) as image:
        image = ImageOps.exif_transpose(image)
        arr = to_rgb_uint8(image)  # (H, W, 3)
    h, w = arr.shape[:2]
    if _needs_upscale(w, h, resolution, policy):
        raise _too_small(f"image {path}", w, h, resolution, policy)
    return fit_image(arr, resolution, policy)


def _scan_folder(root: Path, cfg: DataConfig) -> Source:
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = [(d.name, files) for d in subdirs if (files := _image_files(d))]
    skipped: list[tuple[str, str]] = []
    if classes:
        loose = [p for p in sorted(root.iterdir()) if p.is_file() and _is_image_file(p)]
        skipped += [(str(p), "not inside a class folder (the root has class subfolders)") for p in loose]
        names = [name for name, _ in classes]
        candidates = [(p, label) for label, (_, files) in enumerate(classes) for p in files]
    else:
        names = []
        candidates = [(p, -1) for p in sorted(root.iterdir()) if p.is_file() and _is_image_file(p)]
    if not candidates:
        raise DataError(f"data.source={root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "point it at a folder of images, root/<class>/*.png, or use 'emoji'")
    workers = min(16, os.cpu_count() or 1, max(1, len(candidates) // 64))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = list(pool.map(_check_file, [p for p, _ in candidates]))
    paths, labels = [], []
    for (path, label), result in zip(candidates, checks):
        if isinstance(result, str):
            skipped.append((str(path), result))
            continue
        if _needs_upscale(*result, cfg.resolution, cfg.resize):
            raise _too_small(f"image {path}", *result, cfg.resolution, cfg.resize)
        paths.append(path)
        labels.append(label)
    for path, reason in skipped[:20]:
        log.warning("data: skipping %s: %s", path, reason)
    if len(skipped) > 20:
        log.warning("data: skipped %d more files (see the dataset's .skipped)", len(skipped) - 20)
    if not paths:
        raise DataError(f"data.source={root}: none of its {len(candidates)} image files is readable "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})")
    kind = f"{len(names)} class folders" if names else "flat folder"
    return Source(f"{root} ({kind})", np.asarray(labels, dtype=np.int64), names, cfg.resolution, cfg.resize,
                  paths=paths, skipped=skipped, origin=cfg.source)


def source_path(cfg: DataConfig) -> Path | None:
    """The file or folder ``cfg.source`` names (None for the embedded set); :class:`DataError` if it is missing."""
    if cfg.source == EMOJI:
        return None
    root = Path(cfg.source).expanduser()
    if not root.exists():
        raise DataError(f"data.source={cfg.source!r} does not exist: give a folder of images, an .npz file, "
                        "or 'emoji' for the embedded set")
    return root


def scan_source(cfg: DataConfig) -> Source:
    """Read or scan ``cfg.source`` once; pass the result to :func:`build_dataset` to build several splits."""
    root = source_path(cfg)
    if root is None:
        return _load_npz(_emoji_path(), cfg, name="emoji: embedded Noto emoji")
    if root.is_file():
        if root.suffix.lower() == ".npz":
            return _load_npz(root, cfg)
        raise DataError(f"data.source={cfg.source!r} is a file but not an .npz: give its folder instead")
    return _scan_folder(root, cfg)


# ============================================================================ the dataset

class ImageDataset(Dataset):
    """One split of a :class:`Source`: items ``(image (3,R,R) float32 in [-1,1], label int)``.

    Augmentation (train split only: ``random_crop`` windows, ``hflip``) is a pure function of
    ``(seed, epoch, image index)``. Call :meth:`set_epoch` before each epoch's DataLoader iterator is
    created, or index with ``(epoch, index)`` pairs from the sampler (this also works with persistent
    workers). A file that fails to decode after the scan is logged, counted in ``runtime_failures`` and
    replaced by the next good image of the split, so a long run does not crash (counts are per process).
    """

    def __init__(self, source: Source, indices: np.ndarray, split: Split, *, hflip: bool = False,
                 seed: int = 0) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)  # (n,) positions in the source, sorted
        self.split = split
        self.resolution = source.resolution
        self.policy = source.policy
        self.random_crop = split == "train" and source.policy is ResizePolicy.random_crop
        self.hflip = split == "train" and hflip
        self.seed = seed
        self.epoch = 0
        self.runtime_failures: dict[int, str] = {}  # source index -> reason, for files that broke later
        self.labels = torch.from_numpy(source.labels[self.indices].copy())  # (n,) int64

    # ------------------------------------------------------------------ metadata
    @property
    def num_classes(self) -> int:
        """Number of classes of the source (0 when unlabeled)."""
        return len(self.source.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self.source.class_names)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every file left out: at the scan, then any that failed later."""
        later = [(str(self.source.paths[i]), r) for i, r in self.runtime_failures.items()] \
            if self.source.paths is not None else []
        return [*self.source.skipped, *later]

    def class_counts(self) -> dict[str, int]:
        """Images per class name in this split (``{"unlabeled": n}`` for unlabeled images)."""
        counts = Counter(self.labels.tolist())
        names = self.source.class_names
        return {(names[k] if k >= 0 else "unlabeled"): counts[k] for k in sorted(counts)}

    def summary(self) -> str:
        """One line: source, split size, resolution, classes, skipped files."""
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabeled"
        return (f"{self.source.description} [{self.split}]: {len(self)} of {len(self.source)} images, "
                f"{self.resolution}x{self.resolution} {self.policy.value}, {classes}, "
                f"{len(self.skipped)} files skipped")

    def __repr__(self) -> str:
        return f"ImageDataset({self.summary()})"

    # ------------------------------------------------------------------ items
    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch`` for plain integer indexing."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def _stored(self, pos: int) -> tuple[int, np.ndarray]:
        """(source index, stored pixels) of split position ``pos``, substituting images that fail."""
        n = len(self.indices)
        if self.source.images is not None:
            i = int(self.indices[pos])
            return i, self.source.images[i]
        for k in range(n):
            i = int(self.indices[(pos + k) % n])
            if i in self.runtime_failures:
                continue
            try:
                return i, load_image(self.source.paths[i], self.resolution, self.policy)
            except Exception as e:  # a file broke after the scan: count it, log it, use the next image
                reason = f"failed after the scan: {type(e).__name__}: {e}"
                self.runtime_failures[i] = reason
                log.warning("data: %s %s; substituting the next image", self.source.paths[i], reason)
        raise DataError(f"every image of the {self.split} split failed to load (first: {self.skipped[0]})")

    def _pixels(self, pos: int, epoch: int | None) -> tuple[int, np.ndarray]:
        i, arr = self._stored(pos)
        h, w = arr.shape[:2]
        r = self.resolution
        bits = int(hash_keys(self.seed, np.array([i]), salt=epoch + 2)[0]) if epoch is not None else 0
        offset = None
        if epoch is not None and self.random_crop and (h, w) != (r, r):
            offset = ((bits >> 1) % (h - r + 1), (bits >> 21) % (w - r + 1))
        arr = crop(arr, r, offset)  # (R, R, 3)
        if epoch is not None and self.hflip and bits & 1:
            arr = arr[:, ::-1]
        return i, arr

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, pos = index if isinstance(index, tuple) else (self.epoch, index)
        pos = operator.index(pos)
        if not -len(self) <= pos < len(self):
            raise IndexError(f"index {pos} out of range for a split of {len(self)} images")
        i, arr = self._pixels(pos % len(self), epoch)
        x = torch.from_numpy(np.array(arr, order="C")).permute(2, 0, 1)  # (R, R, 3) -> (3, R, R)
        x = x.to(torch.float32).div_(127.5).sub_(1.0)
        return x, int(self.source.labels[i])

    def uint8_images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Split positions ``[start, stop)`` as (n, R, R, 3) uint8, without augmentation (for FID)."""
        stop = len(self) if stop is None else min(stop, len(self))
        images = self.source.images
        if images is not None and images.shape[1:3] == (self.resolution, self.resolution):
            return images[self.indices[start:stop]]  # (n, R, R, 3)
        out = np.empty((max(0, stop - start), self.resolution, self.resolution, 3), dtype=np.uint8)
        for k, pos in enumerate(range(start, stop)):
            out[k] = self._pixels(pos, None)[1]
        return out


def build_dataset(cfg: DataConfig, split: Split = "train", *, seed: int = 0,
                  source: Source | None = None) -> ImageDataset:
    """One split of ``cfg.source``; ``seed`` drives train augmentation, ``source`` reuses a scan."""
    if split not in SPLITS:
        raise DataError(f"split={split!r} is unknown: choose one of {', '.join(SPLITS)}")
    if source is None:
        source = scan_source(cfg)
    elif (source.origin, source.resolution, source.policy) != (cfg.source, cfg.resolution, cfg.resize):
        raise DataError("build_dataset: the given source was scanned for another data config "
                        f"({source.origin}, {source.resolution}, {source.policy.value}); scan it again")
    indices = split_indices(source.labels, cfg.val_fraction, cfg.split_seed, cfg.max_images)[split]
    if len(indices) == 0:
        raise DataError(f"the {split} split of {source.description} is empty ({len(source)} images, "
                        f"data.val_fraction={cfg.val_fraction}): raise data.val_fraction or add images")
    return ImageDataset(source, indices, split, hflip=cfg.hflip, seed=seed)

"""The one dataset layer: the embedded emoji set, ``.npz`` arrays and image folders, one split rule.

Every item is ``(image, label)``: ``image`` float32 ``(3, R, R)`` in [-1, 1], ``label`` an int (-1 when the
source has no labels; the default collate makes a batch of them an int64 tensor).

Sources (``DataConfig.source``)
    ``"emoji"``      the embedded Noto emoji set (1,911 colour images, 64x64, 10 categories;
                     ``tokenizer/assets/noto_emoji_64.npz``, rebuilt by ``scripts/build_emoji_dataset.py``).
    ``*.npz``        ``images`` uint8 (N,H,W,C) or (N,H,W) (C in 1, 3, 4; uint16 is scaled), optional
                     ``labels`` (N,) ints and ``class_names``. Held in memory.
    a folder         ``root/<class>/**/*.png|jpg|...`` (labels from the sorted class folder names) or a flat
                     ``root/*.png`` (labels -1). Indexed once (header + integrity check of every file, bad
                     files skipped and listed in ``.skipped``) and the index cached under
                     ``$ALIT_HOME/data-index/`` (:func:`folder_index`), decoded lazily with PIL in
                     ``__getitem__``.

The folder index is keyed by the resolved folder path and what identifies its contents cheaply: the
list of image files (names, hence their count) and the modification times of the folder and its
subfolders (a directory's mtime changes when an entry is added, removed or renamed). A later start, a
requeue or another rank lists the directories, finds the index current and opens no image file; a
changed folder rebuilds it, an unreadable index is rebuilt with a warning. The index is a plain ``.npz``
(no pickle) and independent of resolution and policy: it stores each file's (width, height). Paths are
held compactly, as one uint8 buffer plus offsets (:class:`PathTable`), not one Python object per file.

Pixels: every PIL mode becomes RGB uint8 (:func:`to_rgb_uint8`): alpha is composited on white, 16-bit
greyscale is scaled (65535 -> 255), palettes are expanded. Geometry (:class:`ResizePolicy`): an image
smaller than R is upscaled by the policy (bicubic, counted in the summary), never an abort. JPEGs are
decoded at a reduced size (``Image.draft``: DCT scaling by 1/2, 1/4 or 1/8) when the result still has at
least the pixels the crop needs (:func:`decode_side`).

Bad files: a file that fails to decode after the index was built is skipped at read time, logged and
counted (``runtime_failures``), and replaced by the next image of the split that decodes. The
replacement depends only on the position and the set of failing files, never on which worker or process
saw a failure first, so batches stay full and a resumed run reads the same items.

Determinism: the train/val split is a stratified order computed from ``split_seed`` with a fixed integer
hash (splitmix64), the same in every process and every numpy version. Random crops, random resized crops
and flips come from a hash of ``(seed, epoch, image index)``; there is no hidden RNG state, so a resumed
run sees the same pixels.
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
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
from .io import atomic_path
from .paths import ASSETS, cache_dir

log = logging.getLogger(__name__)

EMOJI = "emoji"
EMOJI_FILE = "noto_emoji_64.npz"
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                              ".pgm", ".pbm", ".pnm"})
MAX_PIXELS = 64_000_000  # larger images are skipped (decompression-bomb guard), well below PIL's own limit
INDEX_KIND = "data-index"  # the cache folder of folder indexes under ALIT_HOME
INDEX_VERSION = 1  # bump when the index layout or the file check changes
Split = Literal["train", "val", "all"]
SPLITS: tuple[str, ...] = ("train", "val", "all")
DEFAULT_CROP_SCALE = (0.8, 1.0)  # the public recipe's RandomResizedCrop scale
DEFAULT_CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop aspect-ratio range
RRC_TRIES = 10  # torchvision's RandomResizedCrop: 10 tries, then the central-crop fallback


class DataError(UserError, ValueError):
    """A dataset problem; the message names the file or setting and how to fix it."""


class ResizePolicy(StrEnum):
    """How an image of any size becomes ``R x R`` (R = ``DataConfig.resolution``)."""

    center_crop = "center_crop"  # shorter side scaled to R, then the central R x R (ADM/DiT protocol)
    resize = "resize"  # the whole image scaled to R x R (aspect not kept)
    random_crop = "random_crop"  # as center_crop, but the train split takes a seeded random R x R window
    # torchvision's RandomResizedCrop on the train split (area share in data.crop_scale, aspect ratio in
    # data.crop_ratio, scaled to R x R, bicubic); the central crop elsewhere
    random_resized_crop = "random_resized_crop"


def _pair(key: str, value: object, example: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"data.{key}={value!r} must be two numbers [min, max], e.g. {example}") from None
    return lo, hi


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
    # random_resized_crop: range of the crop's share of the image area, [min, max] in (0, 1]
    crop_scale: list[float] = field(default_factory=lambda: list(DEFAULT_CROP_SCALE))
    # random_resized_crop: range of the crop's aspect ratio (width / height), [min, max]
    crop_ratio: list[float] = field(default_factory=lambda: list(DEFAULT_CROP_RATIO))

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
        lo, hi = _pair("crop_scale", self.crop_scale, "[0.8, 1.0]")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.crop_scale={list(self.crop_scale)} must satisfy 0 < min <= max <= 1 "
                             "(shares of the image area), e.g. [0.8, 1.0]")
        self.crop_scale = [lo, hi]
        lo, hi = _pair("crop_ratio", self.crop_ratio, "[0.75, 1.3333]")
        if not (0.0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"data.crop_ratio={list(self.crop_ratio)} must satisfy 0 < min <= max "
                             "(width / height), e.g. [0.75, 1.3333]")
        self.crop_ratio = [lo, hi]


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

def fit_image(arr: np.ndarray, resolution: int, policy: ResizePolicy) -> np.ndarray:
    """(H, W, 3) uint8 -> the policy's stored form: (R, R, 3); for random_crop shorter side R; for
    random_resized_crop the image itself (the crop is taken per item from the whole image).

    An image smaller than R is scaled up (bicubic) like any other: the shorter side becomes R.
    """
    if policy is ResizePolicy.random_resized_crop:
        return arr
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


def _uniforms(keys: np.ndarray) -> np.ndarray:
    """uint64 keys -> float64 uniforms in [0, 1) (the top 53 bits)."""
    return (np.asarray(keys, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def random_resized_crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                            keys: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop, torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 tries draw an area share in ``scale`` and a log-uniform aspect ratio (w / h) in ``ratio`` and
    keep the first window that fits, at a uniform position; else the central crop of the whole image
    with the aspect clamped to ``ratio``. The uniforms come from ``keys`` (4 per try, ``4 * RRC_TRIES``
    uint64 keys: a hash, no RNG state).
    """
    u = _uniforms(keys)
    if len(u) < 4 * RRC_TRIES:
        raise ValueError(f"random_resized_crop_box needs {4 * RRC_TRIES} keys, got {len(u)}")
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for t in range(RRC_TRIES):
        u_scale, u_ratio, u_top, u_left = u[4 * t:4 * t + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height  # the fallback: a central crop
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(arr: np.ndarray, box: tuple[int, int, int, int], resolution: int) -> np.ndarray:
    """The ``(top, left, h, w)`` window of (H, W, 3) ``arr`` scaled to (R, R, 3) (bicubic, antialiased)."""
    top, left, h, w = box
    if (h, w) == (resolution, resolution):
        return arr[top:top + h, left:left + w]
    image = Image.fromarray(np.ascontiguousarray(arr))
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BICUBIC,
                                   box=(left, top, left + w, top + h)))


def decode_side(resolution: int, policy: ResizePolicy, train: bool,
                crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
                crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO) -> int:
    """The shorter side a decoded image must keep so the crop still has all the pixels it needs.

    center_crop, random_crop and resize take at least the shorter side down to R, so R suffices. A random
    resized crop of area share ``s`` and aspect ``r`` has a shorter side of at least
    ``short * sqrt(s * min(r, 1/r))``; it must be >= R for the smallest share and the extreme aspect, so
    the image keeps ``R / sqrt(min_scale * min(r, 1/r))`` (+1 for rounding). Conservative: it assumes a
    square image (a wider one has more area per shorter side).
    """
    if policy is ResizePolicy.random_resized_crop and train:
        worst = min(crop_ratio[0], 1.0 / crop_ratio[1], 1.0)
        return math.ceil(resolution / math.sqrt(crop_scale[0] * worst)) + 1
    return resolution


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


# ============================================================================ compact path tables

def _pack(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (uint8 buffer of their file-system encodings, int64 offsets (n + 1,))."""
    encoded = [os.fsencode(s) for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = blob.tobytes()
    return [os.fsdecode(raw[a:b]) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


class PathTable(Sequence[Path]):
    """N file paths under one root, held as one uint8 buffer plus offsets: a few bytes per file and two
    numpy arrays, instead of one Python ``Path`` per file (~0.5 KB each, ~0.6 GB at ImageNet size, and
    copied page by page into every forked DataLoader worker as their reference counts change).

    ``table[i]`` is ``root / relative(i)`` (a ``Path``), built on demand.
    """

    def __init__(self, root: str | os.PathLike[str], blob: np.ndarray, offsets: np.ndarray) -> None:
        self.root = Path(root)
        self.blob = np.ascontiguousarray(blob, dtype=np.uint8)  # (total bytes,) the relative paths
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)  # (N + 1,) path i = blob[o[i]:o[i+1]]

    @classmethod
    def from_relative(cls, root: str | os.PathLike[str], names: Sequence[str]) -> PathTable:
        """A table of ``names`` (relative paths, ``/``-separated) under ``root``."""
        return cls(root, *_pack(names))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def relative(self, index: int) -> str:
        """The path of file ``index`` relative to the root."""
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"path index {i} out of range for {n} files")
        i %= n
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def __getitem__(self, index: int | slice) -> Path:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]  # type: ignore[return-value]
        return self.root / self.relative(index)

    def __iter__(self) -> Iterator[Path]:
        for i in range(len(self)):
            yield self[i]

    def relative_paths(self) -> list[str]:
        """Every relative path (a list: for small tables and tests)."""
        return _unpack(self.blob, self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays."""
        return int(self.blob.nbytes + self.offsets.nbytes)

    def __repr__(self) -> str:
        return f"PathTable({len(self)} files under {self.root}, {self.nbytes / 1e6:.1f} MB)"


# ============================================================================ sources

@dataclass
class Source:
    """Everything a scan of ``DataConfig.source`` found; splits index into it."""

    description: str  # a one-line name for summaries
    labels: np.ndarray  # (N,) int64, -1 when unlabeled
    class_names: list[str]  # names of labels 0..C-1 (empty when unlabeled)
    resolution: int  # the R the images were prepared for
    policy: ResizePolicy
    images: np.ndarray | None = None  # (N, H, W, 3) uint8 prepared by fit_image (in-memory backend)
    paths: PathTable | None = None  # N good files (lazy backend), compact (see PathTable)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files left out
    origin: str = ""  # the DataConfig.source this came from
    sizes: np.ndarray | None = None  # (N, 2) int (width, height) of each original image
    index_file: Path | None = None  # the cached folder index it was read from (folders only)

    def __len__(self) -> int:
        return len(self.labels)

    def small(self, resolution: int | None = None) -> np.ndarray:
        """(N,) bool: images whose shorter side is below R (they are upscaled)."""
        if self.sizes is None:
            return np.zeros(len(self), dtype=bool)
        return self.sizes.min(axis=1) < (resolution or self.resolution)


def _log_upscaled(source: Source) -> None:
    n = int(source.small().sum())
    if n:
        log.info("data: %d of %d images of %s are smaller than %d px on the shorter side: the %s policy "
                 "upscales them (bicubic)", n, len(source), source.description, source.resolution,
                 source.policy.value)


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
    target = fit_image(images[0], cfg.resolution, cfg.resize).shape
    if images.shape[1:] != target:
        images = np.stack([fit_image(im, cfg.resolution, cfg.resize) for im in images])  # (N, *target)
    sizes = np.tile(np.array([[w, h]], dtype=np.int32), (n, 1))  # (N, 2)
    source = Source(description, labels, class_names, cfg.resolution, cfg.resize, images=images,
                    origin=cfg.source, sizes=sizes)
    _log_upscaled(source)
    return source


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


# ============================================================================ image files

def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _is_image_file(path: Path) -> bool:
    return _is_image_name(path.name)


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
    """The (width, height) of a readable image, else the reason it is not (what the index build runs)."""
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


def decode_image(path: Path, min_side: int | None = None) -> np.ndarray:
    """Decode one file -> (H, W, 3) uint8 RGB, EXIF orientation applied; raises on any problem.

    With ``min_side``, a JPEG is decoded at a reduced size (``Image.draft``: DCT scaling by 1/2, 1/4 or
    1/8, much faster than a full decode) chosen so that its shorter side stays >= ``min_side``.
    """
    with _open_image(path) as image:
        if min_side is not None and image.format == "JPEG":
            w, h = image.size
            if min(w, h) >= 2 * min_side:  # draft can at least halve it
                f = min_side / min(w, h)
                image.draft("RGB", (max(1, math.ceil(w * f)), max(1, math.ceil(h * f))))
        image = ImageOps.exif_transpose(image)
        return to_rgb_uint8(image)  # (H, W, 3)


def load_image(path: Path, resolution: int, policy: ResizePolicy, *, min_side: int | None = None,
               draft: bool = True) -> np.ndarray:
    """Decode one file -> the policy's stored form (see :func:`fit_image`); raises on any problem.

    With ``draft`` a JPEG is decoded at a reduced size whose shorter side stays >= ``min_side`` (default
    R, what every policy's centre view needs; see :func:`decode_side`); without it, at full size.
    """
    return fit_image(decode_image(path, (min_side or resolution) if draft else None), resolution, policy)


# ============================================================================ the folder index

@dataclass
class FolderIndex:
    """What indexing a folder found (the cached part is policy-free: sizes, not decisions)."""

    root: Path  # the folder as given (paths are root / relative path)
    paths: PathTable  # the good files, class-major, sorted within each class
    labels: np.ndarray  # (N,) int64, -1 for a flat folder
    sizes: np.ndarray  # (N, 2) int32 (width, height) from the file headers
    class_names: list[str]
    skipped: list[tuple[str, str]]  # (path, reason): loose files beside class folders, unreadable files
    candidates: int  # image files found (good + unreadable)
    file: Path | None  # the cache file (None when it could not be written)
    cached: bool  # True when read from the cache (no image file was opened)
    seconds: float = 0.0  # time to list (and, when not cached, check) the folder


@dataclass
class _Listing:
    class_names: list[str]
    files: list[str]  # candidate image files relative to the root ('/'-separated), class-major, sorted
    labels: np.ndarray  # (n,) int64
    loose: list[str]  # root-level images left out because the root has class folders
    fingerprint: str


def _walk(folder: Path) -> tuple[list[str], list[str]]:
    """Image files under ``folder`` relative to it (recursive, hidden entries left out, sorted), and one
    ``"<dir>\\0<mtime ns>"`` stamp per directory walked."""
    found: list[str] = []
    stamps: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, folder)
        stamps.append(f"{rel}\0{os.stat(dirpath).st_mtime_ns}")
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found.extend(prefix + f for f in filenames if _is_image_name(f))
    found.sort()
    return found, stamps


def _list_folder(root: Path) -> _Listing:
    """List ``root`` (directories only: no image file is opened) and fingerprint what it holds."""
    with os.scandir(root) as it:
        entries = sorted(((e.name, e.is_dir(), e.is_file()) for e in it), key=lambda e: e[0])
    stamps = [f".\0{os.stat(root).st_mtime_ns}"]
    classes: list[tuple[str, list[str]]] = []
    for name, is_dir, _ in entries:
        if is_dir and not name.startswith("."):
            files, sub = _walk(root / name)
            stamps += [f"{name}/{s}" for s in sub]
            if files:
                classes.append((name, [f"{name}/{f}" for f in files]))
    top = [name for name, is_dir, is_file in entries if is_file and not is_dir and _is_image_name(name)]
    if classes:
        names = [name for name, _ in classes]
        files = [f for _, fs in classes for f in fs]
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(fs) for _, fs in classes])
        loose = top
    else:
        names, files, labels, loose = [], top, np.full(len(top), -1, dtype=np.int64), []
    digest = hashlib.sha256()
    head = (f"alit-data-index {INDEX_VERSION}\0{MAX_PIXELS}\0{','.join(sorted(IMAGE_EXTENSIONS))}\0"
            f"{os.path.realpath(root)}\0{len(files)}\0{len(loose)}\0{len(names)}\n")
    digest.update(os.fsencode(head))
    for part in (names, files, loose, stamps):
        digest.update(b"\n".join(map(os.fsencode, part)) + b"\n\1\n")
    return _Listing(names, files, labels, loose, digest.hexdigest())


def index_file(root: str | os.PathLike[str]) -> Path:
    """The cache file of the index of folder ``root`` (keyed by its resolved path)."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:24]
    return cache_dir(INDEX_KIND) / f"{key}.npz"


def _check_chunk(paths: list[Path]) -> list[tuple[int, int] | str]:
    return [_check_file(p) for p in paths]


def _check_all(root: Path, files: list[str]) -> list[tuple[int, int] | str]:
    """:func:`_check_file` of every file, in threads (PIL releases the GIL while reading)."""
    chunk = 512
    chunks = [[root / f for f in files[k:k + chunk]] for k in range(0, len(files), chunk)]
    workers = min(16, os.cpu_count() or 1, max(1, len(files) // 64))
    if workers == 1:
        return [r for c in chunks for r in _check_chunk(c)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for results in pool.map(_check_chunk, chunks) for r in results]


def _stat_stamps(root: Path, files: Sequence[str]) -> np.ndarray:
    """(n, 2) int64 (size, mtime ns) of ``root / f`` for each file (-1, -1 when it cannot be stat'ed)."""
    out = np.full((len(files), 2), -1, dtype=np.int64)
    for k, f in enumerate(files):
        try:
            st = os.stat(root / f)
        except OSError:
            continue
        out[k] = (st.st_size, st.st_mtime_ns)
    return out


def _index_arrays(root: Path, listing: _Listing, checks: list[tuple[int, int] | str]) -> dict[str, np.ndarray]:
    good = [k for k, c in enumerate(checks) if not isinstance(c, str)]
    skipped = [(f, "not inside a class folder (the root has class subfolders)") for f in listing.loose]
    skipped += [(listing.files[k], c) for k, c in enumerate(checks) if isinstance(c, str)]
    paths_blob, paths_offsets = _pack([listing.files[k] for k in good])
    names_blob, names_offsets = _pack(listing.class_names)
    skip_blob, skip_offsets = _pack([p for p, _ in skipped])
    why_blob, why_offsets = _pack([r for _, r in skipped])
    sizes = np.array([checks[k] for k in good], dtype=np.int32).reshape(len(good), 2)
    return {"version": np.int64(INDEX_VERSION), "fingerprint": np.str_(listing.fingerprint),
            "candidates": np.int64(len(listing.files)),
            "paths_blob": paths_blob, "paths_offsets": paths_offsets,
            "labels": listing.labels[good] if good else np.zeros(0, np.int64), "sizes": sizes,
            "names_blob": names_blob, "names_offsets": names_offsets,
            "skipped_blob": skip_blob, "skipped_offsets": skip_offsets,
            "reasons_blob": why_blob, "reasons_offsets": why_offsets,
            # stat of the skipped files (a few): a file repaired in place (same name) is noticed
            "skipped_stats": _stat_stamps(root, [p for p, _ in skipped])}


def _offsets_ok(blob: np.ndarray, offsets: np.ndarray) -> bool:
    return (offsets.ndim == 1 and len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == len(blob)
            and bool(np.all(np.diff(offsets) >= 0)))


def _read_index(file: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The arrays of a current, consistent index file; None when it is stale; raises when it is corrupt."""
    with np.load(file, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if int(arrays["version"]) != INDEX_VERSION or str(arrays["fingerprint"]) != fingerprint:
        return None
    n = len(arrays["labels"])
    pairs = [("paths", n), ("names", None), ("skipped", None), ("reasons", len(arrays["skipped_offsets"]) - 1)]
    for name, count in pairs:
        blob, offsets = arrays[f"{name}_blob"], arrays[f"{name}_offsets"]
        if blob.dtype != np.uint8 or not _offsets_ok(blob, offsets) or (count is not None
                                                                        and len(offsets) != count + 1):
            raise ValueError(f"inconsistent {name} arrays")
    if arrays["skipped_stats"].shape != (len(arrays["skipped_offsets"]) - 1, 2):
        raise ValueError("inconsistent skipped_stats")
    labels, sizes = arrays["labels"], arrays["sizes"]
    n_classes = len(arrays["names_offsets"]) - 1
    if labels.dtype != np.int64 or sizes.shape != (n, 2):
        raise ValueError("inconsistent labels or sizes")
    if n and not ((n_classes == 0 and labels.min() == labels.max() == -1)
                  or (n_classes > 0 and labels.min() >= 0 and labels.max() < n_classes)):
        raise ValueError("labels out of range")
    return arrays


def folder_index(root: str | os.PathLike[str]) -> FolderIndex:
    """The index of image folder ``root``: read from ``$ALIT_HOME/data-index/`` when the folder is unchanged
    (no image file is opened), else built by checking every file (header + integrity) and cached.

    Unchanged means the same resolved path, the same image file names (so the same count), the same
    modification times of the folder and every subfolder, and the same size and modification time of
    each file it left out (so a bad file repaired in place is indexed again; a good file broken in place
    is caught at read time). A stale index is replaced; an unreadable one is
    rebuilt with a warning; a cache that cannot be written is a warning (the next start indexes again).
    """
    start = time.perf_counter()
    root = Path(root)
    listing = _list_folder(root)
    if not listing.files:
        raise DataError(f"data.source={root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "point it at a folder of images, root/<class>/*.png, or use 'emoji'")
    file: Path | None = None
    arrays: dict[str, np.ndarray] | None = None
    try:
        file = index_file(root)
    except OSError as e:
        log.warning("data: the index cache folder under ALIT_HOME is not usable (%s); indexing %s without "
                    "a cache", e, root)
    if file is not None and file.is_file():
        try:
            arrays = _read_index(file, listing.fingerprint)
            if arrays is None:
                log.info("data: %s changed since its index was built: indexing it again", root)
            else:
                skipped = _unpack(arrays["skipped_blob"], arrays["skipped_offsets"])
                if not np.array_equal(_stat_stamps(root, skipped), arrays["skipped_stats"]):
                    log.info("data: a file the index of %s left out has changed: indexing it again", root)
                    arrays = None
        except Exception as e:  # a truncated or foreign file: never a crash, rebuild it
            log.warning("data: the cached index %s is unreadable (%s: %s): rebuilding it", file,
                        type(e).__name__, e)
    cached = arrays is not None
    if arrays is None:
        log.info("data: indexing %d image files of %s (checked once, then cached)", len(listing.files), root)
        arrays = _index_arrays(root, listing, _check_all(root, listing.files))
        if file is not None:
            try:
                with atomic_path(file) as tmp, open(tmp, "wb") as f:
                    np.savez(f, **arrays)
            except OSError as e:
                log.warning("data: could not cache the index of %s at %s (%s); the next start indexes the "
                            "folder again", root, file, e)
                file = None
    skipped = list(zip(_unpack(arrays["skipped_blob"], arrays["skipped_offsets"]),
                       _unpack(arrays["reasons_blob"], arrays["reasons_offsets"])))
    return FolderIndex(root, PathTable(root, arrays["paths_blob"], arrays["paths_offsets"]),
                       arrays["labels"].astype(np.int64), arrays["sizes"].astype(np.int32),
                       _unpack(arrays["names_blob"], arrays["names_offsets"]),
                       [(str(root / p), r) for p, r in skipped], int(arrays["candidates"]), file, cached,
                       time.perf_counter() - start)


def _scan_folder(root: Path, cfg: DataConfig) -> Source:
    index = folder_index(root)
    skipped = index.skipped
    for path, reason in skipped[:20]:
        log.warning("data: skipping %s: %s", path, reason)
    if len(skipped) > 20:
        log.warning("data: skipped %d more files (see the dataset's .skipped)", len(skipped) - 20)
    if len(index.paths) == 0:
        first = next((s for s in skipped if not s[1].startswith("not inside a class folder")), skipped[0])
        raise DataError(f"data.source={root}: none of its {index.candidates} image files is readable "
                        f"(first: {first[0]}: {first[1]})")
    names = index.class_names
    kind = f"{len(names)} class folders" if names else "flat folder"
    source = Source(f"{root} ({kind})", index.labels, names, cfg.resolution, cfg.resize, paths=index.paths,
                    skipped=skipped, origin=cfg.source, sizes=index.sizes, index_file=index.file)
    _log_upscaled(source)
    return source


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
    """Read or index ``cfg.source`` once; pass the result to :func:`build_dataset` to build several splits."""
    root = source_path(cfg)
    if root is None:
        return _load_npz(_emoji_path(), cfg, name="emoji: embedded Noto emoji")
    if root.is_file():
        if root.suffix.lower() == ".npz":
            return _load_npz(root, cfg)
        raise DataError(f"data.source={cfg.source!r} is a file but not an .npz: give its folder instead")
    return _scan_folder(root, cfg)


# ============================================================================ the dataset

_RRC_SALT = 1 << 40  # random resized crop keys: salts apart from the crop/flip ones (epoch + 2)


class ImageDataset(Dataset):
    """One split of a :class:`Source`: items ``(image (3,R,R) float32 in [-1,1], label int)``.

    Augmentation (train split only: ``random_crop`` windows, ``random_resized_crop`` boxes, ``hflip``) is a
    pure function of ``(seed, epoch, image index)``; other splits take the central crop. Call
    :meth:`set_epoch` before each epoch's DataLoader iterator is created, or index with ``(epoch, index)``
    pairs from the sampler (this also works with persistent workers).

    A file that fails to decode is logged, counted in ``runtime_failures`` and replaced by the next image
    of the split (in split order, wrapping) that decodes. Which image that is depends only on the
    position and on which files fail, not on the order failures were discovered, so every worker, every
    process and a resumed run read the same items. Counts are per process (each worker logs its own).
    """

    def __init__(self, source: Source, indices: np.ndarray, split: Split, *, hflip: bool = False,
                 seed: int = 0, crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
                 crop_ratio: Sequence[float] = DEFAULT_CROP_RATIO) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)  # (n,) positions in the source, sorted
        self.split = split
        self.resolution = source.resolution
        self.policy = source.policy
        train = split == "train"
        self.random_crop = train and source.policy is ResizePolicy.random_crop
        self.random_resized = train and source.policy is ResizePolicy.random_resized_crop
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.hflip = train and hflip
        self.seed = seed
        self.epoch = 0
        self.draft = True  # reduced-size JPEG decoding where the crop allows it (decode_side)
        self.decode_side = decode_side(self.resolution, self.policy, train, self.crop_scale, self.crop_ratio)
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
        """``(path, reason)`` of every file left out: at indexing, then any that failed later (this process)."""
        later = [(str(self.source.paths[i]), r) for i, r in self.runtime_failures.items()] \
            if self.source.paths is not None else []
        return [*self.source.skipped, *later]

    @property
    def upscaled(self) -> int:
        """Images of this split whose shorter side is below R (the policy scales them up)."""
        return int(self.source.small(self.resolution)[self.indices].sum())

    def class_counts(self) -> dict[str, int]:
        """Images per class name in this split (``{"unlabeled": n}`` for unlabeled images)."""
        counts = Counter(self.labels.tolist())
        names = self.source.class_names
        return {(names[k] if k >= 0 else "unlabeled"): counts[k] for k in sorted(counts)}

    def summary(self) -> str:
        """One line: source, split size, resolution, classes, skipped and upscaled files."""
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabeled"
        up = self.upscaled
        upscaled = f", {up} upscaled (smaller than {self.resolution} px)" if up else ""
        return (f"{self.source.description} [{self.split}]: {len(self)} of {len(self.source)} images, "
                f"{self.resolution}x{self.resolution} {self.policy.value}, {classes}, "
                f"{len(self.skipped)} files skipped{upscaled}")

    def __repr__(self) -> str:
        return f"ImageDataset({self.summary()})"

    # ------------------------------------------------------------------ items
    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch`` for plain integer indexing."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def _decode(self, i: int) -> np.ndarray:
        """Source image ``i`` in the policy's stored form (whole image for random_resized_crop)."""
        assert self.source.paths is not None
        return load_image(self.source.paths[i], self.resolution, self.policy, min_side=self.decode_side,
                          draft=self.draft)

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
                return i, self._decode(i)
            except Exception as e:  # a file broke after indexing: count it, log it, use the next image
                reason = f"failed to decode: {type(e).__name__}: {e}"
                self.runtime_failures[i] = reason
                log.warning("data: %s %s; substituting the next image", self.source.paths[i], reason)
        raise DataError(f"every image of the {self.split} split failed to load (first: {self.skipped[0]}); "
                        "check that the files of data.source are readable")

    def _rrc_keys(self, i: int, epoch: int) -> np.ndarray:
        return hash_keys(self.seed, np.arange(4 * RRC_TRIES, dtype=np.int64) + 64 * i, salt=_RRC_SALT + epoch)

    def crop_box(self, index: int, epoch: int, width: int, height: int) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the random resized crop of source image ``index`` in ``epoch``."""
        return random_resized_crop_box(width, height, self.crop_scale, self.crop_ratio,
                                       self._rrc_keys(index, epoch))

    def _pixels(self, pos: int, epoch: int | None) -> tuple[int, np.ndarray]:
        i, arr = self._stored(pos)
        h, w = arr.shape[:2]
        r = self.resolution
        bits = int(hash_keys(self.seed, np.array([i]), salt=epoch + 2)[0]) if epoch is not None else 0
        if self.policy is ResizePolicy.random_resized_crop:
            if epoch is not None and self.random_resized:
                arr = resized_crop(arr, self.crop_box(i, epoch, w, h), r)  # (R, R, 3)
            else:
                arr = fit_image(arr, r, ResizePolicy.center_crop)  # (R, R, 3)
        else:
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
    return ImageDataset(source, indices, split, hflip=cfg.hflip, seed=seed, crop_scale=cfg.crop_scale,
                        crop_ratio=cfg.crop_ratio)

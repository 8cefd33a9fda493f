#!/usr/bin/env python
"""Rebuild ``tokenizer/assets/noto_emoji_64.npz``, the embedded dataset, from the npm package.

Source: npm ``emoji-datasource-google@16.0.0`` (Noto Emoji v2.048 images, Apache-2.0; metadata MIT).
Every entry of ``emoji.json`` with a Google image is kept, in sorted ``unified`` order; skin-tone variants
(the ``skin_variations`` of an entry) are left out. Each 64x64 PNG (RGBA, LA or palette) is composited on
white by :func:`tokenizer.core.data.to_rgb_uint8`. Labels index the 10 categories in the order of the
package's ``categories.json``. The output is byte-for-byte reproducible (fixed zip timestamps).

Arrays: ``images`` uint8 (N,64,64,3), ``labels`` int64 (N,), ``class_names`` (10,) str, ``unified`` (N,) str,
``short_names`` (N,) str, ``source`` () str, ``package_sha1`` () str.

Usage:
  python scripts/build_emoji_dataset.py                     # runs `npm pack` in a temporary folder
  python scripts/build_emoji_dataset.py --package emoji-datasource-google-16.0.0.tgz
  python scripts/build_emoji_dataset.py --package path/to/extracted/package --out emoji.npz
  python scripts/build_emoji_dataset.py --check             # rebuild and compare with the committed file
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tokenizer.core.data import EMOJI_FILE, to_rgb_uint8
from tokenizer.core.io import atomic_path
from tokenizer.core.paths import ASSETS

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
SIZE = 64


def _reader(package: Path) -> tuple[Callable[[str], bytes], str]:
    """A function reading ``package/<name>`` from a .tgz or an extracted folder, and the package's sha1."""
    if package.is_dir():
        root = package / "package" if (package / "package").is_dir() else package
        return (lambda name: (root / name).read_bytes()), "unknown (extracted folder)"
    sha1 = hashlib.sha1(package.read_bytes()).hexdigest()
    wanted = ("package/package.json", "package/categories.json", "package/emoji.json",
              f"package/img/google/{SIZE}/")
    with tarfile.open(package, "r:gz") as tar:
        files = {m.name.removeprefix("package/"): tar.extractfile(m).read()  # type: ignore[union-attr]
                 for m in tar.getmembers() if m.isfile() and m.name.startswith(wanted)}

    def read(name: str) -> bytes:
        if name not in files:
            raise SystemExit(f"{package} has no package/{name}: is it {PACKAGE}@{VERSION}?")
        return files[name]

    return read, sha1


def _npm_pack(workdir: Path) -> Path:
    cmd = ["npm", "pack", f"{PACKAGE}@{VERSION}"]
    try:
        subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({e}); download the .tgz yourself and pass --package") from None
    return workdir / f"{PACKAGE}-{VERSION}.tgz"


def build(read: Callable[[str], bytes], sha1: str) -> dict[str, np.ndarray]:
    """All arrays of the dataset, from a package reader."""
    meta = json.loads(read("package.json"))
    if (meta.get("name"), meta.get("version")) != (PACKAGE, VERSION):
        raise SystemExit(f"expected {PACKAGE}@{VERSION}, got {meta.get('name')}@{meta.get('version')}")
    categories = list(json.loads(read("categories.json")))
    entries = sorted((e for e in json.loads(read("emoji.json")) if e.get("has_img_google")),
                     key=lambda e: e["unified"])
    unknown = {e["category"] for e in entries} - set(categories)
    if unknown:
        raise SystemExit(f"emoji.json has categories missing from categories.json: {sorted(unknown)}")
    images, labels = [], []
    for e in entries:
        with Image.open(io.BytesIO(read(f"img/google/{SIZE}/{e['image']}"))) as im:
            rgb = to_rgb_uint8(im)  # (64, 64, 3), alpha composited on white
        if rgb.shape != (SIZE, SIZE, 3):
            raise SystemExit(f"{e['image']} is {rgb.shape}, expected ({SIZE}, {SIZE}, 3)")
        images.append(rgb)
        labels.append(categories.index(e["category"]))
    return {
        "images": np.stack(images),  # (N, 64, 64, 3) uint8
        "labels": np.asarray(labels, dtype=np.int64),
        "class_names": np.asarray(categories),
        "unified": np.asarray([e["unified"] for e in entries]),
        "short_names": np.asarray([e["short_name"] for e in entries]),
        "source": np.asarray(f"{PACKAGE}@{VERSION}"),
        "package_sha1": np.asarray(sha1),
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed timestamps and order, so equal arrays give equal bytes."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("Usage:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, default=None,
                        help=f"{PACKAGE}-{VERSION}.tgz or its extracted folder (default: run `npm pack`)")
    parser.add_argument("--out", type=Path, default=ASSETS / EMOJI_FILE, help="output .npz (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="build in memory and compare with --out instead of writing it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or _npm_pack(Path(tmp))
        if not package.exists():
            raise SystemExit(f"--package {package} does not exist")
        arrays = build(*_reader(package))
        if args.check:
            with np.load(args.out, allow_pickle=False) as old:
                same = set(old.files) == set(arrays) and all(
                    k == "package_sha1" or np.array_equal(old[k], arrays[k]) for k in arrays)
            print(f"{args.out}: {'matches' if same else 'DIFFERS FROM'} a fresh build")
            return 0 if same else 1
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_npz(args.out, arrays)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    counts = np.bincount(arrays["labels"], minlength=len(arrays["class_names"]))
    print(f"wrote {args.out}: {len(arrays['images'])} images, {args.out.stat().st_size / 1e6:.2f} MB, "
          f"sha256 {digest}")
    for name, count in zip(arrays["class_names"].tolist(), counts.tolist()):
        print(f"  {count:5d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

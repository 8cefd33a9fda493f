"""The one atomic write (``tokenizer.core.io``): temporaries, fsync-and-rename, cleanup of stale temporaries."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenizer.core.io import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    file_digest,
    is_temp_name,
    package_version,
    remove_stale_temps,
    sha256_file,
    temp_path,
)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_names_follow_one_scheme(tmp_path: Path) -> None:
    a, b = temp_path(tmp_path / "x.npz"), temp_path(tmp_path / "x.npz")
    assert a != b and a.parent == tmp_path and a.name.startswith(f".x.npz.tmp-{os.getpid()}-")
    assert is_temp_name(a.name) and not is_temp_name("x.npz") and not is_temp_name(".x.npz.tmp")


def test_atomic_path_replaces_on_success_only(tmp_path: Path) -> None:
    out = tmp_path / "a.npz"
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=np.arange(3))
    assert np.load(out)["x"].tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError, match="boom"), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert np.load(out)["x"].tolist() == [0, 1, 2]  # the old content survives a failed write
    atomic_write_text(tmp_path / "t.txt", "hello")
    assert (tmp_path / "t.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "t.txt"]  # no temporary left


def test_atomic_dir_replaces_a_directory(tmp_path: Path) -> None:
    out = tmp_path / "model"
    for text in ("one", "two"):
        with atomic_dir(out) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f.txt").write_text(text)
        assert (out / "sub" / "f.txt").read_text() == text
    with pytest.raises(OSError), atomic_dir(out) as tmp:
        (tmp / "f.txt").write_text("three")
        raise OSError("disk full")
    assert (out / "sub" / "f.txt").read_text() == "two" and not (out / "f.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_stale_cleanup_touches_only_dead_writers_temporaries(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale_dir = tmp_path / f".step_00000003.tmp-{dead}-0123abcd"
    stale_dir.mkdir()
    stale_file = tmp_path / f".step_x.tmp-{dead}-89abcdef"
    stale_file.write_text("")
    mine = temp_path(tmp_path / "step_00000004")
    mine.mkdir()
    other_target = tmp_path / f".other.tmp-{dead}-0123abcd"
    other_target.write_text("")
    keep = [tmp_path / f".step_00000005.tmp-{dead}", tmp_path / "step_00000006.tmp-1-0123abcd",
            tmp_path / f".step_00000007.old-{dead}", tmp_path / "step_00000008"]
    for p in keep:
        p.mkdir()
    removed = remove_stale_temps(tmp_path, target_prefix="step_")
    assert sorted(removed) == sorted([stale_dir, stale_file])
    assert all(p.exists() for p in [mine, other_target, *keep])


def test_digests_and_versions(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc" * 1000)
    assert sha256_file(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_digest(f, "sha1") == hashlib.sha1(b"abc" * 1000).hexdigest()
    assert package_version("numpy") == np.__version__
    assert package_version("no-such-distribution-alit", default="?") == "?"

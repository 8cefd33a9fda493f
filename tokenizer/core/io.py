"""File-system plumbing every package shares: atomic writes, file digests, package versions.

**Atomic writes.** :func:`atomic_path` and :func:`atomic_dir` are the project's one way to replace a
file or a directory so that a reader (or a restarted job) sees the old content or the new, never a mix.
Both write under a hidden temporary name beside the target, in the one naming scheme
``.<name>.tmp-<pid>-<8 hex>`` (:func:`temp_path`), fsync what was written and the parent directory,
and rename it into place on success; on any error the temporary is removed and the target is untouched.
A process killed mid-write leaves only such a temporary behind; :func:`remove_stale_temps` deletes
those whose writer is dead, and never anything that does not match the scheme.

**Digests.** :func:`file_digest` (streamed, any hashlib algorithm; :func:`sha256_file` for the common
case) and :func:`update_digest` to stream a file into a running hash.

**Versions.** :func:`package_version` is the installed version of a distribution, or a default.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["TEMP_PATTERN", "atomic_dir", "atomic_path", "atomic_write_text", "file_digest", "fsync_dir",
           "is_temp_name", "package_version", "remove_stale_temps", "sha256_file", "temp_path", "update_digest"]

CHUNK = 1 << 22  # bytes read at a time when hashing

# The one temporary naming scheme: ".<target name>.tmp-<writer pid>-<8 random hex digits>".
TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")


# ============================================================================ temporary names
def temp_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary path beside ``path`` in the one naming scheme (nothing is created)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """True when ``name`` is a temporary of :func:`temp_path` (of any target, any writer)."""
    return TEMP_PATTERN.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(directory: str | os.PathLike[str], target_prefix: str = "") -> list[Path]:
    """Delete the temporaries in ``directory`` (files or folders) left by writers that are no longer running.

    Only names matching the one scheme (:data:`TEMP_PATTERN`) whose target name starts with
    ``target_prefix`` are considered, and only when their writer's pid is not a live process on this
    machine. Returns what was removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        match = TEMP_PATTERN.match(entry.name)
        if match is None or not match["target"].startswith(target_prefix) or _alive(int(match["pid"])):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


# ============================================================================ fsync
def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename or a new entry in it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (deepest first), then ``root`` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            file = Path(dirpath) / name
            if file.is_file() and not file.is_symlink():
                _fsync_file(file)
        fsync_dir(dirpath)


# ============================================================================ atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the new file to; it replaces ``path`` on success.

    ::

        with atomic_path(out / "stats.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    On leaving the block normally the temporary is fsynced, renamed onto ``path`` (``os.replace``) and
    the directory fsynced. On an exception (or if nothing was written) the temporary is removed and
    ``path`` is left as it was. The parent directory must exist. Writers that append a suffix to the
    name they are given (``np.save``, ``np.savez``) must be handed an open file instead.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_path: nothing was written to {tmp} (the temporary for {path})")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path`` to fill; it becomes ``path`` on success.

    On leaving the block normally every file in it and the directory itself are fsynced, an existing
    ``path`` is moved aside (to a temporary name) and deleted, the new directory is renamed into place
    and the parent fsynced. On an exception the temporary directory is deleted and ``path`` is left as
    it was. The parent directory must exist.
    """
    path = Path(path)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():  # the same name written again: move the old one aside first
            old = temp_path(path)
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if old is not None:
                old.rename(path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a mix."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ============================================================================ digests and versions
def update_digest(digest: Any, path: str | os.PathLike[str], chunk: int = CHUNK) -> None:
    """Stream the bytes of the file ``path`` into the hashlib object ``digest``."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file, streamed (``algorithm`` is any :func:`hashlib.new` name)."""
    digest = hashlib.new(algorithm)
    update_digest(digest, path)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed."""
    return file_digest(path, "sha256")


def package_version(dist: str, default: str = "unknown") -> str:
    """The installed version of the distribution ``dist`` (e.g. ``"torch"``), or ``default`` if absent."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return default

"""Token cache shards read in place: memory-mapped safetensors, one array per key over all shards of a split.

A safetensors file is an 8-byte little-endian header length ``n``, a JSON header of ``n`` bytes
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``, offsets counted from the byte after the
header; C order, little-endian) and the raw data. :func:`read_header` parses the header (JSON only, never
pickle) and :class:`ShardedArray` maps each tensor read-only where it lies in the file, presenting the
row-concatenation of one key over all shards of a split as one ``(N, ...)`` array, without copying it:

    arrays = load_cache_arrays(cache_dir, "train")      # {"ids_32": ShardedArray (N, 32) int16, "labels": ...}
    arrays["ids_32"][7]                                 # one row, a torch tensor (int16 stays int16)
    arrays["ids_32"][idx]                               # the requested rows only (int, slice, tensor, array)
    train = arrays["ids_32"].select(rows)               # a lazy view of some rows (no copy)

Memory: the pages of a file mapped read-only belong to the page cache and are shared by every process of
the machine that maps the same file (the 8 ranks of a node, their DataLoader workers), so a cache read this
way is in RAM **once per node**, where loading it into tensors holds a copy per process. Each process maps
the files itself, lazily, on first access: an array pickles as its file paths, offsets and shapes (a
DataLoader with ``spawn`` workers reopens the maps in each worker; ``fork`` workers inherit them). One map
per shard file serves all its keys, so a split needs one file descriptor per shard.

:func:`open_token_cache` is :func:`generator.cache.load_token_cache` without the int64 copies: ids (and
adaptive ids) stay mapped ``ShardedArray`` s, labels and adaptive lengths (one number per image) are read
into int64 tensors as before.
"""

from __future__ import annotations

import bisect
import json
import math
import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenizer.core.checkpoint import CheckpointError

from .cache import NotATokenCache, TokenCache, _check_split, read_manifest

# safetensors dtype names -> numpy dtypes (little-endian, as the format stores them). BF16 and the F8 types
# have no numpy dtype; a cache never holds them (ids are integers).
DTYPES: dict[str, np.dtype] = {name: np.dtype(code) for name, code in {
    "BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4", "I32": "<i4",
    "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}.items()}
MAX_HEADER = 100 << 20  # bytes; the limit of the safetensors reference implementation


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""

    path: str  # the file
    name: str  # the tensor's key
    dtype: str  # safetensors dtype name, e.g. "I16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of its first element in the file

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors of a safetensors file (JSON header only; every offset checked against the file size)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"cannot read {path}: shorter than a safetensors header (truncated?)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"cannot read {path}: header length {n} does not fit the file ({size} "
                                      "bytes): truncated or not a safetensors file")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    except ValueError as e:  # JSON (UnicodeDecodeError is a ValueError too)
        raise CheckpointError(f"cannot read {path}: the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path}: the header is not a JSON object")
    start = 8 + n
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"cannot read {path}: malformed header entry {name!r}: {info!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which cannot be memory-mapped "
                                  f"(supported: {sorted(DTYPES)})")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end or end - begin != nbytes or start + end > size or min(shape, default=0) < 0:
            raise CheckpointError(f"cannot read {path}: tensor {name!r} ({dtype} {list(shape)}) has data offsets "
                                  f"[{begin}, {end}] that do not fit its shape or the file (truncated?)")
        out[name] = TensorEntry(str(path), name, dtype, shape, start + begin)
    return out


class ShardFiles:
    """The files of one split, each mapped read-only once per process, lazily (shared by the split's arrays).

    Pickles as its paths: the maps are reopened by the process that unpickles it (a spawned DataLoader
    worker); a forked process inherits them.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self._maps: dict[str, mmap.mmap] = {}
        self._views: dict[TensorEntry, np.ndarray] = {}

    def map(self, path: str) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            with open(path, "rb") as f:  # mmap keeps its own descriptor; this one is closed at once
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[path] = m
        return m

    def view(self, entry: TensorEntry) -> np.ndarray:
        """The tensor as a read-only numpy array over the map (no copy)."""
        v = self._views.get(entry)
        if v is None:
            count = math.prod(entry.shape)
            if count == 0:
                v = np.empty(entry.shape, entry.numpy_dtype)
            else:
                v = np.frombuffer(self.map(entry.path), dtype=entry.numpy_dtype, count=count,
                                  offset=entry.offset).reshape(entry.shape)
            self._views[entry] = v
        return v

    def close(self) -> None:
        """Forget this process's maps (their pages are released once no array over them is left)."""
        self._maps.clear()
        self._views.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"paths": self.paths}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.paths, self._maps, self._views = state["paths"], {}, {}


Index = int | slice | torch.Tensor | np.ndarray | Sequence[int]


class ShardedArray:
    """One key of every shard of a split, as one read-only ``(N, ...)`` array; rows are read on demand.

    ``len()``, ``.shape``, ``.dtype`` (a torch dtype), ``.ndim``; indexing by an int (one row), a slice or
    an index tensor/array/list (bool masks too) returns a torch tensor holding just those rows, in the
    stored dtype (``gather(index, dtype)`` converts). ``select(rows)`` is a lazy view of some rows (a
    train/val split copies nothing but its index). Nothing is read until asked for.
    """

    def __init__(self, files: ShardFiles, parts: Sequence[TensorEntry], rows: np.ndarray | None = None) -> None:
        if not parts:
            raise ValueError("a ShardedArray needs at least one part")
        first = parts[0]
        for p in parts:
            if p.dtype != first.dtype or p.shape[1:] != first.shape[1:] or not p.shape:
                raise NotATokenCache(f"'{first.name}' differs between shards: {first.dtype} {list(first.shape)} "
                                     f"in {first.path}, {p.dtype} {list(p.shape)} in {p.path}")
        self.files, self.parts = files, tuple(parts)
        self.starts = np.cumsum([0] + [p.shape[0] for p in parts], dtype=np.int64)  # first row of each part
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)  # a view's rows (global)
        self.numpy_dtype = first.numpy_dtype
        self.row_shape: tuple[int, ...] = first.shape[1:]
        self._bounds = self.starts[1:].tolist()  # one past the last row of each part, for bisect
        self._views: list[np.ndarray | None] = [None] * len(self.parts)  # this process's, lazily

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype, as torch names it (int16 ids stay int16)."""
        return torch.from_numpy(np.empty(0, self.numpy_dtype)).dtype

    # ------------------------------------------------------------------ shape
    @property
    def total_rows(self) -> int:
        """Rows of all shards (of the base array, whatever the view)."""
        return int(self.starts[-1])

    def __len__(self) -> int:
        return self.total_rows if self.rows is None else len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel() * self.numpy_dtype.itemsize

    def __repr__(self) -> str:
        view = "" if self.rows is None else f", a view of {len(self.rows)} of {self.total_rows} rows"
        return (f"ShardedArray({self.parts[0].name!r}, shape={self.shape}, dtype={self.dtype}, "
                f"{len(self.parts)} shards{view})")

    # ------------------------------------------------------------------ reading
    def part(self, i: int) -> np.ndarray:
        """Shard ``i`` of the base array as a read-only numpy array over the map."""
        v = self._views[i]
        if v is None:
            v = self._views[i] = self.files.view(self.parts[i])
        return v

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_views": [None] * len(self.parts)}  # the maps are reopened where unpickled

    def _positions(self, index: Index) -> np.ndarray | int:
        """``index`` as this view's row positions: an int, or an int64 array (negative ones wrapped)."""
        n = len(self)
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.ndim == 0
                                                    and not index.is_floating_point()):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} rows")
            return i + n if i < 0 else i
        if isinstance(index, slice):
            return np.arange(*index.indices(n), dtype=np.int64)
        arr = index.cpu().numpy() if torch.is_tensor(index) else np.asarray(index)
        if arr.dtype == np.bool_:
            if arr.shape != (n,):
                raise IndexError(f"a boolean mask must have shape ({n},), got {arr.shape}")
            return np.flatnonzero(arr).astype(np.int64)
        if arr.size == 0:
            return np.empty(arr.shape, np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise IndexError(f"rows must be indexed by integers, slices or integer/bool arrays, got {arr.dtype}")
        arr = arr.astype(np.int64)
        if arr.min() < -n or arr.max() >= n:
            raise IndexError(f"an index is out of range for {n} rows (min {arr.min()}, max {arr.max()})")
        return np.where(arr < 0, arr + n, arr)

    def _global(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.rows is None else self.rows[positions]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """The base array's ``rows`` (global, in range, any shape) gathered into a new numpy array."""
        flat = rows.reshape(-1)
        out = np.empty((len(flat), *self.row_shape), self.numpy_dtype)
        if len(flat):
            shard = np.searchsorted(self.starts, flat, side="right") - 1
            if len(flat) > 1 and np.all(np.diff(flat) == 1):  # consecutive rows: block copies
                at = 0
                for s in range(int(shard[0]), int(shard[-1]) + 1):
                    lo = max(int(flat[0]), int(self.starts[s])) - int(self.starts[s])
                    hi = min(int(flat[-1]) + 1, int(self.starts[s + 1])) - int(self.starts[s])
                    out[at: at + hi - lo] = self.part(s)[lo:hi]
                    at += hi - lo
            else:
                order = np.argsort(shard, kind="stable")
                sorted_shards = shard[order]
                cuts = np.flatnonzero(np.diff(sorted_shards)) + 1
                for group in np.split(order, cuts):
                    s = int(shard[group[0]])
                    out[group] = self.part(s)[flat[group] - self.starts[s]]
        return out.reshape(*rows.shape, *self.row_shape)

    def gather(self, index: Index, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The rows at ``index`` as a new torch tensor (stored dtype unless ``dtype`` is given)."""
        if type(index) is int and 0 <= index < len(self):  # one row (a dataset item): the short way
            g = index if self.rows is None else int(self.rows[index])
            s = bisect.bisect_right(self._bounds, g)
            out = torch.from_numpy(np.array(self.part(s)[g - (self._bounds[s - 1] if s else 0)]))
            return out if dtype is None else out.to(dtype)
        pos = self._positions(index)
        if isinstance(pos, int):  # a negative, numpy or 0-d tensor index, now checked and wrapped
            return self.gather(pos, dtype)
        out = torch.from_numpy(self._read(self._global(pos)))
        return out if dtype is None else out.to(dtype)

    def __getitem__(self, index: Index) -> torch.Tensor:
        if isinstance(index, tuple):
            raise TypeError("a ShardedArray is indexed by rows only (an int, a slice or an index array); "
                            "index the returned tensor for columns")
        return self.gather(index)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for chunk in self.chunks():
            yield from chunk

    def select(self, index: Index) -> ShardedArray:
        """A lazy view of the rows at ``index`` (their order kept): nothing is read or copied but the index."""
        pos = self._positions(index)
        pos = np.array([pos], np.int64) if isinstance(pos, int) else pos.reshape(-1)
        return ShardedArray(self.files, self.parts, self._global(pos))

    def chunks(self, max_elements: int = 1 << 22) -> Iterator[torch.Tensor]:
        """Consecutive blocks of rows (about ``max_elements`` each) as tensors in the stored dtype."""
        step = max(1, max_elements // max(1, math.prod(self.row_shape)))
        for start in range(0, len(self), step):
            yield self.gather(slice(start, start + step))

    def min_max(self) -> tuple[int, int] | None:
        """The smallest and largest value (None when empty), read in place shard by shard (no copy)."""
        if not self.numel():
            return None
        if self.rows is None:
            views = [self.part(i) for i in range(len(self.parts)) if self.parts[i].shape[0]]
            return min(int(v.min()) for v in views), max(int(v.max()) for v in views)
        lo, hi = [], []
        for chunk in self.chunks():
            lo.append(int(chunk.min()))
            hi.append(int(chunk.max()))
        return min(lo), max(hi)

    def to_tensor(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All rows as one in-memory tensor (a copy: for small arrays such as labels)."""
        return self.gather(slice(None), dtype)


def load_cache_arrays(cache_dir: str | Path, split: str) -> dict[str, ShardedArray]:
    """Every key of a split of a token cache as a mapped :class:`ShardedArray` (nothing is read but headers)."""
    return _split_arrays(cache_dir, split, read_manifest(cache_dir))


def _split_arrays(cache_dir: str | Path, split: str, manifest: dict[str, Any]) -> dict[str, ShardedArray]:
    _check_split(manifest, cache_dir, split)
    return shard_arrays([str(Path(cache_dir) / name) for name in manifest["splits"][split]["shards"]])


def shard_arrays(paths: Sequence[str | Path]) -> dict[str, ShardedArray]:
    """The keys of safetensors files holding the same keys, each as the row-concatenation over the files."""
    files = ShardFiles([str(p) for p in paths])
    entries = [read_header(p) for p in files.paths]
    if not entries:
        return {}
    keys = list(entries[0])
    for path, e in zip(files.paths, entries):
        if set(e) != set(keys):
            raise NotATokenCache(f"shard {path} holds keys {sorted(e)}, other shards {sorted(keys)}: a damaged "
                                 "or mixed cache (re-run `alit tokenize` into a new directory)")
    return {k: ShardedArray(files, [e[k] for e in entries]) for k in keys}


def open_token_cache(cache_dir: str | Path, split: str) -> TokenCache:
    """One split of a cache with its ids memory-mapped (:func:`generator.cache.load_token_cache` without copies).

    ``ids_by_budget`` and ``adaptive_ids`` are :class:`ShardedArray` s in the stored dtype (int16 when
    K <= 32768); ``labels`` and ``adaptive_lengths`` are int64 tensors (one number per image, as before).
    """
    manifest = read_manifest(cache_dir)
    arrays = _split_arrays(cache_dir, split, manifest)
    if "labels" not in arrays:
        raise NotATokenCache(f"split '{split}' of the token cache {cache_dir} holds no shards with labels "
                             f"(found {sorted(arrays)})")
    ids = {int(k.split("_", 1)[1]): v for k, v in arrays.items() if k.startswith("ids_")}
    lengths = arrays.get("adaptive_lengths")
    return TokenCache(ids, arrays["labels"].to_tensor(torch.long), arrays.get("adaptive_ids"),  # type: ignore[arg-type]
                      None if lengths is None else lengths.to_tensor(torch.long), manifest)


"""The memory-mapped token cache (generator/shards.py): the same values as load_token_cache across shard
boundaries, every kind of index, TokenDataset items identical to the in-memory dataset's, DataLoader
workers (fork and spawn), and no int64 copy of the cache (RSS of a fresh process)."""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bench.cache_bench import BUDGETS, measure_in_subprocess, write_synthetic_cache
from generator.cache import build_token_cache, load_token_cache
from generator.shards import ShardedArray, load_cache_arrays, open_token_cache, read_header
from generator.tasks import TokenDataset, collate_tokens, unigram_bits_per_token
from tokenizer.alit import ALITTokenizer
from tokenizer.core.checkpoint import CheckpointError, save_tensors
from tokenizer.core.data import DataConfig
from tokenizer.vq import BaseVQ, base_vq_config

DATA = DataConfig(source="emoji", max_images=48, val_fraction=0.25)  # 36 train, 12 val images
SHARD = 5  # images per shard file: 8 train shards, 3 val shards


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tok = ALITTokenizer.build(BaseVQ(base_vq_config("tiny")), "tiny", image_size=64)
    for p in tok.parameters():  # spread the init so codes depend on the input (an untrained tokenizer)
        p.data.normal_(0, 0.2) if p.ndim > 1 else None
    root = tmp_path_factory.mktemp("shards")
    tok_dir = tok.eval().save_pretrained(root / "tok")
    out = build_token_cache(tok_dir, DATA, root / "cache", adaptive_threshold=0.2, batch_size=16,
                            shard_size=SHARD, progress=False)
    assert out is not None
    return out


def _same_item(x: tuple[torch.Tensor, ...], y: tuple[torch.Tensor, ...]) -> bool:
    return all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(x, y, strict=True))


@pytest.mark.parametrize("split", ["train", "val"])
def test_mapped_arrays_equal_the_loaded_cache(cache: Path, split: str) -> None:
    ref, mapped = load_token_cache(cache, split), open_token_cache(cache, split)
    n = len(ref.labels)
    arrays = load_cache_arrays(cache, split)
    assert len(arrays["labels"].parts) == math.ceil(n / SHARD) > 1
    assert set(mapped.ids_by_budget) == set(ref.ids_by_budget) and mapped.manifest == ref.manifest
    g = torch.Generator().manual_seed(0)
    for b, want in ref.ids_by_budget.items():
        a = mapped.ids_by_budget[b]
        assert isinstance(a, ShardedArray) and a.dtype == torch.int16 and a.shape == tuple(want.shape)
        assert len(a) == n and a.ndim == 2 and a.nbytes == n * b * 2
        assert torch.equal(a[:].long(), want) and a[:].dtype == torch.int16
        for i in (0, SHARD - 1, SHARD, 2 * SHARD - 1, 2 * SHARD, n - 1, -1, -n):  # around shard boundaries
            assert torch.equal(a[i].long(), want[i]), i
            assert a[torch.tensor(i)].shape == (b,)
        for s in (slice(3, 12), slice(SHARD, 2 * SHARD), slice(2, None, 4), slice(None, None, -1), slice(7, 7)):
            assert torch.equal(a[s].long(), want[s.start:s.stop:s.step] if s.step != -1 else want.flip(0)), s
        idx = torch.randint(-n, n, (40,), generator=g)  # random, repeated, negative
        assert torch.equal(a[idx].long(), want[idx])
        assert torch.equal(a[idx.numpy()].long(), want[idx]) and torch.equal(a[idx.tolist()].long(), want[idx])
        assert torch.equal(a[idx.view(8, 5)].long(), want[idx.view(8, 5)])
        mask = torch.arange(n) % 3 == 1
        assert torch.equal(a[mask].long(), want[mask])
        assert a.gather(idx, torch.long).dtype == torch.long and torch.equal(a.gather(idx, torch.long), want[idx])
        view = a.select(idx)  # a lazy view: nothing read
        assert view.shape == (40, b) and torch.equal(view[:].long(), want[idx])
        assert torch.equal(view[3].long(), want[idx[3]]) and torch.equal(view[5:30:2].long(), want[idx][5:30:2])
        assert torch.equal(view.select(torch.tensor([2, 0]))[:].long(), want[idx[[2, 0]]])
        assert a.min_max() == (int(want.min()), int(want.max())) and view.min_max() == (
            int(want[idx].min()), int(want[idx].max()))
        assert torch.equal(torch.cat(list(a.chunks(max_elements=3 * b))).long(), want)
    assert mapped.labels.dtype == torch.int64 and torch.equal(mapped.labels, ref.labels)
    assert torch.equal(mapped.adaptive_lengths, ref.adaptive_lengths)
    assert isinstance(mapped.adaptive_ids, ShardedArray) and torch.equal(mapped.adaptive_ids[:].long(),
                                                                         ref.adaptive_ids)
    a = mapped.ids_by_budget[min(ref.ids_by_budget)]
    with pytest.raises(IndexError):
        a[n]
    with pytest.raises(IndexError):
        a[torch.tensor([0, -n - 1])]
    with pytest.raises(TypeError, match="rows only"):
        a[:, 0]


def test_mapped_token_dataset_items_equal_the_in_memory_dataset(cache: Path) -> None:
    ref, mapped = load_token_cache(cache, "train"), open_token_cache(cache, "train")
    mem = TokenDataset(ref.ids_by_budget, ref.labels)
    mm = TokenDataset(mapped.ids_by_budget, mapped.labels)
    assert all(isinstance(v, ShardedArray) and v.dtype == torch.int16 for v in mm.ids.values())  # no copy
    assert len(mm) == len(mem) and mm.budgets == mem.budgets and mm.max_len == mem.max_len
    assert all(_same_item(mem[i], mm[i]) for i in range(len(mem)))
    (tm, vm), (tr, vr) = mem.split(7, seed=3), mm.split(7, seed=3)
    for x, y in ((tm, tr), (vm, vr)):
        assert all(isinstance(v, ShardedArray) and v.rows is not None for v in y.ids.values())  # row views
        assert torch.equal(x.labels, y.labels) and all(_same_item(x[i], y[i]) for i in range(len(x)))
        for (b1, t1), (b2, t2) in zip(x.budget_batches(4), y.budget_batches(4), strict=True):
            assert b1 == b2 and all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(t1, t2, strict=True))
    sub = mm.subset(torch.tensor([9, 2, 30]))
    assert all(_same_item(sub[i], mem.subset(torch.tensor([9, 2, 30]))[i]) for i in range(len(sub)))
    k = mapped.codebook_size
    assert unigram_bits_per_token(tr.ids.values(), vr.ids.values(), k) == unigram_bits_per_token(
        tm.ids.values(), vm.ids.values(), k)
    assert unigram_bits_per_token(mapped.ids_by_budget[8], ref.ids_by_budget[4], k) == unigram_bits_per_token(
        ref.ids_by_budget[8], ref.ids_by_budget[4], k)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_mapped_dataset_in_dataloader_workers(cache: Path, context: str) -> None:
    mapped = open_token_cache(cache, "train")
    train, _ = TokenDataset(mapped.ids_by_budget, mapped.labels).split(7, seed=1)
    assert len(pickle.dumps(train)) < 50_000  # paths, offsets, shapes and the row index: not the ids
    kw = {"batch_size": 8, "shuffle": False, "collate_fn": collate_tokens}
    want = list(DataLoader(train, **kw))
    got = list(DataLoader(train, num_workers=2, multiprocessing_context=context, **kw))
    assert len(got) == len(want) == math.ceil(len(train) / 8)
    for x, y in zip(want, got, strict=True):
        assert all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(x, y, strict=True))
    copy = pickle.loads(pickle.dumps(train))  # the maps are reopened where it is unpickled
    assert all(_same_item(copy[i], train[i]) for i in range(0, len(train), 7))


def test_read_header_refuses_damaged_files(tmp_path: Path) -> None:
    good = tmp_path / "x.safetensors"
    save_tensors(good, {"a": torch.arange(6, dtype=torch.int16).view(2, 3), "b": torch.arange(2)})
    entries = read_header(good)
    assert entries["a"].dtype == "I16" and entries["a"].shape == (2, 3) and entries["b"].dtype == "I64"
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    arr = np.frombuffer(data, "<i2", 6, entries["a"].offset).reshape(2, 3)
    assert arr.tolist() == [[0, 1, 2], [3, 4, 5]]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="do not fit"):
        read_header(cut)
    for bad, match in ((data[:5], "shorter"), (struct.pack("<Q", 10**9) + data[8:], "does not fit"),
                       (data[:8] + b"\xff" * n + data[8 + n:], "not JSON")):
        cut.write_bytes(bad)
        with pytest.raises(CheckpointError, match=match):
            read_header(cut)


def test_open_token_cache_makes_no_int64_copy(tmp_path: Path) -> None:
    """A fresh process opens a 16,384-image cache of the public shape into TokenDataset and draws items: its
    private memory hardly grows, and its peak RSS grows by less than half the int64 ids would take (the
    growth is the int16 pages of the file it read, shared by every process mapping it)."""
    n = 16_384
    cache = write_synthetic_cache(tmp_path / "c", n, shard_size=4096)
    run = measure_in_subprocess("mapped", cache, 500)
    assert run["held"] == ["ShardedArray"] and run["dtypes"] == ["torch.int16"]
    int64_bytes = n * sum(BUDGETS) * 8
    anon = run["end"]["RssAnon"] - run["base"]["RssAnon"]
    peak = run["end"]["VmHWM"] - run["base"]["VmHWM"]
    assert anon < int64_bytes / 8, (anon, int64_bytes)
    assert peak < int64_bytes / 2, (peak, int64_bytes)

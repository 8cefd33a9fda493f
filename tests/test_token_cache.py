"""Token cache (alit tokenize) and prior training on it: ids equal the tokenizer's, reuse, identity checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from generator.cache import (
    NotATokenCache,
    TokenizerMismatch,
    build_token_cache,
    check_identity,
    load_token_cache,
    read_identity,
)
from generator.train import PriorKind, PriorRunConfig, train_prior
from slurm.cli import main as alit
from tokenizer.alit import ALITTokenizer
from tokenizer.core.checkpoint import tokenizer_identity
from tokenizer.core.data import DataConfig, build_dataset
from tokenizer.core.trainer import TrainConfig
from tokenizer.vq import BaseVQ, base_vq_config

DATA = DataConfig(source="emoji", max_images=48, val_fraction=0.25)


def _tokenizer(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    base = BaseVQ(base_vq_config("tiny"))
    tok = ALITTokenizer.build(base, "tiny", image_size=64)
    for p in tok.parameters():  # spread the init so codes depend on the input (an untrained tokenizer)
        p.data.normal_(0, 0.2) if p.ndim > 1 else None
    return tok.eval().save_pretrained(out)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("toks")
    return _tokenizer(root / "a", 0), _tokenizer(root / "b", 1)


@pytest.fixture(scope="module")
def cache(tok_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_token_cache(tok_dirs[0], DATA, tmp_path_factory.mktemp("c") / "cache", adaptive_threshold=0.2,
                             batch_size=16, progress=False)


def test_cache_holds_the_tokenizers_ids(tok_dirs: tuple[Path, Path], cache: Path) -> None:
    tok = ALITTokenizer.from_pretrained(tok_dirs[0]).eval()
    val = load_token_cache(cache, "val")
    ds = build_dataset(DATA, "val")
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert val.budgets == list(tok.budgets) and val.codebook_size == tok.codebook_size
    for b in tok.budgets:
        assert torch.equal(val.ids_by_budget[b], tok.encode(images, b)), b
    ids, lengths = tok.encode_adaptive(images, 0.2)
    assert torch.equal(val.adaptive_lengths, lengths) and torch.equal(val.adaptive_ids, ids)
    assert torch.equal(val.labels, ds.labels)
    assert val.num_classes == 10 and val.identity == tokenizer_identity(tok_dirs[0])


def test_cache_reuse_and_refusal(tok_dirs: tuple[Path, Path], cache: Path, capsys: pytest.CaptureFixture) -> None:
    before = (cache / "manifest.json").stat().st_mtime_ns
    build_token_cache(tok_dirs[0], DATA, cache, adaptive_threshold=0.2, progress=False)
    assert (cache / "manifest.json").stat().st_mtime_ns == before
    assert "reused" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="other inputs"):
        build_token_cache(tok_dirs[1], DATA, cache, adaptive_threshold=0.2, progress=False)


def test_prior_records_and_checks_tokenizer(tok_dirs: tuple[Path, Path], cache: Path, tmp_path: Path) -> None:
    cfg = PriorRunConfig(kind=PriorKind.ar, tokens=str(cache), tokenizer=str(tok_dirs[0]),
                         run_dir=str(tmp_path / "ar"), model={"width": 32, "depth": 1, "heads": 2},
                         train=TrainConfig(max_steps=4, batch_size=8, eval_every=0, progress=False,
                                           tensorboard=False, warmup_steps=1))
    result = train_prior(cfg)
    assert set(result.unigram_bits_per_token) == {4, 8, 12, 16}
    assert "bits_per_token" in result.bits_per_token
    recorded = read_identity(result.final_dir)
    check_identity(recorded, tokenizer_identity(tok_dirs[0]), "prior")  # the right pair passes
    with pytest.raises(TokenizerMismatch, match="re-tokenize"):
        check_identity(recorded, tokenizer_identity(tok_dirs[1]), "prior")
    wrong = PriorRunConfig(**{**cfg.__dict__, "tokenizer": str(tok_dirs[1]), "run_dir": str(tmp_path / "x")})
    with pytest.raises(TokenizerMismatch, match="token cache"):
        train_prior(wrong)


def test_cli_tokenize_and_train_prior(tok_dirs: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cache"
    assert alit(["tokenize", "--tokenizer", str(tok_dirs[0]), "--out", str(out), "data.max_images=24",
                 "data.val_fraction=0.25"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["n"] + manifest["splits"]["val"]["n"] == 24
    rc = alit(["train", "prior", "--config", "configs/prior/maskgit_emoji_cpu.yaml", f"tokens={out}",
               f"run_dir={tmp_path / 'mg'}", "train.max_steps=3", "train.batch_size=8", "train.eval_every=0",
               "train.progress=false", "model.width=32", "model.depth=1"])
    assert rc == 0
    assert "bits/token" in capsys.readouterr().out
    assert (tmp_path / "mg" / "final" / "tokenizer_identity.json").is_file()


def test_sharded_tokenization_equals_one_run_byte_for_byte(tok_dirs: tuple[Path, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """``--shard i/3`` runs (in any order, one of them twice) give the one-process cache's bytes; the run
    that completes the set writes the manifest; a DataLoader with workers changes nothing."""
    kw = {"adaptive_threshold": 0.2, "batch_size": 8, "shard_size": 10, "progress": False}
    whole = build_token_cache(tok_dirs[0], DATA, tmp_path / "whole", **kw)
    parts = tmp_path / "parts"
    assert build_token_cache(tok_dirs[0], DATA, parts, shard=(2, 3), num_workers=2, **kw) is None
    assert build_token_cache(tok_dirs[0], DATA, parts, shard=(0, 3), **kw) is None
    assert not (parts / "manifest.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.safetensors")}
    assert build_token_cache(tok_dirs[0], DATA, parts, shard=(0, 3), **kw) is None  # a requeue: reused
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.safetensors")} == written
    with pytest.raises(NotATokenCache, match="missing"):  # the merge job refuses a set with holes
        build_token_cache(tok_dirs[0], DATA, parts, encode_missing=False, **kw)
    assert build_token_cache(tok_dirs[0], DATA, parts, shard=(1, 3), **kw) == parts
    assert "the run that completes the set" in capsys.readouterr().err
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in parts.iterdir()) and len(names) == 2 + 4 + 2  # 36 train + 12 val
    for name in names:
        assert (whole / name).read_bytes() == (parts / name).read_bytes(), name
    assert build_token_cache(tok_dirs[0], DATA, parts, encode_missing=False, **kw) == parts  # reused


def test_tokenize_refuses_foreign_and_other_input_directories(tok_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(NotATokenCache, match="not empty and holds no token cache"):
        build_token_cache(tok_dirs[0], DATA, foreign, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    half = tmp_path / "half"
    build_token_cache(tok_dirs[0], DATA, half, shard=(0, 2), shard_size=10, progress=False)
    with pytest.raises(FileExistsError, match="unfinished token cache made from other inputs"):
        build_token_cache(tok_dirs[1], DATA, half, shard=(1, 2), shard_size=10, progress=False)


@pytest.mark.slurm
def test_slurm_array_tokenization_equals_the_local_cache(tok_dirs: tuple[Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """``alit tokenize --cluster slurm --shards 3``: 3 array tasks and a merge job held by afterok; the cache
    is the local one byte for byte."""
    common = ["tokenize", "--tokenizer", str(tok_dirs[0]), "--adaptive-threshold", "0.2", "--batch-size", "8",
              "--shard-size", "10", "--device", "cpu", "data.max_images=48", "data.val_fraction=0.25"]
    assert alit([*common, "--out", str(tmp_path / "local")]) == 0
    assert alit([*common, "--out", str(tmp_path / "jobs"), "--cluster", "slurm", "--shards", "3", "--time", "5",
                 "--job-name", "alit-test-tokenize"]) == 0
    err = capsys.readouterr().err
    found = re.search(r"submitted array (\d+) \(slurm; 3 task\(s\)\) and merge job (\d+)", err)
    assert found, err
    script = (tmp_path / "jobs" / "slurm" / found[2] / f"{found[2]}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{found[1]}\n" in script
    local = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert local == sorted(p.name for p in (tmp_path / "jobs").iterdir() if p.name != "slurm")
    for name in local:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "jobs" / name).read_bytes(), name


@pytest.mark.parametrize(("extra", "message"), [
    (["--shards", "2"], "--shards only apply to jobs: add --cluster"),
    (["--cluster", "debug", "--shard", "0/2"], "with --cluster use --shards N"),
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--shard", "3/2"], "shard 3/2 is invalid"),
])
def test_tokenize_bad_flags(tok_dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                            extra: list[str], message: str) -> None:
    rc = alit(["tokenize", "--tokenizer", str(tok_dirs[0]), "--out", str(tmp_path / "c"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()

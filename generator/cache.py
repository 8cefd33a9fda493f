"""The token cache: a dataset encoded once by a tokenizer, at every budget and per-image adaptively.

Layout of a cache directory::

    manifest.json                  format, tokenizer identity, data config, budgets, splits and shards
    request.json                   the inputs (written first; every shard task checks it)
    <split>-<i:05d>.safetensors    one shard: ids_<budget> (n, budget) for every budget, labels (n,),
                                   adaptive_ids (n, max_budget) padded with -1 and adaptive_lengths (n,)
                                   when an adaptive threshold was given; int16 ids when K <= 32768

The **tokenizer identity** (:func:`tokenizer.core.checkpoint.tokenizer_identity`: sha256 over the
tokenizer's config and weight files) is recorded in the manifest and in every prior exported from the
cache (``tokenizer_identity.json``), so a prior is never paired with another tokenizer silently:
:func:`check_identity` refuses a mismatch with a clear error.
Shards are written atomically, one encoder pass per batch gives every budget, shards can be encoded by
separate processes (``alit tokenize --shard i/n``, or a job array with ``--cluster``), and a finished
cache (or shard file) is reused by a re-run with the same inputs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from tokenizer.core.checkpoint import load_tensors, save_tensors, tokenizer_identity
from tokenizer.core.config import to_dict
from tokenizer.core.data import DataConfig, build_dataset, scan_source
from tokenizer.core.errors import UserError
from tokenizer.core.io import atomic_path, atomic_write_text

FORMAT = "alit-token-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDENTITY_FILE = "tokenizer_identity.json"


class TokenizerMismatch(UserError, ValueError):
    """A prior or token cache was made with another tokenizer than the one it is used with."""


class NotATokenCache(UserError, ValueError):
    """A directory given as a token cache holds something else, or a cache lacks what was asked of it."""


# ============================================================================ identity
def check_identity(expected: dict[str, str], actual: dict[str, str], what: str) -> None:
    """Raise :class:`TokenizerMismatch` unless both identities name the same tokenizer."""
    if expected.get("id") != actual.get("id"):
        raise TokenizerMismatch(
            f"{what} was made with tokenizer {expected.get('id', '?')[:12]} ({expected.get('path', '?')}) but is "
            f"used with tokenizer {actual.get('id', '?')[:12]} ({actual.get('path', '?')}); pass the tokenizer it "
            "was made with, or re-tokenize (alit tokenize) and retrain the prior")


def write_identity(out_dir: str | Path, identity: dict[str, str]) -> None:
    """Record the tokenizer a prior was trained for (next to its weights)."""
    atomic_write_text(Path(out_dir) / IDENTITY_FILE, json.dumps(identity, indent=1))


def read_identity(model_dir: str | Path) -> dict[str, str]:
    """The tokenizer identity recorded with a prior; a clear error if there is none."""
    file = Path(model_dir) / IDENTITY_FILE
    if not file.is_file():
        raise TokenizerMismatch(f"{model_dir} records no tokenizer ({IDENTITY_FILE} missing): it was not trained "
                                "from a token cache, so its tokenizer cannot be checked")
    return json.loads(file.read_text())


# ============================================================================ the cache
@dataclass
class TokenCache:
    """One split of a token cache, in memory."""

    ids_by_budget: dict[int, torch.Tensor]  # budget -> (N, budget) int64
    labels: torch.Tensor  # (N,) int64, -1 = unlabeled
    adaptive_ids: torch.Tensor | None  # (N, max_budget) int64 padded with -1
    adaptive_lengths: torch.Tensor | None  # (N,) int64
    manifest: dict[str, Any]

    @property
    def identity(self) -> dict[str, str]:
        return self.manifest["tokenizer"]

    @property
    def codebook_size(self) -> int:
        return int(self.manifest["codebook_size"])

    @property
    def tokens_per_iter(self) -> int:
        return int(self.manifest["tokens_per_iter"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def budgets(self) -> list[int]:
        return sorted(self.ids_by_budget)


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished cache, with clear errors for a missing or foreign directory."""
    file = Path(cache_dir) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a finished token cache (run `alit tokenize` first)")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as e:
        raise NotATokenCache(f"{file} is not a token cache manifest (not JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise NotATokenCache(f"{file} is not a token cache manifest (format {found!r}): pass a directory "
                             "written by `alit tokenize`, or another --out for a new cache")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise NotATokenCache(f"{file} has format version {manifest['format_version']}, newer than this code's "
                         f"{FORMAT_VERSION}: update alit-stack")
    return manifest


def _check_split(manifest: dict[str, Any], cache_dir: str | Path, split: str) -> None:
    if split not in manifest["splits"]:
        raise KeyError(f"split '{split}' is not in the token cache {cache_dir} (has {sorted(manifest['splits'])})")


def load_token_cache(cache_dir: str | Path, split: str) -> TokenCache:
    """Read one split of a cache (all its shards) into memory as int64 tensors."""
    manifest = read_manifest(cache_dir)
    _check_split(manifest, cache_dir, split)
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in manifest["splits"][split]["shards"]:
        for k, v in load_tensors(Path(cache_dir) / shard).items():
            parts.setdefault(k, []).append(v.long())
    cat = {k: torch.cat(v) for k, v in parts.items()}
    ids = {int(k.split("_")[1]): v for k, v in cat.items() if k.startswith("ids_")}
    return TokenCache(ids, cat["labels"], cat.get("adaptive_ids"), cat.get("adaptive_lengths"), manifest)


REQUEST = "request.json"  # what the cache is being built from: written first, checked by every shard


@dataclass(frozen=True)
class Unit:
    """One shard file of a cache: images ``[start, stop)`` of ``split``, the work of one array task or less."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.safetensors"


def plan_units(sizes: dict[str, int], shard_size: int) -> list[Unit]:
    """Every shard file of the cache, split by split (the order ``--shard i/n`` deals them out in)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [Unit(split, s, start, min(start + shard_size, n))
            for split, n in sizes.items() for s, start in enumerate(range(0, n, shard_size))]


def _check_out(out: Path, request: dict[str, Any]) -> bool:
    """Whether ``out`` holds a finished cache of ``request``; refuses a cache (finished or not) of other
    inputs and a non-empty directory that is not a token cache, so nothing foreign is mixed or overwritten."""
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        if old.get("request") == request:
            return True
        raise FileExistsError(f"{out} holds a token cache made from other inputs (tokenizer "
                              f"{old['tokenizer']['id'][:12]}); choose another output directory or delete it")
    if (out / REQUEST).is_file():
        try:
            old_request = json.loads((out / REQUEST).read_text())
        except ValueError:
            old_request = None
        if old_request != request:
            raise FileExistsError(f"{out} holds an unfinished token cache made from other inputs ({REQUEST} "
                                  "differs); finish it with its own inputs, choose another output directory or "
                                  "delete it")
    elif out.is_dir() and any(out.iterdir()):
        raise NotATokenCache(f"{out} is not empty and holds no token cache ({MANIFEST} or {REQUEST}); choose "
                             "another --out (nothing there was changed)")
    return False


def prepare_token_cache(tokenizer_dir: str | Path, data: DataConfig, out_dir: str | Path,
                        splits: tuple[str, ...] = ("train", "val"), adaptive_threshold: float | None = None,
                        shard_size: int = 8192) -> tuple[dict[str, str], dict[str, Any]]:
    """Check ``out_dir`` against these inputs and record them in its ``request.json`` (a submitter calls it
    before queueing jobs, so bad input fails first); ``(tokenizer identity, request)``."""
    out = Path(out_dir)
    identity = tokenizer_identity(tokenizer_dir)
    request = {"tokenizer": identity["id"], "data": to_dict(data), "splits": list(splits),
               "adaptive_threshold": adaptive_threshold, "shard_size": shard_size}
    if not _check_out(out, request):
        out.mkdir(parents=True, exist_ok=True)
        if not (out / REQUEST).is_file():
            atomic_write_text(out / REQUEST, json.dumps(request, indent=1))
    return identity, request


def build_token_cache(tokenizer_dir: str | Path, data: DataConfig, out_dir: str | Path,
                      splits: tuple[str, ...] = ("train", "val"), adaptive_threshold: float | None = None,
                      batch_size: int = 64, shard_size: int = 8192, device: str | torch.device = "cpu",
                      progress: bool = True, shard: tuple[int, int] | None = None, num_workers: int = 0,
                      encode_missing: bool = True) -> Path | None:
    """Encode ``splits`` of ``data`` with the tokenizer at every budget (and adaptively) into ``out_dir``.

    Each batch takes **one** encoder pass (:meth:`~tokenizer.alit.ALITTokenizer.encode_budgets`) for the ids
    of every budget and the adaptive choice, images read by a DataLoader with ``num_workers`` workers.
    ``shard=(i, n)`` encodes only the shard files ``i, i + n, ...`` of :func:`plan_units` (one task of a job
    array); a shard file already written is reused, so a requeued or re-submitted tokenization continues.
    The run that finds every shard file present writes the manifest and returns ``out_dir``; a run that
    leaves some to other shards returns None. ``encode_missing=False`` (the merge job) only checks and
    writes the manifest. A finished cache with the same tokenizer, data, threshold and shard size is
    reused as it is. The files are the same bytes whatever the sharding.
    """
    from tqdm.auto import tqdm

    from tokenizer.alit import ALITTokenizer

    out = Path(out_dir)
    index, count = shard if shard is not None else (0, 1)
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count} is out of range: use i/n with 0 <= i < n")
    identity, request = prepare_token_cache(tokenizer_dir, data, out, splits, adaptive_threshold, shard_size)
    if (out / MANIFEST).is_file():
        print(f"[tokenize] {out} is up to date (same tokenizer, data and threshold): reused", file=sys.stderr)
        return out
    source = scan_source(data)
    datasets = {split: build_dataset(data, split, source=source) for split in splits}
    units = plan_units({split: len(ds) for split, ds in datasets.items()}, shard_size)
    mine = [u for k, u in enumerate(units) if k % count == index and not (out / u.name).is_file()]
    if mine and not encode_missing:
        raise NotATokenCache(f"{len(mine)} of the {len(units)} shard files of {out} are missing (first: "
                             f"{mine[0].name}): a tokenization task failed; resubmit it (written shards are reused)")
    tok = None
    if mine:
        tok = ALITTokenizer.from_pretrained(tokenizer_dir, map_location=device).eval()
        id_dtype = torch.int16 if tok.codebook_size <= 32768 else torch.int32
    bar = tqdm(total=sum(u.stop - u.start for u in mine), desc="tokenize", disable=not progress or not mine,
               file=sys.stderr)
    for unit in mine:
        assert tok is not None
        loader = DataLoader(Subset(datasets[unit.split], range(unit.start, unit.stop)), batch_size=batch_size,
                            num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
        chunks: dict[str, list[torch.Tensor]] = {}
        for images, labels in loader:
            codes = tok.encode_budgets(images.to(device), adaptive_threshold)
            chunks.setdefault("labels", []).append(labels.to(torch.int64))
            for budget in tok.budgets:
                chunks.setdefault(f"ids_{budget}", []).append(codes.ids[budget].to(id_dtype).cpu())
            if codes.adaptive_ids is not None:
                chunks.setdefault("adaptive_ids", []).append(codes.adaptive_ids.to(id_dtype).cpu())
                chunks.setdefault("adaptive_lengths", []).append(codes.adaptive_lengths.cpu())
            bar.update(len(images))
        with atomic_path(out / unit.name) as tmp:
            save_tensors(tmp, {k: torch.cat(v) for k, v in chunks.items()})
    bar.close()
    missing = [u.name for u in units if not (out / u.name).is_file()]
    if missing:
        print(f"[tokenize] shard {index}/{count} done; {len(units) - len(missing)} of {len(units)} shard files "
              f"written; the run that completes the set writes {MANIFEST}", file=sys.stderr)
        return None
    if tok is None:  # every shard was written elsewhere: the cache's facts come from the saved tokenizer
        tok = ALITTokenizer.from_pretrained(tokenizer_dir, map_location="cpu")
    split_info = {split: {"n": len(ds), "shards": [u.name for u in units if u.split == split]}
                  for split, ds in datasets.items()}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": identity, "request": request,
                "codebook_size": tok.codebook_size, "tokens_per_iter": tok.tokens_per_iter,
                "budgets": list(tok.budgets), "num_classes": len(source.class_names),
                "class_names": list(source.class_names), "adaptive_threshold": adaptive_threshold,
                "data": to_dict(data), "splits": split_info}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return out


# ============================================================================ questions about a cache
def prior_token_cache(prior_dir: str | Path) -> Path | None:
    """The finished token cache a prior was trained on, as its run's ``config.yaml`` names it (None if unknown)."""
    import yaml

    prior_dir = Path(prior_dir)
    for cfg in (prior_dir / "config.yaml", prior_dir.parent / "config.yaml"):
        if cfg.is_file():
            try:
                tokens = (yaml.safe_load(cfg.read_text()) or {}).get("config", {}).get("tokens")
            except (yaml.YAMLError, AttributeError):
                continue
            if tokens and (Path(tokens) / MANIFEST).is_file():
                return Path(tokens)
    return None


def adaptive_lengths(cache_dir: str | Path, split: str = "train",
                     identity: dict[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lengths, labels)``, both ``(N,)`` int64: the adaptive (TSC) budget and label of every image of a split.

    Reads only those two arrays of each shard. ``identity`` (the tokenizer's) is checked against the cache's.
    """
    from safetensors import safe_open

    manifest = read_manifest(cache_dir)
    if identity is not None:
        check_identity(manifest["tokenizer"], identity, f"token cache {cache_dir}")
    _check_split(manifest, cache_dir, split)
    lengths, labels = [], []
    for name in manifest["splits"][split]["shards"]:
        with safe_open(str(Path(cache_dir) / name), framework="pt") as f:
            if "adaptive_lengths" not in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                raise NotATokenCache(f"token cache {cache_dir} holds no adaptive lengths: rebuild it with "
                                     "`alit tokenize --adaptive-threshold 0.07`, or sample at fixed budgets")
            lengths.append(f.get_tensor("adaptive_lengths").long())
            labels.append(f.get_tensor("labels").long())
    return torch.cat(lengths), torch.cat(labels)


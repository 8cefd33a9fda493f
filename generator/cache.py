"""The token cache: a dataset encoded once by a tokenizer, at every budget and per-image adaptively.

Layout of a cache directory::

    manifest.json                  format, tokenizer identity, data config, budgets, splits and shards
    <split>-<i:05d>.safetensors    one shard: ids_<budget> (n, budget) for every budget, labels (n,),
                                   adaptive_ids (n, max_budget) padded with -1 and adaptive_lengths (n,)
                                   when an adaptive threshold was given; int16 ids when K <= 32768

The **tokenizer identity** (:func:`tokenizer.core.checkpoint.tokenizer_identity`: sha256 over the
tokenizer's config and weight files) is recorded in the manifest and in every prior exported from the
cache (``tokenizer_identity.json``), so a prior is never paired with another tokenizer silently:
:func:`check_identity` refuses a mismatch with a clear error.
Shards are written atomically and a finished cache is reused by a re-run with the same inputs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def build_token_cache(tokenizer_dir: str | Path, data: DataConfig, out_dir: str | Path,
                      splits: tuple[str, ...] = ("train", "val"), adaptive_threshold: float | None = None,
                      batch_size: int = 64, shard_size: int = 8192, device: str | torch.device = "cpu",
                      progress: bool = True) -> Path:
    """Encode ``splits`` of ``data`` with the tokenizer at every budget (and adaptively); returns ``out_dir``.

    A finished cache with the same tokenizer, data and threshold is reused as it is.
    """
    from tqdm.auto import tqdm

    from tokenizer.alit import ALITTokenizer

    out = Path(out_dir)
    identity = tokenizer_identity(tokenizer_dir)
    request = {"tokenizer": identity["id"], "data": to_dict(data), "splits": list(splits),
               "adaptive_threshold": adaptive_threshold}
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        if old.get("request") == request:
            print(f"[tokenize] {out} is up to date (same tokenizer, data and threshold): reused", file=sys.stderr)
            return out
        raise FileExistsError(f"{out} holds a token cache made from other inputs (tokenizer "
                              f"{old['tokenizer']['id'][:12]}); choose another output directory or delete it")
    out.mkdir(parents=True, exist_ok=True)
    tok = ALITTokenizer.from_pretrained(tokenizer_dir, map_location=device).eval()
    id_dtype = torch.int16 if tok.codebook_size <= 32768 else torch.int32
    source = scan_source(data)
    split_info: dict[str, Any] = {}
    for split in splits:
        ds = build_dataset(data, split, source=source)
        shards: list[str] = []
        bar = tqdm(total=len(ds), desc=f"tokenize {split}", disable=not progress, file=sys.stderr)
        for s, start in enumerate(range(0, len(ds), shard_size)):
            stop = min(start + shard_size, len(ds))
            chunks: dict[str, list[torch.Tensor]] = {}
            for b0 in range(start, stop, batch_size):
                items = [ds[i] for i in range(b0, min(b0 + batch_size, stop))]
                images = torch.stack([x for x, _ in items]).to(device)  # (b, 3, R, R)
                chunks.setdefault("labels", []).append(torch.tensor([y for _, y in items], dtype=torch.int64))
                for budget in tok.budgets:
                    chunks.setdefault(f"ids_{budget}", []).append(tok.encode(images, budget).to(id_dtype).cpu())
                if adaptive_threshold is not None:
                    ids, lengths = tok.encode_adaptive(images, adaptive_threshold)
                    chunks.setdefault("adaptive_ids", []).append(ids.to(id_dtype).cpu())
                    chunks.setdefault("adaptive_lengths", []).append(lengths.cpu())
                bar.update(len(items))
            name = f"{split}-{s:05d}.safetensors"
            with atomic_path(out / name) as tmp:
                save_tensors(tmp, {k: torch.cat(v) for k, v in chunks.items()})
            shards.append(name)
        bar.close()
        split_info[split] = {"n": len(ds), "shards": shards}
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


"""Checkpoint I/O: safetensors + JSON, atomic, verified, rotated. Nothing is ever unpickled.

A training checkpoint is a directory ``<run>/checkpoints/step_XXXXXXXX/``::

    <module>.safetensors     one per saved module (model, ema, discriminator, ...)
    optim-<name>.safetensors optimizer tensors, with optim-<name>.json for the rest of its state
    state.json               step, data position, RNG states, schedule, config, format version
    manifest.json            size and sha256 of every file above; written last

It is written into a hidden temporary directory and renamed into place (:func:`tokenizer.core.io.atomic_dir`,
the project's one atomic write), then ``checkpoints/latest``
is replaced atomically, so a kill at any moment leaves the previous checkpoint intact and a partial
directory is never taken for a checkpoint (no manifest, or a hidden name). Loading verifies sizes and
hashes, so truncated or tampered files are refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# atomic_write_text and sha256_file are also imported from here by the model code (tokenizer/alit.py, vq.py)
from .io import atomic_dir, atomic_write_text, is_temp_name, remove_stale_temps, sha256_file, update_digest

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message names the file and what to do."""


# ============================================================================ small file helpers
def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors write of contiguous CPU copies (shared storage is split, as safetensors requires)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(path), metadata=metadata)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """safetensors read with a clear error for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from None


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` that reports mismatches by key and shape instead of a torch trace."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with other shapes (e.g. {'; '.join(wrong[:3])})")
        raise CheckpointError(f"{source} does not match the model built from its config: " + ", ".join(parts)
                              + ". Was the config edited, or the file taken from another model?")
    module.load_state_dict(state, strict=True)


# ============================================================================ optimizer state
def optimizer_to_files(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": opt_state["param_groups"], "scalars": {}}
    for pid, per_param in opt_state["state"].items():
        for name, value in per_param.items():
            key = f"{pid}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value
            else:
                rest["scalars"][key] = value
    return tensors, rest


def optimizer_from_files(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_files`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


# ============================================================================ training checkpoints
def checkpoint_root(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, modules: dict[str, dict[str, torch.Tensor]],
                    optimizers: dict[str, dict[str, Any]], state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write a complete checkpoint atomically, point ``latest`` at it and keep the last ``keep_last``.

    ``modules`` maps a name to a state dict, ``optimizers`` a name to an optimizer ``state_dict``;
    ``state`` is JSON-able (step, data position, RNG, config...). Returns the checkpoint directory.
    On any failure (disk full, read-only directory) the partial directory is removed and the previous
    checkpoint is left untouched.
    """
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(final) as tmp:  # the same step saved again (e.g. after a resume) is replaced
            names: list[str] = []
            for name, sd in modules.items():
                save_tensors(tmp / f"{name}.safetensors", sd)
                names.append(f"{name}.safetensors")
            for name, opt_state in optimizers.items():
                tensors, rest = optimizer_to_files(opt_state)
                save_tensors(tmp / f"optim-{name}.safetensors", tensors)
                (tmp / f"optim-{name}.json").write_text(json.dumps(rest))
                names += [f"optim-{name}.safetensors", f"optim-{name}.json"]
            (tmp / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, **state},
                                                       indent=1))
            names.append("state.json")
            write_manifest(tmp, names, step=step)
        atomic_write_text(root / LATEST, final.name + "\n")
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError, not OSError
        prev = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"could not write checkpoint for step {step} in {root}: {getattr(e, 'strerror', None) or e}. "
            f"Previous checkpoint intact: {prev if prev else 'none'}. Free space or fix permissions, then resume."
        ) from e
    rotate_checkpoints(run_dir, keep_last)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoint directories (visible name, manifest present), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def rotate_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and stale temporary directories)."""
    root = checkpoint_root(run_dir)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(root, target_prefix=PREFIX)


def write_manifest(directory: str | Path, names: Iterable[str], **extra: Any) -> None:
    """Write ``manifest.json`` (format version, size and sha256 of each named file) into ``directory``.

    Training checkpoints and exported models (``save_pretrained``) both carry one, so a truncated,
    tampered or half-copied file is refused at load time by :func:`verify_checkpoint`.
    """
    directory = Path(directory)
    files = {n: {"size": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)} for n in names}
    manifest = {"format_version": FORMAT_VERSION, **extra, "files": files}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check format version, sizes and hashes against the manifest; returns the manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: an incomplete checkpoint, not usable") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / MANIFEST} is corrupt ({e})") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version}, newer than this code's "
                              f"{FORMAT_VERSION}: update alit-stack to read it")
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if f.stat().st_size != info["size"]:
            raise CheckpointError(f"{f} is {f.stat().st_size} bytes, the manifest says {info['size']}: truncated or modified")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{f} does not match its sha256 in the manifest: modified or corrupt")
    return manifest


def latest_checkpoint(run_dir: str | Path, verify: bool = False) -> Path | None:
    """The checkpoint to resume from: ``latest`` if it is complete, else the newest complete one."""
    root = checkpoint_root(run_dir)
    candidates = list_checkpoints(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.append(named)
    for path in reversed(candidates):
        if not verify:
            return path
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError:
            continue
    return None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[
        dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]], dict[str, Any]]:
    """Verify and read a checkpoint: ``(modules, optimizers, state)`` as saved."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    modules, optimizers = {}, {}
    for name in manifest["files"]:
        if name.startswith("optim-") and name.endswith(".safetensors"):
            key = name[len("optim-"):-len(".safetensors")]
            rest = json.loads((path / f"optim-{key}.json").read_text())
            optimizers[key] = optimizer_from_files(load_tensors(path / name, device), rest)
        elif name.endswith(".safetensors"):
            modules[name[: -len(".safetensors")]] = load_tensors(path / name, device)
    state = json.loads((path / "state.json").read_text())
    return modules, optimizers, state


def files_sha256(paths: Iterable[Path]) -> str:
    """One sha256 over several files (e.g. a model's weights), for identity records."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


# ============================================================================ model identity
SAMPLING_PRESET = "sampling.json"  # how a prior should be sampled (sampling.presets): not part of its identity


def tokenizer_identity(tokenizer_dir: str | Path) -> dict[str, str]:
    """``{"id", "path"}``: sha256 over every config and weight file of a saved model directory.

    The id covers each ``.json`` / ``.safetensors`` file's relative path and bytes (temporaries of an
    interrupted write are skipped), so a moved or copied directory keeps its id and any edited file changes it;
    a top-level ``sampling.json`` (a sampling preset, not the model) is skipped.
    """
    root = Path(tokenizer_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors")
                   and p.relative_to(root) != Path(SAMPLING_PRESET)
                   and not any(is_temp_name(part) for part in p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(f"{root} holds no tokenizer (no .json/.safetensors files): pass a directory "
                                "written by ALITTokenizer.save_pretrained (a tokenizer run's final/)")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        update_digest(h, p)
    return {"id": h.hexdigest(), "path": str(root)}

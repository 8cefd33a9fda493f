"""The one model-directory format of the stack (base tokenizers, ALIT tokenizers, priors).

A model directory holds ``config.json`` (``{"model": <name>, "format_version": N, "config": {...}}`` plus
model-specific entries), ``model.safetensors`` (the state dict) and ``manifest.json`` (size and sha256
of both, checked at load), and may nest other model directories (an ALIT tokenizer's ``base/``). It is
written into a temporary directory beside its place, fsynced and renamed (:func:`tokenizer.core.io.atomic_dir`),
so a kill mid-save leaves the previous model or none, never a mix. Writing over an existing directory is
allowed only when it is itself a model directory; anything else there is refused, never deleted.

:class:`PretrainedMixin` gives a model ``save_pretrained(dir)`` / ``from_pretrained(dir)`` from three class
attributes (``model_name``, ``config_class``, ``format_version``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    load_module_state,
    load_tensors,
    save_tensors,
    verify_checkpoint,
    write_manifest,
)
from .config import from_dict, to_dict
from .io import atomic_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"

M = TypeVar("M", bound="PretrainedMixin")


def is_model_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory this format (or an older one of the stack) wrote."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST_FILE).is_file()


def save_model_dir(path: str | Path, model_name: str, format_version: int, config: dict[str, Any],
                   state: dict[str, torch.Tensor], extra: dict[str, Any] | None = None,
                   children: dict[str, Callable[[Path], Any]] | None = None) -> Path:
    """Write a model directory atomically; ``children`` maps sub-directory names to writers of nested models."""
    path = Path(path)
    if path.exists() and not is_model_dir(path):
        what = "a file" if path.is_file() else ("a non-empty directory" if any(path.iterdir()) else "")
        if what:
            raise CheckpointError(f"{path} is {what} that is not a saved model; refusing to replace it: choose a "
                                  "new path or remove it yourself")
        path.rmdir()  # an empty directory (e.g. made by mkdir -p): nothing of anyone's is lost
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        for name, write in (children or {}).items():
            write(tmp / name)
        save_tensors(tmp / WEIGHTS_FILE, {k: v.detach().contiguous() for k, v in state.items()},
                     metadata={"model": model_name})
        meta = {"model": model_name, "format_version": format_version, "config": config, **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        write_manifest(tmp, [WEIGHTS_FILE, CONFIG_FILE])
    return path


def read_model_meta(path: str | Path, model_name: str | tuple[str, ...], max_version: int) -> dict[str, Any]:
    """``config.json`` of a model directory, after checking the manifest, the model name and the version."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: pass a directory written by save_pretrained (e.g. <run>/final)")
    verify_checkpoint(path)  # truncated or modified files are refused, naming the file
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    names = (model_name,) if isinstance(model_name, str) else model_name
    if not isinstance(meta, dict) or meta.get("model") not in names or "config" not in meta:
        found = meta.get("model") if isinstance(meta, dict) else None
        raise CheckpointError(f"{file} holds {'a ' + repr(found) if found else 'no model name'}, not "
                              f"{' or '.join(names)}; pass the right directory")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise CheckpointError(f"{file} has format version {version}; this code reads up to {max_version}: "
                              "update alit-stack")
    return meta


def load_weights(module: nn.Module, path: str | Path, map_location: str | torch.device = "cpu") -> None:
    """Load ``model.safetensors`` of a model directory into ``module`` (strict, naming the file)."""
    file = Path(path) / WEIGHTS_FILE
    load_module_state(module, load_tensors(file, map_location), str(file))


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` in the one model-directory format."""

    model_name: ClassVar[str]
    config_class: ClassVar[type]
    format_version: ClassVar[int] = 1
    config: Any

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + ``manifest.json`` atomically; returns ``path``."""
        assert isinstance(self, nn.Module)
        return save_model_dir(path, self.model_name, self.format_version, to_dict(self.config), self.state_dict())

    @classmethod
    def config_from_meta(cls, meta: dict[str, Any], path: Path) -> Any:
        """The model config of a read ``config.json``, with an error naming the file."""
        try:
            return from_dict(cls.config_class, meta["config"])
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path / CONFIG_FILE}: invalid {cls.model_name} config ({e})") from None

    @classmethod
    def from_pretrained(cls: type[M], path: str | Path, map_location: str | torch.device = "cpu") -> M:
        """Rebuild the model from a directory of :meth:`save_pretrained` (no pickles, no loss networks)."""
        path = Path(path)
        meta = read_model_meta(path, cls.model_name, cls.format_version)
        model = cls(cls.config_from_meta(meta, path))  # type: ignore[call-arg]
        assert isinstance(model, nn.Module)
        load_weights(model, path, map_location)
        return model

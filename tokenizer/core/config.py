"""Typed, validated configuration: dataclass schemas, YAML files, dotted ``key=value`` overrides.

A schema is a dataclass (fields typed, one docstring line per field, checks in ``__post_init__``).
:func:`load_config` merges, in order, the schema's defaults, a YAML file (which may name a
``_base_: other.yaml`` to inherit from, resolved relative to itself) and command-line overrides.
Unknown keys and values of the wrong type are :class:`ConfigError` naming the dotted key.
:func:`save_config` writes the resolved config with the git commit into a run directory.

OmegaConf (structured configs) does the merging and type checking: it already reports the full
key of a bad value and refuses keys the schema lacks, which hand-written merging would re-implement.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError
from .io import atomic_write_text
from .paths import PACKAGE_ROOT

T = TypeVar("T")

BASE_KEY = "_base_"
REPO_ROOT = PACKAGE_ROOT.parent  # the checkout holding configs/ (the packages are installed from it, editable)


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and how to fix it."""


def locate_config(path: str | Path) -> Path:
    """``path`` itself when it exists (absolute, or relative to the working directory), else the same
    relative path inside the repository, so ``configs/...`` works from any directory."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    in_repo = REPO_ROOT / given
    return in_repo if in_repo.exists() else given


def read_yaml_file(path: str | Path, what: str, hint: str = "") -> Any:
    """The parsed content of the YAML file ``path`` ({} when empty; found by :func:`locate_config`); a
    missing file or invalid YAML is a :class:`ConfigError` that names ``what`` (e.g. "sweep file")."""
    file = locate_config(path)
    if not file.is_file():
        raise ConfigError(f"{what} not found: {file}{hint}")
    try:
        return yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {file} is not valid YAML: {e}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = locate_config(path).resolve()
    if path in seen:
        raise ConfigError(f"config {path}: '{BASE_KEY}' chain loops back to itself")
    raw = read_yaml_file(path, "config file", " (pass an existing YAML file, e.g. configs/...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(raw).__name__}")
    base = raw.pop(BASE_KEY, None)
    node = OmegaConf.create(raw)
    if base is None:
        return node
    parent = _read_yaml(path.parent / str(base), (*seen, path))
    return OmegaConf.merge(parent, node)


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if "not in" in msg or ("Key" in msg and "not" in msg):
        hint = "remove it or check its spelling against the schema (alit <cmd> --help lists configs)"
    else:
        hint = "give a value of the declared type"
    return ConfigError(f"{source}: bad config key '{key}': {msg}; {hint}")


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``["train.lr=1e-4", "model.size=tiny"]`` -> a config node; malformed items are errors."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value (e.g. train.lr=1e-4)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:  # pragma: no cover - from_dotlist rarely fails
        raise _explain(e, "overrides") from None


def _structured(schema: type[Any]) -> DictConfig:
    """The schema as a struct config: unknown keys are errors, except inside free-form ``dict`` fields
    (e.g. size overrides), whose keys the schema's ``__post_init__`` checks (:func:`check_overrides`)."""
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)

    def open_dicts(node: DictConfig) -> None:
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                if child._metadata.object_type in (None, dict):
                    OmegaConf.set_struct(child, False)
                else:
                    open_dicts(child)

    open_dicts(base)
    return base


_UNSET = object()


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a validated ``schema`` instance from its defaults, a YAML file and dotted overrides."""
    base = _structured(schema)
    merged = base
    required: set[str] = set()
    try:
        if path is not None:
            text = _read_yaml(Path(path))
            required = set(OmegaConf.missing_keys(text))  # `key: ???` in the file: must come from an override
            merged = OmegaConf.merge(merged, text)
    except OmegaConfBaseException as e:
        raise _explain(e, f"config {path}") from None
    try:
        given = parse_overrides(overrides)
        merged = OmegaConf.merge(merged, given)
    except OmegaConfBaseException as e:
        raise _explain(e, "command-line override") from None
    # OmegaConf keeps the schema default where a file says ???: without this a forgotten data.source would
    # silently train on the default dataset
    unset = sorted(k for k in required if OmegaConf.select(given, k, default=_UNSET) is _UNSET)
    if unset:
        raise ConfigError(f"config {path}: {', '.join(unset)} must be given (the file says ???): add "
                          + " ".join(f"{k}=..." for k in unset) + " to the command")
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, f"config {path or schema.__name__}") from None
    except (ValueError, TypeError) as e:  # raised by a schema's __post_init__
        raise ConfigError(f"config {path or schema.__name__}: {e}") from None
    return obj  # type: ignore[return-value]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-serialisable dict of a config dataclass (enums as their values)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


def from_dict(schema: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config dataclass from :func:`to_dict` output, with the same validation."""
    base = _structured(schema)
    try:
        return OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.create(data)))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _explain(e, schema.__name__) from None


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """A :class:`ValueError` naming ``key`` and listing ``choices`` unless ``value`` is one of them (a
    registered size name, say); raised in a schema's ``__post_init__`` it becomes a :class:`ConfigError`."""
    names = sorted(choices)
    if value not in names:
        raise ValueError(f"unknown {key} {value!r}; choose one of {names}")


def check_overrides(section: str, model_config: type[Any], overrides: Mapping[str, Any], chosen: str,
                    fixed: Mapping[str, str] | None = None) -> None:
    """Check the keys of a free-form override dict (``section``, e.g. ``alit``) against the fields of the
    dataclass ``model_config`` they will be applied to, so a misspelled model key is an error when the
    config is loaded, not when the model is built. ``chosen`` says which size or kind picked
    ``model_config`` (for the message); ``fixed`` maps fields the run sets itself to where they come from.
    """
    names = sorted(f.name for f in dataclasses.fields(model_config) if f.init and f.name not in (fixed or {}))
    for key in overrides:
        if fixed and key in fixed:
            raise ValueError(f"{section}.{key} cannot be overridden: the run sets it from {fixed[key]}; "
                             f"remove {section}.{key}")
        if key not in names:
            raise ValueError(f"unknown key {section}.{key}: not a field of {model_config.__name__} ({chosen}); "
                             f"check its spelling against the valid keys {names}")


def git_commit() -> str:
    """The commit of the source tree (``<sha>`` or ``<sha>-dirty``), or ``unknown`` outside git."""
    root = REPO_ROOT
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def save_config(cfg: Any, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config and the git commit into ``run_dir/name``; returns the path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    body = {"git_commit": git_commit(), "config": to_dict(cfg)}
    out = run_dir / name
    atomic_write_text(out, yaml.safe_dump(body, sort_keys=False))
    return out


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` re-exported so callers need one import for config handling."""
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]

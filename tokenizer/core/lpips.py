"""LPIPS (Zhang et al. 2018, v0.1, VGG16 backbone) as a frozen, differentiable perceptual distance.

``LPIPS()(x, y)`` takes images (B,3,H,W) in [-1,1] and returns (B,) distances. It is a loss, not a
model: parameters never require grad and the module stays in eval mode, so gradients flow to the inputs
only and a generator's optimizer never sees (or updates) it. Weights come from ``weights.resolve_lpips``.

The computation: shift/scale the input, VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3, unit-normalise each feature vector over channels, squared difference, a 1x1 linear head per
layer (non-negative learned channel weights), spatial mean, sum over the five layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from tokenizer.core.weights import LPIPS_CHANNELS, load_lpips_state, resolve_lpips

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

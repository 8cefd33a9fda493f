"""Image tensors <-> uint8 arrays and PNG grids (rows x columns), used by training and reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8 (rounded, clamped)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def grid_array(grid: torch.Tensor, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """``(rows, cols, 3, H, W)`` in [-1, 1] -> one ``(rows*(H+pad)+pad, cols*(W+pad)+pad, 3)`` uint8 image."""
    rows, cols, _, h, w = grid.shape
    tiles = to_uint8(grid.reshape(rows * cols, *grid.shape[2:])).reshape(rows, cols, h, w, 3)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y:y + h, x:x + w] = tiles[r, c]
    return out


def save_grid(grid: torch.Tensor, path: str | Path, pad: int = 2) -> Path:
    """Write a ``(rows, cols, 3, H, W)`` grid of images in [-1, 1] as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_array(grid, pad)).save(path)
    return path

"""The base 2D tokenizers ALIT reads, by name: the diffusers-based :class:`~tokenizer.vq.BaseVQ` and the
public :class:`~tokenizer.vqgan.MageVQGAN`. Both follow one contract (``encode_features``, ``quantize``,
``codebook``, ``decode_codes``, ``grid_size``, ``code_dim``, ``codebook_size``, ``last_layer``, the one
model-directory format), so the VQ task, ALIT and the tools take either."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.config import check_choice
from .core.pretrained import CONFIG_FILE
from .vq import BASE_VQ_SIZES, LEGACY_CONFIG_NAME, BaseVQ, BaseVQConfig, base_vq_config
from .vqgan import MAGE_VQGAN_SIZES, MageVQGAN, MageVQGANConfig, mage_vqgan_config

BASES: dict[str, type[nn.Module]] = {"BaseVQ": BaseVQ, "MageVQGAN": MageVQGAN}


def base_sizes() -> list[str]:
    """Every registered base size: the diffusers ones and the MAGE ones."""
    return sorted([*BASE_VQ_SIZES, *MAGE_VQGAN_SIZES])


def base_config_class(size: str) -> type[BaseVQConfig] | type[MageVQGANConfig]:
    """The config dataclass of registered base ``size``; an unknown size is an error listing the sizes."""
    check_choice("base size", size, base_sizes())
    return MageVQGANConfig if size in MAGE_VQGAN_SIZES else BaseVQConfig


def build_base(size: str, resolution: int | None = None, **overrides: Any) -> nn.Module:
    """A fresh base tokenizer of registered ``size`` (``tiny``, ..., ``mage``, ``mage_tiny``) at ``resolution``."""
    extra = {"resolution": resolution} if resolution is not None else {}
    if base_config_class(size) is MageVQGANConfig:
        return MageVQGAN(mage_vqgan_config(size, **extra, **overrides))
    return BaseVQ(base_vq_config(size, **extra, **overrides))


def load_base(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a saved base tokenizer of either kind, chosen by its ``config.json``."""
    path = Path(path)
    if (path / LEGACY_CONFIG_NAME).is_file():
        return BaseVQ.from_pretrained(path, map_location)
    file = path / CONFIG_FILE
    try:
        name = json.loads(file.read_text()).get("model") if file.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        name = None
    if name not in BASES:
        return BaseVQ.from_pretrained(path, map_location)  # its own errors say what the directory lacks
    return BASES[name].from_pretrained(path, map_location)

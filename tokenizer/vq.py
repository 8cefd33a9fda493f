"""The base 2D tokenizer: a VQGAN-style vector-quantized autoencoder built on diffusers' ``VQModel``.

ALIT reads this model in two places: the encoder's continuous output (before quantization) is part of
its input, and the codebook indices are its training targets; its decoder predicts soft codes
(``softmax(logits) @ codebook``) that this model's decoder turns back into pixels.

Shape contract (axis letters used in the comments below):
    B batch, H/W image height/width, C code dimension, h/w grid height/width (H/f, W/f, f the
    downsampling factor 2**(len(block_out_channels) - 1)), K codebook size.
    images   (B, 3, H, W) float in [-1, 1]
    features (B, C, h, w) float, the encoder output after ``quant_conv``, before quantization
    codes    (B, C, h, w) float, codebook vectors (L2-normalised when ``l2_normalized``)
    indices  (B, h, w)    long in [0, K)

The quantizer is this module's own (diffusers' ``VectorQuantizer`` only holds the codebook weights,
so the parameter layout stays that of a diffusers ``VQModel``): it runs in fp32, optionally looks codes
up by cosine similarity, and its loss is ``codebook term + beta * commitment term`` (diffusers' legacy
default swaps the two weights).

Not weight-compatible with MaskGIT's VQGAN (bias-free convs, avg-pool downsampling, no ``quant_conv``):
the ``maskgit`` size reproduces its sizes, not its exact layers.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import VQModel
from safetensors.torch import load_file
from torch import nn

from .core.checkpoint import CheckpointError, load_module_state, load_tensors, verify_checkpoint
from .core.config import from_dict, to_dict
from .core.pretrained import CONFIG_FILE, PretrainedMixin

LEGACY_CONFIG_NAME = "base_vq_config.json"  # the layout before the one model-directory format (still read)
LEGACY_WEIGHTS_NAME = "base_vq.safetensors"
DIFFUSERS_CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

_DOWN_BLOCKS = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
_UP_BLOCKS = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


# ============================================================================ config


@dataclass
class BaseVQConfig:
    """Model-only config of :class:`BaseVQ`; stored with every checkpoint."""

    resolution: int = 64  # training image side in pixels (grid side = resolution / downsampling)
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    block_out_channels: list[int] = field(default_factory=lambda: [16, 16, 32, 64])  # per level; downsampling 2**(len-1)
    layers_per_block: int = 1  # resnet blocks per encoder level (the decoder uses one more)
    latent_channels: int = 32  # encoder output channels = code dimension C (unless vq_embed_dim is set)
    vq_embed_dim: int | None = None  # code dimension when it differs from latent_channels (diffusers' field)
    num_vq_embeddings: int = 512  # codebook size K
    norm_num_groups: int = 8  # GroupNorm groups; must divide every entry of block_out_channels
    l2_normalized: bool = True  # cosine lookup: features and codebook L2-normalised (better code usage)
    commitment_beta: float = 0.25  # weight of the commitment term in the VQ loss
    mid_block_attention: bool = False  # self-attention in the encoder/decoder middle block (MaskGIT: none)
    act_fn: str = "silu"  # activation of the resnet blocks (a diffusers activation name)
    norm_type: str = "group"  # decoder norm: "group", or "spatial" (MoVQ-style, conditioned on the codes)
    down_block_types: list[str] | None = None  # diffusers encoder block names; None = DownEncoderBlock2D
    up_block_types: list[str] | None = None  # diffusers decoder block names; None = UpDecoderBlock2D

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty; give one channel count per level, e.g. [16, 32, 64]")
        for c in self.block_out_channels:
            if c <= 0 or c % self.norm_num_groups:
                raise ValueError(f"block_out_channels entry {c} is not a positive multiple of norm_num_groups="
                                 f"{self.norm_num_groups}; change one of the two")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution={self.resolution} is not divisible by the downsampling factor "
                             f"{self.downsample_factor} (2**(len(block_out_channels)-1)); change either")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "num_vq_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vq_embed_dim is not None and self.vq_embed_dim <= 0:
            raise ValueError(f"vq_embed_dim must be positive or None (= latent_channels), got {self.vq_embed_dim}")
        if self.commitment_beta < 0.0:
            raise ValueError(f"commitment_beta must be >= 0 (0.25 is standard), got {self.commitment_beta}")
        if self.norm_type not in ("group", "spatial"):
            raise ValueError(f"norm_type must be 'group' or 'spatial', got {self.norm_type!r}")
        for name, allowed in (("down_block_types", _DOWN_BLOCKS), ("up_block_types", _UP_BLOCKS)):
            types = getattr(self, name)
            if types is None:
                continue
            if len(types) != len(self.block_out_channels):
                raise ValueError(f"{name} has {len(types)} entries but block_out_channels has "
                                 f"{len(self.block_out_channels)}; give one per level or None")
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{name} has unsupported blocks {bad}; allowed: {list(allowed)}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per grid cell along one side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def grid_size(self) -> int:
        """Grid side h = w at ``resolution``."""
        return self.resolution // self.downsample_factor

    @property
    def code_dim(self) -> int:
        """Code dimension C."""
        return self.vq_embed_dim if self.vq_embed_dim is not None else self.latent_channels


# ============================================================================ outputs


@dataclass
class VQOut:
    """Result of :meth:`BaseVQ.quantize`."""

    codes: torch.Tensor  # (B, C, h, w) straight-through codes (gradient flows to the features)
    indices: torch.Tensor  # (B, h, w) long
    loss: torch.Tensor  # () fp32: codebook term + beta * commitment term


@dataclass
class VQForward:
    """Result of :meth:`BaseVQ.forward`."""

    recon: torch.Tensor  # (B, 3, H, W) reconstruction in (roughly) [-1, 1]
    indices: torch.Tensor  # (B, h, w) long
    vq_loss: torch.Tensor  # () fp32


# ============================================================================ the shared contract
class BaseTokenizerMixin:
    """The part of the base-tokenizer contract (:mod:`tokenizer.bases`) written in terms of the rest, shared
    by :class:`BaseVQ` and :class:`~tokenizer.vqgan.MageVQGAN`: each defines ``config`` (with ``grid_size``
    and ``code_dim``), ``codebook_size``, ``codebook``, ``encode_features``, ``quantize`` and ``decode_codes``.
    """

    config: Any
    codebook_size: int
    codebook: torch.Tensor
    encode_features: Callable[[torch.Tensor], torch.Tensor]
    quantize: Callable[[torch.Tensor], VQOut]
    decode_codes: Callable[[torch.Tensor], torch.Tensor]

    @property
    def grid_size(self) -> int:
        """Grid side h = w for images of ``config.resolution``."""
        return self.config.grid_size

    def _check_images(self, images: torch.Tensor) -> None:
        f = self.config.downsample_factor
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the downsampling "
                             f"factor {f}; resize or crop the images")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 4 or codes.shape[1] != self.code_dim:
            raise ValueError(f"codes must be (B, {self.code_dim}, h, w), got {tuple(codes.shape)}")

    @property
    def code_dim(self) -> int:
        """Code dimension C."""
        return self.config.code_dim

    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, h, w) long code indices."""
        return self.quantize(self.encode_features(images)).indices

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) long -> (B, C, h, w) codebook vectors."""
        if indices.dim() != 3 or indices.dtype != torch.long:
            raise ValueError(f"indices must be a (B, h, w) long tensor, got {indices.dtype} "
                             f"{tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2)  # (B, C, h, w)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) long -> (B, 3, H, W) images in [-1, 1]."""
        return self.decode_codes(self.indices_to_codes(indices))

    def forward(self, images: torch.Tensor) -> VQForward:
        """Encode, quantize, decode: (B, 3, H, W) in [-1, 1] -> reconstruction, indices, VQ loss."""
        q = self.quantize(self.encode_features(images))
        return VQForward(recon=self.decode_codes(q.codes), indices=q.indices, vq_loss=q.loss)


# ============================================================================ model
class BaseVQ(BaseTokenizerMixin, PretrainedMixin, nn.Module):
    """VQ autoencoder: diffusers' encoder/decoder, a (cosine) vector quantizer, an index-level API."""

    model_name = "BaseVQ"
    config_class = BaseVQConfig

    def __init__(self, config: BaseVQConfig) -> None:
        super().__init__()
        self.config = config
        n = len(config.block_out_channels)
        # The diffusers module holds every parameter, so state dicts map onto diffusers' VQModel layout.
        self.vq = VQModel(
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            down_block_types=tuple(config.down_block_types or ["DownEncoderBlock2D"] * n),
            up_block_types=tuple(config.up_block_types or ["UpDecoderBlock2D"] * n),
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            act_fn=config.act_fn,
            latent_channels=config.latent_channels,
            sample_size=config.resolution,
            num_vq_embeddings=config.num_vq_embeddings,
            norm_num_groups=config.norm_num_groups,
            vq_embed_dim=config.vq_embed_dim,
            norm_type=config.norm_type,
            mid_block_add_attention=config.mid_block_attention,
        )
        # The decoder's convs hold channels-last weights and run on channels-last activations (see
        # decode_codes); state dicts are saved as contiguous copies and load_state_dict keeps the layout.
        self.vq.post_quant_conv.to(memory_format=torch.channels_last)
        self.vq.decoder.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ sizes

    @property
    def codebook_size(self) -> int:
        """Number of codes K."""
        return self.config.num_vq_embeddings

    @property
    def codebook(self) -> torch.Tensor:
        """(K, C) code vectors as the decoder sees them (L2-normalised when cosine); differentiable."""
        weight = self.vq.quantize.embedding.weight
        return F.normalize(weight, dim=-1) if self.config.l2_normalized else weight

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight (for the adaptive GAN weight of the reconstruction loss)."""
        return self.vq.decoder.conv_out.weight

    # ------------------------------------------------------------------ encoder / quantizer / decoder

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) continuous features (after quant_conv, unquantized)."""
        self._check_images(images)
        h = self.vq.encoder(images)  # (B, latent_channels, h, w)
        return self.vq.quant_conv(h)  # (B, C, h, w)

    def quantize(self, features: torch.Tensor) -> VQOut:
        """Nearest codes (Euclidean, or cosine when ``l2_normalized``) with a straight-through gradient.

        Runs in fp32 even under autocast; codes come back in the features' dtype.
        """
        if features.dim() != 4 or features.shape[1] != self.code_dim:
            raise ValueError(f"features must be (B, {self.code_dim}, h, w), got {tuple(features.shape)}")
        b, c, h, w = features.shape
        with torch.autocast(device_type=features.device.type, enabled=False):
            z = features.float().permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
            book = self.codebook.float()  # (K, C)
            if self.config.l2_normalized:
                z = F.normalize(z, dim=-1)
                idx = (z @ book.t()).argmax(dim=-1)  # (B*h*w,) max cosine
            else:
                idx = torch.cdist(z, book).argmin(dim=-1)  # (B*h*w,) min distance, as diffusers
            zq = F.embedding(idx, book)  # (B*h*w, C)
            codebook_term = F.mse_loss(zq, z.detach())
            commitment_term = F.mse_loss(z, zq.detach())
            loss = codebook_term + self.config.commitment_beta * commitment_term
            # Straight-through estimator: the value is exactly the code, the gradient goes to z.
            zq = zq.detach() + (z - z.detach())
        codes = zq.view(b, h, w, c).permute(0, 3, 1, 2).to(features.dtype)  # (B, C, h, w)
        return VQOut(codes=codes, indices=idx.view(b, h, w), loss=loss)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) hard or soft codes (e.g. softmax(logits) @ codebook) -> (B, 3, H, W) images.

        Runs channels-last end to end (weights and activations; a conv given channels-last input but
        standard weights falls back to the standard layout), faster on CPU and equal to the
        standard layout up to float rounding (``python -m bench --only encode`` measures it). The images
        come back in the standard layout.
        """
        self._check_codes(codes)
        codes = codes.contiguous(memory_format=torch.channels_last)
        x = self.vq.post_quant_conv(codes)  # (B, latent_channels, h, w) channels-last
        cond = codes if self.config.norm_type == "spatial" else None
        return self.vq.decoder(x, cond).contiguous()  # (B, 3, H, W)

    # ------------------------------------------------------------------ persistence
    # save_pretrained / from_pretrained: tokenizer.core.pretrained

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> BaseVQ:
        """Rebuild a model written by :meth:`save_pretrained` (also the older ``base_vq_config.json`` layout)."""
        directory = Path(directory)
        if (directory / LEGACY_CONFIG_NAME).is_file():
            return cls._from_legacy(directory, map_location)
        if (directory / DIFFUSERS_WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{directory} has no BaseVQ.save_pretrained files; it looks like a diffusers "
                                    "VQModel directory: use BaseVQ.from_diffusers")
        if not (directory / CONFIG_FILE).is_file():
            hint = ""
            raise FileNotFoundError(f"{directory / CONFIG_FILE} not found; pass a directory written by "
                                    f"BaseVQ.save_pretrained.{hint}")
        return super().from_pretrained(directory, map_location)

    @classmethod
    def _from_legacy(cls, directory: Path, map_location: str | torch.device) -> BaseVQ:
        """The layout written before the one model-directory format (``base_vq_config.json``)."""
        verify_checkpoint(directory)  # truncated or modified files are refused, naming the file
        try:
            config = from_dict(BaseVQConfig, json.loads((directory / LEGACY_CONFIG_NAME).read_text())["config"])
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{directory / LEGACY_CONFIG_NAME}: not a valid BaseVQ config ({e})") from None
        model = cls(config)
        load_module_state(model, load_tensors(directory / LEGACY_WEIGHTS_NAME, map_location),
                          str(directory / LEGACY_WEIGHTS_NAME))
        return model

    @classmethod
    def from_diffusers(cls, directory: str | Path, l2_normalized: bool = False,
                       commitment_beta: float = 0.25) -> BaseVQ:
        """Load a diffusers-format ``VQModel`` directory (``config.json`` + safetensors weights).

        Its quantizer was trained with Euclidean lookup, so ``l2_normalized`` defaults to False; with
        that, reconstructions equal the ``VQModel``'s. Pickled ``.bin`` weights are refused.
        """
        directory = Path(directory)
        cfg_path, w_path = directory / DIFFUSERS_CONFIG_NAME, directory / DIFFUSERS_WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{directory} lacks {DIFFUSERS_CONFIG_NAME} or {DIFFUSERS_WEIGHTS_NAME}; "
                                    "pass a diffusers VQModel directory saved with safetensors "
                                    "(VQModel.save_pretrained(dir, safe_serialization=True))")
        raw = json.loads(cfg_path.read_text())
        if raw.get("_class_name", "VQModel") != "VQModel":
            raise ValueError(f"{cfg_path} describes a {raw['_class_name']}, not a VQModel")
        if raw.get("lookup_from_codebook"):
            raise ValueError(f"{cfg_path}: lookup_from_codebook=True is not supported")
        # Keys missing from an old config.json take VQModel's own constructor defaults.
        params = inspect.signature(VQModel.__init__).parameters
        cfg = {k: raw.get(k, p.default) for k, p in params.items() if p.default is not inspect.Parameter.empty}
        boc = list(cfg["block_out_channels"])
        size = cfg["sample_size"]
        size = max(size) if isinstance(size, list | tuple) else int(size)
        config = BaseVQConfig(
            resolution=_round_up(size, 2 ** (len(boc) - 1)),
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            block_out_channels=boc,
            layers_per_block=cfg["layers_per_block"],
            latent_channels=cfg["latent_channels"],
            vq_embed_dim=cfg["vq_embed_dim"],
            num_vq_embeddings=cfg["num_vq_embeddings"],
            norm_num_groups=cfg["norm_num_groups"],
            l2_normalized=l2_normalized,
            commitment_beta=commitment_beta,
            mid_block_attention=bool(cfg["mid_block_add_attention"]),
            act_fn=cfg["act_fn"],
            norm_type=cfg["norm_type"],
            down_block_types=list(cfg["down_block_types"]),
            up_block_types=list(cfg["up_block_types"]),
        )
        model = cls(config)
        model.vq.load_state_dict(load_file(str(w_path)))
        return model


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, math.ceil(x / multiple) * multiple)


# ============================================================================ codebook statistics


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (fraction of the K codes that occur) and perplexity (exp of the code entropy, in [1, K])."""
    flat = indices.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= codebook_size):
        raise ValueError(f"indices out of [0, {codebook_size}); pass the matching codebook size")
    counts = torch.bincount(flat, minlength=codebook_size).double()  # (K,)
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


# ============================================================================ sizes

BASE_VQ_SIZES: dict[str, BaseVQConfig] = {
    # 64 px, 8x down -> 8x8 grid, ~0.7M params: a CPU training step on 16 images takes ~0.15 s (2 cores).
    "tiny": BaseVQConfig(),
    # 64 px, 8x down -> 8x8 grid, ~21M params: the same grid with GPU-sized capacity.
    "small": BaseVQConfig(block_out_channels=[64, 128, 256, 256], layers_per_block=2, latent_channels=64,
                          num_vq_embeddings=1024, norm_num_groups=32),
    # 256 px, 16x down -> 16x16 grid, 1024 codes of 256-d: MaskGIT's VQGAN sizes (alit.md).
    "maskgit": BaseVQConfig(resolution=256, block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2,
                            latent_channels=256, num_vq_embeddings=1024, norm_num_groups=32),
}


def base_vq_config(size: str, **overrides: object) -> BaseVQConfig:
    """A fresh copy of a registered size, with field overrides (validated)."""
    if size not in BASE_VQ_SIZES:
        raise ValueError(f"unknown base VQ size {size!r}; choose one of {sorted(BASE_VQ_SIZES)}")
    merged = {**to_dict(copy.deepcopy(BASE_VQ_SIZES[size])), **overrides}
    return from_dict(BaseVQConfig, merged)

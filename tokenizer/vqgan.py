"""The MAGE / MaskGIT VQGAN (taming layout), the base 2D tokenizer of the public ALIT checkpoints.

Not the diffusers ``VQModel`` of :mod:`tokenizer.vq`: this network has bias-free residual convs,
average-pool downsampling, no attention, no ``quant_conv`` / ``post_quant_conv``, and a residual block
whose 1x1 shortcut is applied to the block's *own output* when the channel count changes
(``nin_shortcut(h) + h``; the block input is then discarded), exactly as the public taming code the
ALIT checkpoints were trained with. Parameter names are the public ones below ``base_tokenizer.vqgan.``
(``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``), so a public state dict loads strictly.

Shape contract (as :mod:`tokenizer.vq`): images ``(B, 3, H, W)`` in [-1, 1] at this module's boundary
(the public network reads [0, 1]; the conversion happens here, once, in :meth:`MageVQGAN.encode_features`
and :meth:`MageVQGAN.decode_codes`); features and codes ``(B, C, h, w)``; indices ``(B, h, w)`` long.
Indices are the Euclidean argmin over the raw codebook, as the public quantizer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.config import from_dict, to_dict
from .core.pretrained import PretrainedMixin
from .vq import BaseTokenizerMixin, VQOut


# ============================================================================ configuration
@dataclass
class MageVQGANConfig:
    """Model-only configuration of the MAGE VQGAN (the public ``ddconfig`` plus the codebook)."""

    resolution: int = 256  # image side in pixels
    ch: int = 128  # base channel count; level i has ch * ch_mult[i] channels
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # downsampling 2**(len-1)
    num_res_blocks: int = 2  # residual blocks per level (encoder and decoder)
    z_channels: int = 256  # encoder output channels = code dimension C
    n_embed: int = 1024  # codebook size K
    in_channels: int = 3
    out_ch: int = 3
    commitment_beta: float = 0.25  # the taming quantizer's beta (legacy loss: beta * commitment + codebook)
    norm_groups: int = 32  # GroupNorm groups (32 in the public code; every channel count must be a multiple)

    def __post_init__(self) -> None:
        if not self.ch_mult:
            raise ValueError("vq.ch_mult is empty; give one multiplier per level, e.g. [1, 2, 2]")
        for name in ("resolution", "ch", "num_res_blocks", "z_channels", "n_embed", "in_channels", "out_ch",
                     "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"vq.{name} must be >= 1, got {getattr(self, name)}")
        for c in [self.ch * m for m in self.ch_mult] + [self.z_channels]:
            if c % self.norm_groups:
                raise ValueError(f"channel count {c} is not a multiple of vq.norm_groups={self.norm_groups} "
                                 "(GroupNorm); change ch, ch_mult or norm_groups")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"vq.resolution={self.resolution} is not divisible by the downsampling factor "
                             f"{self.downsample_factor} (2**(len(ch_mult)-1))")

    @property
    def downsample_factor(self) -> int:
        """Pixels per grid cell along one side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        """Grid side at ``resolution``."""
        return self.resolution // self.downsample_factor

    @property
    def code_dim(self) -> int:
        """Code dimension C (= z_channels = the public embed_dim)."""
        return self.z_channels


# ============================================================================ building blocks
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv -> norm -> swish -> conv; with a channel change, ``nin_shortcut(h) + h``."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        # The public shortcut maps the block's output (c_out channels) to itself: [out, out, 1, 1].
        self.nin_shortcut = nn.Conv2d(c_out, c_out, 1, bias=False) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(h) if self.nin_shortcut is not None else x  # the public quirk, kept
        return skip + h


class _Level(nn.Module):
    """One resolution level: its residual blocks, then (optionally) a resampler."""

    def __init__(self, blocks: list[ResnetBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """conv_in -> per level: residual blocks, avg-pool (not after the last) -> mid -> norm, swish, 1x1 conv."""

    def __init__(self, c: MageVQGANConfig) -> None:
        super().__init__()
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        c_in = c.ch
        for mult in c.ch_mult:
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c.ch * mult, g))
                c_in = c.ch * mult
            self.down.append(_Level(blocks))
        self.mid = _Mid(c_in, g)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, c.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)  # (B, c, H/2^(i+1), W/2^(i+1))
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, h, w)


class Decoder(nn.Module):
    """conv_in -> mid -> per level from the top: residual blocks, nearest x2 + conv -> norm, swish, conv_out."""

    def __init__(self, c: MageVQGANConfig) -> None:
        super().__init__()
        g = c.norm_groups
        c_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, g)
        levels: list[_Level] = []
        for i in reversed(range(len(c.ch_mult))):  # built from the top; stored with level 0 first
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(c_in, c.ch * c.ch_mult[i], g))
                c_in = c.ch * c.ch_mult[i]
            level = _Level(blocks)
            if i != 0:
                level.upsample = _Upsample(c_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, c.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, c_top, h, w)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)


class VectorQuantizer(nn.Module):
    """The taming quantizer: Euclidean nearest code, straight-through gradient, legacy loss; fp32."""

    def __init__(self, n_embed: int, dim: int, beta: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # taming's init
        self.beta = beta

    def forward(self, features: Tensor) -> VQOut:
        """``(B, C, h, w)`` -> codes ``(B, C, h, w)``, indices ``(B, h, w)``, loss ``()``."""
        b, c, h, w = features.shape
        with torch.autocast(device_type=features.device.type, enabled=False):
            z = features.float().permute(0, 2, 3, 1).reshape(-1, c)  # (B*h*w, C)
            book = self.embedding.weight.float()  # (K, C)
            d = z.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * z @ book.t()  # (B*h*w, K)
            idx = d.argmin(dim=1)
            zq = F.embedding(idx, book)
            loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
            zq = z + (zq - z).detach()
        codes = zq.view(b, h, w, c).permute(0, 3, 1, 2).to(features.dtype)  # (B, C, h, w)
        return VQOut(codes=codes, indices=idx.view(b, h, w), loss=loss)


# ============================================================================ the model
class MageVQGAN(BaseTokenizerMixin, PretrainedMixin, nn.Module):
    """The MAGE VQGAN with the project's base-tokenizer contract (see :class:`tokenizer.vq.BaseVQ`)."""

    model_name = "MageVQGAN"
    config_class = MageVQGANConfig

    def __init__(self, config: MageVQGANConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config).to(memory_format=torch.channels_last)  # see decode_codes01
        self.quantize = VectorQuantizer(config.n_embed, config.z_channels, config.commitment_beta)

    # ------------------------------------------------------------------ sizes
    @property
    def codebook_size(self) -> int:
        """Number of codes K."""
        return self.config.n_embed

    @property
    def codebook(self) -> Tensor:
        """``(K, C)`` raw code vectors (the public soft code reads them unnormalised)."""
        return self.quantize.embedding.weight

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's output conv weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ encoder / quantizer / decoder
    def encode_features(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [-1, 1] -> ``(B, C, h, w)`` encoder output before quantization."""
        self._check_images(images)
        return self.encoder((images + 1) / 2)  # the public encoder reads [0, 1]

    def decode_codes(self, codes: Tensor) -> Tensor:
        """``(B, C, h, w)`` hard or soft codes -> ``(B, 3, H, W)`` in [-1, 1] (unclamped)."""
        return self.decode_codes01(codes) * 2 - 1

    def decode_codes01(self, codes: Tensor) -> Tensor:
        """The public decoder: codes -> images in [0, 1] (unclamped).

        Channels-last weights and activations (the public code runs the standard layout; the results
        agree up to float rounding, and it is faster); the images come back in the standard layout.
        """
        self._check_codes(codes)
        return self.decoder(codes.contiguous(memory_format=torch.channels_last)).contiguous()


# ============================================================================ sizes
MAGE_VQGAN_SIZES: dict[str, MageVQGANConfig] = {
    # The public MAGE/MaskGIT VQGAN of the ALIT checkpoints: 256 px, 16x down, 1024 x 256-d codes.
    "mage": MageVQGANConfig(),
    # 64 px, 8x down -> 8x8 grid: the layout of the public one at CPU size.
    "mage_tiny": MageVQGANConfig(resolution=64, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=32,
                                 n_embed=512, norm_groups=8),
}


def mage_vqgan_config(size: str, **overrides: object) -> MageVQGANConfig:
    """A fresh copy of a registered size, with field overrides (validated)."""
    if size not in MAGE_VQGAN_SIZES:
        raise ValueError(f"unknown MAGE VQGAN size {size!r}; choose one of {sorted(MAGE_VQGAN_SIZES)}")
    return from_dict(MageVQGANConfig, {**to_dict(copy.deepcopy(MAGE_VQGAN_SIZES[size])), **overrides})

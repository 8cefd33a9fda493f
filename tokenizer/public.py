"""Reading the public ALIT checkpoints (github.com/ShivamDuggal4/adaptive-length-tokenizer) safely.

A public training checkpoint is a ``torch.save``d dict ``{model, optimizer, ema, epoch, scaler, args}``
whose ``args`` is an ``argparse.Namespace``. It is read with ``torch.load(weights_only=True)`` and only
``argparse.Namespace`` allow-listed: any other pickled object is refused, and after loading every value
is checked to be a tensor, dict, list, tuple, number, string, None or that Namespace. The weights are
the ``ema`` entry by default (what the public loaders use), ``model`` on request; the training-only
``gan_losses.*`` (LPIPS-VGG16 and one PatchGAN per iteration) are dropped. The architecture is inferred
from the tensor shapes; only the attention heads are not stored anywhere in the file, so they come from
the public factory name in ``args.model`` (``alit_tiny``, ``alit_small``, ``alit_base``,
``alit_semilarge``) or must be given. The ``weights.safetensors`` layout of the golden cases (the same
public key names, no pickle at all) is read too.

Usage::

    alit import-public alit_small_vqgan_quantized_latents.pth --out $ALIT_HOME/models/alit_small_in100
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .alit import ALIT, ALITConfig, ALITTokenizer
from .core.checkpoint import CheckpointError, load_module_state
from .vqgan import MageVQGAN, MageVQGANConfig

# The public factories (adaptive_tokenizers/__init__.py): width, layers and heads, encoder = decoder.
PUBLIC_FACTORIES: dict[str, tuple[int, int, int]] = {
    "alit_tiny": (512, 8, 8),
    "alit_small": (1024, 8, 8),
    "alit_base": (768, 12, 12),
    "alit_semilarge": (1024, 16, 16),
}
BASE_PREFIX = "base_tokenizer.vqgan."
DROPPED_PREFIXES = ("gan_losses.",)
# What the public yaml fixes and no checkpoint stores (adaptive_tokenizers/configs/adaptive_vqgan.yaml).
PUBLIC_HALTING_THRESHOLD = 0.55
PUBLIC_COMMITMENT = 0.25
_ALLOWED = (torch.Tensor, int, float, bool, str, type(None), argparse.Namespace, torch.dtype, torch.Size)


@dataclass
class PublicCheckpoint:
    """The weights of a public checkpoint and what it says about itself."""

    state: dict[str, torch.Tensor]  # public key names, gan_losses.* dropped
    args: dict[str, Any]  # vars(args), or {} for a safetensors file
    source: str  # which entry the weights came from ("ema", "model" or "safetensors")
    dropped: int  # how many gan_losses.* tensors were dropped


def _check_tree(obj: Any, where: str) -> None:
    """Refuse anything but tensors, containers of them, numbers, strings, None and a Namespace."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}; a public ALIT checkpoint "
                                      "holds only tensors, dicts, lists, numbers, strings and an argparse.Namespace")
            _check_tree(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_tree(v, f"{where}[{i}]")
    elif isinstance(obj, argparse.Namespace):
        _check_tree(vars(obj), f"{where}.args")
    elif not isinstance(obj, _ALLOWED):
        raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}; a public ALIT checkpoint "
                              "holds only tensors, dicts, lists, numbers, strings and an argparse.Namespace")


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path} holds a pickled object that is not allowed{what}: only tensors, dicts, "
                              "lists, numbers, strings and argparse.Namespace are read; this is not a public ALIT "
                              "checkpoint, or it was modified") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint ({str(e).splitlines()[0][:160]}): "
                              "truncated or not a .pth file; download it again") from None


def read_public_checkpoint(path: str | Path, weights: str = "ema") -> PublicCheckpoint:
    """The weights of a public ``.pth`` (``weights``: ``ema`` or ``model``) or golden ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: pass a public ALIT checkpoint (.pth) or weights.safetensors")
    if weights not in ("ema", "model"):
        raise CheckpointError(f"weights must be 'ema' or 'model', got {weights!r}")
    if path.suffix == ".safetensors":
        try:
            state, args, source = load_file(str(path)), {}, "safetensors"
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}): truncated?") from None
    else:
        raw = _torch_load(path)
        _check_tree(raw, path.name)
        if not isinstance(raw, dict) or weights not in raw:
            keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"{path} has no '{weights}' entry (it holds {keys}); a public ALIT training "
                                  "checkpoint holds model, ema, optimizer, epoch, scaler and args"
                                  + ("; try --weights model" if weights == "ema" else ""))
        state = raw[weights]
        args_ns = raw.get("args")
        args = vars(args_ns) if isinstance(args_ns, argparse.Namespace) else {}
        source = weights
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: the '{source}' entry is not a state dict of tensors")
    kept = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    return PublicCheckpoint(kept, args, source, len(state) - len(kept))


# ============================================================================ architecture from shapes
def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children ``prefix{i}.`` the state holds."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"the checkpoint has no '{key}': not an ALIT-with-VQGAN state dict (quantized "
                              "latents, VQGAN base); the continuous-latent and VAE variants are not supported")
    return tuple(state[key].shape)


def infer_configs(ckpt: PublicCheckpoint, encoder_heads: int | None = None, decoder_heads: int | None = None,
                  halting: bool = True, halting_threshold: float = PUBLIC_HALTING_THRESHOLD
                  ) -> tuple[ALITConfig, MageVQGANConfig]:
    """The :class:`ALITConfig` and :class:`MageVQGANConfig` a public state dict was built with."""
    s, args = ckpt.state, ckpt.args
    if args.get("base_tokenizer", "vqgan") != "vqgan":
        raise CheckpointError(f"base_tokenizer={args['base_tokenizer']!r}: only the VQGAN-based public models are "
                              "supported (not the VAE ones)")
    if args and not args.get("quantize_latent", True):
        raise CheckpointError("quantize_latent=False: the continuous-latent public models have no latent ids "
                              "and are not supported; use a quantized-latent checkpoint")
    rows, width = _shape(s, "encoder_positional_embedding")
    grid = round((rows - 1) ** 0.5)
    if grid * grid != rows - 1:
        raise CheckpointError(f"encoder_positional_embedding has {rows} rows, not 1 + a square grid")
    t, _ = _shape(s, "latent_tokens")
    iters = _shape(s, "timestep_embedding")[0]
    rgb, _, patch, _ = _shape(s, "patch_embed.weight")
    base_dim = width - rgb
    codebook, code_dim = _shape(s, "quantize.embedding.weight")
    depth = _count(s, "encoder.transformer.")
    hidden = _shape(s, "encoder.transformer.0.mlp.c_fc.weight")[0]
    dec_width = _shape(s, "decoder_positional_embedding")[1]
    dec_depth = _count(s, "decoder.transformer.")
    dec_max = _shape(s, "decoder.latent_token_positional_embedding")[0]
    base_k = _shape(s, "decoder.ffn.2.weight")[0]
    name = str(args.get("model", ""))
    if name in PUBLIC_FACTORIES:
        f_width, f_depth, f_heads = PUBLIC_FACTORIES[name]
        if (f_width, f_depth) != (width, depth):
            raise CheckpointError(f"args.model={name!r} has width {f_width} and {f_depth} layers but the weights have "
                                  f"{width} and {depth}: the file is inconsistent")
        encoder_heads = encoder_heads or f_heads
        decoder_heads = decoder_heads or f_heads
    if encoder_heads is None or decoder_heads is None:
        what = f"args.model={name!r} is not a public factory" if name else "the file names no model"
        raise CheckpointError(f"{what} ({', '.join(PUBLIC_FACTORIES)}), and the number of attention heads is "
                              "stored nowhere in a checkpoint: pass --encoder-heads N --decoder-heads N")
    try:
        alit = ALITConfig(width=width, depth=depth, heads=encoder_heads, decoder_width=dec_width,
                          decoder_depth=dec_depth, decoder_heads=decoder_heads, decoder_max_tokens=dec_max,
                          mlp_ratio=hidden / width, tokens_per_iter=t, num_iters=iters, codebook_size=codebook,
                          code_dim=code_dim, commitment_beta=PUBLIC_COMMITMENT, halting=halting,
                          halting_threshold=halting_threshold, patch_size=patch, base_grid=grid,
                          base_code_dim=base_dim, base_codebook_size=base_k)
        base = _infer_vqgan(s, grid)
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's shapes give no valid model: {e}") from None
    if "input_size" in args and int(args["input_size"]) != alit.image_size:
        raise CheckpointError(f"args.input_size={args['input_size']} but the weights are for {alit.image_size} px "
                              f"(patch {patch} x grid {grid})")
    return alit, base


def _infer_vqgan(s: dict[str, torch.Tensor], grid: int) -> MageVQGANConfig:
    p = BASE_PREFIX
    ch = _shape(s, p + "encoder.conv_in.weight")[0]
    levels = _count(s, p + "encoder.down.")
    mult = [_shape(s, f"{p}encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in range(levels)]
    blocks = _count(s, p + "encoder.down.0.block.")
    z = _shape(s, p + "encoder.conv_out.weight")[0]
    n_embed = _shape(s, p + "quantize.embedding.weight")[0]
    return MageVQGANConfig(resolution=grid * 2 ** (levels - 1), ch=ch, ch_mult=mult, num_res_blocks=blocks,
                           z_channels=z, n_embed=n_embed)


# ============================================================================ the tokenizer
def tokenizer_from_public(ckpt: PublicCheckpoint, encoder_heads: int | None = None,
                          decoder_heads: int | None = None, halting: bool = True,
                          halting_threshold: float = PUBLIC_HALTING_THRESHOLD) -> ALITTokenizer:
    """An :class:`ALITTokenizer` holding exactly the public weights (strict: no key missing or left over)."""
    alit_cfg, base_cfg = infer_configs(ckpt, encoder_heads, decoder_heads, halting, halting_threshold)
    alit, base = ALIT(alit_cfg), MageVQGAN(base_cfg)
    base_state = {k[len(BASE_PREFIX):]: v for k, v in ckpt.state.items() if k.startswith(BASE_PREFIX)}
    alit_state = {k: v for k, v in ckpt.state.items() if not k.startswith(BASE_PREFIX)}
    for module, state, what in ((alit, alit_state, "ALIT"), (base, base_state, "VQGAN")):
        load_module_state(module, {k: v.float() for k, v in state.items()},
                          f"the {what} weights of the public checkpoint (architecture inferred from its shapes)")
    return ALITTokenizer(alit, base).eval()

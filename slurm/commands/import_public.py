"""``alit import-public``: a released ALIT checkpoint as a tokenizer directory of this stack.

    alit import-public alit_small_vqgan_quantized_latents.pth --out $ALIT_HOME/models/alit_small_in100
    alit import-public golden/weights.safetensors --out tok --encoder-heads 4 --decoder-heads 4

Reads the public training checkpoint safely (``torch.load(weights_only=True)``, only ``argparse.Namespace``
allowed), takes the ``ema`` weights (``--weights model`` for the raw ones), drops the training-only
``gan_losses.*``, infers the architecture from the shapes (heads from the public factory name in
``args.model``), writes a directory that ``alit tokenize``, ``alit reconstruct`` and ``alit eval`` take as
``--tokenizer``, and prints a one-line check: the ids of a bundled image at the smallest budget and its
reconstruction L1.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tokenizer.core.checkpoint import CheckpointError

if TYPE_CHECKING:
    from tokenizer.alit import ALITTokenizer

TAKES_OVERRIDES = False
USER_ERRORS = (CheckpointError,)  # a foreign, truncated or inconsistent checkpoint, or a bad --out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit import-public CHECKPOINT --out DIR [--weights ema|model] [--encoder-heads N --decoder-heads N]"
    parser.add_argument("checkpoint", help="a public ALIT checkpoint (.pth) or a weights.safetensors with public keys")
    parser.add_argument("--out", required=True, help="the tokenizer directory to write")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="which weights of a .pth: ema (default, as the public loaders) or model")
    parser.add_argument("--encoder-heads", type=int, default=None,
                        help="attention heads of the encoder (needed when args.model is not a public factory)")
    parser.add_argument("--decoder-heads", type=int, default=None, help="attention heads of the decoder")
    parser.add_argument("--no-halting", action="store_true", help="turn dynamic halting off (public default: on)")
    parser.add_argument("--halting-threshold", type=float, default=None,
                        help="halting threshold on p(true base index) (public default 0.55)")


def _check_line(tok: ALITTokenizer) -> str:
    """The ids of a bundled image at the smallest budget and its reconstruction L1."""
    import torch
    import torch.nn.functional as F

    from tokenizer.core.data import DataConfig, build_dataset

    image = build_dataset(DataConfig(source="emoji", resolution=64), "val")[0][0][None]  # (1, 3, 64, 64)
    if tok.image_size != 64:
        image = F.interpolate(image, size=tok.image_size, mode="bilinear", align_corners=False).clamp(-1, 1)
    budget = tok.budgets[0]
    with torch.no_grad():
        ids = tok.encode(image, budget)
        l1 = float((tok.decode(ids) - image).abs().mean() / 2)
    shown = ", ".join(str(i) for i in ids[0, :6].tolist())
    return f"emoji val image 0 at {budget} tokens -> ids [{shown}, ...], reconstruction L1 {l1:.4f}"


def run(args: argparse.Namespace) -> int:
    from tokenizer.public import PUBLIC_HALTING_THRESHOLD, read_public_checkpoint, tokenizer_from_public

    ckpt = read_public_checkpoint(args.checkpoint, args.weights)
    threshold = PUBLIC_HALTING_THRESHOLD if args.halting_threshold is None else args.halting_threshold
    tok = tokenizer_from_public(ckpt, args.encoder_heads, args.decoder_heads, halting=not args.no_halting,
                                halting_threshold=threshold)
    out = tok.save_pretrained(args.out)  # refuses an --out that holds anything but a saved model
    c = tok.config
    name = ckpt.args.get("model", "weights")
    print(f"[import-public] {out}: {name} (width {c.width}/{c.dec_width}, {c.depth}+{c.decoder_layers} layers, "
          f"{c.heads}/{c.dec_heads} heads), budgets {c.budgets[0]}..{c.max_tokens}, MAGE VQGAN base at "
          f"{tok.image_size} px; {ckpt.source} weights, {ckpt.dropped} gan_losses tensors dropped")
    print(f"[import-public] check: {_check_line(tok)}")
    return 0

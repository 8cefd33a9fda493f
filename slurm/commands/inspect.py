"""``alit inspect``: token specialization maps, each latent token's attention over the 2D grid.

    alit inspect --tokenizer runs/tok/final --out runs/inspect [--data emoji] [--images 4] \\
        [--iterations all|0,3] [--layers all|0] [--which encoder|decoder|both] [data.key=value ...]

Writes ``<out>/<which>-iter<t>-layer<l>.png`` (rows = latent tokens, columns = images: each token's map
over the image), ``attention.npz`` (the maps, ``(images, tokens, G, G)``) and ``index.json``. The maps are
computed through an explicit-softmax path used only here; encoding itself is unchanged.
"""

from __future__ import annotations

import argparse

import torch

from tokenizer.core.data import DataSpec
from tokenizer.core.errors import UsageError

from . import prologue

TAKES_OVERRIDES = True  # data.* overrides, e.g. data.source=/path/to/images
USER_ERRORS = (ValueError, KeyError)


def parse_ints(text: str, flag: str) -> list[int] | None:
    """``all`` -> None, ``0,3`` -> [0, 3]; anything else is a :class:`UsageError` naming ``flag``."""
    if text.strip().lower() == "all":
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r} must be 'all' or comma-separated integers, e.g. 0,3") from None


def add_data_options(parser: argparse.ArgumentParser, split: str = "val") -> None:
    """``--data``, ``--config``, ``--split``, ``--device``: the options of the analysis commands' dataset."""
    parser.add_argument("--data", default=None,
                        help="dataset: 'emoji' (embedded), a folder of images or an .npz (= data.source=...)")
    parser.add_argument("--config", default=None, help="YAML with a data: section (default: the emoji set)")
    parser.add_argument("--split", default=split, help=f"dataset split (train, val, all; default {split})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def load_spec(args: argparse.Namespace) -> DataSpec:
    """The dataset of ``args``: ``--config``, then ``--data``, then ``data.*`` overrides."""
    if args.data is not None:
        args.overrides = [f"data.source={args.data}", *(getattr(args, "overrides", None) or [])]
    spec, _ = prologue(args, DataSpec, args.config)
    return spec


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("alit inspect --tokenizer DIR --out DIR [--data SOURCE] [--images N] [--iterations all|0,1] "
                    "[--layers all|0] [--which encoder|decoder|both] [data.key=value ...]")
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (a tokenizer run's final/)")
    parser.add_argument("--out", required=True, help="output folder (created; refused if it holds other files)")
    parser.add_argument("--images", type=int, default=4, help="images (columns): a seeded stratified subset")
    parser.add_argument("--iterations", default="all", help="0-based iterations (budget (t+1)*T), or all")
    parser.add_argument("--layers", default="all", help="0-based layers, or all")
    parser.add_argument("--which", default="encoder", choices=("encoder", "decoder", "both"),
                        help="encoder: latent tokens over the 2D tokens; decoder: grid queries over latents")
    parser.add_argument("--max-tokens", type=int, default=32, help="rows: the first latent tokens shown")
    add_data_options(parser)


def run(args: argparse.Namespace) -> int:
    from sampling.analysis import write_attention_maps
    from sampling.generate import default_device, eval_positions, load_models
    from tokenizer.core.data import build_dataset

    if args.images < 1:
        raise UsageError(f"--images {args.images} must be >= 1")
    iterations = parse_ints(args.iterations, "--iterations")
    layers = parse_ints(args.layers, "--layers")
    spec = load_spec(args)
    models = load_models(args.tokenizer, None, args.device or default_device())
    dataset = build_dataset(spec.data, args.split)
    positions = eval_positions(dataset, args.images, spec.data.split_seed)
    images = torch.stack([dataset[int(p)][0] for p in positions]).to(models.device)
    which = ("encoder", "decoder") if args.which == "both" else (args.which,)
    meta = dict(tokenizer=str(args.tokenizer), tokenizer_id=models.tokenizer_identity["id"],
                data=spec.data.source, split=args.split, positions=positions.tolist(),
                source_indices=dataset.indices[positions].tolist(),
                labels=[int(dataset.labels[int(p)]) for p in positions])
    index = write_attention_maps(models.tokenizer, images, args.out, which=which, iterations=iterations,
                                 layers=layers, max_tokens=args.max_tokens, meta=meta)
    print(f"[inspect] {len(index['maps'])} map grids of {len(positions)} images -> {args.out}")
    return 0

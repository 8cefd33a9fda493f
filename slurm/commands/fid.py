"""``alit fid A B``: FID (and KID, precision/recall) between any two of: an image folder, an npz batch, a
statistics file.

    alit fid runs/samples/folder data/val_images                   # two folders
    alit fid samples_adm.npz VIRTUAL_imagenet256_labeled.npz       # ADM sample batch vs ADM reference batch
    alit fid runs/samples/folder ref_stats.npz --protocol clean_fid

Inputs and formats: :mod:`sampling.fid_io` (ADM ``arr_0`` batches and reference batches, pytorch-fid /
clean-fid ``mu``/``sigma`` statistics, clean-fid ``feats``, ``alit fid-stats`` files, alit image sets).
The protocol (:class:`sampling.fid.FIDProtocol`) is printed with the numbers; without ``--protocol`` it is
the one a statistics file names, else ``torch_fidelity``. KID and precision/recall (A as generated, B as
real) are printed when both sides have per-image features (images, or a ``--keep-features`` file); the
Inception Score is not available with the offline weights (the line says why). FID is symmetric.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizer.core.errors import UsageError

if TYPE_CHECKING:
    from sampling.fid_io import FidInput


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = "alit fid A B [--protocol torch_fidelity|clean_fid] [--no-metrics] [--json PATH]"
    parser.add_argument("a", metavar="A", help="a folder of images, an .npz batch or a statistics .npz")
    parser.add_argument("b", metavar="B", help="the same kinds (the reference, for precision/recall)")
    parser.add_argument("--protocol", default=None, choices=("torch_fidelity", "clean_fid"),
                        help="feature protocol (default: the one a statistics file names, else torch_fidelity)")
    parser.add_argument("--no-metrics", action="store_true", help="FID only (no KID, precision/recall)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID random subsets (default 100)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="KID subset size (default 1000, capped at the smaller set)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON here")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _protocol_of(items: list[FidInput], explicit: str | None) -> str:
    """``--protocol``, else the protocol a statistics file names, else torch_fidelity."""
    named = {("torch_fidelity" if i.stats.protocol.startswith("torch-fidelity==") else "clean_fid")
             for i in items if i.stats is not None and i.stats.protocol}
    if explicit is not None:
        return explicit
    if len(named) > 1:
        raise UsageError("the two statistics files were computed under different protocols: recompute one "
                         "with alit fid-stats --protocol of the other")
    return named.pop() if named else "torch_fidelity"


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.kid_subsets < 1 or args.kid_subset_size < 2:
        raise UsageError("--batch-size and --kid-subsets must be >= 1 and --kid-subset-size >= 2")
    if args.json is not None and Path(args.json).suffix != ".json":
        raise UsageError(f"--json {args.json}: give a .json path")
    from sampling.fid import FeatureExtractor
    from sampling.fid_io import compare, describe, dumps, open_fid_input
    from sampling.generate import default_device
    from tokenizer.core.io import atomic_path

    a = open_fid_input(args.a)
    b = a if Path(args.b).expanduser().resolve() == Path(args.a).expanduser().resolve() else open_fid_input(args.b)
    protocol = _protocol_of([a, b], args.protocol)
    extractor = FeatureExtractor(protocol, args.device or default_device(), batch_size=args.batch_size,
                                 progress=not args.no_progress)
    result = compare(a, b, extractor, metrics=not args.no_metrics, kid_subsets=args.kid_subsets,
                     kid_subset_size=args.kid_subset_size)
    result["a"], result["b"] = describe(a), describe(b)
    print(f"A: {result['a']}")
    print(f"B: {result['b']}")
    print(f"protocol: {result['protocol']} ({result['protocol_id']})")
    print(f"FID: {result['fid']:.6f}  (n_A={result['n_a'] or 'unknown'}, n_B={result['n_b'] or 'unknown'})")
    if "kid_mean" in result:
        print(f"KID: {result['kid_mean']:.6f} +- {result['kid_std']:.6f}  (subset size {result['kid_subset_size']}, "
              f"{args.kid_subsets} subsets; n_A={result['n_features_a']}, n_B={result['n_features_b']})")
        print(f"precision: {result['precision']:.4f}  recall: {result['recall']:.4f}  f_score: "
              f"{result['f_score']:.4f}  (A against B; Inception pool3, k=3, not VGG16)")
    print(f"Inception Score: {result['isc_note']}")
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json is not None:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.write_text(dumps(result) + "\n")
    return 0

"""``alit weights``: where the FID Inception and LPIPS weights come from, and whether they work.

For each network: name, path, the rule that found it, size and SHA-256, then a check. LPIPS must
reproduce the published distances on the LPIPS example images (0.569 / 0.422 to 1e-3); the Inception
must give finite 2048-d pool3 features for one image. Exit status 0 when both pass, 1 otherwise (with
how to provide the weights).

    alit weights
    alit weights --inception /path/to/weights-inception-2015-12-05-6726825d.pth --lpips /path/to/lpips.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sampling.inception import fid_feature_extractor  # importing it registers the FID Inception
from tokenizer.core.errors import EXIT_FAILED
from tokenizer.core.paths import ASSETS
from tokenizer.core.weights import ResolvedWeights, WeightsLayoutError, WeightsNotFound, resolve_weights
from tokenizer.lpips import LPIPS, REFERENCE_DISTANCES, load_image, reference_distances  # registers LPIPS

LPIPS_TOLERANCE = 1e-3

# The LPIPS example triplet (BSD-2, from the LPIPS repository), packaged with the tokenizer.
_EXAMPLE_DIRS = (ASSETS / "lpips-examples",)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``alit weights`` options."""
    parser.add_argument("--inception", metavar="PATH", default=None,
                        help="FID Inception weights file (torch-fidelity layout); default: resolve")
    parser.add_argument("--lpips", metavar="PATH", default=None,
                        help="LPIPS VGG16 weights file; default: resolve")


def examples_dir() -> Path | None:
    """The folder holding ex_ref.png / ex_p0.png / ex_p1.png, if any."""
    return next((d for d in _EXAMPLE_DIRS if (d / "ex_ref.png").is_file()), None)


def _describe(resolved: ResolvedWeights) -> None:
    print(f"  path:   {resolved.path}")
    print(f"  source: {resolved.source} ({resolved.detail})")
    print(f"  size:   {resolved.size / 2**20:.1f} MiB, sha256 {resolved.sha256()}")


def _verify_lpips(resolved: ResolvedWeights) -> bool:

    model = LPIPS(resolved.path)
    folder = examples_dir()
    if folder is None:
        print(f"  check:  FAILED, the LPIPS example images are missing (looked in {', '.join(map(str, _EXAMPLE_DIRS))})")
        return False
    ok = True
    for name, got in reference_distances(model, folder).items():
        want = REFERENCE_DISTANCES[name]
        good = abs(got - want) <= LPIPS_TOLERANCE
        ok &= good
        print(f"  check:  LPIPS(ex_ref, {name}) = {got:.4f}, published {want:.3f}: {'ok' if good else 'FAILED'}")
    return ok


def _verify_inception(resolved: ResolvedWeights) -> bool:

    extractor = fid_feature_extractor("cpu", weights=resolved.path)
    folder = examples_dir()
    if folder is not None:
        image = ((load_image(folder / "ex_ref.png") + 1) * 127.5).round().to(torch.uint8)  # (1,3,64,64)
    else:
        image = torch.arange(64 * 64 * 3).reshape(1, 3, 64, 64).remainder(256).to(torch.uint8)
    with torch.no_grad():
        features = extractor(image)  # (1,2048)
    ok = tuple(features.shape) == (1, 2048) and bool(torch.isfinite(features).all())
    print(f"  check:  pool3 features {tuple(features.shape)}, all finite, norm {features.norm().item():.3f}: "
          f"{'ok' if ok else 'FAILED'}")
    head = ("present (Inception Score available)" if extractor.net.has_classifier
            else "absent: FID/KID only, no Inception Score")
    print(f"  note:   classifier head {head}")
    return ok


def run(args: argparse.Namespace) -> int:
    """Report and verify both networks; 0 when both verify, 1 when one is missing or fails its check."""
    all_ok = True
    for name, title, path, verify in (("inception", "FID InceptionV3", args.inception, _verify_inception),
                                      ("lpips", "LPIPS VGG16", args.lpips, _verify_lpips)):
        print(f"{name}: {title}", flush=True)
        try:
            resolved = resolve_weights(name, path)
            _describe(resolved)
            ok = verify(resolved)
        except (WeightsNotFound, WeightsLayoutError) as e:
            print(f"  FAILED: {e}", file=sys.stderr, flush=True)
            ok = False
        all_ok &= ok
    print("all weights verified" if all_ok else "some weights are missing or failed their check")
    return 0 if all_ok else EXIT_FAILED

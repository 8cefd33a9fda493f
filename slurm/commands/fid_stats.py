"""``alit fid-stats``: Inception statistics (mu, sigma, image count, protocol) of an image set, as an .npz.

    alit fid-stats runs/samples/folder --out stats.npz                    # a folder of images
    alit fid-stats VIRTUAL_imagenet256_labeled.npz --out ref.npz          # an ADM batch (arr_0) / image set
    alit fid-stats --split val data.source=/data/imagenet --out val.npz   # a dataset split (un-augmented)
    alit fid-stats DATA --out stats.npz --shard 2/8                       # one shard here; the last merges
    alit fid-stats DATA --out stats.npz --cluster slurm --shards 8 --gpus 1   # a job array + a merge job

The file (format ``alit-fid-stats/1``, :mod:`sampling.fid_io`) holds ``mu`` and ``sigma`` under the keys
pytorch-fid and clean-fid read, plus ``n``, ``protocol`` (library, preprocessing, weights) and ``source``;
``--keep-features`` adds the per-image features (``feats``, 8 KiB per image) so that ``alit fid`` can also
give KID and precision/recall against it. Shards: :mod:`slurm.fid_jobs`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizer.core.data import SPLITS, DataSpec
from tokenizer.core.errors import UsageError

from ..launcher import add_cluster_arguments, slurm_config_from_args
from . import prologue, shard_flags_problem

TAKES_OVERRIDES = True  # data.* overrides with --split, e.g. data.source=/path/to/images; slurm.* for jobs


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = ("alit fid-stats [DATA | --split S [data.key=value ...]] --out stats.npz "
                    "[--protocol P] [--keep-features] [--shard i/n | --cluster C --shards N]")
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="a folder of images or an .npz batch (ADM arr_0, or an alit image set)")
    parser.add_argument("--out", required=True, help="the statistics .npz to write")
    parser.add_argument("--split", default=None, choices=SPLITS,
                        help="measure this split of the configured dataset instead of DATA (data.* overrides)")
    parser.add_argument("--config", default=None, help="with --split: YAML with a data: section")
    parser.add_argument("--protocol", default="torch_fidelity", choices=("torch_fidelity", "clean_fid"),
                        help="feature protocol (default torch_fidelity; see sampling/fid.py)")
    parser.add_argument("--keep-features", action="store_true",
                        help="also store per-image features (feats) for KID and precision/recall")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard", default=None, help="i/n: measure shard i of n here (the last one merges)")
    parser.add_argument("--shards", type=int, default=None, help="with --cluster: array tasks (default 1)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else cpu; with --cluster: in each job)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cluster_arguments(parser)


def _flag_problem(args: argparse.Namespace, slurm_overrides: list[str]) -> str | None:
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if Path(args.out).suffix != ".npz":
        return f"--out {args.out}: statistics are written as .npz (e.g. --out stats.npz)"
    if (args.data is None) == (args.split is None):
        return ("give either DATA (a folder of images or an .npz batch) or --split S with data.source=..., "
                "not " + ("both" if args.data is not None else "neither"))
    own = [o for o in getattr(args, "overrides", None) or [] if o not in slurm_overrides]
    if args.split is None and (args.config or own):
        return "--config and data.* overrides describe a dataset: use them with --split S instead of DATA"
    return shard_flags_problem(args, slurm_overrides)


def run(args: argparse.Namespace) -> int:
    from sampling.generate import Shard

    from ..fid_jobs import FidStatsRequest, submit_fid_stats

    # a positional that is really an override (``alit fid-stats data.source=x --split val``)
    if args.data is not None and "=" in args.data and not Path(args.data).exists():
        args.overrides = [args.data, *(getattr(args, "overrides", None) or [])]
        args.data = None
    spec, slurm_overrides = prologue(args, DataSpec, args.config, check=_flag_problem)
    request = FidStatsRequest.from_parts(args.data, spec.data if args.split else None, args.split, args.out,
                                         protocol=args.protocol, batch_size=args.batch_size,
                                         keep_features=args.keep_features, device=args.device)
    if args.cluster == "none":
        shard = Shard.parse(args.shard or "0/1")
        out = request.run_shard(shard.index, shard.count, progress=not args.no_progress)
        if out is None:
            print(f"[fid-stats] shard {shard} written to {request.shard_path(shard.index, shard.count)}; "
                  "the run that completes the set writes --out")
            return 0
        _announce(out)
        return 0
    slurm = slurm_config_from_args(args, slurm_overrides)
    if slurm.num_tasks > 1:
        raise UsageError(f"each fid-stats job is one process, not {slurm.num_tasks} (--nodes/--tasks): "
                         "spread the work with --shards N instead")
    from ..arrays import announce_and_wait

    shards = args.shards or 1
    sub = submit_fid_stats(request, shards=shards, slurm=slurm, cluster=args.cluster)
    rc, out = announce_and_wait("fid-stats", sub, f"{shards} task(s)", args.no_wait)
    if out is None:
        return rc
    _announce(Path(out))
    return 0


def _announce(out: Path) -> None:
    from sampling.fid_io import stats_metadata

    meta = stats_metadata(out)
    print(f"[fid-stats] {out}: {meta['n']} images of {meta['source']}, protocol {meta['protocol_name']} "
          f"({meta['protocol']}){', with features' if meta['features'] else ''}")

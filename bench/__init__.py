"""Benchmarks of the stack, each a ratio measured side by side in one process: ``python -m bench``.

What is measured (README, "Benchmarks", says what each number means and lists this machine's figures):

- ``encode.early_exit.*``: ``ALITTokenizer.encode`` at each budget (runs budget/T iterations) vs the public
  code's way (all iterations, then the budget's latents); ids checked equal.
- ``encode.adaptive_worst.*``: ``encode_adaptive`` when no image settles vs the public way (all iterations and a
  standard-layout pixel decode each), and over one full encode plus the decodes it needs; choice checked equal.
- ``decode.channels_last.*``: one pixel decode of the base decoder, standard layout / channels-last.
- ``finetune.t_plus_1.*``: a finetune step supervising iteration t with t+1 iterations vs all of them.
- ``ar.kv_cache.*``: AR sampling with vs without the KV cache; tokens checked equal.
- ``maskgit.images_per_s.*``: MaskGIT sampling (+ ALIT decode) images/s, a table per budget and step count.
- ``packing.*``: a mixed-budget MaskGIT batch packed vs padded to the longest budget; logits checked equal.
- ``fid.*``: Inception feature extraction per protocol, statistics updates, one Frechet distance.
- ``peak.*`` and ``flops.*``: dense matmul peak per precision, and the achieved FLOP/s of the tokenizer
  (distillation) and prior (MaskGIT) training steps as a fraction of it.
- ``bf16.*``: bf16 autocast vs fp32 speed-ups, and the output differences of the same model both ways.
- ``demo_stage.*``: every ``make demo`` training stage trained the same steps from the same seed in fp32 and in
  bf16 autocast: the bf16 speed-up and both held-out losses (what decides ``precision: auto`` per stage).
- ``data.*``: an image folder's first start (index built) vs second start (cached index), and DataLoader
  images/s with 0 and 2 workers, on a synthetic folder of 50,000 JPEGs under ``$ALIT_HOME/bench/data/``.
- ``cache.*``: peak RSS of loading a 200,000-image token cache memory-mapped vs as int64 (fresh processes).
- ``cuda.xformers_vs_sdpa.*``: on CUDA only (``n/a`` with the reason elsewhere).
- ``mfu.*``: the distill, finetune, MaskGIT and AR training steps' FLOP/s as a fraction of the bf16 matmul
  peak, and tokenization images/s (``mfu_bench``: public sizes on CUDA, the demo sizes on CPU).

The JSON report goes to ``$ALIT_HOME/bench/results/bench-<date>.json`` (never the source tree).
"""

from __future__ import annotations

import os

# Under CPU contention (a shared machine) libgomp's default wait policy makes every parallel op wait for
# descheduled threads: 2-thread runs were up to 30x slower than 1-thread ones here. PASSIVE threads sleep
# instead. Read once, when torch loads OpenMP, so it must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from tokenizer.alit import ALIT_SIZES
from tokenizer.core.paths import cache_dir

from . import cache_bench, stage_precision
from .models import TOKENIZER_SHAPES
from .report import SCHEMA, Report
from .timing import Settings

__all__ = ["GROUPS", "REQUIRED_KEYS", "SCHEMA", "Report", "Settings", "default_output", "required_keys", "run"]

GROUPS = ("encode", "finetune", "tokenizer_step", "bf16_tokenizer", "ar", "maskgit", "packing", "prior_step",
          "bf16_prior", "demo_stages", "fid", "data", "cache", "cuda", "mfu")  # --only choices (the matmul peak always runs)
SHAPES = tuple(TOKENIZER_SHAPES)


def _budgets(shape: str) -> list[int]:
    s = TOKENIZER_SHAPES[shape]
    fields = {**ALIT_SIZES[s.alit_size], **s.alit}
    return [fields["tokens_per_iter"] * (i + 1) for i in range(fields["num_iters"])]


def required_keys() -> tuple[str, ...]:
    """Every metric a full run reports (value ``None`` where not measurable here, e.g. CUDA on a CPU)."""
    keys = ["peak.fp32_gflops", "peak.bf16_gflops"]
    for shape in SHAPES:
        keys += [f"encode.early_exit.{shape}.b{b:04d}" for b in _budgets(shape)]
        keys += [f"encode.adaptive_worst.{shape}{s}" for s in ("", ".same_layout", ".over_parts")]
        keys += [f"decode.channels_last.{shape}"]
        keys += [f"encode.early_exit.{shape}.mean", f"finetune.t_plus_1.{shape}.mean",
                 f"flops.tokenizer_step.{shape}.fp32", f"flops.tokenizer_step.{shape}.bf16",
                 f"bf16.speedup.tokenizer_step.{shape}", f"bf16.speedup.encode.{shape}",
                 f"bf16.speedup.decode.{shape}", f"bf16.quality.encode_id_agreement.{shape}",
                 f"bf16.quality.decode_l1_diff.{shape}", f"bf16.quality.roundtrip_l1_delta.{shape}"]
    keys += ["flops.tokenizer_step.small_cpu.batch_gain", "ar.kv_cache.small", "ar.kv_cache.public",
             "maskgit.images_per_s.fp32", "maskgit.images_per_s.bf16", "bf16.speedup.maskgit_sampling",
             "packing.forward.b16", "packing.train_step.b16", "packing.forward.b64", "packing.train_step.b64",
             "packing.forward.public.b16", "packing.train_step.public.b16",
             "flops.prior_step.maskgit.fp32", "flops.prior_step.maskgit.bf16", "bf16.speedup.prior_step",
             "bf16.quality.maskgit_logit_maxabs", "bf16.quality.maskgit_argmax_agreement",
             "bf16.quality.ar_logit_maxabs", "bf16.quality.ar_argmax_agreement",
             "fid.features_per_s.torch_fidelity", "fid.features_per_s.clean_fid", "fid.stats_per_s",
             "fid.frechet_s", "fid.channels_last_speedup", "data.index.first_start_s", "data.index.second_start_s",
             "data.index.cached_speedup", "data.index.second_over_first", "data.loader.images_per_s.w0",
             "data.loader.images_per_s.w2", "cuda.xformers_vs_sdpa.dense", "cuda.xformers_vs_sdpa.padded",
             "cuda.xformers_vs_sdpa.packed"]
    keys += list(cache_bench.KEYS)
    keys += [f"mfu.{k}.bf16" for k in ("distill", "finetune", "maskgit", "ar")] + ["mfu.tokenize.images_per_s"]
    keys += list(stage_precision.KEYS)
    return tuple(keys)


REQUIRED_KEYS = required_keys()


def default_output(quick: bool = False, now: datetime | None = None) -> Path:
    """``$ALIT_HOME/bench/results/bench-<date>[-quick].json``."""
    stamp = (now or datetime.now()).strftime("%Y-%m-%d-%H%M%S")
    return cache_dir("bench") / "results" / f"bench-{stamp}{'-quick' if quick else ''}.json"


def _jobs(settings: Settings, flops: list[dict[str, Any]],
          refs: dict[str, Any]) -> list[tuple[str, str, Callable[[Report], None]]]:
    """(group, label, function) in running order."""
    from . import data_bench, fid_bench, hardware, prior_bench, tokenizer_bench
    from .mfu_bench import bench_mfu

    s = settings
    jobs: list[tuple[str, str, Callable[[Report], None]]] = []
    for shape in SHAPES:
        jobs += [
            ("encode", f"encode {shape}", lambda r, sh=shape: tokenizer_bench.bench_encode(s, r, sh)),
            ("encode", f"tokenize one pass {shape}", lambda r, sh=shape: tokenizer_bench.bench_one_pass(s, r, sh)),
            ("encode", f"encode_adaptive worst case {shape}",
             lambda r, sh=shape: tokenizer_bench.bench_adaptive_worst(s, r, sh)),
            ("finetune", f"finetune {shape}", lambda r, sh=shape: tokenizer_bench.bench_finetune(s, r, sh)),
            ("tokenizer_step", f"tokenizer step {shape}",
             lambda r, sh=shape: tokenizer_bench.bench_tokenizer_step(s, r, sh, flops, refs)),
            ("bf16_tokenizer", f"bf16 tokenizer {shape}",
             lambda r, sh=shape: tokenizer_bench.bench_bf16_tokenizer(s, r, sh)),
        ]
    jobs += [
        ("ar", "AR KV cache small", lambda r: prior_bench.bench_ar_cache(s, r, "small")),
        ("ar", "AR KV cache public layout", lambda r: prior_bench.bench_ar_cache(s, r, "public")),
        ("maskgit", "MaskGIT sampling", lambda r: prior_bench.bench_maskgit_sampling(s, r)),
        ("packing", "packing", lambda r: prior_bench.bench_packing(s, r)),
        ("prior_step", "prior step", lambda r: prior_bench.bench_prior_step(s, r, flops, refs)),
        ("bf16_prior", "bf16 priors", lambda r: prior_bench.bench_bf16_priors(s, r)),
        ("demo_stages", "demo stages fp32 vs bf16", lambda r: stage_precision.bench_demo_stages(s, r)),
        ("fid", "FID", lambda r: fid_bench.bench_fid(s, r)),
        ("data", "data path", lambda r: data_bench.bench_data(s, r)),
        ("cache", "token cache load", lambda r: cache_bench.bench_cache(s, r)),
        ("cuda", "CUDA attention", lambda r: hardware.bench_cuda_attention(s, r)),
        ("mfu", "MFU of the training steps", lambda r: bench_mfu(s, r)),
    ]
    return jobs


def run(settings: Settings, only: tuple[str, ...] | None = None, log: Callable[[str], None] | None = None) -> Report:
    """Run the benchmarks (all, or the groups in ``only``) and return the report (not yet written)."""
    from . import hardware

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    unknown = set(only or ()) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {sorted(unknown)}; choose from {list(GROUPS)}")
    if settings.torch_device.type == "cpu":
        torch.set_num_threads(settings.threads)
    settings_json = {**settings.__dict__, "only": list(only) if only else None,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    report = Report(settings.quick, settings_json)
    flops: list[dict[str, Any]] = []
    start = time.perf_counter()
    log(f"[bench] device {settings.device}, {settings.threads} threads, quick={settings.quick}")
    first_peak = hardware.matmul_peak(settings)
    refs = hardware.reference_matmuls(settings, first_peak)
    for group, label, fn in _jobs(settings, flops, refs):
        if only and group not in only:
            continue
        t0 = time.perf_counter()
        fn(report)
        log(f"[bench] {label}: {time.perf_counter() - t0:.1f} s")
    peak = hardware.record_peak(report, first_peak, hardware.matmul_peak(settings))
    for f in flops:  # against the peak matmul timed in the same rounds as the step (same load)
        achieved = f["flops"] / f["seconds"] / 1e9
        report.add(f["key"], achieved / f["peak_gflops"], "frac", hardware.GROUP_PEAK,
                   f"{f['what']}, {f['precision']}: achieved / {f['precision']} matmul peak",
                   note=f"{achieved:.1f} of {f['peak_gflops']:.0f} GFLOP/s", achieved_gflops=achieved,
                   peak_gflops_same_rounds=f["peak_gflops"], peak_gflops_run=peak[f["precision"]],
                   flops=f["flops"], seconds=f["seconds"], batch=f["batch"])
    report.wall_s = time.perf_counter() - start
    return report

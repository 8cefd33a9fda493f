"""``alit doctor``: what this environment runs, per device, and why.

For the process: Python, torch (its CUDA and cuDNN), xformers (version, the torch/CUDA its compiled
extension was built for, whether that extension loaded and the root cause when not) and which SDPA backends
are enabled. Then per device (``cpu`` and every CUDA device): the attention kernel the stack's
``attention`` will use there and why, the kernel SDPA picks, bf16 support, and a quick dense matmul rate in
fp32 and bf16 (skip with ``--no-measure``). On CPU it runs in about a second.

    alit doctor                 # the table
    alit doctor --json          # the same as one JSON object
    alit doctor --strict        # exit 1 when a CUDA device will not run xformers' kernels (a job's preflight)

The fix it names for a CUDA device without xformers kernels is ``requirements/cluster-cu128.txt``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch

from tokenizer.core.attention import CLUSTER_PINS, describe_backend
from tokenizer.core.errors import EXIT_FAILED
from tokenizer.core.xformers_info import xformers_status

MATMUL_SIZE = {"cpu": 512, "cuda": 4096}  # small enough for a second on CPU, large enough to fill a GPU


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``alit doctor`` options."""
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-measure", action="store_true", help="skip the quick matmul rates")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a CUDA device will run SDPA instead of xformers' kernels")


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, rounds: int = 3,
                  min_seconds: float = 0.15) -> float:
    """Best GFLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` on ``device``: after a warm-up, at least
    ``rounds`` calls and until ``min_seconds`` have passed (at most 50; the best call resists a busy machine)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    torch.mm(a, b)
    best = float("inf")
    start, done = time.perf_counter(), 0
    while done < rounds or (time.perf_counter() - start < min_seconds and done < 50):
        done += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sdpa_enabled() -> dict[str, bool]:
    """The process-wide SDPA backend switches (``torch.backends.cuda.*_sdp_enabled``)."""
    flags = {"flash": "flash_sdp_enabled", "efficient": "mem_efficient_sdp_enabled",
             "cudnn": "cudnn_sdp_enabled", "math": "math_sdp_enabled"}
    return {name: bool(getattr(torch.backends.cuda, fn)()) for name, fn in flags.items()
            if hasattr(torch.backends.cuda, fn)}


def device_report(device: torch.device, measure: bool) -> dict[str, Any]:
    """One device: identity, attention choice and reason, bf16, optional matmul rates."""
    choice = describe_backend(device)
    out: dict[str, Any] = {"device": choice.device, "attention": choice.backend, "why": choice.why,
                           "sdpa_kernel": choice.sdpa_kernel}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, capability=f"sm_{props.major}{props.minor}",
                   memory_GiB=round(props.total_memory / 2**30, 1), bf16=bool(torch.cuda.is_bf16_supported()))
        out["bf16_note"] = "bf16 autocast: supported" if out["bf16"] else "bf16 autocast: NOT supported"
    else:
        out.update(name=_cpu_name(), threads=torch.get_num_threads(),
                   capability=torch.backends.cpu.get_cpu_capability(), bf16=True)
        out["bf16_note"] = "bf16 autocast runs on any CPU; it pays only where bf16 matmuls beat fp32 (below)"
    if measure:
        n = MATMUL_SIZE[device.type]
        rates = {name: matmul_gflops(device, dtype, n) for name, dtype in
                 (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        out["matmul_gflops"] = {**{k: round(v, 1) for k, v in rates.items()}, "n": n}
        out["bf16_over_fp32"] = round(rates["bf16"] / rates["fp32"], 2)
    return out


def collect(measure: bool = True) -> dict[str, Any]:
    """Everything ``alit doctor`` prints, as a JSON-able dict."""
    xf = xformers_status()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    report: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "xformers": {**xf.__dict__, "summary": xf.summary()}, "sdpa_enabled": _sdpa_enabled(),
        "devices": [device_report(d, measure) for d in devices],
    }
    if xf.installed and not xf.extension_loaded:
        report["fix"] = (f"xformers' kernels need its extension: pip install -r {CLUSTER_PINS} in a fresh "
                         "environment (torch 2.10.0 on the CUDA 12.8 runtime, its torchvision, xformers 0.0.35), "
                         "then pip install --no-deps -e .")
    return report


def render(report: dict[str, Any]) -> str:
    """The human-readable table of :func:`collect`'s report."""
    cuda = f"CUDA {report['torch_cuda']}" if report["torch_cuda"] else "CPU-only build"
    lines = [f"python {report['python']}, torch {report['torch']} ({cuda}, cuDNN {report['cudnn']})",
             f"xformers: {report['xformers']['summary']}",
             "SDPA backends enabled: " + ", ".join(f"{k} {'on' if v else 'off'}"
                                                   for k, v in report["sdpa_enabled"].items())]
    if "fix" in report:
        lines.append(f"  fix: {report['fix']}")
    for d in report["devices"]:
        extra = f"{d['threads']} threads, {d['capability']}" if d["device"] == "cpu" else \
            f"{d['capability']}, {d['memory_GiB']} GiB"
        lines += [f"{d['device']}: {d['name']} ({extra})",
                  f"  attention: {d['attention']} (SDPA kernel there: {d['sdpa_kernel']}): {d['why']}",
                  f"  {d['bf16_note']}"]
        if "matmul_gflops" in d:
            m = d["matmul_gflops"]
            lines.append(f"  matmul {m['n']}^3: fp32 {m['fp32']:.1f} GFLOP/s, bf16 {m['bf16']:.1f} GFLOP/s "
                         f"(bf16/fp32 {d['bf16_over_fp32']:.2f}x)")
    if len(report["devices"]) == 1:
        lines.append("no CUDA device visible (torch.cuda.is_available() is False)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect(measure=not args.no_measure)
    print(json.dumps(report, indent=1) if args.json else render(report))
    slow = [d["device"] for d in report["devices"] if d["device"] != "cpu" and d["attention"] != "xformers"]
    if args.strict and slow:
        print(f"alit doctor: {', '.join(slow)} will run SDPA, not xformers (--strict); see {CLUSTER_PINS}",
              file=sys.stderr)
        return EXIT_FAILED
    return 0

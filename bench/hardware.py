"""What the machine can do: dense matmul peak per precision, and (CUDA only) xformers vs SDPA attention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from tokenizer.core.attention import attention, xformers_available, xformers_usable

from .report import Report
from .timing import Settings, compare, measure, ratio

GROUP_PEAK = "FLOP/s vs measured matmul peak"
GROUP_CUDA = "CUDA attention: xformers vs SDPA"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(settings: Settings) -> dict[str, dict[str, float]]:
    """Best GFLOP/s of square dense matmuls (``torch.mm`` and ``F.linear``) per precision.

    Returns ``{"fp32": {"gflops": ..., "size": ..., "op": ...}, "bf16": {...}}``. On CUDA, fp32 means
    true fp32 (torch's default: TF32 off for matmuls).
    """
    dev = settings.torch_device
    sizes = settings.pick([1024, 2048] if dev.type == "cpu" else [4096, 8192], [256])
    quick = replace(settings, repeats=settings.pick(5, 1), min_repeats=settings.pick(3, 1),
                    max_seconds=settings.pick(2.0, 0.0))
    out: dict[str, dict[str, float]] = {}
    for name, dtype in DTYPES.items():
        best = {"gflops": 0.0, "size": 0, "op": ""}
        for n in sizes:
            g = torch.Generator(device="cpu").manual_seed(settings.seed)
            a = torch.randn(n, n, generator=g).to(dev, dtype)
            b = torch.randn(n, n, generator=g).to(dev, dtype)
            for op, fn in (("mm", lambda a=a, b=b: torch.mm(a, b)), ("linear", lambda a=a, b=b: F.linear(a, b))):
                gflops = 2 * n ** 3 / measure(fn, quick).median / 1e9
                if gflops > best["gflops"]:
                    best = {"gflops": gflops, "size": n, "op": op}
        out[name] = best
    return out


@dataclass
class Reference:
    """A dense matmul at the peak's size and op, timed alongside a training step (see :func:`run`)."""

    fn: Callable[[], Any]
    flops: int


def reference_matmuls(settings: Settings, peak: dict[str, dict[str, float]]) -> dict[str, Reference]:
    """Per precision, the matmul that reached the peak, ready to be interleaved with a measured step:
    the fraction of peak then compares two timings taken in the same rounds, under the same load."""
    dev = settings.torch_device
    refs: dict[str, Reference] = {}
    for name, dtype in DTYPES.items():
        n, op = int(peak[name]["size"]), peak[name]["op"]
        g = torch.Generator(device="cpu").manual_seed(settings.seed)
        a = torch.randn(n, n, generator=g).to(dev, dtype)
        b = torch.randn(n, n, generator=g).to(dev, dtype)
        fn = (lambda a=a, b=b: torch.mm(a, b)) if op == "mm" else (lambda a=a, b=b: F.linear(a, b))
        refs[name] = Reference(fn, 2 * n ** 3)
    return refs


def record_peak(report: Report, first: dict[str, dict[str, float]], last: dict[str, dict[str, float]]) -> dict[str, float]:
    """Report the peak (the better of a measurement at the start and one at the end of the run)."""
    peak: dict[str, float] = {}
    for name in DTYPES:
        best = max(first[name]["gflops"], last[name]["gflops"])
        peak[name] = best
        report.add(f"peak.{name}_gflops", best, "GFLOP/s", GROUP_PEAK,
                   f"dense {name} matmul peak (best of square mm / F.linear, start and end of the run)",
                   start=first[name], end=last[name])
    return peak


# ============================================================================ CUDA: xformers vs SDPA
ATTN_CASES = ("dense", "padded", "packed")


def bench_cuda_attention(settings: Settings, report: Report) -> None:
    """bf16 attention through the project's ``attention`` with ``backend="xformers"`` vs ``"sdpa"``:
    a dense batch, a mixed-length padded batch (key mask) and the same sequences packed (seqlens)."""
    dev = settings.torch_device
    keys = {case: f"cuda.xformers_vs_sdpa.{case}" for case in ATTN_CASES}
    why = ""
    if dev.type != "cuda":
        why = "needs a CUDA device (this run is on CPU)"
    elif not xformers_available():
        why = "xformers is not installed"
    elif not xformers_usable(dev):
        why = "xformers imports but has no kernels for this GPU/torch (SDPA is used)"
    if not why:
        try:
            _cuda_attention(settings, report, keys)
            return
        except Exception as e:  # an xformers build that does not match torch fails at its first kernel
            why = f"xformers failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            for key in keys.values():
                report.metrics.pop(key, None)
    for case, key in keys.items():
        report.add(key, None, "x", GROUP_CUDA, f"{case} attention: SDPA time / xformers time", note=why)


def _cuda_attention(settings: Settings, report: Report, keys: dict[str, str]) -> None:
    dev = settings.torch_device
    b, h, d = settings.pick((64, 12, 64), (4, 4, 32))
    budgets = torch.tensor([32 * (i % 8 + 1) + 2 for i in range(b)])  # 2 prefix tokens + a budget
    n = int(budgets.max())
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dev, torch.bfloat16) for _ in range(3))
    key_mask = (torch.arange(n)[None] < budgets[:, None]).to(dev)
    total = int(budgets.sum())
    qp, kp, vp = (torch.randn(1, h, total, d, generator=g).to(dev, torch.bfloat16) for _ in range(3))
    seqlens = budgets.tolist()
    cases = {
        "dense": lambda backend: attention(q, k, v, backend=backend),
        "padded": lambda backend: attention(q, k, v, key_mask=key_mask, backend=backend),
        "packed": lambda backend: attention(qp, kp, vp, seqlens=seqlens, backend=backend),
    }
    for case, fn in cases.items():
        with torch.no_grad():
            diff = None
            if case != "packed":
                diff = float((fn("xformers").float() - fn("sdpa").float()).abs().max())
            tim = compare({"xformers": lambda f=fn: f("xformers"), "sdpa": lambda f=fn: f("sdpa")}, settings)
        report.add(keys[case], ratio(tim["sdpa"], tim["xformers"]), "x", GROUP_CUDA,
                   f"{case} bf16 attention, B={b} H={h} D={d}, lengths {min(seqlens)}..{n}: SDPA / xformers",
                   max_abs_diff=diff, xformers=tim["xformers"].to_json(), sdpa=tim["sdpa"].to_json())

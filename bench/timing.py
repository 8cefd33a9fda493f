"""Timing primitives of the benchmarks: interleaved side-by-side comparisons, medians, FLOP counting.

Every ratio in the report compares two (or more) ways of doing one job *in the same process, in
alternating order*: each repeat runs every side once (the order flips on every repeat, so a side never
always runs first, e.g. right after a slow neighbour), and each side's time is the median of its repeats.
On a machine shared with other jobs the absolute times drift; the drift hits both sides of a repeat
alike, so the ratio of medians is what the report trusts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Settings:
    """How hard to measure (``quick`` = the smoke-test sizes: one repeat, no warm-up, tiny batches)."""

    quick: bool = False  # smoke-test mode: tiny batches, one repeat; every metric still reported
    device: str = "cpu"  # torch device of every model and input
    threads: int = 2  # torch.set_num_threads on CPU
    warmup: int = 1  # untimed calls of every side before timing
    repeats: int = 5  # timed rounds (every side once per round), at most
    min_repeats: int = 3  # rounds always run, whatever max_seconds says
    max_seconds: float = 3.0  # stop adding rounds to one comparison after this many seconds
    seed: int = 0  # seed of every model initialisation and input

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.repeats < 1 or self.min_repeats < 1 or self.warmup < 0:
            raise ValueError(f"need repeats >= 1, min_repeats >= 1, warmup >= 0; got {self.repeats}, "
                             f"{self.min_repeats}, {self.warmup}")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0, got {self.max_seconds}")

    @classmethod
    def quick_settings(cls, device: str = "cpu", threads: int = 2) -> Settings:
        """The smoke-test settings: everything runs once, nothing is warmed up."""
        return cls(quick=True, device=device, threads=threads, warmup=0, repeats=1, min_repeats=1,
                   max_seconds=0.0)

    def pick(self, full: Any, quick: Any) -> Any:
        """``quick`` in quick mode, else ``full`` (batch sizes, lists of budgets...)."""
        return quick if self.quick else full

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels (CUDA); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes (queued device work included), and what it returned."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


@dataclass
class Timing:
    """The timed repeats of one side of a comparison."""

    samples: list[float] = field(default_factory=list)  # seconds, in the order they were taken
    result: Any = None  # what the last timed call returned (for the checks that ride along)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy this side was."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": min(self.samples), "n": len(self.samples),
                "spread": round(self.spread, 3)}


def compare(sides: Mapping[str, Callable[[], Any]], settings: Settings) -> dict[str, Timing]:
    """Time every side ``settings.repeats`` times, interleaved (see the module docstring).

    Stops early, after at least ``min_repeats`` rounds, once ``max_seconds`` have passed.
    """
    if not sides:
        raise ValueError("compare needs at least one side")
    device = settings.torch_device
    for _ in range(settings.warmup):
        for fn in sides.values():
            fn()
    names = list(sides)
    timings = {name: Timing() for name in names}
    start = time.perf_counter()
    for r in range(settings.repeats):
        for name in names if r % 2 == 0 else reversed(names):
            seconds, timings[name].result = time_call(sides[name], device)
            timings[name].samples.append(seconds)
        if r + 1 >= settings.min_repeats and time.perf_counter() - start > settings.max_seconds:
            break
    return timings


def measure(fn: Callable[[], Any], settings: Settings) -> Timing:
    """One side alone (rates such as images/s)."""
    return compare({"only": fn}, settings)["only"]


def ratio(baseline: Timing, candidate: Timing) -> float:
    """Speed-up of ``candidate`` over ``baseline``: median baseline time / median candidate time."""
    return baseline.median / candidate.median


# ============================================================================ FLOPs
def _sdpa_flops(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> int:
    """Q K^T and P V of a dense attention: 2 matmuls of B*H*Lq*Lk*D multiply-adds each."""
    *batch, lq, d = q_shape
    lk, dv = k_shape[-2], v_shape[-1]
    b = 1
    for n in batch:
        b *= n
    return 2 * b * lq * lk * d + 2 * b * lq * lk * dv


def _cpu_sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_flops(query, key, value)  # dQ, dK, dV, dP: four matmuls of the same size


def _custom_flop_formulas() -> dict[Any, Callable[..., int]]:
    """torch's FLOP counter misses the CPU attention kernel: count it as dense attention."""
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_forward
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return formulas


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (matmuls, convolutions, attention; a multiply-add
    is 2), counted by ``torch.utils.flop_counter`` plus the CPU attention kernel it does not know."""
    with FlopCounterMode(display=False, custom_mapping=_custom_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())

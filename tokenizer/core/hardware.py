"""Does bf16 pay on this CPU? Measured once per machine and cached, so ``precision: auto`` can decide.

On CUDA, bf16 autocast is always the fast path. On a CPU it depends on the silicon: with AVX512-BF16 or
AMX (Zen 4/5, Sapphire Rapids and later) oneDNN runs bf16 matmuls and convolutions natively, several times
the fp32 rate; without them bf16 is emulated and several times *slower* than fp32 (seen: AMD Zen 3, 17 vs
102 GFLOP/s). So ``auto`` on a CPU means bf16 only where the CPU has the instructions **and** a measured
bf16 matmul beats fp32 by :data:`MIN_SPEEDUP`::

    from tokenizer.core.hardware import cpu_bf16_pays, cpu_bf16_probe
    cpu_bf16_pays()            # True / False (cached in $ALIT_HOME/hardware/)
    cpu_bf16_probe().speedup   # e.g. 3.9 on a Zen 5 core, 0.17 on Zen 3

``ALIT_CPU_BF16=on|off|auto`` overrides the decision (the test suite pins ``off``: its reference numbers
are fp32, and fp32 results do not depend on the CPU's bf16 support).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .paths import alit_home

MIN_SPEEDUP = 1.3  # bf16 must beat fp32 matmuls by this factor to be chosen (autocast casts cost something)
ENV = "ALIT_CPU_BF16"
PROBE_VERSION = 1  # part of the cache key: bump when the measurement changes


@dataclass(frozen=True)
class BF16Probe:
    """One measurement of the CPU's dense matmul rates (GFLOP/s) in fp32 and bf16."""

    cpu: str  # model name from /proc/cpuinfo (or platform.processor())
    native: bool  # the CPU has AVX512-BF16 or AMX-BF16
    threads: int  # torch intra-op threads during the measurement
    fp32_gflops: float
    bf16_gflops: float
    torch: str

    @property
    def speedup(self) -> float:
        """bf16 rate / fp32 rate."""
        return self.bf16_gflops / self.fp32_gflops if self.fp32_gflops > 0 else 0.0


def _cpuinfo() -> tuple[str, set[str]]:
    """CPU model name and flags (Linux); elsewhere the platform's name and no flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


def cpu_has_native_bf16() -> bool:
    """Whether the CPU executes bf16 dot products natively (AVX512-BF16 or AMX-BF16 flags)."""
    _, flags = _cpuinfo()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _gflops(dtype: torch.dtype, n: int = 1024, min_seconds: float = 0.25) -> float:
    """Best-of-rounds GFLOP/s of an (n x n) @ (n x n) matmul in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up (oneDNN primitive creation)
    best = float("inf")
    start = time.perf_counter()
    rounds = 0
    while rounds < 3 or (time.perf_counter() - start < min_seconds and rounds < 50):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
        rounds += 1
    return 2 * n ** 3 / best / 1e9


def _cache_path(cpu: str, native: bool, threads: int) -> Path:
    key = json.dumps([PROBE_VERSION, cpu, native, threads, torch.__version__])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return alit_home() / "hardware" / f"cpu-bf16-{digest}.json"


def cpu_bf16_probe(refresh: bool = False) -> BF16Probe:
    """The measured fp32 and bf16 matmul rates of this CPU at the current thread count (cached).

    Without native bf16 instructions nothing is measured (bf16 is emulated there: never faster).
    """
    cpu, flags = _cpuinfo()
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    threads = torch.get_num_threads()
    path = _cache_path(cpu, native, threads)
    if not refresh and path.is_file():
        try:
            data = json.loads(path.read_text())
            return BF16Probe(**data)
        except (OSError, ValueError, TypeError):
            pass  # a damaged cache entry is measured again
    if native:
        probe = BF16Probe(cpu, native, threads, _gflops(torch.float32), _gflops(torch.bfloat16), torch.__version__)
    else:
        probe = BF16Probe(cpu, native, threads, 0.0, 0.0, torch.__version__)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(probe), indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: decide from the measurement without caching it
    return probe


def cpu_bf16_pays() -> bool:
    """Whether ``precision: auto`` trains in bf16 on this CPU (see the module docstring)."""
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice in ("on", "1", "true", "bf16"):
        return True
    if choice in ("off", "0", "false", "fp32"):
        return False
    if choice != "auto":
        raise ValueError(f"{ENV}={choice!r} is unknown: use on, off or auto")
    probe = cpu_bf16_probe()
    return probe.native and probe.speedup >= MIN_SPEEDUP

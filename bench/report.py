"""The benchmark report: named metrics, correctness checks, the printed table and the JSON file.

JSON layout (``SCHEMA``)::

    {"schema": "alit-bench/1", "created": ISO time, "quick": bool, "wall_s": float,
     "machine": {"device", "device_name", "threads", "torch", "python", "platform", "cpu"},
     "settings": {...},
     "metrics": {key: {"value": float | null, "unit": str, "group": str, "what": str, "note": str,
                       "details": {...}}},
     "checks": {name: {"ok": bool, "detail": str}},
     "tables": {name: {"columns": [...], "rows": [[...], ...]}}}

A metric whose value is ``null`` was not measurable here (``note`` says why, e.g. the xformers ratio on
a CPU-only machine). Units: ``x`` a speed-up ratio (> 1 = the project's way is faster), ``frac`` a
fraction, ``img/s`` a rate, ``GFLOP/s``, ``agree`` a share of equal outputs, ``abs`` an absolute difference.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

SCHEMA = "alit-bench/1"


@dataclass
class Metric:
    """One reported number."""

    key: str  # dotted name, e.g. "encode.early_exit.small_cpu.mean"
    value: float | None  # None: not measurable on this machine (see note)
    unit: str  # x | frac | img/s | GFLOP/s | agree | abs | ms
    group: str  # the benchmark that produced it
    what: str  # one line: what the number means
    note: str = ""  # caveats, or why value is None
    details: dict[str, Any] = field(default_factory=dict)  # timings and sizes behind the number

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit, "group": self.group, "what": self.what,
                "note": self.note, "details": self.details}


@dataclass
class Report:
    """What one benchmark run produced (metrics in insertion order)."""

    quick: bool
    settings: dict[str, Any]
    metrics: dict[str, Metric] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))
    wall_s: float = 0.0

    def add(self, key: str, value: float | None, unit: str, group: str, what: str, note: str = "",
            **details: Any) -> Metric:
        """Record a metric (a key may be recorded once)."""
        if key in self.metrics:
            raise ValueError(f"metric {key!r} recorded twice")
        if value is not None:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"metric {key!r} is not finite ({value})")
        metric = Metric(key, value, unit, group, what, note, _jsonable(details))
        self.metrics[key] = metric
        return metric

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        """Record a correctness check that rides along with a benchmark (e.g. equal ids both ways)."""
        self.checks[name] = {"ok": bool(ok), "detail": detail}

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A detail table (e.g. MaskGIT images/s per budget and step count)."""
        self.tables[name] = {"columns": columns, "rows": _jsonable(rows)}

    # ------------------------------------------------------------------ output
    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "created": self.created, "quick": self.quick, "wall_s": round(self.wall_s, 1),
                "machine": machine_info(self.settings.get("device", "cpu"), self.settings.get("threads")),
                "settings": self.settings,
                "metrics": {k: m.to_json() for k, m in self.metrics.items()},
                "checks": self.checks, "tables": self.tables}

    def write(self, path: Path) -> Path:
        """Write the JSON report (parents created)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    def render(self) -> str:
        """The printed report: one aligned table of metrics per group, the detail tables, the checks."""
        lines: list[str] = []
        groups: dict[str, list[Metric]] = {}
        for m in self.metrics.values():
            groups.setdefault(m.group, []).append(m)
        key_w = max((len(m.key) for m in self.metrics.values()), default=10)
        for group, metrics in groups.items():
            lines.append(f"== {group}")
            for m in metrics:
                note = f"  [{m.note}]" if m.note else ""
                lines.append(f"  {m.key:<{key_w}}  {format_value(m.value, m.unit):>12} {m.unit:<7} {m.what}{note}")
        for name, tab in self.tables.items():
            lines.append(f"== table: {name}")
            lines.extend("  " + line for line in format_table(tab["columns"], tab["rows"]))
        if self.checks:
            lines.append("== checks")
            for name, c in self.checks.items():
                lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {name}: {c['detail']}")
        lines.append(f"== {len(self.metrics)} metrics in {self.wall_s:.0f} s"
                     + (" (quick mode: sizes too small for the numbers to mean anything)" if self.quick else ""))
        return "\n".join(lines)


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit in ("x",):
        return f"{value:.2f}"
    if unit in ("frac", "agree"):
        return f"{value:.3f}"
    if unit == "abs":
        return f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:.4f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def format_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(c) for c in columns]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _jsonable(obj: Any) -> Any:
    """Floats rounded to 6 significant digits, tuples as lists, tensors as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    return obj


def machine_info(device: str, threads: int | None) -> dict[str, Any]:
    """Where the numbers were measured."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {"device": str(dev), "device_name": name, "threads": threads if dev.type == "cpu" else None,
            "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

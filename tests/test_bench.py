"""The benchmark harness (bench/): the command end to end at smoke-test sizes, its JSON schema, and the
timing/FLOP/report primitives. No timing assertions: the numbers of a quick run mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import REQUIRED_KEYS, SCHEMA, default_output
from bench.report import Report
from bench.timing import Settings, compare, count_flops

ROOT = Path(__file__).resolve().parents[1]
UNITS = {"x", "frac", "img/s", "GFLOP/s", "agree", "abs", "s"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """``python -m bench --quick`` in a fresh process with its own ALIT_HOME (default output path)."""
    home = tmp_path_factory.mktemp("bench_home")
    env = {**os.environ, "ALIT_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    files = sorted((home / "bench" / "results").glob("bench-*-quick.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(files) == 1, f"expected one report under {home}/bench/results, found {files}"
    return proc, json.loads(files[0].read_text()), home


def test_quick_run_reports_every_metric(quick_run) -> None:
    proc, data, _ = quick_run
    assert data["schema"] == SCHEMA and data["quick"] is True
    assert set(data) >= {"created", "wall_s", "machine", "settings", "metrics", "checks", "tables"}
    assert data["machine"]["device"] == "cpu" and data["machine"]["threads"] == 2
    assert data["settings"]["omp_wait_policy"]  # set before torch loaded OpenMP
    missing = [k for k in REQUIRED_KEYS if k not in data["metrics"]]
    assert not missing, f"metrics missing from the report: {missing}"
    for key, m in data["metrics"].items():
        assert set(m) == {"value", "unit", "group", "what", "note", "details"}, key
        assert m["unit"] in UNITS, (key, m["unit"])
        assert m["what"], key
        if key.startswith("cuda."):  # CPU run: not measurable, and it says why
            assert m["value"] is None and "CUDA" in m["note"], (key, m)
        else:
            assert isinstance(m["value"], float), (key, m["value"])
        if m["unit"] in ("x", "img/s", "GFLOP/s", "frac"):
            assert m["value"] is None or m["value"] > 0, (key, m["value"])
        if m["unit"] == "agree":
            assert 0.0 <= m["value"] <= 1.0, (key, m["value"])
    # every ratio is printed, with its value
    for key in REQUIRED_KEYS:
        assert f"  {key} " in proc.stdout, f"{key} not printed"
    assert "FAIL" not in proc.stdout


def test_quick_run_checks_and_tables(quick_run) -> None:
    _, data, _ = quick_run
    checks = data["checks"]
    for name in ("encode.small_cpu.same_ids", "encode.public_shape.same_ids", "finetune.small_cpu.same_output",
                 "ar_cache.small.same_tokens", "packing.b64.same_logits"):
        assert checks[name]["ok"], (name, checks[name])
    assert all(c["ok"] for c in checks.values()), checks
    tables = data["tables"]
    maskgit = next(t for name, t in tables.items() if name.startswith("MaskGIT sampling"))
    assert maskgit["columns"] == ["budget", "steps", "fp32", "fp32+dec", "bf16", "bf16+dec"]
    assert {row[0] for row in maskgit["rows"]} == {8, 32}
    # per-budget encode ratios: one per budget, iterations = budget / T
    small = data["metrics"]["encode.early_exit.small_cpu.b0016"]["what"]
    assert "2 of 4 iterations" in small
    assert not list(ROOT.glob("bench-*.json")) and not list((ROOT / "bench").glob("*.json"))
    assert str(default_output()).startswith(os.environ["ALIT_HOME"])  # the test session's home


def test_compare_interleaves_and_stops_early() -> None:
    calls: list[str] = []
    s = Settings(warmup=1, repeats=4, min_repeats=4, max_seconds=100.0)
    tim = compare({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, s)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then alternating order
    assert len(tim["a"].samples) == 4 and tim["a"].result == 1 and tim["b"].result == 2
    calls.clear()
    s = Settings(warmup=0, repeats=50, min_repeats=2, max_seconds=0.0)
    tim = compare({"a": lambda: calls.append("a")}, s)
    assert len(tim["a"].samples) == 2  # past max_seconds once min_repeats are done


def test_count_flops_includes_cpu_attention() -> None:
    x = torch.randn(3, 5, 8)
    lin = torch.nn.Linear(8, 16)
    assert count_flops(lambda: lin(x)) == 2 * 3 * 5 * 8 * 16
    q = torch.randn(2, 4, 10, 8)  # (B, H, L, D)
    sdpa = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert sdpa == 4 * 2 * 4 * 10 * 10 * 8  # Q K^T and P V, torch's counter alone reports 0 here


def test_report_rejects_bad_metrics(tmp_path: Path) -> None:
    r = Report(quick=True, settings={"device": "cpu", "threads": 2})
    r.add("a.ratio", 2.0, "x", "g", "a ratio")
    with pytest.raises(ValueError, match="twice"):
        r.add("a.ratio", 3.0, "x", "g", "again")
    with pytest.raises(ValueError, match="not finite"):
        r.add("b", float("nan"), "x", "g", "nan")
    r.add("c", None, "x", "g", "n/a here", note="needs CUDA")
    text = r.render()
    assert "a.ratio" in text and "2.00" in text and "n/a" in text
    data = json.loads(r.write(tmp_path / "r.json").read_text())
    assert data["metrics"]["c"]["value"] is None and data["metrics"]["a.ratio"]["value"] == 2.0

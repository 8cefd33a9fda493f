"""``alit doctor`` and the xformers status behind it: per-device attention choice and reason, the xformers
build read from its own metadata, the import-time warning kept quiet (but not lost), the cluster pin set."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from slurm.cli import main
from slurm.commands import doctor
from tokenizer.core.attention import CLUSTER_PINS, describe_backend
from tokenizer.core.xformers_info import WARNING_PREFIX, _root_cause, quiet_import_warning, xformers_status

ROOT = Path(__file__).resolve().parents[1]
SDPA_KERNELS = {"flash_attention", "efficient_attention", "math", "cudnn_attention", "overrideable"}


def test_collect_reports_cpu_choice_and_rates() -> None:
    report = doctor.collect(measure=True)
    assert report["torch"] == torch.__version__
    cpu = report["devices"][0]
    assert cpu["device"] == "cpu" and cpu["attention"] == "sdpa" and "CUDA-only" in cpu["why"]
    assert cpu["sdpa_kernel"] in SDPA_KERNELS
    assert cpu["matmul_gflops"]["fp32"] > 0 and cpu["matmul_gflops"]["bf16"] > 0
    assert len(report["devices"]) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(report["sdpa_enabled"]) >= {"flash", "efficient", "math"}


def test_xformers_status_matches_xformers_itself() -> None:
    status = xformers_status()
    try:
        version = importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:
        assert not status.installed and "not installed" in status.summary()
        return
    import xformers
    import xformers._cpp_lib as cpp_lib

    assert status.version == version == xformers.__version__
    built = json.loads((Path(xformers.__file__).parent / "cpp_lib.json").read_text())["version"]
    assert status.built_for_torch == built["torch"]
    assert status.built_for_cuda == f"{built['cuda'] // 100}.{built['cuda'] % 100}"
    loaded = cpp_lib._cpp_library_load_exception is None
    assert status.extension_loaded == loaded and (status.reason is None) == loaded
    if not loaded:  # the innermost cause, not xformers' generic "can't load C++/CUDA extensions"
        assert "can't load" not in status.reason and status.reason in status.summary()


def test_root_cause_walks_the_cause_chain() -> None:
    try:
        try:
            raise OSError("libcudart.so.12: cannot open shared object file")
        except OSError as inner:
            raise RuntimeError("Could not load this library") from inner
    except RuntimeError as outer:
        assert _root_cause(outer) == "OSError: libcudart.so.12: cannot open shared object file"


def test_import_warning_is_filtered_other_xformers_logs_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XFORMERS_MORE_DETAILS", raising=False)
    quiet_import_warning()
    quiet_import_warning()  # idempotent: one filter
    logger = logging.getLogger("xformers")
    assert sum(type(f).__name__ == "_ImportWarningFilter" for f in logger.filters) == 1
    # `alit` (slurm.cli) raises the logger to ERROR for the whole process; the filter is what is tested here
    old_level = logger.level
    logger.setLevel(logging.WARNING)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning(f"{WARNING_PREFIX}: xFormers can't load C++/CUDA extensions.")
        logger.warning("Flash-Attention 3 package can't be used: reason")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert seen == ["Flash-Attention 3 package can't be used: reason"]


def test_importing_the_base_vq_prints_no_xformers_warning() -> None:
    """diffusers imports xformers at import time; the stack's import must not print its warning."""
    env = {k: v for k, v in os.environ.items() if k != "XFORMERS_MORE_DETAILS"}
    proc = subprocess.run([sys.executable, "-c", "import tokenizer.vq, sys; print('xformers' in sys.modules)"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert WARNING_PREFIX not in proc.stderr, proc.stderr[-2000:]


def test_cli_table_json_and_strict(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["doctor", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "xformers:" in out and "cpu:" in out and "attention: sdpa" in out and "GFLOP/s" not in out
    assert main(["doctor", "--no-measure", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["devices"][0]["attention"] == describe_backend("cpu").backend == "sdpa"
    if data["xformers"]["installed"] and not data["xformers"]["extension_loaded"]:
        assert CLUSTER_PINS in data["fix"]
    assert main(["doctor", "--no-measure", "--strict"]) == (0 if data["devices"][1:] == [] or all(
        d["attention"] == "xformers" for d in data["devices"][1:]) else 1)
    capsys.readouterr()
    # --strict fails a job whose GPU would run SDPA
    fake = {**data, "devices": [*data["devices"], {"device": "cuda:0", "attention": "sdpa"}]}
    monkeypatch.setattr(doctor, "collect", lambda measure=True: fake)
    monkeypatch.setattr(doctor, "render", lambda report: "table")
    assert main(["doctor", "--strict"]) == 1
    assert "cuda:0 will run SDPA" in capsys.readouterr().err
    assert main(["doctor"]) == 0


def test_cluster_pins_are_the_default_dependencies_but_torch() -> None:
    """requirements/cluster-cu128.txt = pyproject's dependencies with torch, torchvision, xformers re-pinned."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.strip() for ln in (ROOT / CLUSTER_PINS).read_text().splitlines()]
    pins = [ln for ln in lines if ln and not ln.startswith("#")]
    assert pins[:3] == ["torch==2.10.0", "torchvision==0.25.0", "xformers==0.0.35"]
    repinned = ("torch==", "torchvision==", "xformers==")
    assert pins[3:] == [d for d in deps if not d.startswith(repinned)]

"""scripts/gpu_check.py runs here too (``--device cpu``): the GPU smoke check cannot rot between GPU sessions.

On CPU the attention check compares SDPA with itself and the ALIT step uses ``small_cpu``; the point is that
every check's code path runs and records its figures (the CUDA figures come from a GPU run, see README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--out", str(tmp_path),
                           "--skip", "trainer"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["env"]["device"] == "cpu"
    assert set(result) == {"env", "attention", "alit_public_step", "bf16_vs_fp32_ids"}
    assert all(result[name]["ok"] for name in ("attention", "alit_public_step", "bf16_vs_fp32_ids"))
    step = result["alit_public_step"]
    assert step["finite"] and step["ids_ok"] and sorted(int(b) for b in step["encode_ms"]) == [8, 16, 24, 32]
    assert 0.5 < result["bf16_vs_fp32_ids"]["equal_ids"] <= 1.0


def test_gpu_check_refuses_cuda_without_gpu(tmp_path: Path) -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check runs for real there")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device cpu" in proc.stderr

"""scripts/gpu_check.py runs here too (``--device cpu``): the GPU smoke check cannot rot between GPU sessions.

On CPU the attention check compares SDPA with itself and the ALIT step uses ``small_cpu``; the point is that
every check's code path runs and records its figures (the CUDA figures come from a GPU run, see README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--out", str(tmp_path),
                           "--skip", "trainer,cost_model"], cwd=ROOT, capture_output=True, text=True, timeout=300)
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


def test_recipe_hours_follow_the_configs() -> None:
    """GPU-hours = the recipe's images (steps x global batch from its config) / the measured rate."""
    import yaml

    from bench.mfu_bench import IMAGENET1K_TRAIN, IMAGENET100_TRAIN, StepCost, recipe_hours, render_hours

    def cost(kind: str, items: int, seconds: float) -> StepCost:
        return StepCost(kind, f"{kind} step", items, flops=10**12, seconds=seconds, peak_gflops=1000.0)

    result = {"steps": {"distill": cost("distill", 32, 1.0), "finetune": cost("finetune", 96, 8.0),
                        "maskgit": cost("maskgit", 256, 0.5)},
              "tokenize": {"all_budgets": {**cost("tokenize", 64, 0.25).to_json()}, "per_budget_images_per_s": {32: 1.0}},
              "errors": {}, "prior_sizes": {"maskgit": "maskgit_b"}, "budgets": [32, 256], "scale": "public",
              "scale_what": "test", "peak_bf16_gflops": 1000.0}
    rows = {r["recipe"]: r for r in recipe_hours(result)}
    train = yaml.safe_load((ROOT / "configs/tokenizer/distill_imagenet_gpu.yaml").read_text())["train"]
    d100 = rows["tokenizer stage 1 (distill), ImageNet-100"]
    assert abs(d100["gpu_hours"] - train["max_steps"] * train["global_batch"] / 32 / 3600) < 1e-6
    d1k = rows["tokenizer stage 1 (distill), ImageNet-1K"]
    assert abs(d1k["gpu_hours"] / d100["gpu_hours"] - IMAGENET1K_TRAIN / IMAGENET100_TRAIN) < 1e-9
    ft = yaml.safe_load((ROOT / "configs/tokenizer/finetune_imagenet_gpu.yaml").read_text())["train"]
    assert abs(rows["tokenizer stage 2 (finetune), ImageNet-100"]["gpu_hours"]
               - ft["max_steps"] * ft["global_batch"] / 12 / 3600) < 1e-6
    prior = yaml.safe_load((ROOT / "configs/prior/maskgit_imagenet_gpu.yaml").read_text())["train"]
    assert abs(rows["MaskGIT prior (maskgit_b), ImageNet-1K tokens"]["gpu_hours"]
               - prior["max_steps"] * prior["global_batch"] / 512 / 3600) < 1e-6
    assert abs(rows["alit tokenize (every budget), ImageNet-1K"]["gpu_hours"] - IMAGENET1K_TRAIN / 256 / 3600) < 1e-9
    assert all(r["assumes"] for r in rows.values())
    table = render_hours(result, list(rows.values()))
    assert "MFU" in table and "12.5%" in table  # the finetune cycle: 1 TFLOP in 8 s of a 1 TFLOP/s peak
    assert all(r["assumes"] in table for r in rows.values())


@pytest.mark.slow
def test_cost_model_runs_on_cpu(tmp_path: Path) -> None:
    """The GPU cost model's code on CPU at the demo sizes: every step measured, FLOPs counted, the table."""
    skip = "attention,alit_public_step,bf16_vs_fp32_ids,trainer"
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--out", str(tmp_path),
                           "--skip", skip], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cost = json.loads((tmp_path / "gpu_check.json").read_text())["cost_model"]
    assert cost["ok"] and cost["scale"] == "tiny" and not cost["errors"]
    assert set(cost["steps"]) == {"distill", "finetune", "maskgit", "ar"}
    for step in cost["steps"].values():
        assert step["flops"] > 0 and step["items_per_s"] > 0
        assert abs(step["mfu"] - step["flops"] / step["seconds"] / 1e9 / step["peak_gflops"]) < 1e-9
    assert sorted(int(b) for b in cost["tokenize"]["per_budget_images_per_s"]) == [8, 16, 24, 32]
    table = (tmp_path / "cost_model.md").read_text()
    assert "GPU-hours" in table and "ImageNet-1K" in table and "MaskGIT prior" in table
    for row in cost["recipes"]:
        assert row["gpu_hours"] > 0 and row["assumes"] in table

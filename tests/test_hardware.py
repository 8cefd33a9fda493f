"""``precision: auto`` on a CPU: bf16 only where the CPU has the instructions and a measured matmul pays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_trainer import RegressionTask, _cfg, _data
from tokenizer.core import hardware
from tokenizer.core.trainer import Trainer


@pytest.fixture
def fake_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A CPU with chosen flags and matmul rates, a fresh ALIT_HOME, and a count of the measurements."""
    monkeypatch.setenv("ALIT_HOME", str(tmp_path))
    monkeypatch.setenv(hardware.ENV, "auto")
    calls: list[torch.dtype] = []

    def make(flags: set[str], fp32: float, bf16: float, name: str = "Test CPU") -> list[torch.dtype]:
        monkeypatch.setattr(hardware, "_cpuinfo", lambda: (name, flags))

        def gflops(dtype: torch.dtype, n: int = 1024, min_seconds: float = 0.25) -> float:
            calls.append(dtype)
            return bf16 if dtype == torch.bfloat16 else fp32

        monkeypatch.setattr(hardware, "_gflops", gflops)
        return calls

    return make


def test_native_and_faster_bf16_is_chosen_and_the_measurement_cached(fake_cpu, tmp_path: Path) -> None:
    calls = fake_cpu({"avx2", "avx512_bf16"}, fp32=200.0, bf16=800.0)
    assert hardware.cpu_bf16_pays()
    assert calls == [torch.float32, torch.bfloat16]
    files = list((tmp_path / "hardware").glob("cpu-bf16-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["bf16_gflops"] == 800.0
    assert hardware.cpu_bf16_pays() and hardware.cpu_bf16_probe().speedup == 4.0
    assert len(calls) == 2  # read from the cache, not measured again


def test_emulated_bf16_is_never_measured_or_chosen(fake_cpu) -> None:
    calls = fake_cpu({"avx2", "fma"}, fp32=100.0, bf16=500.0)  # rates would say yes: the flags say no
    assert not hardware.cpu_bf16_pays()
    assert calls == []


def test_native_but_not_faster_enough_stays_fp32(fake_cpu) -> None:
    fake_cpu({"amx_bf16"}, fp32=200.0, bf16=200.0 * (hardware.MIN_SPEEDUP - 0.1))
    assert not hardware.cpu_bf16_pays()


def test_a_damaged_cache_entry_is_measured_again(fake_cpu) -> None:
    calls = fake_cpu({"avx512_bf16"}, fp32=100.0, bf16=300.0)
    probe = hardware.cpu_bf16_probe()
    hardware._cache_path(probe.cpu, probe.native, probe.threads).write_text("{not json")
    assert hardware.cpu_bf16_pays() and len(calls) == 4


def test_the_environment_overrides_and_a_bad_value_is_named(fake_cpu, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_cpu({"avx2"}, fp32=100.0, bf16=10.0)
    monkeypatch.setenv(hardware.ENV, "on")
    assert hardware.cpu_bf16_pays()
    monkeypatch.setenv(hardware.ENV, "off")
    assert not hardware.cpu_bf16_pays()
    monkeypatch.setenv(hardware.ENV, "maybe")
    with pytest.raises(ValueError, match="ALIT_CPU_BF16='maybe' is unknown: use on, off or auto"):
        hardware.cpu_bf16_pays()
    assert calls == []


@pytest.mark.parametrize(("choice", "dtype"), [("on", torch.bfloat16), ("off", torch.float32)])
def test_trainer_precision_auto_on_cpu_follows_the_decision(choice: str, dtype: torch.dtype, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hardware.ENV, choice)
    task = RegressionTask()
    tr = Trainer(_cfg(max_steps=2, precision="auto"), tmp_path / "run", task, _data())
    assert tr.dtype == dtype
    tr.fit()  # and it trains under that autocast (bf16 on any CPU: emulated where not native)
    assert tr.step == 2


class _ConvTask:
    """A tiny conv regression on 4D images: what train.channels_last changes the layout of."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GELU(),
                                         torch.nn.Conv2d(8, 1, 3, padding=1))

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"model": list(self.model.parameters())}

    def train_step(self, batch, step: int):
        from tokenizer.core.trainer import Phase

        (x,) = batch
        self.seen_channels_last = x.is_contiguous(memory_format=torch.channels_last)
        yield Phase("model", (self.model(x) - x.mean(1, keepdim=True)).pow(2).mean())

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        return {}

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)


def test_channels_last_trains_the_same_steps_and_saves_standard_tensors(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    from tokenizer.core.checkpoint import latest_checkpoint

    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2)))
    weights = {}
    for cl in (False, True):
        task = _ConvTask()
        tr = Trainer(_cfg(max_steps=6, precision="fp32", channels_last=cl, ema_decay=0.0), tmp_path / f"cl{cl}",
                     task, data)
        tr.fit()
        assert task.seen_channels_last == cl
        assert task.model[0].weight.is_contiguous(memory_format=torch.channels_last) == cl
        weights[cl] = [p.detach().clone() for p in task.model.parameters()]
        assert latest_checkpoint(tmp_path / f"cl{cl}") is not None  # safetensors took the NHWC weights
    for a, b in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

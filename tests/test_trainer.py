"""The one training loop: exact resume, non-finite guards, fp16 loss scaling, run lock, checkpoint integrity."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tokenizer.core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from tokenizer.core.trainer import (
    Phase,
    Precision,
    Preempted,
    RunLock,
    RunLocked,
    TrainConfig,
    Trainer,
    TrainingDiverged,
)


class RegressionTask:
    """A small MLP regression with dropout (so the per-step RNG matters) and two optimizers."""

    def __init__(self, nan_steps: set[int] = frozenset(), stop_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.GELU(), nn.Linear(16, 1))
        self.head = nn.Linear(8, 1)
        self.nan_steps, self.stop_at, self.trainer = nan_steps, stop_at, None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "head": self.head}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.parameters()), "head": list(self.head.parameters())}

    def train_step(self, batch, step: int) -> Iterator[Phase]:
        x, y = batch
        noise = torch.randn_like(y) * 0.01  # randomness inside the step
        loss = (self.model(x) - y - noise).pow(2).mean()
        if step in self.nan_steps:
            loss = loss * float("nan")
        yield Phase("model", loss, {"mse": loss.detach()})
        yield Phase("head", (self.head(x) - y).pow(2).mean())
        if self.stop_at is not None and step + 1 == self.stop_at:
            self.trainer.request_stop()

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return {"w_norm": float(sum(p.detach().norm() for p in model.parameters()))}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, out_dir / "weights.pt")


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    return TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])


def _cfg(**kw) -> TrainConfig:
    base = {"max_steps": 14, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "ckpt_every": 4, "log_every": 1,
            "eval_every": 5, "progress": False, "tensorboard": False, "ema_decay": 0.9}
    return TrainConfig(**{**base, **kw})


def _run(run_dir: Path, task: RegressionTask, **kw) -> Trainer:
    tr = Trainer(_cfg(**kw), run_dir, task, _data())
    task.trainer = tr
    tr.fit()
    return tr


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    full = _run(tmp_path / "full", RegressionTask())
    with pytest.raises(Preempted, match="stopped at step 6 of 14"):  # stops (and checkpoints) after step 6
        _run(tmp_path / "part", RegressionTask(stop_at=6))
    resumed = _run(tmp_path / "part", RegressionTask())
    assert resumed.step == 14
    for k, v in full.modules["model"].state_dict().items():
        assert torch.equal(v, resumed.modules["model"].state_dict()[k]), k
    assert all(torch.equal(full.ema.shadow[k], resumed.ema.shadow[k]) for k in full.ema.shadow)

    def losses(run: Path) -> dict[int, float]:
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss/model"] for r in rows if r["kind"] == "train"}

    assert losses(tmp_path / "full") == losses(tmp_path / "part")  # the same trajectory, step for step
    assert (tmp_path / "full" / "final" / "weights.pt").is_file()
    assert len(list_checkpoints(tmp_path / "full")) == 3  # keep_last


def test_nonfinite_step_skipped_then_diverged(tmp_path: Path) -> None:
    tr = _run(tmp_path / "a", RegressionTask(nan_steps={2}))
    assert tr.step == 14 and all(torch.isfinite(p).all() for p in tr.modules["model"].parameters())
    with pytest.raises(TrainingDiverged, match=r"step 7 .*Last good checkpoint: .*step_00000004"):
        _run(tmp_path / "b", RegressionTask(nan_steps={5, 6, 7}))


def _train_rows(run: Path) -> list[dict]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["kind"] == "train"]


# fp16 autocast runs on CPU in torch 2.14 (Linear in float16), so this is the real fp16 path: with a loss
# scale of 2**40 the float16 gradients overflow until the scaler has halved the scale ~27 times.
FP16 = {"precision": Precision.fp16, "fp16_init_scale": 2.0**40, "max_steps": 40, "ckpt_every": 10}


def test_fp16_overflow_skips_the_update_lowers_the_scale_and_training_continues(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = RegressionTask()
    init = {k: v.clone() for k, v in task.model.state_dict().items()}
    tr = _run(tmp_path / "a", task, **FP16)
    err = capsys.readouterr().err
    assert tr.step == 40 and tr.scaler.is_enabled()
    assert 1 <= tr.skipped_steps < 40 and tr.scaler.get_scale() < 2.0**40
    assert "[train] step 0: fp16 gradient overflow (model, head), update skipped; loss scale 1.09951e+12 -> " \
           "5.49756e+11 (1 skipped so far)" in err
    assert err.count("fp16 gradient overflow") == tr.skipped_steps
    assert tr.bad_steps == 0 and "non-finite loss" not in err  # an overflow is not a bad step
    state = tr.modules["model"].state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(init[k], v) for k, v in state.items())  # the steps after the overflows trained
    rows = _train_rows(tmp_path / "a")
    assert [r["step"] for r in rows] == list(range(1, 41))
    skipped = [r["amp/skipped_steps"] for r in rows]
    assert skipped[0] == 1 and skipped[-1] == tr.skipped_steps and skipped == sorted(skipped)
    assert rows[-1]["amp/loss_scale"] == tr.scaler.get_scale()
    assert "grad_norm/model" not in rows[0]  # an overflow's inf norm is not averaged in
    assert all(r["grad_norm/model"] > 0 for r in rows[-5:])


def test_fp16_resume_mid_overflow_is_bit_exact(tmp_path: Path) -> None:
    full = _run(tmp_path / "full", RegressionTask(), **FP16)
    with pytest.raises(Preempted, match="stopped at step 12 of 40"):
        _run(tmp_path / "part", RegressionTask(stop_at=12), **FP16)
    resumed = _run(tmp_path / "part", RegressionTask(), **FP16)
    assert (resumed.skipped_steps, resumed.scaler.get_scale()) == (full.skipped_steps, full.scaler.get_scale())
    for k, v in full.modules["model"].state_dict().items():
        assert torch.equal(v, resumed.modules["model"].state_dict()[k]), k
    rows = {r["step"]: r for r in _train_rows(tmp_path / "part")}
    assert all(rows[r["step"]] == {**r, "images_per_s": rows[r["step"]]["images_per_s"]}
               for r in _train_rows(tmp_path / "full"))


def test_run_lock_names_holder(tmp_path: Path) -> None:
    with RunLock(tmp_path), pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        _run(tmp_path, RegressionTask())


def _save(run: Path, step: int) -> Path:
    return save_checkpoint(run, step, {"model": {"w": torch.full((4,), float(step))}},
                           {}, {"sampler": {}}, keep_last=2)


def test_checkpoint_integrity(tmp_path: Path) -> None:
    first = _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == second
    # a partial (crashed) write is never taken for a checkpoint
    (tmp_path / "checkpoints" / ".step_00000003.tmp-999999").mkdir()
    (tmp_path / "checkpoints" / "step_00000004").mkdir()  # no manifest
    assert latest_checkpoint(tmp_path) == second
    # truncation and tampering are refused; resume falls back to the previous good one
    f = second / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(second)
    assert latest_checkpoint(tmp_path, verify=True) == first
    data = bytearray((first / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (first / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(first)
    third = _save(tmp_path, 5)
    manifest = json.loads((third / "manifest.json").read_text())
    manifest["format_version"] = 99
    (third / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(third)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; see the tmpfs test in issue 6")
def test_readonly_run_dir_keeps_previous(tmp_path: Path) -> None:
    first = _save(tmp_path, 1)
    os.chmod(tmp_path / "checkpoints", 0o555)
    try:
        with pytest.raises(CheckpointError, match="Previous checkpoint intact"):
            _save(tmp_path, 2)
    finally:
        os.chmod(tmp_path / "checkpoints", 0o755)
    assert latest_checkpoint(tmp_path, verify=True) == first


def test_failing_writer_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _save(tmp_path, 1)
    import tokenizer.core.checkpoint as ck

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_tensors", full_disk)
    with pytest.raises(CheckpointError, match=r"No space left.*Previous checkpoint intact: .*step_00000001"):
        _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path, verify=True) == first
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())

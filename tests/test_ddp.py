"""Data parallelism and gradient accumulation: the global batch decides the result, not its split.

Two gloo ranks at global batch 2b, one rank at batch b with 2 accumulation steps and one rank at batch
2b train the same trajectory (to fp32 tolerance), including a parameter that gets no gradient in some
steps: AdamW neither decays nor moves it then, on one rank as on two. A control with DDP switched off
shows the comparison can fail.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from tokenizer.core.config import ConfigError
from tokenizer.core.trainer import (
    LRScaling,
    Phase,
    ResumableBatchSampler,
    TrainConfig,
    Trainer,
    global_batch,
    peak_lr,
)

N, DIM = 64, 6
STEPS = 6


class Pairs(Dataset):
    """``(x (DIM,), y ())`` with y a fixed nonlinear function of x."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(N, DIM, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(DIM, generator=g)) + 0.1 * self.x[:, 0] ** 2

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Net(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(DIM, 16), nn.GELU(), nn.Linear(16, 1))
        self.sometimes = nn.Linear(DIM, 1)  # used on even steps only: no gradient on odd steps
        self.dropout = nn.Dropout(dropout)  # randomness per micro-batch: its seed follows the micro-batch


class Regression:
    """A task whose loss is a mean over the batch, so any split of a global batch gives one gradient."""

    def __init__(self, dropout: float) -> None:
        self.model = Net(dropout)
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.parameters())}

    def train_step(self, batch: Any, step: int) -> Iterator[Phase]:
        x, y = batch
        if not self.snapshots or self.snapshots[-1]["step"] != step:
            self.snapshots.append({"step": step, **{k: v.detach().clone()
                                                    for k, v in self.model.state_dict().items()}})
        pred = self.model.body(self.model.dropout(x)).squeeze(-1)
        if step % 2 == 0:
            pred = pred + self.model.sometimes(x).squeeze(-1)
        yield Phase("model", ((pred - y) ** 2).mean())

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return {}

    def export(self, model: nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)


def _cfg(batch: int, global_batch: int | None) -> TrainConfig:
    return TrainConfig(max_steps=STEPS, batch_size=batch, global_batch=global_batch, lr=3e-2, warmup_steps=0,
                       weight_decay=0.5, ema_decay=0.9, grad_clip=1.0, ckpt_every=100, log_every=1,
                       eval_every=0, progress=False, tensorboard=False, device="cpu", precision="fp32")


def _train(run_dir: Path, batch: int, global_batch: int | None, dropout: float = 0.0) -> dict[str, Any]:
    task = Regression(dropout)
    trainer = Trainer(_cfg(batch, global_batch), run_dir, task, Pairs())
    trainer.fit()
    ema = trainer.ema.state_dict() if trainer.ema is not None else None
    return {"snapshots": task.snapshots, "final": task.model.state_dict(), "ema": ema,
            "accum": trainer.accum, "global": trainer.global_batch}


def _rank(rank: int, world: int, port: int, run_dir: str, ddp: bool, dropout: float, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    if not ddp:
        import tokenizer.core.trainer as trainer_module

        trainer_module.replicate = lambda modules, dist_info: None
    try:
        result = _train(Path(run_dir), 4, 8, dropout)
        torch.save(result, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path: Path, name: str, ddp: bool = True, dropout: float = 0.0) -> list[dict[str, Any]]:
    out = tmp_path / f"{name}.pt"
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / name), ddp, dropout, str(out)), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k != "step")


def test_two_ranks_equal_accumulation_equal_one_big_batch(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    big = _train(tmp_path / "big", 8, None)  # 1 rank x 8
    accum = _train(tmp_path / "accum", 4, 8)  # 1 rank x 4 x 2 accumulation steps
    assert (big["accum"], accum["accum"], accum["global"]) == (1, 2, 8)
    ranks = _two_ranks(tmp_path, "ddp")  # 2 ranks x 4
    control = _two_ranks(tmp_path, "control", ddp=False)

    assert len(big["snapshots"]) == len(accum["snapshots"]) == len(ranks[0]["snapshots"]) == STEPS
    for got in (accum, ranks[0], ranks[1]):
        for s in range(STEPS):
            d = _max_diff(big["snapshots"][s], got["snapshots"][s])
            assert d < 1e-5, f"weights before step {s} differ by {d:.3g}"
        assert _max_diff(big["final"], got["final"]) < 1e-5
    assert _max_diff(big["ema"], accum["ema"]) < 1e-5 and _max_diff(big["ema"], ranks[0]["ema"]) < 1e-5
    assert ranks[1]["ema"] is None, "the EMA is kept once, on rank 0"
    # the weights moved, and the sometimes-used parameter did not move on odd steps (no decay, no momentum)
    snaps = big["snapshots"]
    assert _max_diff(snaps[0], snaps[1]) > 1e-3
    for s in range(1, STEPS - 1, 2):
        for k in ("sometimes.weight", "sometimes.bias"):
            assert torch.equal(snaps[s][k], snaps[s + 1][k]), f"{k} moved at step {s} without a gradient"
            assert torch.equal(ranks[0]["snapshots"][s][k], ranks[0]["snapshots"][s + 1][k])
        assert not torch.equal(snaps[s - 1]["sometimes.weight"], snaps[s]["sometimes.weight"])
    # without DDP the two ranks train on their own halves and drift apart
    assert _max_diff(control[0]["final"], control[1]["final"]) > 1e-3


def test_micro_batch_randomness_follows_the_micro_batch(tmp_path: Path) -> None:
    """With dropout, 1 rank x 2 accumulation steps draws the same masks as 2 ranks (micro-batch m of rank r
    is seeded as slot m * world + r); one batch of 2b draws other masks, so it differs."""
    torch.set_num_threads(1)
    accum = _train(tmp_path / "accum", 4, 8, dropout=0.3)
    ranks = _two_ranks(tmp_path, "ddp", dropout=0.3)
    big = _train(tmp_path / "big", 8, None, dropout=0.3)
    assert _max_diff(accum["final"], ranks[0]["final"]) < 1e-5
    assert _max_diff(ranks[0]["final"], ranks[1]["final"]) == 0.0
    assert _max_diff(accum["final"], big["final"]) > 1e-4


def test_global_batch_split_and_lr_rule() -> None:
    cfg = TrainConfig(batch_size=32, global_batch=256, lr=1.5e-4, lr_scaling=LRScaling.linear)
    assert global_batch(cfg, 8) == (256, 1) and global_batch(cfg, 2) == (256, 4) and global_batch(cfg, 1) == (256, 8)
    assert peak_lr(cfg, 256) == pytest.approx(1.5e-4) and peak_lr(cfg, 512) == pytest.approx(3e-4)
    assert peak_lr(TrainConfig(lr=1e-3), 4096) == 1e-3  # fixed: as given
    assert global_batch(TrainConfig(batch_size=16), 4) == (64, 1)  # no global_batch: batch_size x ranks
    with pytest.raises(ConfigError, match=r"global_batch=256 does not split into 3 rank"):
        global_batch(cfg, 3)
    with pytest.raises(ValueError, match=r"positive multiple of train\.batch_size"):
        TrainConfig(batch_size=32, global_batch=48)


def test_sampler_slices_do_not_depend_on_the_split() -> None:
    def first_steps(batch: int, world: int, accum: int) -> list[list[int]]:
        samplers = [iter(ResumableBatchSampler(40, batch, seed=1, rank=r, world=world, accum=accum))
                    for r in range(world)]
        steps = []
        for _ in range(7):  # crosses an epoch boundary (5 steps of 8 per epoch)
            items: list[int] = []
            for _ in range(accum):
                for it in samplers:
                    items += next(it)
            steps.append(sorted(items))
        return steps

    ref = first_steps(8, 1, 1)
    assert first_steps(4, 2, 1) == ref == first_steps(4, 1, 2) == first_steps(2, 2, 2)
    s = ResumableBatchSampler(40, 4, seed=1, accum=2)
    assert len(s) == 10 and s.advanced(s.state_dict(), 6) == {"epoch": 1, "batch_index": 1, "n": 40}

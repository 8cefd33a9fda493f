"""The one training loop of the project, for every stage (base VQ, ALIT distill/finetune, priors).

What differs between stages is a :class:`Task`: it owns the modules, says which parameters each
optimizer holds, and yields the loss of each optimizer phase of a step (one phase for most stages,
two for GAN training: generator, then discriminator). The :class:`Trainer` owns everything else:
devices and ranks, bf16/fp16 autocast (fp16 with dynamic loss scaling: an overflow step is skipped,
the scale lowered and the skip counted), AdamW with warmup + cosine, gradient clipping and averaging,
non-finite-loss guards, EMA, logging (JSONL, TensorBoard, progress bar), atomic checkpoints and
exact resume (model, EMA, optimizers, scaler, step, data position and RNG are all restored; each
step's randomness is derived from ``(seed, step, rank)`` and the data position from the batches
trained, never from how far the DataLoader's workers have read ahead, so a resumed run repeats the
uninterrupted run's trajectory bit for bit on CPU whatever ``num_workers``).

Resuming a run directory whose ``config.yaml`` differs from the new config is refused with the
changed keys named (:class:`ConfigChanged`), except for :data:`RESUME_FREE_KEYS` and the keys listed
in ``train.allow_config_change``; an allowed change is recorded in ``config_changes.jsonl``.
SIGTERM, SIGUSR2 and SIGINT all stop the run at the next step boundary with a checkpoint
(:class:`Preempted`); a second SIGINT interrupts at once.

Usage (single process, torchrun, or a Slurm task alike)::

    trainer = Trainer(train_cfg, run_dir, task, train_set)
    trainer.fit()          # resumes automatically from run_dir/checkpoints/latest
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
    verify_checkpoint,
)
from .config import ConfigError, git_commit, save_config, to_dict
from .distributed import DistInfo, all_reduce_flag, all_reduce_grads, barrier, init_distributed


# ============================================================================ configuration
class Precision(Enum):
    """Autocast precision: ``auto`` = bf16 on CUDA, fp32 on CPU."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class TrainConfig:
    """The loop's settings (the same schema for every stage)."""

    max_steps: int = 1000  # optimizer steps in total
    batch_size: int = 16  # per process
    lr: float = 1e-4  # peak learning rate (after warmup)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on biases, norms, embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 3.0  # max global grad norm per optimizer; 0 disables
    ema_decay: float = 0.999  # EMA of the task's model; 0 disables
    precision: Precision = Precision.auto  # autocast dtype
    device: str = "auto"  # auto = cuda if available else cpu
    seed: int = 0  # seeds init, data order and every step's randomness
    num_workers: int = 0  # DataLoader workers (the saved data position is exact whatever the count)
    persistent_workers: bool = False  # keep the DataLoader workers alive between epochs (num_workers > 0)
    fp16_init_scale: float = 65536.0  # precision fp16: initial loss scale (torch's default 2**16)
    allow_config_change: list[str] = field(default_factory=list)  # keys a resume may change (--allow-config-change)
    log_every: int = 10  # steps between logged (rank-reduced) metrics
    eval_every: int = 200  # steps between task evaluations; 0 disables
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # checkpoints kept on disk
    max_bad_steps: int = 3  # consecutive non-finite steps tolerated before stopping
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = True  # also log to TensorBoard (run_dir/tb)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "log_every", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.ckpt_every < 1 or self.eval_every < 0:
            raise ValueError("train.warmup_steps/eval_every must be >= 0 and train.ckpt_every >= 1")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if not 0 < self.fp16_init_scale < float(torch.finfo(torch.float32).max):
            raise ValueError(f"train.fp16_init_scale must be a finite float32 > 0, got {self.fp16_init_scale}")


# ============================================================================ task protocol
@dataclass
class Phase:
    """One optimizer update within a step: ``optimizer`` names the optimizer stepping on ``loss``."""

    optimizer: str
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Task(Protocol):
    """What a stage provides to the :class:`Trainer`."""

    def modules(self) -> dict[str, nn.Module]:
        """Everything whose state is checkpointed; must contain ``"model"`` (EMA'd and exported)."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of each optimizer, by optimizer name (e.g. ``{"model": [...], "disc": [...]}``)."""

    def train_step(self, batch: Any, step: int) -> Iterator[Phase]:
        """Yield the phases of one step; the trainer applies each update before resuming the task."""

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Metrics of ``model`` (the EMA model when there is one) on a fixed validation batch."""

    def export(self, model: nn.Module, out_dir: Path) -> None:
        """Write ``model`` in its ``from_pretrained`` format."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


class Preempted(RuntimeError):
    """:meth:`Trainer.fit` stopped before ``max_steps`` on request (SIGTERM, SIGUSR2, SIGINT,
    :meth:`Trainer.request_stop`) after writing a checkpoint; running the same command again resumes.
    Under Slurm the launcher requeues. ``signal`` names the signal that asked (None: a call)."""

    def __init__(self, message: str, signal: str | None = None) -> None:
        super().__init__(message)
        self.signal = signal


class ConfigChanged(ConfigError):
    """A resume with a config that differs from the run directory's ``config.yaml`` (exit 2 from the CLI)."""


class RunLocked(RuntimeError):
    """Another process holds the run directory."""


# ============================================================================ pieces
class ResumableBatchSampler(Sampler[list[int]]):
    """Seeded permutation per epoch, sharded over ranks; resumes at any batch. Drops the last partial batch.

    With ``with_epoch`` it yields ``(epoch, index)`` pairs, so a dataset's augmentation can be a pure
    function of the epoch even in worker processes (``ImageDataset`` accepts them).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 with_epoch: bool = False) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.with_epoch = with_epoch
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch < 1:
            raise ValueError(f"the dataset has {n} items, fewer than one global batch of "
                             f"{batch_size} x {world} ranks: lower train.batch_size or add data")
        self.epoch, self.batch_index = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n", self.n) != self.n:
            print(f"[train] warning: dataset size changed since the checkpoint ({state['n']} -> {self.n}); "
                  "the data order is not the original run's", file=sys.stderr)
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])

    def advanced(self, state: dict[str, int], batches: int) -> dict[str, int]:
        """The position ``batches`` batches after ``state`` (a :meth:`state_dict`): what a checkpoint saves,
        counted from the batches trained, since the DataLoader reads ahead of training."""
        total = int(state["epoch"]) * self.per_epoch + min(int(state["batch_index"]), self.per_epoch) + batches
        return {"epoch": total // self.per_epoch, "batch_index": total % self.per_epoch, "n": self.n}

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[list[Any]]:
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            while self.batch_index < self.per_epoch:
                start = (self.batch_index * self.world + self.rank) * self.batch_size
                self.batch_index += 1
                batch = perm[start: start + self.batch_size]
                yield [(self.epoch, i) for i in batch] if self.with_epoch else batch
            self.epoch, self.batch_index = self.epoch + 1, 0


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers (fp32 shadow)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short runs are not dominated by the init
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise CheckpointError(f"EMA state lacks {len(missing)} keys (e.g. {sorted(missing)[:3]})")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Write the averaged weights into ``model`` (a separate copy, never the live model)."""
        sd = model.state_dict()
        for k, v in self.shadow.items():
            sd[k].copy_(v.to(sd[k].dtype))
        return model


class RunLock:
    """An exclusive lock on a run directory; a second holder gets :class:`RunLocked` naming the first."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.fh: Any = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "unknown process"
            self.fh.close()
            raise RunLocked(f"run directory {self.path.parent} is in use by {holder}; wait for it, stop it, "
                            "or choose another run_dir") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.fh.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()


class MetricsLogger:
    """Rank-0 metrics: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.tb = None
        if enabled:
            self.fh = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine to ``lr * min_lr_ratio`` (a pure function of the step)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms, embeddings given as 1-D/scalars)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": lr_scale},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _rng_state() -> dict[str, Any]:
    return {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2])}


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's randomness on one rank."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def _worker_init(lock_fd: int | None, _: int) -> None:
    """DataLoader workers leave SIGINT to the main process (a terminal's Ctrl-C reaches the whole process
    group; the main process checkpoints and stops, and would lose its workers if they died on it), and
    close their inherited copy of the run lock, so that a SIGKILLed run's workers, which outlive it for a
    few seconds, do not keep its rerun out of the run directory."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(lock_fd)  # a close, never an unlock: the lock stays the main process's


# ============================================================================ resume safety
# Keys a resume may change without --allow-config-change: how the run is watched, checkpointed and fed
# (none of them changes the trained weights) and its length. train.max_steps stays free so a run can be
# extended (or ended earlier): the steps done are kept and the cosine schedule is recomputed for the new
# length from the current step on, so the result is not that of a fresh run of the new length.
RESUME_FREE_KEYS = frozenset({
    "run_dir", "train.max_steps", "train.progress", "train.tensorboard", "train.log_every", "train.eval_every",
    "train.ckpt_every", "train.keep_last", "train.num_workers", "train.persistent_workers",
    "train.allow_config_change",
})


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, new value)}`` of every key whose value differs (missing = None)."""
    a, b = _flatten(saved), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


# ============================================================================ the loop
class Trainer:
    """Runs a :class:`Task` to ``cfg.max_steps`` in ``run_dir``, resuming from its last checkpoint."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, task: Task, dataset: Dataset,
                 dist_info: DistInfo | None = None, collate_fn: Any = None, run_config: Any = None) -> None:
        self.cfg, self.run_dir, self.task, self.dataset = cfg, Path(run_dir), task, dataset
        self.run_config = run_config  # the whole run's config, written to run_dir/config.yaml under the lock
        self.dist = dist_info or init_distributed(cfg.device)
        self.device = self.dist.device
        self.collate_fn = collate_fn
        if hasattr(task, "setup"):  # non-checkpointed state that follows the device (loss networks, data)
            task.setup(self.dist.device)
        mods = task.modules()
        if "model" not in mods:
            raise ValueError("Task.modules() must contain a 'model' entry (the module that is EMA'd and exported)")
        for m in mods.values():
            m.to(self.device)
        self.modules = mods
        self.groups = task.param_groups()
        self.optimizers = {name: make_optimizer(params, cfg, getattr(task, "lr_scales", {}).get(name, 1.0))
                           for name, params in self.groups.items()}
        self.dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=cfg.fp16_init_scale,
                                           enabled=self.dtype == torch.float16)
        self.skipped_steps = 0  # fp16: steps whose update the scaler skipped (gradient overflow)
        self.scaler_stepped = False  # fp16: an optimizer stepped through the scaler since its last update()
        self.overflowed: list[str] = []  # fp16: optimizers whose gradients overflowed in this step
        self.ema = EMA(mods["model"], cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, self.dist.rank,
                                             self.dist.world_size, with_epoch=hasattr(dataset, "set_epoch"))
        self.data_origin = self.sampler.state_dict()  # the sampler's position when the loader was started
        self.batches_trained = 0  # batches taken from the loader since then (one per step)
        self.step = 0
        self.bad_steps = 0
        self.last_good_checkpoint: Path | None = None
        self.stop_requested = False
        self.stop_signal: str | None = None
        self.lock_fd: int | None = None  # the run lock's descriptor while fit() holds it (rank 0)
        self.history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ helpers
    def _autocast_dtype(self) -> torch.dtype:
        p = self.cfg.precision
        if p == Precision.auto:
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[p]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of a training or evaluation forward."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def ema_model(self) -> nn.Module:
        """A fresh copy of the model holding the EMA weights (the live model is left untouched)."""
        import copy

        model = copy.deepcopy(self.modules["model"])
        if self.ema is not None:
            self.ema.copy_to(model)
        return model.eval()

    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        """Checkpoint at the next step boundary and return from :meth:`fit` (preemption, SIGTERM/SIGUSR2/SIGINT).

        A second SIGINT (Ctrl-C twice) interrupts at once, without a checkpoint."""
        if signum == signal.SIGINT and self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        if signum is not None and self.stop_signal is None:
            self.stop_signal = signal.Signals(signum).name

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Write a checkpoint of the current state (rank 0 writes; all ranks wait)."""
        path = None
        if self.dist.is_main:
            mods = {k: m.state_dict() for k, m in self.modules.items()}
            if self.ema is not None:
                mods["ema"] = self.ema.state_dict()
            state = {"sampler": self.sampler.advanced(self.data_origin, self.batches_trained),
                     "rng": _rng_state(), "bad_steps": self.bad_steps,
                     "scaler": {k: v for k, v in self.scaler.state_dict().items() if not torch.is_tensor(v)},
                     "skipped_steps": self.skipped_steps}
            try:
                path = save_checkpoint(self.run_dir, self.step, mods,
                                       {k: o.state_dict() for k, o in self.optimizers.items()},
                                       state, self.cfg.keep_last)
            finally:
                barrier()
            self.last_good_checkpoint = path
        else:
            barrier()
        return path

    def resume(self) -> bool:
        """Restore the newest complete checkpoint of the run directory, if any."""
        path = latest_checkpoint(self.run_dir, verify=True)
        if path is None:
            if latest_checkpoint(self.run_dir) is not None:
                raise CheckpointError(f"no checkpoint in {self.run_dir / 'checkpoints'} passes verification; "
                                      "move the directory away to start over")
            return False
        newest = latest_checkpoint(self.run_dir)
        if newest != path and self.dist.is_main:  # say which checkpoint was refused and why, never silently
            try:
                verify_checkpoint(newest)
                reason = "not the newest complete checkpoint"
            except CheckpointError as e:
                reason = str(e)
            print(f"[train] warning: refusing checkpoint {newest}: {reason}; falling back to {path}",
                  file=sys.stderr)
        modules, optimizers, state = load_checkpoint(path, self.device)
        for k, m in self.modules.items():
            load_module_state(m, modules[k], f"{path}/{k}.safetensors")
        if self.ema is not None:
            self.ema.load_state_dict(modules["ema"])
        for k, o in self.optimizers.items():
            o.load_state_dict(optimizers[k])
        self.sampler.load_state_dict(state["sampler"])
        self.data_origin, self.batches_trained = self.sampler.state_dict(), 0
        _set_rng(state["rng"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_good_checkpoint = path
        if self.dist.is_main:
            print(f"[train] resumed from {path} at step {self.step}", file=sys.stderr)
        return True

    # ------------------------------------------------------------------ resume safety
    def _config_changes(self) -> dict[str, Any] | None:
        """What this resume changes in ``run_dir/config.yaml`` (None when it is not a resume of a run with
        one); raises :class:`ConfigChanged` naming every changed key that is neither free nor allowed."""
        import yaml

        saved_file = self.run_dir / "config.yaml"
        if self.run_config is None or not saved_file.is_file() or latest_checkpoint(self.run_dir) is None:
            return None
        try:
            saved = yaml.safe_load(saved_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigChanged(f"{saved_file} is not valid YAML, so this resume cannot be checked against it "
                                f"({e}); restore it or choose another run_dir") from None
        new = yaml.safe_load(yaml.safe_dump(to_dict(self.run_config), sort_keys=False))
        changes = config_changes(saved.get("config") or {}, new)
        allowed = set(self.cfg.allow_config_change)
        blocked = [k for k in changes if k not in RESUME_FREE_KEYS and k not in allowed]
        if blocked:
            listed = ", ".join(f"{k} ({_short(changes[k][0])} -> {_short(changes[k][1])})" for k in blocked)
            raise ConfigChanged(
                f"run directory {self.run_dir} was started with another config: {listed}; resume it with the "
                f"config in {saved_file.name}, choose another run_dir, or pass --allow-config-change "
                f"{','.join(blocked)} to resume with the change")
        unused = sorted(allowed - set(changes))
        if unused and self.dist.is_main:
            print(f"[train] note: --allow-config-change lists {','.join(unused)}, which did not change",
                  file=sys.stderr)
        return {"changes": changes, "git_commit": (saved.get("git_commit"), git_commit())}

    def _record_config_changes(self, found: dict[str, Any] | None) -> None:
        """Say what a resume changed and append it to ``run_dir/config_changes.jsonl`` (rank 0)."""
        if found is None or not self.dist.is_main:
            return
        changes = {k: v for k, v in found["changes"].items() if k != "train.allow_config_change"}
        old_git, new_git = found["git_commit"]
        if not changes and old_git == new_git:
            return
        if changes:
            listed = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in changes.items())
            print(f"[train] resuming at step {self.step} with a changed config: {listed}", file=sys.stderr)
        if old_git != new_git:
            print(f"[train] note: the code changed since the run started (git {old_git} -> {new_git})",
                  file=sys.stderr)
        record = {"step": self.step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()},
                  "git_commit": {"old": old_git, "new": new_git}}
        with open(self.run_dir / "config_changes.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ one step
    def _apply(self, phase: Phase) -> tuple[bool, float]:
        """Backward and update of one phase; returns (loss finite, grad norm).

        fp16 follows ``torch.amp.GradScaler``: ``unscale_`` once per optimizer, clip, ``scaler.step``
        (which skips the update when the unscaled gradients hold inf/NaN); ``scaler.update()`` comes once
        per step, after every phase (:meth:`_update_scale`). Without fp16 a non-finite gradient norm skips
        the update and counts as a bad step, like a non-finite loss."""
        opt = self.optimizers[phase.optimizer]
        params = self.groups[phase.optimizer]
        finite = bool(torch.isfinite(phase.loss.detach()).item())
        finite = not all_reduce_flag(not finite, self.device)
        opt.zero_grad(set_to_none=True)  # drop grads an earlier phase left on these params (GAN: disc)
        if not finite:
            return False, float("nan")
        self.scaler.scale(phase.loss).backward()
        all_reduce_grads(params, self.dist.world_size)
        self.scaler.unscale_(opt)
        norm = 0.0
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        lr = lr_at(self.step, self.cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        if self.scaler.is_enabled():
            if self.cfg.grad_clip <= 0:  # the norm says which optimizer overflowed (inf/NaN gradients)
                norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            if not math.isfinite(norm):
                self.overflowed.append(phase.optimizer)
            self.scaler.step(opt)  # skipped by the scaler itself on an overflow (same on every rank)
            self.scaler_stepped = True
        else:
            grads_ok = math.isfinite(norm) if self.cfg.grad_clip > 0 else True
            if not all_reduce_flag(not grads_ok, self.device):
                opt.step()
            else:
                finite = False
        opt.zero_grad(set_to_none=True)
        return finite, norm

    def _update_scale(self) -> bool:
        """fp16: ``scaler.update()`` once per step; True when the step's update was skipped (overflow)."""
        if not self.scaler_stepped:
            return False
        overflowed, self.overflowed, self.scaler_stepped = self.overflowed, [], False
        before = self.scaler.get_scale()
        self.scaler.update()
        after = self.scaler.get_scale()
        if after >= before:
            return False
        self.skipped_steps += 1
        if self.dist.is_main:
            which = ", ".join(overflowed) or "an optimizer"
            print(f"[train] step {self.step}: fp16 gradient overflow ({which}), update skipped; loss scale "
                  f"{before:g} -> {after:g} ({self.skipped_steps} skipped so far)", file=sys.stderr)
        return True

    def _to_device(self, batch: Any) -> Any:
        if torch.is_tensor(batch):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
            return type(batch)(*(self._to_device(b) for b in batch))
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, float]:
        """Train to ``max_steps`` (or until a stop is requested); returns the last logged metrics."""
        lock = RunLock(self.run_dir) if self.dist.is_main else None
        with lock if lock is not None else contextlib.nullcontext():
            self.lock_fd = lock.fh.fileno() if lock is not None else None
            return self._fit()

    def _fit(self) -> dict[str, float]:
        cfg = self.cfg
        changed = self._config_changes()  # every rank, before rank 0 rewrites config.yaml
        barrier()
        if self.run_config is not None and self.dist.is_main:
            save_config(self.run_config, self.run_dir)  # only once the run directory is ours
        self.resume()
        self._record_config_changes(changed)
        old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                old_handlers[sig] = signal.signal(sig, self.request_stop)
        logger = MetricsLogger(self.run_dir, self.dist.is_main, cfg.tensorboard)
        workers = cfg.num_workers > 0
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=cfg.num_workers,
                            collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda",
                            persistent_workers=workers and cfg.persistent_workers,
                            worker_init_fn=functools.partial(_worker_init, self.lock_fd) if workers else None)
        self.data_origin, self.batches_trained = self.sampler.state_dict(), 0  # where the loader starts
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.run_dir.name, dynamic_ncols=True,
                       file=sys.stderr)
        last: dict[str, float] = {}
        acc: dict[str, float] = {}
        counts: dict[str, int] = {}  # steps behind each sum (an fp16 overflow step logs no gradient norm)
        t0, seen = time.perf_counter(), 0
        for m in self.modules.values():
            m.train()
        try:
            data = iter(loader)
            while self.step < cfg.max_steps and not all_reduce_flag(self.stop_requested, self.device):
                batch = self._to_device(next(data))
                self.batches_trained += 1
                torch.manual_seed(step_seed(cfg.seed, self.step, self.dist.rank))
                step_ok, logs = True, {}
                with self.autocast():
                    phases = self.task.train_step(batch, self.step)
                    for phase in phases:
                        ok, norm = self._apply(phase)
                        step_ok &= ok
                        logs[f"loss/{phase.optimizer}"] = float(phase.loss.detach())
                        logs[f"grad_norm/{phase.optimizer}"] = norm
                        logs.update({k: float(v.detach()) if torch.is_tensor(v) else float(v)
                                     for k, v in phase.logs.items()})
                if self._update_scale():  # fp16: once per step, after every optimizer stepped
                    logs = {k: v for k, v in logs.items() if math.isfinite(v) or not k.startswith("grad_norm/")}
                seen += len(batch[0]) if isinstance(batch, (list, tuple)) else cfg.batch_size
                if not step_ok:
                    self.bad_steps += 1
                    if self.bad_steps >= cfg.max_bad_steps:
                        terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if not k.startswith("grad"))
                        raise TrainingDiverged(
                            f"non-finite loss at step {self.step} for {self.bad_steps} consecutive steps "
                            f"({terms}); updates were skipped. Last good checkpoint: "
                            f"{self.last_good_checkpoint or 'none'}. Lower train.lr or check the data, then resume.")
                    print(f"[train] step {self.step}: non-finite loss, update skipped "
                          f"({self.bad_steps}/{cfg.max_bad_steps})", file=sys.stderr)
                    self.step += 1
                    continue
                self.bad_steps = 0
                if self.ema is not None:
                    self.ema.update(self.modules["model"], self.step)
                self.step += 1
                for k, v in logs.items():
                    acc[k] = acc.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                                     if k.startswith("loss/")}, refresh=False)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    dt = time.perf_counter() - t0
                    last = {k: v / counts[k] for k, v in acc.items()}
                    last.update({"lr": lr_at(self.step - 1, cfg), "images_per_s": seen * self.dist.world_size / dt})
                    if self.scaler.is_enabled():
                        last.update({"amp/loss_scale": self.scaler.get_scale(),
                                     "amp/skipped_steps": float(self.skipped_steps)})
                    logger.log(self.step, last)
                    self.history.append({"step": self.step, **last})
                    acc, counts, t0, seen = {}, {}, time.perf_counter(), 0
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
                    if self.dist.is_main:
                        metrics = self.task.evaluate(self.ema_model() if self.ema else self.modules["model"],
                                                     self.step)
                        logger.log(self.step, metrics, kind="eval")
                        for m in self.modules.values():
                            m.train()
                    barrier()
                if self.step % cfg.ckpt_every == 0 and self.step < cfg.max_steps:
                    self.save()
            if self.step < cfg.max_steps and self.dist.is_main:
                print(f"[train] stop requested{f' ({self.stop_signal})' if self.stop_signal else ''}: "
                      f"checkpointing at step {self.step}", file=sys.stderr)
            self.save()
            if self.step < cfg.max_steps:
                via = f" ({self.stop_signal})" if self.stop_signal else ""
                raise Preempted(f"stopped at step {self.step} of {cfg.max_steps} on request{via}; checkpoint "
                                f"{self.last_good_checkpoint or 'saved'}; run the same command again to resume",
                                self.stop_signal)
            if self.dist.is_main:
                self.task.export(self.ema_model() if self.ema else self.modules["model"].eval(),
                                 self.run_dir / "final")
            barrier()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        return last

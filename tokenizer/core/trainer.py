"""The one training loop of the project, for every stage (base VQ, ALIT distill/finetune, priors).

What differs between stages is a :class:`Task`: it owns the modules, says which parameters each
optimizer holds, and yields the loss of each optimizer phase of a step (one phase for most stages,
two for GAN training: generator, then discriminator). The :class:`Trainer` owns everything else:
devices and ranks, bf16/fp16 autocast (fp16 with dynamic loss scaling: an overflow step is skipped,
the scale lowered and the skip counted), AdamW with warmup + cosine, gradient clipping, data
parallelism through ``DistributedDataParallel`` (gloo on CPU, NCCL on GPU; see :func:`replicate`) and
gradient accumulation (``train.global_batch`` holds on any number of ranks, with the learning-rate rule
``train.lr_scaling`` explicit), non-finite-loss guards, EMA (on rank 0), logging (JSONL, TensorBoard, progress bar), atomic checkpoints and
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
from torch.nn.parallel import DistributedDataParallel
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
from .distributed import DistInfo, all_reduce_flag, barrier, broadcast_object, init_distributed

_ANNOUNCED: dict[str, bool] = {}  # one-time notes already printed by this process


# ============================================================================ configuration
class Precision(Enum):
    """Autocast precision: ``auto`` = bf16 on CUDA; on a CPU bf16 where it runs natively and faster than fp32
    (:func:`tokenizer.core.hardware.cpu_bf16_pays`), else fp32."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class LRScaling(Enum):
    """How ``train.lr`` relates to the global batch: ``fixed`` = as given at any global batch; ``linear`` =
    ``lr * global_batch / lr_base_batch`` (the public ALIT/MAE rule: lr 1.5e-4 is stated at batch 256)."""

    fixed = "fixed"
    linear = "linear"


@dataclass
class TrainConfig:
    """The loop's settings (the same schema for every stage)."""

    max_steps: int = 1000  # optimizer steps in total
    batch_size: int = 16  # per process and micro-batch (what one forward holds)
    global_batch: int | None = None  # images per optimizer step over all ranks; None = batch_size x ranks.
    #                                  Gradient accumulation makes it hold on any number of GPUs
    lr: float = 1e-4  # peak learning rate (after warmup); see lr_scaling
    lr_scaling: LRScaling = LRScaling.fixed  # fixed: lr as given; linear: lr x global_batch / lr_base_batch
    lr_base_batch: int = 256  # the global batch at which `lr` is stated (lr_scaling: linear)
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
    prefetch_factor: int = 2  # batches each worker loads ahead (num_workers > 0)
    pin_memory: bool = True  # page-locked host batches for faster copies (CUDA only)
    compile: bool = False  # torch.compile the repeated blocks of the task's modules (regional compilation)
    channels_last: bool = False  # NHWC memory format for the conv weights of the task's modules (and its
    #                              `extra` loss networks) and for 4D image batches: oneDNN's and cuDNN's fast path
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
        for name, kind in (("precision", Precision), ("lr_scaling", LRScaling)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                try:
                    setattr(self, name, kind(value))
                except ValueError:
                    raise ValueError(f"train.{name}={value!r} is unknown: choose one of "
                                     f"{', '.join(k.value for k in kind)}") from None
        for name in ("max_steps", "batch_size", "log_every", "keep_last", "max_bad_steps", "prefetch_factor",
                     "lr_base_batch"):
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
        if self.global_batch is not None and (self.global_batch < 1 or self.global_batch % self.batch_size):
            raise ValueError(f"train.global_batch={self.global_batch} must be a positive multiple of "
                             f"train.batch_size={self.batch_size} (per-rank micro-batch): the step accumulates "
                             "global_batch / (batch_size x ranks) micro-batches per rank")
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
    """Seeded permutation per epoch, sharded over ranks and micro-batches; resumes at any step. Drops the
    last partial global batch.

    Step ``s`` of an epoch trains on the permutation's slice ``[s * G, (s + 1) * G)`` with ``G =
    batch_size x world x accum`` (the global batch), whatever the split into ranks and accumulated
    micro-batches: micro-batch ``m`` of rank ``r`` is slot ``m * world + r`` of the slice. So 2 ranks x b, 1
    rank x b x 2 accumulation steps and 1 rank x 2b see the same images, and a run resumed on another
    number of GPUs at the same global batch continues the same data order. The position is counted in
    steps (``batch_index``); the sampler yields ``accum`` micro-batches per step.

    With ``with_epoch`` it yields ``(epoch, index)`` pairs, so a dataset's augmentation can be a pure
    function of the epoch even in worker processes (``ImageDataset`` accepts them).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 with_epoch: bool = False, accum: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.with_epoch, self.accum = with_epoch, accum
        self.per_epoch = n // (batch_size * world * accum)  # steps per epoch
        if self.per_epoch < 1:
            raise ValueError(f"the dataset has {n} items, fewer than one global batch of {batch_size} x "
                             f"{world} ranks x {accum} accumulation steps: lower train.batch_size or "
                             "train.global_batch, or add data")
        self.epoch, self.batch_index = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n", self.n) != self.n:
            print(f"[train] warning: dataset size changed since the checkpoint ({state['n']} -> {self.n}); "
                  "the data order is not the original run's", file=sys.stderr)
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])

    def advanced(self, state: dict[str, int], steps: int) -> dict[str, int]:
        """The position ``steps`` steps after ``state`` (a :meth:`state_dict`): what a checkpoint saves,
        counted from the steps trained, since the DataLoader reads ahead of training."""
        total = int(state["epoch"]) * self.per_epoch + min(int(state["batch_index"]), self.per_epoch) + steps
        return {"epoch": total // self.per_epoch, "batch_index": total % self.per_epoch, "n": self.n}

    def __len__(self) -> int:
        return self.per_epoch * self.accum  # micro-batches per epoch

    def __iter__(self) -> Iterator[list[Any]]:
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            while self.batch_index < self.per_epoch:
                step = self.batch_index
                self.batch_index += 1
                for m in range(self.accum):
                    slot = (step * self.accum + m) * self.world + self.rank
                    batch = perm[slot * self.batch_size: (slot + 1) * self.batch_size]
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


def lr_at(step: int, cfg: TrainConfig, peak: float | None = None) -> float:
    """Linear warmup then cosine to ``peak * min_lr_ratio`` (a pure function of the step); ``peak``
    defaults to ``cfg.lr`` (the trainer passes :func:`peak_lr`)."""
    peak = cfg.lr if peak is None else peak
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def global_batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """``(global batch, accumulation steps)``: ``train.global_batch`` split into ``world_size`` ranks of
    ``train.batch_size`` micro-batches; without it, one micro-batch per rank. A :class:`ConfigError` when
    it does not split evenly."""
    if cfg.global_batch is None:
        return cfg.batch_size * world_size, 1
    per_step = cfg.batch_size * world_size
    if cfg.global_batch % per_step:
        raise ConfigError(f"train.global_batch={cfg.global_batch} does not split into {world_size} rank(s) x "
                          f"train.batch_size={cfg.batch_size} micro-batches (a multiple of {per_step} is "
                          "needed): change train.batch_size or the number of GPUs")
    return cfg.global_batch, cfg.global_batch // per_step


def peak_lr(cfg: TrainConfig, batch: int) -> float:
    """The peak learning rate at global batch ``batch`` under ``train.lr_scaling``."""
    if cfg.lr_scaling == LRScaling.linear:
        return cfg.lr * batch / cfg.lr_base_batch
    return cfg.lr


class _GradientSink(nn.Module):
    """The task's modules under one module whose forward is the identity on a loss.

    Tasks compute their losses by calling any method of their modules (``encode``, one recurrent
    iteration, a loss module holding a discriminator), not one ``forward``. Passing each phase's loss
    through ``DistributedDataParallel(_GradientSink(modules))`` before its backward gives DDP what it
    needs from a forward: its reducer is prepared for this backward, and it finds, from the loss's
    autograd graph, the parameters the phase did not use. The gradient all-reduce itself is DDP's:
    bucketed, overlapped with the backward, and a parameter that got no gradient on any rank keeps
    ``grad = None``, so AdamW neither decays nor moves it, as on one rank."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def replicate(modules: dict[str, nn.Module], dist_info: DistInfo) -> DistributedDataParallel | None:
    """DDP over the task's trainable modules (None on one process or when nothing is trainable).

    ``find_unused_parameters``: phases train subsets (GAN: generator, then discriminator) and a task may
    leave parameters unused in a step. ``broadcast_buffers=False``: the modules' buffers are constants or
    synchronised by their owners (the latent codebook's usage statistics are broadcast from rank 0 at
    each dead-code restart), so no broadcast before each forward."""
    trainable = {k: m for k, m in modules.items() if any(p.requires_grad for p in m.parameters())}
    if not dist_info.enabled or not trainable:
        return None
    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    import inspect  # torch >= 2.14 renames broadcast_buffers (still syncing at init, which is harmless here)

    buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else "broadcast_buffers"
    return DistributedDataParallel(_GradientSink(trainable), device_ids=device_ids, find_unused_parameters=True,
                                   **{buffers: False})


def _rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
    "train.allow_config_change", "train.prefetch_factor", "train.pin_memory", "train.compile",
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
        if cfg.channels_last:  # only 4D parameters change layout; values and checkpoints stay the same
            for m in [*mods.values(), *getattr(task, "extra", [])]:
                m.to(memory_format=torch.channels_last)
        self.modules = mods
        if cfg.compile:  # after .to(device); the checkpointed state dicts keep their eager key names
            from .compile import compile_regions

            compiled = compile_regions(mods)
            if self.dist.is_main:
                print(f"[train] torch.compile: {compiled} repeated blocks compiled", file=sys.stderr)
        self.groups = task.param_groups()
        self.optimizers = {name: make_optimizer(params, cfg, getattr(task, "lr_scales", {}).get(name, 1.0))
                           for name, params in self.groups.items()}
        self.dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=cfg.fp16_init_scale,
                                           enabled=self.dtype == torch.float16)
        self.skipped_steps = 0  # fp16: steps whose update the scaler skipped (gradient overflow)
        self.scaler_stepped = False  # fp16: an optimizer stepped through the scaler since its last update()
        self.overflowed: list[str] = []  # fp16: optimizers whose gradients overflowed in this step
        self.global_batch, self.accum = global_batch(cfg, self.dist.world_size)
        self.peak_lr = peak_lr(cfg, self.global_batch)
        # the EMA lives on rank 0 only: every rank holds the same weights after each update, and only
        # rank 0 evaluates, checkpoints and exports
        self.ema = EMA(mods["model"], cfg.ema_decay) if cfg.ema_decay > 0 and self.dist.is_main else None
        self.sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, cfg.seed, self.dist.rank,
                                             self.dist.world_size, with_epoch=hasattr(dataset, "set_epoch"),
                                             accum=self.accum)
        self.data_origin = self.sampler.state_dict()  # the sampler's position when the loader was started
        self.batches_trained = 0  # steps whose micro-batches were taken from the loader since then
        self.replica: DistributedDataParallel | None = None  # DDP over the modules while fit() runs
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
            if self.device.type == "cuda":
                return torch.bfloat16
            if self.device.type != "cpu":
                return torch.float32
            from .hardware import cpu_bf16_pays

            # bf16 only where this CPU runs it natively and faster (measured once, cached); rank 0 decides
            bf16 = bool(broadcast_object(cpu_bf16_pays() if self.dist.is_main else None))
            if self.dist.is_main and not _ANNOUNCED.get("cpu_precision"):
                _ANNOUNCED["cpu_precision"] = True
                print(f"[train] precision auto on this CPU: {'bf16' if bf16 else 'fp32'} autocast "
                      "(see tokenizer.core.hardware; ALIT_CPU_BF16=on|off overrides)", file=sys.stderr)
            return torch.bfloat16 if bf16 else torch.float32
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
        free = set(RESUME_FREE_KEYS)
        if (saved.get("config") or {}).get("train", {}).get("global_batch") is not None \
                and "train.global_batch" not in changes:
            free.add("train.batch_size")  # the global batch holds: the micro-batch only changes memory
        blocked = [k for k in changes if k not in free and k not in allowed]
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
    def _backward(self, phase: Phase, micro: int) -> bool:
        """Backward of micro-batch ``micro`` of a phase, its loss averaged over the ``accum`` micro-batches;
        only the last one's backward all-reduces the gradients (DDP ``no_sync`` before it). Returns
        whether the loss is finite on every rank; a non-finite loss gets no backward, and the step no update."""
        opt = self.optimizers[phase.optimizer]
        if micro == 0:
            opt.zero_grad(set_to_none=True)  # drop grads an earlier phase left on these params (GAN: disc)
        finite = bool(torch.isfinite(phase.loss.detach()).item())
        if all_reduce_flag(not finite, self.device):
            return False
        loss = phase.loss / self.accum if self.accum > 1 else phase.loss
        sync = micro == self.accum - 1
        ctx = self.replica.no_sync() if self.replica is not None and not sync else contextlib.nullcontext()
        with ctx:
            if self.replica is not None:
                loss = self.replica(loss)
            self.scaler.scale(loss).backward()
        return True

    def _update(self, name: str, finite: bool) -> float:
        """The update of optimizer ``name`` from its accumulated, all-reduced gradients; returns the norm.

        fp16 follows ``torch.amp.GradScaler``: ``unscale_`` once per optimizer, clip, ``scaler.step``
        (which skips the update when the unscaled gradients hold inf/NaN); ``scaler.update()`` comes once
        per step, after every phase (:meth:`_update_scale`). Without fp16 a non-finite gradient norm skips
        the update and counts as a bad step, like a non-finite loss (``self.step_ok``)."""
        opt, params = self.optimizers[name], self.groups[name]
        if not finite:
            opt.zero_grad(set_to_none=True)
            return float("nan")
        self.scaler.unscale_(opt)
        norm = 0.0
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        lr = lr_at(self.step, self.cfg, self.peak_lr)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        if self.scaler.is_enabled():
            if self.cfg.grad_clip <= 0:  # the norm says which optimizer overflowed (inf/NaN gradients)
                norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            if not math.isfinite(norm):
                self.overflowed.append(name)
            self.scaler.step(opt)  # skipped by the scaler itself on an overflow (same on every rank)
            self.scaler_stepped = True
        else:
            grads_ok = math.isfinite(norm) if self.cfg.grad_clip > 0 else True
            if not all_reduce_flag(not grads_ok, self.device):
                opt.step()
            else:
                self.step_ok = False
        opt.zero_grad(set_to_none=True)
        return norm

    def _train_step(self, micro_batches: list[Any]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches: every phase's forward and backward for each
        micro-batch in turn (the graph of one is freed before the next), then that phase's update.

        Micro-batch ``m`` draws its randomness from ``step_seed(seed, step, m * world + rank)``, and each
        keeps its own RNG stream across its phases, so N ranks x ``accum`` micro-batches reproduce one rank
        with the same global batch. Sets ``self.step_ok``."""
        world, rank, n = self.dist.world_size, self.dist.rank, len(micro_batches)
        gens, rngs = [], []
        for m, batch in enumerate(micro_batches):
            torch.manual_seed(step_seed(self.cfg.seed, self.step, m * world + rank))
            gens.append(iter(self.task.train_step(batch, self.step)))
            rngs.append(_rng_snapshot(self.device) if n > 1 else None)
        self.step_ok, logs = True, {}
        while True:
            phases: list[Phase | None] = []
            finite = True
            for m, gen in enumerate(gens):
                if n > 1:
                    _rng_restore(rngs[m], self.device)
                with self.autocast():
                    phase = next(gen, None)
                if n > 1:
                    rngs[m] = _rng_snapshot(self.device)
                phases.append(phase)
                if phase is not None:
                    finite &= self._backward(phase, m)
                    for k, v in {f"loss/{phase.optimizer}": phase.loss, **phase.logs}.items():
                        logs[k] = logs.get(k, 0.0) + (float(v.detach()) if torch.is_tensor(v) else float(v)) / n
            if all(p is None for p in phases):
                return logs
            names = {p.optimizer if p is not None else None for p in phases}
            if len(names) != 1:
                raise RuntimeError(f"the task's micro-batches of step {self.step} yielded different phases "
                                   f"({sorted(map(str, names))}); train_step must yield the same phases for "
                                   "every batch of a step")
            name = phases[0].optimizer
            self.step_ok &= finite
            logs[f"grad_norm/{name}"] = self._update(name, finite)

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
            batch = batch.to(self.device, non_blocking=True)
            if self.cfg.channels_last and batch.dim() == 4 and batch.is_floating_point():
                batch = batch.contiguous(memory_format=torch.channels_last)
            return batch
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
        self.replica = replicate(self.modules, self.dist)  # after resume: DDP broadcasts rank 0's weights
        if self.dist.is_main and (self.accum > 1 or self.dist.enabled or cfg.global_batch is not None):
            print(f"[train] global batch {self.global_batch} = {self.dist.world_size} rank(s) x "
                  f"{cfg.batch_size} x {self.accum} accumulation step(s); peak lr {self.peak_lr:.4g} "
                  f"({cfg.lr_scaling.value})", file=sys.stderr)
        old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                old_handlers[sig] = signal.signal(sig, self.request_stop)
        logger = MetricsLogger(self.run_dir, self.dist.is_main, cfg.tensorboard)
        workers = cfg.num_workers > 0
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=cfg.num_workers,
                            collate_fn=self.collate_fn, pin_memory=cfg.pin_memory and self.device.type == "cuda",
                            persistent_workers=workers and cfg.persistent_workers,
                            prefetch_factor=cfg.prefetch_factor if workers else None,
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
                micro = [self._to_device(next(data)) for _ in range(self.accum)]
                self.batches_trained += 1
                logs = self._train_step(micro)
                step_ok = self.step_ok
                if self._update_scale():  # fp16: once per step, after every optimizer stepped
                    logs = {k: v for k, v in logs.items() if math.isfinite(v) or not k.startswith("grad_norm/")}
                seen += sum(len(b[0]) if isinstance(b, (list, tuple)) else cfg.batch_size for b in micro)
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
                    last.update({"lr": lr_at(self.step - 1, cfg, self.peak_lr), "images_per_s": seen * self.dist.world_size / dt})
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

"""torch.distributed set-up from torchrun or Slurm environment variables, and small collectives.

``init_distributed()`` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun) or, failing those, the
variables of an ``srun`` job step (``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``/``SLURM_LOCALID``); a single
process needs neither, and an allocation's batch script outside ``srun`` runs as one process.
Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n, "").strip().isdigit():
            return int(os.environ[n])
    return None


def _ranks_from_env() -> tuple[int, int, int]:
    """``(world, rank, local rank)``: torchrun's variables, else those of an ``srun`` job step.

    Only a step launched by ``srun`` counts: the batch script of an allocation of several tasks has
    ``SLURM_NTASKS`` > 1 but runs once, so reading it there would wait forever for ranks that never start.
    That case runs one process and says so."""
    if _env_int("WORLD_SIZE") is not None:
        return _env_int("WORLD_SIZE") or 1, _env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0
    if _env_int("SLURM_STEP_ID") is not None and _env_int("SLURM_STEP_NUM_TASKS") is not None:
        return (_env_int("SLURM_STEP_NUM_TASKS") or 1, _env_int("SLURM_PROCID") or 0,
                _env_int("SLURM_LOCALID") or 0)
    tasks = _env_int("SLURM_NTASKS") or 1
    if tasks > 1:
        print(f"[dist] running one process: this Slurm allocation has {tasks} tasks but this process was not "
              "started by srun (nor torchrun); start it with `srun alit ...` (or torchrun) to use every task",
              file=sys.stderr, flush=True)
    return 1, 0, 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group if the environment describes one; pick this process's device."""
    world, rank, local = _ranks_from_env()
    if device == "auto":
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", str(29500 + (_env_int("SLURM_JOB_ID") or 0) % 1000))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def all_reduce_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s value on every rank (control values only, never tensors of a model)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """A barrier when running distributed, else nothing."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

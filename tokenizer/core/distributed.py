"""torch.distributed set-up from torchrun or Slurm environment variables, and small collectives.

``init_distributed()`` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun) or, failing those,
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (srun); a single process needs neither.
Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
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


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group if the environment describes one; pick this process's device."""
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
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

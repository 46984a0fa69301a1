"""Distributed set-up: one process per device under ``torchrun``, DDP, rank 0 logs and saves.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them training runs as a single process.
NCCL is used on GPUs, gloo on the CPU.
"""

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from birder.errors import BirderError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False  # created by init_distributed, so destroyed by cleanup_distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the ``torchrun`` process group if there is one, and pick this process's device.

    ``device``: ``"cpu"``, ``"cuda"`` (this process's GPU: ``cuda:<LOCAL_RANK>``), ``"cuda:N"``, or None (a GPU
    when there is one).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise BirderError(f"device '{device}' asked for, but no CUDA GPU is available")
        if target.index is None:
            target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)

    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=target if target.type == "cuda" else None)
        owns_group = True

    return DistInfo(rank, world_size, local_rank, target, owns_group)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` joined it (not one the caller set up)."""
    if info.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str | None = None) -> Iterator[DistInfo]:
    """:func:`init_distributed` for the ``with`` block, then :func:`cleanup_distributed`, also after an error."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        cleanup_distributed(info)


def setup_logging(level: int = logging.INFO) -> None:
    """Rank 0 logs at ``level``; the other ranks of a ``torchrun`` job only warnings and errors, prefixed with
    their rank. Reads the environment, so it can run before the process group exists."""
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return model

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (a no-op in a single process)."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    return tensor


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not info.distributed:
        return [obj]

    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]

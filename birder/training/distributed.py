"""Training's part of running under ``torchrun``: DDP wrapping and rank-aware logging.

Devices, process groups and collectives are shared with prediction: :mod:`birder.distributed`.
"""

import logging
import os

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from birder.distributed import DistInfo


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

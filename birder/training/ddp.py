"""Training's part of running under ``torchrun``: DDP wrapping and rank-aware logging.

Devices, process groups and collectives are shared with prediction: :mod:`birder.distributed`.
"""

import logging
import os
from collections.abc import Iterable

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from birder.distributed import DistInfo, all_gather_objects
from birder.log_setup import configure_logging


def setup_logging(level: int = logging.INFO) -> None:
    """Rank 0 logs at ``level``; the other ranks of a ``torchrun`` job only warnings and errors, prefixed with
    their rank. Reads the environment, so it can run before the process group exists."""
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    configure_logging(
        level if rank == 0 else logging.WARNING,
        f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    if not info.distributed:
        return model

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def distinct_over_ranks(items: Iterable[str], info: DistInfo) -> frozenset[str]:
    """The distinct ``items`` of every rank (a collective call: every rank must make it).

    For unreadable images, named by their error messages: a file met on two ranks (a padded epoch repeats a few
    samples) or twice on one (a replacement walked over it) counts once.
    """
    gathered = all_gather_objects(sorted(set(items)), info)
    return frozenset(item for rank_items in gathered for item in rank_items)

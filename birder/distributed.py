"""Devices and ``torchrun`` jobs, shared by prediction and training.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them everything runs as one process and
every helper here is a no-op. GPUs talk over NCCL, CPUs over gloo. Collectives that carry Python objects only
ever go from rank 0 to the others, so a job agrees on one answer (a file list, a downloaded model, an error).
"""

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from birder.errors import BirderError

DEVICES = ("auto", "cpu", "cuda", "mps")
T = TypeVar("T")


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` (or None) picks CUDA, then Apple's MPS, then the CPU; ``cuda`` under ``torchrun`` is this rank's
    GPU; ``cuda:N`` is that GPU (checked to exist). Bad names raise a one-line :class:`BirderError`."""
    name = name or "auto"
    if name.startswith("cuda:"):
        return _numbered_gpu(name)
    if name not in DEVICES:
        raise BirderError(f"unknown device '{name}'; choose one of: {', '.join(DEVICES)} (or cuda:N)")

    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"

    if name == "cuda":
        if not torch.cuda.is_available():
            raise BirderError("device 'cuda': no CUDA GPU is available on this machine (try auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" and not torch.backends.mps.is_available():
        raise BirderError("device 'mps': Apple's MPS backend is not available on this machine (try auto)")

    return torch.device(name)


def _numbered_gpu(name: str) -> torch.device:
    """``cuda:N``, checked here: torch's own errors for a bad one are tracebacks, not messages for a user."""
    index = name.removeprefix("cuda:")
    if not index.isdigit():
        raise BirderError(f"device '{name}': expected cuda:N with N a GPU number, e.g. cuda:0")
    if not torch.cuda.is_available():
        raise BirderError(f"device '{name}': no CUDA GPU is available on this machine (try auto)")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise BirderError(f"device '{name}': this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")

    return torch.device("cuda", int(index))


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` job (rank 0 of 1 when run on its own), and its device."""

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


def init_distributed(device: str | None = "auto", *, timeout: timedelta | None = None) -> DistInfo:
    """Join the ``torchrun`` process group if there is one, and pick this process's device.

    ``timeout`` bounds how long a collective waits for the slowest rank (torch's default when None).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)

    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        options: dict[str, Any] = {"device_id": target} if target.type == "cuda" else {}
        if timeout is not None:
            options["timeout"] = timeout
        dist.init_process_group(backend, **options)
        owns_group = True

    return DistInfo(rank, world_size, local_rank, target, owns_group)


def cleanup_distributed(info: DistInfo) -> None:
    """Leave the process group if :func:`init_distributed` joined it (not one the caller set up)."""
    if info.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str | None = "auto", *, timeout: timedelta | None = None) -> Iterator[DistInfo]:
    """:func:`init_distributed` for the ``with`` block, then :func:`cleanup_distributed`, also after an error."""
    info = init_distributed(device, timeout=timeout)
    try:
        yield info
    finally:
        cleanup_distributed(info)


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


def broadcast_object(obj: T | None, info: DistInfo) -> T:
    """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None)."""
    if not info.distributed:
        return obj  # type: ignore[return-value]

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]  # type: ignore[return-value]


class RankZeroFailedError(BirderError):
    """Raised on the other ranks when rank 0 failed in :func:`main_first` or :func:`compute_on_main`.

    Rank 0 reports the cause (its own error, with a traceback unless it is a :class:`BirderError`); this error
    only ends the other ranks, without repeating it.
    """


def main_first(info: DistInfo, function: Callable[[], T]) -> T:
    """Run ``function`` on rank 0, then on the others: a download or a check happens once, not once per rank.

    Any error on rank 0 is raised there and ends the other ranks too (:class:`RankZeroFailedError`).
    """
    if not info.distributed:
        return function()

    result = _run_on_main(info, function, share_result=False)
    return result if info.is_main else function()  # type: ignore[return-value]


def compute_on_main(info: DistInfo, function: Callable[[], T]) -> T:
    """``function()`` computed on rank 0 only and shared with every rank; any error on rank 0 is raised there and
    ends the other ranks too (:class:`RankZeroFailedError`).

    For work that must be done once and agreed on, like listing the photos and deciding what is left to do.
    """
    if not info.distributed:
        return function()

    return _run_on_main(info, function, share_result=True)  # type: ignore[return-value]


def _run_on_main(info: DistInfo, function: Callable[[], T], *, share_result: bool) -> T | None:
    """Rank 0 runs ``function`` and tells every rank how it went: ``(True, result or None)`` or ``(False, the
    error's type)``. The others wait for that news in any case, so rank 0 sends it whatever happens: an error
    it did not send would leave them blocked until the collective timeout (hours)."""
    if info.is_main:
        try:
            result = function()
            # Pickled here, inside the try: a result that cannot be pickled is a failure the others must hear of.
            news = pickle.dumps((True, result if share_result else None))
        except Exception as exc:  # not KeyboardInterrupt: torchrun passes Ctrl-C to every rank itself
            _send_failure(info, exc)
            raise
        broadcast_object(news, info)
        return result

    (ok, value) = pickle.loads(broadcast_object(None, info))
    if not ok:
        raise RankZeroFailedError(f"rank 0 failed ({value}; reported by rank 0), so rank {info.rank} stops too")

    return value


def _send_failure(info: DistInfo, exc: Exception) -> None:
    # Best effort: if the broadcast itself fails (the group is broken), rank 0's original error is what matters.
    with contextlib.suppress(Exception):
        broadcast_object(pickle.dumps((False, type(exc).__name__)), info)

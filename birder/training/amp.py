"""Automatic mixed precision: bf16 or fp16 autocast, with a gradient scaler for fp16 only."""

import contextlib

import torch

from birder.inference.optimize import AMP_DTYPES, autocast_dtype

__all__ = ["AMP_DTYPES", "amp_dtype", "autocast", "grad_scaler"]


def amp_dtype(name: str | None, device: torch.device | None = None) -> torch.dtype | None:
    """``"bf16"``, ``"fp16"``, ``"auto"`` (a bare ``--amp``: float16 on GPUs, bfloat16 on the CPU; needs
    ``device``) or None (full float32)."""
    return autocast_dtype(name, device if device is not None else torch.device("cpu"))


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()

    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None, *, sharded: bool = False) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none (disabled scaler).

    ``sharded`` (FSDP): each rank holds only its shard of the gradients, so whether one overflowed is agreed over
    all ranks before a step is skipped (FSDP's sharded scaler); otherwise ranks could disagree and diverge.
    """
    if sharded and dtype == torch.float16:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

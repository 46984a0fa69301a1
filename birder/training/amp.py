"""Automatic mixed precision: bf16 or fp16 autocast, with a gradient scaler for fp16 only."""

import contextlib

import torch

from birder.errors import BirderError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"``, ``"fp16"`` or None (full float32)."""
    if name is None:
        return None
    if name not in AMP_DTYPES:
        raise BirderError(f"unknown AMP dtype '{name}' (choose one of: {', '.join(AMP_DTYPES)})")

    return AMP_DTYPES[name]


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

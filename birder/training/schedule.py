"""Learning-rate schedule: linear warm-up, then cosine decay to a floor, stepped once per optimizer step."""

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosine:
    """lr multiplier at optimizer step ``step`` (a plain object: its settings are saved with the scheduler)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps))
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps

        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> LambdaLR:
    """Each group's lr (already scaled by layer decay) warms up linearly, then follows a cosine down to
    ``min_lr`` times the same scale."""
    base_lr = max(group["lr"] for group in optimizer.param_groups)
    ratio = min_lr / base_lr if base_lr > 0 else 0.0
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, ratio))


def epoch_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batches_per_epoch: int,
    accumulation_steps: int,
    warmup_epochs: float,
    min_lr: float,
) -> LambdaLR:
    """:func:`cosine_with_warmup` planned in epochs (warm-up may be a fraction of one), stepped per optimizer step."""
    steps = math.ceil(batches_per_epoch / accumulation_steps)
    return cosine_with_warmup(optimizer, epochs * steps, round(warmup_epochs * steps), min_lr=min_lr)

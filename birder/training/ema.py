"""Exponential moving average (EMA) of a model's weights, evaluated and saved instead of the raw weights."""

import copy

import torch
from torch import nn


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so a short run (or
    the first epochs of a long one) is not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float, *, module: nn.Module | None = None) -> None:
        """``module``: the copy to average into, when ``model`` cannot simply be deep-copied (a sharded copy
        under FSDP, :func:`birder.training.fsdp.shard_model`)."""
        self.decay = decay
        self.updates = 0
        self.module = (module if module is not None else copy.deepcopy(model)).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        source = model.state_dict()
        for key, ema_value in self.module.state_dict().items():
            value = source[key].detach()
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.updates = state["updates"]
        self.module.load_state_dict(state["module"])

"""Optimizers and their parameter groups: no weight decay on norms, biases and tokens; layer-wise lr decay.

What a parameter is comes from the network itself (its training hooks, :class:`birder.net.base.BaseNet`):
``no_weight_decay()`` names the learned tokens and position embeddings, ``layer_id(name)`` places a parameter in
one of ``num_layer_ids`` layers (stem first, head last). Layer ``i`` of ``L`` trains at ``lr * decay ** (L - 1 - i)``,
so the head learns at the full rate and the stem barely moves.
"""

from collections.abc import Iterable

import torch
from torch import nn

from birder.errors import BirderError

OPTIMIZERS = ("adamw", "sgd")


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Optimizer groups of the trainable parameters of ``model``, each with its own ``lr`` and ``weight_decay``."""
    num_layer_ids = getattr(model, "num_layer_ids", 0)
    if layer_decay is not None and not num_layer_ids:
        raise BirderError(f"layer-wise lr decay needs a network with layers (a ViT), not {type(model).__name__}")

    undecayed_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue

        layer = model.layer_id(name) if layer_decay is not None else 0
        # Biases and norm weights (1-D) are never decayed, nor what the network names.
        decayed = param.ndim > 1 and name not in undecayed_names
        scale = layer_decay ** (num_layer_ids - 1 - layer) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (layer, decayed),
            {"params": [], "lr": lr * scale, "weight_decay": weight_decay if decayed else 0.0, "layer": layer},
        )
        group["params"].append(param)

    if not groups:
        raise BirderError("no trainable parameters (is the whole network frozen?)")

    return [groups[key] for key in sorted(groups)]


def build_optimizer(
    name: str,
    groups: Iterable[dict],
    *,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """``adamw`` or ``sgd`` (with momentum) over prepared parameter groups."""
    groups = list(groups)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)

    raise BirderError(f"unknown optimizer '{name}' (choose one of: {', '.join(OPTIMIZERS)})")

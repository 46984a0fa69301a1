"""Optimizers and their parameter groups: no weight decay on norms, biases and tokens; layer-wise lr decay.

Layer-wise lr decay (fine-tuning a pretrained ViT): the layers are ``[stem, position embedding, class/register
tokens]``, blocks ``0..N-1``, ``[final norm, head]``; layer ``i`` of ``N + 2`` trains at ``lr * decay ** (N + 1 - i)``,
so the head learns at the full rate and the stem barely moves.
"""

import re
from collections.abc import Iterable

import torch
from torch import nn

from birder.errors import BirderError

OPTIMIZERS = ("adamw", "sgd")
_BLOCK_KEY = re.compile(r"(?:^|\.)encoder\.block\.(\d+)\.")
_STEM_NAMES = ("conv_proj", "pos_embedding", "class_token", "reg_tokens", "pre_norm")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and learned tokens / position embeddings are not decayed."""
    return param.ndim <= 1 or name.split(".")[-1] in ("pos_embedding", "class_token", "reg_tokens", "mask_token")


def vit_layer_id(name: str, num_layers: int) -> int:
    """The layer-decay layer of a ViT parameter: 0 stem and tokens, 1..N blocks, N+1 final norm and head."""
    block = _BLOCK_KEY.search(name)
    if block is not None:
        return int(block.group(1)) + 1
    if name.split(".")[0] in _STEM_NAMES:
        return 0

    return num_layers + 1


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Optimizer groups of the trainable parameters of ``model``, each with its own ``lr`` and ``weight_decay``."""
    num_layers = getattr(model, "num_layers", None)
    if layer_decay is not None and (num_layers is None or not hasattr(model, "encoder")):
        raise BirderError(f"layer-wise lr decay needs a ViT, not {type(model).__name__}")

    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue

        layer = vit_layer_id(name, num_layers) if layer_decay is not None else 0
        decayed = not no_weight_decay(name, param)
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay is not None else 1.0
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

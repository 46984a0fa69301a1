"""Detector files: a ``.pt`` / ``.safetensors`` checkpoint that rebuilds its detector without being told anything.

The metadata is the classifiers' (:func:`birder.io.checkpoint.build_metadata`: task ``object_detection``, the
head's name and config override, signature with input size and class count, ``class_to_idx``, ``rgb_stats``)
plus the backbone's name and config override (``backbone``, ``backbone_config``, JSON).
"""

import json
from pathlib import Path
from typing import Any

import torch

from birder.errors import CheckpointError
from birder.io.checkpoint import (
    ModelInfo,
    build_metadata,
    get_channels_from_signature,
    get_num_classes_from_signature,
    get_size_from_signature,
    model_info_from_metadata,
    read_checkpoint,
    write_checkpoint,
)
from birder.model_registry import registry
from birder.net.detection.base import DetectionBaseNet
from birder.tasks import Task


def save_detector(net: DetectionBaseNet, path: str | Path, model_info: ModelInfo) -> Path:
    """Write ``net`` and its metadata to ``path`` (``.pt`` or ``.safetensors``) atomically."""
    metadata = build_metadata(net, model_info, task=Task.OBJECT_DETECTION.value)
    metadata["backbone"] = net.backbone_name
    metadata["backbone_config"] = json.dumps(net.backbone_config or {})
    return write_checkpoint(path, net.state_dict(), metadata)


def load_detector(
    path: str | Path, *, inference: bool = False, device: torch.device | str | None = None
) -> tuple[DetectionBaseNet, ModelInfo]:
    """Rebuild the detector of a :func:`save_detector` file (on the meta device, then memory-mapped weights)."""
    from birder.loading import load_state_into  # loading imports the network families; not needed before now

    (state, metadata) = read_checkpoint(path)
    if metadata.get("task") != Task.OBJECT_DETECTION.value or "backbone" not in metadata:
        raise CheckpointError(
            f"{path}: not a detector file (task {metadata.get('task')!r}); load it with load_model "
            "(on the command line: -n/--weights, beside a birder-train-det file given with --detector)"
        )

    signature = metadata["signature"]
    size = get_size_from_signature(signature)
    backbone_config: dict[str, Any] = json.loads(metadata.get("backbone_config") or "{}")
    with torch.device("meta"):
        backbone = registry.net_factory(
            metadata["backbone"], 0, get_channels_from_signature(signature), config=backbone_config or None, size=size
        )
        net = registry.detection_net_factory(
            metadata["network"],
            get_num_classes_from_signature(signature),
            backbone,
            config=metadata.get("config") or None,
            size=size,
        )

    load_state_into(net, state, str(path))
    if device is not None:
        net = net.to(device)
    if inference:
        net.eval()
        net.requires_grad_(False)

    return (net, model_info_from_metadata(metadata))

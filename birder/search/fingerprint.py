"""What makes two models give the same embeddings: their weights and their preprocessing, hashed.

Not the file's bytes: re-saving a model, converting it to safetensors or re-calibrating it (metadata only) leaves
the embeddings unchanged, so it must leave the index valid too.
"""

import hashlib
import json
from typing import Any

import torch


def preprocessing_of(transform: Any) -> dict[str, Any]:
    """The settings of a ``ClassificationTransform`` that change the network's input."""
    return {
        "size": list(transform.size),
        "rgb_stats": {key: list(value) for key, value in transform.rgb_stats.items()},
        "center_crop": transform.center_crop,
        "simple_crop": transform.simple_crop,
    }


def model_fingerprint(net: torch.nn.Module, transform: Any) -> str:
    """sha256 of the network's name and config, every weight tensor (name, dtype, shape, values) and preprocessing."""
    digest = hashlib.sha256()
    header = {
        "network": getattr(net, "network_name", type(net).__name__),
        "config": getattr(net, "config", None),
        "preprocessing": preprocessing_of(transform),
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        # Bytes of the values as stored (a bfloat16 view where numpy has no such dtype)
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()

"""Classification inference: the card's ``infer_image`` and ``infer_batch``.

Always runs under ``torch.inference_mode()`` so it works on a network loaded without ``inference=True`` (the
reference fails there: docs/compatibility.md, "Known defects of the reference not copied"), and moves inputs to
the network's device and floating dtype.
"""

import os
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image

from birder.data.transforms import tta_crops
from birder.io.images import load_image
from birder.net.base import BaseNet

NUM_TTA_CROPS = 5


def _net_device_and_dtype(net: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(net.parameters())
    return (param.device, param.dtype)


def _to_numpy(tensor: torch.Tensor) -> npt.NDArray[np.float32]:
    return tensor.float().cpu().numpy()


def infer_batch(
    net: BaseNet,
    inputs: torch.Tensor,
    return_embedding: bool = False,
    tta: bool = False,
    return_logits: bool = False,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """Classify a batch of transformed images ``[B, C, H, W]``.

    Returns ``(probabilities [B, classes], embedding [B, D] or None)`` as float32 numpy arrays; logits instead
    of probabilities with ``return_logits``. With ``tta`` the softmax of five 0.8-side crops is averaged (logits
    and embeddings are averaged too).
    """
    (device, dtype) = _net_device_and_dtype(net)
    with torch.inference_mode():
        inputs = inputs.to(device=device, dtype=dtype, non_blocking=True)
        batch_size = inputs.shape[0]
        if tta:
            inputs = tta_crops(inputs)  # [B * 5, C, H, W], the 5 views of each image together

        embedding = net.embedding(inputs)
        logits = net.classify(embedding)
        output = logits if return_logits else F.softmax(logits.float(), dim=1)
        if tta:
            output = output.reshape(batch_size, NUM_TTA_CROPS, -1).mean(dim=1)
            embedding = embedding.reshape(batch_size, NUM_TTA_CROPS, -1).mean(dim=1)

        return (_to_numpy(output), _to_numpy(embedding) if return_embedding else None)


def infer_image(
    net: BaseNet,
    image: str | os.PathLike | Image.Image,
    transform: Callable[[Image.Image], torch.Tensor],
    return_embedding: bool = False,
    tta: bool = False,
    return_logits: bool = False,
    device: torch.device | str | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """Classify one photo (a path or a PIL image in any mode); returns arrays with a batch dimension of 1.

    ``device`` moves the network there first (by default it stays where it is).
    """
    if device is not None:
        net.to(device)

    tensor = transform(load_image(image)).unsqueeze(0)
    return infer_batch(net, tensor, return_embedding=return_embedding, tta=tta, return_logits=return_logits)

"""``explain``: a photo's explanation map at the network's input resolution and on the photo itself.

The network sees the photo through its transform (resize, then center crop: :mod:`birder.data.transforms`); the map
on the photo undoes both, so it lines up with the pixels a user looks at. Parts of the photo the crop cut away get
0 (the network never saw them).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image

from birder.data.transforms import _resized_size
from birder.errors import BirderError
from birder.introspection.attention import attention_rollout, check_vit, scale_each
from birder.introspection.gradcam import grad_cam
from birder.io.images import load_image

EXPLAIN_METHODS = ("rollout", "hirescam", "gradcam", "layercam")


@dataclass(frozen=True)
class Explanation:
    """One photo's explanation: maps in [0, 1], the class explained and the model's probabilities."""

    method: str
    target: int  # the class explained (the top one unless asked otherwise)
    probabilities: npt.NDArray[np.float32]  # [num_classes]
    input_map: npt.NDArray[np.float32]  # [H, W] over the network's input
    photo_map: npt.NDArray[np.float32]  # [photo height, photo width]; 0 where the crop cut the photo away


def _check_method(method: str) -> None:
    if method not in EXPLAIN_METHODS:
        raise BirderError(f"unknown explanation method '{method}'; choose one of: {', '.join(EXPLAIN_METHODS)}")


def explain_tensor(
    net: torch.nn.Module, inputs: torch.Tensor, method: str = "rollout", targets: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps ``[B, H, W]`` (input resolution, [0, 1]) and probabilities ``[B, classes]`` of transformed images.

    ``targets`` (one class per image) matter to Grad-CAM and LayerCAM; rollout is class-agnostic. Default: each
    image's top class.
    """
    _check_method(method)
    vit = check_vit(net)
    param = next(vit.parameters())
    inputs = inputs.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        probabilities = F.softmax(vit(inputs).float(), dim=1).cpu()
    if targets is None:
        targets = probabilities.argmax(dim=1).tolist()

    if method in ("gradcam", "hirescam", "layercam"):
        return (grad_cam(vit, inputs, targets, method), probabilities)

    grid = attention_rollout(vit, inputs).float().cpu()
    upsampled = F.interpolate(grid.unsqueeze(1), size=inputs.shape[-2:], mode="bilinear", align_corners=False)
    return (scale_each(upsampled.squeeze(1)), probabilities)


def explain(
    net: torch.nn.Module,
    image: str | os.PathLike | Image.Image,
    transform: Callable[[Image.Image], torch.Tensor],
    method: str = "rollout",
    target: int | None = None,
) -> Explanation:
    """Explain the network's answer on one photo (a path or a PIL image) with ``method``: ``rollout`` (attention
    rollout), ``hirescam``, ``gradcam`` or ``layercam`` (gradient maps of one class on the last block's patch tokens).

    ``target``: the class to explain (Grad-CAM, LayerCAM), by default the most probable one. ``transform`` is the
    model's ``classification_transform``; its resize and crop are undone for the map on the photo.
    """
    _check_method(method)
    photo = load_image(image)
    tensor = transform(photo).unsqueeze(0)
    (maps, probabilities) = explain_tensor(net, tensor, method, None if target is None else [target])
    chosen = int(probabilities[0].argmax()) if target is None else int(target)
    input_map = maps[0].numpy().astype(np.float32)
    photo_map = map_to_photo(input_map, (photo.height, photo.width), transform)
    return Explanation(method, chosen, probabilities[0].numpy(), input_map, photo_map)


# ---------------------------------------------------------------------------------------------------------------------
# From the input back to the photo
# ---------------------------------------------------------------------------------------------------------------------


def _crop_origin(resized: int, crop: int) -> int:
    """Where the crop starts in the resized image (negative: zero padding), as the transform's center crop does."""
    if crop > resized:
        return -((crop - resized) // 2)
    return round((resized - crop) / 2.0)


def _axis_matrix(samples: int, resized_len: int, crop_len: int, origin: int) -> npt.NDArray[np.float32]:
    """``[samples, crop_len]`` linear-interpolation weights: ``samples`` points evenly over a photo axis -> input
    pixels (none outside the crop). A photo axis spans ``resized_len`` input pixels, whatever its own length."""
    centres = (np.arange(samples) + 0.5) * (resized_len / samples) - 0.5 - origin  # in input pixels
    matrix = np.zeros((samples, crop_len), dtype=np.float32)
    inside = (centres >= -0.5) & (centres <= crop_len - 0.5)
    position = np.clip(centres, 0, crop_len - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, crop_len - 1)
    frac = (position - low).astype(np.float32)
    rows = np.nonzero(inside)[0]
    matrix[rows, low[rows]] += 1.0 - frac[rows]
    matrix[rows, high[rows]] += frac[rows]
    return matrix


def map_to_photo(
    input_map: npt.NDArray[np.float32],
    photo_size: tuple[int, int],
    transform: Any,
    out_size: tuple[int, int] | None = None,
) -> npt.NDArray[np.float32]:
    """An ``[H, W]`` map over the network's input -> ``photo_size`` ``(height, width)``, undoing resize and crop.

    ``out_size`` ``(height, width)``: the map over the whole photo drawn at that size instead (a preview of a
    large photo: the memory is that of ``out_size``, not of the photo).
    ``transform`` needs ``size``, ``center_crop`` and ``simple_crop`` (a ``ClassificationTransform``); any other
    callable is taken as a plain resize of the whole photo to the input size.
    """
    (crop_h, crop_w) = input_map.shape
    (photo_h, photo_w) = photo_size
    (out_h, out_w) = out_size if out_size is not None else photo_size
    if all(hasattr(transform, name) for name in ("size", "center_crop", "simple_crop")):
        (resized_h, resized_w) = _resized_size(
            photo_h, photo_w, tuple(transform.size), transform.center_crop, transform.simple_crop
        )
    else:
        (resized_h, resized_w) = (crop_h, crop_w)

    # Resize and crop act on each axis alone, so the inverse is one matrix per axis: rows @ map @ columns^T
    rows = _axis_matrix(out_h, resized_h, crop_h, _crop_origin(resized_h, crop_h))
    columns = _axis_matrix(out_w, resized_w, crop_w, _crop_origin(resized_w, crop_w))
    return (rows @ input_map.astype(np.float32) @ columns.T).astype(np.float32, copy=False)


def preview_size(photo_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``photo_size`` ``(height, width)`` scaled down (never up) so that its longer side is at most ``max_side``."""
    (height, width) = photo_size
    scale = min(1.0, max_side / max(height, width))
    return (max(1, round(height * scale)), max(1, round(width * scale)))

"""Detection inference: one photo in, boxes in that photo's own pixels out.

>>> (det_net, info) = load_detector("det.pt", inference=True)
>>> transform = detection_transform(det_net.size, info.rgb_stats)
>>> result = infer_image(det_net, "photo.jpg", transform)   # result.boxes [N, 4] xyxy, .scores, .labels
"""

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import nms

# The transform is built in the data layer (training's detection datasets share it); it is imported from here too
from birder.data.transforms import detection_transform as detection_transform
from birder.io.images import load_image

ImageInput = str | Path | Image.Image

# Boxes of different detector classes overlapping by more than this are one object: the detector's own suppression
# works within a class, so one animal scored as two similar classes would otherwise become two rows (two
# individuals in a count). 0.5 is the IoU at which COCO calls two boxes the same object.
MERGE_IOU = 0.5
# What one forward pass on the CPU may pool. Faster R-CNN's box head pools fpn_channels x 7 x 7 float32 features for
# each of the RPN's proposals (1000 a photo by default: 50 MB a photo at 256 channels), held twice while pooled. A
# loader batch of 32 photos in one pass took 4.6 GB for the card-shaped detector (vit_b16 at 512 px); 4 photos a pass
# 1.8 GB, and no slower (0.45 against 0.47 s a photo on 2 cores of a Xeon with AMX). A small head (32 channels, 30
# proposals) stays well under the budget and keeps its whole batch: many small passes would cost it time. GPUs take
# the batch whole: throughput grows with it there.
CPU_POOLED_BYTES_PER_PASS = 256 * 2**20


class Detections(NamedTuple):
    boxes: torch.Tensor  # [N, 4] float, (x1, y1, x2, y2) in the original photo's pixels
    scores: torch.Tensor  # [N], descending
    labels: torch.Tensor  # [N] class indices (the model's class_to_idx)


def rescale_boxes(boxes: torch.Tensor, from_hw: Sequence[int], to_hw: Sequence[int]) -> torch.Tensor:
    """xyxy ``boxes`` in an image of ``from_hw`` pixels -> the same boxes in the image resized to ``to_hw``."""
    scale = torch.tensor([to_hw[1] / from_hw[1], to_hw[0] / from_hw[0]] * 2, dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


def detect_tensors(
    det_net: torch.nn.Module,
    tensors: Sequence[torch.Tensor],
    photo_sizes: Sequence[tuple[int, int]],
    *,
    score_threshold: float = 0.0,
    merge_iou: float | None = MERGE_IOU,
) -> list[Detections]:
    """Detect objects in transformed photos (``[C, H, W]`` each); each photo's boxes in its own original pixels
    (``photo_sizes``: ``(height, width)``), clipped to it, on the CPU, scores at least ``score_threshold``, best first.

    ``merge_iou``: boxes of any classes that overlap the photo's better-scoring box by more than this IoU are merged
    into it (class-agnostic suppression: the kept box keeps its own class and score); ``None`` keeps every box.

    ``det_net`` may run its backbone in bfloat16 (:func:`birder.inference.model.load_for_inference` with a
    ``dtype``); inputs are given in its head's dtype (float32) and boxes come back in float32 either way.

    Photos of the same transformed size run in one forward pass (on the CPU, as many as :func:`photos_per_pass`
    allows); others apart: a batch of different sizes would be padded to the largest, and the backbone's global
    attention would see the padding, so a photo's boxes would depend on the photos it was batched with.
    """
    reference = next(det_net.parameters())
    # The head's dtype: a detector whose backbone runs in bfloat16 takes float32 inputs (its box operations do)
    input_dtype = getattr(det_net, "input_dtype", reference.dtype)
    padded = [_pad_thin(det_net, tensor) for tensor in tensors]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, tensor in enumerate(padded):
        by_shape.setdefault(tuple(tensor.shape), []).append(index)

    per_pass = photos_per_pass(det_net, reference.device) or len(padded)
    outputs: dict[int, dict[str, torch.Tensor]] = {}
    with torch.inference_mode():
        for same_shape in by_shape.values():
            for start in range(0, len(same_shape), per_pass):
                indices = same_shape[start : start + per_pass]
                batch = [padded[i].to(device=reference.device, dtype=input_dtype) for i in indices]
                outputs.update(zip(indices, det_net(batch), strict=True))

    results = []
    for index, (tensor, photo_hw) in enumerate(zip(tensors, photo_sizes, strict=True)):
        output = outputs[index]
        keep = output["scores"] >= score_threshold
        boxes = rescale_boxes(output["boxes"][keep].float().cpu(), tensor.shape[-2:], photo_hw)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, photo_hw[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, photo_hw[0])
        found = Detections(boxes, output["scores"][keep].float().cpu(), output["labels"][keep].cpu())
        results.append(found if merge_iou is None else merge_across_classes(found, merge_iou))
    return results


def photos_per_pass(det_net: torch.nn.Module, device: torch.device) -> int | None:
    """Photos one forward pass of ``det_net`` takes on ``device``: on the CPU as many as keep the box head's pooled
    features under :data:`CPU_POOLED_BYTES_PER_PASS` (at least one); None (the whole batch) elsewhere, or for a head
    that pools nothing."""
    pooled = getattr(det_net, "pooled_bytes_per_photo", lambda: 0)()
    if device.type != "cpu" or pooled <= 0:
        return None
    return max(1, CPU_POOLED_BYTES_PER_PASS // pooled)


def merge_across_classes(found: Detections, iou: float = MERGE_IOU) -> Detections:
    """One box per object whatever class the detector gave it: of boxes overlapping by more than ``iou``, the
    best-scoring one is kept with its class and score. The result stays ordered best first."""
    if len(found.scores) < 2:
        return found
    kept = nms(found.boxes, found.scores, iou)  # indices by decreasing score
    return Detections(found.boxes[kept], found.scores[kept], found.labels[kept])


def _pad_thin(det_net: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` ``[C, H, W]``, padded with zeros (the mean colour, once normalised) at the bottom or the right
    when it is so thin that the detector's own resize (long side to at most ``max(det_net.size)``) would leave its
    short side under two patches: the feature pyramid's coarser levels would be empty and the network would fail.
    The padding lies outside the photo's box coordinates (they start at the top left), which are clipped to it.
    """
    (patch, size) = (getattr(det_net, "patch_size", None), getattr(det_net, "size", None))
    if not isinstance(patch, int) or not size:
        return tensor
    (height, width) = tensor.shape[-2:]
    # floor(short * max_size / long) must reach patch + 1 pixels: padded to the patch size, two patches
    shortest = math.ceil((patch + 2) * max(height, width) / max(size))
    if min(height, width) >= shortest:
        return tensor
    if height < width:
        return F.pad(tensor, (0, 0, 0, shortest - height))
    return F.pad(tensor, (0, shortest - width, 0, 0))


def infer_image(
    det_net: torch.nn.Module,
    image: ImageInput,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    score_threshold: float = 0.0,
    merge_iou: float | None = MERGE_IOU,
) -> Detections:
    """Detect objects in one photo: the detector counterpart of :func:`birder.inference.classification.infer_image`.

    Args:
        det_net: a detector (:func:`~birder.net.detection.checkpoint.load_detector`), in eval mode.
        image: a path or a PIL image; decoded by :func:`~birder.io.images.load_image` (EXIF orientation applied).
        transform: :func:`detection_transform` of the detector's size and rgb stats.
        score_threshold: boxes scoring below it are dropped.
        merge_iou: boxes of different classes overlapping by more than this are one object (``None``: keep all).

    Returns:
        :class:`Detections`: ``boxes`` ``[N, 4]`` (x1, y1, x2, y2) in the original photo's pixels, ``scores``
        (descending) and ``labels`` (indices of the detector's ``class_to_idx``), on the CPU.
    """
    photo = load_image(image)
    size = (photo.height, photo.width)
    return detect_tensors(det_net, [transform(photo)], [size], score_threshold=score_threshold, merge_iou=merge_iou)[0]

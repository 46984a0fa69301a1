"""Detection inference: one photo in, boxes in that photo's own pixels out.

>>> (det_net, info) = load_detector("det.pt", inference=True)
>>> transform = detection_transform(det_net.size, info.rgb_stats)
>>> result = infer_image(det_net, "photo.jpg", transform)   # result.boxes [N, 4] xyxy, .scores, .labels
"""

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torchvision.transforms import v2

from birder.io.images import load_image

ImageInput = str | Path | Image.Image


class Detections(NamedTuple):
    boxes: torch.Tensor  # [N, 4] float, (x1, y1, x2, y2) in the original photo's pixels
    scores: torch.Tensor  # [N], descending
    labels: torch.Tensor  # [N] class indices (the model's class_to_idx)


def detection_transform(
    size: tuple[int, int], rgb_stats: Mapping[str, Sequence[float]]
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL photo -> normalised tensor with its long side at most ``max(size)`` (aspect kept, antialiased).

    Shrinking here keeps a 24-megapixel photo from being copied at full size into the network, which would resize
    it anyway; boxes are mapped back by :func:`rescale_boxes`.
    """
    return v2.Compose(
        [
            v2.ToImage(),
            _LongSideAtMost(max(size)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(rgb_stats["mean"]), std=list(rgb_stats["std"])),
        ]
    )


class _LongSideAtMost(torch.nn.Module):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        (height, width) = image.shape[-2:]
        scale = self.limit / max(height, width)
        if scale >= 1.0:
            return image
        new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
        return v2.functional.resize(image, new_size, antialias=True)


def rescale_boxes(boxes: torch.Tensor, from_hw: Sequence[int], to_hw: Sequence[int]) -> torch.Tensor:
    """xyxy ``boxes`` in an image of ``from_hw`` pixels -> the same boxes in the image resized to ``to_hw``."""
    scale = torch.tensor([to_hw[1] / from_hw[1], to_hw[0] / from_hw[0]] * 2, dtype=boxes.dtype, device=boxes.device)
    return boxes * scale


def infer_image(
    det_net: torch.nn.Module,
    image: ImageInput,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    score_threshold: float = 0.0,
) -> Detections:
    """Detect objects in one photo (a path or a PIL image); boxes in the original photo's pixels, on the CPU."""
    photo = load_image(image)
    tensor = transform(photo)
    reference = next(det_net.parameters())
    with torch.inference_mode():
        output = det_net([tensor.to(device=reference.device, dtype=reference.dtype)])[0]

    keep = output["scores"] >= score_threshold
    boxes = rescale_boxes(output["boxes"][keep].float().cpu(), tensor.shape[-2:], (photo.height, photo.width))
    return Detections(boxes, output["scores"][keep].float().cpu(), output["labels"][keep].cpu())

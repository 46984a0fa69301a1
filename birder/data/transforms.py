"""Inference preprocessing: the resize/crop/normalize pipeline Birder models were trained to expect.

The arithmetic follows the published Birder package exactly (docs/compatibility.md, "Inference preprocessing"), so a
checkpoint gives the same predictions here as there. The transform takes PIL images; any mode other than RGB
(grayscale, RGBA, CMYK, 16-bit) goes through :func:`birder.io.images.load_image`, the one decoder, so the card's
``transform(image)`` works on whatever photo a user opened. It never reads files itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from birder.io.checkpoint import get_size_from_signature
from birder.io.images import load_image

RGBStats = dict[str, tuple[float, float, float]]

RGB_STATS: dict[str, RGBStats] = {
    # Birder's own dataset statistics, as stored in checkpoints from mid-2025 on
    "birder": {"mean": (0.5191, 0.5306, 0.4877), "std": (0.2316, 0.2304, 0.2588)},
    # The same statistics as computed before mid-2025 (older checkpoints carry these)
    "birder_legacy": {"mean": (0.5248, 0.5372, 0.5086), "std": (0.2135, 0.2103, 0.2622)},
    "imagenet": {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "neutral": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
    "centered": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}
"""Common ``rgb_stats`` presets. A checkpoint's own stored stats always take precedence over these."""

TTA_CROP_FRACTION = 0.8
TTA_NUM_CROPS = 5


class ClassificationTransform:
    """Resize, center crop, scale to [0, 1] and normalize an RGB PIL image into a ``[3, H, W]`` float tensor.

    Built by :func:`classification_transform`; the parameters stay readable as attributes (``size``,
    ``rgb_stats``, ``center_crop``, ``simple_crop``) so callers can report or reuse them.

    Written with PIL, numpy and torch alone: the arithmetic is torchvision's (``Resize`` of a PIL image is PIL's
    bicubic resize; ``CenterCrop`` pads with zeros when the crop is larger, then rounds the offsets), without
    importing torchvision, which costs more than two seconds of start-up on every command-line run.
    """

    def __init__(self, size: tuple[int, int], rgb_stats: RGBStats, center_crop: float, simple_crop: bool) -> None:
        self.size = size
        self.rgb_stats = rgb_stats
        self.center_crop = center_crop
        self.simple_crop = simple_crop
        self._mean = torch.tensor(rgb_stats["mean"], dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(rgb_stats["std"], dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        _check_pil_image(image)
        if image.mode != "RGB":
            image = load_image(image)

        # Resizing the 8-bit PIL image (PIL's bicubic) is what matches Birder; resizing a float tensor instead
        # differs by up to 0.08 after normalization.
        (new_height, new_width) = _resized_size(
            image.height, image.width, self.size, self.center_crop, self.simple_crop
        )
        if (new_height, new_width) != (image.height, image.width):
            image = image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)

        pixels = _center_crop(np.array(image), self.size)  # a writable copy, as torch wants
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return tensor.sub_(self._mean).div_(self._std)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of an image of ``height`` x ``width`` after the resize step (before the center crop):
        an image of that size already is not resized again (a crop resampled from a reduced decode)."""
        return _resized_size(height, width, self.size, self.center_crop, self.simple_crop)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, center_crop={self.center_crop}, simple_crop={self.simple_crop}, "
            f"resize=bicubic+antialias, mean={self.rgb_stats['mean']}, std={self.rgb_stats['std']})"
        )


def classification_transform(
    size: tuple[int, int],
    rgb_stats: Mapping[str, Sequence[float]],
    center_crop: float = 1.0,
    simple_crop: bool = False,
) -> ClassificationTransform:
    """The inference transform of a model with input ``size`` ``(H, W)`` trained with ``rgb_stats``.

    Steps (docs/compatibility.md, "Inference preprocessing"): resize bicubic with antialias to
    ``(int(H / center_crop), int(W / center_crop))``, ignoring the aspect ratio, or with ``simple_crop`` the shorter
    side to ``int(min(H, W) / center_crop)`` keeping it; center crop to ``size``; divide by 255; normalize with
    ``rgb_stats`` (``mean`` and ``std``, tuples or lists of three numbers).
    """
    size = _as_size(size)
    if not center_crop > 0:
        raise ValueError(f"center_crop must be a positive fraction, got {center_crop!r}")
    return ClassificationTransform(size, _as_rgb_stats(rgb_stats), float(center_crop), bool(simple_crop))


def model_transform(
    model_info: Any,
    size: Sequence[int] | None = None,
    center_crop: float = 1.0,
    simple_crop: bool = False,
) -> ClassificationTransform:
    """The inference transform of a model: :func:`classification_transform` of ``model_info``'s input size (or
    ``size``, ``(H, W)``, when the command asks for another) and ``rgb_stats`` (a :class:`birder.ModelInfo`)."""
    (height, width) = (size[0], size[-1]) if size is not None else get_size_from_signature(model_info.signature)
    return classification_transform((height, width), model_info.rgb_stats, center_crop, simple_crop)


def tta_crops(image_tensor: torch.Tensor) -> torch.Tensor:
    """The five test-time-augmentation views of each image: ``[C, H, W]`` or ``[B, C, H, W]`` -> ``[B*5, C, H, W]``.

    Each view is a torchvision five-crop (top-left, top-right, bottom-left, bottom-right, center) of
    ``(int(0.8 * H), int(0.8 * W))``, resized back to ``(H, W)`` with bicubic antialias. The output is image-major:
    rows ``5*i .. 5*i+4`` are the views of image ``i``, so ``probs.view(B, 5, -1).mean(dim=1)`` averages them.
    """
    batch = image_tensor.unsqueeze(0) if image_tensor.dim() == 3 else image_tensor
    if batch.dim() != 4:
        raise ValueError(f"expected a [C, H, W] or [B, C, H, W] tensor, got shape {tuple(image_tensor.shape)}")

    (height, width) = batch.shape[-2:]
    (crop_h, crop_w) = (int(TTA_CROP_FRACTION * height), int(TTA_CROP_FRACTION * width))
    (top, left) = (round((height - crop_h) / 2.0), round((width - crop_w) / 2.0))
    corners = [(0, 0), (0, width - crop_w), (height - crop_h, 0), (height - crop_h, width - crop_w), (top, left)]
    crops = torch.stack([batch[..., y : y + crop_h, x : x + crop_w] for (y, x) in corners], dim=1)  # [B, 5, C, h, w]
    resized = F.interpolate(
        crops.flatten(0, 1).float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return resized.to(batch.dtype)


def _resized_size(
    height: int, width: int, size: tuple[int, int], center_crop: float, simple_crop: bool
) -> tuple[int, int]:
    """The resize step's output ``(height, width)``: torchvision's ``Resize`` arithmetic ("Inference preprocessing")."""
    if not simple_crop:
        # Both sides set exactly: the aspect ratio is not kept.
        return (int(size[0] / center_crop), int(size[1] / center_crop))

    # The shorter side to the target, the longer one scaled and truncated.
    short_target = int(min(size) / center_crop)
    if width <= height:
        return (int(short_target * height / width), short_target)
    return (short_target, int(short_target * width / height))


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision's CenterCrop on an ``[H, W, C]`` array: zero padding when the crop is larger, rounded offsets."""
    (crop_h, crop_w) = size
    (height, width) = pixels.shape[:2]
    if crop_h > height or crop_w > width:
        pad_top = (crop_h - height) // 2 if crop_h > height else 0
        pad_left = (crop_w - width) // 2 if crop_w > width else 0
        pad_bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        pad_right = (crop_w - width + 1) // 2 if crop_w > width else 0
        pixels = np.pad(pixels, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
        (height, width) = pixels.shape[:2]

    top = round((height - crop_h) / 2.0)
    left = round((width - crop_w) / 2.0)
    return np.ascontiguousarray(pixels[top : top + crop_h, left : left + crop_w])


def _as_size(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = (int(v) for v in size)
    return (height, width)


def _as_rgb_stats(rgb_stats: Mapping[str, Sequence[float]]) -> RGBStats:
    stats = {}
    for key in ("mean", "std"):
        values = tuple(float(v) for v in rgb_stats[key])
        if len(values) != 3:
            raise ValueError(f"rgb_stats[{key!r}] must have 3 values (R, G, B), got {len(values)}")
        stats[key] = values
    return stats


def _check_pil_image(image: Any) -> None:
    # Catch the common slip (a path, a tensor) before torchvision fails somewhere obscure
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"classification transform expects a PIL image, got {type(image).__name__}; "
            "decode files with birder.io.images.load_image"
        )


def detection_transform(
    size: tuple[int, int], rgb_stats: Mapping[str, Sequence[float]]
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL photo -> normalised tensor with its long side at most ``max(size)`` (aspect kept, antialiased).

    Shrinking here keeps a 24-megapixel photo from being copied at full size into the network, which would resize
    it anyway; boxes are mapped back by :func:`birder.inference.detection.rescale_boxes`.
    """
    from torchvision.transforms import v2  # here, not at import time: see ClassificationTransform

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
        from torchvision.transforms import v2

        (height, width) = image.shape[-2:]
        scale = self.limit / max(height, width)
        if scale >= 1.0:
            return image
        new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
        return v2.functional.resize(image, new_size, antialias=True)

"""Inference preprocessing: the resize/crop/normalize pipeline Birder models were trained to expect.

The arithmetic follows the published Birder package exactly (SPEC section 5), so a checkpoint gives the same
predictions here as there. The transform takes PIL images; any mode other than RGB (grayscale, RGBA, CMYK,
16-bit) goes through :func:`birder.io.images.load_image`, the one decoder, so the card's
``transform(image)`` works on whatever photo a user opened. It never reads files itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

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
    """

    def __init__(self, size: tuple[int, int], rgb_stats: RGBStats, center_crop: float, simple_crop: bool) -> None:
        self.size = size
        self.rgb_stats = rgb_stats
        self.center_crop = center_crop
        self.simple_crop = simple_crop
        self._pipeline = v2.Compose(
            [
                # Resizing the 8-bit PIL image (PIL's bicubic) is what matches Birder; resizing a float tensor
                # instead differs by up to 0.08 after normalization.
                v2.Resize(
                    _resize_target(size, center_crop, simple_crop),
                    interpolation=v2.InterpolationMode.BICUBIC,
                    antialias=True,
                ),
                v2.CenterCrop(size),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(rgb_stats["mean"]), std=list(rgb_stats["std"])),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        _check_pil_image(image)
        if image.mode != "RGB":
            image = load_image(image)
        return self._pipeline(image)

    def __repr__(self) -> str:
        steps = "\n".join(f"    {step}" for step in self._pipeline.transforms)
        return (
            f"{type(self).__name__}(size={self.size}, center_crop={self.center_crop}, "
            f"simple_crop={self.simple_crop},\n{steps}\n)"
        )


def classification_transform(
    size: tuple[int, int],
    rgb_stats: Mapping[str, Sequence[float]],
    center_crop: float = 1.0,
    simple_crop: bool = False,
) -> ClassificationTransform:
    """The inference transform of a model with input ``size`` ``(H, W)`` trained with ``rgb_stats``.

    Steps (SPEC section 5): resize bicubic with antialias to ``(int(H / center_crop), int(W / center_crop))``,
    ignoring the aspect ratio, or with ``simple_crop`` the shorter side to ``int(min(H, W) / center_crop)``
    keeping it; center crop to ``size``; divide by 255; normalize with ``rgb_stats`` (``mean`` and ``std``,
    tuples or lists of three numbers).
    """
    size = _as_size(size)
    if not center_crop > 0:
        raise ValueError(f"center_crop must be a positive fraction, got {center_crop!r}")
    return ClassificationTransform(size, _as_rgb_stats(rgb_stats), float(center_crop), bool(simple_crop))


def tta_crops(image_tensor: torch.Tensor) -> torch.Tensor:
    """The five test-time-augmentation views of each image: ``[C, H, W]`` or ``[B, C, H, W]`` -> ``[B*5, C, H, W]``.

    Each view is a torchvision five-crop (top-left, top-right, bottom-left, bottom-right, center) of
    ``(int(0.8 * H), int(0.8 * W))``, resized back to ``(H, W)`` with bicubic antialias. The output is image-major:
    rows ``5*i .. 5*i+4`` are the views of image ``i``, so ``probs.view(B, 5, -1).mean(dim=1)`` averages them.
    """
    batch = image_tensor.unsqueeze(0) if image_tensor.dim() == 3 else image_tensor
    if batch.dim() != 4:
        raise ValueError(f"expected a [C, H, W] or [B, C, H, W] tensor, got shape {tuple(image_tensor.shape)}")

    height, width = batch.shape[-2:]
    crop_size = [int(TTA_CROP_FRACTION * height), int(TTA_CROP_FRACTION * width)]
    crops = torch.stack(F.five_crop(batch, crop_size), dim=1)  # [B, 5, C, h, w]
    crops = crops.flatten(0, 1)
    return F.resize(crops, [height, width], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def _resize_target(size: tuple[int, int], center_crop: float, simple_crop: bool) -> int | tuple[int, int]:
    # An int makes torchvision resize the shorter side and keep the aspect ratio; a pair is taken exactly
    if simple_crop:
        return int(min(size) / center_crop)
    return (int(size[0] / center_crop), int(size[1] / center_crop))


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

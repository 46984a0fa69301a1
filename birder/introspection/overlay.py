"""Explanation maps drawn over their photos (PIL only: no matplotlib needed)."""

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from birder.io.atomic import atomic_write_path

# A "turbo"-like ramp, dark blue (0) -> cyan -> yellow -> red (1): anchors interpolated linearly.
_RAMP = np.array(
    [[48, 18, 59], [50, 130, 240], [30, 220, 180], [160, 250, 60], [250, 190, 40], [230, 70, 20], [122, 4, 3]],
    dtype=np.float32,
)


def _ramp_table(levels: int = 256) -> npt.NDArray[np.uint8]:
    """The ramp at ``levels`` evenly spaced values of [0, 1]: ``[levels, 3]`` RGB."""
    position = np.linspace(0.0, 1.0, levels, dtype=np.float32) * (len(_RAMP) - 1)
    low = np.floor(position).astype(np.int64).clip(0, len(_RAMP) - 2)
    frac = (position - low)[:, None]
    return (_RAMP[low] * (1.0 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)


_RAMP_TABLE = _ramp_table()


def _levels(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Values in [0, 1] -> 0..255, one byte a pixel: colours and opacity are looked up from them, so a map the
    size of a large photo costs a few bytes a pixel, not the float arrays of computing each colour."""
    scaled = np.clip(values, 0.0, 1.0, dtype=np.float32)
    scaled *= 255.0
    return np.rint(scaled, out=scaled).astype(np.uint8)


def heat_colours(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """``[H, W]`` values in [0, 1] -> ``[H, W, 3]`` RGB colours (the ramp in 256 steps)."""
    return _RAMP_TABLE[_levels(values)]


def heat_rgba(values: npt.NDArray[np.float32], max_alpha: float = 0.6) -> Image.Image:
    """The map as an RGBA layer: coloured by value, more opaque where higher (0 is fully transparent)."""
    table = np.concatenate([_RAMP_TABLE, (np.arange(256) * max_alpha).round().astype(np.uint8)[:, None]], axis=1)
    return Image.fromarray(table[_levels(values)], mode="RGBA")


def overlay(photo: Image.Image, photo_map: npt.NDArray[np.float32], label: str | None = None) -> Image.Image:
    """``photo`` with ``photo_map`` (its size) blended over it and ``label`` written in the top-left corner."""
    base = photo.convert("RGBA")
    composed = Image.alpha_composite(base, heat_rgba(photo_map))
    if label:
        draw = ImageDraw.Draw(composed)
        font = ImageFont.load_default(size=max(12, min(photo.width, photo.height) // 20))
        (left, top, right, bottom) = draw.textbbox((0, 0), label, font=font)
        pad = max(2, (bottom - top) // 4)
        draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=(0, 0, 0, 200))
        draw.text((pad - left, pad - top), label, fill=(255, 255, 255, 255), font=font)
    return composed.convert("RGB")


def save_overlay(
    path: str | os.PathLike, photo: Image.Image, photo_map: npt.NDArray[np.float32], label: str | None = None
) -> Path:
    """Write :func:`overlay` as a PNG, atomically."""
    path = Path(path)
    with atomic_write_path(path) as tmp:
        overlay(photo, photo_map, label).save(tmp, format="PNG")
    return path

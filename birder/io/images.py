"""Image decoding shared by the Python API, the command-line tools and the server.

Every image a model sees goes through :func:`load_image`, so a photo gives the same pixels (and the same
prediction) whichever entry point read it. The result is always an 8-bit RGB ``PIL.Image.Image`` with its
EXIF orientation applied; anything that cannot be decoded raises :class:`~birder.errors.ImageDecodeError`
with a one-line message that names the file.

:func:`load_image_reduced` decodes a JPEG at a reduced scale in the DCT domain (1/2, 1/4 or 1/8 of each side, far
cheaper than a full decode and a resize) when a model needs fewer pixels than the photo has (a detector's input);
:class:`ReducedImage` cuts crops from such a decode in full-resolution coordinates and says when a crop needs more
pixels than it holds.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from birder.errors import ImageDecodeError, one_line

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""Lower-case file extensions treated as images when scanning folders (a tuple, so ``str.endswith`` takes it)."""

# Exceptions PIL's decoders raise on damaged data; each plugin has its own habits (SyntaxError for a broken PNG
# chunk, struct.error or IndexError for short headers, zlib.error for bad deflate streams, ...).
_CORRUPT_DATA_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)

# Modes that carry their own alpha band; they are composited on white rather than having the alpha dropped,
# which would reveal whatever colour the encoder left under transparent pixels (often black).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_MAX_REASON_CHARS = 200
# The scales libjpeg decodes at in the DCT domain (PIL's Image.draft): full-resolution pixels per decoded pixel
DCT_REDUCTIONS: tuple[int, ...] = (8, 4, 2, 1)
# EXIF orientations that swap width and height (a transpose or a quarter turn)
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an image file extension (case-insensitive); the file itself is not opened."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (starts with a dot); such entries are never taken as photos.

    macOS leaves a "._IMG_0001.jpg" AppleDouble file beside every photo copied to a FAT/exFAT card: it has an
    image extension but is not an image. Nor is anything inside ".thumbnails", ".git" or ".Trashes".
    """
    return name.startswith(".")


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder``, recursively: the one photo discovery of training and prediction.

    Files with an image extension (:func:`is_image_file`) are taken; hidden files and folders (:func:`is_hidden`)
    are skipped, and symbolic links to folders are not followed. The order is sorted by path components ("a/b.jpg"
    before "a-b.jpg"), so it does not depend on what the file system happens to list first.
    """
    root = Path(folder)
    found = []
    for current, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if not is_hidden(name)]
        found.extend(Path(current, name) for name in filenames if not is_hidden(name) and is_image_file(name))

    return sorted(found, key=lambda path: path.relative_to(root).parts)


def load_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """Decode ``source`` (a path or a PIL image) into an 8-bit RGB image with EXIF orientation applied.

    Files are read completely and closed before returning. Multi-frame files (GIF, TIFF, WebP) give their first
    frame. Transparent pixels are composited on white; 16-bit and 32-bit integer images are scaled to 8 bits
    (value / 257) rather than clipped; float images are taken as 0..1 when their maximum is at most 1, else as
    0..255. An RGB PIL image without an EXIF rotation is returned as is (the same object).

    Raises:
        ImageDecodeError: the file is missing, empty, a directory, not an image, truncated or corrupt, or
            large enough to be a decompression bomb.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<in-memory image>"
        return _to_rgb(_decode_loaded(source, name), name)

    path = Path(source)
    _check_file(path)
    return _to_rgb(_read_file(path, str(path)), str(path))


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode an image file held in memory (a sample of a tar shard, say) exactly as :func:`load_image` decodes
    the same file on disk; errors name it ``name``."""
    if not data:
        raise _decode_error(name, "empty file (0 bytes)")

    return _to_rgb(_read_file(io.BytesIO(data), name), name)


@dataclass(frozen=True)
class ReducedImage:
    """A photo decoded at a reduced scale (:func:`load_image_reduced`) and how it maps to the full photo.

    ``image``: 8-bit RGB, EXIF orientation applied, about ``full_size / reduction`` pixels (libjpeg rounds up: the
    last row and column may stand for fewer full-resolution pixels). A full-resolution coordinate ``x`` is at
    ``x / reduction`` in ``image``.
    """

    image: Image.Image
    full_size: tuple[int, int]  # (width, height) of the full-resolution photo, EXIF orientation applied
    reduction: int  # full-resolution pixels per decoded pixel along each side: 1 (a full decode), 2, 4 or 8

    @property
    def scale(self) -> float:
        """The factor from ``image``'s coordinates to full-resolution ones."""
        return float(self.reduction)

    @property
    def full_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the full-resolution photo (what ``detect_tensors`` takes as a photo size)."""
        return (self.full_size[1], self.full_size[0])

    def crop_reduction(self, box: Sequence[float], margin: float, min_crop_size: Sequence[int]) -> int:
        """The largest reduction (8, 4, 2 or 1) at which the crop of ``box`` (full-resolution xyxy) grown by
        ``margin`` still has ``min_crop_size`` ``(height, width)`` pixels: what the classifier resizes a crop to.
        1 when even the full-resolution crop is smaller (it is enlarged anyway: only full resolution keeps its
        detail)."""
        rectangle = crop_rectangle(self.full_size, box, margin)
        (min_height, min_width) = (int(min_crop_size[0]), int(min_crop_size[-1]))
        for reduction in DCT_REDUCTIONS:
            reduced_size = _reduced_size(self.full_size, reduction)
            (left, top, right, bottom) = _reduced_rectangle(rectangle, reduction, reduced_size)
            if right - left >= min_width and bottom - top >= min_height:
                return reduction
        return 1

    def crop(self, box: Sequence[float], margin: float, min_crop_size: Sequence[int]) -> Image.Image | None:
        """The crop of ``box`` (full-resolution xyxy) grown by ``margin`` as
        :func:`birder.inference.crops.crop_box` cuts it from the full photo, cut from this decode; None when it
        has fewer than ``min_crop_size`` ``(height, width)`` pixels here (:meth:`crop_reduction` is smaller than
        this decode's reduction): decode again at that reduction (:func:`load_image_reduced`'s ``max_reduction``)."""
        if self.crop_reduction(box, margin, min_crop_size) < self.reduction:
            return None
        rectangle = crop_rectangle(self.full_size, box, margin)
        return self.image.crop(_reduced_rectangle(rectangle, self.reduction, self.image.size))

    def crop_resized(self, box: Sequence[float], margin: float, size: Sequence[int]) -> Image.Image | None:
        """The crop of ``box`` grown by ``margin`` (as :meth:`crop`) resampled to ``size`` ``(height, width)``
        (bicubic, antialiased: the classifier's resize) from its exact full-resolution rectangle, so its edges
        are not rounded to this decode's coarser pixels; None when this decode has fewer than ``size`` pixels
        there. Given to a classifier whose transform resizes to ``size``, it is that resize already done."""
        if self.crop_reduction(box, margin, size) < self.reduction:
            return None
        (left, top, right, bottom) = crop_rectangle(self.full_size, box, margin)
        # Full-resolution edges in decoded pixels; the decode's last row and column may stand for fewer pixels
        region = tuple(
            min(edge / self.reduction, limit)
            for edge, limit in zip((left, top, right, bottom), (*self.image.size, *self.image.size), strict=True)
        )
        target = (int(size[-1]), int(size[0]))
        return self.image.resize(target, Image.Resampling.BICUBIC, box=region, reducing_gap=None)


def reduced_crops(
    source: str | os.PathLike,
    decoded: ReducedImage,
    boxes: Sequence[Sequence[float]],
    margin: float,
    size: Sequence[int],
) -> tuple[list[Image.Image], int]:
    """Each of ``boxes`` (full-resolution xyxy) grown by ``margin``, resampled to ``size`` ``(height, width)``
    (:meth:`ReducedImage.crop_resized`): from ``decoded`` (``source`` decoded by :func:`load_image_reduced`) where
    it has enough pixels, the others from one more decode of ``source`` at the largest reduction they all have
    enough pixels at (full resolution only when a box is that small). Returns the crops, in the order of ``boxes``,
    and that second decode's reduction (0: none was needed).

    Raises:
        ImageDecodeError: ``source`` could not be decoded a second time (it changed on disk since).
    """
    cut = [decoded.crop_resized(box, margin, size) for box in boxes]
    missing = [index for index, crop in enumerate(cut) if crop is None]
    reduction = min((decoded.crop_reduction(boxes[index], margin, size) for index in missing), default=0)
    again = load_image_reduced(source, max_reduction=reduction) if missing else None
    crops = []
    for box, crop in zip(boxes, cut, strict=True):
        # The second decode has enough pixels for every box: it is at the smallest reduction any of them needs
        found = crop if crop is not None or again is None else again.crop_resized(box, margin, size)
        if found is None:
            raise AssertionError(f"no crop of {box} at reduction {reduction}")  # not reached: see above
        crops.append(found)
    return (crops, again.reduction if again is not None else 0)


def crop_rectangle(photo_size: Sequence[int], box: Sequence[float], margin: float = 0.0) -> tuple[int, int, int, int]:
    """The pixel rectangle ``(left, top, right, bottom)`` that :func:`birder.inference.crops.crop_box` cuts from a
    photo of ``photo_size`` ``(width, height)``: ``box`` grown by ``margin`` (a fraction of its width and height
    on each side), clipped to the photo, at least 1 x 1 px."""
    (width, height) = (int(photo_size[0]), int(photo_size[1]))
    (x1, y1, x2, y2) = (float(v) for v in box)
    (dx, dy) = ((x2 - x1) * margin, (y2 - y1) * margin)
    left = min(max(int(x1 - dx), 0), width - 1)
    top = min(max(int(y1 - dy), 0), height - 1)
    right = max(min(round(x2 + dx), width), left + 1)
    bottom = max(min(round(y2 + dy), height), top + 1)
    return (left, top, right, bottom)


def _reduced_size(full_size: Sequence[int], reduction: int) -> tuple[int, int]:
    """The size libjpeg decodes a ``full_size`` photo to at ``reduction`` (each side rounded up)."""
    return (-(-int(full_size[0]) // reduction), -(-int(full_size[1]) // reduction))


def _reduced_rectangle(
    rectangle: tuple[int, int, int, int], reduction: int, reduced_size: Sequence[int]
) -> tuple[int, int, int, int]:
    """A full-resolution pixel rectangle in a decode at ``reduction`` (edges to the nearest decoded pixel edge),
    clipped to ``reduced_size`` ``(width, height)``, at least 1 x 1 px."""
    (width, height) = (int(reduced_size[0]), int(reduced_size[1]))
    (left, top, right, bottom) = (math.floor(edge / reduction + 0.5) for edge in rectangle)
    left = min(max(left, 0), width - 1)
    top = min(max(top, 0), height - 1)
    return (left, top, max(min(right, width), left + 1), max(min(bottom, height), top + 1))


def dct_reduction(full_size: Sequence[int], long_side: int = 0, short_side: int = 0, max_reduction: int = 8) -> int:
    """The largest of :data:`DCT_REDUCTIONS` (at most ``max_reduction``) whose decode of a ``full_size`` photo
    keeps its long side at least ``long_side`` and its short side at least ``short_side`` pixels; 1 if none."""
    for reduction in DCT_REDUCTIONS:
        if reduction > max_reduction:
            continue
        size = _reduced_size(full_size, reduction)
        if max(size) >= long_side and min(size) >= short_side:
            return reduction
    return 1


def load_image_reduced(
    source: str | os.PathLike, long_side: int = 0, short_side: int = 0, *, max_reduction: int = 8
) -> ReducedImage:
    """Decode ``source`` at the smallest JPEG DCT scale (1/8, 1/4, 1/2 of each side, at most 1/``max_reduction``)
    whose image still has at least ``long_side`` pixels on its long side and ``short_side`` on its short side.

    A detector that resizes the long side to ``N`` loses nothing it would have kept from ``long_side=N``: the
    antialiased resize averages the pixels a full decode has over the same areas the DCT scaling averages them.
    Other formats (PNG, TIFF, WebP, ...) and JPEGs PIL cannot scale are decoded in full (``reduction`` 1).
    Everything else is :func:`load_image`'s: EXIF orientation, CMYK, 16-bit, transparency, the same one-line
    :class:`~birder.errors.ImageDecodeError` for a file that cannot be read. ``max_reduction=1`` is a full decode.
    """
    path = Path(source)
    _check_file(path)
    name = str(path)
    header: dict[str, tuple[int, int] | int] = {}

    def draft(opened: Image.Image) -> None:
        full_size = opened.size
        if _orientation(opened, name) in _SWAPPING_ORIENTATIONS:
            full_size = (full_size[1], full_size[0])
        header["full_size"] = full_size
        reduction = dct_reduction(full_size, long_side, short_side, max_reduction)
        if reduction > 1 and opened.format in ("JPEG", "MPO"):
            # draft asks for a size whose whole multiple is the image (both sides): floor division picks ``reduction``
            stored_width = opened.size[0]
            request = (stored_width // reduction, opened.size[1] // reduction)
            drafted = opened.draft(opened.mode, request)  # the file's own mode: CMYK stays CMYK for _to_rgb
            if drafted is not None:  # its box is the full image in decoded pixels: width / reduction
                header["reduction"] = round(stored_width / drafted[1][2])

    image = _to_rgb(_read_file(path, name, prepare=draft), name)
    full_size = header["full_size"]
    assert isinstance(full_size, tuple)
    return ReducedImage(image, full_size, int(header.get("reduction", 1)))


def _orientation(image: Image.Image, name: str) -> int:
    """The EXIF orientation tag of an opened image (1 when absent or unreadable, as :func:`_apply_exif_orientation`
    then leaves the image as it is)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except _CORRUPT_DATA_ERRORS:
        return 1
    return orientation if isinstance(orientation, int) else 1


def _check_file(path: Path) -> None:
    """Reject the inputs PIL would report with a confusing message (or a bare errno)."""
    try:
        if not path.exists():
            raise _decode_error(path, "file not found")
        if path.is_dir():
            raise _decode_error(path, "is a directory, not an image file")
        if path.stat().st_size == 0:
            raise _decode_error(path, "empty file (0 bytes)")
    except PermissionError:
        raise _decode_error(path, "permission denied") from None
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte, for one
        raise _decode_error(path, f"cannot access file: {one_line(exc, _MAX_REASON_CHARS)}") from None


def _read_file(
    source: Path | io.BytesIO, name: str, prepare: Callable[[Image.Image], None] | None = None
) -> Image.Image:
    """Open, fully decode and detach the first frame of ``source``; a file handle is closed on return.

    ``prepare`` sees the opened image before its pixels are decoded (to ask for a reduced-scale decode).
    """
    try:
        with Image.open(source) as opened:
            if prepare is not None:
                prepare(opened)
            decoded = _decode_loaded(opened, name)
            # Detach from the file: a multi-frame image would otherwise still point at the closed handle
            return opened.copy() if decoded is opened else decoded
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise _decode_error(name, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives here only when warning filters turn it into an error
        raise _bomb_error(name, exc) from None
    except PermissionError:
        raise _decode_error(name, "permission denied") from None
    except _CORRUPT_DATA_ERRORS as exc:
        raise _decode_error(name, f"truncated or corrupt image: {one_line(exc, _MAX_REASON_CHARS)}") from None


def _decode_loaded(image: Image.Image, name: str) -> Image.Image:
    """Decode the pixel data of ``image`` (already opened) and apply its EXIF orientation."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(name, exc) from None
    except _CORRUPT_DATA_ERRORS as exc:
        raise _decode_error(name, f"truncated or corrupt image: {one_line(exc, _MAX_REASON_CHARS)}") from None
    return _apply_exif_orientation(image, name)


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    """Rotate/flip ``image`` as its EXIF orientation says; returns ``image`` itself when there is nothing to do.

    A damaged EXIF block should not cost the user a prediction on otherwise good pixels, so it is logged and
    ignored.
    """
    try:
        orientation = image.getexif().get(0x0112, 1)  # 0x0112: the EXIF Orientation tag
        if orientation in (None, 1):
            return image
        transposed = ImageOps.exif_transpose(image)
    except _CORRUPT_DATA_ERRORS as exc:
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, one_line(exc, _MAX_REASON_CHARS))
        return image
    return transposed if transposed is not None else image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; an RGB image without transparency is returned unchanged."""
    try:
        if _has_transparency(image):
            return _composite_on_white(image)
        if image.mode == "RGB":
            return image
        if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
            return _high_depth_to_8bit(image).convert("RGB")
        # 1, L, P, CMYK, YCbCr, LAB, HSV: PIL's own conversions are the right ones
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        reason = one_line(exc, _MAX_REASON_CHARS)
        raise _decode_error(name, f"unsupported image mode {image.mode!r}: {reason}") from None


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES:
        return True
    # Palette, grayscale and RGB images mark transparency with a tRNS entry rather than an alpha band;
    # 16-bit grayscale with tRNS is rare enough to just lose its transparency in the scaling path.
    return "transparency" in image.info and image.mode in ("P", "L", "RGB", "1")


def _composite_on_white(image: Image.Image) -> Image.Image:
    if image.mode == "La":  # PIL converts premultiplied LA only to LA
        image = image.convert("LA")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Scale a single-band 16-bit, 32-bit integer or float image to an 8-bit ``L`` image.

    PIL's own conversion clips these to 0..255, which turns an ordinary 16-bit photo almost entirely white.
    """
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    elif image.mode in _SIXTEEN_BIT_MODES:
        scale = 1.0 / 257.0
    else:
        # Mode "I" holds 16-bit data in practice (TIFFs, older PIL's 16-bit PNGs) but convert("I") of an 8-bit
        # image also lands here, and dividing that by 257 would make it black.
        scale = 1.0 / 257.0 if values.size and values.max() > 255 else 1.0
        values = np.clip(values, 0, 65535)
    scaled = np.nan_to_num(values * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _bomb_error(name: str | os.PathLike, exc: BaseException) -> ImageDecodeError:
    reason = one_line(exc, _MAX_REASON_CHARS)
    return _decode_error(name, f"image too large, refused as a possible decompression bomb ({reason})")


def _decode_error(name: str | os.PathLike, reason: str) -> ImageDecodeError:
    # A file name with a newline in it would break the one-line promise, so escape line breaks
    shown = os.fsdecode(name).replace("\n", "\\n").replace("\r", "\\r")
    return ImageDecodeError(f"cannot read image '{shown}': {reason}")

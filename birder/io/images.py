"""Image decoding shared by the Python API, the command-line tools and the server.

Every image a model sees goes through :func:`load_image`, so a photo gives the same pixels (and the same
prediction) whichever entry point read it. The result is always an 8-bit RGB ``PIL.Image.Image`` with its
EXIF orientation applied; anything that cannot be decoded raises :class:`~birder.errors.ImageDecodeError`
with a one-line message that names the file.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
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


def _read_file(source: Path | io.BytesIO, name: str) -> Image.Image:
    """Open, fully decode and detach the first frame of ``source``; a file handle is closed on return."""
    try:
        with Image.open(source) as opened:
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

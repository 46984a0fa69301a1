"""Photos on disk -> model inputs, for batch prediction.

Two jobs:

- :func:`discover_images` turns a mix of files and folders into one list of photos, in an order that depends
  neither on the file system nor on the order of the inputs (so a resumed or distributed run sees the same list
  as the first one).
- :class:`ImageFileDataset` decodes each photo with :func:`~birder.io.images.load_image` and the model's
  transform (the one preprocessing path shared with ``infer_image``). A photo that cannot be decoded becomes a
  :class:`PhotoSample` carrying the one-line reason instead of an exception: one bad file among a million must
  not end the run. Any other error (a transform that raises) is not the photo's fault and would hit every photo, so
  its sample carries ``run_error`` and the batch loop stops the run. Both travel as data rather than as
  exceptions because an exception raised in a ``DataLoader`` worker reaches the main process wrapped in a
  multi-line traceback. A transform with a ``decode`` attribute decodes the photos itself: :class:`DetectionInputs`
  decodes at a reduced JPEG scale (:func:`~birder.io.images.load_image_reduced`) in the loader's workers and gives
  a detection run the reduced photo and the detector's input.

:func:`read_photo_metadata` reads the EXIF capture date and GPS position that field workers rely on.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from birder.errors import BirderError, ImageDecodeError, one_line
from birder.io.images import IMAGE_EXTENSIONS, ReducedImage, find_images, load_image, load_image_reduced

# EXIF tags (numbers from the EXIF 2.3 standard); PIL exposes them by number only.
_EXIF_IFD = 0x8769
_GPS_IFD = 0x8825
_DATETIME_ORIGINAL = 0x9003
_GPS_LATITUDE_REF = 1
_GPS_LATITUDE = 2
_GPS_LONGITUDE_REF = 3
_GPS_LONGITUDE = 4


class PhotoMetadata(NamedTuple):
    """What a photo's EXIF block says about when and where it was taken (``None`` when absent)."""

    exif_datetime: str | None = None  # ISO 8601, e.g. "2023-05-14T07:32:10"
    gps_latitude: float | None = None  # decimal degrees, south negative
    gps_longitude: float | None = None  # decimal degrees, west negative


class PhotoSample(NamedTuple):
    """One item of :class:`ImageFileDataset`: the input tensor, or why there is none.

    ``error``: the photo cannot be decoded (it goes to the failures table). ``run_error``: preprocessing failed for
    a reason that is not the photo's (a transform that raises), which must stop the run.
    """

    index: int
    tensor: torch.Tensor | None
    error: str | None
    metadata: PhotoMetadata
    run_error: str | None = None
    seconds: float = 0.0  # reading, decoding and preprocessing it, where that ran (a loader worker): stage timings


class PhotoBatch(NamedTuple):
    """A collated batch: the good photos stacked, the failures listed beside them."""

    indices: list[int]  # dataset indices of the rows of ``inputs``
    inputs: torch.Tensor | list[Any] | None  # [B, C, H, W] (a list without stacking); None: every photo failed
    metadata: list[PhotoMetadata]  # one per row of ``inputs``
    failures: list[tuple[int, str]]  # (dataset index, one-line reason)
    run_error: str | None = None  # the first sample's run_error: the batch loop must stop with it
    seconds: float = 0.0  # the samples' seconds (decoding, in the loader's workers), summed


# ---------------------------------------------------------------------------------------------------------------------
# Finding the photos
# ---------------------------------------------------------------------------------------------------------------------


def _canonical_key(path: Path) -> tuple[str, ...]:
    return Path(os.path.abspath(path)).parts


def discover_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Every photo named by ``inputs``: files as given, folders scanned recursively.

    In a folder, files with an image extension (case-insensitive, :data:`~birder.io.images.IMAGE_EXTENSIONS`) are
    taken and hidden files and folders are skipped (:func:`~birder.io.images.find_images`, the discovery training
    uses too). A file named directly is taken whatever its extension (if it is not an image, the run reports it
    as a failure). A photo reached twice is listed once.

    The list is sorted by absolute path, whatever the order of ``inputs``: ``a/ b/`` and ``b/ a/`` plan the same
    run, so one can be resumed with the other (the journals of the first stay in order for the final merge).

    Raises:
        BirderError: an input does not exist, or no photo was found at all.
    """
    candidates: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            candidates.extend(find_images(path))
        elif path.exists():
            candidates.append(path)
        else:
            raise BirderError(f"input '{path}' does not exist")

    # The spelling as tie-break: the same photo reached as "a/x.jpg" and "./b/../a/x.jpg" is always listed as one
    candidates.sort(key=lambda path: (_canonical_key(path), os.fspath(path)))
    photos: list[Path] = []
    seen: set[tuple[str, ...]] = set()
    for candidate in candidates:
        key = _canonical_key(candidate)
        if key not in seen:
            seen.add(key)
            photos.append(candidate)

    if not photos:
        shown = ", ".join(f"'{item}'" for item in inputs)
        raise BirderError(f"no images found in {shown or 'the inputs'} (looked for {', '.join(IMAGE_EXTENSIONS)})")

    return photos


# ---------------------------------------------------------------------------------------------------------------------
# EXIF date and position
# ---------------------------------------------------------------------------------------------------------------------


def _to_degrees(value: Any, ref: Any) -> float | None:
    """(degrees, minutes, seconds) rationals and an N/S/E/W reference -> signed decimal degrees."""
    try:
        (degrees, minutes, seconds) = (float(part) for part in value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None

    decimal = degrees + minutes / 60.0 + seconds / 3600.0
    if not math.isfinite(decimal):
        return None

    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "ignore")
    if str(ref).strip().upper() in ("S", "W"):
        decimal = -decimal

    return decimal


def _to_iso_datetime(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore")
    text = str(value).strip("\x00 ")
    if not text:
        return None

    try:
        return datetime.strptime(text, "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return text  # an unusual format is still worth keeping as the camera wrote it


def read_photo_metadata(source: str | os.PathLike | Image.Image) -> PhotoMetadata:
    """The EXIF ``DateTimeOriginal`` (as ISO 8601) and GPS latitude/longitude (decimal degrees) of a photo.

    Reads only the file's header, not its pixels. Missing or damaged tags give ``None``; this never raises for
    a bad file (decoding errors are :func:`~birder.io.images.load_image`'s to report).
    """
    try:
        if isinstance(source, Image.Image):
            exif = source.getexif()
        else:
            with Image.open(source) as image:
                exif = image.getexif()

        taken = _to_iso_datetime(exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL, ""))
        gps = exif.get_ifd(_GPS_IFD)
        latitude = longitude = None
        if _GPS_LATITUDE in gps and _GPS_LONGITUDE in gps:
            latitude = _to_degrees(gps[_GPS_LATITUDE], gps.get(_GPS_LATITUDE_REF, "N"))
            longitude = _to_degrees(gps[_GPS_LONGITUDE], gps.get(_GPS_LONGITUDE_REF, "E"))
    except Exception:  # metadata is optional: any damage just means "no metadata"
        return PhotoMetadata()

    return PhotoMetadata(taken, latitude, longitude)


# ---------------------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------------------


def one_line_error(exc: BaseException, max_chars: int = 500) -> str:
    """``Type: message`` of an exception squeezed onto one line (torch's messages can span many) and capped."""
    message = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
    return message if len(message) <= max_chars else message[: max_chars - 3] + "..."


def _one_line_reason(path: Path, exc: BaseException) -> str:
    """The reason a photo failed, on one line and without repeating the path (the failures file has a column)."""
    if not isinstance(exc, ImageDecodeError):
        return one_line_error(exc)

    message = one_line(exc, limit=None)  # the decoder already kept its reason short
    prefix = f"cannot read image '{os.fsdecode(path)}': "
    return message[len(prefix) :] if message.startswith(prefix) else message


class PackedPaths:
    """A read-only list of paths stored as one bytes blob plus offsets.

    ``DataLoader`` workers are forked copies of the main process; touching a million ``Path`` objects there
    updates their reference counts, which copies every memory page they sit on into each worker. Two flat
    buffers have no per-item objects to touch.
    """

    def __init__(self, paths: Iterable[str | os.PathLike]) -> None:
        encoded = [os.fsencode(path) for path in paths]
        self._blob = b"".join(encoded)
        self._offsets = np.cumsum([0, *(len(item) for item in encoded)], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Path:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return Path(os.fsdecode(self._blob[self._offsets[index] : self._offsets[index + 1]]))


class DetectionInput(NamedTuple):
    """What a detection run needs of one photo (:class:`DetectionInputs`): the photo decoded at a reduced scale
    (crops are cut from it, :meth:`~birder.io.images.ReducedImage.crop`) and the detector's input."""

    photo: ReducedImage
    tensor: torch.Tensor  # the detector's transform of photo.image

    @property
    def full_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the full-resolution photo: ``detect_tensors``' photo size, so boxes come back
        in full-resolution pixels."""
        return self.photo.full_hw

    @property
    def scale(self) -> float:
        """The factor from the reduced photo's coordinates to full-resolution ones."""
        return self.photo.scale


class DetectionInputs:
    """The transform of a detection run's loader: it decodes each photo at the smallest JPEG DCT scale that keeps
    the detector's input size (``decode``, so in the loader's workers, overlapped with compute) and gives a
    :class:`DetectionInput`.

    A 12 MP photo decoded for a 512 px detector is 1000 x 750 (1/4 of each side): 2.2 MB in flight per photo
    instead of 36 MB, and about 1/6 of the decoding time. ``detector_size``: the detector's ``(H, W)`` (its long
    side is what the detector's transform resizes to); ``min_side``: a short side the photo must keep as well.
    """

    def __init__(
        self,
        detector_transform: Callable[[Image.Image], torch.Tensor],
        detector_size: Sequence[int],
        *,
        min_side: int = 0,
    ) -> None:
        self.detector_transform = detector_transform
        self.long_side = max(int(side) for side in detector_size)
        self.min_side = int(min_side)

    def decode(self, path: str | os.PathLike) -> ReducedImage:
        return load_image_reduced(path, self.long_side, self.min_side)

    def __call__(self, photo: ReducedImage) -> DetectionInput:
        return DetectionInput(photo, self.detector_transform(photo.image))


class ImageFileDataset(Dataset):
    """Decoded, transformed photos; a photo that cannot be read gives a :class:`PhotoSample` with ``error`` set.

    ``indices`` selects which entries of ``paths`` this dataset serves (a shard under ``torchrun``, or the photos
    a resumed run still has to do); a sample's ``index`` is always the position in ``paths``. ``decode`` reads a
    photo for the transform: by default the transform's own ``decode`` (:class:`DetectionInputs`), else
    :func:`~birder.io.images.load_image`; it raises :class:`~birder.errors.ImageDecodeError` for a bad photo.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | PackedPaths,
        transform: Callable[[Any], Any],
        indices: Sequence[int] | None = None,
        read_metadata: bool = True,
        decode: Callable[[Path], Any] | None = None,
    ) -> None:
        self.paths = paths if isinstance(paths, PackedPaths) else PackedPaths(paths)
        self.transform = transform
        self.decode = decode if decode is not None else getattr(transform, "decode", load_image)
        self.indices = np.arange(len(paths)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.read_metadata = read_metadata

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> PhotoSample:
        started = time.perf_counter()
        index = int(self.indices[position])
        path = self.paths[index]
        try:
            image = self.decode(path)
        except ImageDecodeError as exc:  # the photo's own failure, never the run's
            reason = _one_line_reason(path, exc)
            return PhotoSample(index, None, reason, PhotoMetadata(), seconds=time.perf_counter() - started)

        try:
            tensor = self.transform(image)
        except Exception as exc:
            # Not about this photo (it decoded): the same transform would fail on every one, and writing them all
            # off as unreadable would hide the real problem behind a "successful" run
            reason = f"cannot preprocess '{os.fsdecode(path)}': {_one_line_reason(path, exc)}"
            return PhotoSample(index, None, None, PhotoMetadata(), run_error=reason)

        metadata = read_photo_metadata(path) if self.read_metadata else PhotoMetadata()
        return PhotoSample(index, tensor, None, metadata, seconds=time.perf_counter() - started)


def collate_photos(samples: Sequence[PhotoSample], stack: bool = True) -> PhotoBatch:
    """``DataLoader`` collate function for :class:`ImageFileDataset`: stack the good, list the failed.

    ``stack=False`` (``functools.partial``) keeps the good samples' items as a list: photos of different sizes, or
    whatever a transform returns that does not stack (a detection run's photo and detector input).
    """
    run_error = next((sample.run_error for sample in samples if sample.run_error is not None), None)
    good = [sample for sample in samples if sample.tensor is not None]
    failures = [(sample.index, sample.error) for sample in samples if sample.error is not None]
    items = [sample.tensor for sample in good]
    inputs = (torch.stack(items) if stack else items) if good else None
    seconds = sum(sample.seconds for sample in samples)
    return PhotoBatch(
        [sample.index for sample in good], inputs, [sample.metadata for sample in good], failures, run_error, seconds
    )

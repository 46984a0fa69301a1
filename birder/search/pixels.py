"""Is one photo a copy of another? The pixel test that confirms duplicate candidates (:mod:`.duplicates`).

A copy is the same exposure saved again: cropped by a few percent at most, rescaled, re-encoded (JPEG), a little
brighter or darker. A distinct photo of the same scene (a burst, a camera trap's next frame, the same species on a
similar background) is not a copy, however close its embedding: the animal moved or turned somewhere in the frame.

Each photo is read once into a grey thumbnail (:func:`read_thumbnail`, :data:`THUMB_SIDE` square: the whole frame
squeezed, so a crop that changes the aspect ratio is a different scale per axis). Two thumbnails are compared in
three steps (:func:`compare_thumbnails`, batched over pairs):

1. **Alignment by profiles.** Along each axis, the copy's window on the other photo: how much of each end of the
   axis one photo shows and the other does not, up to :data:`MAX_CROP` of the side at each end, either photo
   (so a crop of the copy, a crop of the original and two crops of one original are all modelled). The window
   whose mean profiles (column means, row means) agree best, in steps of 1 %.
2. **Refinement** of the four window edges in steps of :data:`STEP` (0.5 %), minimising the difference of the two
   aligned :data:`COMPARE_SIDE`-pixel thumbnails, each normalised to zero mean and unit contrast (standard
   deviation): brightness and contrast changes do not count. Pairs already far apart after step 1 (mean squared
   difference above :data:`SCREEN_DIFFERENCE`) are not refined: they are different photos.
3. **The test.** The aligned thumbnails are cut into 4 x 4 blocks; the difference of a pair is the root mean square
   difference of its worst block, in units of the photos' contrast. A copy differs everywhere only by re-encoding
   and resampling noise; a distinct photo differs a lot somewhere, even where most of the frame is the same
   background. A copy's worst block stays at most :data:`MAX_BLOCK_DIFFERENCE`.

Why not a perceptual hash of each photo: a crop of a few percent moves the whole frame's hash (imagehash's pHash)
as far as a distinct look-alike's (measured on photos drawn as the benchmark's first set: copies up to 10 bits of
64 away, look-alikes from 2), and a global hash cannot see the one block where a look-alike differs.

The thresholds were chosen on generated photos (``benchmarks/duplicates.py``, first set: planted copies cropped up
to 5 %, rescaled 0.7-1.3, JPEG quality 50-95, brightness +-10 %, against many distinct look-alikes: copies' worst
block up to 0.19, distinct photos' from 0.30) and checked, unchanged, on a second, differently generated set
(copies up to 0.23, distinct photos from 0.53).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from birder.errors import ImageDecodeError
from birder.io.images import load_image

THUMB_SIDE = 64  # grey thumbnail kept per photo (4 KiB as bytes)
COMPARE_SIDE = 32  # aligned thumbnails compared at this side
BLOCKS = 4  # per side: the test's 16 blocks of 8 x 8 pixels
MAX_CROP = 0.06  # of a side, at each end, either photo: the 5 % promised plus a margin for the search's steps
STEP = 0.005  # the refinement's step, of a side
COARSE = 2  # the profile search's step, in steps
# Normalisation floors, grey levels: a nearly flat photo's noise is not blown up into structure
_MIN_CONTRAST = 2.0
_MIN_PROFILE_CONTRAST = 1.0
SIGNATURE_CELLS = 8
SIGNATURE_MARGIN = 0.1  # of each side, left out of the signature: what a crop may have removed
MIN_SIGNATURE_SIMILARITY = 0.5  # below: not compared further (planted copies: 0.88 and above)
SCREEN_DIFFERENCE = 0.5  # mean squared difference after the profile alignment above which no refinement is tried
MAX_BLOCK_DIFFERENCE = 0.25  # worst block's RMS difference (units of contrast) of a copy
_MAX_REFINE_ROUNDS = 24
DECODE_SIDE = 256  # JPEGs are decoded at a reduced scale (DCT scaling), no smaller than this

Floats = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Thumbnail:
    """What the duplicate search keeps of a photo, read once."""

    grey: npt.NDArray[np.uint8]  # [THUMB_SIDE, THUMB_SIDE], the whole frame squeezed to a square
    pixels: int  # width x height of the photo as stored
    sharpness: float  # variance of the Laplacian of the grey levels, at the decoded scale
    signature: Floats  # [SIGNATURE_CELLS ** 2] (:func:`signatures`)


def sharpness(grey: npt.ArrayLike) -> float:
    """Variance of the 4-neighbour Laplacian of grey levels ``[H, W]``: higher is sharper."""
    grey = np.asarray(grey, dtype=np.float32)
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var()) if laplacian.size else 0.0


def read_thumbnail(path: str | os.PathLike) -> Thumbnail:
    """The photo at ``path`` as a :class:`Thumbnail`; JPEGs are decoded at a reduced scale (fast for big photos).

    Raises:
        ImageDecodeError: the file cannot be read (the message is :func:`~birder.io.images.load_image`'s).
    """
    try:
        with Image.open(path) as opened:
            pixels = opened.width * opened.height
            opened.draft("RGB", (DECODE_SIDE, DECODE_SIDE))
            image = load_image(opened)  # decoded here: EXIF orientation, alpha on white, errors naming the file
    except ImageDecodeError:
        raise
    except Exception:  # whatever PIL raises on opening: load_image says it in its words, naming the file
        image = load_image(path)
        pixels = image.width * image.height

    grey = image.convert("L")
    larger = min(grey.size) >= THUMB_SIDE
    thumbnail = np.asarray(
        grey.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX if larger else Image.Resampling.BILINEAR),
        dtype=np.uint8,
    )
    return Thumbnail(thumbnail, pixels, sharpness(grey), signatures(thumbnail[None])[0])


# ---------------------------------------------------------------------------------------------------------------------
# Resampling a window of a thumbnail: area weights (what a camera's pixel integrates)
# ---------------------------------------------------------------------------------------------------------------------


def area_weights(start: float, end: float, out: int = COMPARE_SIDE, size: int = THUMB_SIDE) -> Floats:
    """``[out, size]``: sample ``i`` of ``out`` over ``[start, end]`` of an axis (fractions of its length) as the
    mean of the ``size`` pixels it covers, each weighted by the length it covers."""
    edges_out = start + (end - start) * np.arange(out + 1) / out
    edges_in = np.arange(size + 1) / size
    (low, high) = (
        np.maximum(edges_out[:-1, None], edges_in[None, :-1]),
        np.minimum(edges_out[1:, None], edges_in[None, 1:]),
    )
    overlap = np.clip(high - low, 0.0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


_SIGNATURE_WEIGHTS = area_weights(SIGNATURE_MARGIN, 1 - SIGNATURE_MARGIN, SIGNATURE_CELLS)
_CUTS = round(MAX_CROP / STEP)  # ends cut, in steps: 0 ... _CUTS
# _WINDOWS[a, b]: the axis without a steps at its start and b at its end
_WINDOWS = np.array([[area_weights(a * STEP, 1 - b * STEP) for b in range(_CUTS + 1)] for a in range(_CUTS + 1)])


def signatures(grey: npt.ArrayLike) -> Floats:
    """``[n, SIGNATURE_CELLS ** 2]``: thumbnails ``[n, THUMB_SIDE, THUMB_SIDE]`` reduced to the mean grey level of
    8 x 8 cells over the central 80 % of the frame (a tenth of the frame's side each), less their mean, unit length.

    A copy's signature is nearly its original's (the cells are larger than what a crop of a few percent moves, and
    their edges lie inside what it keeps): the cosine similarity of signatures finds copies (nearest neighbours)
    and rules out most other pairs before any alignment (:data:`MIN_SIGNATURE_SIMILARITY`). A frame without
    structure (cells within a grey level of each other) gets a zero signature: it is nobody's copy.
    """
    grey = np.asarray(grey, dtype=np.float32)
    cells = (_SIGNATURE_WEIGHTS @ grey @ _SIGNATURE_WEIGHTS.T).reshape(len(grey), -1)
    cells -= cells.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(cells, axis=1, keepdims=True)
    flat = norms < _MIN_PROFILE_CONTRAST * SIGNATURE_CELLS
    return np.where(flat, 0.0, cells / np.maximum(norms, 1e-6)).astype(np.float32)


# Profile search: offsets (d_start, d_end) in steps, every COARSE-th; d > 0: the first photo shows d steps the
# second lacks at that end, d < 0: the other way round
_COARSE_WINDOWS = np.ascontiguousarray(_WINDOWS[::COARSE, ::COARSE])
_COARSE_OFFSETS = np.arange(-_CUTS, _CUTS + 1, COARSE)
_OPTIONS = np.array([(s, e) for s in _COARSE_OFFSETS for e in _COARSE_OFFSETS], dtype=np.int64)
_MOVES = np.array([(edge, sign) for edge in range(4) for sign in (-1, 1)])  # the refinement's: one edge, one step


def _zscore(values: Floats, axes: tuple[int, ...], floor: float) -> Floats:
    mean = values.mean(axis=axes, keepdims=True)
    spread = np.maximum(values.std(axis=axes, keepdims=True), floor)
    return (values - mean) / spread


def _profile_offsets(first: Floats, second: Floats) -> npt.NDArray[np.int64]:
    """``[n, 2]`` (d_start, d_end) in steps for profiles ``[n, THUMB_SIDE]`` of both photos of each pair."""
    shape = (len(first), *_COARSE_WINDOWS.shape[:3])  # [n, w, w, COMPARE_SIDE]
    first_windowed = (first @ _COARSE_WINDOWS.reshape(-1, THUMB_SIDE).T).reshape(shape)
    second_windowed = (second @ _COARSE_WINDOWS.reshape(-1, THUMB_SIDE).T).reshape(shape)
    (starts, ends) = (_OPTIONS[:, 0] // COARSE, _OPTIONS[:, 1] // COARSE)
    in_first = first_windowed[:, np.maximum(starts, 0), np.maximum(ends, 0)]  # [n, options, COMPARE_SIDE]
    in_second = second_windowed[:, np.maximum(-starts, 0), np.maximum(-ends, 0)]
    error = np.square(
        _zscore(in_first, (2,), _MIN_PROFILE_CONTRAST) - _zscore(in_second, (2,), _MIN_PROFILE_CONTRAST)
    ).mean(axis=2)
    return _OPTIONS[np.argmin(error, axis=1)]


def _render(grey: Floats, x: npt.NDArray[np.int64], y: npt.NDArray[np.int64]) -> Floats:
    """``[n, COMPARE_SIDE, COMPARE_SIDE]``: thumbnails ``grey`` ``[n, T, T]`` in windows ``x``, ``y`` ``[n, 2]``
    (steps cut at the start and the end), normalised."""
    resampled = _WINDOWS[y[:, 0], y[:, 1]] @ grey @ _WINDOWS[x[:, 0], x[:, 1]].transpose(0, 2, 1)
    return _zscore(resampled, (1, 2), _MIN_CONTRAST)


def _cuts(offsets: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """What each photo of a pair loses at each end, in steps, for ``offsets`` ``[n, 4]`` (x start, x end, y start,
    y end): the first the positive offsets, the second the negative ones."""
    return (np.maximum(offsets, 0), np.maximum(-offsets, 0))


def _mean_squared(first: Floats, second: Floats) -> Floats:
    return np.square(first - second).mean(axis=(-2, -1))


def _refine(grey: Floats, offsets: npt.NDArray[np.int64], best: Floats) -> None:
    """Coordinate descent on the window edges ``offsets`` ``[a, 4]`` of pairs ``grey`` ``[a, 2, T, T]``, in place:
    each round moves, per pair, the one edge by one step that lowers the mean squared difference most.

    A move changes one photo's window along one axis: only that photo's thumbnail is resampled again, from its
    other axis already resampled (``[S, T]`` or ``[T, S]`` kept per photo).
    """
    count = len(grey)
    pairs = np.arange(count)
    (cut_first, cut_second) = _cuts(offsets)
    cut = np.stack([cut_first, cut_second], axis=1)  # [a, 2, 4]
    rows_done = _WINDOWS[cut[..., 2], cut[..., 3]] @ grey  # [a, 2, S, T]: y windowed, x not yet
    columns_done = grey @ _WINDOWS[cut[..., 0], cut[..., 1]].transpose(0, 1, 3, 2)  # [a, 2, T, S]
    rendered = _zscore(rows_done @ _WINDOWS[cut[..., 0], cut[..., 1]].transpose(0, 1, 3, 2), (2, 3), _MIN_CONTRAST)
    active = pairs
    for _ in range(_MAX_REFINE_ROUNDS):
        if not len(active):
            return
        scores = np.full((len(active), len(_MOVES)), np.inf, dtype=np.float32)
        trials = np.empty((len(active), len(_MOVES), COMPARE_SIDE, COMPARE_SIDE), dtype=np.float32)
        for number, (edge, sign) in enumerate(_MOVES):
            value = offsets[active, edge]
            moved = value + sign
            valid = np.abs(moved) <= _CUTS
            photo = np.where(np.maximum(value, moved) > 0, 0, 1)  # whose window changes
            new_cut = cut[active, photo]  # a copy (fancy indexing)
            new_cut[:, edge] = np.minimum(np.abs(moved), _CUTS)  # an invalid move is scored, then ignored
            if edge < 2:
                window = _WINDOWS[new_cut[:, 0], new_cut[:, 1]]
                resampled = rows_done[active, photo] @ window.transpose(0, 2, 1)
            else:
                resampled = _WINDOWS[new_cut[:, 2], new_cut[:, 3]] @ columns_done[active, photo]
            trials[:, number] = _zscore(resampled, (1, 2), _MIN_CONTRAST)
            score = _mean_squared(trials[:, number], rendered[active, 1 - photo])
            scores[valid, number] = score[valid]

        choice = np.argmin(scores, axis=1)
        chosen = scores[np.arange(len(active)), choice]
        better = chosen < best[active] - 1e-6
        (active, choice) = (active[better], choice[better])
        (edge, sign) = (_MOVES[choice, 0], _MOVES[choice, 1])
        value = offsets[active, edge]
        photo = np.where(np.maximum(value, value + sign) > 0, 0, 1)
        offsets[active, edge] = value + sign
        cut[active, photo, edge] = np.abs(value + sign)
        best[active] = chosen[better]
        rendered[active, photo] = trials[better][np.arange(len(active)), choice]
        # The changed photo's half-resampled copy along its other axis
        (x_moved, y_moved) = (edge < 2, edge >= 2)
        (pair, side) = (active[x_moved], photo[x_moved])
        columns_done[pair, side] = grey[pair, side] @ _WINDOWS[cut[pair, side, 0], cut[pair, side, 1]].transpose(
            0, 2, 1
        )
        (pair, side) = (active[y_moved], photo[y_moved])
        rows_done[pair, side] = _WINDOWS[cut[pair, side, 2], cut[pair, side, 3]] @ grey[pair, side]


@dataclass(frozen=True)
class PixelComparison:
    """Per pair (arrays of the same length)."""

    block_difference: Floats  # worst block's RMS difference, units of contrast (the test's figure)
    ssim: Floats  # structural similarity of the aligned thumbnails as a whole
    offsets: npt.NDArray[np.float32]  # [n, 4] fractions of a side: x start, x end, y start, y end (see module doc)

    @property
    def is_copy(self) -> npt.NDArray[np.bool_]:
        return self.block_difference <= MAX_BLOCK_DIFFERENCE


def _ssim(first: Floats, second: Floats) -> Floats:
    """Whole-thumbnail SSIM of normalised thumbnails (unit contrast: the constants for a range of about 6)."""
    (c1, c2) = ((0.01 * 6) ** 2, (0.03 * 6) ** 2)
    (mean_a, mean_b) = (first.mean(axis=(1, 2)), second.mean(axis=(1, 2)))
    (var_a, var_b) = (first.var(axis=(1, 2)), second.var(axis=(1, 2)))
    covariance = ((first - mean_a[:, None, None]) * (second - mean_b[:, None, None])).mean(axis=(1, 2))
    numerator = (2 * mean_a * mean_b + c1) * (2 * covariance + c2)
    return numerator / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))


def _aligned(first: Floats, second: Floats, offsets: npt.NDArray[np.int64]) -> tuple[Floats, Floats]:
    (cut_first, cut_second) = _cuts(offsets)
    return (_render(first, cut_first[:, :2], cut_first[:, 2:]), _render(second, cut_second[:, :2], cut_second[:, 2:]))


def compare_thumbnails(first: npt.ArrayLike, second: npt.ArrayLike) -> PixelComparison:
    """Compare the pairs ``first[i]``, ``second[i]`` (grey thumbnails ``[n, THUMB_SIDE, THUMB_SIDE]``)."""
    first = np.asarray(first, dtype=np.float32)
    second = np.asarray(second, dtype=np.float32)
    count = len(first)
    offsets = np.concatenate(
        [
            _profile_offsets(first.mean(axis=1), second.mean(axis=1)),
            _profile_offsets(first.mean(axis=2), second.mean(axis=2)),
        ],
        axis=1,
    )
    best = _mean_squared(*_aligned(first, second, offsets))
    close = np.flatnonzero(best <= SCREEN_DIFFERENCE)
    if len(close):
        (sub_offsets, sub_best) = (offsets[close], best[close])
        _refine(np.stack([first[close], second[close]], axis=1), sub_offsets, sub_best)
        (offsets[close], best[close]) = (sub_offsets, sub_best)

    (aligned_first, aligned_second) = _aligned(first, second, offsets)
    size = COMPARE_SIDE // BLOCKS
    squared = np.square(aligned_first - aligned_second).reshape(count, BLOCKS, size, BLOCKS, size)
    worst = np.sqrt(squared.mean(axis=(2, 4)).max(axis=(1, 2)))
    return PixelComparison(worst.astype(np.float32), _ssim(aligned_first, aligned_second), offsets * np.float32(STEP))

"""The hierarchical geographic grid of the prior: H3 cells (the ``h3`` package), many points at a time.

Only the finest resolution is computed by h3 (one call per distinct point); coarser cells are derived from it with
integer operations on the H3 index, so a million records cost a million h3 calls at most, whatever the number of
resolutions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError

MAX_RESOLUTION = 15
# H3 index layout (64 bits): the resolution sits in bits 52-55, then one 3-bit digit per resolution 1..15, digit 15
# in the lowest bits. Digits below a cell's resolution are all ones (7).
_RESOLUTION_SHIFT = np.uint64(52)
_RESOLUTION_MASK = np.uint64(0xF) << _RESOLUTION_SHIFT
_BITS_PER_DIGIT = 3


def import_h3() -> Any:
    """The ``h3`` package's integer API, or a one-line error naming the extra that installs it."""
    try:
        from h3.api import basic_int
    except ImportError:
        raise BirderError("the location prior needs the h3 package: pip install 'birder[geo]'") from None
    return basic_int


def check_resolutions(resolutions: Any) -> tuple[int, ...]:
    """Distinct resolutions in 0..15, coarsest first."""
    values = sorted({int(value) for value in resolutions})
    if not values or values[0] < 0 or values[-1] > MAX_RESOLUTION:
        raise BirderError(f"H3 resolutions must be between 0 and {MAX_RESOLUTION}, got {list(resolutions)}")
    return tuple(values)


def cells_of_points(
    latitudes: npt.NDArray[np.float64], longitudes: npt.NDArray[np.float64], resolution: int
) -> npt.NDArray[np.uint64]:
    """The H3 cell (as an unsigned integer) of each point at ``resolution``; the points must be valid coordinates."""
    h3 = import_h3()
    # Occurrence data repeat places (hides, hotspots, rounded coordinates): ask h3 once per distinct point
    points = np.asarray(latitudes, dtype=np.float64) + 1j * np.asarray(longitudes, dtype=np.float64)
    (unique, inverse) = np.unique(points, return_inverse=True)
    cells = np.fromiter(
        (h3.latlng_to_cell(point.real, point.imag, resolution) for point in unique.tolist()),
        dtype=np.uint64,
        count=len(unique),
    )
    return cells[inverse.reshape(-1)]


def parent_cells(cells: npt.NDArray[np.uint64], resolution: int) -> npt.NDArray[np.uint64]:
    """The ancestors of ``cells`` (all at one finer resolution) at ``resolution``, computed on the index bits."""
    cells = np.asarray(cells, dtype=np.uint64)
    unused_digits = np.uint64((1 << (_BITS_PER_DIGIT * (MAX_RESOLUTION - resolution))) - 1)
    with_resolution = (cells & ~_RESOLUTION_MASK) | (np.uint64(resolution) << _RESOLUTION_SHIFT)
    return with_resolution | unused_digits


def neighbour_cells(cells: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
    """The ring of cells around each of ``cells`` (six; five round a pentagon) as ``(owner, neighbour)`` pairs,
    ``owner`` indexing ``cells`` (h3 is asked once per distinct cell)."""
    h3 = import_h3()
    (unique, inverse) = np.unique(np.asarray(cells, dtype=np.uint64), return_inverse=True)
    rings = [[other for other in h3.grid_disk(cell, 1) if other != cell] for cell in unique.tolist()]
    lengths = np.array([len(ring) for ring in rings], dtype=np.int64)
    flat = np.fromiter((other for ring in rings for other in ring), dtype=np.uint64, count=int(lengths.sum()))
    inverse = inverse.reshape(-1)
    per_cell = lengths[inverse]
    owner = np.repeat(np.arange(len(inverse)), per_cell)
    offsets = np.arange(int(per_cell.sum())) - np.repeat(np.cumsum(per_cell) - per_cell, per_cell)
    return (owner, flat[np.repeat((np.cumsum(lengths) - lengths)[inverse], per_cell) + offsets])


def cell_of_point(latitude: float, longitude: float, resolution: int) -> int:
    return int(import_h3().latlng_to_cell(float(latitude), float(longitude), resolution))


def valid_coordinates(latitudes: npt.NDArray[np.float64], longitudes: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Finite, in range, and not exactly (0, 0): the classic placeholder of a record whose position was not known."""
    latitudes = np.asarray(latitudes, dtype=np.float64)
    longitudes = np.asarray(longitudes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        in_range = (np.abs(latitudes) <= 90.0) & (np.abs(longitudes) <= 180.0)
    return in_range & ~((latitudes == 0.0) & (longitudes == 0.0))

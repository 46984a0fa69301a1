"""The location-and-season prior: p(species | place, day) from occurrence records.

The model, and why:

- **Place.** Records are counted per species on H3 cells at several resolutions (say 1-5: cells of about
  610,000, 87,000, 12,000, 1,800 and 250 km²). A place's estimate starts from all records (Laplace-smoothed) and
  goes down the cells that contain it, coarse to fine; at each level ``p = (n + a * p_parent) / (N + a)``, where
  ``n`` are the cell's counts per species (plus ``neighbour_weight`` times those of the ring of cells around it,
  so a place near a cell's edge hears from across it), ``N`` their sum and ``a`` the pseudo-count, multiplied by
  ``pseudo_count_growth`` at each finer level (a finer cell differs less from its parent). A cell with many
  records speaks for itself; a cell with few is mostly its parent's estimate (back-off where data are thin).
- **Day.** Each species' record days are smoothed by a circular Gaussian kernel (``kernel_days`` standard
  deviation, 31 December next to 1 January) and shrunk toward year-round presence; with ``season_resolution``
  set, a coarse cell's own dated records of a species give it a season of its own there, shrunk toward the
  species' season everywhere (a migrant that winters in the south and breeds in the north). The place estimate is
  multiplied by the species' seasonal factor and renormalised.
- **Floor.** A share ``floor`` of the mass spread evenly over the classes, so no species ever gets zero: a vagrant
  is made less likely, never impossible.

The settings are chosen from the records by :mod:`birder.geo.prior_search` (held-out log-likelihood over spatial
blocks) when ``birder-prior build`` makes a prior; :class:`PriorSettings`'s defaults are the fixed settings of
before, which a file of format version 1 was built with.

A photo's probabilities are then adjusted as ``posterior ∝ p(species | photo) * prior ** strength`` at the
prior's place in the decision order (:mod:`birder.inference.decision`). A photo with a place but no date gets the
place-only (year-round) prior; without a place the answer stays the image's (:data:`MODE_PLACE_DAY`,
:data:`MODE_PLACE`, :data:`MODE_NONE`).

The ``.bpr`` file format is :mod:`birder.geo.prior_file`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError
from birder.geo.grid import cells_of_points, check_resolutions, neighbour_cells, parent_cells, valid_coordinates
from birder.geo.records import Records
from birder.geo.season import DAY_BINS, day_bin_of_date, local_seasonal_factors, seasonal_factors

# How a photo's answer used the prior (the `prior` column)
MODE_PLACE_DAY = "place_day"  # place and day known: the full prior
MODE_PLACE = "place"  # place known, day not: the year-round prior of the place
MODE_NONE = "none"  # no place: the image's answer alone
# The image-only top species is out of range when its prior is below this share of an even prior (1 / classes)
OUT_OF_RANGE_RATIO = 0.1


@dataclass(frozen=True)
class PriorSettings:
    """How a prior is built (stored in its file)."""

    resolutions: tuple[int, ...] = (2, 3, 4, 5)
    kernel_days: float = 15.0  # standard deviation of the day-of-year kernel
    floor: float = 0.01  # share of the mass spread evenly over every class
    pseudo_count: float = 10.0  # records a cell needs to weigh as much as its parent's estimate
    season_pseudo_count: float = 10.0  # records a species needs to weigh as much as year-round presence
    neighbour_weight: float = 0.0  # how much the ring of cells around a place counts with its own cell (0 .. 1)
    pseudo_count_growth: float = 1.0  # each finer level's pseudo-count is this many times its parent level's
    # Where the season may differ from place to place: the H3 resolution of the season cells (None: one season
    # per species everywhere), and the dated records a species needs in a season cell to weigh as much as its
    # season everywhere
    season_resolution: int | None = None
    local_season_pseudo_count: float = 30.0
    # The resolution a place is located at before its cells at ``resolutions`` are found (from the index bits; a
    # coarse cell is then exactly the union of its fine ones). None: the finest of ``resolutions``.
    base_resolution: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolutions", check_resolutions(self.resolutions))
        if self.base_resolution is not None:
            object.__setattr__(self, "base_resolution", check_resolutions([self.base_resolution])[0])
            if self.base_resolution < max(self.resolutions):
                raise BirderError(
                    f"the base resolution ({self.base_resolution}) must be at least the finest resolution "
                    f"({max(self.resolutions)})"
                )
        if self.season_resolution is not None:
            object.__setattr__(self, "season_resolution", int(self.season_resolution))
            if not 0 <= self.season_resolution <= max(self.resolutions):
                raise BirderError(
                    f"the season resolution must be between 0 and the finest resolution ({max(self.resolutions)}), "
                    f"got {self.season_resolution}"
                )
        if not 0.0 <= self.neighbour_weight <= 1.0:
            raise BirderError(f"the prior's neighbour weight must be between 0 and 1, got {self.neighbour_weight}")
        if not 0.0 < self.floor < 1.0:
            raise BirderError(f"the prior's floor must be between 0 and 1 (exclusive), got {self.floor}")
        counts = (self.pseudo_count, self.season_pseudo_count, self.local_season_pseudo_count, self.pseudo_count_growth)
        if self.kernel_days < 0 or min(counts) <= 0:
            raise BirderError("the kernel width must be >= 0, the pseudo-counts and their growth > 0")

    @property
    def point_resolution(self) -> int:
        """The resolution places are located at (see ``base_resolution``)."""
        return max(self.resolutions) if self.base_resolution is None else self.base_resolution


def classes_sha256(class_names: Sequence[str]) -> str:
    """The identity of a class list (names in index order): what ties a prior to a model."""
    return hashlib.sha256(json.dumps(list(class_names), ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class CellCounts:
    """Weighted record counts per (cell, class) at one resolution, sparse: cell ``i``'s classes and counts are
    ``classes[indptr[i]:indptr[i + 1]]`` and ``counts[...]`` (cells sorted, for binary search)."""

    cells: npt.NDArray[np.uint64]
    indptr: npt.NDArray[np.int64]
    classes: npt.NDArray[np.int32]
    counts: npt.NDArray[np.float32]

    @classmethod
    def from_records(
        cls, cells: npt.NDArray[np.uint64], classes: npt.NDArray[np.int32], weights: npt.NDArray[np.float32]
    ) -> CellCounts:
        order = np.lexsort((classes, cells))
        (cells, classes, weights) = (cells[order], classes[order], weights[order].astype(np.float64))
        starts = np.flatnonzero(np.r_[True, (cells[1:] != cells[:-1]) | (classes[1:] != classes[:-1])])
        pair_cells = cells[starts]
        pair_counts = np.add.reduceat(weights, starts) if len(starts) else np.zeros(0)
        cell_starts = np.flatnonzero(np.r_[True, pair_cells[1:] != pair_cells[:-1]]) if len(starts) else starts
        return cls(
            pair_cells[cell_starts],
            np.r_[cell_starts, len(starts)].astype(np.int64),
            classes[starts].astype(np.int32),
            pair_counts.astype(np.float32),
        )

    def rows_of(self, cells: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """The row of each of ``cells`` (-1: no record fell in it)."""
        cells = np.asarray(cells, dtype=np.uint64)
        if len(self.cells) == 0:
            return np.full(len(cells), -1, dtype=np.int64)
        positions = np.minimum(np.searchsorted(self.cells, cells), len(self.cells) - 1)
        return np.where(self.cells[positions] == cells, positions, -1).astype(np.int64)

    def dense_rows(self, rows: npt.NDArray[np.int64], num_classes: int) -> npt.NDArray[np.float64]:
        """``[len(rows), classes]`` counts of the given rows (zeros for row -1)."""
        dense = np.zeros((len(rows), num_classes), dtype=np.float64)
        (owner, positions) = expand_rows(self.indptr, rows)
        dense[owner, self.classes[positions]] = self.counts[positions]
        return dense

    def totals(self) -> npt.NDArray[np.float64]:
        """Each row's summed counts."""
        return np.add.reduceat(self.counts.astype(np.float64), self.indptr[:-1]) if len(self.cells) else np.zeros(0)

    def counts_of(self, cell: int, num_classes: int) -> npt.NDArray[np.float64] | None:
        """The dense counts of one cell, or None when no record fell in it."""
        position = int(np.searchsorted(self.cells, np.uint64(cell)))
        if position >= len(self.cells) or int(self.cells[position]) != cell:
            return None
        (start, end) = (self.indptr[position], self.indptr[position + 1])
        dense = np.zeros(num_classes, dtype=np.float64)
        dense[self.classes[start:end]] = self.counts[start:end]
        return dense


def expand_rows(
    indptr: npt.NDArray[np.int64], rows: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The stored elements of CSR ``rows`` (-1: an empty row): for each, its output row and its position."""
    rows = np.asarray(rows, dtype=np.int64)
    present = rows >= 0
    safe = np.where(present, rows, 0)
    starts = np.where(present, indptr[safe], 0)
    lengths = np.where(present, indptr[safe + 1] - starts, 0)
    owner = np.repeat(np.arange(len(rows)), lengths)
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return (owner, np.repeat(starts, lengths) + offsets)


@dataclass
class PriorAnswer:
    """The prior of one photo: the vector (None: image-only) and the mode it was made in."""

    vector: npt.NDArray[np.float32] | None
    mode: str


@dataclass
class LocationPrior:
    """A built prior for one class list (see the module's docstring); build with :meth:`build`, save and load
    with :mod:`birder.geo.prior_file`."""

    classes: list[str]
    settings: PriorSettings
    global_counts: npt.NDArray[np.float64]  # [classes]
    levels: dict[int, CellCounts]  # resolution -> counts
    day_counts: npt.NDArray[np.float32]  # [classes, DAY_BINS]
    info: dict[str, Any] = field(default_factory=dict)  # what it was built from (records report, time)
    # Dated counts per season cell (settings.season_resolution), the "class" of an entry being class * DAY_BINS + bin
    season_counts: CellCounts | None = None
    # How the settings were chosen from the records (birder.geo.prior_search.SettingsChoice.as_dict; None: given)
    settings_search: dict[str, Any] | None = None
    _season: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    _local_seasons: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls, records: Records, class_names: Sequence[str], settings: PriorSettings | None = None, **info: Any
    ) -> LocationPrior:
        """Count ``records`` (already matched to ``class_names``) into a prior."""
        settings = settings or PriorSettings()
        num_classes = len(class_names)
        cells = cells_of_points(records.latitudes, records.longitudes, settings.point_resolution)
        levels = {
            resolution: CellCounts.from_records(parent_cells(cells, resolution), records.classes, records.weights)
            for resolution in settings.resolutions
        }
        global_counts = np.bincount(records.classes, weights=records.weights, minlength=num_classes)
        dated = records.day_bins >= 0
        day_counts = np.zeros((num_classes, DAY_BINS), dtype=np.float64)
        np.add.at(day_counts, (records.classes[dated], records.day_bins[dated]), records.weights[dated])
        season_counts = None
        if settings.season_resolution is not None:
            season_cells = parent_cells(cells[dated], settings.season_resolution)
            keys = records.classes[dated].astype(np.int64) * DAY_BINS + records.day_bins[dated]
            season_counts = CellCounts.from_records(season_cells, keys.astype(np.int32), records.weights[dated])
        return cls(
            list(class_names),
            settings,
            global_counts,
            levels,
            day_counts.astype(np.float32),
            dict(info),
            season_counts,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def classes_sha256(self) -> str:
        return classes_sha256(self.classes)

    def check_classes(self, class_names: Sequence[str], source: str = "the prior") -> None:
        """Refuse (one line) a prior built for another class list than ``class_names``."""
        if list(class_names) == self.classes:
            return
        raise BirderError(
            f"{source} was built for another model's classes ({self.num_classes} classes, "
            f"sha256 {self.classes_sha256[:12]}; this model has {len(class_names)}, sha256 "
            f"{classes_sha256(class_names)[:12]}): build one with birder-prior build --classes <this model>"
        )

    # -----------------------------------------------------------------------------------------------------------------
    # Queries
    # -----------------------------------------------------------------------------------------------------------------

    def place_probabilities(self, latitude: float, longitude: float) -> npt.NDArray[np.float64]:
        """p(species | place), year-round, before the floor (see the module's docstring)."""
        return self.place_probabilities_many(np.array([latitude]), np.array([longitude]))[0]

    def place_probabilities_many(
        self, latitudes: npt.NDArray[np.float64], longitudes: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """``[points, classes]`` p(species | place) of valid coordinates, year-round, before the floor."""
        total = self.global_counts.sum()
        estimate = np.tile((self.global_counts + 1.0) / (total + self.num_classes), (len(latitudes), 1))
        cells = cells_of_points(latitudes, longitudes, self.settings.point_resolution)
        neighbour_weight = self.settings.neighbour_weight
        for depth, resolution in enumerate(self.settings.resolutions):
            alpha = self.settings.pseudo_count * self.settings.pseudo_count_growth**depth
            level = self.levels[resolution]
            level_cells = parent_cells(cells, resolution)
            counts = level.dense_rows(level.rows_of(level_cells), self.num_classes)
            if neighbour_weight > 0:
                (owner, neighbours) = neighbour_cells(level_cells)
                ring = level.dense_rows(level.rows_of(neighbours), self.num_classes)
                # owner is sorted and every cell has a ring (five or six cells): sum each point's run of rows
                counts += neighbour_weight * np.add.reduceat(ring, np.searchsorted(owner, np.arange(len(cells))))
            # A cell without records leaves the estimate as it is (n = N = 0 in the formula)
            estimate = (counts + alpha * estimate) / (counts.sum(axis=1, keepdims=True) + alpha)
        return estimate

    def seasonal_factors(self) -> npt.NDArray[np.float32]:
        """``[classes, DAY_BINS]`` seasonal factors everywhere (computed once)."""
        if self._season is None:
            self._season = seasonal_factors(
                self.day_counts, self.settings.kernel_days, self.settings.season_pseudo_count
            )
        return self._season

    def local_seasonal_factors(self, season_cell: int) -> npt.NDArray[np.float32]:
        """``[classes, DAY_BINS]`` seasonal factors in one season cell: its own records' season, shrunk toward
        the season everywhere (computed once per cell; the seasons everywhere without local seasons)."""
        if self.season_counts is None:
            return self.seasonal_factors()
        if season_cell not in self._local_seasons:
            row = self.season_counts.rows_of(np.array([season_cell], dtype=np.uint64))
            flat = self.season_counts.dense_rows(row, self.num_classes * DAY_BINS)[0]
            self._local_seasons[season_cell] = local_seasonal_factors(
                self.seasonal_factors(),
                flat.reshape(self.num_classes, DAY_BINS),
                self.settings.kernel_days,
                self.settings.local_season_pseudo_count,
            )
        return self._local_seasons[season_cell]

    def probabilities(self, latitude: float, longitude: float, day_bin: int | None = None) -> npt.NDArray[np.float32]:
        """p(species | place, day) with the floor; year-round when ``day_bin`` is None."""
        days = np.array([-1 if day_bin is None else day_bin])
        return self.probabilities_many(np.array([latitude]), np.array([longitude]), days)[0]

    def probabilities_many(
        self,
        latitudes: npt.NDArray[np.float64],
        longitudes: npt.NDArray[np.float64],
        day_bins: npt.NDArray[np.integer],
    ) -> npt.NDArray[np.float32]:
        """``[points, classes]`` p(species | place, day) with the floor, for valid coordinates; a day bin of -1
        gives the year-round prior of that place."""
        place = self.place_probabilities_many(latitudes, longitudes)
        day_bins = np.asarray(day_bins, dtype=np.int64)
        dated = np.flatnonzero(day_bins >= 0)
        if len(dated) and self.season_counts is None:
            factors = self.seasonal_factors()[:, day_bins[dated]].T
        elif len(dated):
            season_cells = parent_cells(
                cells_of_points(latitudes[dated], longitudes[dated], self.settings.point_resolution),
                self.settings.season_resolution,
            )
            factors = np.empty((len(dated), self.num_classes), dtype=np.float32)
            for cell in np.unique(season_cells).tolist():
                mine = np.flatnonzero(season_cells == cell)
                factors[mine] = self.local_seasonal_factors(cell)[:, day_bins[dated[mine]]].T
        if len(dated):
            seasonal = place[dated] * factors
            place[dated] = seasonal / seasonal.sum(axis=1, keepdims=True)
        floor = self.settings.floor
        return ((1.0 - floor) * place + floor / self.num_classes).astype(np.float32)

    def lookup(
        self, location: tuple[float, float] | None, date: dt.date | dt.datetime | str | None = None
    ) -> PriorAnswer:
        """The prior of a photo taken at ``location`` (latitude, longitude) on ``date``, and its mode.

        A place but no date: the year-round prior. No place (or an impossible one): no prior (image-only).
        """
        if location is None or location[0] is None or location[1] is None:
            return PriorAnswer(None, MODE_NONE)
        (latitude, longitude) = (float(location[0]), float(location[1]))
        if not valid_coordinates(np.array([latitude]), np.array([longitude]))[0]:
            return PriorAnswer(None, MODE_NONE)
        day = parse_date(date)
        if day is None:
            return PriorAnswer(self.probabilities(latitude, longitude), MODE_PLACE)
        return PriorAnswer(self.probabilities(latitude, longitude, day_bin_of_date(day)), MODE_PLACE_DAY)

    def describe(self) -> dict[str, Any]:
        """What ``birder-prior info`` shows."""
        return {
            "classes": self.num_classes,
            "classes_sha256": self.classes_sha256,
            "weighted_records": round(float(self.global_counts.sum()), 3),
            "cells": {str(resolution): len(level.cells) for (resolution, level) in self.levels.items()},
            **asdict(self.settings),
            **self.info,
            **({"settings_search": self._search_summary()} if self.settings_search else {}),
        }

    def _search_summary(self) -> dict[str, Any]:
        """The settings search without its list of candidates (``birder-prior info`` says how many there were)."""
        search = dict(self.settings_search or {})
        candidates = search.pop("candidates", [])
        chosen = [c["heldout_loglik"] for c in candidates if _same_settings(c, self.settings)]
        return {**search, "candidates": len(candidates), "chosen_heldout_loglik": chosen[0] if chosen else None}


def _same_settings(values: dict[str, Any], settings: PriorSettings) -> bool:
    """Whether a stored candidate (its settings' fields among ``values``) is ``settings``."""
    try:
        return PriorSettings(**{name: values[name] for name in asdict(settings)}) == settings
    except (KeyError, TypeError, BirderError):
        return False


def parse_date(value: dt.date | dt.datetime | str | None) -> dt.date | None:
    """A date from a date, a datetime or ISO text (``2023-05-14``, ``2023-05-14T07:32:10``, EXIF's
    ``2023:05:14 07:32:10``); None when there is none or it cannot be read."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip()[:10].replace(":", "-")
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


def out_of_range(image_probabilities: npt.NDArray[np.floating], prior: npt.NDArray[np.floating] | None) -> bool | None:
    """Whether the image-only top species is rare at that place and day: its prior below
    :data:`OUT_OF_RANGE_RATIO` of an even prior (a possible vagrant: flagged, never removed). None: no prior."""
    if prior is None:
        return None
    top = int(np.argmax(image_probabilities))
    return bool(prior[top] * len(prior) < OUT_OF_RANGE_RATIO)


def _per_image(value: Any, count: int, is_single: Any) -> list[Any]:
    """One value for every image, or a sequence of ``count`` values (one per image)."""
    if value is None or is_single(value):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise BirderError(f"got {len(values)} locations or dates for {count} images")
    return values


def prior_rows(
    prior: LocationPrior, count: int, location: Any = None, date: Any = None
) -> tuple[npt.NDArray[np.float64], list[str]]:
    """``([count, classes] prior vectors, modes)`` for images taken at ``location`` on ``date``: each a single
    value for all images or one per image. Rows without a place are ones (no change to the image's answer)."""
    locations = _per_image(
        location, count, lambda v: len(v) == 2 and not isinstance(v[0], (tuple, list, np.ndarray, type(None)))
    )
    dates = _per_image(date, count, lambda v: isinstance(v, (str, dt.date)))
    matrix = np.ones((count, prior.num_classes), dtype=np.float64)
    modes = []
    for row, (place, day) in enumerate(zip(locations, dates, strict=True)):
        answer = prior.lookup(place, day)
        modes.append(answer.mode)
        if answer.vector is not None:
            matrix[row] = answer.vector
    return (matrix, modes)

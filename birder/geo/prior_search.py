"""The prior's settings chosen from the records themselves: held-out log-likelihood over spatial blocks.

What there is to set (:class:`birder.geo.prior.PriorSettings`): how fine the cells go and how strongly each finer
level is shrunk toward its parent (pseudo-count, and its growth per level), how much the ring of neighbouring
cells counts, how wide the season kernel is and how far a species' days are shrunk toward year-round presence,
whether seasons differ from place to place (local seasons on coarse cells, and their shrinkage), and the floor.
The right values depend on how many records there are and how they lie: dense records support fine cells and
narrow kernels, sparse ones do not. So they are measured, not fixed:

- **Spatial blocks.** Records are grouped into blocks (H3 cells at :data:`BLOCK_RESOLUTION`, about 6 km across,
  finer than any cell the prior may use) and whole blocks are dealt to ``folds`` folds. Records at one spot (a
  hide, a hotspot, a checklist, a duplicate from two datasets) are never split between fitting and scoring, so
  they cannot vouch for each other; each prior cell keeps the records of its other blocks.
- **Score.** For each fold, a prior counted from the other folds gives each held-out record the probability of
  its species at its place and day (its place alone when undated): what the prior does for a photo. A candidate's
  score is the mean log of that probability (at most :data:`MAX_SCORED` records are scored, every record
  counts). The scores are exact: the prior of :mod:`birder.geo.prior` is linear in the counts, so the recursion
  over its levels runs on two numbers per record (its own species' estimate and the sum over all species, each
  times the seasonal factors), and each fold's counts are all records' minus the fold's.
- **Search.** Coordinate-wise from the fixed defaults: each step tries every candidate value of one setting (the
  resolutions together with the pseudo-count's growth) with the others held and keeps the best, round after round
  until a round gains less than :data:`CONVERGED`. Settings the user gives stay fixed.

Every candidate locates places at the blocks' resolution (``base_resolution``), so the prior that is built is the
one that was scored.
"""

from __future__ import annotations

import itertools
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError
from birder.geo.grid import cells_of_points, neighbour_cells, parent_cells
from birder.geo.prior import PriorSettings, expand_rows
from birder.geo.records import Records
from birder.geo.season import DAY_BINS, seasonal_factors, smooth_days

# Blocks: H3 cells of about 36 km² (6 km across). The prior's cells are coarser, so a block never straddles one.
BLOCK_RESOLUTION = 6
# The prior's levels go from this resolution (cells of about 610,000 km²) to the finest one searched
COARSEST_RESOLUTION = 1
DEFAULT_FOLDS = 5
# Fewer usable records or blocks than this and held-out scores mean little: the defaults are kept, and said so
MIN_RECORDS = 200
MIN_BLOCKS_PER_FOLD = 4
MAX_ROUNDS = 4
# A round that raises the held-out log-likelihood by less than this (per record) ends the search
CONVERGED = 0.0005
# Options within this of the best (per record) count as tied
TIE = 1e-5
# Local seasons are not scored when their (season cell, species) day counts would exceed this many numbers
_LOCAL_ELEMENTS = 8_000_000
# At most this many held-out records are scored (all of them count for training)
MAX_SCORED = 50_000
# Elements of fine levels' rows kept between candidates (16 bytes each)
_CACHED_ELEMENTS = 10_000_000
# Stored elements expanded at once when a season candidate is scored (bounds memory at any class count)
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class SearchSpace:
    """The candidate values of each setting (a single value: that setting is fixed)."""

    finest_resolutions: tuple[int, ...] = (1, 2, 3, 4, 5)  # the prior's cells go from COARSEST_RESOLUTION to this
    pseudo_counts: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
    kernel_days: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
    season_pseudo_counts: tuple[float, ...] = (1.0, 10.0, 100.0)
    floors: tuple[float, ...] = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
    neighbour_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    pseudo_count_growths: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    season_resolutions: tuple[int | None, ...] = (None, 1, 2)  # None: one season per species everywhere
    local_season_pseudo_counts: tuple[float, ...] = (3.0, 10.0, 30.0, 100.0)

    def __post_init__(self) -> None:
        for name in (
            "finest_resolutions",
            "pseudo_counts",
            "kernel_days",
            "season_pseudo_counts",
            "floors",
            "neighbour_weights",
            "pseudo_count_growths",
            "season_resolutions",
            "local_season_pseudo_counts",
        ):
            values = tuple(getattr(self, name))
            if not values:
                raise BirderError(f"the settings search needs at least one value of {name}")
            object.__setattr__(self, name, values)
        if max(self.finest_resolutions) >= BLOCK_RESOLUTION:
            raise BirderError(
                f"the settings search validates cells up to resolution {BLOCK_RESOLUTION - 1} (its blocks are "
                f"resolution {BLOCK_RESOLUTION}); give finer resolutions with --resolutions to fix them"
            )


def resolutions_to(finest: int) -> tuple[int, ...]:
    """The prior's levels for a finest resolution: every one from :data:`COARSEST_RESOLUTION` (or ``finest``)."""
    return tuple(range(min(COARSEST_RESOLUTION, finest), finest + 1))


@dataclass
class Candidate:
    settings: PriorSettings
    heldout_loglik: float  # mean log-probability of a held-out record's species at its place and day
    varied: str  # the settings this candidate tried values of
    round: int = 0  # the search's round (0: its starting point)


@dataclass
class Step:
    """One step of the search: the settings it varied, every option it weighed and the one it kept."""

    round: int
    varied: tuple[str, ...]
    options: list[PriorSettings]
    scores: list[float]
    picked: int
    new: int  # options scored for the first time here


@dataclass
class SettingsChoice:
    """The outcome of :func:`choose_settings`: the settings, and every candidate scored on the way."""

    settings: PriorSettings
    candidates: list[Candidate] = field(default_factory=list)  # each distinct candidate scored, in order
    steps: list[Step] = field(default_factory=list)
    folds: int = DEFAULT_FOLDS
    block_resolution: int = BLOCK_RESOLUTION
    blocks: int = 0
    records: int = 0
    fixed: tuple[str, ...] = ()
    seconds: float = 0.0
    skipped: str | None = None  # why no search was run (the defaults were kept)

    @property
    def chosen_loglik(self) -> float | None:
        """The held-out log-likelihood of the chosen settings (None: no search)."""
        return next((c.heldout_loglik for c in self.candidates if c.settings == self.settings), None)

    def lines(self, width: int = 118) -> list[str]:
        """What ``birder-prior build`` prints: each step of the search with the held-out log-likelihood of every
        value it tried (``*``: the value kept; a step that only met candidates scored before is left out), then the
        choice."""
        if self.skipped is not None:
            return [f"settings: not chosen from the records ({self.skipped}): {describe_settings(self.settings)}"]
        fixed = f"; fixed: {', '.join(self.fixed)}" if self.fixed else ""
        out = textwrap.wrap(
            "settings chosen by held-out log-likelihood (mean log-probability of a record's species at its place and "
            f"day, counted from the other folds; {self.records:,} records in {self.blocks:,} spatial blocks of H3 "
            f"resolution {self.block_resolution}, {self.folds} folds{fixed}; {self.seconds:.1f} s):",
            width,
            subsequent_indent=" " * 4,
        )
        start = self.candidates[0]
        out += textwrap.wrap(
            f"start: {describe_settings(start.settings)}: {start.heldout_loglik:.5f}",
            width,
            initial_indent="  ",
            subsequent_indent=" " * 4,
        )
        for step in self.steps:
            if not step.new:
                continue
            items = [
                " ".join(_value_text(name, getattr(option, name)) for name in step.varied)
                + f" {value:.5f}"
                + ("*" if index == step.picked else "")
                for (index, (option, value)) in enumerate(zip(step.options, step.scores, strict=True))
            ]
            label = " x ".join(_SHORT_NAMES[name] for name in step.varied)
            out += _wrapped(f"  round {step.round}, {label}: ", items, width)
        out.append(f"settings: {describe_settings(self.settings)} (held-out log-likelihood {self.chosen_loglik:.5f})")
        return out

    def as_dict(self) -> dict[str, Any]:
        """What the ``.bpr`` metadata keeps (``settings_search``)."""
        return {
            "method": "held-out log-likelihood, spatial blocks, coordinate-wise search",
            "folds": self.folds,
            "block_resolution": self.block_resolution,
            "blocks": self.blocks,
            "records": self.records,
            "fixed": list(self.fixed),
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
            "candidates": [
                {
                    "varied": candidate.varied,
                    **_settings_dict(candidate.settings),
                    "heldout_loglik": round(candidate.heldout_loglik, 6),
                }
                for candidate in self.candidates
            ],
        }


def _resolutions_text(resolutions: Sequence[int]) -> str:
    values = list(resolutions)
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 1:
        return f"{values[0]}-{values[-1]}"
    return ",".join(str(value) for value in values)


def _settings_dict(settings: PriorSettings) -> dict[str, Any]:
    values = asdict(settings)
    values["resolutions"] = list(settings.resolutions)
    return values


_SHORT_NAMES = {
    "resolutions": "resolutions",
    "pseudo_count_growth": "pseudo-count growth",
    "neighbour_weight": "neighbour ring weight",
    "pseudo_count": "pseudo-count",
    "kernel_days": "season kernel (days)",
    "season_pseudo_count": "season pseudo-count",
    "season_resolution": "local seasons",
    "local_season_pseudo_count": "local season pseudo-count",
    "floor": "floor",
}


def _value_text(name: str, value: Any) -> str:
    if name == "resolutions":
        return _resolutions_text(value)
    if name == "pseudo_count_growth":
        return f"x{value:g}"
    if name == "season_resolution":
        return "none" if value is None else f"r{value}"
    return f"{value:g}"


def _wrapped(first: str, items: list[str], width: int) -> list[str]:
    """``items`` after ``first``, separated by commas, on lines of at most ``width`` characters."""
    (lines, line) = ([], first)
    for index, item in enumerate(items):
        text = item + ("," if index < len(items) - 1 else "")
        if len(line) + len(text) + 1 > width and line.strip() != first.strip():
            lines.append(line.rstrip())
            line = " " * 4
        line += ("" if line.endswith((" ", ": ")) else " ") + text
    return [*lines, line]


def describe_settings(settings: PriorSettings) -> str:
    """The settings in words, on one line."""
    local = (
        "one season per species everywhere"
        if settings.season_resolution is None
        else f"local seasons on H3 resolution {settings.season_resolution} cells (pseudo-count "
        f"{settings.local_season_pseudo_count:g})"
    )
    return (
        f"resolutions {_resolutions_text(settings.resolutions)}, pseudo-count {settings.pseudo_count:g} "
        f"(x{settings.pseudo_count_growth:g} per finer level), neighbour ring weight {settings.neighbour_weight:g}, "
        f"season kernel {settings.kernel_days:g} days (pseudo-count {settings.season_pseudo_count:g}), {local}, "
        f"floor {settings.floor:g}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Folds
# ---------------------------------------------------------------------------------------------------------------------


def spatial_folds(block_cells: npt.NDArray[np.uint64], folds: int, seed: int = 0) -> tuple[npt.NDArray[np.int64], int]:
    """The fold of each record (``0 .. folds - 1``) from its block, whole blocks to a fold, and the number of
    blocks. Blocks are dealt to the folds in a seeded random order, so each fold gets blocks from everywhere."""
    (blocks, block_of_record) = np.unique(np.asarray(block_cells, dtype=np.uint64), return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(blocks))
    fold_of_block = np.empty(len(blocks), dtype=np.int64)
    fold_of_block[order] = np.arange(len(blocks)) % folds
    return (fold_of_block[block_of_record.reshape(-1)], len(blocks))


# ---------------------------------------------------------------------------------------------------------------------
# Held-out scores
# ---------------------------------------------------------------------------------------------------------------------


class _SparseRows(NamedTuple):
    """Which columns each row holds: row i's are ``columns[indptr[i]:indptr[i + 1]]``. A CSR matrix without its
    values: the values (each fold's counts, say) are arrays of their own in this layout."""

    indptr: npt.NDArray[np.int64]
    columns: npt.NDArray[np.int64]

    @classmethod
    def of(cls, matrix: Any) -> _SparseRows:
        """The layout of a scipy CSR matrix (its indices as int64, as the expansions index with them)."""
        return cls(matrix.indptr.astype(np.int64), matrix.indices.astype(np.int64))


@dataclass
class _Level:
    """One resolution: the counts of all records per (cell, species) as sparse rows, each fold's training share of
    them (all minus the fold's), and each record's training counts of its own cell."""

    cells: _SparseRows  # each cell's species
    training: list[npt.NDArray[np.float64]]  # per fold: the (cell, species) counts without the fold's records
    row: npt.NDArray[np.int64]  # each scored record's cell
    own: npt.NDArray[np.float64]  # each scored record's species' training count in its cell (its fold left out)
    total: npt.NDArray[np.float64]  # all species' training count in its cell
    # The same for the ring of cells around each record's cell (summed), when neighbours are searched
    ring: list[Any] | None = None  # per fold: the ring's training counts per (cell, species) as a CSR matrix
    ring_own: npt.NDArray[np.float64] | None = None
    ring_total: npt.NDArray[np.float64] | None = None


@dataclass
class _LocalSeasons:
    """Dated records per (season cell, species) pair, for local seasons at one resolution."""

    season_row: npt.NDArray[np.int64]  # each scored record's season cell
    seasons: int  # season cells holding records
    pair_keys: npt.NDArray[np.int64]  # season cell * classes + species, sorted
    pair_of_record: npt.NDArray[np.int64]  # each scored record's pair (-1: undated)
    pair_days: npt.NDArray[np.int64]  # pair * DAY_BINS + day of the (pair, day) entries holding records
    training: list[npt.NDArray[np.float64]]  # per fold: the entries' training counts

    def training_days(self, fold: int) -> npt.NDArray[np.float64]:
        """``[pairs, DAY_BINS]`` the fold's training day counts of each pair."""
        dense = np.zeros(len(self.pair_keys) * DAY_BINS)
        dense[self.pair_days] = self.training[fold]
        return dense.reshape(len(self.pair_keys), DAY_BINS)


class HeldOutScorer:
    """Scores candidate settings by the held-out log-likelihood of ``records`` (see the module's docstring)."""

    def __init__(
        self,
        records: Records,
        num_classes: int,
        resolutions: Sequence[int],
        cells: npt.NDArray[np.uint64],
        folds: npt.NDArray[np.int64],
        num_folds: int,
        neighbours: bool = True,
        seed: int = 0,
    ) -> None:
        """``cells``: each record's H3 cell at a resolution at least as fine as ``resolutions``; ``neighbours``:
        whether candidates with a neighbour weight are to be scored."""
        self.num_classes = num_classes
        self.classes = records.classes.astype(np.int64)
        self.weights = records.weights.astype(np.float64)
        # Undated records are scored on their place alone: their "day" is an extra column of ones
        self.days = np.where(records.day_bins >= 0, records.day_bins, DAY_BINS).astype(np.int64)
        self.folds = folds
        self.num_folds = num_folds
        # Every record counts for training; at most MAX_SCORED of them are scored (a random share of each fold:
        # candidates are compared on the same records, so their differences stay precise)
        self.members = [np.flatnonzero(folds == fold) for fold in range(num_folds)]
        share = min(1.0, MAX_SCORED / max(len(folds), 1))
        rng = np.random.default_rng(seed)
        self.held = [np.sort(rng.choice(m, size=round(len(m) * share), replace=False)) for m in self.members]
        self.scored = np.concatenate(self.held)
        # Per-record results are kept for the scored records only, fold after fold: fold f's are at slots[f]
        ends = np.cumsum([len(held) for held in self.held])
        self.slots = [slice(int(end - len(held)), int(end)) for (end, held) in zip(ends, self.held, strict=True)]
        self._season_cache: dict[tuple[float, float], tuple[npt.NDArray[np.float64], dict[str, Any]]] = {}

        all_day_counts = self._day_counts(np.ones(len(records), dtype=bool))
        global_all = np.bincount(self.classes, weights=self.weights, minlength=num_classes)
        self.train_day_counts = []
        self.train_global = []
        for fold in range(num_folds):
            mine = folds == fold
            self.train_day_counts.append(all_day_counts - self._day_counts(mine))
            self.train_global.append(
                global_all - np.bincount(self.classes[mine], weights=self.weights[mine], minlength=num_classes)
            )
        self.neighbours = neighbours
        self.cells = cells
        self.levels = {resolution: self._level(parent_cells(cells, resolution)) for resolution in resolutions}
        self._local_cache: dict[int, _LocalSeasons | None] = {}
        self._correction_cache: dict[tuple[float, float, int, float], dict[str, Any]] = {}
        self._ring_structures: dict[tuple[int, int, int], Any] = {}
        self._weighted = _WeightedCounts()
        self._smoothed_key: tuple[int, float] | None = None
        self._smoothed: dict[int, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = {}
        self._combos: dict[tuple[int, int], tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = {}

    def _day_counts(self, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        dated = mask & (self.days < DAY_BINS)
        counts = np.zeros((self.num_classes, DAY_BINS), dtype=np.float64)
        np.add.at(counts, (self.classes[dated], self.days[dated]), self.weights[dated])
        return counts

    def _level(self, cells: npt.NDArray[np.uint64]) -> _Level:
        (distinct, row) = np.unique(cells, return_inverse=True)
        row = row.reshape(-1).astype(np.int64)
        (pairs, pair_of_record) = np.unique(row * self.num_classes + self.classes, return_inverse=True)
        pair_of_record = pair_of_record.reshape(-1)
        cell_of_pair = pairs // self.num_classes
        indptr = np.searchsorted(cell_of_pair, np.arange(int(row.max()) + 2)).astype(np.int64)
        all_pairs = np.bincount(pair_of_record, weights=self.weights, minlength=len(pairs))
        (training, own, total) = ([], np.zeros(len(self.scored)), np.zeros(len(self.scored)))
        for fold in range(self.num_folds):
            (members, held, slot) = (self.members[fold], self.held[fold], self.slots[fold])
            counts = all_pairs - np.bincount(
                pair_of_record[members], weights=self.weights[members], minlength=len(pairs)
            )
            training.append(counts)
            own[slot] = counts[pair_of_record[held]]
            total[slot] = np.add.reduceat(counts, indptr[:-1])[row[held]]
        level = _Level(_SparseRows(indptr, pairs % self.num_classes), training, row[self.scored], own, total)
        if self.neighbours:
            self._ring(level, distinct)
        return level

    def _ring(self, level: _Level, distinct: npt.NDArray[np.uint64]) -> None:
        """The summed training counts of the ring of cells around each cell (those holding records)."""
        from scipy.sparse import csr_matrix

        (owner, neighbours) = neighbour_cells(distinct)
        positions = np.minimum(np.searchsorted(distinct, neighbours), len(distinct) - 1)
        held_cell = distinct[positions] == neighbours
        cells = len(distinct)
        adjacency = csr_matrix(
            (np.ones(int(held_cell.sum())), (owner[held_cell], positions[held_cell])), shape=(cells, cells)
        )
        (level.ring, level.ring_own, level.ring_total) = ([], np.zeros(len(level.row)), np.zeros(len(level.row)))
        for fold in range(self.num_folds):
            (held, slot) = (self.held[fold], self.slots[fold])
            counts = csr_matrix(
                (level.training[fold], level.cells.columns, level.cells.indptr), shape=(cells, self.num_classes)
            )
            ring = (adjacency @ counts).tocsr()
            ring.sort_indices()
            level.ring.append(ring)
            level.ring_own[slot] = np.asarray(ring[level.row[slot], self.classes[held]]).reshape(-1)
            level.ring_total[slot] = np.asarray(ring.sum(axis=1)).reshape(-1)[level.row[slot]]

    def _season(self, kernel_days: float, season_pseudo_count: float) -> tuple[npt.NDArray[np.float64], dict]:
        """For a season kernel: each record's seasonal factor of its own species, and the season-weighted
        training counts (``sum over species of count × factor`` on the record's day) of its cell at each level
        and of everywhere (the Laplace-smoothed global counts the estimate starts from)."""
        key = (kernel_days, season_pseudo_count)
        if key in self._season_cache:
            return self._season_cache[key]
        count = len(self.scored)
        own_factor = np.ones(count)
        weighted = {resolution: np.zeros(count) for resolution in self.levels}
        ring_weighted = {resolution: np.zeros(count) for resolution in self.levels}
        (global_weighted, base_own) = (np.zeros(count), np.zeros(count))
        for fold in range(self.num_folds):
            (held, slot) = (self.held[fold], self.slots[fold])
            factors = np.ones((self.num_classes, DAY_BINS + 1))
            factors[:, :DAY_BINS] = seasonal_factors(self.train_day_counts[fold], kernel_days, season_pseudo_count)
            days = self.days[held]
            own_factor[slot] = factors[self.classes[held], days]
            counts = self.train_global[fold]
            base = (counts + 1.0) / (counts.sum() + self.num_classes)
            global_weighted[slot] = (base @ factors)[days]
            base_own[slot] = base[self.classes[held]]
            for resolution, level in self.levels.items():
                weighted[resolution][slot] = self._weighted(
                    ("level", resolution, fold), level.cells, level.training[fold], level.row[slot], factors, days
                )
                if level.ring is not None:
                    ring = level.ring[fold]
                    ring_weighted[resolution][slot] = self._weighted(
                        ("ring", resolution, fold), _SparseRows.of(ring), ring.data, level.row[slot], factors, days
                    )
        result = (
            own_factor,
            {
                "levels": weighted,
                "rings": ring_weighted,
                "global": global_weighted,
                "base_own": base_own,
            },
        )
        self._season_cache[key] = result
        return result

    # -- local seasons -------------------------------------------------------------------------------------------------

    def _local(self, season_resolution: int) -> _LocalSeasons | None:
        """What local seasons at ``season_resolution`` need, whatever their kernel and pseudo-count; None when the
        (season cell, species) day counts would take more than :data:`_LOCAL_ELEMENTS` numbers."""
        if season_resolution in self._local_cache:
            return self._local_cache[season_resolution]
        (_, season_row) = np.unique(parent_cells(self.cells, season_resolution), return_inverse=True)
        season_row = season_row.reshape(-1).astype(np.int64)
        dated = self.days < DAY_BINS
        (pair_keys, pair_of_dated) = np.unique(
            season_row[dated] * self.num_classes + self.classes[dated], return_inverse=True
        )
        if len(pair_keys) * DAY_BINS > _LOCAL_ELEMENTS:
            self._local_cache[season_resolution] = None
            return None
        pair_of_record = np.full(len(self.classes), -1, dtype=np.int64)
        pair_of_record[dated] = pair_of_dated.reshape(-1)
        # (pair, day) counts, sparse: all records', and each fold's training share
        (pair_days, entry_of_dated) = np.unique(
            pair_of_dated.reshape(-1) * DAY_BINS + self.days[dated], return_inverse=True
        )
        entry_of_dated = entry_of_dated.reshape(-1)
        all_counts = np.bincount(entry_of_dated, weights=self.weights[dated], minlength=len(pair_days))
        training = []
        for fold in range(self.num_folds):
            mine = self.folds[dated] == fold
            fold_counts = np.bincount(entry_of_dated[mine], weights=self.weights[dated][mine], minlength=len(pair_days))
            training.append(all_counts - fold_counts)
        seasons = int(season_row.max()) + 1
        local = _LocalSeasons(
            season_row[self.scored], seasons, pair_keys, pair_of_record[self.scored], pair_days, training
        )
        self._local_cache[season_resolution] = local
        return local

    def _pair_rows(
        self, local: _LocalSeasons, cells: _SparseRows, level_row: npt.NDArray[np.int64]
    ) -> tuple[_SparseRows, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Sparse rows over the (season cell, species) pairs: one row per (level cell, season cell) combination
        of the scored records, holding the species of ``cells`` (each level cell's) that have dated records in
        that season cell.

        Returns the rows (their columns: the pairs), each element's position in the level's counts, and each
        scored record's row.
        """
        (indptr, classes) = cells
        seasons = local.seasons
        key = (id(local), id(level_row))
        if key not in self._combos:
            self._combos[key] = np.unique(level_row * seasons + local.season_row, return_inverse=True)
        (combos, combo_of_record) = self._combos[key]
        (owner, positions) = expand_rows(indptr, combos // seasons)
        keys = (combos % seasons)[owner] * self.num_classes + classes[positions]
        found = np.minimum(np.searchsorted(local.pair_keys, keys), len(local.pair_keys) - 1)
        keep = local.pair_keys[found] == keys
        (owner, positions, pairs) = (owner[keep], positions[keep], found[keep])
        combo_indptr = np.searchsorted(owner, np.arange(len(combos) + 1)).astype(np.int64)
        combo_rows = _SparseRows(combo_indptr, pairs.astype(np.int64))
        return (combo_rows, positions, combo_of_record.reshape(-1).astype(np.int64))

    def _smoothed_pairs(
        self, local: _LocalSeasons, season_resolution: int, kernel_days: float, fold: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """A fold's training day counts of each (season cell, species) pair, smoothed by the kernel and times the
        days of a year, and their totals (kept for the last season resolution and kernel: the candidates that
        vary the other settings reuse them)."""
        key = (season_resolution, kernel_days)
        if self._smoothed_key != key:
            (self._smoothed_key, self._smoothed) = (key, {})
        if fold not in self._smoothed:
            counts = local.training_days(fold)
            self._smoothed[fold] = (smooth_days(counts, kernel_days) * DAY_BINS, counts.sum(axis=1, keepdims=True))
        return self._smoothed[fold]

    def _corrections(
        self, kernel_days: float, season_pseudo_count: float, season_resolution: int, pseudo_count: float
    ) -> dict[str, Any] | None:
        """How local seasons change the seasonal factors: for each record, its own species' factor and the
        season-weighted counts of each level (and ring) are those everywhere plus these (None: too many pairs)."""
        key = (kernel_days, season_pseudo_count, season_resolution, pseudo_count)
        if key in self._correction_cache:
            return self._correction_cache[key]
        local = self._local(season_resolution)
        if local is None:
            return None
        count = len(self.scored)
        out: dict[str, Any] = {
            "own": np.zeros(count),
            "global": np.zeros(count),
            "levels": {resolution: np.zeros(count) for resolution in self.levels},
            "rings": {resolution: np.zeros(count) for resolution in self.levels},
        }
        species_of_pair = local.pair_keys % self.num_classes
        season_of_pair = local.pair_keys // self.num_classes
        # Each season cell's pairs (a row of the pairs themselves, in pair_keys' order)
        seasons_pairs = _SparseRows(
            np.searchsorted(season_of_pair, np.arange(local.seasons + 1)).astype(np.int64),
            np.arange(len(local.pair_keys)),
        )
        structures = {
            resolution: self._pair_rows(local, level.cells, level.row) for (resolution, level) in self.levels.items()
        }
        for fold in range(self.num_folds):
            (held, slot) = (self.held[fold], self.slots[fold])
            days = self.days[held]
            everywhere = seasonal_factors(self.train_day_counts[fold], kernel_days, season_pseudo_count)
            (smoothed, totals) = self._smoothed_pairs(local, season_resolution, kernel_days, fold)
            # factor there - factor everywhere, for each pair and day (0 on the undated column)
            difference = np.zeros((len(smoothed), DAY_BINS + 1))
            difference[:, :DAY_BINS] = (smoothed - totals * everywhere[species_of_pair]) / (totals + pseudo_count)
            own_pair = local.pair_of_record[slot]
            out["own"][slot] = np.where(own_pair >= 0, difference[np.maximum(own_pair, 0), days], 0.0)
            base = self.train_global[fold]
            base = (base + 1.0) / (base.sum() + self.num_classes)
            out["global"][slot] = self._weighted(
                ("local", season_resolution, fold),
                seasons_pairs,
                base[species_of_pair],
                local.season_row[slot],
                difference,
                days,
            )
            for resolution, level in self.levels.items():
                (pair_rows, positions, rows) = structures[resolution]
                out["levels"][resolution][slot] = self._weighted(
                    ("local level", season_resolution, resolution, fold),
                    pair_rows,
                    level.training[fold][positions],
                    rows[slot],
                    difference,
                    days,
                )
                if level.ring is not None:
                    ring = level.ring[fold]
                    ring_key = (season_resolution, resolution, fold)
                    if ring_key not in self._ring_structures:
                        self._ring_structures[ring_key] = self._pair_rows(local, _SparseRows.of(ring), level.row)
                    (pair_rows, positions, rows) = self._ring_structures[ring_key]
                    out["rings"][resolution][slot] = self._weighted(
                        ("local ring", season_resolution, resolution, fold),
                        pair_rows,
                        ring.data[positions],
                        rows[slot],
                        difference,
                        days,
                    )
        self._correction_cache[key] = out
        return out

    def score(self, settings: PriorSettings) -> float:
        """The mean held-out log-likelihood of the scored records under ``settings``: the recursion of
        :meth:`birder.geo.prior.LocationPrior.place_probabilities_many` on two numbers per record, the
        probability of its own species and the sum over all species, each times its seasonal factor."""
        (own_factor, weighted) = self._season(settings.kernel_days, settings.season_pseudo_count)
        denominator = weighted["global"]
        (levels, rings) = (dict(weighted["levels"]), dict(weighted["rings"]))
        if settings.season_resolution is not None:
            corrections = self._corrections(
                settings.kernel_days,
                settings.season_pseudo_count,
                settings.season_resolution,
                settings.local_season_pseudo_count,
            )
            if corrections is None:
                return float("-inf")  # not scored: too many (season cell, species) pairs
            own_factor = own_factor + corrections["own"]
            denominator = denominator + corrections["global"]
            for resolution in levels:
                levels[resolution] = levels[resolution] + corrections["levels"][resolution]
                rings[resolution] = rings[resolution] + corrections["rings"][resolution]
        numerator = weighted["base_own"] * own_factor
        beta = settings.neighbour_weight
        if beta > 0 and not self.neighbours:
            raise BirderError("this scorer was built without the neighbour counts")
        for depth, resolution in enumerate(settings.resolutions):
            alpha = settings.pseudo_count * settings.pseudo_count_growth**depth
            level = self.levels[resolution]
            (own, total, season_weighted) = (level.own, level.total, levels[resolution])
            if beta > 0:
                own = own + beta * level.ring_own
                total = total + beta * level.ring_total
                season_weighted = season_weighted + beta * rings[resolution]
            scale = total + alpha
            numerator = (own * own_factor + alpha * numerator) / scale
            denominator = (season_weighted + alpha * denominator) / scale
        probability = (1.0 - settings.floor) * numerator / denominator + settings.floor / self.num_classes
        return float(np.mean(np.log(probability)))


class _WeightedCounts:
    """``sum over c of counts[row, c] × factors[c, day]`` for each (row, day) of sparse rows, for factors that
    change from candidate to candidate while the rows do not.

    Coarse levels (few cells, many species each): one sparse-times-dense product for every cell and day. Fine ones
    (many cells, few species each): element by element; which elements and days a key's rows hold is kept from
    one candidate to the next (up to :data:`_CACHED_ELEMENTS` in all), so a candidate costs one gather and one
    sum.
    """

    def __init__(self) -> None:
        self._expansions: dict[tuple, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray]] = {}
        self._cached = 0

    def __call__(
        self,
        key: tuple,
        layout: _SparseRows,
        counts: npt.NDArray[np.float64],
        rows: npt.NDArray[np.int64],
        factors: npt.NDArray[np.float64],
        days: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.float64]:
        """``counts`` are laid out as ``layout``; its columns index the rows of ``factors``."""
        (indptr, classes) = layout
        columns = factors.shape[1]
        cells = len(indptr) - 1
        if key in self._expansions:
            (owner, flat, values) = self._expansions[key]
            return np.bincount(owner, weights=values * factors.ravel()[flat], minlength=len(rows))
        lengths = indptr[rows + 1] - indptr[rows]
        elements = int(lengths.sum())
        if cells * columns <= _CHUNK_ELEMENTS and len(counts) * columns < 20 * elements:
            from scipy.sparse import csr_matrix

            matrix = csr_matrix((counts, classes, indptr), shape=(cells, len(factors)))
            return np.asarray(matrix @ factors)[rows, days]
        if self._cached + elements <= _CACHED_ELEMENTS:
            (owner, positions) = expand_rows(indptr, rows)
            flat = classes[positions] * columns + days[owner]
            index_type = np.int32 if factors.size < 2**31 else np.int64
            self._expansions[key] = (owner.astype(np.int32), flat.astype(index_type), counts[positions])
            self._cached += elements
            return self(key, layout, counts, rows, factors, days)

        out = np.zeros(len(rows))
        ends = np.cumsum(lengths)
        start = 0
        while start < len(rows):
            # As many rows as fit in the chunk (at least one)
            base = ends[start - 1] if start else 0
            stop = min(len(rows), max(start + 1, int(np.searchsorted(ends, base + _CHUNK_ELEMENTS, side="right"))))
            (owner, positions) = expand_rows(indptr, rows[start:stop])
            values = counts[positions] * factors[classes[positions], days[start:stop][owner]]
            out[start:stop] = np.bincount(owner, weights=values, minlength=stop - start)
            start = stop
        return out


# ---------------------------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------------------------

# The steps of a round: the settings each varies (resolutions with the pseudo-count's growth: with one level the
# growth means nothing, with several it decides whether finer levels help, so they are tried together)
_STEPS = (
    ("resolutions", "pseudo_count_growth"),
    ("neighbour_weight",),
    ("pseudo_count",),
    ("kernel_days",),
    ("season_pseudo_count",),
    ("season_resolution",),
    ("local_season_pseudo_count",),
    ("floor",),
)
SETTING_NAMES = tuple(name for step in _STEPS for name in step)


def choose_settings(
    records: Records,
    num_classes: int,
    *,
    fixed: dict[str, Any] | None = None,
    space: SearchSpace | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> SettingsChoice:
    """The prior's settings for ``records`` by held-out log-likelihood over spatial blocks (see the module's
    docstring). ``fixed``: settings the user gave (names of :class:`PriorSettings`), kept as they are."""
    started = time.perf_counter()
    fixed = dict(fixed or {})
    space = space or SearchSpace()
    if folds < 2:
        raise BirderError(f"the settings search needs at least 2 folds, got {folds}")
    unknown = set(fixed) - set(SETTING_NAMES)
    if unknown:
        raise BirderError(f"cannot fix unknown prior settings: {', '.join(sorted(unknown))}")

    candidates_of: dict[str, list[Any]] = {
        "resolutions": [resolutions_to(finest) for finest in sorted(set(space.finest_resolutions))],
        "pseudo_count_growth": sorted(set(space.pseudo_count_growths)),
        "neighbour_weight": sorted(set(space.neighbour_weights)),
        "pseudo_count": sorted(set(space.pseudo_counts)),
        "kernel_days": sorted(set(space.kernel_days)),
        "season_pseudo_count": sorted(set(space.season_pseudo_counts)),
        "floor": sorted(set(space.floors)),
        # None first: one season everywhere unless local seasons score better
        "season_resolution": [None, *sorted({value for value in space.season_resolutions if value is not None})],
        "local_season_pseudo_count": sorted(set(space.local_season_pseudo_counts)),
    }
    for name, value in fixed.items():
        candidates_of[name] = [getattr(PriorSettings(**{name: value}), name)]
    if "resolutions" in fixed and fixed.get("season_resolution") is None:  # local seasons must fit the levels
        finest_fixed = max(candidates_of["resolutions"][0])
        candidates_of["season_resolution"] = [v for v in candidates_of["season_resolution"] if (v or 0) <= finest_fixed]
    defaults = PriorSettings(**{**_settings_dict(PriorSettings()), **fixed})
    choice = SettingsChoice(defaults, folds=folds, records=len(records), fixed=tuple(sorted(fixed)))
    if len(records) < MIN_RECORDS:
        choice.skipped = f"{len(records):,} records, fewer than {MIN_RECORDS}"
        return choice

    finest = max(max(values) for values in candidates_of["resolutions"])
    choice.block_resolution = max(BLOCK_RESOLUTION, finest + 1)
    # Every candidate locates places at the blocks' resolution, as the scores do (see PriorSettings.base_resolution)
    start = PriorSettings(
        **{name: _nearest(PriorSettings(), name, values) for (name, values) in candidates_of.items()},
        base_resolution=choice.block_resolution,
    )
    blocks = cells_of_points(records.latitudes, records.longitudes, choice.block_resolution)
    (fold_of_record, choice.blocks) = spatial_folds(blocks, folds, seed)
    if choice.blocks < folds * MIN_BLOCKS_PER_FOLD:
        choice.skipped = f"records at {choice.blocks:,} places only, fewer than {folds * MIN_BLOCKS_PER_FOLD}"
        return choice

    all_resolutions = sorted({r for values in candidates_of["resolutions"] for r in values})
    with_neighbours = any(weight > 0 for weight in candidates_of["neighbour_weight"])
    scorer = HeldOutScorer(
        records, num_classes, all_resolutions, blocks, fold_of_record, folds, with_neighbours, seed=seed
    )
    scores: dict[PriorSettings, float] = {}

    def score(settings: PriorSettings, varied: str, round_number: int) -> float:
        if settings not in scores:
            scores[settings] = scorer.score(settings)
            choice.candidates.append(Candidate(settings, scores[settings], varied, round_number))
        return scores[settings]

    current = _canonical(start)
    score(current, "start", 0)
    for round_number in range(1, MAX_ROUNDS + 1):
        before = current
        for step in _STEPS:
            if all(len(candidates_of[name]) == 1 for name in step):
                continue
            if step == ("local_season_pseudo_count",) and current.season_resolution is None:
                continue  # no local seasons: nothing to shrink
            options = _options(current, step, candidates_of)
            before_step = len(choice.candidates)
            values = [score(option, "+".join(step), round_number) for option in options]
            # Near-ties go to the first option: the coarser, smoother or more shrunk one
            picked = int(np.flatnonzero(np.array(values) >= max(values) - TIE)[0])
            choice.steps.append(Step(round_number, step, options, values, picked, len(choice.candidates) - before_step))
            current = options[picked]
        if current == before or scores[current] - scores[before] < CONVERGED:
            break
    choice.settings = current
    choice.seconds = time.perf_counter() - started
    return choice


def _options(current: PriorSettings, step: Sequence[str], candidates_of: dict[str, list[Any]]) -> list[PriorSettings]:
    """``current`` with each combination of the step's candidate values that makes valid settings, each model
    once."""
    options: list[PriorSettings] = []
    for values in itertools.product(*(candidates_of[name] for name in step)):
        try:
            option = _canonical(replace(current, **dict(zip(step, values, strict=True))))
        except BirderError:
            continue  # e.g. a season resolution finer than the cells
        if option not in options:
            options.append(option)
    return options


def _canonical(settings: PriorSettings) -> PriorSettings:
    """One form for settings that make the same prior: no growth with one level, no local pseudo-count without
    local seasons."""
    defaults = PriorSettings()
    if len(settings.resolutions) == 1 and settings.pseudo_count_growth != defaults.pseudo_count_growth:
        settings = replace(settings, pseudo_count_growth=defaults.pseudo_count_growth)
    if settings.season_resolution is None and settings.local_season_pseudo_count != defaults.local_season_pseudo_count:
        settings = replace(settings, local_season_pseudo_count=defaults.local_season_pseudo_count)
    return settings


def _nearest(defaults: PriorSettings, name: str, values: list[Any]) -> Any:
    """The candidate value closest to the default (the search's starting point)."""
    default = getattr(defaults, name)
    if name == "season_resolution":
        return default if default in values else values[0]
    if name == "resolutions":
        return min(values, key=lambda value: (abs(max(value) - max(default)), max(value)))
    return min(values, key=lambda value: abs(np.log((value + 1e-9) / (default + 1e-9))))

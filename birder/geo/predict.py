"""The geo steps of a ``birder-predict`` run: the prior of each photo, its columns, and the events at the end.

- :class:`PhotoPrior` (``--prior``): per batch, each photo's place and date (:mod:`birder.geo.places`), its prior
  vector over the run's classes (rows of ones where there is none: the image's answer stands) for step 4 of the
  decision order (:func:`birder.inference.decision.apply_prior`), and the columns it adds to the results table:
  ``prior`` (the mode: ``place_day``, ``place`` or ``none``), ``out_of_range`` and the image-only top-k
  (``image_top1_class``, ``image_top1_prob``, ...) beside the adjusted one in ``top1_class`` ...
- :func:`write_events` (``--events``): after the tables are merged, groups the photos into events, combines each
  event's image probabilities (from the probabilities table, which ``--events`` keeps), applies the prior once per
  event, writes the events table and fills the ``event_id`` column of the results table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError, one_line
from birder.geo.box_events import write_box_events
from birder.geo.camtrap import CamtrapOptions
from birder.geo.events import (
    DEFAULT_GAP,
    Event,
    EventsReport,
    combine_probabilities,
    group_events,
    parse_exif_time,
    parse_gap,
)
from birder.geo.places import PlaceResolver
from birder.geo.prior import MODE_NONE, LocationPrior, out_of_range
from birder.geo.prior_file import load_prior_for
from birder.geo.results import EVENTS_TABLE, fill_event_ids, find_table, photo_folder, read_rows, write_rows
from birder.inference.decision import apply_prior, check_prior_strength
from birder.inference.tables import shown_top_k
from birder.io.download import sha256_file
from birder.io.table_files import Column, TableSpec

EVENT_ID_COLUMN = "event_id"
PRIOR_MODE_COLUMN = "prior"
OUT_OF_RANGE_COLUMN = "out_of_range"

# Labels from adjusted probabilities [B, classes] (the run's decision steps 5-8)
Decide = Callable[[npt.NDArray[np.float64]], list[str]]


def _top_k(probabilities: npt.NDArray[np.floating], k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.floating]]:
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return (order, np.take_along_axis(probabilities, order, axis=1))


def _flag(value: bool | None) -> str:
    return "" if value is None else ("true" if value else "false")


@dataclass
class PriorRows:
    """The prior of a batch: ``[B, classes]`` vectors (ones where there is none), modes, out_of_range flags."""

    matrix: npt.NDArray[np.float64]
    modes: list[str]
    out_of_range: list[bool | None]


@dataclass(frozen=True)
class GeoOptions:
    """Where and when: the geo group of a prediction run's options (``birder-predict``'s arguments of the same
    names). ``prior`` is a .bpr file (``birder-prior build``); the place and date given here hold for every photo
    (over EXIF), ``locations`` gives them per photo (over all)."""

    prior: str | os.PathLike | None = None
    prior_strength: float = 1.0  # posterior ∝ p(species | photo) × prior ** strength; 0: flags only
    lat: float | None = None
    lon: float | None = None
    date: str | None = None
    locations: str | os.PathLike | None = None  # CSV of path, latitude, longitude, date per photo
    events: bool = False  # group photos into events by folder and time gap
    event_gap: str = DEFAULT_GAP
    exports: Sequence[str] = ()  # camtrap-dp, coco-ct
    camtrap: CamtrapOptions = field(default_factory=CamtrapOptions)  # what the Camtrap DP export records


class PhotoPrior:
    """``--prior`` in a prediction run (see the module's docstring)."""

    def __init__(
        self,
        prior: LocationPrior,
        strength: float,
        resolver: PlaceResolver,
        class_indices: npt.NDArray[np.int64] | None,
        top_k: int,
        source: str = "",
    ) -> None:
        self.prior = prior
        self.strength = check_prior_strength(strength, "--prior-strength")
        self.resolver = resolver
        self.class_indices = class_indices  # the run's classes among the model's (--species), None: all
        # As many image-only columns as the results' top-k has: never more than the run's classes
        self.top_k = shown_top_k(top_k, prior.num_classes if class_indices is None else len(class_indices))
        self.source = source

    @classmethod
    def from_options(
        cls,
        options: GeoOptions,
        model_class_names: Sequence[str],
        class_indices: npt.NDArray[np.int64] | None,
        top_k: int,
    ) -> PhotoPrior | None:
        """The prior step of a run's options (``prior``, ``prior_strength``, ``lat``, ``lon``, ``date``,
        ``locations``); None without ``--prior``."""
        if options.prior is None:
            return None
        prior = load_prior_for(options.prior, list(model_class_names))
        resolver = PlaceResolver.from_options(options.lat, options.lon, options.date, options.locations)
        return cls(prior, float(options.prior_strength), resolver, class_indices, top_k, str(options.prior))

    def settings(self) -> dict[str, Any]:
        """What shapes the rows (a resumed run must match it)."""
        resolver = self.resolver
        return {
            "prior_sha256": sha256_file(self.source) if self.source else self.prior.classes_sha256,
            "prior_strength": self.strength,
            "prior_place": [resolver.latitude, resolver.longitude, resolver.date, bool(resolver.per_photo)],
        }

    def columns(self) -> tuple[Column, ...]:
        columns = [Column(PRIOR_MODE_COLUMN), Column(OUT_OF_RANGE_COLUMN)]
        for rank in range(1, self.top_k + 1):
            columns += [Column(f"image_top{rank}_class"), Column(f"image_top{rank}_prob", "float32", ".6f")]
        return tuple(columns)

    def vector(self, location: tuple[float, float] | None, date: Any) -> tuple[npt.NDArray[np.float64] | None, str]:
        """The prior over the run's classes (renormalised over a --species selection) and its mode."""
        answer = self.prior.lookup(location, date)
        if answer.vector is None:
            return (None, MODE_NONE)
        vector = answer.vector.astype(np.float64)
        if self.class_indices is not None:
            vector = vector[self.class_indices]
            vector /= vector.sum()
        return (vector, answer.mode)

    def rows(self, places: Sequence[tuple[Any, Any]], probabilities: npt.NDArray[np.floating]) -> PriorRows:
        """The prior of each photo of a batch from its resolved (location, date)."""
        matrix = np.ones(probabilities.shape, dtype=np.float64)
        (modes, flags) = ([], [])
        for row, (location, date) in enumerate(places):
            (vector, mode) = self.vector(location, date)
            modes.append(mode)
            flags.append(out_of_range(probabilities[row], vector))
            if vector is not None:
                matrix[row] = vector
        return PriorRows(matrix, modes, flags)

    def places(self, paths: Sequence[str], metadata: Sequence[Sequence[Any]]) -> list[tuple[Any, Any]]:
        """Each photo's (location, date): ``metadata`` rows are (EXIF time, GPS latitude, GPS longitude)."""
        return [self.resolver.resolve(path, *meta[:3]) for (path, meta) in zip(paths, metadata, strict=True)]

    def adjust(self, probabilities: npt.NDArray[np.floating], rows: PriorRows) -> npt.NDArray[np.float64]:
        """Step 4 of the decision order on a batch."""
        return apply_prior(probabilities, rows.matrix, self.strength)

    def values(
        self, rows: PriorRows, probabilities: npt.NDArray[np.floating], class_names: Sequence[str]
    ) -> list[list[Any]]:
        """The added cells of each photo: mode, out_of_range, then the image-only top-k."""
        (indices, values) = _top_k(probabilities, self.top_k)
        cells = []
        for row in range(len(probabilities)):
            top = [
                item
                for (i, p) in zip(indices[row], values[row], strict=True)
                for item in (class_names[int(i)], float(p))
            ]
            cells.append([rows.modes[row], _flag(rows.out_of_range[row]), *top])
        return cells


# ---------------------------------------------------------------------------------------------------------------------
# Events (after the run's tables are merged)
# ---------------------------------------------------------------------------------------------------------------------


def event_columns(top_k: int, with_prior: bool) -> list[str]:
    columns = ["event_id", "camera", "start", "end", "photos", "timed", "prediction"]
    for rank in range(1, top_k + 1):
        columns += [f"top{rank}_class", f"top{rank}_prob"]
    if with_prior:
        columns += [PRIOR_MODE_COLUMN, OUT_OF_RANGE_COLUMN]
        for rank in range(1, top_k + 1):
            columns += [f"image_top{rank}_class", f"image_top{rank}_prob"]
    return columns


def _photo_probabilities(output_dir: Path, table_format: str) -> tuple[list[str], dict[str, npt.NDArray[np.float64]]]:
    path = find_table(output_dir, "probabilities", table_format)
    if path is None:
        raise BirderError(f"--events needs the probabilities table in '{output_dir}' (it is written with --events)")
    (header, rows) = read_rows(path)
    names = header[1:]
    return (names, {row["path"]: np.array([float(row[name]) for name in names]) for row in rows})


def _event_place(
    event: Event, photos: list[dict[str, str]], photo_prior: PhotoPrior
) -> tuple[tuple[float, float] | None, Any]:
    """The event's (location, date): the first of its photos (in time order) that has each."""
    places = photo_prior.places(
        [photos[i]["path"] for i in event.members],
        [
            (photos[i].get("exif_datetime") or None, photos[i].get("gps_latitude"), photos[i].get("gps_longitude"))
            for i in event.members
        ],
    )
    location = next((place[0] for place in places if place[0] is not None), None)
    date = next((place[1] for place in places if place[1] is not None), None)
    return (location, date)


def write_events(
    output_dir: Path,
    table_format: str,
    results_spec: TableSpec,
    gap: str | dt.timedelta,
    top_k: int,
    decide: Decide,
    photo_prior: PhotoPrior | None = None,
) -> EventsReport:
    """Group the run's photos into events, write the events table and fill the results' ``event_id`` column."""
    results_path = find_table(output_dir, "results", table_format)
    if results_path is None:
        raise BirderError(f"no results table in '{output_dir}'")
    (_, photos) = read_rows(results_path)
    (class_names, probabilities) = _photo_probabilities(output_dir, table_format)
    times = [parse_exif_time(photo.get("exif_datetime")) for photo in photos]
    events = group_events([photo_folder(photo["path"]) for photo in photos], times, parse_gap(gap))

    top_k = min(top_k, len(class_names))
    combined = np.array([combine_probabilities([probabilities[photos[i]["path"]] for i in e.members]) for e in events])
    combined = combined.reshape(len(events), len(class_names))
    adjusted = combined
    cells: list[list[Any]] = [[] for _ in events]
    if photo_prior is not None:
        rows = photo_prior.rows([_event_place(e, photos, photo_prior) for e in events], combined)
        adjusted = photo_prior.adjust(combined, rows)
        cells = photo_prior.values(rows, combined, class_names)
    labels = decide(adjusted) if len(events) else []
    table = _event_rows(events, labels, adjusted, cells, class_names, top_k)

    path = output_dir / f"{EVENTS_TABLE}.{table_format}"
    numeric = [name for name in event_columns(top_k, photo_prior is not None) if name.endswith("_prob")]
    write_rows(path, event_columns(top_k, photo_prior is not None), table, numeric=numeric)
    fill_event_ids(results_path, results_spec, {photos[i]["path"]: e.event_id for e in events for i in e.members})
    return EventsReport(path, len(events), sum(not e.timed for e in events))


def _event_rows(
    events: list[Event],
    labels: list[str],
    adjusted: npt.NDArray[np.floating],
    cells: list[list[Any]],
    class_names: Sequence[str],
    top_k: int,
) -> list[list[str]]:
    """The events table's rows, as text (see :func:`event_columns`)."""
    (indices, values) = _top_k(adjusted, top_k)
    table = []
    for number, event in enumerate(events):
        top = [
            cell
            for (i, p) in zip(indices[number], values[number], strict=True)
            for cell in (class_names[int(i)], f"{p:.6f}")
        ]
        head = [event.event_id, event.folder, _iso(event.start), _iso(event.end), str(len(event.members))]
        extra = [c if isinstance(c, str) else f"{c:.6f}" for c in cells[number]]
        table.append([*head, _flag(event.timed), labels[number], *top, *extra])
    return table


def _iso(moment: dt.datetime | None) -> str:
    return moment.isoformat() if moment is not None else ""


# ---------------------------------------------------------------------------------------------------------------------
# Everything geo in one run
# ---------------------------------------------------------------------------------------------------------------------

GEO_PLACE_OPTIONS = ("lat", "lon", "date", "locations")
_SHOWN_PATHS = 3  # the unmatched rows of a locations file a warning names


def check_geo_options(options: GeoOptions) -> None:
    """Refuse, in one line and before any photo is classified, geo options that cannot work."""
    from birder.geo.export import check_export

    place = {"lat": options.lat, "lon": options.lon, "date": options.date, "locations": options.locations}
    given = [name for name in GEO_PLACE_OPTIONS if place[name] is not None]
    if given and options.prior is None:
        raise BirderError(f"--{given[0]} says where or when photos were taken for the prior: it needs --prior FILE")
    check_prior_strength(options.prior_strength, "--prior-strength")
    if options.events:
        parse_gap(options.event_gap)
    if options.exports:
        check_export(options.exports, options.camtrap)


@dataclass
class GeoStep:
    """The prior, events and exports of a prediction run (each optional)."""

    photo_prior: PhotoPrior | None
    events: bool = False
    event_gap: str = DEFAULT_GAP
    exports: Sequence[str] = ()
    camtrap: CamtrapOptions = field(default_factory=CamtrapOptions)
    # A crop-then-classify run's (a row per box): events are counted from the boxes (birder.geo.box_events)
    per_box: bool = False

    @classmethod
    def from_options(
        cls, options: GeoOptions, model_class_names: Sequence[str], class_indices: Any, top_k: int
    ) -> GeoStep | None:
        """None when the run asks for nothing of this (its tables stay exactly as without this module)."""
        photo_prior = PhotoPrior.from_options(options, model_class_names, class_indices, top_k)
        if photo_prior is None and not options.events and not options.exports:
            return None
        return cls(photo_prior, options.events, options.event_gap, list(options.exports), options.camtrap)

    def unmatched_locations(self, paths: Sequence[str]) -> str | None:
        """A warning when rows of the ``--locations`` file match none of the run's photos (a file may cover more
        photos than one run; a typo in a path would otherwise silently leave its photo without a place)."""
        if self.photo_prior is None:
            return None
        resolver = self.photo_prior.resolver
        unmatched = resolver.unmatched(paths)
        if not unmatched:
            return None
        shown = one_line(", ".join(unmatched[:_SHOWN_PATHS]), None) + (" ..." if len(unmatched) > _SHOWN_PATHS else "")
        return (
            f"{len(unmatched)} of the {len(resolver.per_photo)} photos in {resolver.source} are none of the "
            f"{len(paths)} photos of this run (not used): {shown}"
        )

    def result_columns(self) -> tuple[Column, ...]:
        columns = self.photo_prior.columns() if self.photo_prior is not None else ()
        return (*columns, Column(EVENT_ID_COLUMN)) if self.events else columns

    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = self.photo_prior.settings() if self.photo_prior is not None else {}
        if self.events:
            settings["event_gap"] = self.event_gap
        return settings

    def batch(
        self,
        paths: Sequence[str],
        metadata: Sequence[Sequence[Any]],
        probabilities: npt.NDArray[np.floating],
        class_names: Sequence[str],
    ) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.float64] | None, list[list[Any]]]:
        """``(adjusted probabilities, prior matrix or None, extra cells per photo)`` of a batch."""
        (adjusted, matrix) = (probabilities, None)
        cells: list[list[Any]] = [[] for _ in paths]
        if self.photo_prior is not None:
            rows = self.photo_prior.rows(self.photo_prior.places(paths, metadata), probabilities)
            (adjusted, matrix) = (self.photo_prior.adjust(probabilities, rows), rows.matrix)
            cells = self.photo_prior.values(rows, probabilities, class_names)
        if self.events:
            cells = [[*row, ""] for row in cells]  # the event is known once every photo is: filled at the end
        return (adjusted, matrix, cells)

    def finish(
        self, output_dir: Path, table_format: str, results_spec: TableSpec, top_k: int, decide: Decide
    ) -> list[str]:
        """(rank 0, after the tables are merged) Events, then exports; returns the lines to print."""
        from birder.geo.export import export_results

        lines = []
        if self.events:
            if self.per_box:
                report = write_box_events(output_dir, table_format, results_spec, self.event_gap)
            else:
                report = write_events(
                    output_dir, table_format, results_spec, self.event_gap, top_k, decide, self.photo_prior
                )
            untimed = f", {report.untimed} of them photos without an EXIF time" if report.untimed else ""
            lines.append(f"Events: {report.events}{untimed}")
            lines.append(f"  {'events':<13} {report.path}")
        for export in export_results(output_dir, self.exports, self.camtrap) if self.exports else ():
            lines += export.lines
            lines.append(f"  {'export':<13} {export.path}")
        return lines


# ---------------------------------------------------------------------------------------------------------------------
# Command-line options (birder-predict; birder-serve takes the prior's two)
# ---------------------------------------------------------------------------------------------------------------------


def _prior_strength(text: str) -> float:
    try:
        return check_prior_strength(float(text))
    except (ValueError, BirderError):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got '{text}'") from None


def add_prior_arguments(parser: argparse.ArgumentParser, *, places: bool = True) -> argparse._ArgumentGroup:
    """``--prior FILE`` and ``--prior-strength`` (and, with ``places``, where and when the photos were taken)."""
    group = parser.add_argument_group("location-and-season prior")
    group.add_argument(
        "--prior", type=Path, metavar="FILE", help="a prior file (birder-prior build): p(species | place, day)"
    )
    group.add_argument(
        "--prior-strength",
        type=_prior_strength,
        default=1.0,
        metavar="L",
        help="posterior ∝ image × prior^L (default: 1; 0: answer unchanged, out_of_range still flagged)",
    )
    if places:
        group.add_argument("--lat", type=float, metavar="DEG", help="latitude of every photo (over EXIF GPS)")
        group.add_argument("--lon", type=float, metavar="DEG", help="longitude of every photo (over EXIF GPS)")
        group.add_argument("--date", metavar="YYYY-MM-DD", help="date of every photo (over the EXIF date)")
        group.add_argument(
            "--locations", type=Path, metavar="CSV", help="per photo: path, latitude, longitude, date (over all else)"
        )
    return group


def add_geo_arguments(parser: argparse.ArgumentParser, extra_exports: Sequence[tuple[str, str]] = ()) -> None:
    """Everything of this module on ``birder-predict``'s command line: prior, events, exports (and the command's
    own ``extra_exports``, ``(name, what it is)``)."""
    from birder.geo.export import add_export_arguments

    add_prior_arguments(parser)
    group = parser.add_argument_group("events")
    group.add_argument("--events", action="store_true", help="group photos into events by folder and EXIF time gap")
    group.add_argument(
        "--event-gap", default=DEFAULT_GAP, metavar="GAP", help=f"max time between photos of an event ({DEFAULT_GAP})"
    )
    add_export_arguments(parser, extra_formats=extra_exports)

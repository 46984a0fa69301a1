"""A ``birder-predict`` results folder as the event and export code reads it, and the events table on disk.

The results table (``results.csv`` or ``.parquet``) has one row per photo, or, for a crop-then-classify run
(``--detector``), one row per box (a photo without a box keeps one row, ``detections`` 0) beside a photos table of
each photo's size. The events table (``events.<format>``, written with ``--events``) has one row per event, or per
event and species for boxes. All are read as text cells by column name, whatever the format.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.io.atomic import atomic_write_path
from birder.io.table_files import TableSpec, open_text, read_csv_table, read_table_rows, write_table

RESULTS_TABLE = "results"
EVENTS_TABLE = "events"
PHOTOS_TABLE = "photos"
# The results table of a crop-then-classify run has these (birder.runs.detect's box columns)
BOX_MARKER_COLUMN = "det_class"
SOURCE_DETECTION = "detection"
# A photo without a box answered as a whole (--fallback-whole-image)
SOURCE_WHOLE_IMAGE = "whole-image"
# A box of a --boxes file that is no animal (a person, a vehicle): kept in the rows, never classified
SOURCE_PASSED = "passed"
RUN_INFO = "run.json"
TABLE_FORMATS = ("csv", "parquet")


def find_table(directory: Path, name: str, preferred: str | None = None) -> Path | None:
    """``<directory>/<name>.<format>``, the run's own format first when both exist."""
    formats = sorted(TABLE_FORMATS, key=lambda fmt: fmt != preferred)
    for fmt in formats:
        path = directory / f"{name}.{fmt}"
        if path.is_file():
            return path
    return None


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows (column -> text, empty for missing) of a CSV or Parquet table."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BirderError(f"reading {path} needs pyarrow: pip install 'birder[parquet]'") from None
        table = pq.read_table(path)
        rows = [{key: "" if value is None else str(value) for (key, value) in row.items()} for row in table.to_pylist()]
        return (table.schema.names, rows)

    (header, rows) = read_csv_table(path)
    return (header, [dict(zip(header, row, strict=True)) for row in rows])


def write_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[str] = ()) -> int:
    """Write text rows to a CSV or Parquet table (by suffix) atomically; ``numeric`` columns are float64 in
    Parquet. Returns the number of rows."""
    rows = [list(row) for row in rows]
    with atomic_write_path(path) as tmp:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            columns = {}
            for i, name in enumerate(header):
                values = [row[i] if row[i] != "" else None for row in rows]
                if name in numeric:
                    columns[name] = pa.array([None if v is None else float(v) for v in values], pa.float64())
                else:
                    columns[name] = pa.array(values, pa.string())
            pq.write_table(pa.table(columns), tmp)
        else:
            with open_text(tmp, "w") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(header)
                writer.writerows(rows)
    return len(rows)


@dataclass
class ResultsFolder:
    """What a finished prediction run left in its output folder."""

    directory: Path
    photos: list[dict[str, str]]
    events: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    classified_at: dt.datetime | None = None  # when the results table was written (UTC)
    # A crop-then-classify run's: photo path -> its rows (boxes, or a whole-image answer; none for an empty photo)
    # and photo path -> (width, height). None for a run with a row per photo.
    boxes: dict[str, list[dict[str, str]]] | None = None
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def has_boxes(self) -> bool:
        return self.boxes is not None

    @property
    def model_name(self) -> str:
        """The model as the run named it: the pretrained name, else the weights file's name."""
        name = self.settings.get("model")
        weights = self.settings.get("weights")
        return str(name or (Path(weights).name if weights else "birder model"))

    @property
    def table_format(self) -> str:
        return str(self.settings.get("format") or "csv")


def read_run_settings(directory: Path) -> dict[str, Any]:
    try:
        info = json.loads((directory / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    settings = info.get("settings") if isinstance(info, dict) else None
    return settings if isinstance(settings, dict) else {}


def read_results_folder(directory: str | os.PathLike) -> ResultsFolder:
    """The photos (and events) of a results folder; a folder without a results table is refused in one line."""
    directory = Path(directory)
    settings = read_run_settings(directory)
    results = find_table(directory, RESULTS_TABLE, settings.get("format"))
    if results is None:
        raise BirderError(f"'{directory}' holds no results table (results.csv or results.parquet): run birder-predict")
    (header, photos) = read_rows(results)
    events_path = find_table(directory, EVENTS_TABLE, settings.get("format"))
    events = read_rows(events_path)[1] if events_path is not None else []
    written = dt.datetime.fromtimestamp(results.stat().st_mtime, tz=dt.UTC).replace(microsecond=0)
    folder = ResultsFolder(directory, photos, events, settings, written)
    if BOX_MARKER_COLUMN in header:
        _split_boxes(folder, find_table(directory, PHOTOS_TABLE, settings.get("format")))
    return folder


def _split_boxes(folder: ResultsFolder, photos_table: Path | None) -> None:
    """A row per box -> one row per photo (its first: the photo's EXIF columns are on every row) and its boxes."""
    by_photo: dict[str, list[dict[str, str]]] = {}
    for row in folder.photos:
        rows = by_photo.setdefault(row["path"], [])
        if row.get("source"):  # a box, or a whole-image answer; an empty photo's row has no source
            rows.append(row)
    first: dict[str, dict[str, str]] = {}
    for row in folder.photos:
        first.setdefault(row["path"], row)
    folder.photos = list(first.values())
    folder.boxes = by_photo
    if photos_table is not None:
        for row in read_rows(photos_table)[1]:
            try:
                folder.sizes[row["path"]] = (int(row["width"]), int(row["height"]))
            except (KeyError, ValueError):
                continue


def photo_folder(path: str) -> str:
    """The camera of a photo: its folder."""
    return os.path.dirname(path) or "."


def common_root(paths: Sequence[str]) -> str:
    """The deepest folder holding every photo (what exported file paths are relative to)."""
    folders = [os.path.abspath(photo_folder(path)) for path in paths]
    return os.path.commonpath(folders) if folders else os.getcwd()


def relative_path(path: str, root: str) -> str:
    return Path(os.path.relpath(os.path.abspath(path), root)).as_posix()


def fill_event_ids(path: Path, spec: TableSpec, event_of: dict[str, str], column_name: str = "event_id") -> None:
    """Fill the ``event_id`` column of the results table at ``path`` (of ``spec``) from photo path -> event id;
    every row of a photo (each of its boxes) gets its event."""
    column = spec.header.index(column_name)
    rows = []
    for row in read_table_rows(path, spec):
        row = list(row)
        row[column] = event_of.get(row[0], "")
        rows.append(row)
    write_table(path, spec, rows)


def answer_of(row: dict[str, str]) -> tuple[str, str]:
    """``(name, probability text)`` a row answers: the decision order's ``label`` when the run wrote one (a species,
    a genus ..., ``unknown`` or ``uncertain``), else ``prediction`` (with ``top1_prob`` when it is the top class)."""
    if row.get("label"):
        return (row["label"], row.get("label_probability", ""))
    prediction = row.get("prediction", "")
    return (prediction, row.get("top1_prob", "") if prediction == row.get("top1_class") else "")

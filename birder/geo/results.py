"""A ``birder-predict`` results folder as the event and export code reads it, and the events table on disk.

The results table (``results.csv`` or ``.parquet``) has one row per photo; the events table (``events.<format>``,
written with ``--events``) one row per event. Both are read as text cells by column name, whatever the format.
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
from birder.io.table_files import open_text, read_csv_table

RESULTS_TABLE = "results"
EVENTS_TABLE = "events"
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
    (_, photos) = read_rows(results)
    events_path = find_table(directory, EVENTS_TABLE, settings.get("format"))
    events = read_rows(events_path)[1] if events_path is not None else []
    written = dt.datetime.fromtimestamp(results.stat().st_mtime, tz=dt.UTC).replace(microsecond=0)
    return ResultsFolder(directory, photos, events, settings, written)


def photo_folder(path: str) -> str:
    """The camera of a photo: its folder."""
    return os.path.dirname(path) or "."


def common_root(paths: Sequence[str]) -> str:
    """The deepest folder holding every photo (what exported file paths are relative to)."""
    folders = [os.path.abspath(photo_folder(path)) for path in paths]
    return os.path.commonpath(folders) if folders else os.getcwd()


def relative_path(path: str, root: str) -> str:
    return Path(os.path.relpath(os.path.abspath(path), root)).as_posix()


def answer_of(row: dict[str, str]) -> tuple[str, str]:
    """``(name, probability text)`` a row answers: the decision order's ``label`` when the run wrote one (a species,
    a genus ..., ``unknown`` or ``uncertain``), else ``prediction`` (with ``top1_prob`` when it is the top class)."""
    if row.get("label"):
        return (row["label"], row.get("label_probability", ""))
    prediction = row.get("prediction", "")
    return (prediction, row.get("top1_prob", "") if prediction == row.get("top1_class") else "")

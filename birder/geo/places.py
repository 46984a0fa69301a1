"""Where and when each photo was taken, for the prior: EXIF, or what the user says for all photos or per photo.

Per field (position, date), the most specific source the user gave wins over the camera's: a row of the
``--locations`` file for that photo, then ``--lat/--lon`` and ``--date`` for every photo, then the photo's own EXIF
GPS position and date. A position or a date that cannot be read counts as absent (the prior then falls back:
place only, or the image's answer alone).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from birder.errors import BirderError, one_line
from birder.geo.prior import parse_date

_PATH_COLUMNS = ("path", "file", "filename", "file_name")
_LAT_COLUMNS = ("latitude", "lat", "decimallatitude", "gps_latitude")
_LON_COLUMNS = ("longitude", "lon", "lng", "decimallongitude", "gps_longitude")
_DATE_COLUMNS = ("date", "datetime", "eventdate", "exif_datetime")

Place = tuple[tuple[float, float] | None, str | None]  # ((latitude, longitude) or None, date text or None)


def parse_number(text: Any) -> float | None:
    """A number from a table cell; None for an empty cell, text that is no number, or NaN."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value == value else None


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    by_lower = {name.strip().casefold(): name for name in header}
    return next((by_lower[name] for name in names if name in by_lower), None)


def _key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def read_locations_file(path: str | os.PathLike) -> dict[str, Place]:
    """Per-photo positions and dates from a CSV (columns ``path``, ``latitude``, ``longitude``, ``date``; either of
    the last two pairs may be absent). Paths are matched as absolute paths, or by file name when the file gives
    names only.

    A cell that is given must be usable: a latitude or longitude that is no number or out of range, one of the two
    without the other, a date that does not exist or a row without a path is a :class:`BirderError` naming the
    file, the line and the value (a photo would otherwise silently go without its prior). Empty cells are absent
    values; a photo listed twice must have the same values both times.
    """
    places: dict[str, Place] = {}
    first_line: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = _locations_columns(path, list(reader.fieldnames or []))
            for row in reader:
                line = reader.line_num
                entry = _locations_row(path, line, row, columns)
                if entry is None:
                    continue
                (key, name, place) = entry
                if key in places and places[key] != place:
                    raise BirderError(
                        f"locations file '{path}' lines {first_line[key]} and {line} give different positions or "
                        f"dates for '{_shown(name)}': keep one row per photo"
                    )
                places[key] = place
                first_line.setdefault(key, line)
    except OSError as exc:
        raise BirderError(f"cannot read locations file '{path}': {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError as exc:
        raise BirderError(
            f"locations file '{path}' is not UTF-8 text ({exc.reason}): give a CSV of path, latitude, longitude, date"
        ) from None
    except csv.Error as exc:
        raise BirderError(f"locations file '{path}' is not a readable CSV: {' '.join(str(exc).split())}") from None
    return places


# (path column, latitude column, longitude column, date column) of a locations file; None: absent
_LocationsColumns = tuple[str, str | None, str | None, str | None]


def _locations_columns(path: str | os.PathLike, header: list[str]) -> _LocationsColumns:
    path_column = _pick(header, _PATH_COLUMNS)
    (lat_column, lon_column, date_column) = (_pick(header, c) for c in (_LAT_COLUMNS, _LON_COLUMNS, _DATE_COLUMNS))
    if path_column is None or (date_column is None and (lat_column is None or lon_column is None)):
        raise BirderError(
            f"locations file '{path}' needs a path column and latitude/longitude and/or date columns "
            f"(found: {_shown(', '.join(header)) or 'none'})"
        )
    if (lat_column is None) != (lon_column is None):
        (given, missing) = ("latitude", "longitude") if lon_column is None else ("longitude", "latitude")
        raise BirderError(f"locations file '{path}' has a {given} column but no {missing} column: add it, or drop both")
    return (path_column, lat_column, lon_column, date_column)


def _locations_row(
    path: str | os.PathLike, line: int, row: dict[str, Any], columns: _LocationsColumns
) -> tuple[str, str, Place] | None:
    """``(key, path as written, place)`` of one row of a locations file; None for a row without any value."""
    (path_column, lat_column, lon_column, date_column) = columns
    # csv gives None for cells a short row lacks and a list under None for the extra cells of a long one
    cells = {column: (row.get(column) or "").strip() for column in columns if column is not None}
    if not any(cells.values()):
        return None
    where = f"locations file '{path}' line {line}"
    name = cells[path_column]
    if not name:
        raise BirderError(f"{where}: no path (each row is path, latitude, longitude, date)")

    location = None
    if lat_column is not None and lon_column is not None:
        (lat_text, lon_text) = (cells[lat_column], cells[lon_column])
        if bool(lat_text) != bool(lon_text):
            missing = "longitude" if lat_text else "latitude"
            raise BirderError(
                f"{where}: no {missing} for '{_shown(name)}' (give both latitude and longitude, or neither)"
            )
        if lat_text:
            location = (_coordinate(where, "latitude", lat_text, 90), _coordinate(where, "longitude", lon_text, 180))

    date = None
    if date_column is not None and cells[date_column]:
        day = parse_date(cells[date_column])
        if day is None:
            raise BirderError(f"{where}: date '{_shown(cells[date_column])}' is not a date (YYYY-MM-DD)")
        date = day.isoformat()  # one spelling per day: two rows of a photo agree when their days do
    key = name if os.sep not in name and "/" not in name else _key(name)
    return (key, name, (location, date))


def _coordinate(where: str, what: str, text: str, limit: float) -> float:
    value = parse_number(text)
    if value is None or not math.isfinite(value):
        raise BirderError(f"{where}: {what} '{_shown(text)}' is not a number")
    if not -limit <= value <= limit:
        raise BirderError(f"{where}: {what} {_shown(text)} is outside -{limit}..{limit}")
    return value


def _shown(text: str) -> str:
    """A value of the file as an error message quotes it: on one line, and short."""
    return one_line(text, 80) if text.split() else ""


@dataclass
class PlaceResolver:
    """Resolves each photo's position and date (see the module's docstring)."""

    latitude: float | None = None
    longitude: float | None = None
    date: str | None = None
    per_photo: Mapping[str, Place] = field(default_factory=dict)
    source: str = ""  # the locations file that gave ``per_photo``, for messages

    def __post_init__(self) -> None:
        if (self.latitude is None) != (self.longitude is None):
            raise BirderError("give both --lat and --lon, or neither")
        if self.latitude is not None and not (-90 <= self.latitude <= 90 and -180 <= (self.longitude or 0) <= 180):
            raise BirderError("--lat must be within -90..90 and --lon within -180..180")
        if self.date is not None and parse_date(self.date) is None:
            raise BirderError(f"--date '{self.date}' is not a date (YYYY-MM-DD)")

    @classmethod
    def from_options(
        cls,
        latitude: float | None,
        longitude: float | None,
        date: str | None,
        locations: str | os.PathLike | None,
    ) -> PlaceResolver:
        if locations is None:
            return cls(latitude, longitude, date)
        return cls(latitude, longitude, date, read_locations_file(locations), str(locations))

    def unmatched(self, paths: Iterable[str]) -> list[str]:
        """The photos of the locations file (absolute paths, or names) that are none of ``paths``, in its order."""
        if not self.per_photo:
            return []
        matched = set()
        for path in paths:
            matched.update((_key(path), Path(path).name))
        return [key for key in self.per_photo if key not in matched]

    def resolve(self, path: str, exif_datetime: str | None, gps_latitude: Any, gps_longitude: Any) -> Place:
        """The position and date the prior uses for the photo at ``path`` with this EXIF."""
        (location, date) = (None, None)
        if self.per_photo:
            (location, date) = self.per_photo.get(_key(path)) or self.per_photo.get(Path(path).name) or (None, None)
        if location is None and self.latitude is not None:
            location = (self.latitude, self.longitude)  # type: ignore[assignment]
        if location is None:
            (latitude, longitude) = (parse_number(gps_latitude), parse_number(gps_longitude))
            location = (latitude, longitude) if latitude is not None and longitude is not None else None
        return (location, date or self.date or exif_datetime or None)

"""Where and when each photo was taken, for the prior: EXIF, or what the user says for all photos or per photo.

Per field (position, date), the most specific source the user gave wins over the camera's: a row of the
``--locations`` file for that photo, then ``--lat/--lon`` and ``--date`` for every photo, then the photo's own EXIF
GPS position and date. A position or a date that cannot be read counts as absent (the prior then falls back:
place only, or the image's answer alone).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from birder.errors import BirderError
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
    names only."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except OSError as exc:
        raise BirderError(f"cannot read locations file '{path}': {' '.join(str(exc).split())}") from None
    path_column = _pick(header, _PATH_COLUMNS)
    (lat_column, lon_column, date_column) = (_pick(header, c) for c in (_LAT_COLUMNS, _LON_COLUMNS, _DATE_COLUMNS))
    if path_column is None or (date_column is None and (lat_column is None or lon_column is None)):
        raise BirderError(
            f"locations file '{path}' needs a path column and latitude/longitude and/or date columns "
            f"(found: {', '.join(header) or 'none'})"
        )

    places: dict[str, Place] = {}
    for row in rows:
        latitude = parse_number(row.get(lat_column)) if lat_column else None
        longitude = parse_number(row.get(lon_column)) if lon_column else None
        location = (latitude, longitude) if latitude is not None and longitude is not None else None
        date = (row.get(date_column) or "").strip() or None if date_column else None
        name = (row.get(path_column) or "").strip()
        if name:
            places[name if os.sep not in name and "/" not in name else _key(name)] = (location, date)
    return places


@dataclass
class PlaceResolver:
    """Resolves each photo's position and date (see the module's docstring)."""

    latitude: float | None = None
    longitude: float | None = None
    date: str | None = None
    per_photo: Mapping[str, Place] = field(default_factory=dict)

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
        return cls(latitude, longitude, date, read_locations_file(locations) if locations is not None else {})

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

"""Camtrap DP 1.0.2 export: ``datapackage.json`` + deployments, media and observations tables.

The facts of the standard are in docs/compatibility.md ("Camera-trap export formats"); the column orders and
constraints are those of the Table Schemas shipped in ``birder/geo/schemas/`` (written from those facts, and what
the tests validate against with frictionless).

How a results folder maps onto the standard:

- one deployment per folder (camera); its position is the mean GPS position of its photos, else
  ``deployment_lat``/``deployment_lon``; a folder with neither is refused in one line; its start and end are its
  first and last photo times;
- one media row per photo with an EXIF time; Camtrap DP requires a timestamp with a timezone, and EXIF times have
  none, so a timezone (``+02:00`` or ``Europe/Vienna``) is required; photos without an EXIF time are left out
  (counted in one line);
- one machine observation per photo (``observationLevel`` media) and, with events, one per event (``event``);
  ``observationType`` animal with the predicted ``scientificName``, or unknown when the model abstained;
- for a crop-then-classify run (``--detector``): one media-level observation per box, with ``bboxX``, ``bboxY``,
  ``bboxWidth``, ``bboxHeight`` (the box as a fraction of the photo, from its top-left corner) and ``count`` 1,
  people and vehicles as ``human`` / ``vehicle``; a photo without a box is a ``blank`` observation; with events,
  one event-level observation per species of the event, ``count`` the most of its boxes in one photo
  (:mod:`birder.geo.box_events`).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import mimetypes
import os
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.geo.box_events import box_corners, box_observation
from birder.geo.events import parse_exif_time
from birder.geo.places import parse_number
from birder.geo.results import ResultsFolder, answer_of, common_root, photo_folder, relative_path, write_rows
from birder.io.atomic import atomic_write_path
from birder.review.answers import human_observations, reviewed_answer_note

VERSION = "1.0.2"
BASE_URL = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}"
PROFILE_URL = f"{BASE_URL}/camtrap-dp-profile.json"
TABLES = ("deployments", "media", "observations")
SCHEMA_DIR = Path(__file__).parent / "schemas"
# Predictions that are no species: the model abstained
ABSTENTIONS = frozenset({"", "uncertain", "unknown"})
SAMPLING_DESIGNS = ("simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted", "opportunistic")


def table_schema_path(table: str) -> Path:
    return SCHEMA_DIR / f"camtrap-dp-{table}-table-schema.json"


@functools.cache
def _table_fields(table: str) -> tuple[dict[str, Any], ...]:
    """The fields of a shipped Camtrap DP Table Schema, read once (read only: shared by every caller)."""
    return tuple(json.loads(table_schema_path(table).read_text(encoding="utf-8"))["fields"])


def media_path_fits() -> Callable[[str], bool]:
    """Whether a media ``filePath`` meets the media table's constraint (no ``..``, no leading ``.``, ``/`` or ``~``, no
    line break), read from the shipped Table Schema and applied as frictionless applies it."""
    pattern = next(column for column in _table_fields("media") if column["name"] == "filePath")["constraints"]
    compiled = re.compile(f"^{pattern['pattern']}$")
    return lambda path: compiled.match(path) is not None


def table_columns(table: str) -> list[str]:
    """The columns of a Camtrap DP table, in the standard's order (from the shipped Table Schema)."""
    return [column["name"] for column in _table_fields(table)]


# ---------------------------------------------------------------------------------------------------------------------
# Time zones
# ---------------------------------------------------------------------------------------------------------------------


def parse_timezone(text: str) -> dt.tzinfo:
    """``+02:00``, ``-0530``, ``Z``/``UTC`` or an IANA name (``Europe/Vienna``: daylight saving applied per date)."""
    text = text.strip()
    if text.upper() in ("Z", "UTC"):
        return dt.UTC
    match = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", text)
    if match:
        offset = dt.timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        if offset > dt.timedelta(hours=14):
            raise BirderError(f"--timezone '{text}': an offset is at most 14 hours")
        return dt.timezone(offset if match.group(1) == "+" else -offset)
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise BirderError(
            f"--timezone '{text}' is neither an offset (+02:00) nor a time zone name (Europe/Vienna)"
        ) from None


def require_timezone(timezone: str | None) -> dt.tzinfo:
    if not timezone:
        raise BirderError(
            "Camtrap DP needs times with a timezone and EXIF times have none: give --timezone (e.g. +02:00 or "
            "Europe/Vienna)"
        )
    return parse_timezone(timezone)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CamtrapOptions:
    timezone: str | None = None
    deployment_lat: float | None = None
    deployment_lon: float | None = None
    project_title: str = "birder predictions"
    contributor: str = "birder"
    sampling_design: str = "opportunistic"
    capture_method: str = "activityDetection"


@dataclass
class ExportReport:
    path: Path
    lines: list[str] = field(default_factory=list)


@dataclass
class _Deployment:
    deployment_id: str
    folder: str
    latitude: float
    longitude: float
    start: dt.datetime
    end: dt.datetime


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.7f}".rstrip("0").rstrip(".")
    return str(value)


def _row(columns: list[str], values: dict[str, Any]) -> list[str]:
    return [_cell(values.get(column)) for column in columns]


def _deployment_position(photos: list[dict[str, str]], options: CamtrapOptions, folder: str) -> tuple[float, float]:
    points = [(parse_number(p.get("gps_latitude", "")), parse_number(p.get("gps_longitude", ""))) for p in photos]
    points = [(lat, lon) for (lat, lon) in points if lat is not None and lon is not None]
    if points:
        return (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))
    if options.deployment_lat is not None and options.deployment_lon is not None:
        return (options.deployment_lat, options.deployment_lon)
    raise BirderError(
        f"camera folder '{folder}' has no GPS position in its photos: give --deployment-lat and --deployment-lon"
    )


def _deployments(
    results: ResultsFolder, times: dict[str, dt.datetime], root: str, options: CamtrapOptions
) -> dict[str, _Deployment]:
    by_folder: dict[str, list[dict[str, str]]] = {}
    for photo in results.photos:
        by_folder.setdefault(photo_folder(photo["path"]), []).append(photo)

    deployments = {}
    for folder, photos in sorted(by_folder.items()):
        timed = [times[p["path"]] for p in photos if p["path"] in times]
        if not timed:
            continue  # no photo can be a media row: no deployment either
        (latitude, longitude) = _deployment_position(photos, options, folder)
        name = relative_path(folder, root)
        if name == ".":  # the photos sit in the root folder itself: the camera is that folder
            name = Path(root).name or "camera"
        deployments[folder] = _Deployment(name, folder, latitude, longitude, min(timed), max(timed))
    return deployments


def _observation(results: ResultsFolder, row: dict[str, str]) -> dict[str, Any]:
    """The classification fields of an observation of a photo's or an event's row."""
    (name, probability) = answer_of(row)
    animal = name not in ABSTENTIONS
    return {
        "observationType": "animal" if animal else "unknown",
        "scientificName": name if animal else None,
        "classificationMethod": "machine",
        "classifiedBy": results.model_name,
        "classificationTimestamp": iso(results.classified_at) if results.classified_at else None,
        "classificationProbability": probability if animal and probability else None,
    }


def export_camtrap_dp(results: ResultsFolder, output_dir: str | os.PathLike, options: CamtrapOptions) -> ExportReport:
    """Write a Camtrap DP package of ``results`` into ``output_dir``; returns its datapackage.json and notes."""
    tz = require_timezone(options.timezone)
    output_dir = Path(output_dir)
    root = common_root([photo["path"] for photo in results.photos])
    times: dict[str, dt.datetime] = {}
    for photo in results.photos:
        taken = parse_exif_time(photo.get("exif_datetime"))
        if taken is not None:
            times[photo["path"]] = (taken.replace(tzinfo=tz) if taken.tzinfo is None else taken).astimezone(tz)
    # A photo whose path the standard cannot hold (a ".." in its name, a line break) is left out, as an untimed one
    fits = media_path_fits()
    unfit = [path for path in times if not fits(relative_path(path, root))]
    for path in unfit:
        del times[path]
    deployments = _deployments(results, times, root, options)

    columns = {table: table_columns(table) for table in TABLES}
    rows = {"deployments": [_row(columns["deployments"], _deployment_values(d)) for d in deployments.values()]}
    (rows["media"], rows["observations"], spans) = _photo_rows(results, times, deployments, root, options, columns)
    rows["observations"] += _event_rows(results, spans, columns["observations"])
    # birder-review's decisions (reviews.csv): human observations beside the machine's
    rows["observations"] += human_observations(results, rows["observations"], columns["observations"], root)
    for number, row in enumerate(rows["observations"], start=1):
        row[0] = f"O{number:06d}"

    _write_package(output_dir, results, options, deployments, rows, columns)
    notes = _notes(results, times, deployments, unfit)
    notes += reviewed_answer_note(rows["observations"], columns["observations"])
    return ExportReport(output_dir / "datapackage.json", notes)


def _deployment_values(deployment: _Deployment) -> dict[str, Any]:
    return {
        "deploymentID": deployment.deployment_id,
        "locationID": deployment.deployment_id,
        "locationName": Path(deployment.folder).name or deployment.deployment_id,
        "latitude": deployment.latitude,
        "longitude": deployment.longitude,
        "deploymentStart": iso(deployment.start),
        "deploymentEnd": iso(deployment.end),
    }


# An event's first and last photo times and its deployment
_Span = tuple[dt.datetime, dt.datetime, str]


def _photo_rows(
    results: ResultsFolder,
    times: dict[str, dt.datetime],
    deployments: dict[str, _Deployment],
    root: str,
    options: CamtrapOptions,
    columns: dict[str, list[str]],
) -> tuple[list[list[str]], list[list[str]], dict[str, _Span]]:
    """The media and media-level observation rows of the timed photos, and the time span of each event."""
    (media, observations, spans) = ([], [], {})
    for photo in results.photos:
        path = photo["path"]
        if path not in times:
            continue
        deployment = deployments[photo_folder(path)]
        media_id = relative_path(path, root)
        moment = iso(times[path])
        values = {
            "mediaID": media_id,
            "deploymentID": deployment.deployment_id,
            "captureMethod": options.capture_method,
            "timestamp": moment,
            "filePath": media_id,
            "filePublic": False,  # files on a local disk, not published
            "fileName": os.path.basename(path),
            "fileMediatype": mimetypes.guess_type(path)[0] or "image/jpeg",
        }
        media.append(_row(columns["media"], values))
        event_id = photo.get("event_id") or None
        if event_id:
            (start, end, _) = spans.get(event_id, (times[path], times[path], deployment.deployment_id))
            spans[event_id] = (min(start, times[path]), max(end, times[path]), deployment.deployment_id)
        for observation in _media_observations(results, photo):
            observation.update(
                deploymentID=deployment.deployment_id,
                mediaID=media_id,
                eventID=event_id,
                eventStart=moment,
                eventEnd=moment,
                observationLevel="media",
            )
            observations.append(_row(columns["observations"], observation))
    return (media, observations, spans)


def _media_observations(results: ResultsFolder, photo: dict[str, str]) -> list[dict[str, Any]]:
    """A photo's media-level observations: its answer, or (boxes) one per box, or ``blank`` for no box."""
    if results.boxes is None:
        return [_observation(results, photo)]
    rows = results.boxes.get(photo["path"], [])
    if not rows:
        return [_typed_observation(results, "blank", "", "", None)]
    size = results.sizes.get(photo["path"])
    return [_box_values(results, row, size) for row in rows]


def _typed_observation(
    results: ResultsFolder, kind: str, name: str, probability: str, count: int | None
) -> dict[str, Any]:
    """The classification fields of an observation of a given type (a box's, an event's of boxes, a blank)."""
    return {
        "observationType": kind,
        "scientificName": name or None,
        "count": count,
        "classificationMethod": "machine",
        "classifiedBy": results.model_name,
        "classificationTimestamp": iso(results.classified_at) if results.classified_at else None,
        "classificationProbability": probability if kind == "animal" and probability else None,
    }


def _box_values(results: ResultsFolder, row: dict[str, str], size: tuple[int, int] | None) -> dict[str, Any]:
    """A box's observation: its type and species, count 1, its box as fractions of the photo (a whole-image answer:
    no box)."""
    (kind, name, probability) = box_observation(row)
    values = _typed_observation(results, kind, name, probability, 1)
    corners = box_corners(row)
    if size is not None and corners is not None:
        (x1, y1, x2, y2) = corners
        (width, height) = size
        left = min(max(x1 / width, 0.0), 1.0)
        top = min(max(y1 / height, 0.0), 1.0)
        values.update(
            bboxX=round(left, 6),
            bboxY=round(top, 6),
            bboxWidth=round(min(max(x2 / width, 0.0), 1.0) - left, 6),
            bboxHeight=round(min(max(y2 / height, 0.0), 1.0) - top, 6),
        )
    return values


def _event_rows(results: ResultsFolder, spans: dict[str, _Span], columns: list[str]) -> list[list[str]]:
    """The event-level observations (events of untimed photos have no media, so no observation either)."""
    rows = []
    for event in results.events:
        span = spans.get(event["event_id"])
        if span is not None:
            if "observation_type" in event:  # a crop-then-classify run's: per event and species, counted
                count = int(event["count"]) if event.get("count") else None
                kind = event["observation_type"]
                name = event["label"] if kind == "animal" else ""
                observation = _typed_observation(results, kind, name, event.get("label_probability", ""), count)
            else:
                observation = _observation(results, event)
            observation.update(
                deploymentID=span[2],
                eventID=event["event_id"],
                eventStart=iso(span[0]),
                eventEnd=iso(span[1]),
                observationLevel="event",
            )
            rows.append(_row(columns, observation))
    return rows


def _notes(
    results: ResultsFolder, times: dict[str, dt.datetime], deployments: dict[str, _Deployment], unfit: list[str]
) -> list[str]:
    untimed = len(results.photos) - len(times) - len(unfit)
    notes = [f"Camtrap DP: {len(deployments)} deployments, {len(times)} media"]
    if unfit:
        notes.append(
            f"{len(unfit)} photos left out of the Camtrap DP export: a media filePath may not hold '..', a line "
            f"break or a leading '.', '/' or '~' (first: {unfit[0]!r}); rename them and export again"
        )
    if untimed:
        notes.append(
            f"{untimed} photos without an EXIF time left out of the Camtrap DP export (a timestamp is required)"
        )
    return notes


def _write_package(
    output_dir: Path,
    results: ResultsFolder,
    options: CamtrapOptions,
    deployments: dict[str, _Deployment],
    rows: dict[str, list[list[str]]],
    columns: dict[str, list[str]],
) -> None:
    if not deployments:
        raise BirderError("no photo has an EXIF time: a Camtrap DP package needs timestamped media")
    if options.sampling_design not in SAMPLING_DESIGNS:
        raise BirderError(f"sampling design '{options.sampling_design}': one of {', '.join(SAMPLING_DESIGNS)}")

    for table in TABLES:
        write_rows(output_dir / f"{table}.csv", columns[table], rows[table])
    names = sorted({row[columns["observations"].index("scientificName")] for row in rows["observations"]} - {""})
    latitudes = [d.latitude for d in deployments.values()]
    longitudes = [d.longitude for d in deployments.values()]
    (west, east, south, north) = (min(longitudes), max(longitudes), min(latitudes), max(latitudes))
    package = {
        "profile": PROFILE_URL,
        "name": re.sub(r"[^a-z0-9._-]+", "-", options.project_title.lower()).strip("-") or "birder",
        "created": iso(dt.datetime.now(dt.UTC).replace(microsecond=0)),
        "contributors": [{"title": options.contributor, "role": "contributor"}],
        "project": {
            "title": options.project_title,
            "samplingDesign": options.sampling_design,
            "captureMethod": [options.capture_method],
            "individualAnimals": False,
            "observationLevel": ["media", "event"] if results.events else ["media"],
        },
        "spatial": {
            "type": "Polygon",
            "bbox": [west, south, east, north],
            "coordinates": [[[west, south], [east, south], [east, north], [west, north], [west, south]]],
        },
        "temporal": {
            "start": min(d.start for d in deployments.values()).date().isoformat(),
            "end": max(d.end for d in deployments.values()).date().isoformat(),
        },
        "taxonomic": [{"scientificName": name} for name in names],
        "resources": [
            {
                "name": table,
                "path": f"{table}.csv",
                "profile": "tabular-data-resource",
                "format": "csv",
                "mediatype": "text/csv",
                "encoding": "utf-8",
                "schema": f"{BASE_URL}/{table}-table-schema.json",
            }
            for table in TABLES
        ],
    }
    with atomic_write_path(output_dir / "datapackage.json") as tmp:
        tmp.write_text(json.dumps(package, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

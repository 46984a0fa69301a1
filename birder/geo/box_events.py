"""Events of a crop-then-classify run (``birder-predict --detector ... --events``): what each visit held, counted.

Photos are grouped into events exactly as for a run with a row per photo (:func:`birder.geo.events.group_events`:
by camera folder and EXIF time gap). An event's answer comes from its boxes, not from combined image
probabilities: every species some box of the event was answered as is observed in the event, and its ``count`` is
the most boxes of that species in any one photo of the event (a burst of three photos of two deer is two deer,
not six). Boxes the model abstained on (``unknown``, ``uncertain``) are counted together as ``unknown``, people
and vehicles (the detector's classes) as ``human`` and ``vehicle``. An event none of whose photos has a box is
``blank``.

The events table has a row per event and observation (``observation_type``, ``label``, ``count``), which is what
a Camtrap DP event-level observation is (:mod:`birder.geo.camtrap`).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

from birder.geo.events import EventsReport, group_events, parse_exif_time, parse_gap
from birder.geo.places import parse_number
from birder.geo.results import (
    EVENTS_TABLE,
    ResultsFolder,
    answer_of,
    fill_event_ids,
    photo_folder,
    read_results_folder,
    write_rows,
)
from birder.io.table_files import TableSpec

BOX_EVENT_COLUMNS = (
    "event_id",
    "camera",
    "start",
    "end",
    "photos",
    "timed",
    "observation_type",
    "label",
    "count",
    "boxes",
    "label_probability",
)
# Detector classes that are no animal (MegaDetector's names and their usual spellings): Camtrap DP types
_NOT_ANIMAL = {"person": "human", "human": "human", "people": "human", "vehicle": "vehicle"}
# Answers that name no species: the model abstained
_ABSTAINED = frozenset({"", "uncertain", "unknown"})
# The order of an event's observations: species, then the rest
_TYPE_ORDER = {"animal": 0, "unknown": 1, "human": 2, "vehicle": 3}


def box_observation(row: dict[str, str]) -> tuple[str, str, str]:
    """``(observation type, scientific name or "", probability text)`` of one box row (or whole-image answer):
    people and vehicles by the detector's class, an animal by the classifier's answer (``unknown`` when it
    abstained)."""
    kind = _NOT_ANIMAL.get(row.get("det_class", "").strip().lower())
    if kind is not None:
        return (kind, "", "")
    (name, probability) = answer_of(row)
    if name in _ABSTAINED:
        return ("unknown", "", "")
    return ("animal", name, probability)


def box_corners(row: dict[str, str]) -> tuple[float, float, float, float] | None:
    """A box row's ``(x1, y1, x2, y2)`` in the photo's pixels; None for a row without a box (whole-image)."""
    corners = [parse_number(row.get(key, "")) for key in ("x1", "y1", "x2", "y2")]
    if any(value is None for value in corners):
        return None
    (x1, y1, x2, y2) = (float(value or 0.0) for value in corners)
    return (x1, y1, x2, y2)


def event_observations(boxes_per_photo: list[list[dict[str, str]]]) -> list[tuple[str, str, int, int, str]]:
    """An event's observations from its photos' box rows: ``(type, name, count, boxes, best probability)``, count
    the most boxes of that kind in one photo; ``[("blank", "", 0, 0, "")]`` when no photo has a box."""
    most: Counter[tuple[str, str]] = Counter()
    total: Counter[tuple[str, str]] = Counter()
    best: dict[tuple[str, str], str] = {}
    for rows in boxes_per_photo:
        in_photo: Counter[tuple[str, str]] = Counter()
        for row in rows:
            (kind, name, probability) = box_observation(row)
            in_photo[(kind, name)] += 1
            if probability and (not best.get((kind, name)) or float(probability) > float(best[(kind, name)])):
                best[(kind, name)] = probability
        for key, count in in_photo.items():
            most[key] = max(most[key], count)
            total[key] += count
    if not most:
        return [("blank", "", 0, 0, "")]
    ordered = sorted(most, key=lambda key: (_TYPE_ORDER[key[0]], -most[key], key[1]))
    return [(*key, most[key], total[key], best.get(key, "")) for key in ordered]


def box_event_rows(results: ResultsFolder, gap: str | dt.timedelta) -> tuple[list[list[str]], dict[str, str]]:
    """The events table's rows (see :data:`BOX_EVENT_COLUMNS`) and photo path -> event id."""
    if results.boxes is None:
        raise ValueError("box events need a crop-then-classify results folder")
    photos = results.photos
    times = [parse_exif_time(photo.get("exif_datetime")) for photo in photos]
    events = group_events([photo_folder(photo["path"]) for photo in photos], times, parse_gap(gap))
    rows = []
    for event in events:
        boxes = [results.boxes.get(photos[i]["path"], []) for i in event.members]
        head = [event.event_id, event.folder, _iso(event.start), _iso(event.end), str(len(event.members))]
        head.append("true" if event.timed else "false")
        for kind, name, count, total, probability in event_observations(boxes):
            label = name if kind == "animal" else kind
            rows.append([*head, kind, label, str(count) if count else "", str(total), probability])
    event_of = {photos[i]["path"]: event.event_id for event in events for i in event.members}
    return (rows, event_of)


def write_box_events(
    output_dir: Path, table_format: str, results_spec: TableSpec, gap: str | dt.timedelta
) -> EventsReport:
    """(after the run's tables are merged) Write the events table of a crop-then-classify run and fill the
    ``event_id`` column of its results table (every box of a photo gets the photo's event)."""
    results = read_results_folder(output_dir)
    (rows, event_of) = box_event_rows(results, gap)
    path = output_dir / f"{EVENTS_TABLE}.{table_format}"
    write_rows(path, BOX_EVENT_COLUMNS, rows, numeric=("count", "boxes", "label_probability"))
    results_path = output_dir / f"{results_spec.name}.{table_format}"
    fill_event_ids(results_path, results_spec, event_of)
    untimed = len({row[0] for row in rows if row[5] == "false"})
    return EventsReport(path, len({row[0] for row in rows}), untimed)


def _iso(moment: dt.datetime | None) -> str:
    return moment.isoformat() if moment is not None else ""

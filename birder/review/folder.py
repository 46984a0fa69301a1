"""A ``birder-predict`` output folder as a person reviews it: one :class:`ReviewUnit` per screen.

What the folder holds decides what a screen is about:

- with ``--events`` (an ``events`` table, and ``event_id`` filled in the results): one unit per event, its photos
  in time order, the event's combined answer and top-k;
- with ``--detector`` (a ``box`` column: a results row per detected box): one unit per photo, each box with its own
  answer (a person corrects each box); a photo without a box is the machine saying "nothing here";
- otherwise: one unit per photo.

The results table is read whatever its format (CSV or Parquet). A run still going, or interrupted and not yet
resumed, has its rows in ``.partial/`` journals (:mod:`birder.io.journal`): they are read too, the newest attempt's
rows winning for a photo, so a half-done survey can already be reviewed. Photos the run could not read
(``failures.csv``) are listed, not reviewed. A photo moved or deleted since the run is marked missing: its screen
still shows the machine's answer and takes a decision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.geo.box_events import box_observation
from birder.geo.results import (
    EVENTS_TABLE,
    RESULTS_TABLE,
    SOURCE_PASSED,
    SOURCE_WHOLE_IMAGE,
    answer_of,
    find_table,
    photo_folder,
    read_rows,
    read_run_settings,
)
from birder.io.journal import JOURNAL_DIR, list_journals
from birder.io.table_files import read_csv_table

FAILURES_TABLE = "failures"
PHOTOS_TABLE = "photos"
# What a screen is about
KIND_EVENT = "event"
KIND_PHOTO = "photo"
# Answers that claim no species (the model abstained, or found no box)
NO_SPECIES = frozenset({"", "uncertain", "unknown", "blank"})
BLANK = "blank"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class Answer:
    """What the machine answered for a unit or a box: the label (a species, a genus ..., ``unknown``,
    ``uncertain``; ``blank`` for a photo without a box), its rank, its probability and the top-k species."""

    label: str
    rank: str = ""
    probability: float | None = None
    top: tuple[tuple[str, float], ...] = ()
    unknown_score: float | None = None

    @property
    def sureness(self) -> float:
        """How sure the answer is, for ordering: its probability, else its top species' (an abstention)."""
        if self.probability is not None:
            return self.probability
        return self.top[0][1] if self.top else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "rank": self.rank,
            "probability": self.probability,
            "top": [{"name": name, "probability": prob} for (name, prob) in self.top],
            "unknown_score": self.unknown_score,
        }


@dataclass(frozen=True)
class Box:
    """A detected box of a photo (``birder-predict --detector``), in the photo's pixels."""

    photo: int  # index into the unit's photos
    index: int  # the box's number in its photo (``box`` column), best detection first
    xyxy: tuple[float, float, float, float]
    det_score: float
    answer: Answer

    @property
    def key(self) -> str:
        """How a decision names the box: ``<photo>:<box>`` (one photo per unit in a detector run: ``0:<box>``)."""
        return f"{self.photo}:{self.index}"


@dataclass
class Photo:
    path: str  # as the results table names it
    file: Path  # where it is now looked for
    missing: bool  # moved or deleted since the run
    taken: str = ""  # EXIF time, as the results table has it
    size: tuple[int, int] | None = None  # (width, height) when the run recorded it (detector runs)


@dataclass
class ReviewUnit:
    """One screen: an event, or a photo."""

    unit_id: str  # the event id, or the photo's path
    kind: str  # KIND_EVENT or KIND_PHOTO
    camera: str  # the folder of its photos
    start: str  # its first photo's time (may be empty)
    photos: list[Photo]
    answer: Answer  # the unit's (with boxes: the best box's, for ordering and showing)
    boxes: list[Box] = field(default_factory=list)

    @property
    def machine_species(self) -> list[str]:
        """The species the machine's answer records at this unit's camera (none for an abstention)."""
        answers = [box.answer for box in self.boxes] if self.boxes else [self.answer]
        return list(dict.fromkeys(a.label for a in answers if is_species_label(a)))

    @property
    def sureness(self) -> float:
        """How sure the machine is of this unit: its least sure box, or its answer."""
        if self.boxes:
            return min(box.answer.sureness for box in self.boxes)
        return self.answer.sureness


def is_species_label(answer: Answer) -> bool:
    """Whether an answer names a species (a record): not an abstention, not a higher rank."""
    if answer.label in NO_SPECIES:
        return False
    return answer.rank in ("", "species")


@dataclass
class ReviewFolder:
    """A results folder read for review."""

    directory: Path
    units: list[ReviewUnit]
    settings: dict[str, Any]
    class_names: list[str]  # the run's classes, as far as its tables show them
    failures: list[tuple[str, str]]  # (path, reason) of the photos the run could not read
    detector: bool
    events: bool
    partial: bool  # rows read from the journals of an unfinished run
    _index: dict[str, ReviewUnit] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def model(self) -> str:
        """What made the answers, as reviews.csv records it: the pretrained name, else the weights file."""
        return model_identity(self.settings)

    def unit(self, unit_id: str) -> ReviewUnit | None:
        return self._by_id().get(unit_id)

    def _by_id(self) -> dict[str, ReviewUnit]:
        if len(self._index) != len(self.units):
            self._index = {unit.unit_id: unit for unit in self.units}
        return self._index

    @property
    def missing_photos(self) -> int:
        return sum(photo.missing for unit in self.units for photo in unit.photos)


def model_identity(settings: dict[str, Any]) -> str:
    """The model of a run's settings: ``-n`` name, else the weights file (as given to the run), with the network."""
    name = settings.get("model") or settings.get("weights") or "unknown model"
    network = settings.get("network")
    return f"{name} ({network})" if network else str(name)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def read_review_folder(directory: str | os.PathLike) -> ReviewFolder:
    """The units of a results folder; a folder with no results (final or journaled) is refused in one line."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BirderError(f"'{directory}' is not a folder: give the --output-dir of a birder-predict run")
    settings = read_run_settings(directory) or _journal_settings(directory)
    (header, rows, partial) = _result_rows(directory, settings)
    if not header:
        raise BirderError(
            f"'{directory}' holds no results table (results.csv or results.parquet): run birder-predict into it"
        )
    failures = _failures(directory)
    detector = "box" in header
    resolve = _photo_resolver(directory)
    sizes = _photo_sizes(directory, settings) if detector else {}
    events_path = find_table(directory, EVENTS_TABLE, settings.get("format"))
    with_events = events_path is not None and not detector and any(row.get("event_id") for row in rows)
    if detector:
        units = _box_units(rows, resolve, sizes)
    elif with_events:
        assert events_path is not None
        units = _event_units(read_rows(events_path)[1], rows, resolve)
    else:
        units = [_photo_unit(row, resolve) for row in rows]
    classes = _class_names(directory, settings, header, rows)
    return ReviewFolder(directory, units, settings, classes, failures, detector, with_events, partial)


def _journal_settings(directory: Path) -> dict[str, Any]:
    return read_run_settings(directory / JOURNAL_DIR)


def _result_rows(directory: Path, settings: dict[str, Any]) -> tuple[list[str], list[dict[str, str]], bool]:
    """The results rows: the final table's, then (a run not finished) each photo's rows of its newest journal."""
    (header, rows) = ([], [])
    final = find_table(directory, RESULTS_TABLE, settings.get("format"))
    if final is not None:
        (header, rows) = read_rows(final)
    journals = [(attempt, path) for (table, _, attempt, path) in list_journals(directory) if table == RESULTS_TABLE]
    if not journals:
        return (header, rows, False)

    by_path: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_path.setdefault(row["path"], []).append(row)
    newest: dict[str, int] = {}
    for attempt, path in sorted(journals):
        (journal_header, journal_rows) = read_csv_table(path)
        if header and journal_header != header:
            continue  # a journal of other columns belongs to another run: never mixed in
        header = header or journal_header
        fresh: dict[str, list[dict[str, str]]] = {}
        for values in journal_rows:
            row = dict(zip(journal_header, values, strict=True))
            fresh.setdefault(row["path"], []).append(row)
        for photo, photo_rows in fresh.items():
            if newest.get(photo, -1) <= attempt:
                newest[photo] = attempt
                by_path[photo] = photo_rows
    return (header, [row for photo_rows in by_path.values() for row in photo_rows], True)


def _failures(directory: Path) -> list[tuple[str, str]]:
    path = directory / f"{FAILURES_TABLE}.csv"
    if not path.is_file():
        return []
    (_, rows) = read_csv_table(path)
    return [(row[0], row[1] if len(row) > 1 else "") for row in rows]


def _photo_sizes(directory: Path, settings: dict[str, Any]) -> dict[str, tuple[int, int]]:
    path = find_table(directory, PHOTOS_TABLE, settings.get("format"))
    if path is None:
        return {}
    sizes = {}
    for row in read_rows(path)[1]:
        try:
            sizes[row["path"]] = (int(float(row["width"])), int(float(row["height"])))
        except (KeyError, ValueError):
            continue
    return sizes


def _photo_resolver(directory: Path) -> Any:
    """Where a photo of the table is now: its path as written (absolute, or relative to the working folder), else
    relative to the results folder's parent (a survey folder moved with its results)."""

    def resolve(path: str) -> tuple[Path, bool]:
        candidates = [Path(path)]
        if not Path(path).is_absolute():
            candidates.append(directory.parent / path)
        for candidate in candidates:
            if candidate.is_file():
                return (candidate, False)
        return (candidates[0], True)

    return resolve


def _number(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value else None  # NaN: none


def _top(row: dict[str, str]) -> tuple[tuple[str, float], ...]:
    top = []
    rank = 1
    while f"top{rank}_class" in row:
        name = row[f"top{rank}_class"]
        probability = _number(row.get(f"top{rank}_prob"))
        if name and probability is not None:
            top.append((name, probability))
        rank += 1
    return tuple(top)


def row_answer(row: dict[str, str]) -> Answer:
    """The machine's answer of a results or events row (the decision order's ``label`` when the run wrote one)."""
    (label, probability) = answer_of(row)
    return Answer(
        label=label or "uncertain",
        rank=row.get("rank", "") or ("species" if row.get("label") == row.get("top1_class") and label else ""),
        probability=_number(probability),
        top=_top(row),
        unknown_score=_number(row.get("unknown_score")),
    )


def _photo(row: dict[str, str], resolve: Any, size: tuple[int, int] | None = None) -> Photo:
    (file, missing) = resolve(row["path"])
    return Photo(row["path"], file, missing, row.get("exif_datetime", ""), size)


def _photo_unit(row: dict[str, str], resolve: Any) -> ReviewUnit:
    photo = _photo(row, resolve)
    return ReviewUnit(row["path"], KIND_PHOTO, photo_folder(row["path"]), photo.taken, [photo], row_answer(row))


def _event_units(events: list[dict[str, str]], rows: list[dict[str, str]], resolve: Any) -> list[ReviewUnit]:
    members: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        members.setdefault(row.get("event_id", ""), []).append(row)
    units = []
    for event in events:
        photo_rows = sorted(members.get(event["event_id"], []), key=lambda r: (r.get("exif_datetime", ""), r["path"]))
        if not photo_rows:
            continue  # an event of photos no longer in the results
        photos = [_photo(row, resolve) for row in photo_rows]
        answer = row_answer(event)
        scores = [a.unknown_score for a in (row_answer(row) for row in photo_rows) if a.unknown_score is not None]
        if scores:  # an event has no unknown score of its own: its photos' highest
            answer = Answer(answer.label, answer.rank, answer.probability, answer.top, max(scores))
        camera = event.get("camera") or photo_folder(photo_rows[0]["path"])
        units.append(ReviewUnit(event["event_id"], KIND_EVENT, camera, event.get("start", ""), photos, answer))
    return units


def _box_units(rows: list[dict[str, str]], resolve: Any, sizes: dict[str, tuple[int, int]]) -> list[ReviewUnit]:
    by_photo: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_photo.setdefault(row["path"], []).append(row)
    units = []
    for path, photo_rows in by_photo.items():
        photo = _photo(photo_rows[0], resolve, sizes.get(path))
        boxes = []
        whole: Answer | None = None
        for row in photo_rows:
            source = row.get("source")
            if source == SOURCE_WHOLE_IMAGE:
                whole = row_answer(row)
            elif source and (_number(row.get("detections")) or 0) > 0 and row.get("box", "") != "":
                (x1, y1, x2, y2) = (_number(row.get(name)) or 0.0 for name in ("x1", "y1", "x2", "y2"))
                score = _number(row.get("det_score")) or 0.0
                # A person or a vehicle of a --boxes file was never classified: it is what the file says it is
                answer = Answer(box_observation(row)[0]) if source == SOURCE_PASSED else row_answer(row)
                boxes.append(Box(0, int(float(row["box"])), (x1, y1, x2, y2), score, answer))
            # (a box of the file below --det-threshold has no source: not one of the run's boxes)
        boxes.sort(key=lambda box: box.index)
        if whole is not None:
            answer = whole
        elif boxes:
            best = max(boxes, key=lambda box: box.answer.sureness)
            answer = best.answer
        else:
            answer = Answer(BLANK)  # the detector found nothing
        units.append(ReviewUnit(path, KIND_PHOTO, photo_folder(path), photo.taken, [photo], answer, boxes))
    return units


def _class_names(
    directory: Path, settings: dict[str, Any], header: Sequence[str], rows: Iterable[dict[str, str]]
) -> list[str]:
    """The run's classes: the probabilities table's columns, the ``--species`` list, a safetensors model's
    metadata (read without its weights), else as far as the top-k columns name them."""
    for table in ("probabilities", "logits"):
        path = find_table(directory, table, settings.get("format"))
        if path is not None:
            names = _table_header(path)[1:]
            if names:
                return names
    if isinstance(settings.get("species"), list) and settings["species"]:
        return [str(name) for name in settings["species"]]
    names = _safetensors_classes(settings.get("weights"))
    if names:
        return names
    found: dict[str, None] = {}
    columns = [name for name in header if name.startswith("top") and name.endswith("_class")]
    for row in rows:
        for column in columns:
            if row.get(column):
                found[row[column]] = None
    return sorted(found)


def _table_header(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return read_csv_table(path)[0]


def _safetensors_classes(weights: Any) -> list[str]:
    if not weights or not str(weights).endswith(".safetensors") or not Path(weights).is_file():
        return []
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get("class_to_idx")
        class_to_idx = json.loads(raw) if raw else {}
        return sorted(class_to_idx, key=class_to_idx.__getitem__)
    except Exception:
        return []

"""The decisions of a review, flowing on: human observations in the Camtrap DP export, reviewed photos for
``birder-calibrate --val RESULTS_DIR/reviews.csv``, crops and splits for ``birder-train --train-csv``.

What a unit's reviewed answer is: the decision that counts for it (the latest not undone, of any reviewer;
:meth:`birder.review.store.ReviewState.current`). Every reviewer's own latest decision becomes a human
observation in the export (``classificationMethod`` human, ``classifiedBy`` the reviewer), beside the machine's.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from birder.errors import BirderError
from birder.inference.labeled import LabeledPhotos, labeled_photos
from birder.review.folder import BLANK, UNKNOWN, ReviewFolder, ReviewUnit, model_identity, read_review_folder
from birder.review.store import COLUMNS, REVIEWS_FILE, ReviewStore, Submission, read_reviews

logger = logging.getLogger(__name__)

RANKS = ("species", "genus", "family", "order")


@dataclass
class Reviewed:
    """A results folder with its decisions (read only)."""

    folder: ReviewFolder
    store: ReviewStore | None

    @property
    def current(self) -> dict[str, Submission]:
        return self.store.state.current() if self.store is not None else {}

    @property
    def by_reviewer(self) -> dict[tuple[str, str], Submission]:
        return self.store.state.current_by_reviewer() if self.store is not None else {}


def read_reviewed(results_dir: str | os.PathLike, reviews: str | os.PathLike | None = None) -> Reviewed:
    """A results folder and its ``reviews.csv`` (or ``reviews``); decisions on another model are refused."""
    folder = read_review_folder(results_dir)
    path = Path(reviews) if reviews is not None else Path(results_dir) / REVIEWS_FILE
    return Reviewed(folder, read_reviews(path, folder.model))


def is_reviews_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``reviews.csv`` of birder-review (by its header)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), []) == list(COLUMNS)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Camtrap DP: human observations beside the machine's
# ---------------------------------------------------------------------------------------------------------------------


def _timestamp(text: str) -> str:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return ""
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat()


def _observation_type(label: str) -> str:
    if label == BLANK:
        return "blank"
    if label in (UNKNOWN, "uncertain", ""):
        return "unknown"
    return "animal"


def human_observations(
    results: Any, machine_rows: Sequence[Sequence[str]], columns: Sequence[str], root: str
) -> list[list[str]]:
    """Camtrap DP observation rows of the reviewers' decisions on ``results`` (a
    :class:`birder.geo.results.ResultsFolder`), one per unit and reviewer (per box, for boxes), placed like the
    machine's rows of the same event or photo (``machine_rows``, in ``columns``). No ``reviews.csv``: none."""
    from birder.geo.results import relative_path

    store = read_reviews(Path(results.directory) / REVIEWS_FILE, model_identity(results.settings))
    if store is None:
        return []
    folder = read_review_folder(results.directory)
    position = {name: index for (index, name) in enumerate(columns)}
    events: dict[str, Sequence[str]] = {}
    media: dict[str, Sequence[str]] = {}
    for row in machine_rows:
        if row[position["observationLevel"]] == "event":
            events[row[position["eventID"]]] = row
        elif row[position["mediaID"]]:
            media.setdefault(row[position["mediaID"]], row)

    rows = []
    for (unit_id, _), submission in sorted(store.state.current_by_reviewer().items(), key=lambda i: i[1].sequence):
        unit = folder.unit(unit_id)
        if unit is None:
            continue
        template = events.get(unit_id) if unit.kind == "event" else media.get(relative_path(unit.photos[0].path, root))
        if template is None:
            continue  # no media row (a photo without an EXIF time): no observation to place it beside
        labels = [label for label in submission.labels if label.box] if unit.boxes else [submission.whole]
        for label in labels:
            if label is None:
                continue
            values = {name: template[index] for (name, index) in position.items()}
            kind = _observation_type(label.label)
            count = label.count
            values.update(
                observationType=kind,
                scientificName=label.label if kind == "animal" else "",
                count=str(count) if kind == "animal" and count else "",
                classificationMethod="human",
                classifiedBy=submission.reviewer,
                classificationTimestamp=_timestamp(submission.time),
                classificationProbability="",
                observationComments=submission.comment,
                **_bbox(unit, label.box),
            )
            rows.append([values.get(name, "") for name in columns])
    return rows


def _bbox(unit: ReviewUnit, key: str) -> dict[str, str]:
    box = next((box for box in unit.boxes if box.key == key), None)
    size = unit.photos[0].size if box is not None else None
    if box is None or not size:
        return {}
    (x1, y1, x2, y2) = box.xyxy
    (width, height) = size
    return {
        "bboxX": f"{max(x1, 0.0) / width:.6f}",
        "bboxY": f"{max(y1, 0.0) / height:.6f}",
        "bboxWidth": f"{max(min(x2, width) - max(x1, 0.0), 1e-6) / width:.6f}",
        "bboxHeight": f"{max(min(y2, height) - max(y1, 0.0), 1e-6) / height:.6f}",
    }


def reviewed_answer_note(rows: Sequence[Sequence[str]], columns: Sequence[str]) -> list[str]:
    """The export's line about the human observations it holds (none: no line)."""
    method = columns.index("classificationMethod")
    people = columns.index("classifiedBy")
    human = [row for row in rows if row[method] == "human"]
    if not human:
        return []
    reviewers = len({row[people] for row in human})
    return [f"Camtrap DP: {len(human)} human observations by {reviewers} reviewer(s) beside the machine's"]


# ---------------------------------------------------------------------------------------------------------------------
# Reviewed photos as labelled data
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LabelledPhotos:
    """Whole photos with the label a person gave (calibration), and what was left out and why."""

    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, count: int = 1) -> None:
        self.left_out[reason] = self.left_out.get(reason, 0) + count


def reviewed_photos(reviewed: Reviewed, class_names: Sequence[str] | None = None) -> LabelledPhotos:
    """Every photo of a decided unit whose decision names one species (of ``class_names``, when given): an
    event's photos all take its label. Boxes need crops (``review-crops``): they are left out here."""
    classes = set(class_names) if class_names is not None else None
    found = LabelledPhotos()
    for unit in reviewed.folder.units:
        submission = reviewed.current.get(unit.unit_id)
        if submission is None:
            continue
        if unit.boxes:
            found.skip("photos with boxes (crop them: python -m birder.tools review-crops)")
            continue
        whole = submission.whole
        label = whole.label if whole is not None else ""
        if label in (BLANK, UNKNOWN, ""):
            found.skip(f"decided {label or 'without a label'}")
            continue
        if classes is not None and label not in classes:
            found.skip("labels the model does not have")
            continue
        for photo in unit.photos:
            if photo.missing:
                found.skip("photos missing since the run")
                continue
            found.paths.append(str(photo.file))
            found.labels.append(label)
    return found


def labeled_from_reviews(path: str | os.PathLike, class_to_idx: Mapping[str, int]) -> tuple[list[Path], list[int]]:
    """``birder-calibrate --val RESULTS_DIR/reviews.csv``: the reviewed photos of that folder with the model's
    class indices (what is left out is said in one warning line)."""
    path = Path(path)
    reviewed = read_reviewed(path.parent, path)
    photos = reviewed_photos(reviewed, list(class_to_idx))
    if photos.left_out:
        said = ", ".join(f"{count} {reason}" for (reason, count) in sorted(photos.left_out.items()))
        logger.warning("%s: left out of the labelled photos: %s", path, said)
    if not photos.paths:
        raise BirderError(f"{path}: no reviewed photo names one of the model's species (review more, or crop boxes)")
    return ([Path(p) for p in photos.paths], [class_to_idx[label] for label in photos.labels])


# ---------------------------------------------------------------------------------------------------------------------
# Crops and splits for birder-train
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class CropsReport:
    train_csv: Path
    val_csv: Path
    train: int
    val: int
    crops: int
    cameras: tuple[int, int]  # (train, val)
    left_out: dict[str, int]


def camera_split(cameras: Sequence[str], val_share: float, seed: int) -> set[str]:
    """The cameras of the validation split: whole cameras, drawn in a seeded order until about ``val_share`` of
    the cameras are in (at least one when there are two or more)."""
    names = sorted(set(cameras))
    if len(names) < 2 or val_share <= 0:
        return set()
    order = np.random.default_rng(seed).permutation(len(names))
    wanted = min(len(names) - 1, max(1, round(len(names) * val_share)))
    return {names[i] for i in order[:wanted]}


def write_review_crops(
    results_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    val_share: float = 0.2,
    margin: float = 0.1,
    seed: int = 0,
    reviews: str | os.PathLike | None = None,
    reviewed: Reviewed | None = None,
) -> CropsReport:
    """Write the reviewed animals as labelled images for ``birder-train --train-csv train.csv --val-csv val.csv``:
    each reviewed box cropped (with ``margin``) to ``output_dir/crops/``, each reviewed photo without boxes as
    itself; whole cameras in one split, so the validation figures speak of cameras the model did not adapt to.
    ``reviewed``: the folder and its decisions already read (:func:`read_reviewed`), else read here."""
    from birder.inference.crops import crop_box
    from birder.inference.tables import photo_file_stem
    from birder.io.atomic import atomic_write_path
    from birder.io.images import load_image

    if not 0.0 <= val_share < 1.0:
        raise BirderError(f"--val-share must be in [0, 1), got {val_share}")
    if margin < 0:
        raise BirderError(f"--margin must be a fraction >= 0, got {margin}")
    if reviewed is None:
        reviewed = read_reviewed(results_dir, reviews)
    if reviewed.store is None:
        raise BirderError(f"'{results_dir}' has no reviews.csv yet: review some photos with birder-review first")
    output_dir = Path(output_dir)
    crops_dir = output_dir / "crops"
    samples: list[tuple[str, str, str]] = []  # (image path, label, camera)
    left_out: dict[str, int] = {}

    def skip(reason: str) -> None:
        left_out[reason] = left_out.get(reason, 0) + 1

    for unit in reviewed.folder.units:
        submission = reviewed.current.get(unit.unit_id)
        if submission is None:
            continue
        if not unit.boxes:
            whole = submission.whole
            if whole is None or whole.label in (BLANK, UNKNOWN):
                skip("blank or unknown decisions")
                continue
            for photo in unit.photos:
                if photo.missing:
                    skip("photos missing since the run")
                else:
                    samples.append((str(photo.file.resolve()), whole.label, unit.camera))
            continue
        by_box = {label.box: label.label for label in submission.labels if label.box}
        photo = unit.photos[0]
        image = None
        for box in unit.boxes:
            label = by_box.get(box.key)
            if label is None or label in (BLANK, UNKNOWN):
                skip("boxes decided blank or unknown")
                continue
            if photo.missing:
                skip("photos missing since the run")
                continue
            if image is None:
                image = load_image(photo.file)
            crop = crop_box(image, box.xyxy, margin)
            target = crops_dir / label.replace("/", "_") / f"{photo_file_stem(photo.path)}-{box.index}.jpg"
            with atomic_write_path(target) as tmp:
                crop.save(tmp, "JPEG", quality=92)
            samples.append((str(target.resolve()), label, unit.camera))

    if not samples:
        raise BirderError(f"'{results_dir}': no reviewed animal to write (decisions were blank or unknown)")
    val_cameras = camera_split([camera for (_, _, camera) in samples], val_share, seed)
    train = [(path, label) for (path, label, camera) in samples if camera not in val_cameras]
    val = [(path, label) for (path, label, camera) in samples if camera in val_cameras]
    # birder-train takes its classes from train.csv: a validation label it never saw cannot be scored
    train_labels = {label for (_, label) in train}
    unseen = [pair for pair in val if pair[1] not in train_labels]
    if unseen:
        left_out["validation images of a species with no training image"] = len(unseen)
        val = [pair for pair in val if pair[1] in train_labels]
    paths = (output_dir / "train.csv", output_dir / "val.csv")
    for path, rows in zip(paths, (train, val), strict=True):
        with atomic_write_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["path", "label"])
            writer.writerows(rows)
    cameras = {camera for (_, _, camera) in samples}
    return CropsReport(
        paths[0],
        paths[1],
        len(train),
        len(val),
        sum(1 for (path, _, _) in samples if Path(path).is_relative_to(crops_dir.resolve())),
        (len(cameras - val_cameras), len(cameras & val_cameras)),
        left_out,
    )


def labeled_or_reviewed_photos(data: str | os.PathLike, class_to_idx: Mapping[str, int]) -> LabeledPhotos:
    """:func:`~birder.inference.labeled.labeled_photos`, or, for a birder-review decisions file (``reviews.csv``),
    the photos people labelled: what ``birder-calibrate --val`` and ``birder-eval`` read."""
    if Path(data).suffix.lower() == ".csv" and is_reviews_file(data):
        return LabeledPhotos(*labeled_from_reviews(data, class_to_idx))
    return labeled_photos(data, class_to_idx)

"""The boxes a user already has, read for a crop-then-classify run (``birder-predict --boxes FILE``).

Three kinds of file are read, told apart by their content:

- a **MegaDetector batch output**, format 1.x, as MegaDetector, AddaxAI and SpeciesNet's ensemble write it:
  ``images`` of ``{"file", "detections": [{"category", "conf", "bbox"}]}`` (or ``"failure"``),
  ``detection_categories`` (``{"1": "animal", "2": "person", "3": "vehicle"}``), ``bbox`` normalised
  ``[x, y, width, height]`` from the top-left;
- a **SpeciesNet predictions** JSON: ``predictions`` of ``{"filepath", "detections": [{"category", "label",
  "conf", "bbox"}]}`` (boxes as MegaDetector's), ``failures`` (a list) where a step failed;
- a **COCO / COCO Camera Traps** file: ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations``
  (``image_id``, ``category_id``, ``bbox`` ``[x, y, width, height]`` in pixels, optional ``score``; one without a
  box is an image-level label and gives no detection), ``categories`` (``id``, ``name``).

Each photo's path is resolved against a root folder (``--boxes-root``, else the folder of the run's photos:
:func:`boxes_root`) and matched to the run's photos by the exact path once normalised (``\\`` taken as ``/``);
the paths that match no photo are returned so the run can list them. Each detection keeps its place in the file,
its category, confidence and box (as given and normalised), and :func:`split_detections` says which are animals
to crop and classify and which pass through untouched. The parsed document is kept whole (:attr:`BoxFile.document`)
so that :func:`birder.inference.crops.md_with_classifications` can write it back with the species added.

What makes the file unusable (not JSON, none of the three kinds, a missing key, a box outside the photo, a
non-numeric value, a category the file does not define) is one :class:`~birder.errors.BirderError` line naming the
file and the entry.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from birder.errors import BirderError, one_line

BoxKind = Literal["megadetector", "speciesnet", "coco"]
MEGADETECTOR: BoxKind = "megadetector"
SPECIESNET: BoxKind = "speciesnet"
COCO: BoxKind = "coco"
KIND_NAMES = {MEGADETECTOR: "MegaDetector batch output", SPECIESNET: "SpeciesNet predictions", COCO: "COCO"}

# Detection categories that are no animal: people, vehicles, empty frames (MegaDetector's person/vehicle, SpeciesNet's
# human/vehicle, COCO Camera Traps' empty/human...). Every other category of a file is an animal's.
NOT_ANIMAL_NAMES = frozenset(
    {
        "person",
        "people",
        "human",
        "humans",
        "vehicle",
        "vehicles",
        "car",
        "empty",
        "blank",
        "nothing",
        "unknown",
        "whole_image_classification",  # SpeciesNet's whole-image pseudo-detection, as MegaDetector's tools name it
    }
)
# How far a box may overhang its photo before the file is refused: normalised boxes are rounded (MegaDetector writes
# 4 decimals), pixel boxes rounded outwards by annotation tools
NORMALISED_TOLERANCE = 1e-3
PIXEL_TOLERANCE = 1.0
# COCO ground-truth boxes have no confidence: they are taken as certain
COCO_DEFAULT_CONF = 1.0
MD_FORMAT_VERSION = "1.4"  # of the batch output built from a SpeciesNet or COCO file

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class BoxDetection:
    """One detection of a photo, as the file gives it."""

    index: int  # its place among the photo's detections in the file (COCO: among its annotations with a box)
    category_id: str
    category: str  # the category's name
    conf: float
    bbox_given: Box  # x, y, width, height as written (pixels for COCO, else fractions of the photo)
    bbox: Box  # x, y, width, height as fractions of the photo, top-left origin, clipped to [0, 1]

    def pixel_box(self, size: tuple[int, int]) -> Box:
        """``x1, y1, x2, y2`` in the pixels of a photo of ``size`` ``(width, height)``, as
        :func:`birder.inference.crops.crop_box` takes it."""
        (width, height) = size
        (x, y, w, h) = self.bbox
        return (x * width, y * height, (x + w) * width, (y + h) * height)


@dataclass(frozen=True)
class PhotoBoxes:
    """A photo's entry in the file."""

    entry: int  # its place in the file's list of photos (``images`` or ``predictions``)
    file: str  # the path as the file writes it
    path: str  # the path resolved against the root folder, normalised (absolute)
    detections: tuple[BoxDetection, ...]
    failure: str | None = None  # the file says the photo could not be processed (then no detections)


@dataclass
class BoxFile:
    """A boxes file, read."""

    source: Path
    kind: BoxKind
    document: dict[str, Any]  # the parsed JSON, as it was (written back with the species added)
    categories: dict[str, str]  # detection category id -> name
    photos: list[PhotoBoxes]
    root: Path  # the folder the file's relative paths were resolved against

    @property
    def animal_categories(self) -> frozenset[str]:
        """The ids of the categories to classify: every category not named as people, vehicles or empty."""
        return frozenset(cid for (cid, name) in self.categories.items() if _normal(name) not in NOT_ANIMAL_NAMES)

    def match(self, photo_paths: Iterable[str | os.PathLike[str]]) -> MatchedBoxes:
        """:func:`match_photos` of this file."""
        return match_photos(self, photo_paths)

    def megadetector_document(self) -> dict[str, Any]:
        """The file as a MegaDetector batch output, to write back with the species added: a copy of the document
        itself when it is one; else one built from it with the same photos and detections at the same places
        (``images[entry]["detections"][index]``), paths relative to the root where they lie under it."""
        if self.kind == MEGADETECTOR:
            return copy.deepcopy(self.document)
        numeric = all(_is_integer_text(cid) for cid in self.categories)
        category_ids = {cid: (cid if numeric else str(n)) for (n, cid) in enumerate(self.categories, start=1)}
        images: list[dict[str, Any]] = []
        for photo in self.photos:
            relative = Path(os.path.relpath(photo.path, self.root)).as_posix()
            outside = relative == ".." or relative.startswith("../")
            file = photo.file.replace("\\", "/") if outside else relative
            if photo.failure is not None:
                images.append({"file": file, "failure": photo.failure, "detections": None})
                continue
            detections = [
                {
                    "category": category_ids[d.category_id],
                    "conf": round(float(d.conf), 4),
                    "bbox": [round(float(value), 4) for value in d.bbox],
                }
                for d in photo.detections
            ]
            images.append({"file": file, "detections": detections})
        try:  # the detections were done by the time their file was written
            done = datetime.fromtimestamp(self.source.stat().st_mtime, UTC)
        except OSError:
            done = datetime.now(UTC)
        info = {
            "format_version": MD_FORMAT_VERSION,
            "detector": f"{KIND_NAMES[self.kind]} {self.source.name}",
            "detection_completion_time": done.strftime("%Y-%m-%d %H:%M:%S"),
        }
        return {
            "info": info,
            "detection_categories": {category_ids[cid]: name for (cid, name) in self.categories.items()},
            "images": images,
        }


@dataclass
class MatchedBoxes:
    """The file's photos matched to a run's photos."""

    by_photo: dict[str, PhotoBoxes]  # the run's photo path (as given to match_photos) -> its entry in the file
    unmatched: list[str]  # the file's paths (as written) that match no photo of the run, in the file's order


@dataclass(frozen=True)
class DetectionSplit:
    """A photo's detections: those to crop and classify, and those that pass through untouched."""

    classify: tuple[BoxDetection, ...]  # animals at or above the threshold, in the file's order
    passed: tuple[BoxDetection, ...]  # people, vehicles, detections below the threshold


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def read_box_file(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> BoxFile:
    """Read the boxes file at ``path`` (any of the module's three kinds), its photo paths resolved against ``root``
    (:func:`boxes_root`); a BirderError line naming the file when it is none of them or is malformed."""
    source = Path(path)
    try:
        document = json.loads(source.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise BirderError(f"boxes file '{source}' does not exist") from None
    except IsADirectoryError:
        raise BirderError(f"boxes file '{source}' is a folder: give the JSON file of the boxes") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BirderError(f"boxes file '{source}' is not readable JSON ({one_line(err, 200)})") from None
    kind = detect_kind(document)
    if kind is None:
        raise BirderError(
            f"boxes file '{source}' is none of a MegaDetector batch output (images, detection_categories), SpeciesNet "
            "predictions (predictions) or COCO boxes (images, annotations, categories)"
        )
    reader = _Reader(source, Path(os.path.abspath(root)))
    if kind == MEGADETECTOR:
        (categories, photos) = reader.megadetector(document)
    elif kind == SPECIESNET:
        (categories, photos) = reader.speciesnet(document)
    else:
        (categories, photos) = reader.coco(document)
    seen: dict[str, str] = {}
    for photo in photos:
        if photo.path in seen:
            raise BirderError(
                f"boxes file '{source}' lists the photo '{_shown(photo.file)}' twice (also as "
                f"'{_shown(seen[photo.path])}'): keep one entry per photo"
            )
        seen[photo.path] = photo.file
    return BoxFile(source, kind, document, categories, photos, reader.root)


def detect_kind(document: Any) -> BoxKind | None:
    """Which of the three kinds a parsed document is, by its keys; None: none of them."""
    if not isinstance(document, dict):
        return None
    if "images" in document and "detection_categories" in document:
        return MEGADETECTOR
    if "predictions" in document and "images" not in document:
        return SPECIESNET
    if "images" in document and "annotations" in document and "categories" in document:
        return COCO
    return None


def boxes_root(
    boxes_root_option: str | os.PathLike[str] | None,
    inputs: Sequence[str | os.PathLike[str]],
    photo_paths: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """The folder the file's relative paths start from: ``--boxes-root`` when given, else the one input folder,
    else the deepest folder holding every photo (as the run's own md-json export makes its paths relative)."""
    if boxes_root_option is not None:
        root = Path(boxes_root_option)
        if not root.is_dir():
            raise BirderError(f"--boxes-root '{root}' is not a folder")
        return Path(os.path.abspath(root))
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        return Path(os.path.abspath(inputs[0]))
    folders = [os.path.dirname(os.path.abspath(path)) for path in photo_paths]
    if not folders:
        folders = [os.path.abspath(item if Path(item).is_dir() else os.path.dirname(item) or ".") for item in inputs]
    if not folders:
        return Path(os.path.abspath("."))
    try:
        return Path(os.path.commonpath(folders))
    except ValueError:  # paths on different drives (Windows): no common folder
        raise BirderError(
            "the photos have no common folder: give --boxes-root, the folder the file's paths start from"
        ) from None


def match_photos(box_file: BoxFile, photo_paths: Iterable[str | os.PathLike[str]]) -> MatchedBoxes:
    """Each of the run's ``photo_paths`` (as the run names them) -> its entry in the file, by the exact path once both
    are normalised; the file's paths that match no photo, in the file's order."""
    by_path = {photo.path: photo for photo in box_file.photos}
    by_photo: dict[str, PhotoBoxes] = {}
    matched: set[str] = set()
    for photo_path in photo_paths:
        key = normal_path(photo_path)
        found = by_path.get(key)
        if found is not None:
            by_photo[os.fspath(photo_path)] = found
            matched.add(key)
    unmatched = [photo.file for photo in box_file.photos if photo.path not in matched]
    return MatchedBoxes(by_photo, unmatched)


def normal_path(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """``path`` (``\\`` read as ``/``) made absolute against ``root`` (default: the current folder) and normalised
    (``.`` and ``..`` removed, one separator): the key photos are matched by."""
    text = os.fspath(path).replace("\\", "/")
    if root is not None:
        text = os.path.join(os.fspath(root), text)
    return os.path.normpath(os.path.abspath(text))


def split_detections(photo: PhotoBoxes, threshold: float, animal_categories: Collection[str]) -> DetectionSplit:
    """``photo``'s detections to crop and classify (a category of ``animal_categories``, usually
    :attr:`BoxFile.animal_categories`, with ``conf`` at or above ``threshold``) and those that pass through."""
    classify = [d for d in photo.detections if d.category_id in animal_categories and d.conf >= threshold]
    chosen = {d.index for d in classify}
    return DetectionSplit(tuple(classify), tuple(d for d in photo.detections if d.index not in chosen))


# ---------------------------------------------------------------------------------------------------------------------
# The three kinds
# ---------------------------------------------------------------------------------------------------------------------


def _normal(name: Any) -> str:
    return str(name).strip().lower()


def _shown(item: Any, limit: int = 80) -> str:
    """An item of the file as a message shows it: on one line, cut short."""
    text = item if isinstance(item, str) else json.dumps(item, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _value(item: Any) -> str:
    """A value of the file as a message shows it: as JSON (a text in quotes), on one line, cut short."""
    return _shown(json.dumps(item, default=str))


def _number(value: Any) -> float | None:
    """A finite JSON number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None


class _Reader:
    def __init__(self, source: Path, root: Path) -> None:
        (self.source, self.root) = (source, root)

    def error(self, where: str, problem: str) -> BirderError:
        return BirderError(f"boxes file '{self.source}' ({where}): {problem}")

    def _list(self, document: Mapping[str, Any], key: str, kind: BoxKind) -> list[Any]:
        value = document.get(key)
        if not isinstance(value, list):
            raise BirderError(
                f"boxes file '{self.source}' is not a {KIND_NAMES[kind]}: '{key}' must be a list, found "
                f"{type(value).__name__ if key in document else 'none'}"
            )
        return value

    def _file(self, value: Any, where: str, key: str) -> tuple[str, str]:
        if not isinstance(value, str) or not value.strip():
            raise self.error(where, f"'{key}' must be the photo's path, found {_value(value)}")
        return (value, normal_path(value, self.root))

    def _photo_entries(
        self, items: list[Any], key: str, what: str, file_key: str
    ) -> Iterator[tuple[int, dict[str, Any], str, str, str]]:
        """``(entry, item, where, file as written, normalised path)`` of each photo entry of the list ``key``,
        each checked to be an object naming its file under ``file_key``."""
        for entry, item in enumerate(items):
            where = f"{key}[{entry}]"
            if not isinstance(item, dict):
                raise self.error(where, f"{what} must be an object, found {_value(item)}")
            if file_key not in item:
                raise self.error(where, f"{what} without '{file_key}'")
            (file, path) = self._file(item[file_key], where, file_key)
            yield (entry, item, f"{key}[{entry}] '{_shown(file)}'", file, path)

    def _check_version(self, document: Mapping[str, Any]) -> None:
        info = document.get("info")
        if info is None:
            return
        if not isinstance(info, dict):
            raise self.error("info", f"'info' must be an object, found {_value(info)}")
        version = info.get("format_version")
        if version is not None and not str(version).strip().startswith("1"):
            raise self.error("info", f"format_version {_value(version)} is not 1.x, the version read here")

    def _categories(self, value: Any, where: str) -> dict[str, str]:
        if not isinstance(value, dict) or not all(isinstance(name, str) for name in value.values()):
            raise self.error(where, f"must map category ids to names, found {_value(value)}")
        return {str(key): name for (key, name) in value.items()}

    def _detection(
        self, value: Any, index: int, where: str, categories: Mapping[str, str], label_key: str | None = None
    ) -> BoxDetection:
        place = f"{where}, detection {index}"
        if not isinstance(value, dict):
            raise self.error(place, f"a detection must be an object, found {_value(value)}")
        missing = [key for key in ("category", "conf", "bbox", label_key) if key is not None and key not in value]
        if missing:
            raise self.error(place, f"a detection without {', '.join(repr(key) for key in missing)}")
        category_id = value["category"]
        if not isinstance(category_id, str | int) or isinstance(category_id, bool):
            raise self.error(place, f"category {_value(category_id)} is not a category id")
        category_id = str(category_id)
        if label_key is not None:
            name = value[label_key]
            if not isinstance(name, str):
                raise self.error(place, f"'{label_key}' must be a name, found {_value(name)}")
        elif category_id in categories:
            name = categories[category_id]
        else:
            raise self.error(place, f"category '{_shown(category_id)}' is not one of detection_categories")
        conf = _number(value["conf"])
        if conf is None or not 0.0 <= conf <= 1.0:
            raise self.error(place, f"conf {_value(value['conf'])} is not a number from 0 to 1")
        bbox = self._normalised_box(value["bbox"], place)
        return BoxDetection(index, category_id, name, conf, bbox, _clipped(bbox))

    def _normalised_box(self, value: Any, place: str) -> Box:
        numbers = [_number(item) for item in value] if isinstance(value, list) else []
        if len(numbers) != 4 or any(number is None for number in numbers):
            raise self.error(place, f"bbox {_value(value)} is not four numbers [x, y, width, height]")
        (x, y, w, h) = numbers
        low = -NORMALISED_TOLERANCE
        high = 1.0 + NORMALISED_TOLERANCE
        if not (low <= x <= high and low <= y <= high and w >= 0 and h >= 0 and x + w <= high and y + h <= high):
            raise self.error(place, f"bbox {_value(value)} is not inside [0, 1] (x, y, width, height, normalised)")
        return (x, y, w, h)

    def megadetector(self, document: dict[str, Any]) -> tuple[dict[str, str], list[PhotoBoxes]]:
        self._check_version(document)
        images = self._list(document, "images", MEGADETECTOR)
        categories = self._categories(document["detection_categories"], "detection_categories")
        if "classification_categories" in document:
            self._categories(document["classification_categories"], "classification_categories")
        photos = []
        for entry, image, where, file, path in self._photo_entries(images, "images", "an image entry", "file"):
            failure = image.get("failure")
            detections = image.get("detections")
            if failure is not None:
                if detections:
                    raise self.error(where, "a failed image (failure) with detections")
                photos.append(PhotoBoxes(entry, file, path, (), one_line(str(failure))))
                continue
            if not isinstance(detections, list):
                raise self.error(where, f"'detections' must be a list, found {_value(detections)}")
            found = tuple(self._detection(d, n, where, categories) for (n, d) in enumerate(detections))
            photos.append(PhotoBoxes(entry, file, path, found))
        return (categories, photos)

    def speciesnet(self, document: dict[str, Any]) -> tuple[dict[str, str], list[PhotoBoxes]]:
        predictions = self._list(document, "predictions", SPECIESNET)
        categories: dict[str, str] = {}
        photos = []
        for entry, prediction, where, file, path in self._photo_entries(
            predictions, "predictions", "a prediction", "filepath"
        ):
            failures = prediction.get("failures")
            if failures is not None and not (
                isinstance(failures, list) and all(isinstance(item, str) for item in failures)
            ):
                raise self.error(where, f"'failures' must be a list of steps, found {_value(failures)}")
            detections = prediction.get("detections")
            if detections is None:
                # SpeciesNet leaves the detections out where its detector failed on the photo
                failure = ", ".join(failures) if failures else "no detections (the detector did not run)"
                photos.append(PhotoBoxes(entry, file, path, (), one_line(failure)))
                continue
            if not isinstance(detections, list):
                raise self.error(where, f"'detections' must be a list, found {_value(detections)}")
            found = tuple(self._detection(d, n, where, categories, "label") for (n, d) in enumerate(detections))
            for detection in found:
                known = categories.setdefault(detection.category_id, detection.category)
                if known != detection.category:
                    raise self.error(
                        where,
                        f"category '{_shown(detection.category_id)}' is labelled both '{_shown(known)}' and "
                        f"'{_shown(detection.category)}'",
                    )
            photos.append(PhotoBoxes(entry, file, path, found))
        return (categories, photos)

    def coco(self, document: dict[str, Any]) -> tuple[dict[str, str], list[PhotoBoxes]]:
        images = self._list(document, "images", COCO)
        annotations = self._list(document, "annotations", COCO)
        categories: dict[str, str] = {}
        for number, category in enumerate(self._list(document, "categories", COCO)):
            where = f"categories[{number}]"
            if not isinstance(category, dict) or "id" not in category or not isinstance(category.get("name"), str):
                raise self.error(where, f"a category needs an 'id' and a 'name', found {_value(category)}")
            categories[_id_text(category["id"], self, where)] = category["name"]
        entries: dict[str, tuple[int, dict[str, Any]]] = {}
        for entry, image in enumerate(images):
            where = f"images[{entry}]"
            if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
                raise self.error(where, f"an image needs an 'id' and a 'file_name', found {_value(image)}")
            image_id = _id_text(image["id"], self, where)
            if image_id in entries:
                raise self.error(where, f"image id '{_shown(image_id)}' is listed twice")
            entries[image_id] = (entry, image)
        boxes: dict[str, list[BoxDetection]] = {image_id: [] for image_id in entries}
        for number, annotation in enumerate(annotations):
            where = f"annotations[{number}]"
            if not isinstance(annotation, dict):
                raise self.error(where, f"an annotation must be an object, found {_value(annotation)}")
            if annotation.get("bbox") is None:
                continue  # an image-level label: no box
            missing = [key for key in ("image_id", "category_id") if key not in annotation]
            if missing:
                raise self.error(where, f"an annotation without {', '.join(repr(key) for key in missing)}")
            image_id = _id_text(annotation["image_id"], self, where)
            if image_id not in entries:
                raise self.error(where, f"image_id '{_shown(image_id)}' names no image of the file")
            category_id = _id_text(annotation["category_id"], self, where)
            if category_id not in categories:
                raise self.error(where, f"category_id '{_shown(category_id)}' names no category of the file")
            image = entries[image_id][1]
            size = (_number(image.get("width")), _number(image.get("height")))
            if size[0] is None or size[1] is None or size[0] <= 0 or size[1] <= 0:
                raise self.error(
                    f"images[{entries[image_id][0]}]",
                    f"an image with boxes needs its 'width' and 'height' in pixels, found {_value(image)}",
                )
            conf = COCO_DEFAULT_CONF
            if "score" in annotation:  # COCO detection results carry a score
                conf = _number(annotation["score"])
                if conf is None or not 0.0 <= conf <= 1.0:
                    raise self.error(where, f"score {_value(annotation['score'])} is not a number from 0 to 1")
            given = self._pixel_box(annotation["bbox"], size, where)
            normalised = (given[0] / size[0], given[1] / size[1], given[2] / size[0], given[3] / size[1])
            found = boxes[image_id]
            found.append(
                BoxDetection(len(found), category_id, categories[category_id], conf, given, _clipped(normalised))
            )
        photos = []
        for image_id, (entry, image) in entries.items():
            (file, path) = self._file(image["file_name"], f"images[{entry}]", "file_name")
            photos.append(PhotoBoxes(entry, file, path, tuple(boxes[image_id])))
        return (categories, photos)

    def _pixel_box(self, value: Any, size: tuple[float, float], place: str) -> Box:
        numbers = [_number(item) for item in value] if isinstance(value, list) else []
        if len(numbers) != 4 or any(number is None for number in numbers):
            raise self.error(place, f"bbox {_value(value)} is not four numbers [x, y, width, height]")
        (x, y, w, h) = numbers
        (width, height) = size
        low = -PIXEL_TOLERANCE
        if not (low <= x and low <= y and w >= 0 and h >= 0 and x + w <= width + 1 and y + h <= height + 1):
            raise self.error(place, f"bbox {_value(value)} is not inside its {width:g} x {height:g} px image")
        return (x, y, w, h)


def _id_text(value: Any, reader: _Reader, where: str) -> str:
    """A COCO id (an integer or a string) as text: the one spelling ids are matched by."""
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise reader.error(where, f"id {_value(value)} is neither a number nor a string")
    if isinstance(value, float):
        if not value.is_integer():
            raise reader.error(where, f"id {_value(value)} is not a whole number")
        value = int(value)
    return str(value)


def _is_integer_text(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _clipped(box: Box) -> Box:
    """A normalised box within the photo (the file's rounding may overhang it by the tolerance)."""
    (x, y, w, h) = box
    if x >= 0.0 and y >= 0.0 and x + w <= 1.0 and y + h <= 1.0:
        return box  # as written (no arithmetic: no rounding)
    (x1, y1) = (min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0))
    (x2, y2) = (min(max(x + w, 0.0), 1.0), min(max(y + h, 0.0), 1.0))
    return (x1, y1, x2 - x1, y2 - y1)

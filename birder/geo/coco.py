"""COCO Camera Traps export: one JSON file of images, categories and image-level annotations.

The facts are in docs/compatibility.md ("Camera-trap export formats"). Images are the photos of the results folder
(``id`` and ``file_name``: the path relative to the photos' common folder; ``width``/``height`` read from the file
header; ``location``: the camera folder; ``datetime``: the EXIF time; with events, ``seq_id`` = the event and
``seq_num_frames``/``frame_num``). Categories: 0 ``empty`` (the convention), then the predicted species in name
order. Each photo with a species prediction gets one annotation without ``bbox`` (an image-level label, its ``id``
a string as in LILA's files: ``<file_name>#label``); a photo where the model abstained gets none.

A crop-then-classify run (``--detector``) gets an annotation per box instead, with its ``bbox`` ([x, y, width,
height] in the photo's pixels) and its category: the species, or ``unknown`` (the model abstained), ``human`` or
``vehicle`` (the detector's classes); a photo without a box gets one ``empty`` annotation (category 0), as LILA's
files mark empty frames.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from birder.geo.box_events import box_corners, box_observation
from birder.geo.camtrap import ABSTENTIONS, ExportReport
from birder.geo.events import parse_exif_time
from birder.geo.results import ResultsFolder, answer_of, common_root, photo_folder, relative_path
from birder.io.atomic import atomic_write_path

FILE_NAME = "coco-ct.json"


def _image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file header (nothing decoded); None when the file cannot be opened."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _sequences(results: ResultsFolder) -> dict[str, tuple[str, int, int]]:
    """Photo path -> (event id, photos in the event, frame number in time order)."""
    members: dict[str, list[tuple[dt.datetime | None, int, str]]] = {}
    for order, photo in enumerate(results.photos):
        if photo.get("event_id"):
            members.setdefault(photo["event_id"], []).append(
                (parse_exif_time(photo.get("exif_datetime")), order, photo["path"])
            )
    frames = {}
    for event_id, photos in members.items():
        photos.sort(key=lambda item: (item[0] or dt.datetime.min, item[1]))
        for frame, (_, _, path) in enumerate(photos):
            frames[path] = (event_id, len(photos), frame)
    return frames


def export_coco_ct(results: ResultsFolder, output: str | os.PathLike) -> ExportReport:
    """Write the COCO Camera Traps JSON of ``results`` to ``output``."""
    output = Path(output)
    root = common_root([photo["path"] for photo in results.photos])
    sequences = _sequences(results)
    category_ids = {name: number for (number, name) in enumerate(_category_names(results), start=1)}

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    missing = 0
    for photo in results.photos:
        size = results.sizes.get(photo["path"]) or _image_size(photo["path"])
        if size is None:
            missing += 1
            continue
        file_name = relative_path(photo["path"], root)
        image: dict[str, Any] = {
            "id": file_name,
            "file_name": file_name,
            "width": size[0],
            "height": size[1],
            "location": relative_path(photo_folder(photo["path"]), root),
        }
        taken = parse_exif_time(photo.get("exif_datetime"))
        if taken is not None:
            image["datetime"] = taken.strftime("%Y-%m-%d %H:%M:%S")
        if photo["path"] in sequences:
            (seq_id, frames, frame) = sequences[photo["path"]]
            image.update(seq_id=seq_id, seq_num_frames=frames, frame_num=frame)
        images.append(image)
        if results.boxes is not None:
            annotations += _box_annotations(results.boxes.get(photo["path"], []), file_name, category_ids)
        elif answer_of(photo)[0] in category_ids:
            category = category_ids[answer_of(photo)[0]]
            # String ids, as COCO Camera Traps has them (MegaDetector's integrity check refuses integer ones)
            annotation_id = f"{file_name}#label"
            annotations.append({"id": annotation_id, "image_id": file_name, "category_id": category})

    kind = "boxes" if results.boxes is not None else "image-level labels"
    document = {
        "info": {
            "version": "1.0",
            "description": f"birder predictions by {results.model_name} ({kind})",
            "date_created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        },
        "images": images,
        "categories": [{"id": 0, "name": "empty"}, *({"id": i, "name": n} for (n, i) in category_ids.items())],
        "annotations": annotations,
    }
    with atomic_write_path(output) as tmp:
        tmp.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    notes = [f"COCO Camera Traps: {len(images)} images, {len(annotations)} annotations"]
    if missing:
        notes.append(
            f"{missing} photos that cannot be opened left out of the COCO export (width and height need the file)"
        )
    return ExportReport(output, notes)


def _category_names(results: ResultsFolder) -> list[str]:
    """The categories after ``empty``: the species answered, in name order (then, for boxes, the other kinds)."""
    if results.boxes is None:
        return sorted({answer_of(photo)[0] for photo in results.photos} - ABSTENTIONS)
    found = [box_observation(row) for rows in results.boxes.values() for row in rows]
    species = sorted({name for (kind, name, _) in found if kind == "animal"})
    kinds = {kind for (kind, _, _) in found}
    return species + [kind for kind in ("unknown", "human", "vehicle") if kind in kinds]


def _box_annotations(rows: list[dict[str, str]], file_name: str, category_ids: dict[str, int]) -> list[dict[str, Any]]:
    """A photo's annotations: one per box (with ``bbox`` when the row has its corners), or one ``empty``."""
    if not rows:
        return [{"id": f"{file_name}#empty", "image_id": file_name, "category_id": 0}]
    annotations = []
    for number, row in enumerate(rows):
        (kind, name, _) = box_observation(row)
        annotation: dict[str, Any] = {
            "id": f"{file_name}#box{row.get('box') or number}",
            "image_id": file_name,
            "category_id": category_ids[name if kind == "animal" else kind],
        }
        corners = box_corners(row)
        if corners is not None:
            (x1, y1, x2, y2) = corners
            annotation["bbox"] = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
        annotations.append(annotation)
    return annotations

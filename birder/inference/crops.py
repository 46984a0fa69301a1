"""Crop-then-classify building blocks: a detector's boxes as crops for a classifier, and the MegaDetector batch
output (docs/compatibility.md, "MegaDetector batch output") that review tools such as Timelapse read.

``birder-predict --detector`` (:mod:`birder.runs.detect`) and ``birder-serve --detector`` use them.
"""

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image

from birder.inference.detection import infer_image
from birder.io.atomic import atomic_write_path
from birder.io.images import crop_rectangle

MD_FORMAT_VERSION = "1.4"


class DetectedCrop(NamedTuple):
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the photo's pixels (before the margin)
    score: float
    label: int
    crop: Image.Image  # the box grown by the margin, clipped to the photo


def crop_box(photo: Image.Image, box: Sequence[float], margin: float = 0.0) -> Image.Image:
    """The part of ``photo`` inside ``box`` grown by ``margin`` (a fraction of the box's width and height on each
    side: classifiers trained on loose crops want some context), clipped to the photo, at least 1 x 1 px
    (:func:`~birder.io.images.crop_rectangle`, the rectangle reduced decodes cut too)."""
    return photo.crop(crop_rectangle(photo.size, box, margin))


def detect_crops(
    det_net: torch.nn.Module,
    photo: Image.Image,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    threshold: float = 0.5,
    margin: float = 0.1,
) -> list[DetectedCrop]:
    """The detections of ``photo`` scoring at least ``threshold``, best first, each with its crop."""
    result = infer_image(det_net, photo, transform, score_threshold=threshold)
    return [
        DetectedCrop(tuple(box), float(score), int(label), crop_box(photo, box, margin))
        for box, score, label in zip(result.boxes.tolist(), result.scores.tolist(), result.labels.tolist(), strict=True)
    ]


def md_timestamp() -> str:
    """Now, as the batch output's completion times are written (UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def md_detection(
    box: Sequence[float],
    score: float,
    category: str,
    photo_size: tuple[int, int],
    classifications: Sequence[tuple[str, float]] = (),
) -> dict[str, Any]:
    """One MegaDetector detection: ``bbox`` ``[x_min, y_min, width, height]`` normalised by ``photo_size``
    ``(width, height)``; ``classifications`` sorted by score."""
    (width, height) = photo_size
    (x1, y1, x2, y2) = (float(v) for v in box)
    entry: dict[str, Any] = {
        "category": str(category),
        "conf": round(float(score), 4),
        "bbox": [
            round(x1 / width, 4),
            round(y1 / height, 4),
            round((x2 - x1) / width, 4),
            round((y2 - y1) / height, 4),
        ],
    }
    if classifications:
        ranked = sorted(classifications, key=lambda item: item[1], reverse=True)
        entry["classifications"] = [[str(cid), round(float(conf), 4)] for cid, conf in ranked]
    return entry


def md_image(record: Mapping[str, Any]) -> dict[str, Any]:
    """An image record as the format wants it: a failed image carries ``"detections": null`` beside its
    ``failure`` (MegaDetector's validator warns about a failure without it)."""
    image = dict(record)
    if image.get("failure"):
        image["detections"] = None
    return image


def md_taxonomy_description(name: str, lineage: tuple[str, str, str] | None) -> str:
    """A classification category's description in the form SpeciesNet and MegaDetector's classifiers write
    (``id;class;order;family;genus;species;common name``, ranks in lower case), which CamTrapTools reads into a
    scientific name: the species epithet when ``name`` is ``"<genus> <epithet>"``, else the name is kept only as
    the common name and the genus is the most specific rank. ``lineage``: (genus, family, order); None: no ranks."""
    (genus, family, order) = lineage or ("", "", "")
    epithet = ""
    if genus and name.lower().startswith(genus.lower() + " "):
        epithet = name[len(genus) + 1 :].strip()
    fields = ["", "", order, family, genus, epithet]
    return ";".join(field.replace(";", ",").lower() for field in fields) + ";" + name.replace(";", ",")


def md_batch_output(
    images: Sequence[Mapping[str, Any]],
    detection_categories: Mapping[str, str],
    classification_categories: Mapping[str, str] | None = None,
    *,
    detector: str = "birder",
    info: Mapping[str, Any] | None = None,
    classification_descriptions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The whole MegaDetector batch output object; ``images`` are ``{"file", "detections"}`` or ``{"file",
    "failure"}`` records; ``info`` adds keys to the info block (e.g. ``classifier``);
    ``classification_descriptions``: the taxonomy of each classification category (:func:`md_taxonomy_description`)."""
    output: dict[str, Any] = {
        "info": {
            "format_version": MD_FORMAT_VERSION,
            "detector": detector,
            "detection_completion_time": md_timestamp(),
            **(info or {}),
        },
        "detection_categories": {str(key): str(value) for key, value in detection_categories.items()},
        "images": [md_image(image) for image in images],
    }
    if classification_categories:
        output["classification_categories"] = {str(k): str(v) for k, v in classification_categories.items()}
    if classification_descriptions:
        output["classification_category_descriptions"] = {
            str(k): str(v) for k, v in classification_descriptions.items()
        }
    return output


def write_md_json(path: str | Path, output: Mapping[str, Any]) -> Path:
    """Write a batch output atomically (a crash never leaves half a file for a review tool to choke on)."""
    with atomic_write_path(path) as tmp_path:
        tmp_path.write_text(json.dumps(output, indent=1), encoding="utf-8")
    return Path(path)


def md_with_classifications(
    document: Mapping[str, Any],
    classifications: Mapping[tuple[int, int], Sequence[tuple[str, float]]],
    *,
    class_names: Sequence[str] = (),
    descriptions: Mapping[str, str] | None = None,
    classifier: str | None = None,
) -> dict[str, Any]:
    """A MegaDetector batch output written back with species, as MegaDetector's classification step writes them.

    ``classifications``: ``(image entry, detection index)`` (the detection ``document["images"][entry]
    ["detections"][index]``) -> ``(class name, probability)`` pairs, in any order. Each such detection gets
    ``classifications``: ``[class id, probability]`` pairs, best first (replacing any an earlier classifier wrote);
    ``classification_categories`` maps the ids to the names, ``classification_category_descriptions`` gets
    ``descriptions`` (class name -> :func:`md_taxonomy_description`) of the classes used. Ids follow
    ``class_names`` (the model's order), then any other name; a category the document already has keeps its id
    (and its detections elsewhere their classifications). ``info`` gets ``classifier`` and
    ``classification_completion_time``. Every other field, image and detection stays as it was; ``document`` itself
    is not changed."""
    output = copy.deepcopy(dict(document))
    existing = output.get("classification_categories")
    categories: dict[str, str] = dict(existing) if isinstance(existing, dict) else {}
    id_of = {name: cid for (cid, name) in categories.items()}
    next_id = max((_category_number(cid) for cid in categories), default=-1) + 1
    used = list(class_names) + sorted({name for pairs in classifications.values() for (name, _) in pairs})
    for name in dict.fromkeys(used):
        if name not in id_of:
            (id_of[name], categories[str(next_id)]) = (str(next_id), name)
            next_id += 1

    images = output.get("images")
    for (entry, index), pairs in classifications.items():
        try:
            detection = images[entry]["detections"][index]
        except (IndexError, KeyError, TypeError):
            raise ValueError(f"the document has no detection {index} in images[{entry}]") from None
        ranked = sorted(pairs, key=lambda pair: pair[1], reverse=True)
        detection["classifications"] = [[id_of[name], round(float(probability), 4)] for (name, probability) in ranked]

    if categories or "classification_categories" in output:
        output["classification_categories"] = categories
    if descriptions:
        described = output.get("classification_category_descriptions")
        described = dict(described) if isinstance(described, dict) else {}
        for name, text in descriptions.items():
            if name in id_of:
                described[id_of[name]] = str(text)
        output["classification_category_descriptions"] = described
    info = output.get("info")
    info = dict(info) if isinstance(info, dict) else {}
    info.setdefault("format_version", MD_FORMAT_VERSION)
    if classifier is not None:
        info["classifier"] = classifier
    info["classification_completion_time"] = md_timestamp()
    output["info"] = info
    return output


def _category_number(category_id: str) -> int:
    """A classification category id as a number (-1: not one), to number new categories after the last."""
    try:
        return int(category_id)
    except ValueError:
        return -1

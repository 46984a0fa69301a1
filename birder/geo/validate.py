"""Checks of exported files against the schemas shipped in ``birder/geo/schemas/`` (no network).

A Camtrap DP package is validated by frictionless with each resource's published schema URL replaced by the local
Table Schema (column order and labels, types, constraints, primary and foreign keys), and its ``datapackage.json``
by JSON Schema. A COCO Camera Traps file is validated by JSON Schema, plus the references JSON Schema cannot see
(annotations point at existing images and categories); so is a MegaDetector batch output (``birder-predict
--detector --export md-json``). Needs the ``geo`` extra (frictionless, jsonschema).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.geo.camtrap import SCHEMA_DIR, TABLES, table_schema_path

_PACKAGE_V2 = "https://datapackage.org/profiles/2.0/datapackage.json"


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))


def _json_schema_errors(document: Any, schema: dict[str, Any]) -> list[str]:
    try:
        import jsonschema
    except ImportError:
        raise BirderError("validating exports needs jsonschema: pip install 'birder[geo]'") from None
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def validate_camtrap_dp(directory: str | os.PathLike) -> list[str]:
    """The problems of the Camtrap DP package in ``directory`` (empty: valid)."""
    try:
        import frictionless
    except ImportError:
        raise BirderError("validating exports needs frictionless: pip install 'birder[geo]'") from None
    directory = Path(directory)
    descriptor = json.loads((directory / "datapackage.json").read_text(encoding="utf-8"))
    errors = _json_schema_errors(descriptor, _schema("camtrap-dp-package.schema.json"))

    resources = []
    for resource in descriptor.get("resources", []):
        schema = json.loads(table_schema_path(resource["name"]).read_text(encoding="utf-8"))
        schema.pop("$comment", None)
        local = dict(resource, schema=schema)
        resources.append(local)
    names = {resource["name"] for resource in resources}
    errors += [f"missing resource '{name}'" for name in TABLES if name not in names]
    # The published profile URL would be fetched: validate as a plain data package with local schemas instead
    # (Data Package v2 for the bbox sizes' exclusiveMinimum, which v1 Table Schemas cannot state)
    package = frictionless.Package(
        {"$schema": _PACKAGE_V2, "name": descriptor.get("name", "package"), "resources": resources},
        basepath=str(directory),
    )
    report = package.validate()
    for task in report.tasks:
        errors += [f"{task.name}: {error.message}" for error in task.errors]
    errors += [f"package: {error.message}" for error in report.errors]
    return errors


def validate_coco_ct(path: str | os.PathLike) -> list[str]:
    """The problems of a COCO Camera Traps JSON file (empty: valid)."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    errors = _json_schema_errors(document, _schema("coco-camera-traps.schema.json"))
    if errors:
        return errors
    images = {image["id"] for image in document["images"]}
    categories = {category["id"] for category in document["categories"]}
    for annotation in document["annotations"]:
        if annotation["image_id"] not in images:
            errors.append(f"annotation {annotation['id']}: no image '{annotation['image_id']}'")
        if annotation["category_id"] not in categories:
            errors.append(f"annotation {annotation['id']}: no category {annotation['category_id']}")
    if len(images) != len(document["images"]):
        errors.append("image ids are not unique")
    return errors


# Rounding of the written boxes (4 decimals each of x, y, width, height) may take x + width past 1 by this much
_MD_ROUNDING = 1e-3


def validate_md_json(path: str | os.PathLike) -> list[str]:
    """The problems of a MegaDetector batch output file (empty: valid): its JSON Schema, then what the schema
    cannot see: categories that exist, classifications sorted by score, boxes inside the frame, unique files."""
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    errors = _json_schema_errors(document, _schema("megadetector-batch-output.schema.json"))
    if errors:
        return errors
    detection_categories = document["detection_categories"]
    classification_categories = document.get("classification_categories", {})
    for key in document.get("classification_category_descriptions", {}):
        if key not in classification_categories:
            errors.append(f"description of no classification category '{key}'")
    for image in document["images"]:
        name = image["file"]
        for number, detection in enumerate(image.get("detections") or []):  # null for a failed image
            where = f"{name}, detection {number}"
            if detection["category"] not in detection_categories:
                errors.append(f"{where}: no detection category '{detection['category']}'")
            (x, y, width, height) = detection["bbox"]
            if x + width > 1 + _MD_ROUNDING or y + height > 1 + _MD_ROUNDING:
                errors.append(f"{where}: box {detection['bbox']} runs past the image")
            scores = [score for (_, score) in detection.get("classifications", [])]
            if scores != sorted(scores, reverse=True):
                errors.append(f"{where}: classifications not sorted by score")
            missing = [cid for (cid, _) in detection.get("classifications", []) if cid not in classification_categories]
            if missing:
                errors.append(f"{where}: no classification category '{missing[0]}'")
    files = [image["file"] for image in document["images"]]
    if len(set(files)) != len(files):
        errors.append("image files are not unique")
    return errors

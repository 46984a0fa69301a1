"""The boxes a user already has (``birder-predict --boxes FILE``): MegaDetector batch outputs, SpeciesNet predictions
and COCO (Camera Traps) files read into one structure and matched to a run's photos; the MegaDetector document
written back with the species, checked by MegaDetector's own validator.

Every file is generated here, in the conventions of the tool that writes it (relative paths, Windows separators,
failures, people and vehicles beside the animals).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from birder.errors import BirderError
from birder.geo.validate import validate_md_json
from birder.inference.crops import crop_box, md_detection, md_taxonomy_description, md_with_classifications
from birder.io.box_files import (
    COCO,
    MEGADETECTOR,
    SPECIESNET,
    BoxFile,
    boxes_root,
    match_photos,
    read_box_file,
    split_detections,
)

SETTINGS = settings(
    derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
MD_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
SIZE = (96, 64)  # width, height of the generated photos
PHOTOS = ["camA/IMG_0001.JPG", "camA/IMG_0002.JPG", "camB/IMG_0001.JPG", "camB/sub/IMG_0003.JPG"]
THRESHOLD = 0.2


def make_photos(root: Path, names: list[str] = PHOTOS) -> list[str]:
    """Small seeded JPEGs under ``root``; their paths as a run lists them."""
    rng = np.random.default_rng(0)
    paths = []
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name, quality=90)
        paths.append(str(root / name))
    return paths


def addaxai_output() -> dict[str, Any]:
    """A batch output as MegaDetector and AddaxAI write it on Windows: relative paths with backslashes, an animal,
    a person and a vehicle, an animal below the threshold, a failed photo and a photo the run does not have."""
    return {
        "info": {
            "format_version": "1.4",
            "detector": "md_v5a.0.0.pt",
            "detection_completion_time": "2024-03-01 10:00:00",
            "detector_metadata": {"megadetector_version": "v5a.0.0", "typical_detection_threshold": 0.2},
        },
        "detection_categories": dict(MD_CATEGORIES),
        "images": [
            {
                "file": "camA\\IMG_0001.JPG",
                "detections": [
                    {"category": "1", "conf": 0.912, "bbox": [0.1, 0.2, 0.3, 0.4]},
                    {"category": "2", "conf": 0.85, "bbox": [0.5, 0.1, 0.2, 0.6]},
                    {"category": "1", "conf": 0.05, "bbox": [0.7, 0.7, 0.2, 0.2]},
                ],
            },
            {"file": "camA/IMG_0002.JPG", "detections": []},
            {"file": "camB\\IMG_0001.JPG", "failure": "Failure image access", "detections": None},
            {
                "file": "camB/sub/IMG_0003.JPG",
                "detections": [
                    {"category": "3", "conf": 0.7, "bbox": [0.0, 0.5, 0.5, 0.5]},
                    {"category": "1", "conf": 0.2, "bbox": [0.6, 0.0, 0.4, 1.0]},
                ],
            },
            {"file": "camC/IMG_0009.JPG", "detections": [{"category": "1", "conf": 0.9, "bbox": [0, 0, 1, 1]}]},
        ],
    }


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_megadetector_output_relative_windows_paths_failures_and_pass_through(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_photos(photos)
    path = write_json(tmp_path / "md.json", addaxai_output())
    root = boxes_root(None, [str(photos)], paths)
    assert root == photos

    boxes = read_box_file(path, root)
    assert boxes.kind == MEGADETECTOR and boxes.categories == MD_CATEGORIES
    assert boxes.animal_categories == {"1"}
    matched = boxes.match(paths)
    assert set(matched.by_photo) == set(paths)  # backslashes taken as separators
    assert matched.unmatched == ["camC/IMG_0009.JPG"]

    first = matched.by_photo[paths[0]]
    assert (first.entry, first.file, first.failure) == (0, "camA\\IMG_0001.JPG", None)
    assert [(d.index, d.category_id, d.category, d.conf) for d in first.detections] == [
        (0, "1", "animal", 0.912),
        (1, "2", "person", 0.85),
        (2, "1", "animal", 0.05),
    ]
    assert first.detections[0].bbox_given == (0.1, 0.2, 0.3, 0.4) == first.detections[0].bbox
    split = split_detections(first, THRESHOLD, boxes.animal_categories)
    assert [d.index for d in split.classify] == [0]
    assert [d.index for d in split.passed] == [1, 2]  # the person, and the animal below the threshold

    failed = matched.by_photo[paths[2]]
    assert failed.failure == "Failure image access" and failed.detections == ()
    deep = split_detections(matched.by_photo[paths[3]], THRESHOLD, boxes.animal_categories)
    assert [d.index for d in deep.classify] == [1]  # at the threshold: classified
    assert [d.category for d in deep.passed] == ["vehicle"]
    assert split_detections(matched.by_photo[paths[1]], THRESHOLD, boxes.animal_categories).classify == ()


def test_boxes_root_option_and_photos_outside_it(tmp_path: Path) -> None:
    photos = tmp_path / "survey" / "photos"
    paths = make_photos(photos)
    path = write_json(tmp_path / "md.json", addaxai_output())
    # The run was given the camera folders one by one: the default root is the photos' deepest common folder
    assert boxes_root(None, [str(photos / "camA"), str(photos / "camB")], paths) == photos
    assert boxes_root(str(photos), [str(photos / "camA")], paths[:2]) == photos
    with pytest.raises(BirderError, match=r"--boxes-root .* is not a folder"):
        boxes_root(str(tmp_path / "nowhere"), [str(photos)], paths)

    # The same file against the wrong root: nothing matches, every path is listed
    wrong = read_box_file(path, tmp_path / "survey")
    matched = wrong.match(paths)
    assert matched.by_photo == {} and len(matched.unmatched) == len(wrong.photos) == 5


def test_speciesnet_predictions(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_photos(photos)
    document = {
        "predictions": [
            {
                "filepath": paths[0],  # SpeciesNet writes the paths it was given: absolute here
                "detections": [
                    {"category": "1", "label": "animal", "conf": 0.8, "bbox": [0.2, 0.2, 0.5, 0.5]},
                    {"category": "2", "label": "human", "conf": 0.6, "bbox": [0.0, 0.0, 0.3, 0.9]},
                ],
                "classifications": {"classes": ["uuid;mammalia;;;;;mammal"], "scores": [0.9]},
                "prediction": "uuid;mammalia;;;;;mammal",
                "prediction_score": 0.9,
                "model_version": "4.0.1a",
            },
            {"filepath": "camA\\IMG_0002.JPG", "failures": ["DETECTOR"]},
            {
                "filepath": "camB/IMG_0001.JPG",
                "failures": ["CLASSIFIER"],
                "detections": [{"category": "3", "label": "vehicle", "conf": 0.5, "bbox": [0.1, 0.1, 0.2, 0.2]}],
            },
            {"filepath": str(tmp_path / "elsewhere" / "x.jpg"), "detections": []},
        ]
    }
    boxes = read_box_file(write_json(tmp_path / "predictions.json", document), photos)
    assert boxes.kind == SPECIESNET
    assert boxes.categories == {"1": "animal", "2": "human", "3": "vehicle"} and boxes.animal_categories == {"1"}
    matched = match_photos(boxes, paths)
    assert set(matched.by_photo) == set(paths[:3])
    assert matched.unmatched == [str(tmp_path / "elsewhere" / "x.jpg")]
    split = split_detections(matched.by_photo[paths[0]], THRESHOLD, boxes.animal_categories)
    assert [(d.index, d.conf, d.bbox) for d in split.classify] == [(0, 0.8, (0.2, 0.2, 0.5, 0.5))]
    assert [d.category for d in split.passed] == ["human"]
    assert matched.by_photo[paths[1]].failure == "DETECTOR"
    assert matched.by_photo[paths[2]].failure is None  # the classifier failed, the boxes are there
    assert [d.category for d in matched.by_photo[paths[2]].detections] == ["vehicle"]


def coco_camera_traps() -> dict[str, Any]:
    """A COCO Camera Traps file as LILA publishes them: string ids, locations, boxes in pixels, an empty photo's
    image-level label, a boxed human, and an image of a camera the run does not have."""
    (width, height) = SIZE
    images = [
        {"id": f"img{n}", "file_name": name, "width": width, "height": height, "location": name.split("/")[0]}
        for (n, name) in enumerate(PHOTOS)
    ]
    images.append({"id": "other", "file_name": "camZ/IMG_1.JPG", "width": width, "height": height})
    annotations = [
        {"id": "a0", "image_id": "img0", "category_id": 1, "bbox": [9.6, 6.4, 48.0, 32.0]},
        {"id": "a1", "image_id": "img0", "category_id": 3, "bbox": [0.0, 0.0, 10.0, 60.0]},
        {"id": "a2", "image_id": "img1", "category_id": 0},  # empty: no box
        {"id": "a3", "image_id": "img2", "category_id": 2, "bbox": [48.0, 32.0, 48.0, 32.0], "score": 0.4},
    ]
    categories = [{"id": 0, "name": "empty"}, {"id": 1, "name": "red fox"}, {"id": 2, "name": "badger"}]
    categories.append({"id": 3, "name": "human"})
    return {"info": {"version": "1.0"}, "images": images, "annotations": annotations, "categories": categories}


def test_coco_camera_traps_boxes_in_pixels(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_photos(photos)
    boxes = read_box_file(write_json(photos / "lila.json", coco_camera_traps()), photos)
    assert boxes.kind == COCO and boxes.animal_categories == {"1", "2"}
    matched = boxes.match(paths)
    assert set(matched.by_photo) == set(paths) and matched.unmatched == ["camZ/IMG_1.JPG"]
    fox = matched.by_photo[paths[0]]
    assert [(d.index, d.category, d.conf) for d in fox.detections] == [(0, "red fox", 1.0), (1, "human", 1.0)]
    assert fox.detections[0].bbox_given == (9.6, 6.4, 48.0, 32.0)
    assert fox.detections[0].bbox == pytest.approx((0.1, 0.1, 0.5, 0.5))
    assert fox.detections[0].pixel_box(SIZE) == pytest.approx((9.6, 6.4, 57.6, 38.4))
    assert [d.category for d in split_detections(fox, THRESHOLD, boxes.animal_categories).passed] == ["human"]
    assert matched.by_photo[paths[1]].detections == ()  # an image-level label only
    badger = split_detections(matched.by_photo[paths[2]], 0.5, boxes.animal_categories)
    assert (badger.classify, [d.conf for d in badger.passed]) == ((), [0.4])  # its score is below 0.5


def test_a_box_read_back_gives_the_crop_of_the_box_written(tmp_path: Path) -> None:
    """What birder's own md-json writes is read back to the same pixels, up to the format's 4 decimals: the crop of
    the detector's box, give or take the pixel that rounding at a half pixel may tip."""
    photos = tmp_path / "photos"
    paths = make_photos(photos)
    pixel_boxes = [(5.0, 7.0, 60.0, 50.0), (0.0, 0.0, 96.0, 64.0), (33.3, 12.7, 41.9, 63.0)]
    document = {
        "info": {"format_version": "1.4"},
        "detection_categories": dict(MD_CATEGORIES),
        "images": [{"file": "camA/IMG_0001.JPG", "detections": [md_detection(b, 0.9, "1", SIZE) for b in pixel_boxes]}],
    }
    boxes = read_box_file(write_json(tmp_path / "md.json", document), photos)
    photo = Image.open(paths[0])
    for detection, box in zip(boxes.match(paths).by_photo[paths[0]].detections, pixel_boxes, strict=True):
        assert detection.pixel_box(photo.size) == pytest.approx(box, abs=0.01)
        (read, cut) = (crop_box(photo, detection.pixel_box(photo.size), 0.1).size, crop_box(photo, box, 0.1).size)
        assert abs(read[0] - cut[0]) <= 1 and abs(read[1] - cut[1]) <= 1


MALFORMED = {
    "not json": ("{", "not readable JSON"),
    "a list": ([1, 2], "is none of"),
    "no kind": ({"photos": []}, "is none of"),
    "md images not a list": ({"images": {}, "detection_categories": MD_CATEGORIES}, "'images' must be a list"),
    "md categories": ({"images": [], "detection_categories": ["animal"]}, "must map category ids to names"),
    "md no file": ({"images": [{"detections": []}], "detection_categories": MD_CATEGORIES}, "without 'file'"),
    "md no detections": (
        {"images": [{"file": "a.jpg"}], "detection_categories": MD_CATEGORIES},
        "'detections' must be a list",
    ),
    "md missing conf": (
        {"images": [{"file": "a.jpg", "detections": [{"category": "1", "bbox": [0, 0, 1, 1]}]}]},
        "without 'conf'",
    ),
    "md text conf": (
        {"images": [{"file": "a.jpg", "detections": [{"category": "1", "conf": "high", "bbox": [0, 0, 1, 1]}]}]},
        'conf "high" is not a number',
    ),
    "md box outside": (
        {"images": [{"file": "a.jpg", "detections": [{"category": "1", "conf": 0.5, "bbox": [0.5, 0, 0.7, 1]}]}]},
        "is not inside \\[0, 1\\]",
    ),
    "md pixel box": (
        {"images": [{"file": "a.jpg", "detections": [{"category": "1", "conf": 0.5, "bbox": [10, 5, 40, 30]}]}]},
        "is not inside \\[0, 1\\]",
    ),
    "md unknown category": (
        {"images": [{"file": "a.jpg", "detections": [{"category": "7", "conf": 0.5, "bbox": [0, 0, 1, 1]}]}]},
        "category '7' is not one of detection_categories",
    ),
    "md version 2": ({"info": {"format_version": "2.0"}, "images": []}, "format_version .* is not 1.x"),
    "md twice": ({"images": [{"file": "a.jpg", "detections": []}, {"file": "./a.jpg", "detections": []}]}, "twice"),
    "speciesnet no filepath": ({"predictions": [{"detections": []}]}, "without 'filepath'"),
    "speciesnet no label": (
        {"predictions": [{"filepath": "a.jpg", "detections": [{"category": "1", "conf": 0.5, "bbox": [0, 0, 1, 1]}]}]},
        "without 'label'",
    ),
    "speciesnet failures": ({"predictions": [{"filepath": "a.jpg", "failures": "DETECTOR"}]}, "'failures' must be"),
    "coco no width": (
        {
            "images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}],
            "categories": [{"id": 1, "name": "fox"}],
        },
        "needs its 'width' and 'height'",
    ),
    "coco box outside": (
        {
            "images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [10, 0, 15, 5]}],
            "categories": [{"id": 1, "name": "fox"}],
        },
        "not inside its 20 x 10 px image",
    ),
    "coco unknown image": (
        {
            "images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10}],
            "annotations": [{"image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5]}],
            "categories": [{"id": 1, "name": "fox"}],
        },
        "image_id '2' names no image",
    ),
    "coco text box": (
        {
            "images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": ["0", 0, 5, 5]}],
            "categories": [{"id": 1, "name": "fox"}],
        },
        "is not four numbers",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_give_one_line_naming_the_file(tmp_path: Path, name: str) -> None:
    (document, expected) = MALFORMED[name]
    if isinstance(document, dict) and "images" in document and "annotations" not in document:
        document = {"detection_categories": MD_CATEGORIES, **document}
    path = tmp_path / "boxes.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    with pytest.raises(BirderError, match=expected) as caught:
        read_box_file(path, tmp_path)
    assert f"'{path}'" in str(caught.value) and "\n" not in str(caught.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(BirderError, match="does not exist"):
        read_box_file(tmp_path / "none.json", tmp_path)
    with pytest.raises(BirderError, match="is a folder"):
        read_box_file(tmp_path, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Property tests: whatever JSON a user hands over is read or refused in one line
# ---------------------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
loose_detection = st.dictionaries(st.sampled_from(["category", "conf", "bbox", "label", "x"]), json_values, max_size=5)
# Values that are often right and sometimes anything: the reader's every branch, the accepting ones too
unit = st.floats(0.0, 0.5)
bbox_values = st.tuples(unit, unit, unit, unit).map(list) | st.lists(
    st.one_of(st.floats(-0.5, 1.5), st.integers(-2, 200), json_values), max_size=5
)
conf_values = st.floats(0.0, 1.0) | json_values | st.floats()
file_values = st.text(min_size=1, max_size=12) | json_values
failures_values = st.none() | st.lists(st.sampled_from(["DETECTOR", "CLASSIFIER", "GEOLOCATION"]), max_size=2)


@SETTINGS
@given(
    top=json_values,
    images=json_values,
    categories=st.just(MD_CATEGORIES) | json_values,
    detections=st.lists(loose_detection | json_values, max_size=3),
    bbox=bbox_values,
    conf=conf_values,
    file=file_values,
    failures=failures_values | json_values,
    width=st.integers(50, 400) | json_values,
)
def test_any_document_is_read_or_refused_in_one_line(
    tmp_path: Path,
    top: Any,
    images: Any,
    categories: Any,
    detections: list,
    bbox: Any,
    conf: Any,
    file: Any,
    failures: Any,
    width: Any,
) -> None:
    shaped = {"category": "1", "label": "animal", "conf": conf, "bbox": bbox}
    documents = [
        top,
        {"images": images, "detection_categories": categories},
        {"images": [{"file": file, "detections": detections}], "detection_categories": categories},
        {"images": [{"file": file, "detections": [shaped]}], "detection_categories": MD_CATEGORIES},
        {"predictions": [{"filepath": file, "failures": failures, **({"detections": [shaped]} if conf else {})}]},
        {"images": images, "annotations": detections, "categories": categories},
        {
            "images": [{"id": 1, "file_name": file, "width": width, "height": 400}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": bbox, "score": conf}],
            "categories": [{"id": 1, "name": "fox"}],
        },
    ]
    for number, document in enumerate(documents):
        path = tmp_path / f"boxes{number}.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        try:
            boxes = read_box_file(path, tmp_path)
        except BirderError as err:
            assert "\n" not in str(err) and str(path) in str(err)
            continue
        for photo in boxes.photos:
            for detection in photo.detections:
                assert 0 <= detection.conf <= 1 and all(0 <= value <= 1 for value in detection.bbox)
        boxes.match([tmp_path / "a.jpg"])
        # Every detection classified and written back: a batch output MegaDetector's validator accepts when birder
        # built it (a batch output read keeps the user's own values as they were)
        classified = {(p.entry, d.index): [("fox", 0.75), ("badger", 0.25)] for p in boxes.photos for d in p.detections}
        written = md_with_classifications(boxes.megadetector_document(), classified)
        if boxes.kind != MEGADETECTOR:
            assert _validate(written, tmp_path, tmp_path, existence=False) == {"errors": [], "warnings": []}
        md_with_classifications(boxes.megadetector_document(), {})


md_detection_strategy = st.fixed_dictionaries(
    {
        "category": st.sampled_from(sorted(MD_CATEGORIES)),
        "conf": st.floats(0.0, 1.0),
        "bbox": st.tuples(st.floats(0.0, 0.7), st.floats(0.0, 0.7), st.floats(0.0, 0.3), st.floats(0.0, 0.3)).map(list),
    }
)


@SETTINGS
@given(
    per_photo=st.lists(st.lists(md_detection_strategy, max_size=4), min_size=4, max_size=4), threshold=st.floats(0, 1)
)
def test_well_formed_output_classifies_exactly_the_animals_at_the_threshold(
    tmp_path: Path, per_photo: list, threshold: float
) -> None:
    document = {
        "info": {"format_version": "1.4"},
        "detection_categories": dict(MD_CATEGORIES),
        "images": [{"file": name, "detections": found} for (name, found) in zip(PHOTOS, per_photo, strict=True)],
    }
    boxes = read_box_file(write_json(tmp_path / "md.json", document), tmp_path)
    paths = [str(tmp_path / name) for name in PHOTOS]
    matched = boxes.match(paths)
    assert matched.unmatched == []
    for path, found in zip(paths, per_photo, strict=True):
        split = split_detections(matched.by_photo[path], threshold, boxes.animal_categories)
        expected = [n for (n, d) in enumerate(found) if d["category"] == "1" and d["conf"] >= threshold]
        assert [d.index for d in split.classify] == expected
        assert sorted(d.index for d in (*split.classify, *split.passed)) == list(range(len(found)))
        for detection in split.classify:
            assert list(detection.bbox_given) == found[detection.index]["bbox"]


# ---------------------------------------------------------------------------------------------------------------------
# Written back: MegaDetector's validator, every untouched field as it was
# ---------------------------------------------------------------------------------------------------------------------

SPECIES = ["Vulpes vulpes", "Meles meles", "Capreolus capreolus"]
LINEAGE = {"Vulpes vulpes": ("Vulpes", "Canidae", "Carnivora"), "Meles meles": ("Meles", "Mustelidae", "Carnivora")}


def _validate(document: dict[str, Any], root: Path, tmp_path: Path, existence: bool = True) -> dict[str, list[str]]:
    """MegaDetector's validator's errors and warnings; ``existence``: also that each photo is under ``root`` (off for
    a file of Windows paths, which the validator looks for as written)."""
    validate_batch_results = pytest.importorskip("megadetector.postprocessing.validate_batch_results")
    options = validate_batch_results.ValidateBatchResultsOptions()
    (options.check_image_existence, options.relative_path_base) = (existence, str(root))
    path = write_json(tmp_path / "validated.json", document)
    results = validate_batch_results.validate_batch_results(str(path), options)["validation_results"]
    # and birder's own check of the format (the JSON Schema of docs/compatibility.md and what it cannot see)
    return {"errors": results["errors"] + validate_md_json(path), "warnings": results["warnings"]}


def _classify_animals(boxes: BoxFile, paths: list[str]) -> dict[tuple[int, int], list[tuple[str, float]]]:
    """A stand-in classifier's top-3 for each animal to classify (seeded), as the run would give them."""
    rng = np.random.default_rng(1)
    found = {}
    for photo in boxes.match(paths).by_photo.values():
        for detection in split_detections(photo, THRESHOLD, boxes.animal_categories).classify:
            scores = rng.dirichlet(np.ones(len(SPECIES)))
            found[(photo.entry, detection.index)] = [(n, float(s)) for (n, s) in zip(SPECIES, scores, strict=True)]
    return found


def _without(document: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for (key, value) in document.items() if key not in keys}


def test_md_written_back_passes_the_validator_and_keeps_every_untouched_field(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_photos(photos)
    original = addaxai_output()
    original["images"][0]["detections"][1]["custom"] = {"reviewed": True}  # another tool's field stays
    boxes = read_box_file(write_json(tmp_path / "md.json", original), photos)
    classified = _classify_animals(boxes, paths)
    assert sorted(classified) == [(0, 0), (3, 1)]
    descriptions = {name: md_taxonomy_description(name, LINEAGE.get(name)) for name in SPECIES}
    written = md_with_classifications(
        boxes.megadetector_document(), classified, class_names=SPECIES, descriptions=descriptions, classifier="tiny"
    )
    assert boxes.document == original  # the document read is not changed
    assert _validate(written, photos, tmp_path, existence=False) == {"errors": [], "warnings": []}

    assert written["classification_categories"] == {
        "0": "Vulpes vulpes",
        "1": "Meles meles",
        "2": "Capreolus capreolus",
    }
    assert written["classification_category_descriptions"]["0"] == ";;carnivora;canidae;vulpes;vulpes;Vulpes vulpes"
    assert set(written["classification_category_descriptions"]) == {"0", "1", "2"}
    ids = {name: cid for (cid, name) in written["classification_categories"].items()}
    for (entry, index), pairs in classified.items():
        detection = written["images"][entry]["detections"][index]
        expected = sorted(pairs, key=lambda pair: pair[1], reverse=True)
        assert [name for (name, _) in expected] == [
            written["classification_categories"][c] for (c, _) in detection["classifications"]
        ]
        assert [p for (_, p) in detection["classifications"]] == [round(p, 4) for (_, p) in expected]
        assert detection["classifications"][0][0] == ids[expected[0][0]]
        assert _without(detection, ("classifications",)) == original["images"][entry]["detections"][index]
    # Every other image and detection, and every other field, exactly as it was
    for entry, (image, before) in enumerate(zip(written["images"], original["images"], strict=True)):
        assert _without(image, ("detections",)) == _without(before, ("detections",))
        for index, detection in enumerate(image.get("detections") or []):
            if (entry, index) not in classified:
                assert detection == before["detections"][index]
    assert _without(written["info"], ("classifier", "classification_completion_time")) == original["info"]
    assert written["info"]["classifier"] == "tiny"
    assert written["detection_categories"] == original["detection_categories"]
    assert set(written) == {*original, "classification_categories", "classification_category_descriptions"}


def test_an_ensemble_output_keeps_its_classifications_beside_ours(tmp_path: Path) -> None:
    """A SpeciesNet-ensemble output already has classification categories: theirs keep their ids (and the
    detections not classified again their classifications), ours are added after them, a shared name reused."""
    photos = tmp_path / "photos"
    paths = make_photos(photos)
    original = addaxai_output()
    original["images"].pop()  # no photo outside the survey: the validator checks each exists
    original["classification_categories"] = {"0": "Meles meles", "1": "mammal"}
    original["classification_category_descriptions"] = {"0": "a;mammalia;carnivora;mustelidae;meles;meles;badger"}
    original["images"][0]["detections"][2]["classifications"] = [["1", 0.6]]  # below our threshold: kept
    original["images"][0]["detections"][0]["classifications"] = [["1", 0.9]]  # classified again: replaced
    for image in original["images"]:
        image["file"] = image["file"].replace("\\", "/")  # as written on Linux: the validator finds each photo
    boxes = read_box_file(write_json(tmp_path / "md.json", original), photos)
    written = md_with_classifications(
        boxes.megadetector_document(), _classify_animals(boxes, paths), class_names=SPECIES, classifier="tiny"
    )
    assert _validate(written, photos, tmp_path) == {"errors": [], "warnings": []}
    assert written["classification_categories"] == {
        "0": "Meles meles",
        "1": "mammal",
        "2": "Vulpes vulpes",
        "3": "Capreolus capreolus",
    }
    assert written["classification_category_descriptions"] == original["classification_category_descriptions"]
    assert written["images"][0]["detections"][2]["classifications"] == [["1", 0.6]]
    assert {cid for (cid, _) in written["images"][0]["detections"][0]["classifications"]} == {"0", "2", "3"}


@pytest.mark.parametrize("kind", ["speciesnet", "coco"])
def test_other_kinds_written_back_as_megadetector_output(tmp_path: Path, kind: str) -> None:
    photos = tmp_path / "photos"
    paths = make_photos(photos)
    if kind == "coco":
        document = coco_camera_traps()
        document["images"].pop()  # the validator checks each photo exists
    else:
        document = {
            "predictions": [
                {
                    "filepath": paths[0],
                    "detections": [
                        {"category": "1", "label": "animal", "conf": 0.8, "bbox": [0.2, 0.2, 0.5, 0.5]},
                        {"category": "2", "label": "human", "conf": 0.6, "bbox": [0.0, 0.0, 0.3, 0.9]},
                    ],
                },
                {"filepath": "camA\\IMG_0002.JPG", "failures": ["DETECTOR"]},
                {"filepath": "camB/sub/IMG_0003.JPG", "detections": []},
            ]
        }
    boxes = read_box_file(write_json(tmp_path / "boxes.json", document), photos)
    before = copy.deepcopy(boxes.document)
    md = boxes.megadetector_document()
    classified = _classify_animals(boxes, paths)
    assert classified
    written = md_with_classifications(md, classified, class_names=SPECIES)
    assert _validate(written, photos, tmp_path) == {"errors": [], "warnings": []}
    assert boxes.document == before
    # The same photos and detections at the same places, paths relative to the root
    assert [image["file"] for image in written["images"]] == [
        Path(os.path.relpath(photo.path, photos)).as_posix() for photo in boxes.photos
    ]
    for photo, image in zip(boxes.photos, written["images"], strict=True):
        assert ("failure" in image) == (photo.failure is not None)
        for detection, entry in zip(photo.detections, image["detections"] or [], strict=True):
            assert written["detection_categories"][entry["category"]] == detection.category
            assert entry["bbox"] == pytest.approx(detection.bbox, abs=1e-4)
            assert ("classifications" in entry) == ((photo.entry, detection.index) in classified)

"""Events and camera-trap exports of a crop-then-classify results folder (a row per box): Camtrap DP observations
per box with their bbox and per event with counts, blank photos, COCO-CT with boxes. The folder is written here the
way ``birder-predict --detector`` writes it (results table of boxes + photos table); the end-to-end run is in
tests/test_detect_chain.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from birder.geo.box_events import BOX_EVENT_COLUMNS, box_event_rows, event_observations, write_box_events
from birder.geo.camtrap import CamtrapOptions
from birder.geo.export import export_results
from birder.geo.results import read_results_folder
from birder.geo.validate import validate_camtrap_dp, validate_coco_ct
from birder.io.table_files import Column, TableSpec

HEADER = [
    "path", "box", "detections", "x1", "y1", "x2", "y2", "det_class", "det_score", "source",
    "prediction", "top1_class", "top1_prob", "exif_datetime", "gps_latitude", "gps_longitude", "label",
    "label_probability", "event_id",
]  # fmt: skip
WIDTH, HEIGHT = 400, 300


def _box(path: str, number: int, count: int, corners: tuple[float, ...], det_class: str, label: str, taken: str):
    probability = "0.9" if label not in ("", "unknown") else "0.2"
    return [path, str(number), str(count), *(f"{v:.2f}" for v in corners), det_class, "0.8", "detection",
            label or "x", label or "x", probability, taken, "48.1", "16.3", label, probability, ""]  # fmt: skip


def _empty(path: str, taken: str):
    return [path, "", "0", "", "", "", "", "", "", "", "", "", "", taken, "48.1", "16.3", "", "", ""]


@pytest.fixture
def box_results(tmp_path: Path) -> Path:
    """Two cameras: camera a has a burst of three photos (two deer; a deer and a fox; nothing) and, an hour later,
    a photo of a person; camera b one empty photo."""
    photos = tmp_path / "photos"
    rows = []
    sizes = []
    layout = {
        "a/1.jpg": ("2024-05-01T06:00:00", [("deer", "animal"), ("deer", "animal")]),
        "a/2.jpg": ("2024-05-01T06:00:01", [("deer", "animal"), ("fox", "animal")]),
        "a/3.jpg": ("2024-05-01T06:00:02", []),
        "a/4.jpg": ("2024-05-01T07:00:00", [("", "person")]),
        "b/1.jpg": ("2024-05-01T08:00:00", []),
    }
    for relative, (taken, boxes) in layout.items():
        path = photos / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 60)).save(path)
        for number, (label, det_class) in enumerate(boxes):
            corners = (40.0 + 100 * number, 30.0, 140.0 + 100 * number, 150.0)
            rows.append(_box(str(path), number, len(boxes), corners, det_class, label, taken))
        if not boxes:
            rows.append(_empty(str(path), taken))
        sizes.append([str(path), str(WIDTH), str(HEIGHT), str(len(boxes))])
    results = tmp_path / "results"
    results.mkdir()
    with open(results / "results.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([HEADER, *rows])
    with open(results / "photos.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "width", "height", "detections"], *sizes])
    (results / "run.json").write_text(json.dumps({"settings": {"model": "tiny", "format": "csv"}}))
    return results


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_box_results_folder_is_read_per_photo(box_results: Path) -> None:
    results = read_results_folder(box_results)
    assert results.boxes is not None
    assert len(results.photos) == 5  # one per photo, however many boxes
    assert [len(results.boxes[photo["path"]]) for photo in results.photos] == [2, 2, 0, 1, 0]
    assert set(results.sizes.values()) == {(WIDTH, HEIGHT)}


def test_an_event_counts_the_most_individuals_in_one_photo() -> None:
    deer = {"det_class": "animal", "label": "deer", "label_probability": "0.9"}
    fox = {"det_class": "animal", "label": "fox", "label_probability": "0.7"}
    person = {"det_class": "person"}
    unsure = {"det_class": "animal", "label": "unknown", "label_probability": "0.3"}
    observed = event_observations([[deer, deer], [deer, fox, person], [], [unsure]])
    assert observed == [
        ("animal", "deer", 2, 3, "0.9"),  # two in photo 1 (not three over the burst)
        ("animal", "fox", 1, 1, "0.7"),
        ("unknown", "", 1, 1, ""),
        ("human", "", 1, 1, ""),
    ]
    assert event_observations([[], []]) == [("blank", "", 0, 0, "")]


def test_box_events_table_and_event_ids(box_results: Path) -> None:
    results = read_results_folder(box_results)
    (rows, event_of) = box_event_rows(results, "120s")
    table = [dict(zip(BOX_EVENT_COLUMNS, row, strict=True)) for row in rows]
    burst = [row for row in table if row["photos"] == "3"]
    assert [(row["label"], row["count"]) for row in burst] == [("deer", "2"), ("fox", "1")]
    assert {row["observation_type"] for row in table} == {"animal", "human", "blank"}
    assert len(set(event_of.values())) == 3

    spec = TableSpec("results", tuple(Column(name) for name in HEADER))
    report = write_box_events(box_results, "csv", spec, "120s")
    assert report.events == 3
    written = _read(box_results / "results.csv")
    # Every box of a photo carries its photo's event
    by_path = {}
    for row in written:
        by_path.setdefault(row["path"], set()).add(row["event_id"])
    assert all(len(ids) == 1 and "" not in ids for ids in by_path.values())


def test_camtrap_dp_observations_per_box_and_event(box_results: Path, tmp_path: Path) -> None:
    spec = TableSpec("results", tuple(Column(name) for name in HEADER))
    write_box_events(box_results, "csv", spec, "120s")
    options = CamtrapOptions(timezone="+02:00")
    export_results(box_results, ["camtrap-dp"], options, tmp_path / "out")
    package = tmp_path / "out" / "camtrap-dp"
    assert validate_camtrap_dp(package) == []

    observations = _read(package / "observations.csv")
    media_level = [row for row in observations if row["observationLevel"] == "media"]
    boxes = [row for row in media_level if row["bboxX"]]
    assert len(boxes) == 5  # every box, the person's included
    first = next(row for row in boxes if row["mediaID"].endswith("a/1.jpg"))
    assert float(first["bboxX"]) == pytest.approx(40 / WIDTH)
    assert float(first["bboxY"]) == pytest.approx(30 / HEIGHT)
    assert float(first["bboxWidth"]) == pytest.approx(100 / WIDTH)
    assert float(first["bboxHeight"]) == pytest.approx(120 / HEIGHT)
    assert first["count"] == "1" and first["scientificName"] == "deer"
    assert sorted(row["observationType"] for row in media_level if not row["bboxX"]) == ["blank", "blank"]
    assert [row["observationType"] for row in boxes if row["mediaID"].endswith("a/4.jpg")] == ["human"]

    events = [row for row in observations if row["observationLevel"] == "event"]
    deer = next(row for row in events if row["scientificName"] == "deer")
    assert deer["count"] == "2"
    assert sorted(row["observationType"] for row in events) == ["animal", "animal", "blank", "human"]


def test_coco_ct_has_a_bbox_per_box_and_empty_frames(box_results: Path, tmp_path: Path) -> None:
    (report,) = export_results(box_results, ["coco-ct"], CamtrapOptions(), tmp_path / "out")
    assert validate_coco_ct(report.path) == []
    document = json.loads(report.path.read_text())
    names = {category["id"]: category["name"] for category in document["categories"]}
    with_box = [a for a in document["annotations"] if "bbox" in a]
    assert len(with_box) == 5
    assert sorted(names[a["category_id"]] for a in with_box) == ["deer", "deer", "deer", "fox", "human"]
    assert sorted(names[a["category_id"]] for a in document["annotations"] if "bbox" not in a) == ["empty", "empty"]
    assert [40.0, 30.0, 100.0, 120.0] in [a["bbox"] for a in with_box]
    assert len({a["id"] for a in document["annotations"]}) == len(document["annotations"])

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = document
    coco.createIndex()
    assert len(coco.getAnnIds()) == 7

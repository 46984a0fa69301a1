"""The camera-trap chain as one command: ``birder-predict --detector ... --events --export camtrap-dp --export
coco-ct``, on the tiny detector of tests/detect_support.py (three boxes per photo) and the generated photo folder of
the classification tests. The exports are validated (the shipped Camtrap DP schemas with frictionless, COCO-CT's
JSON Schema); the event counting itself is tested on hand-made tables in tests/test_box_exports.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from detect_support import BOXES_PER_PHOTO, save_tiny_detector
from test_predict import GOOD_PHOTOS, make_photo_folder, save_tiny_model

from birder.geo.validate import validate_camtrap_dp, validate_coco_ct
from birder.scripts.predict import main


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chain")
    photos = make_photo_folder(root / "photos")
    out = root / "out"
    args = ["--weights", str(save_tiny_model(root / "tiny.pt")), "--detector", str(save_tiny_detector(root / "d.pt"))]
    args += [str(photos), "-j", "0", "--no-progress", "--output-dir", str(out), "--events"]
    args += ["--export", "camtrap-dp", "--export", "coco-ct", "--export", "md-json", "--timezone", "+01:00"]
    args += ["--deployment-lat", "48.2", "--deployment-lon", "16.4"]
    assert main(args) == 0
    return out


def test_every_box_has_its_photos_event(chain: Path) -> None:
    rows = _read(chain / "results.csv")
    boxes = [row for row in rows if row["source"] == "detection"]
    assert len(boxes) == BOXES_PER_PHOTO * len(GOOD_PHOTOS)
    assert all(row["event_id"] for row in rows)
    events = _read(chain / "events.csv")
    assert {row["event_id"] for row in events} == {row["event_id"] for row in rows}
    # Counts are per photo at most: three boxes in a photo are at most three individuals, however long the event
    assert all(0 < int(row["count"]) <= BOXES_PER_PHOTO for row in events if row["observation_type"] != "blank")


def test_camtrap_dp_has_a_box_observation_per_timed_box(chain: Path) -> None:
    package = chain / "camtrap-dp"
    assert validate_camtrap_dp(package) == []
    media = {row["mediaID"] for row in _read(package / "media.csv")}
    observations = _read(package / "observations.csv")
    per_box = [row for row in observations if row["observationLevel"] == "media"]
    assert len(per_box) == BOXES_PER_PHOTO * len(media)
    assert all(0.0 <= float(row["bboxX"]) <= 1.0 and float(row["bboxWidth"]) > 0 for row in per_box)
    assert any(row["observationLevel"] == "event" for row in observations)


def test_coco_ct_holds_the_boxes(chain: Path) -> None:
    path = chain / "coco-ct.json"
    assert validate_coco_ct(path) == []
    document = json.loads(path.read_text())
    assert sum("bbox" in annotation for annotation in document["annotations"]) == BOXES_PER_PHOTO * len(GOOD_PHOTOS)

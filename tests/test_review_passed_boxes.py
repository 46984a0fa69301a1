"""``birder-review`` on a ``birder-predict --boxes`` run: a person or vehicle of the boxes file (passed through,
never classified) is shown as what the file says it is, and a box below ``--det-threshold`` (no source: not one
of the run's boxes) is no box to review."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from birder.review.folder import read_review_folder

HEADER = ["path", "box", "detections", "x1", "y1", "x2", "y2", "det_class", "det_score", "source", "prediction",
          "top1_class", "top1_prob", "label", "label_probability"]  # fmt: skip


def test_passed_boxes_keep_their_kind_and_low_scores_are_left_out(tmp_path: Path) -> None:
    photo = str(tmp_path / "a.jpg")
    rows = [
        [photo, "0", "2", "10", "10", "50", "60", "animal", "0.9", "detection", "deer", "deer", "0.8", "deer", "0.8"],
        [photo, "1", "2", "60", "10", "90", "80", "person", "0.7", "passed", "", "", "", "", ""],
        [photo, "2", "2", "5", "5", "9", "9", "animal", "0.05", "", "", "", "", "", ""],
    ]
    with open(tmp_path / "results.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([HEADER, *rows])
    (tmp_path / "run.json").write_text(json.dumps({"settings": {"format": "csv"}}))

    (unit,) = read_review_folder(tmp_path).units
    assert [(box.index, box.answer.label) for box in unit.boxes] == [(0, "deer"), (1, "human")]
    assert unit.answer.label == "deer"

"""COCO files that would score the wrong thing: refused in one line by birder-eval-det and birder-train-det alike
(one reader), and an unreadable photo left out of the scores exactly as a missing one."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_VIT_CONFIG
from detect_support import save_tiny_detector
from PIL import Image

from birder.data.detection import read_coco
from birder.inference.detection import detection_transform, infer_image
from birder.net.detection.checkpoint import load_detector
from birder.scripts import evaluate_det, train_det

pytest.importorskip("pycocotools")
SIZE = 64


def _photos(folder: Path, count: int) -> list[str]:
    """``count`` JPEGs of the same seeded noise (a detector finds the same boxes in each)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    names = [f"{index}.jpg" for index in range(count)]
    for name in names:
        Image.fromarray(pixels).save(folder / name, quality=90)
    return names


def _coco(folder: Path, names: list[str], boxes: list[list[float]], **edits) -> Path:
    """A COCO file of ``names`` (ids 1..), each with ``boxes`` (xywh) of category "bird"; ``edits`` replace keys."""
    images = [{"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE} for (i, name) in enumerate(names)]
    annotations = [
        {"id": 100 * (i + 1) + j, "image_id": i + 1, "category_id": 1, "bbox": box, "iscrowd": 0}
        for i in range(len(names))
        for (j, box) in enumerate(boxes)
    ]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "bird"}], **edits}
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def _error_line(capsys: pytest.CaptureFixture, prog: str) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def _train_det(path: Path, output: Path) -> int:
    args = ["--backbone", "vit_t16", "--backbone-config", json.dumps(TINY_VIT_CONFIG), "--size", "32"]
    args += ["--train-json", str(path), "--val-json", str(path), "--output-dir", str(output), "--no-progress"]
    return train_det.main([*args, "--epochs", "1", "--workers", "0"])


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return save_tiny_detector(tmp_path_factory.mktemp("det") / "det.pt")


def test_an_annotation_of_no_image_and_a_repeated_image_id_are_refused_by_both_commands(
    detector: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    names = _photos(tmp_path, 2)
    good = _coco(tmp_path, names, [[4, 4, 20, 20]])
    coco = json.loads(good.read_text())

    orphan = {"id": 777, "image_id": 9, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0}
    no_image = _coco(tmp_path, names, [[4, 4, 20, 20]], annotations=[*coco["annotations"], orphan])
    no_image = no_image.rename(tmp_path / "no_image.json")
    twice = [*coco["images"], {"id": 2, "file_name": names[0], "width": SIZE, "height": SIZE}]
    repeated = _coco(tmp_path, names, [[4, 4, 20, 20]], images=twice).rename(tmp_path / "repeated.json")

    for path, expected in (
        (no_image, f"{no_image}: annotation 777 names image id 9, which no image of the file has"),
        (repeated, f"{repeated}: image id 2 is listed twice (1.jpg and 0.jpg)"),
    ):
        assert evaluate_det.main([str(path), "--weights", str(detector), "--no-progress", "--workers", "0"]) == 2
        assert expected in _error_line(capsys, "birder-eval-det")
        # birder-train-det reads the file with the same reader: the same line, and no run folder
        assert _train_det(path, tmp_path / "run") == 2
        assert expected in _error_line(capsys, "birder-train-det")
        assert not (tmp_path / "run").exists()


def _report(capsys: pytest.CaptureFixture) -> tuple[str, list[str]]:
    captured = capsys.readouterr()
    return (captured.out, captured.err.strip().splitlines())


def test_an_unreadable_photo_is_left_out_like_a_missing_one(
    detector: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    names = _photos(tmp_path / "photos", 3)
    # The ground truth is what the detector finds in these photos: every box is found, AP 1 when all are scored
    (net, info) = load_detector(detector, inference=True)
    found = infer_image(net, tmp_path / "photos" / names[0], detection_transform(net.size, info.rgb_stats))
    boxes = [[x1, y1, x2 - x1, y2 - y1] for (x1, y1, x2, y2) in found.boxes.tolist() if x2 - x1 > 1 and y2 - y1 > 1]
    assert boxes
    path = _coco(tmp_path / "photos", names, boxes)
    args = [str(path), "--weights", str(detector), "--no-progress", "--workers", "0"]

    assert evaluate_det.main(args) == 0
    (complete, _) = _report(capsys)
    assert "images: 3" in complete

    data = (tmp_path / "photos" / names[1]).read_bytes()
    (tmp_path / "photos" / names[1]).write_bytes(data[: len(data) // 2])  # a truncated JPEG
    assert evaluate_det.main(args) == 0
    (truncated, err) = _report(capsys)
    # One warning line with the count, naming the photo (the command logs to stderr)
    warnings = [line for line in err if "WARNING" in line]
    assert len(warnings) == 1 and "1 image(s) could not be read, left out of the scores" in warnings[0]
    assert names[1] in warnings[0]

    (tmp_path / "photos" / names[1]).unlink()  # the same photo missing
    assert evaluate_det.main(args) == 0
    (removed, _) = _report(capsys)

    # The same images and boxes are scored either way: the same report, line for line
    assert truncated == removed and "images: 2" in truncated
    map50 = float(re.search(r"mAP@\.5: ([0-9.]+)", truncated)[1])
    assert map50 == float(re.search(r"mAP@\.5: ([0-9.]+)", complete)[1]) and map50 > 0.9


def test_a_box_with_no_area_inside_its_image_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Within the rounding margin of the left edge, but entirely outside the image: clipped, it would have no width
    # (a degenerate box the detector's training refuses with a traceback)
    names = _photos(tmp_path, 1)
    path = _coco(tmp_path, names, [[-0.9, 2, 0.5, 5], [1e9, 2, 1e-8, 5], [4, 4, 20, 20]])
    data = read_coco(path)
    assert data.images[0].boxes == [[4.0, 4.0, 24.0, 24.0]]
    assert sum("has no area inside its image" in problem for problem in data.problems) == 1
    assert sum("outside its 64x64 image" in problem for problem in data.problems) == 1

"""Detector training: COCO files checked item by item, box-aware augmentation, COCO mAP, and the two commands."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT_CONFIG
from PIL import Image

from benchmarks.synthetic import write_coco_scenes
from birder.data.detection import DetectionDataset, detection_train_transform, read_coco
from birder.data.training import DataError
from birder.data.transforms import RGB_STATS
from birder.net.detection.checkpoint import load_detector
from birder.scripts import evaluate_det, train_det
from birder.training.detection_eval import coco_scores


def _write_coco(root: Path, images: list[dict], annotations: list[dict]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for entry in images:
        if not entry.pop("missing", False):
            Image.new("RGB", (entry["width"], entry["height"]), (90, 90, 90)).save(root / entry["file_name"])
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "ant"}],
    }
    path = root / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def _image(image_id: int, **extra) -> dict:
    return {"id": image_id, "file_name": f"images/{image_id}.png", "width": 40, "height": 30, **extra}


def _box(ann_id: int, image_id: int, bbox: list[float], category_id: int = 7) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0}


def test_bad_items_are_named_and_the_rest_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write_coco(
        tmp_path,
        [_image(1), _image(2), _image(3, missing=True), _image(4)],  # image 4: a negative, no boxes
        [
            _box(10, 1, [2, 3, 10, 10]),
            _box(11, 1, [30, 20, 15, 5]),  # runs 5 px past the right edge
            _box(12, 2, [1, 1, 5, 5], category_id=99),
            _box(13, 2, [0, 0, 40, 30], category_id=3),
            _box(14, 3, [1, 1, 5, 5]),
        ],
    )
    with caplog.at_level(logging.WARNING):
        data = read_coco(path)
    warnings = [record.getMessage() for record in caplog.records]
    assert any("annotation 11 (image 1): box" in line and "outside its 40x30 image" in line for line in warnings)
    assert any("annotation 12 (image 2): unknown category id 99" in line for line in warnings)
    assert any("image 3 (images/3.png): no such file" in line for line in warnings)
    assert all("\n" not in line for line in warnings) and len(data.problems) == 3
    # Labels follow the category ids: ant (3) is 0, cat (7) is 1.
    assert data.class_to_idx == {"ant": 0, "cat": 1} and data.category_ids == [3, 7]
    assert [(im.image_id, im.boxes, im.labels) for im in data.images] == [
        (1, [[2.0, 3.0, 12.0, 13.0]], [1]),
        (2, [[0.0, 0.0, 40.0, 30.0]], [0]),
        (4, [], []),
    ]
    assert len(data.ground_truth["annotations"]) == 2


def test_nothing_valid_is_refused(tmp_path: Path) -> None:
    path = _write_coco(tmp_path, [_image(1, missing=True)], [])
    with pytest.raises(DataError, match="no usable image"):
        read_coco(path)
    with pytest.raises(DataError, match="no such annotation file"):
        read_coco(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("images", "annotations", "message"),
    [
        ([_image(1)], [_box(1, 1, [30, 20, 15, 5])], "outside its 40x30 image"),
        ([_image(1)], [_box(1, 1, [2, 3, 10, 10], category_id=99)], "unknown category id 99"),
        ([_image(1), _image(2, missing=True)], [_box(1, 2, [2, 3, 10, 10])], "no such file"),
    ],
)
def test_training_data_with_no_valid_box_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, images: list[dict], annotations: list[dict], message: str
) -> None:
    # Each bad item is named on one line; when nothing valid is left to learn from, birder-train-det says so.
    path = _write_coco(tmp_path, images, annotations)
    args = ["--backbone", "vit_t16", "--backbone-config", json.dumps(TINY_VIT_CONFIG), "--size", "32"]
    args += ["--train-json", str(path), "--val-json", str(path), "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert train_det.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "no usable box to learn from (1 bad items)" in err
    assert not (tmp_path / "run").exists()


def test_augmentation_moves_boxes_with_the_pixels(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    image.paste((255, 255, 255), (4, 6, 20, 18))  # a white block at x 4..20, y 6..18
    image.save(tmp_path / "a.png")
    path = _write_coco(tmp_path, [], [])
    coco = json.loads(path.read_text())
    coco["images"] = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}]
    coco["annotations"] = [_box(1, 1, [4, 6, 16, 12])]
    path.write_text(json.dumps(coco))
    data = read_coco(path)
    stats = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    for seed in range(3):
        transform = detection_train_transform((32, 32), stats, (0.6, 1.4), hflip=0.5)
        sample = DetectionDataset(data.images, transform, train=True, seed=seed)[(1, 0)]
        assert sample.image.shape == (3, 32, 32)
        for x1, y1, x2, y2 in sample.target["boxes"].round().int().tolist():
            inside = sample.image[0, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
            assert inside.numel() == 0 or float(inside.mean()) > 0.9  # the box still frames the white block


def test_coco_scores_of_perfect_and_missing_detections(tmp_path: Path) -> None:
    path = _write_coco(tmp_path, [_image(1), _image(2)], [_box(1, 1, [2, 3, 10, 10]), _box(2, 2, [5, 5, 20, 20], 3)])
    data = read_coco(path)
    names = ["ant", "cat"]
    perfect = [
        {"image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 10], "score": 0.9},
        {"image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.8},
    ]
    result = coco_scores(data.ground_truth, perfect, names)
    assert result.map == pytest.approx(1.0) and result.map50 == pytest.approx(1.0)
    assert [(c.name, round(c.ap50, 3), c.boxes) for c in result.per_class] == [("ant", 1.0, 1), ("cat", 1.0, 1)]
    half = coco_scores(data.ground_truth, perfect[:1], names)
    assert half.map50 == pytest.approx(0.5) and half.per_class[0].ap50 == 0.0
    assert coco_scores(data.ground_truth, [], names).map50 == 0.0


def test_train_det_and_eval_det_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train_json = write_coco_scenes(tmp_path / "train", 6, seed=1, size=(64, 64), classes=[0, 1], num_objects=(0, 2))
    val_json = write_coco_scenes(tmp_path / "val", 3, seed=2, size=(64, 64), classes=[0, 1], num_objects=(1, 2))
    args = ["--network", "retinanet", "--backbone", "vit_t16", "--backbone-config", json.dumps(TINY_VIT_CONFIG)]
    args += ["--model-config", json.dumps({"fpn_channels": 16, "anchor_sizes": [16, 32, 64, 128]})]
    args += ["--train-json", str(train_json), "--val-json", str(val_json), "--output-dir", str(tmp_path / "run")]
    args += ["--size", "64", "--epochs", "2", "--batch-size", "3", "--workers", "0"]
    args += ["--no-progress", "--layer-decay", "0.8", "--ema-decay", "0.9"]
    assert train_det.main([*args, "--stop-epoch", "1"]) == 0
    rows = (tmp_path / "run" / "det_metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,lr,train_loss,map,map50,unreadable_images" and len(rows) == 2
    assert math.isfinite(float(rows[1].split(",")[3]))
    assert (tmp_path / "run" / "det_per_class_ap.csv").read_text().count("\n1,") == 2  # one row per class
    (net, info) = load_detector(tmp_path / "run" / "retinanet_vit_t16_1.pt")
    assert net.network_name == "retinanet" and net.size == (64, 64) and set(info.class_to_idx) == {"disc_0", "square_0"}
    assert info.rgb_stats["mean"] == list(RGB_STATS["birder"]["mean"])

    assert train_det.main([*args, "--resume"]) == 0  # epoch 2 of 2
    assert len((tmp_path / "run" / "det_metrics.csv").read_text().splitlines()) == 3

    capsys.readouterr()
    weights = str(tmp_path / "run" / "retinanet_vit_t16_2.pt")
    assert evaluate_det.main([str(val_json), "--weights", weights, "--no-progress", "--workers", "0"]) == 0
    report = capsys.readouterr().out
    assert "mAP@[.5:.95]:" in report and "disc_0" in report and "images: 3" in report


def test_train_det_refuses_data_without_boxes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train_json = write_coco_scenes(tmp_path / "train", 2, seed=1, size=(32, 32), num_objects=(0, 0))
    args = ["--backbone", "vit_t16", "--train-json", str(train_json), "--val-json", str(train_json)]
    assert train_det.main([*args, "--output-dir", str(tmp_path / "run"), "--size", "32", "--no-progress"]) == 2
    assert "no usable box to learn from" in capsys.readouterr().err
    torch.manual_seed(0)  # (keeps the global stream as other tests expect)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_detection_benchmark_tiny(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, native_bf16: bool
) -> None:
    # Both sections on tiny data; bfloat16 is measured only where it is native, else printed "not measured".
    from benchmarks import detection

    described = detection.machine_description
    monkeypatch.setattr(
        detection, "machine_description", lambda device: {**described(device), "cpu_native_bf16": native_bf16}
    )
    output = tmp_path / "detection.json"
    argv = ["--tiny", "--heads", "retinanet", "--workdir", str(tmp_path / "work"), "--output", str(output)]
    assert detection.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["machine"]["cpu_model"] and report["machine_label"] in capsys.readouterr().out
    measured = {(r["size"], r["dtype"]) for r in report["speed"]}
    skipped = {(r["size"], r["dtype"]) for r in report["speed_not_measured"]}
    assert all(r["images_per_s"] > 0 for r in report["speed"])
    if native_bf16:
        assert measured == {(s, d) for s in (64, 128) for d in ("float32", "bfloat16")} and not skipped
    else:
        assert measured == {(64, "float32"), (128, "float32")} and skipped == {(64, "bfloat16"), (128, "bfloat16")}
    (run,) = report["curve"]["runs"]
    assert run["head"] == "retinanet" and [row["epoch"] for row in run["curve"]] == [1]
    assert 0.0 <= run["held_out_map50"] <= 1.0 and run["curve"][0]["seconds"] > 0

"""A count of boxes is a count of animals: one box per object through ``birder-predict --detector``, and the
copy-paste augmentation of ``birder-train-det`` that shows a detector touching and partly hidden animals.

``python -m benchmarks.detection --sections counts`` measures the counts of a trained detector on generated scenes
with touching and overlapping objects; these tests are the fast checks of the parts.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT_CONFIG
from detect_support import DETECTOR_SIZE
from test_predict import make_photo_folder, save_tiny_model
from torchvision.ops import box_iou

from benchmarks.detection import count_scores
from benchmarks.synthetic import COUNT_LAYOUTS, TOUCH_DEPTH, write_coco_scenes, write_count_scenes
from birder.data.detection import DetectionDataset, detection_train_transform, read_coco
from birder.inference.detection import detect_tensors
from birder.io.checkpoint import ModelInfo, make_signature
from birder.model_registry import registry
from birder.net.detection.checkpoint import save_detector
from birder.scripts import predict, train_det
from birder.training.detection_augment import CopyPasteDataset, paste_boxes

STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def _two_class_detector(path: Path) -> tuple[torch.nn.Module, Path]:
    """A tiny detector that scores every anchor the same for both of its classes: its head's suppression (within a
    class) keeps the same box once per class, the case that made one animal two rows."""
    torch.manual_seed(0)
    body = registry.net_factory("vit_t16", 0, config=TINY_VIT_CONFIG, size=DETECTOR_SIZE)
    config = {"fpn_channels": 16, "anchor_sizes": [16, 32, 64, 128], "detections_per_img": 8, "topk_candidates": 20}
    det = registry.detection_net_factory("retinanet", 2, body, config=config).eval()
    logits = det.detector.head.classification_head.cls_logits
    with torch.no_grad():
        logits.weight.zero_()
        logits.bias.fill_(2.0)  # both classes, every anchor
    info = ModelInfo({"bird": 0, "mammal": 1}, make_signature(3, DETECTOR_SIZE, 2), STATS)
    return (det, save_detector(det, path, info))


def _pairs_over(boxes: list[list[float]], iou: float) -> int:
    if len(boxes) < 2:
        return 0
    overlaps = box_iou(torch.tensor(boxes), torch.tensor(boxes)).triu(diagonal=1)
    return int((overlaps > iou).sum())


def test_predict_keeps_no_two_boxes_of_a_photo_overlapping_by_more_than_half(tmp_path: Path) -> None:
    (det, detector) = _two_class_detector(tmp_path / "det.pt")
    photos = make_photo_folder(tmp_path / "photos")
    # The head alone gives the same box under both classes (else this test could not fail)
    unmerged = detect_tensors(det, [torch.zeros(3, *DETECTOR_SIZE)], [DETECTOR_SIZE], merge_iou=None)[0]
    assert _pairs_over(unmerged.boxes.tolist(), 0.5) > 0 and len(set(unmerged.labels.tolist())) == 2

    output = tmp_path / "out"
    argv = ["--weights", str(save_tiny_model(tmp_path / "tiny.pt")), "--detector", str(detector), str(photos)]
    assert predict.main([*argv, "-j", "0", "--no-progress", "--output-dir", str(output)]) == 0
    boxes: dict[str, list[list[float]]] = {}
    with open(output / "results.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["x1"]:
                boxes.setdefault(row["path"], []).append([float(row[k]) for k in ("x1", "y1", "x2", "y2")])
    assert boxes, "the detector found no box: nothing was checked"
    assert {path: _pairs_over(found, 0.5) for path, found in boxes.items()} == {path: 0 for path in boxes}
    with open(output / "photos.csv", newline="") as handle:
        counted = {row["path"]: int(row["detections"]) for row in csv.DictReader(handle)}
    assert {path: len(found) for path, found in boxes.items()} == {path: counted[path] for path in boxes}


def _target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


@pytest.mark.parametrize("seed", range(5))
def test_pasted_boxes_touch_or_overlap_but_never_hide_much_of_an_object(seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = torch.zeros(3, 96, 96)
    target = _target([[30.0, 30.0, 54.0, 54.0], [5.0, 60.0, 25.0, 80.0]], [0, 1])
    donor = torch.rand(3, 96, 96)
    donor_target = _target([[10.0, 10.0, 30.0, 30.0], [50.0, 40.0, 72.0, 70.0], [60.0, 5.0, 78.0, 25.0]], [2, 3, 1])
    (pasted, new_target) = paste_boxes(image, target, donor, donor_target, rng, max_objects=3, max_hidden=0.4)

    boxes = new_target["boxes"]
    assert len(boxes) == len(new_target["labels"]) > 2  # something was pasted, the photo's own boxes kept first
    assert torch.equal(boxes[:2], target["boxes"]) and new_target["labels"][:2].tolist() == [0, 1]
    # Each donor box has its own size: a pasted box is known by it
    donors = {
        (int(x2 - x1), int(y2 - y1)): (label, int(x1), int(y1))
        for (x1, y1, x2, y2), label in zip(donor_target["boxes"].tolist(), donor_target["labels"].tolist(), strict=True)
    }
    for box, label in zip(boxes[2:].int().tolist(), new_target["labels"][2:].tolist(), strict=True):
        assert donors[(box[2] - box[0], box[3] - box[1])][0] == label  # a donor's box, its label, its own size
    # The last paste lies on top of everything: its pixels are the donor's
    (x1, y1, x2, y2) = boxes[-1].int().tolist()
    (_, sx, sy) = donors[(x2 - x1, y2 - y1)]
    assert torch.equal(pasted[:, y1:y2, x1:x2], donor[:, sy : sy + y2 - y1, sx : sx + x2 - x1])
    # Every box keeps at least 60 % of its area in sight: the pixels of later pastes cover at most 40 % of it
    painted = torch.zeros(len(boxes), 96, 96, dtype=torch.bool)
    for later in range(len(boxes)):
        (x1, y1, x2, y2) = (int(v) for v in boxes[later].tolist())
        painted[:later, y1:y2, x1:x2] |= later >= 2
    for index, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        area = (x2 - x1) * (y2 - y1)
        assert int(painted[index, y1:y2, x1:x2].sum()) <= 0.4 * area + 1e-6


def test_most_pastes_touch_or_overlap_an_object_already_there() -> None:
    image = torch.zeros(3, 128, 128)
    target = _target([[50.0, 50.0, 74.0, 74.0]], [0])
    donor_target = _target([[0.0, 0.0, 20.0, 20.0]], [1])
    beside = 0
    for seed in range(200):
        (_, pasted) = paste_boxes(image, target, torch.ones(3, 128, 128), donor_target, np.random.default_rng(seed))
        if len(pasted["boxes"]) == 2:
            (x1, y1, x2, y2) = pasted["boxes"][1].tolist()
            beside += x2 >= 50 and x1 <= 74 and y2 >= 50 and y1 <= 74
    assert beside >= 0.7 * 200


def test_copy_paste_dataset_is_seeded_by_sample_and_off_at_zero(tmp_path: Path) -> None:
    annotations = write_coco_scenes(tmp_path / "scenes", 6, seed=0, size=(64, 64), classes=[0, 1], num_objects=(1, 2))
    data = read_coco(annotations)
    base = DetectionDataset(data.images, detection_train_transform((64, 64), STATS, (1.0, 1.0), 0.0), train=True)
    always = CopyPasteDataset(base, 1.0, seed=3)
    (first, again) = (always[(2, 1)], always[(2, 1)])
    assert torch.equal(first.image, again.image) and torch.equal(first.target["boxes"], again.target["boxes"])
    grown = [len(always[(2, i)].target["boxes"]) > len(base[(2, i)].target["boxes"]) for i in range(len(base))]
    assert sum(grown) >= len(base) // 2
    never = CopyPasteDataset(base, 0.0, seed=3)
    for index in range(len(base)):
        assert torch.equal(never[(2, index)].image, base[(2, index)].image)


def test_train_det_refuses_a_copy_paste_that_is_no_probability(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    annotations = write_coco_scenes(tmp_path / "scenes", 2, seed=0, size=(64, 64), classes=[0], num_objects=(1, 1))
    argv = ["--network", "retinanet", "--backbone", "vit_t16", "--train-json", str(annotations)]
    argv += ["--val-json", str(annotations), "--output-dir", str(tmp_path / "run"), "--copy-paste", "1.5"]
    assert train_det.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["birder-train-det: error: --copy-paste must be a probability from 0 to 1, got 1.5"]


def _hidden_share(a: list[float], b: list[float]) -> float:
    """Share of the smaller of two ``[x, y, w, h]`` boxes that the other covers."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(width, 0) * max(height, 0) / min(a[2] * a[3], b[2] * b[3])


@pytest.mark.parametrize("background", ["clutter", "foliage"])
def test_count_scenes_have_their_counts_and_layouts(tmp_path: Path, background: str) -> None:
    annotations = write_count_scenes(
        tmp_path / "scenes", 40, seed=4, size=(96, 128), classes=[0, 1, 2], background=background
    )
    coco = json.loads(annotations.read_text())
    boxes: dict[int, list[list[float]]] = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        boxes[annotation["image_id"]].append(annotation["bbox"])
    layouts = set()
    for image in coco["images"]:
        found = boxes[image["id"]]
        assert len(found) == image["count"] and 0 <= image["count"] <= 4
        layouts.add(image["layout"])
        shares = [_hidden_share(a, b) for i, a in enumerate(found) for b in found[i + 1 :]]
        assert all(share <= 0.4 + 1e-9 for share in shares)  # every object at least 60 % in sight
        if image["layout"] == "overlapping":
            assert sum(0.15 <= share <= 0.4 for share in shares) >= image["count"] - 1
        if image["layout"] == "touching":
            assert all(share <= TOUCH_DEPTH for share in shares) and len(found) >= 2
        if image["layout"] == "apart":
            assert all(share == 0 for share in shares)
    assert layouts == set(COUNT_LAYOUTS)


def test_count_scores_compare_a_runs_boxes_with_the_true_counts(tmp_path: Path) -> None:
    coco = {
        "images": [
            {"id": 1, "file_name": "images/a.png", "count": 2, "layout": "touching"},
            {"id": 2, "file_name": "images/b.png", "count": 1, "layout": "apart"},
            {"id": 3, "file_name": "images/c.png", "count": 0, "layout": "apart"},
        ],
        "annotations": [],
    }
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(coco))
    run = tmp_path / "run"
    run.mkdir()
    (run / "photos.csv").write_text(
        "path,width,height,detections\n/x/a.png,64,64,2\n/x/b.png,64,64,2\n/x/c.png,64,64,0\n"
    )
    (run / "results.csv").write_text(
        "path,box,detections,x1,y1,x2,y2\n/x/a.png,0,2,0,0,10,10\n/x/a.png,1,2,10,0,20,10\n"
        "/x/b.png,0,2,0,0,10,10\n/x/b.png,1,2,0,0,10,8\n/x/c.png,,0,,,,\n"
    )
    (run / "run.json").write_text(json.dumps({"settings": {"det_threshold": 0.5}}))
    scores = count_scores(annotations, run)
    assert scores["overall"] == {"photos": 3, "correct": 2, "share": pytest.approx(2 / 3)}
    assert scores["by_true_count"]["1"]["correct"] == 0 and scores["by_layout"]["touching"]["correct"] == 1
    assert scores["miscounted"] == {"fewer": 0, "more": 1} and scores["threshold"] == 0.5
    assert scores["max_kept_pair_iou"] == pytest.approx(0.8) and scores["kept_pairs_over_half"] == 1


def test_train_det_pastes_boxes_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from birder.training import detection_augment

    calls = []
    original = detection_augment.paste_boxes
    monkeypatch.setattr(detection_augment, "paste_boxes", lambda *a, **k: calls.append(1) or original(*a, **k))
    annotations = write_coco_scenes(tmp_path / "scenes", 4, seed=1, size=(64, 64), classes=[0, 1], num_objects=(1, 2))
    argv = ["--network", "retinanet", "--backbone", "vit_t16", "--backbone-config", json.dumps(TINY_VIT_CONFIG)]
    argv += ["--model-config", json.dumps({"fpn_channels": 16, "anchor_sizes": [16, 32, 64, 128]})]
    argv += ["--train-json", str(annotations), "--val-json", str(annotations), "--size", "64", "--epochs", "1"]
    argv += ["--batch-size", "2", "--workers", "0", "--no-progress"]
    assert train_det.main([*argv, "--output-dir", str(tmp_path / "plain")]) == 0
    assert calls == []
    assert train_det.main([*argv, "--output-dir", str(tmp_path / "pasted"), "--copy-paste", "1"]) == 0
    assert len(calls) == 4  # every training photo once
    assert (tmp_path / "pasted" / "retinanet_vit_t16_1.pt").is_file()


def test_counts_section_runs_birder_predict_and_reuses_its_detector(tmp_path: Path) -> None:
    # The benchmark end to end on tiny data (seconds): every scene of both sets counted through birder-predict; a
    # second run counts with the cached detector instead of training it again (its recipe.json still matches)
    from benchmarks import detection

    argv = ["--tiny", "--sections", "counts", "--workdir", str(tmp_path / "work")]
    assert detection.main([*argv, "--output", str(tmp_path / "first.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())["counts"]
    assert first["trained_now"] and [result["set"] for result in first["sets"]] == ["tune", "final"]
    for result in first["sets"]:
        assert result["overall"]["photos"] == 6 and result["threshold"] == 0.5
        assert sum(group["photos"] for group in result["by_true_count"].values()) == 6
    assert detection.main([*argv, "--output", str(tmp_path / "second.json")]) == 0
    second = json.loads((tmp_path / "second.json").read_text())["counts"]
    assert not second["trained_now"] and second["detector"] == first["detector"]

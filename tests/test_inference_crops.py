"""Crop-then-classify pieces: crops with a margin, detections as crops, MegaDetector batch output."""

import json
from pathlib import Path

import torch
from PIL import Image

from birder.data.transforms import RGB_STATS
from birder.inference.crops import crop_box, detect_crops, md_batch_output, md_detection, write_md_json
from birder.inference.detection import detection_transform


def test_crop_box_margin_and_clipping() -> None:
    photo = Image.new("RGB", (100, 50))
    assert crop_box(photo, (10, 10, 30, 20)).size == (20, 10)
    assert crop_box(photo, (10, 10, 30, 20), margin=0.5).size == (40, 20)  # 10 px more each side, 5 px each way
    assert crop_box(photo, (90, 40, 100, 50), margin=1.0).size == (20, 20)  # clipped at the right and bottom
    assert crop_box(photo, (99.6, 49.6, 99.9, 49.9)).size == (1, 1)


class _FixedDetector(torch.nn.Module):
    """Two boxes in the input tensor's pixels (whatever size the transform made it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        (height, width) = images[0].shape[-2:]
        boxes = torch.tensor([[0.0, 0.0, width / 2, height / 2], [width / 2, height / 2, width, height]])
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([1, 0])}]


def test_detect_crops_maps_boxes_to_the_photo_and_thresholds() -> None:
    photo = Image.new("RGB", (400, 200))
    crops = detect_crops(_FixedDetector(), photo, detection_transform((64, 64), RGB_STATS["birder"]), threshold=0.5)
    assert len(crops) == 1
    assert crops[0].box == (0.0, 0.0, 200.0, 100.0) and crops[0].label == 1 and round(crops[0].score, 4) == 0.9
    assert crops[0].crop.size == (220, 110)  # 10% margin, clipped at the top-left


def test_megadetector_batch_output(tmp_path: Path) -> None:
    detection = md_detection((10, 20, 60, 70), 0.93, "1", (200, 100), [("0", 0.1), ("5", 0.8)])
    assert detection == {
        "category": "1",
        "conf": 0.93,
        "bbox": [0.05, 0.2, 0.25, 0.5],
        "classifications": [["5", 0.8], ["0", 0.1]],
    }
    output = md_batch_output(
        [{"file": "a.jpg", "detections": [detection]}, {"file": "b.jpg", "failure": "unreadable"}],
        {"1": "animal"},
        {"0": "Turdus merula", "5": "Erithacus rubecula"},
    )
    path = write_md_json(tmp_path / "md.json", output)
    loaded = json.loads(path.read_text())
    assert loaded["info"]["format_version"] == "1.4" and loaded["detection_categories"] == {"1": "animal"}
    # A failure comes with "detections": null, as MegaDetector's format (and its validator) wants
    assert loaded["images"][1] == {"file": "b.jpg", "failure": "unreadable", "detections": None}
    assert "classification_categories" in loaded


def test_taxonomy_descriptions_in_speciesnets_form() -> None:
    from birder.inference.crops import md_taxonomy_description

    lineage = ("Turdus", "Turdidae", "Passeriformes")
    assert md_taxonomy_description("Turdus merula", lineage) == ";;passeriformes;turdidae;turdus;merula;Turdus merula"
    # A class name that is no binomial of its genus keeps the genus as the most specific rank
    assert md_taxonomy_description("Blackbird", lineage) == ";;passeriformes;turdidae;turdus;;Blackbird"
    assert md_taxonomy_description("Erithacus rubecula", None) == ";;;;;;Erithacus rubecula"

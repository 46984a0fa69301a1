"""A tiny detector whose scores are known: what the crop-then-classify tests (predict and serve) run."""

from pathlib import Path

import torch
from conftest import TINY_VIT_CONFIG

from birder.io.checkpoint import ModelInfo, make_signature
from birder.model_registry import registry
from birder.net.detection.checkpoint import save_detector

DETECTOR_SIZE = (64, 64)
DETECTOR_STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
BOXES_PER_PHOTO = 3
# Every anchor scores sigmoid(2) for every class: 3 boxes per photo above 0.5, none above 0.9
BOX_SCORE = float(torch.sigmoid(torch.tensor(2.0)))


def tiny_detector(classes: tuple[str, ...] = ("bird",), seed: int = 0) -> tuple[torch.nn.Module, ModelInfo]:
    """A seeded tiny RetinaNet in eval mode whose classification head is switched off: every anchor scores
    :data:`BOX_SCORE`, so each photo gets :data:`BOXES_PER_PHOTO` boxes (where the anchors and the random box
    regression put them) of the first class."""
    torch.manual_seed(seed)
    body = registry.net_factory("vit_t16", 0, config=TINY_VIT_CONFIG, size=DETECTOR_SIZE)
    config = {"fpn_channels": 16, "anchor_sizes": [16, 32, 64, 128], "detections_per_img": BOXES_PER_PHOTO}
    det = registry.detection_net_factory("retinanet", len(classes), body, config={**config, "topk_candidates": 20})
    logits = det.detector.head.classification_head.cls_logits
    with torch.no_grad():
        logits.weight.zero_()
        logits.bias.fill_(-20.0)
        logits.bias[:: len(classes)] = 2.0  # the first class of each anchor
    info = ModelInfo(
        {name: i for (i, name) in enumerate(classes)}, make_signature(3, DETECTOR_SIZE, len(classes)), DETECTOR_STATS
    )
    return (det.eval(), info)


def save_tiny_detector(path: Path, classes: tuple[str, ...] = ("bird",)) -> Path:
    (det, info) = tiny_detector(classes)
    return save_detector(det, path, info)

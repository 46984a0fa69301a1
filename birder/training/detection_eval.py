"""Detection scores: COCO mAP@[.5:.95], mAP@.5 and per-class AP, computed by pycocotools (not re-implemented).

Every rank detects on its share of the images; the detections are gathered and the main process scores them
against the annotation file's usable boxes (:attr:`birder.data.detection.CocoData.ground_truth`).
"""

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from birder.data.detection import CocoData, collate_detection, evaluation_dataset, read_coco
from birder.data.training import EpochSampler
from birder.distributed import DistInfo, all_gather_objects, resolve_device
from birder.errors import BirderError
from birder.inference.detection import rescale_boxes
from birder.io.checkpoint import names_by_index
from birder.training.amp import autocast
from birder.training.ddp import distinct_over_ranks

logger = logging.getLogger(__name__)
# Unreadable images named in the warning before the rest are only counted
_NAMED_UNREADABLE = 5


@dataclass(frozen=True)
class ClassAP:
    name: str
    ap: float  # AP@[.5:.95]; nan for a class without boxes in the data
    ap50: float
    boxes: int  # ground-truth boxes of the class


@dataclass(frozen=True)
class DetectionEvalResult:
    map: float  # COCO mAP@[.5:.95] (area "all", 100 detections per image)
    map50: float
    per_class: list[ClassAP]
    images: int
    detections: int


def _pycocotools() -> tuple[Any, Any]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise BirderError("detection scores need pycocotools: pip install 'birder[detection]'") from None
    return (COCO, COCOeval)


def coco_scores(
    ground_truth: dict[str, Any], detections: list[dict[str, Any]], class_names: list[str]
) -> DetectionEvalResult:
    """Score ``detections`` (COCO result dicts: image_id, category_id, bbox xywh, score) against ``ground_truth``."""
    (COCO, COCOeval) = _pycocotools()
    category_ids = [cat["id"] for cat in ground_truth["categories"]]
    counts = {cat_id: 0 for cat_id in category_ids}
    for ann in ground_truth["annotations"]:
        counts[ann["category_id"]] += 1
    images = len(ground_truth["images"])
    if not detections or not ground_truth["annotations"]:
        per_class = [
            ClassAP(name, 0.0 if counts[c] else math.nan, 0.0 if counts[c] else math.nan, counts[c])
            for name, c in zip(class_names, category_ids, strict=True)
        ]
        return DetectionEvalResult(0.0, 0.0, per_class, images, len(detections))

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary table
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    # precision: [IoU thresholds, recall points, classes, areas, max detections]; -1 where undefined.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = []
    for k, (name, cat_id) in enumerate(zip(class_names, category_ids, strict=True)):
        (all_iou, at_50) = (precision[:, :, k], precision[0, :, k])
        per_class.append(ClassAP(name, _mean_defined(all_iou), _mean_defined(at_50), counts[cat_id]))
    return DetectionEvalResult(float(evaluator.stats[0]), float(evaluator.stats[1]), per_class, images, len(detections))


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else math.nan


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    data: CocoData,
    *,
    dist: DistInfo,
    size: tuple[int, int],
    rgb_stats: Any,
    batch_size: int = 8,
    workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress_bar: bool = True,
) -> tuple[DetectionEvalResult | None, frozenset[str]]:
    """Detect on every image of ``data`` (sharded over ranks) and score on the main process (None elsewhere).
    A collective call; returns the scores and the unreadable images, named by their error messages: they are left
    out of the scores with their boxes, as a missing file is."""
    dataset = evaluation_dataset(data, size, rgb_stats)
    sampler = EpochSampler(len(dataset), shuffle=False, rank=dist.rank, world_size=dist.world_size, pad=False)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_detection
    )
    was_training = model.training
    model.eval()
    (results, unreadable, dropped) = ([], set(), [])
    for batch in tqdm(loader, desc="detecting", unit="batch", leave=False, disable=not (dist.is_main and progress_bar)):
        unreadable.update(batch.unreadable)
        dropped += batch.dropped
        if batch.indices.numel() == 0:
            continue
        images = [image.to(dist.device) for image in batch.images]
        with autocast(dist.device, amp_dtype):
            outputs = model(images)
        for index, image, original, output in zip(
            batch.indices.tolist(), images, batch.original_sizes, outputs, strict=True
        ):
            results += _coco_results(data, index, output, image.shape[-2:], original)
    model.train(was_training)

    gathered = [row for rank_rows in all_gather_objects(results, dist) for row in rank_rows]
    dropped_all = [index for rank_dropped in all_gather_objects(dropped, dist) for index in rank_dropped]
    unreadable_all = distinct_over_ranks(unreadable, dist)
    if not dist.is_main:
        return (None, unreadable_all)

    names = names_by_index(data.class_to_idx)
    return (coco_scores(data.without(dropped_all).ground_truth, gathered, names), unreadable_all)


def _coco_results(data: CocoData, index: int, output: dict, tensor_hw, original_hw) -> list[dict[str, Any]]:
    boxes = rescale_boxes(output["boxes"].float().cpu(), tensor_hw, original_hw)
    image_id = data.images[index].image_id
    rows = []
    for (x1, y1, x2, y2), score, label in zip(
        boxes.tolist(), output["scores"].tolist(), output["labels"].tolist(), strict=True
    ):
        rows.append(
            {
                "image_id": image_id,
                "category_id": data.category_ids[label],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(score),
            }
        )
    return rows


def evaluate_detector_file(
    weights: str | Path,
    annotation_file: str | Path,
    *,
    images_root: str | Path | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str | None = None,
    progress_bar: bool = True,
) -> DetectionEvalResult:
    """Score a detector file on a COCO annotation file (the categories matched to the model's by name)."""
    from birder.net.detection.checkpoint import load_detector

    target = resolve_device(device)
    (net, info) = load_detector(weights, inference=True, device=target)
    data = read_coco(annotation_file, images_root, class_to_idx=info.class_to_idx)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=target)
    (result, unreadable) = evaluate_detector(
        net,
        data,
        dist=dist,
        size=net.size,
        rgb_stats=info.rgb_stats,
        batch_size=batch_size,
        workers=workers,
        progress_bar=progress_bar,
    )
    if unreadable:
        shown = sorted(unreadable)
        more = f"; and {len(shown) - _NAMED_UNREADABLE} more" if len(shown) > _NAMED_UNREADABLE else ""
        logger.warning(
            "%d image(s) could not be read, left out of the scores with their boxes (as missing files are): %s%s",
            len(shown),
            "; ".join(shown[:_NAMED_UNREADABLE]),
            more,
        )
    assert result is not None
    return result

"""``POST /v1/detect`` of ``birder-serve --detector``: every box the detector finds, each classified.

The photo is decoded once, within the server's decoding budget (:meth:`~birder.serve.app.ModelService.decoded`: the
photo and its crops are counted), the detector runs on it
(:func:`~birder.inference.detection.detect_tensors`, boxes scoring at least the threshold: ``--det-threshold``,
or ``threshold`` in the query or form), each box is cropped with the margin (:func:`~birder.inference.crops.crop_box`)
and its crop goes through the served classifier's own path: its transform and the batcher that
``/v1/classify`` uses (crops share batches with other requests), then the decision order (prior, unknown test,
thresholds, taxonomy).

Answer::

    {"model": ..., "detector": ..., "image": {"width": W, "height": H},
     "detections": [{"box": [x1, y1, x2, y2], "det_class": "bird", "det_score": 0.93,
                     "predictions": [{"species", "index", "probability"}, ...],
                     "label": ..., "rank": ..., "label_probability": ..., "unknown_score": ...}, ...],
     "timing_ms": {"detect": reading, decoding and detecting, "classify": the crops, "total"}}

Boxes are in the photo's pixels (EXIF orientation applied), best score first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from PIL import Image

from birder.inference.crops import crop_box
from birder.inference.detection import Detections, detect_tensors, detection_transform
from birder.io.checkpoint import ModelInfo, names_by_index
from birder.serve.openapi import DATE, LAT, LON, TOP_K, photo_route
from birder.serve.uploads import ApiError, parse_top_k, read_image_request, short_text

# The photo's place and date, and the answer: (probs, embedding, place, top_k) -> predictions and answer
AnswerFor = Callable[[np.ndarray, np.ndarray, dict[str, str], int], dict[str, Any]]
DETECT_FIELDS = {
    "threshold": {"type": "number", "minimum": 0, "maximum": 1, "description": "boxes scoring at least this"},
    "top_k": TOP_K,
    "lat": LAT,
    "lon": LON,
    "date": DATE,
}


@dataclass
class ServedDetector:
    """A detector behind ``/v1/detect``: the network (in eval mode), its file's info, and the defaults."""

    net: torch.nn.Module
    model_info: ModelInfo
    name: str = "detector"
    threshold: float = 0.5
    margin: float = 0.1
    lock: threading.Lock = field(default_factory=threading.Lock)  # one photo at a time through the detector

    def __post_init__(self) -> None:
        self.net.eval()
        self.transform = detection_transform(self.net.size, self.model_info.rgb_stats)
        self.class_names = names_by_index(self.model_info.class_to_idx)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "network": getattr(self.net, "network_name", None),
            "classes": self.class_names,
            "threshold": self.threshold,
            "crop_margin": self.margin,
        }

    def detect(self, photo: Image.Image, threshold: float) -> Detections:
        with self.lock:
            (found,) = detect_tensors(
                self.net, [self.transform(photo)], [(photo.height, photo.width)], score_threshold=threshold
            )
        return found


def load_served_detector(
    path: str | Path, device: torch.device | str, *, threshold: float = 0.5, margin: float = 0.1
) -> ServedDetector:
    """``birder-serve --detector FILE``: the detector file, in float32 on ``device``."""
    from birder.inference.model import load_for_inference

    loaded = load_for_inference(weights=path, detector=True, device=torch.device(device))
    return ServedDetector(loaded.net, loaded.info, Path(path).stem, threshold, margin)


def _threshold(raw: str | None, default: float) -> float:
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"threshold must be a number, got '{short_text(raw)}'") from None
    if not 0.0 <= value <= 1.0:
        raise ApiError(400, f"threshold must be between 0 and 1, got {value}")
    return value


def add_detect_route(
    app: FastAPI,
    service: Any,
    detector: ServedDetector,
    answer_for: AnswerFor,
    check_place: Callable[[dict[str, str]], None],
) -> None:
    """``POST /v1/detect`` on ``app`` (see the module's docstring); ``check_place`` refuses a bad ``lat``, ``lon``
    or ``date`` before the photo is decoded."""

    def find(photo: Image.Image, threshold: float) -> tuple[tuple[int, int], Detections, list[torch.Tensor]]:
        """In a decode thread: the boxes, and each box's crop at the model's input (the photo is let go after)."""
        found = detector.detect(photo, threshold)
        crops = [service.transform(crop_box(photo, box, detector.margin)) for box in found.boxes.tolist()]
        return (photo.size, found, crops)

    @app.post("/v1/detect", openapi_extra=photo_route(DETECT_FIELDS))
    async def detect(request: Request) -> dict[str, Any]:
        async def handle() -> dict[str, Any]:
            started = time.perf_counter()
            (data, file_name, fields) = await read_image_request(request)
            place = {**fields, **request.query_params}
            top_k = parse_top_k(place.get("top_k"), service.settings.default_top_k, len(service.class_names))
            threshold = _threshold(place.get("threshold"), detector.threshold)
            check_place(place)
            (photo_size, found, crops) = await service.decoded(
                data, file_name, lambda photo: find(photo, threshold), crops=True
            )
            detected = time.perf_counter()
            results = await asyncio.gather(*(service.run_tensor(crop) for crop in crops))
            boxes = []
            for box, score, label, ((probs, embedding), _) in zip(
                found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), results, strict=True
            ):
                boxes.append(
                    {
                        "box": [round(value, 2) for value in box],
                        "det_class": detector.class_names[label],
                        "det_score": score,
                        **answer_for(probs, embedding, place, top_k),
                    }
                )
            done = time.perf_counter()
            return {
                "model": service.name,
                "detector": detector.name,
                "image": {"width": photo_size[0], "height": photo_size[1]},
                "detections": boxes,
                "timing_ms": {
                    "detect": round((detected - started) * 1000, 3),  # reading, decoding and the detector
                    "classify": round((done - detected) * 1000, 3),
                    "total": round((done - started) * 1000, 3),
                },
            }

        return await service.with_timeout(handle)

"""Reduced-scale JPEG decoding and the detector in bfloat16: what each saves on a 12 MP camera-trap photo, and what
each changes in the detector's answer.

    python -m benchmarks.decode                      # about 2-4 minutes on two CPU cores (vit_b16 detector, 512 px)
    python -m benchmarks.decode --tiny               # a smoke run (seconds)
    python -m benchmarks.decode --output decode.json

1. **Decode.** One textured 4000 x 3000 JPEG (quality 90; noise and clutter as in ``benchmarks.synthetic``: a flat
   image decodes unrealistically fast), decoded and resized to the detector's 512 px input: in full
   (:func:`~birder.io.images.load_image` and ``detection_transform``, today's path) and at the smallest DCT scale
   that keeps 512 px (:func:`~birder.io.images.load_image_reduced`). Then a 256 px classifier crop of a box of
   ``--box`` full-resolution pixels: cut from the full decode and resized, against cut from the decode at the
   scale that box needs (:meth:`~birder.io.images.ReducedImage.crop_resized`). Median of ``--runs`` each.
2. **The detector's input**: max and mean absolute difference (0..255 pixel units) between the two 512 px inputs,
   and, on a seeded Faster R-CNN at 512 px (class scores spread out, as ``tests/test_detector_dtype.py`` makes it),
   how many of its best boxes on full decodes are found on reduced decodes at IoU >= 0.9 with the same class, on
   ``--scenes`` generated scenes with objects.
3. **The detector in float32 and bfloat16** (backbone and pyramid; box operations float32:
   ``load_for_inference(detector=True, dtype=...)``): one photo per call, median of ``--runs`` after a warm-up, and
   the boxes' agreement. Where the CPU has neither AVX512-BF16 nor AMX, bf16 is emulated and the figure says so:
   there a run must keep float32 (``choose_dtype("auto")`` does).

Every figure is printed with the machine (CPU model, flags avx2 / avx512_bf16 / amx, threads).
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from benchmarks.inference import machine_description
from benchmarks.synthetic import make_scene
from birder.data.transforms import detection_transform
from birder.inference.crops import crop_box
from birder.inference.detection import Detections, detect_tensors
from birder.inference.optimize import cpu_flags, native_bf16
from birder.io.images import load_image, load_image_reduced
from birder.model_registry import registry
from birder.net.detection.base import DetectionBaseNet

STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def median_seconds(
    call: Callable[[], Any], runs: int, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> float:
    """The median time of ``runs`` calls after ``warmup``: wall time, or with ``clock=time.process_time`` this
    process's CPU time (all its threads): steadier than wall time on a machine shared with other jobs."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        started = clock()
        call()
        times.append(clock() - started)
    return statistics.median(times)


def wall_and_cpu(call: Callable[[], Any], runs: int) -> dict[str, float]:
    return {"wall_s": median_seconds(call, runs), "cpu_s": median_seconds(call, runs, clock=time.process_time)}


def write_photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A generated camera-trap-like photo (``size`` = (width, height)): cluttered texture with a few objects."""
    rng = np.random.default_rng(seed)
    scene = make_scene(rng, size=(size[1], size[0]), num_objects=(1, 3), area_range=(0.005, 0.2))
    scene.image.save(path, quality=90)
    return path


def seeded_detector(backbone: str, size: int, seed: int = 0, tiny: bool = False) -> DetectionBaseNet:
    torch.manual_seed(seed)
    config = {"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64} if tiny else None
    body = registry.net_factory(backbone, 0, config=config, size=(size, size))
    det = registry.detection_net_factory("faster_rcnn", 3, body, config={"rpn_post_nms_top_n_test": 300})
    with torch.no_grad():
        det.detector.roi_heads.box_predictor.cls_score.weight.mul_(20.0)  # random weights score every box alike
    return det.eval()


def matched(reference: Detections, candidate: Detections, top: int) -> list[float]:
    """For each of ``reference``'s ``top`` best boxes, the best IoU of a ``candidate`` box of the same class."""
    if not len(reference.boxes):
        return []
    if not len(candidate.boxes):
        return [0.0] * min(top, len(reference.boxes))
    iou = box_iou(reference.boxes[:top], candidate.boxes)
    same = reference.labels[:top, None] == candidate.labels[None, :]
    return torch.where(same, iou, torch.zeros_like(iou)).max(dim=1).values.tolist()


def decode_section(photo: Path, detector_size: int, crop_size: int, box_side: int, runs: int) -> dict[str, Any]:
    transform = detection_transform((detector_size, detector_size), STATS)
    full_path = wall_and_cpu(lambda: transform(load_image(photo)), runs)
    reduced = load_image_reduced(photo, detector_size)
    reduced_path = wall_and_cpu(lambda: transform(load_image_reduced(photo, detector_size).image), runs)
    decode_only = {
        f"reduction_{reduction}_cpu_s": median_seconds(
            lambda reduction=reduction: load_image_reduced(photo, max_reduction=reduction),
            runs,
            clock=time.process_time,
        )
        for reduction in (1, 2, 4, 8)
    }

    # A box of box_side x box_side in the middle of the frame, cut and resized for a crop_size classifier
    (width, height) = reduced.full_size
    box = ((width - box_side) / 2, (height - box_side) / 2, (width + box_side) / 2, (height + box_side) / 2)
    target = (crop_size, crop_size)
    crop_reduction = reduced.crop_reduction(box, 0.1, target)

    def full_crop() -> Image.Image:
        return crop_box(load_image(photo), box, 0.1).resize(target, Image.Resampling.BICUBIC, reducing_gap=None)

    def reduced_crop() -> Image.Image:
        crop = load_image_reduced(photo, max_reduction=crop_reduction).crop_resized(box, 0.1, target)
        assert crop is not None
        return crop

    full_crop_s = wall_and_cpu(full_crop, runs)
    reduced_crop_s = wall_and_cpu(reduced_crop, runs)
    difference = np.abs(np.asarray(full_crop(), np.float32) - np.asarray(reduced_crop(), np.float32))
    return {
        "photo": f"{width} x {height} JPEG, quality 90, {photo.stat().st_size / 1e6:.1f} MB",
        "detector_input_px": detector_size,
        "detector_reduction": reduced.reduction,
        "reduced_size": list(reduced.image.size),
        "decode_only": decode_only,
        "detector_decode_resize": {
            "full": full_path,
            "reduced": reduced_path,
            "cpu_speedup": full_path["cpu_s"] / reduced_path["cpu_s"],
        },
        "crop": {
            "box_px": box_side,
            "classifier_px": crop_size,
            "reduction": crop_reduction,
            "full": full_crop_s,
            "reduced": reduced_crop_s,
            "cpu_speedup": full_crop_s["cpu_s"] / reduced_crop_s["cpu_s"],
            "mean_abs_pixel_difference": float(difference.mean()),
        },
    }


def input_section(photos: list[Path], det: DetectionBaseNet, detector_size: int, top: int) -> dict[str, Any]:
    plain = detection_transform((detector_size, detector_size), {"mean": (0, 0, 0), "std": (1, 1, 1)})
    transform = detection_transform((detector_size, detector_size), STATS)
    (max_diff, mean_diff, ious) = (0.0, [], [])
    for photo in photos:
        full = load_image(photo)
        reduced = load_image_reduced(photo, detector_size)
        (a, b) = (plain(full), plain(reduced.image))
        if a.shape == b.shape:
            difference = (a - b).abs() * 255
            max_diff = max(max_diff, float(difference.max()))
            mean_diff.append(float(difference.mean()))
        hw = reduced.full_hw
        (expected, got) = detect_tensors(det, [transform(full), transform(reduced.image)], [hw, hw])
        ious += matched(expected, got, top)
    return {
        "photos": len(photos),
        "max_abs_pixel_difference": max_diff,
        "mean_abs_pixel_difference": statistics.mean(mean_diff) if mean_diff else None,
        "boxes_compared": len(ious),
        "boxes_iou_at_least_0.9": sum(iou >= 0.9 for iou in ious) / max(len(ious), 1),
        "median_iou": statistics.median(ious) if ious else None,
    }


def dtype_section(photo: Path, det_factory: Callable[[], DetectionBaseNet], size: int, runs: int, top: int) -> dict:
    flags = cpu_flags()
    native = native_bf16(flags)
    tensor = detection_transform((size, size), STATS)(load_image_reduced(photo, size).image)
    hw = (3000, 4000)
    results: dict[str, Any] = {"bf16_native": bool(native), "bf16_flags": native}
    found = {}
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        det = det_factory()
        if dtype is not None:
            det.convert_backbone(dtype)
        results[f"{name}_s"] = median_seconds(lambda det=det: detect_tensors(det, [tensor], [hw]), runs)
        found[name] = detect_tensors(det, [tensor], [hw])[0]
    ious = matched(found["float32"], found["bfloat16"], top)
    results["bf16_speedup"] = results["float32_s"] / results["bfloat16_s"]
    results["bf16_boxes_iou_at_least_0.9"] = sum(iou >= 0.9 for iou in ious) / max(len(ious), 1)
    if not native:
        results["note"] = "bf16 is emulated on this CPU (no avx512_bf16 / amx_bf16): runs must keep float32 here"
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/birder_bench_decode"))
    parser.add_argument("--backbone", default="vit_b16", help="the detector's backbone (default: the card's)")
    parser.add_argument("--detector-size", type=int, default=512)
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--box", type=int, default=800, help="the side of the cropped box, full-resolution px")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--top", type=int, default=10, help="best boxes compared per photo")
    parser.add_argument("--sections", nargs="+", default=["decode", "input", "dtype"])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: small photos and network, one run")
    parser.add_argument("--output", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)

    photo_size = (800, 600) if args.tiny else (4000, 3000)
    if args.tiny:
        (args.runs, args.scenes, args.detector_size, args.crop_size, args.box) = (1, 2, 128, 64, 200)
    args.workdir.mkdir(parents=True, exist_ok=True)
    photos = [write_photo(args.workdir / f"scene_{i}_{photo_size[0]}.jpg", photo_size, i) for i in range(args.scenes)]

    machine = machine_description(torch.device("cpu"))
    flags = cpu_flags()
    machine["flags_of_note"] = {flag: flag in flags for flag in REPORTED_FLAGS}
    report: dict[str, Any] = {"machine": machine}
    print(f"CPU: {machine['cpu_model']}, {machine['threads']} threads; flags: {machine['flags_of_note']}")

    def factory() -> DetectionBaseNet:
        return seeded_detector(args.backbone, args.detector_size, tiny=args.tiny)

    if "decode" in args.sections:
        report["decode"] = decode_section(photos[0], args.detector_size, args.crop_size, args.box, args.runs)
        print(json.dumps(report["decode"], indent=1))
    if "input" in args.sections:
        report["detector_input"] = input_section(photos, factory(), args.detector_size, args.top)
        print(json.dumps(report["detector_input"], indent=1))
    if "dtype" in args.sections:
        report["detector_dtype"] = dtype_section(photos[0], factory, args.detector_size, args.runs, args.top)
        print(json.dumps(report["detector_dtype"], indent=1))
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()

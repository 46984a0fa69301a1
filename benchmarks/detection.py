"""Detector inference speed (images/s) at several input sizes, and the mAP curve of a training run.

    python -m benchmarks.detection --backbone vit_b16 --heads faster_rcnn retinanet --sizes 512 1024
    python -m benchmarks.detection --tiny                       # a tiny ViT at 64 / 128 px: a smoke run
    python -m benchmarks.detection --metrics runs/det/det_metrics.csv   # adds the run's mAP@.5 by epoch

Random weights: speed does not depend on them (NMS aside, whose share is small with few boxes). Not yet measured
here: crop-then-classify against whole-image top-1 (a later session).
"""

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from birder.model_registry import registry

TINY_BACKBONE = {"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}
TINY_HEAD = {"fpn_channels": 16}


def images_per_s(head: str, backbone: str, size: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    body = registry.net_factory(backbone, 0, config=TINY_BACKBONE if args.tiny else None, size=(size, size))
    det = registry.detection_net_factory(head, 4, body, config=TINY_HEAD if args.tiny else None, size=(size, size))
    det = det.eval().to(args.device)
    images = [torch.randn(3, size, size, device=args.device) for _ in range(args.batch_size)]
    timings = []
    with torch.inference_mode():
        for run in range(args.warmup + args.runs):
            started = time.perf_counter()
            det(images)
            if run >= args.warmup:
                timings.append(time.perf_counter() - started)
    median = sorted(timings)[len(timings) // 2]
    return {"head": head, "backbone": backbone, "size": size, "images_per_s": args.batch_size / median}


def map_curve(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [
            {"epoch": int(row["epoch"]), "map": float(row["map"]), "map50": float(row["map50"])}
            for row in csv.DictReader(handle)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b16")
    parser.add_argument("--heads", nargs="+", default=["faster_rcnn", "retinanet"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--metrics", type=Path, help="a det_metrics.csv of birder-train-det")
    parser.add_argument("--tiny", action="store_true", help="tiny ViT at 64 and 128 px (smoke run)")
    parser.add_argument("--output", type=Path, default=Path("detection.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        (args.backbone, args.sizes, args.runs, args.warmup) = ("vit_t16", [64, 128], 1, 0)

    report = {"speed": [images_per_s(head, args.backbone, size, args) for head in args.heads for size in args.sizes]}
    if args.metrics is not None:
        report["map_curve"] = map_curve(args.metrics)
    for row in report["speed"]:
        print(f"{row['head']:<12} {row['backbone']} {row['size']:>5} px: {row['images_per_s']:.2f} images/s")
    args.output.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

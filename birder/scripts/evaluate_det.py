"""``birder-eval-det``: score a detector file on COCO annotations (mAP@[.5:.95], mAP@.5, per-class AP).

birder-eval-det --weights runs/det/faster_rcnn_vit_b16_24.pt test.json [--images photos/]
"""

import argparse
import math

from birder.scripts.evaluate import add_scoring_arguments, scoring_options
from birder.training.cli import run_cli
from birder.training.detection_eval import DetectionEvalResult, evaluate_detector_file

PROG = "birder-eval-det"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Score a detector on COCO-format annotations.")
    parser.add_argument("annotations", help="COCO annotation file")
    parser.add_argument("--weights", required=True, help="detector file (birder-train-det's <stem>_<epoch>.pt)")
    parser.add_argument("--images", help="folder the file_names are relative to (default: the JSON's folder)")
    add_scoring_arguments(parser, batch_size=8, workers=2, amp=False)
    return parser


def format_report(result: DetectionEvalResult) -> str:
    def number(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.4f}"

    lines = [
        f"images: {result.images}  detections: {result.detections}",
        f"mAP@[.5:.95]: {number(result.map)}  mAP@.5: {number(result.map50)}",
    ]
    width = max([len("class"), *(len(c.name) for c in result.per_class)])
    lines.append(f"{'class':<{width}}  {'AP':>6}  {'AP@.5':>6}  boxes")
    lines += [f"{c.name:<{width}}  {number(c.ap):>6}  {number(c.ap50):>6}  {c.boxes:>5}" for c in result.per_class]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        result = evaluate_detector_file(
            args.weights, args.annotations, images_root=args.images, **scoring_options(args)
        )
        print(format_report(result))

    return run_cli(PROG, run, resume_hint=False)


if __name__ == "__main__":
    raise SystemExit(main())

"""``birder-eval``: score a classifier checkpoint on labeled images.

birder-eval runs/ft/vit_b16_50.pt birds/test/            # an ImageFolder root: <class>/<images>
birder-eval model.pt labels.csv --output-dir report/      # path,label rows; per-class CSV + confusion matrix
"""

import argparse
import math

from birder.training.amp import AMP_DTYPES
from birder.training.cli import run_cli
from birder.training.evaluation import EvalResult, evaluate_checkpoint, write_eval_outputs

PROG = "birder-eval"
# Above this many classes the per-class table goes to --output-dir only.
_MAX_PRINTED_CLASSES = 50


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Score a classifier checkpoint on labeled images.")
    parser.add_argument("checkpoint", help="a .pt or .safetensors classifier file")
    parser.add_argument("data", help="an ImageFolder root (<class>/<images>) or a CSV file of path,label rows")
    parser.add_argument("--network", help="for files that do not name their network (e.g. vit_l16)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", help="auto (the default: CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), help="mixed precision")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--output-dir", help="write per_class.csv, confusion_matrix.csv and confusion_matrix.png")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def format_report(result: EvalResult, unreadable: int) -> str:
    def number(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.4f}"

    lines = [
        f"images: {result.samples}" + (f" ({unreadable} unreadable, skipped)" if unreadable else ""),
        f"loss: {number(result.loss)}  top-1: {number(result.top1)}  top-{result.k}: {number(result.top_k)}  "
        f"ECE: {number(result.ece)}",
    ]
    if len(result.per_class) <= _MAX_PRINTED_CLASSES:
        width = max(len(c.name) for c in result.per_class)
        lines.append(f"{'class':<{width}}  precision  recall  support")
        lines += [
            f"{c.name:<{width}}  {number(c.precision):>9}  {number(c.recall):>6}  {c.support:>7}"
            for c in result.per_class
        ]

    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        (result, unreadable) = evaluate_checkpoint(
            args.checkpoint,
            args.data,
            network=args.network,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            amp=args.amp,
            top_k=args.top_k,
            progress_bar=not args.no_progress,
        )
        print(format_report(result, unreadable))
        if args.output_dir:
            write_eval_outputs(result, args.output_dir)

    return run_cli(PROG, run)


if __name__ == "__main__":
    raise SystemExit(main())

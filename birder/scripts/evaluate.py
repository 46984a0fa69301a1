"""``birder-eval``: score a classifier on labeled images.

birder-eval --weights runs/ft/vit_b16_50.pt birds/test/      # an ImageFolder root: <class>/<images>
birder-eval -n vit_l16_mim-eu-common labels.csv --output-dir report/   # path,label rows; per-class CSV + matrix
birder-eval runs/ft/vit_b16_50.pt birds/test/                # the older form: the file first, then the data
birder-eval --weights calibrated.pt birds/test/ --unknown-dir others/ --taxonomy taxonomy.csv --output-dir report/

A calibrated model (``birder-calibrate``) also gets its ECE, NLL and Brier score before and after the temperature
and a reliability diagram; ``--unknown-dir`` (photos of classes outside the model) the AUROC and FPR at 95 % TPR of
each unknown test; ``--taxonomy`` the precision and species-level share of the fallback answers per threshold.
"""

import argparse
import math
from pathlib import Path
from typing import Any

from birder.inference.taxonomy import Taxonomy
from birder.io.outputs import OutputFolder, check_outside_photos
from birder.runs.eval_reports import answer_reports
from birder.scripts.common import add_model_arguments, add_run_arguments
from birder.training.cli import run_cli
from birder.training.evaluation import EvalResult, score_checkpoint, write_eval_outputs

PROG = "birder-eval"
# Above this many classes the per-class table goes to --output-dir only.
_MAX_PRINTED_CLASSES = 50


def add_scoring_arguments(parser: argparse.ArgumentParser, *, batch_size: int, workers: int, amp: bool) -> None:
    """How a scoring run goes (``birder-eval``, ``birder-eval-det``): the execution options every command shares
    (:func:`birder.run_options.add_run_arguments`); :func:`scoring_options` turns them into the scoring functions'
    keyword arguments."""
    add_run_arguments(parser, batch_size=batch_size, num_workers=workers, amp=amp)


def scoring_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "batch_size": args.batch_size,
        "workers": args.num_workers,
        "device": args.device,
        "progress_bar": args.progress,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Score a classifier on labeled images.")
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="[MODEL_FILE] DATA",
        help="an ImageFolder root (<class>/<images>) or a CSV file of path,label rows; without -n or --weights, the "
        "model file comes first",
    )
    add_model_arguments(parser)
    add_scoring_arguments(parser, batch_size=64, workers=4, amp=True)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--output-dir", help="write per_class.csv, confusion_matrix.csv and confusion_matrix.png")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier report in --output-dir (only its files go)"
    )
    parser.add_argument("--unknown-dir", metavar="DIR", help="photos of classes outside the model: unknown detection")
    parser.add_argument("--taxonomy", metavar="CSV", help="species,genus,family,order rows: fallback per threshold")
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    named = args.model is not None or args.weights is not None
    if len(args.inputs) == 2 and not named:  # the older form, MODEL_FILE DATA
        (args.weights, args.data) = args.inputs
    elif len(args.inputs) == 1 and named:
        args.data = args.inputs[0]
    else:
        parser.error("give the model with -n NAME or --weights FILE (or as a file before DATA), then one DATA")

    return args


# What birder-eval writes in --output-dir (birder.io.outputs: --overwrite deletes these and nothing else)
REPORT_OUTPUTS = (
    "per_class.csv",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "calibration.csv",
    "reliability_diagram.png",
    "unknown_detection.csv",
    "taxonomy_coverage.csv",
    "taxonomy_coverage.png",
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        # A bad taxonomy file, or a folder of an earlier report, is refused before the model runs: nothing written
        taxonomy = Taxonomy.from_csv(args.taxonomy) if args.taxonomy else None
        report_folder = None
        if args.output_dir:
            # Fixed names say which files are a report's: no manifest beside them
            report = Path(args.output_dir)
            report_folder = OutputFolder(report, PROG, REPORT_OUTPUTS, record=False, can_resume=False)
            report_folder.check(inputs=(args.weights, args.data, args.taxonomy), overwrite=args.overwrite)
            # Its pictures inside the labelled folders would be a class of their own in the next evaluation
            check_outside_photos(report, (args.data, args.unknown_dir), "--output-dir")
        scores = score_checkpoint(
            args.weights,
            args.data,
            name=args.model,
            network=args.network,
            amp=args.amp,
            top_k=args.top_k,
            **scoring_options(args),
        )
        reports = answer_reports(
            scores,
            unknown_dir=args.unknown_dir,
            taxonomy=taxonomy,
            batch_size=args.batch_size,
            workers=args.num_workers,
            progress=args.progress,
        )
        print(format_report(scores.result, scores.unreadable))
        if reports.format():
            print(reports.format())
        if report_folder is not None:  # after every report is computed: a user error leaves no partial report
            report_folder.claim(inputs=(args.weights, args.data, args.taxonomy), overwrite=args.overwrite)
            write_eval_outputs(scores.result, args.output_dir)
            reports.write(args.output_dir)
            report_folder.finish()

    return run_cli(PROG, run, resume_hint=False)


if __name__ == "__main__":
    raise SystemExit(main())

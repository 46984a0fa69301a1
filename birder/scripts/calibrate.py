"""``birder-calibrate``: fit a model's temperature (and per-species thresholds, and an unknown test) on labelled
photos, into a calibrated copy of the model file.

Examples::

    birder-calibrate --weights model.pt --val birds/val/ -o calibrated.pt
    birder-calibrate -n vit_l16_mim-eu-common --val val.csv --train train.csv -o calibrated.pt \\
        --target-precision 0.95 --keep-known 0.95

The run is :func:`birder.runs.calibrate.calibrate_model_file`; this module turns arguments into its options
and prints what was fitted. A mistake the user can fix ends with one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from birder.inference.stand_ins import DEFAULT_PER_KIND
from birder.inference.unknown import DEFAULT_BANK_PER_CLASS, METHODS
from birder.inference.unknown_choice import DEFAULT_FOLDS
from birder.runs.calibrate import PROG, CalibrateOptions, CalibrationReport, calibrate_model_file
from birder.runs.predict import DEFAULT_WORKERS
from birder.scripts.common import add_run_arguments, model_command_parser
from birder.training.cli import run_cli

# Species named in a line of the report before it summarises
_SHOWN = 10


def build_parser() -> argparse.ArgumentParser:
    parser = model_command_parser(
        PROG,
        "Calibrate a classifier on labelled validation photos; writes a calibrated copy of the model "
        "(same weights, calibration in its metadata) and, with --train, its class statistics beside it.",
    )
    parser.add_argument("--val", required=True, metavar="DATA", help="validation photos: ImageFolder root or CSV")
    parser.add_argument("--train", metavar="DATA", help="training photos, for the embedding unknown tests")
    parser.add_argument(
        "-o", "--output", required=True, type=Path, metavar="FILE", help="the calibrated .pt/.safetensors"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace FILE (and its statistics) if it exists; never the input"
    )

    fit = parser.add_argument_group("thresholds")
    fit.add_argument("--target-precision", type=float, metavar="P", help="per-species thresholds for precision P")
    fit.add_argument("--min-photos", type=int, default=10, metavar="N", help="fewer predictions: the global threshold")
    fit.add_argument(
        "--keep-known", type=float, metavar="R", help="unknown thresholds keeping a share R of known photos"
    )
    fit.add_argument(
        "--unknown-method",
        choices=("auto", *METHODS),
        default="auto",
        help="default unknown test: auto (the best score on folds of held-out classes and on stand-ins made from the "
        "validation photos, printed; with --train the ensemble of the best knn and relative Mahalanobis and "
        "nearest_mahalanobis are scored too, and used only when named) or one named",
    )
    fit.add_argument("--unknown-threshold", type=float, metavar="S", help="the unknown test's threshold, given as is")
    fit.add_argument(
        "--unknown-folds",
        type=int,
        default=DEFAULT_FOLDS,
        metavar="N",
        help=f"folds over classes for choosing the unknown test (default: {DEFAULT_FOLDS})",
    )
    fit.add_argument(
        "--bank-per-class",
        type=int,
        default=DEFAULT_BANK_PER_CLASS,
        metavar="N",
        help=f"training embeddings kept per class for knn (default: {DEFAULT_BANK_PER_CLASS})",
    )
    fit.add_argument(
        "--stand-in-photos",
        type=int,
        default=DEFAULT_PER_KIND,
        metavar="N",
        help="stand-in unknowns made from the validation photos for choosing the unknown test, per kind (blend, "
        f"cutmix, shuffle, channels, rotate; 0: the folds alone; default: {DEFAULT_PER_KIND})",
    )
    fit.add_argument(
        "--seed", type=int, default=0, help="seed of the folds' draw of classes and of the made stand-ins (default: 0)"
    )

    add_run_arguments(parser, batch_size=32, num_workers=DEFAULT_WORKERS)
    return parser


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (" ..." if len(names) > _SHOWN else "")


def format_report(report: CalibrationReport) -> str:
    (before, after, calibration) = (report.before, report.after, report.calibration)
    lines = [
        f"validation photos: {report.val_photos}, training photos: {report.train_photos}, "
        f"unreadable: {report.unreadable}",
        f"temperature: {calibration.temperature:.4f}"
        + (f" ({calibration.temperature_note})" if calibration.temperature_note else ""),
        f"  validation ECE {before.ece:.4f} -> {after.ece:.4f}, NLL {before.nll:.4f} -> {after.nll:.4f}, "
        f"Brier {before.brier:.4f} -> {after.brier:.4f}",
    ]
    fit = report.thresholds
    if fit is not None:
        lines.append(
            f"per-species thresholds for precision {calibration.target_precision:g}: {len(fit.thresholds)} species"
        )
        if fit.too_few:
            lines.append(f"  {len(fit.too_few)} with too few photos keep the global threshold: {_names(fit.too_few)}")
        if fit.unreachable:
            lines.append(f"  {len(fit.unreachable)} never reach it (threshold 1.0): {_names(fit.unreachable)}")
    if report.choice is not None:
        lines.append(report.choice.format())
    if report.choice_note is not None:
        lines.append(f"unknown test not chosen: {report.choice_note}")
    if calibration.unknown_method is not None:
        fitted = ", ".join(f"{name} {value:.6g}" for (name, value) in calibration.unknown_thresholds.items())
        lines.append(f"unknown test: {calibration.unknown_method}; thresholds: {fitted}")
    written = [str(report.model_path)] + ([str(report.stats_path)] if report.stats_path else [])
    lines.append(f"wrote {' and '.join(written)}")
    return "\n".join(lines)


def options_from_args(args: argparse.Namespace) -> CalibrateOptions:
    # every argument's destination is the name of its option, the shared -j/--num-workers aside
    values = vars(args).copy()
    values["workers"] = values.pop("num_workers")
    return CalibrateOptions(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: print(format_report(calibrate_model_file(options_from_args(args)))), resume_hint=False)


if __name__ == "__main__":
    sys.exit(main())

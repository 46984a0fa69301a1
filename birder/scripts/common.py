"""What the console scripts share: how a command is told which model to use.

Every command takes a model the same way: ``-n NAME`` (a pretrained name, downloaded on first use) or
``--weights FILE`` (a checkpoint or an export), with ``--network`` for files that do not name their network.
:func:`birder.loading.load_named_or_file_model` turns the three into a model (and says in one line when neither
is given).
"""

import argparse
import sys
from collections.abc import Callable
from typing import Any

from birder.errors import BirderError

EXIT_FAILED = 1  # the run failed for no single input's sake (the model or the transform raised)
EXIT_USAGE = 2  # a mistake the user can fix
EXIT_INTERRUPTED = 130


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``model`` option group: ``-n/--name NAME`` (also spelled ``--model``), ``--weights FILE``, ``--network``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "-n",
        "--name",
        "--model",
        dest="model",
        metavar="NAME",
        help="pretrained model, e.g. vit_l16_mim-eu-common (with --weights: the file's network or pretrained name)",
    )
    group.add_argument("--weights", metavar="FILE", help="a local model file: .pt, .safetensors, .pts, .pt2 or .onnx")
    group.add_argument("--network", help="network of --weights when the file does not name it (e.g. vit_l16)")


def add_dtype_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--dtype`` of the commands that run a model: :func:`birder.inference.optimize.choose_dtype` decides "auto"."""
    from birder.inference.optimize import DTYPE_CHOICES

    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="auto (default): bfloat16 on CUDA and on CPUs with native bf16 (AMX, AVX512-BF16), float32 elsewhere",
    )


def add_decision_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``answer`` option group of the commands that label photos (birder-predict, birder-serve): how the
    label is decided from the probabilities (:mod:`birder.inference.decision`). The global threshold is each
    command's ``--min-prob``."""
    from birder.inference.decision import THRESHOLD_MODES
    from birder.inference.unknown import METHODS

    group = parser.add_argument_group("answer (label, rank, label_probability)")
    group.add_argument(
        "--uncalibrated",
        action="store_true",
        help="ignore the model's calibration: no temperature, no fitted thresholds or unknown test",
    )
    group.add_argument(
        "--thresholds",
        choices=THRESHOLD_MODES,
        default="per-species",
        help="species thresholds: the calibrated model's per species (else --min-prob), --min-prob for all, or none",
    )
    group.add_argument(
        "--taxonomy", metavar="CSV", help="species,genus,family,order rows: unclear species fall back to higher ranks"
    )
    group.add_argument(
        "--unknown-method",
        choices=(*METHODS, "none"),
        help="the unknown test (default: the calibrated model's, if any; none: no test)",
    )
    group.add_argument(
        "--unknown-threshold", type=float, metavar="S", help="unknown above this score (default: the calibrated one)"
    )


def run_command(prog: str, run: Callable[[], Any], *, quiet: bool = False) -> int:
    """Run a command's work and turn its errors into exit codes (birder-predict, birder-index).

    A :class:`~birder.errors.BirderError` (a mistake the user can fix) is one line on stderr and exit code 2; a
    :class:`~birder.inference.predictor.PredictionError` (the model or the transform failed: no photo's fault) exit
    code 1; an interruption exit code 130 and how to continue. ``quiet``: say nothing on error (another process
    of the same run says it).
    """
    from birder.inference.predictor import PredictionError

    try:
        run()
    except BirderError as exc:
        if not quiet:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, PredictionError) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0

"""What the console scripts share: how a command is told which model to use.

Every command takes a model the same way: ``-n NAME`` (a pretrained name, downloaded on first use) or
``--weights FILE`` (a checkpoint or an export), with ``--network`` for files that do not name their network.
:func:`birder.loading.load_named_or_file_model` turns the three into a model (and says in one line when neither
is given).
"""

import argparse
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from birder.inference.decision import DecisionOptions

# The execution options and the error wrapper every command shares (re-exported: scripts import them from here)
from birder.run_options import (  # noqa: F401
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    add_run_arguments,
    run_command,
    run_options,
)


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


def model_command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a command about one model (birder-calibrate, birder-serve): the ``model`` group first."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_model_arguments(parser)
    return parser


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


G = TypeVar("G")  # a group of options: a dataclass


def options_group(group: type[G], args: argparse.Namespace, **given: Any) -> G:
    """One typed group of a command's options (a dataclass) from its parsed arguments: each field from the argument
    of the same name, or from ``given`` (a field whose argument has another name, or a value worked out)."""
    parsed = vars(args)
    values = {field.name: given[field.name] if field.name in given else parsed[field.name] for field in fields(group)}
    return group(**values)


def decision_options(args: argparse.Namespace) -> "DecisionOptions":
    """The answer options of ``args`` (parsed by a parser with :func:`add_decision_arguments`)."""
    from birder.inference.decision import DecisionOptions

    return options_group(DecisionOptions, args)

"""What the console scripts share: how a command is told which model to use.

Every command takes a model the same way: ``-n NAME`` (a pretrained name, downloaded on first use) or
``--weights FILE`` (a checkpoint or an export), with ``--network`` for files that do not name their network.
:func:`birder.loading.load_named_or_file_model` turns the three into a model (and says in one line when neither
is given).
"""

import argparse


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

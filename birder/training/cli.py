"""What the training command lines share: common options, JSON options, and turning user errors into one line.

The console scripts in :mod:`birder.scripts` stay thin: parse, build a config, call the library.
"""

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any, TypeVar

from birder.data.shards import DEFAULT_SHUFFLE_BUFFER
from birder.data.transforms import RGB_STATS
from birder.run_options import EXIT_USAGE, add_run_arguments, run_command
from birder.training.ddp import setup_logging
from birder.training.setup import RESUME_LATEST

# Exit status of errors a user can cause (as argparse uses for bad arguments).
USER_ERROR = EXIT_USAGE
# Config fields named otherwise on the command line (the execution options every command shares)
_RUN_OPTION_FIELDS = {"workers": "num_workers", "progress_bar": "progress"}
ConfigT = TypeVar("ConfigT")


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object, e.g. ``'{"hidden_dim": 64, "num_layers": 2}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"hidden_dim\": 64}'")

    return value


def size_arg(text: str) -> int | tuple[int, int]:
    """argparse type: ``224`` or ``256x192`` (height x width)."""
    try:
        parts = [int(part) for part in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 256x192, got '{text}'") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])

    raise argparse.ArgumentTypeError(f"expected a size like 224 or 256x192, got '{text}'")


def add_training_args(
    parser: argparse.ArgumentParser, *, lr: float, weight_decay: float, epochs: int, fsdp: bool = True
) -> None:
    """Options both trainers take (schedule, precision, memory, checkpoints, resume, devices); ``fsdp``: offer
    ``--fsdp`` (birder-train and birder-train-mim)."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=epochs, help="length of the schedule (default: %(default)s)")
    group.add_argument("--stop-epoch", type=int, help="stop after this epoch (with a checkpoint); resume later")
    group.add_argument("--accumulation-steps", type=int, default=1, help="batches per optimizer step")
    group.add_argument("--lr", type=float, default=lr, help="peak learning rate (default: %(default)s)")
    group.add_argument("--min-lr", type=float, default=0.0, help="end of the cosine decay (default: %(default)s)")
    group.add_argument(
        "--wd", dest="weight_decay", type=float, default=weight_decay, help="weight decay (default: %(default)s)"
    )
    group.add_argument("--warmup-epochs", type=float, default=0.0, help="linear lr warm-up (default: %(default)s)")
    group.add_argument("--clip-grad-norm", type=float, help="clip the gradient norm to this value")
    group.add_argument("--drop-path", type=float, help="stochastic depth rate of the last block")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")

    group = parser.add_argument_group("memory")
    if fsdp:
        group.add_argument(
            "--fsdp",
            action="store_true",
            help="under torchrun: shard the weights, gradients and optimizer state over the processes (FSDP), "
            "each keeping 1/N, for models too large for DDP; model files are still written whole, training states "
            "as one shard per process (a DCP folder beside *_states.pt). Not with --compile",
        )
    group.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block's activations in the backward pass instead of keeping them: less memory, "
        "about a third more compute",
    )

    group = parser.add_argument_group("input")
    group.add_argument(
        "--size", type=size_arg, help="input size: 224 or HxW (default: the --init checkpoint's, else 224)"
    )
    group.add_argument(
        "--rgb-stats", choices=sorted(RGB_STATS), help="normalization (default: the --init checkpoint's, else birder)"
    )
    group.add_argument("--seed", type=int, default=0)

    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--output-dir",
        required=True,
        help="where checkpoints, metrics and images go (a folder that holds checkpoints needs --resume)",
    )
    group.add_argument("--save-every", type=int, default=10, help="epochs between checkpoints (last always saved)")
    group.add_argument("--save-every-steps", type=int, help="also save a resumable state every N optimizer steps")
    group.add_argument(
        "--resume",
        nargs="?",
        const=RESUME_LATEST,
        help="continue from a *_states.pt file, or (no value) from the latest one in --output-dir",
    )
    # device, batch size, data-loading workers, mixed precision (bf16 needs no loss scaling), progress bars
    add_run_arguments(parser, batch_size=64, num_workers=4, amp=True, batch_help="per process ")


def add_wds_args(group: argparse._ArgumentGroup, *, validation: bool = False) -> None:
    """Options of training from WebDataset tar shards (made by ``python -m birder.tools pack``)."""
    group.add_argument(
        "--wds",
        metavar="SHARDS",
        help="train from tar shards instead of files: a packed folder, or a pattern such as "
        "'shards/shard-{000000..000123}.tar' (quote it). Streamed, shuffled with a buffer, split over ranks and "
        "workers; every data-loader worker reads its rank's tars and decodes its own share of the batches",
    )
    if validation:
        group.add_argument("--val-wds", metavar="SHARDS", help="validation shards (instead of --val-dir/--val-csv)")
    group.add_argument(
        "--wds-shuffle-buffer",
        type=int,
        default=DEFAULT_SHUFFLE_BUFFER,
        metavar="N",
        help="samples in the shuffle buffer (default: %(default)s; memory: N x the mean photo file size, per "
        "data-loader worker)",
    )


def training_parser(prog: str, description: str, outputs: str) -> argparse.ArgumentParser:
    """The parser of a training script; ``outputs`` (the files it writes) is shown after the options."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=f"Outputs: {outputs}")


def config_from_args(config_class: type[ConfigT], args: argparse.Namespace, **overrides: Any) -> ConfigT:
    """A trainer's config dataclass from the parsed options of the same names (``dest`` says which field an option
    fills); ``overrides`` set fields the script computes itself (defaults that depend on the trainer)."""
    fields = dataclasses.fields(config_class)  # type: ignore[arg-type]
    names = {field.name: _RUN_OPTION_FIELDS.get(field.name, field.name) for field in fields}
    values = {field: getattr(args, option) for (field, option) in names.items() if hasattr(args, option)}
    return config_class(**{**values, **overrides})


def run_cli(prog: str, train: Callable[[], Any], *, resume_hint: bool = True) -> int:
    """Run ``train`` with logging set up, through :func:`birder.run_options.run_command` (the exit codes every
    command shares: a user error is one line and exit 2); ``resume_hint``: an interrupted run says to resume with
    --resume (the trainers; not the commands without it)."""
    setup_logging()
    return run_command(prog, train, resume_hint=resume_hint)

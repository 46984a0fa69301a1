"""What every command that runs a model shares: the ``execution`` options and how errors become exit codes.

One argument group, the same names and meanings in every command (birder-predict, birder-index, birder-calibrate,
birder-eval, birder-eval-det, birder-serve and the trainers), each offering the options that apply to it:

- ``--device``: ``auto`` (CUDA, then MPS, then the CPU), ``cpu``, ``cuda`` (under torchrun: this rank's GPU),
  ``cuda:N`` or ``mps``; checked when the run starts (:func:`birder.distributed.resolve_device`), so a bad name is
  one line, not a traceback, and parsing needs no GPU.
- ``-j/--num-workers N`` (also ``--workers``): processes (the server: threads) decoding photos.
- ``-b/--batch-size N``.
- ``--dtype``: what the weights are converted to (:func:`birder.inference.optimize.choose_dtype` decides ``auto``).
- ``--amp [bf16|fp16]``: run under autocast (mixed precision), the weights staying as they are. A bare ``--amp``
  (the older switch of birder-predict) is ``auto``: float16 on GPUs, bfloat16 on the CPU.
- ``--no-progress``: no progress bar.

:func:`run_command` runs a command's work: a :class:`~birder.errors.BirderError` (or an :class:`OSError`: an
unwritable folder, a full disk) is one line ``PROG: error: MESSAGE`` on stderr and exit code 2; a run that failed
for no input's sake (:class:`~birder.errors.RunFailedError`, e.g. a prediction error) exit code 1; an
interruption exit code 130.

This module imports only argparse and :mod:`birder.errors`: every layer may use it.
"""

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from birder.errors import BirderError, RunFailedError

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed for no single input's sake (the model or the transform raised)
EXIT_USAGE = 2  # a mistake the user can fix (as argparse uses for bad arguments)
EXIT_INTERRUPTED = 130

AMP_CHOICES = ("bf16", "fp16")
AMP_AUTO = "auto"  # a bare --amp
RESUME_HINT = "run the same command with --resume to continue"


def _whole_number(text: str, minimum: int, at_least: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got '{text}'") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {at_least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count, a size), one clear line otherwise."""
    return _whole_number(text, 1, "at least 1")


def positive_number(text: str) -> float:
    """An argparse type: a number above 0 (a size in MiB, a time in seconds), one clear line otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got '{text}'") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1 (a probability, a share), one clear line otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got '{text}'") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _workers(text: str) -> int:
    return _whole_number(text, 0, "0 (decode in the main process) or more")


def _amp(text: str) -> str:
    # argparse checks choices after the type: the bare switch's const ("auto") is no choice, so they are checked here
    if text not in (*AMP_CHOICES, AMP_AUTO):
        raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from {', '.join(AMP_CHOICES)})")
    return text


@dataclass(frozen=True)
class RunOptions:
    """The execution options of a parsed command line (None: the command does not offer that option)."""

    device: str = "auto"
    num_workers: int | None = None
    batch_size: int | None = None
    dtype: str | None = None
    amp: str | None = None  # None: full precision; "auto", "bf16" or "fp16": autocast
    progress: bool = True


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    workers_default_text: str | None = None,
    dtype: Sequence[str] | None = None,
    amp: bool = False,
    batch_help: str = "",
    workers_help: str = "processes decoding photos",
    progress: bool = True,
    title: str = "execution",
) -> argparse._ArgumentGroup:
    """Add the ``execution`` group to ``parser`` and return it (a command adds its own options to it).

    ``batch_size`` / ``num_workers``: the defaults, None to leave the option out (``num_workers`` may default to
    None when the run picks the number itself, ``workers_default_text`` then says how). ``dtype``: offer
    ``--dtype`` with these choices (:data:`birder.inference.optimize.DTYPE_CHOICES`); ``amp``: offer ``--amp``;
    ``progress``: offer ``--no-progress``. Destinations: ``device``, ``num_workers``, ``batch_size``, ``dtype``,
    ``amp``, ``progress`` (read them with :func:`run_options`).
    """
    group = parser.add_argument_group(title)
    group.add_argument(
        "--device",
        default="auto",
        help="auto (the default: CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps",
    )
    if batch_size is not None:
        group.add_argument(
            "-b",
            "--batch-size",
            type=positive_int,
            default=batch_size,
            metavar="N",
            help=f"{batch_help}(default: {batch_size})".strip(),
        )
    if num_workers is not None or workers_default_text is not None:
        shown = workers_default_text or str(num_workers)
        group.add_argument(
            "-j",
            "--num-workers",
            "--workers",
            dest="num_workers",
            type=_workers,
            default=num_workers,
            metavar="N",
            help=f"{workers_help} (default: {shown})",
        )
    if dtype is not None:
        group.add_argument(
            "--dtype",
            choices=dtype,
            default="auto",
            help="the weights' dtype; auto (default): bfloat16 on CUDA and on CPUs with native bf16 (AMX, "
            "AVX512-BF16), float32 elsewhere",
        )
    if amp:
        group.add_argument(
            "--amp",
            nargs="?",
            const=AMP_AUTO,
            type=_amp,
            metavar="{bf16,fp16}",
            help="mixed precision (autocast) in bf16 or fp16; a bare --amp: float16 on GPUs, bfloat16 on the CPU",
        )
    if progress:
        group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return group


def run_options(args: argparse.Namespace) -> RunOptions:
    """The execution options of ``args`` (parsed by a parser with :func:`add_run_arguments`)."""
    return RunOptions(
        device=args.device,
        num_workers=getattr(args, "num_workers", None),
        batch_size=getattr(args, "batch_size", None),
        dtype=getattr(args, "dtype", None),
        amp=getattr(args, "amp", None),
        progress=getattr(args, "progress", True),
    )


def run_command(prog: str, run: Callable[[], Any], *, quiet: bool = False, resume_hint: bool = False) -> int:
    """Run a command's work and turn its errors into exit codes: 0, 1 (the run failed), 2 (a mistake the user can
    fix: one line ``PROG: error: MESSAGE``), 130 (interrupted). ``run`` may return an exit code itself.

    ``quiet``: say nothing on error (another process of the same run says it). ``resume_hint``: an interrupted run
    can be continued with ``--resume`` (the line says so).
    """
    try:
        code = run()
    except BirderError as exc:
        if not quiet:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, RunFailedError) else EXIT_USAGE
    except OSError as exc:  # an unwritable output folder, a full disk: the user can fix it
        if not quiet:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f"; {RESUME_HINT}" if resume_hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else EXIT_OK

"""The ``birder.tools`` command line: one subcommand per module, each with ``add_parser`` and ``run``.

A mistake the user can fix (an unknown name, a missing file) ends with one line on stderr and exit code 2
(:func:`birder.run_options.run_command`, as every command).
"""

import argparse
import logging
from collections.abc import Sequence

from birder.log_setup import configure_logging
from birder.run_options import EXIT_USAGE, run_command  # noqa: F401 (EXIT_USAGE: read here by callers)
from birder.tools import (
    convert_model,
    crops,
    download_model,
    export,
    list_models,
    merge_results,
    model_info,
    pack,
    review_crops,
    review_stats,
)

PROG = "python -m birder.tools"
COMMANDS = {
    "list-models": list_models,
    "download-model": download_model,
    "model-info": model_info,
    "convert-model": convert_model,
    "export": export,
    "pack": pack,
    "merge-results": merge_results,
    "crops": crops,
    "review-stats": review_stats,
    "review-crops": review_crops,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="birder model tools")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(subparsers, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library warnings (a shard not given, a table not merged) read like the errors: one line naming the command.
    configure_logging(logging.WARNING, f"{PROG} {args.command}: warning: %(message)s")
    return run_command(f"{PROG} {args.command}", lambda: COMMANDS[args.command].run(args))

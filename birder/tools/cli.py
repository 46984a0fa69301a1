"""The ``birder.tools`` command line: one subcommand per module, each with ``add_parser`` and ``run``.

A mistake the user can fix (an unknown name, a missing file) ends with one line on stderr and exit code 2.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

import birder.tools.review_crops
import birder.tools.review_stats
from birder.errors import BirderError
from birder.log_setup import configure_logging
from birder.tools import convert_model, download_model, export, list_models, merge_results, model_info, pack

PROG = "python -m birder.tools"
EXIT_USAGE = 2
COMMANDS = {
    "list-models": list_models,
    "download-model": download_model,
    "model-info": model_info,
    "convert-model": convert_model,
    "export": export,
    "pack": pack,
    "merge-results": merge_results,
    "review-stats": birder.tools.review_stats,
    "review-crops": birder.tools.review_crops,
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
    try:
        return COMMANDS[args.command].run(args)
    except BirderError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

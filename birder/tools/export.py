"""``export``: write camera-trap exports of an existing ``birder-predict`` results folder.

    python -m birder.tools export results/ --export camtrap-dp --timezone Europe/Vienna
    python -m birder.tools export results/ --export coco-ct --export camtrap-dp --timezone +02:00

The same exports as ``birder-predict --export`` (:func:`birder.geo.export.export_results`), written into the
results folder (``camtrap-dp/``, ``coco-ct.json``) or ``--output-dir``.
"""

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any, name: str) -> None:
    from birder.geo.export import add_export_arguments

    parser = subparsers.add_parser(name, help="Camtrap DP / COCO Camera Traps exports of a results folder")
    parser.add_argument("results_dir", type=Path, metavar="RESULTS_DIR", help="a birder-predict output folder")
    parser.add_argument("--output-dir", type=Path, metavar="DIR", help="where to write (default: RESULTS_DIR)")
    add_export_arguments(parser, required=True)


def run(args: argparse.Namespace) -> int:
    from birder.geo.export import export_options, export_results

    for report in export_results(args.results_dir, args.exports, export_options(args), args.output_dir):
        for line in report.lines:
            print(line)
        print(f"  wrote {report.path}")
    return 0

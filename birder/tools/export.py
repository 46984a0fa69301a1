"""``export``: write camera-trap exports of an existing ``birder-predict`` results folder.

    python -m birder.tools export results/ --export camtrap-dp --timezone Europe/Vienna
    python -m birder.tools export results/ --export coco-ct --export camtrap-dp --timezone +02:00

The same exports as ``birder-predict --export`` (:func:`birder.geo.export.export_results`), written into the
results folder (``camtrap-dp/``, ``coco-ct.json``) or ``--output-dir``.
"""

import argparse
from pathlib import Path
from typing import Any

PROG = "python -m birder.tools export"


def add_parser(subparsers: Any, name: str) -> None:
    from birder.geo.export import add_export_arguments

    parser = subparsers.add_parser(name, help="Camtrap DP / COCO Camera Traps exports of a results folder")
    parser.add_argument("results_dir", type=Path, metavar="RESULTS_DIR", help="a birder-predict output folder")
    parser.add_argument("--output-dir", type=Path, metavar="DIR", help="where to write (default: RESULTS_DIR)")
    parser.add_argument("--overwrite", action="store_true", help="replace exports written before")
    add_export_arguments(parser, required=True)


def check_targets(args: argparse.Namespace) -> None:
    """Refuse, before anything is written, an export that would replace an earlier one (without --overwrite) or
    a file of the results folder."""
    from birder.geo.camtrap import TABLES
    from birder.geo.coco import FILE_NAME as COCO_FILE
    from birder.geo.export import CAMTRAP_DIR
    from birder.io.journal import RUN_INFO_FILE
    from birder.io.outputs import OutputFolder, check_output_file

    target = Path(args.output_dir or args.results_dir)
    # What the exports are made of (birder.geo.results.read_results_folder)
    tables = [f"{name}.{fmt}" for name in ("results", "events") for fmt in ("csv", "parquet")]
    inputs = [args.results_dir / name for name in (*tables, RUN_INFO_FILE)]
    for fmt in dict.fromkeys(args.exports):
        if fmt == "camtrap-dp":
            # A Camtrap DP package is the four files and nothing else: no manifest of ours among them
            files = ("datapackage.json", *(f"{table}.csv" for table in TABLES))
            package = OutputFolder(target / CAMTRAP_DIR, PROG, files, "--export camtrap-dp", False, False)
            package.check(inputs=inputs, overwrite=args.overwrite)
        elif fmt == "coco-ct":
            check_output_file(target / COCO_FILE, inputs=inputs, overwrite=args.overwrite, option="--export coco-ct")


def run(args: argparse.Namespace) -> int:
    from birder.geo.export import export_options, export_results

    check_targets(args)
    for report in export_results(args.results_dir, args.exports, export_options(args), args.output_dir):
        for line in report.lines:
            print(line)
        print(f"  wrote {report.path}")
    return 0

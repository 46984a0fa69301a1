"""``merge-results``: the output folders of ``birder-predict --shard K/N`` jobs as one folder, in the order of the
photo list (what is merged and what is refused: :mod:`birder.runs.merge`).

    python -m birder.tools merge-results out/1 out/2 out/3 -o merged
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from birder.runs.merge import merge_results

PROG = "python -m birder.tools merge-results"


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="merge the output folders of birder-predict --shard jobs into one",
        description="Merge the output folders of birder-predict --shard K/N jobs into one, in the photo list's "
        "order. Tables are merged (streamed); photos of the list in no shard are listed in missing.txt; shards "
        "of other settings, manifests or splits, and unfinished shards, are refused.",
    )
    parser.add_argument("outputs", nargs="+", metavar="OUTPUT", help="the shards' --output-dir folders (any order)")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, metavar="MERGED", help="the merged folder")
    manifest_help = "where the shards' manifest is now (default: the path their run.json records); checked by sha256"
    parser.add_argument("--manifest", type=Path, metavar="FILE", help=manifest_help)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier merge (or run) in MERGED: only its files go"
    )


def run(args: argparse.Namespace) -> int:
    report = merge_results(args.outputs, args.output_dir, args.manifest, overwrite=args.overwrite)
    print(
        f"Merged {len(report.shards)} of {report.count} shards ({report.photos} photos "
        f"{report.described}) into {report.output_dir}"
    )
    for name, (path, rows) in report.tables.items():
        print(f"  {name:<13} {path} ({rows} rows)")
    if report.missing:
        where = f": listed in {report.missing_file}" if report.missing_file is not None else ""
        print(
            f"{PROG}: warning: {report.missing} photo(s) of the list are in no shard's tables{where}", file=sys.stderr
        )
        print(
            f"  to classify them: the shards' birder-predict command without --shard, plus --resume --output-dir "
            f"{report.output_dir}"
        )
    else:
        print("  every photo of the list is in the merged tables")
    return 0

"""``birder-prior``: build and inspect location-and-season priors (``.bpr`` files).

Examples::

    birder-prior build occurrences.csv --classes vit_l16_mim-eu-common.pt -o europe.bpr
    birder-prior build gbif.parquet --classes model.pt --mapping names.csv -o prior.bpr
    birder-prior info europe.bpr
    birder-prior lookup europe.bpr --lat 48.2 --lon 16.37 --date 2024-05-14

The work is :func:`birder.geo.build.build_prior_file` and :mod:`birder.geo.prior`; a mistake the user can fix ends
with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from birder.errors import BirderError
from birder.run_options import EXIT_USAGE, positive_int, run_command  # noqa: F401 (EXIT_USAGE: read here by callers)

PROG = "birder-prior"


def _add_build(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser("build", help="count occurrence records into a prior for a model's classes")
    build.add_argument("records", type=Path, help="CSV (comma or tab separated) or Parquet of occurrence records")
    build.add_argument(
        "--classes", required=True, metavar="MODEL", help="the model file whose classes the prior is for (or a .txt)"
    )
    build.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="the prior file (.bpr)")
    build.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    build.add_argument("--mapping", type=Path, metavar="CSV", help="record name,class name rows for other names")
    build.add_argument(
        "--column", action="append", default=[], metavar="FIELD=NAME", help="a column name the file uses for a field"
    )
    # Settings not given are chosen from the records (held-out log-likelihood over spatial blocks); given ones stay
    chosen = "(default: chosen from the records)"
    build.add_argument("--resolutions", type=int, nargs="+", metavar="R", help=f"H3 resolutions {chosen}")
    build.add_argument("--kernel-days", type=float, metavar="D", help=f"season kernel SD in days {chosen}")
    build.add_argument("--floor", type=float, metavar="F", help=f"share of the mass spread evenly {chosen}")
    build.add_argument(
        "--pseudo-count", type=float, metavar="A", help=f"records a cell needs to outweigh its parent {chosen}"
    )
    build.add_argument(
        "--no-search",
        action="store_true",
        help="do not choose settings from the records: the given ones, the fixed defaults for the others",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Location-and-season priors from occurrence records.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(subparsers)
    info = subparsers.add_parser("info", help="what a prior file holds")
    info.add_argument("prior", type=Path)
    lookup = subparsers.add_parser("lookup", help="the most likely species at a place (and day)")
    lookup.add_argument("prior", type=Path)
    lookup.add_argument("--lat", type=float, required=True)
    lookup.add_argument("--lon", type=float, required=True)
    lookup.add_argument("--date", help="YYYY-MM-DD (without: the year-round prior)")
    lookup.add_argument("--top", type=positive_int, default=10, metavar="N", help="how many species (default: 10)")
    return parser


def run_build(args: argparse.Namespace) -> int:
    from birder.geo.build import build_prior_file
    from birder.geo.prior import PriorSettings
    from birder.geo.records import parse_column_overrides

    given = {
        "resolutions": tuple(args.resolutions) if args.resolutions else None,
        "kernel_days": args.kernel_days,
        "floor": args.floor,
        "pseudo_count": args.pseudo_count,
    }
    fixed = {name: value for (name, value) in given.items() if value is not None}
    PriorSettings(**fixed)  # a bad value is refused before the records are read
    report = build_prior_file(
        args.records,
        args.classes,
        args.output,
        mapping=args.mapping,
        columns=parse_column_overrides(args.column),
        fixed=fixed,
        search=not args.no_search,
        overwrite=args.overwrite,
    )
    for line in report.records.lines():
        print(line)
    for line in report.choice.lines() if report.choice is not None else []:
        print(line)
    cells = ", ".join(f"r{r}: {len(level.cells):,}" for (r, level) in report.prior.levels.items())
    print(f"wrote {args.output} ({report.file_bytes / 1024:.0f} KiB; cells {cells}) in {report.seconds:.1f} s")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from birder.geo.prior_file import load_prior

    print(json.dumps(load_prior(args.prior).describe(), indent=2))
    return 0


def run_lookup(args: argparse.Namespace) -> int:
    import numpy as np

    from birder.geo.prior_file import load_prior

    prior = load_prior(args.prior)
    answer = prior.lookup((args.lat, args.lon), args.date)
    if answer.vector is None:
        raise BirderError(f"no prior at latitude {args.lat}, longitude {args.lon} (not a valid position)")
    if args.date is not None and answer.mode != "place_day":
        raise BirderError(f"--date '{args.date}' is not a date (YYYY-MM-DD)")
    print(f"prior ({answer.mode}); an even prior gives each class {1 / prior.num_classes:.5f}")
    for index in np.argsort(-answer.vector, kind="stable")[: args.top]:
        print(f"  {prior.classes[index]:<40} {answer.vector[index]:.5f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"build": run_build, "info": run_info, "lookup": run_lookup}
    return run_command(f"{PROG} {args.command}", lambda: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())

"""``review-stats``: what the decisions of ``birder-review`` say about the machine's answers.

    python -m birder.tools review-stats results/
    python -m birder.tools review-stats results/ --json stats.json

Agreement, corrections by probability band, per-species precision with a 95 % interval and review speed
(:mod:`birder.review.stats`).
"""

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(name, help="agreement, corrections and precision from a birder-review")
    parser.add_argument("results_dir", type=Path, metavar="RESULTS_DIR", help="a birder-predict output folder")
    parser.add_argument("--reviews", type=Path, metavar="FILE", help="the decisions (default: RESULTS_DIR/reviews.csv)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")


def run(args: argparse.Namespace) -> int:
    from birder.errors import BirderError
    from birder.io.atomic import atomic_write_text
    from birder.review.answers import read_reviewed
    from birder.review.stats import format_stats, review_stats

    reviewed = read_reviewed(args.results_dir, args.reviews)
    if reviewed.store is None:
        raise BirderError(f"'{args.results_dir}' has no reviews.csv: review some photos with birder-review first")
    stats = review_stats(reviewed)
    print(format_stats(stats))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(stats, indent=2) + "\n")
        print(f"  wrote {args.json}")
    return 0

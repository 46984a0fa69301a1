"""``birder-review``: check the answers of a ``birder-predict`` run in the browser, the most useful first.

Examples::

    birder-review results/                          # http://127.0.0.1:8010/, order: plan
    birder-review results/ --order least-sure --reviewer anna --taxonomy taxonomy.csv
    birder-review results/ --host 0.0.0.0 --token "$(openssl rand -hex 16)"   # for a team on the network

Decisions go to ``results/reviews.csv`` as they are made (:mod:`birder.review.store`); reopening continues where
the review stopped. The work is :mod:`birder.review`'s; this module reads the arguments and starts the server.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from birder.errors import BirderError
from birder.log_setup import configure_logging
from birder.review.plan import ORDERS

PROG = "birder-review"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Review the answers of a birder-predict output folder in the browser: accept, correct, mark "
        "blank; decisions are saved to RESULTS_DIR/reviews.csv as they are made.",
    )
    parser.add_argument("results_dir", type=Path, metavar="RESULTS_DIR", help="a birder-predict --output-dir")
    parser.add_argument(
        "--order",
        choices=ORDERS,
        default="plan",
        help="plan (default): the units whose review most reduces the expected wrong species-per-camera records "
        "first; least-sure: lowest probability first; species: grouped by answer; random",
    )
    parser.add_argument("--seed", type=int, default=0, help="the shuffle of --order random (default: 0)")
    parser.add_argument(
        "--reviewer",
        metavar="NAME",
        help="the name on every decision (default: your login name; ?reviewer= in "
        "the page's address overrides it per tab)",
    )
    parser.add_argument(
        "--taxonomy", type=Path, metavar="FILE", help="species,genus,family,order CSV: search genera and families too"
    )
    parser.add_argument(
        "--reviews", type=Path, metavar="FILE", help="the decisions file (default: RESULTS_DIR/reviews.csv)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s, this machine); any other needs --token",
    )
    parser.add_argument("--port", type=int, default=8010, help="port (default: %(default)s)")
    parser.add_argument("--token", help="a secret every request must carry (the page's address includes it)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def _default_reviewer() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "reviewer"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.host not in LOOPBACK and not args.token:
        parser.error(f"--host {args.host} shares the review with the network: give --token SECRET as well")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    configure_logging(args.log_level.upper(), f"{PROG}: %(message)s")
    try:
        import uvicorn

        from birder.review.app import create_review_app
        from birder.review.session import ReviewSession
    except ImportError as err:
        print(f"{PROG}: {err}; install the extra: pip install 'birder[serve]'", file=sys.stderr)
        return EXIT_USAGE

    try:
        session = ReviewSession.open(
            args.results_dir, order=args.order, seed=args.seed, taxonomy=args.taxonomy, reviews=args.reviews
        )
    except BirderError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    for note in session.store.notes:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    folder = session.folder
    kind = "events" if folder.events else "photos"
    progress = session.progress()
    print(f"{len(folder.units)} {kind} of {folder.directory} (model {folder.model}), {progress['decided']} decided")
    if folder.missing_photos:
        print(f"  {folder.missing_photos} photo(s) missing since the run: shown as missing, still decidable")
    if folder.failures:
        print(f"  {len(folder.failures)} photo(s) the run could not read are not reviewed (failures.csv)")
    print(f"  decisions     {session.store.path}")
    reviewer = args.reviewer or _default_reviewer()
    app = create_review_app(session, reviewer=reviewer, token=args.token)
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    address = f"http://{shown_host}:{args.port}/" + (f"?token={quote(args.token)}" if args.token else "")
    print(f"Open {address}  (Ctrl-C stops; every decision is already saved)")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

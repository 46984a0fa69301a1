"""``pack``: photos into WebDataset tar shards for ``birder-train --wds`` / ``birder-train-mim --wds``.

    python -m birder.tools pack photos/ -o shards/                          # unlabelled (MAE pretraining)
    python -m birder.tools pack birds/train -o shards/train --labels folders   # birds/train/<class>/<images>
    python -m birder.tools pack photos/ -o shards/ --labels labels.csv --shard-size 500MB --workers 4

Writes ``shard-000000.tar``, ... (each photo's bytes as they are, its relative path and label), ``index.json``
(counts and class names) and ``unreadable.csv`` (photos that could not be decoded: listed, not packed). Run the
same command again after an interruption: it continues after the last complete shard.
"""

import argparse
from typing import Any

from birder.data.packing import DEFAULT_SHARD_SIZE, LABELS_FROM_FOLDERS, UNREADABLE_FILE, pack, pack_source, parse_size


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="pack photos into WebDataset tar shards (resumable)",
        description="Pack photos into WebDataset tar shards for streaming training (birder-train --wds).",
    )
    parser.add_argument("photos", nargs="+", metavar="PHOTOS", help="folders of photos (searched recursively)")
    parser.add_argument("-o", "--output-dir", required=True, help="the shard folder (created; resumed if it exists)")
    parser.add_argument(
        "--labels",
        help=f"a CSV file of path,label rows (paths relative to it), or '{LABELS_FROM_FOLDERS}': the first level of "
        "sub-folders of PHOTOS are the classes (ImageFolder layout). Without it the shards are unlabelled.",
    )
    parser.add_argument(
        "--shard-size",
        default=f"{DEFAULT_SHARD_SIZE // 2**30}GiB",
        help="about this many bytes per shard, e.g. 1GB, 500MB (default: %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=0, help="processes reading and checking photos (default: 0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a packing of other photos in the folder (only its files)"
    )
    parser.add_argument("--no-progress", dest="progress_bar", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    shard_size = parse_size(args.shard_size)
    source = pack_source(args.photos, args.labels)
    report = pack(
        source,
        args.output_dir,
        shard_size=shard_size,
        workers=args.workers,
        progress_bar=args.progress_bar,
        overwrite=args.overwrite,
    )
    labelled = f", {len(source.class_names)} classes" if source.class_names else ", unlabelled"
    print(
        f"{report.output_dir}: {report.samples} photos in {report.shards} shards "
        f"({report.bytes / 1e6:.1f} MB{labelled})"
    )
    if report.packed_now:
        print(f"  read {report.packed_now} photos in {report.seconds:.1f} s ({report.images_per_s:.1f} photos/s)")
    if report.unreadable:
        print(
            f"  {len(report.unreadable)} unreadable photos not packed: listed in {report.output_dir / UNREADABLE_FILE}"
        )
    return 0

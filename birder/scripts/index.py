"""``birder-index``: similarity search over a photo collection (extra ``search``: faiss-cpu, hdbscan).

Examples::

    birder-index build photos/ -n vit_l16_mim-eu-common -o index/     # embeddings + vector index
    birder-index add new_photos/ -n vit_l16_mim-eu-common -o index/   # more photos, same model
    birder-index query robin.jpg -n vit_l16_mim-eu-common -o index/ -k 10
    birder-index query --path-in-index photos/robin_01.jpg -o index/
    birder-index duplicates -o index/                                  # copies, the one to keep suggested
    birder-index cluster -o index/ --below-prob 0.5                    # unnamed photos grouped, contact sheets

Thin over :mod:`birder.search`. A mistake the user can fix ends with one line on stderr and exit code 2; an
interrupted ``build`` or ``add`` continues with the same command plus ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from birder.errors import BirderError
from birder.inference.optimize import DTYPE_CHOICES
from birder.log_setup import configure_logging
from birder.run_options import fraction, positive_int
from birder.scripts.common import add_model_arguments, add_run_arguments, run_command

PROG = "birder-index"


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _add_index_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--index", dest="index", type=Path, required=True, metavar="DIR", help="index folder")


def build_parser() -> argparse.ArgumentParser:
    from birder.search.duplicates import CANDIDATE_NEIGHBOURS, MIN_SIMILARITY, PIXEL_NEIGHBOURS  # no faiss needed

    parser = argparse.ArgumentParser(prog=PROG, description="Similarity search over a photo collection.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("build", "index photos (a new index)"), ("add", "add photos to an index")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("inputs", nargs="+", metavar="PHOTOS", help="photo files and/or folders")
        add_model_arguments(sub)
        _add_index_dir(sub)
        add_run_arguments(sub, batch_size=32, workers_default_text="min(4, CPU cores)", dtype=DTYPE_CHOICES)
        sub.add_argument("--resume", action="store_true", help="continue an interrupted run")
        if name == "build":
            sub.add_argument("--overwrite", action="store_true", help="replace the index in DIR (only its files go)")
        sub.add_argument("--chunk-size", type=positive_int, default=256, metavar="N", help="photos per durable write")

    query = commands.add_parser("query", help="the photos most similar to one")
    query.add_argument("photo", nargs="?", metavar="PHOTO", help="a photo file (embedded with the index's model)")
    query.add_argument("--path-in-index", metavar="P", help="a photo already in the index (no model needed)")
    add_model_arguments(query)
    add_run_arguments(query, dtype=DTYPE_CHOICES, progress=False)  # one photo: no batches, no decoding processes
    _add_index_dir(query)
    query.add_argument("-k", type=positive_int, default=10, help="how many (default: 10)")

    duplicates = commands.add_parser(
        "duplicates",
        help="copies among the photos (same pixels up to a small crop, rescaling, re-encoding); nothing is deleted",
        description=(
            "Copies among the photos of an index: candidates are each photo's nearest ones by embedding and by "
            "a pixel signature; the pixels decide (aligned thumbnails compared block by block, crops of a few "
            "percent allowed), whatever the embeddings' similarity. Nothing "
            "is deleted or moved: the table suggests which photo of each group to keep (most pixels, sharpest, "
            "earliest) and says for each other one why it is a copy of that one. Photos that cannot be read are "
            "listed."
        ),
    )
    _add_index_dir(duplicates)
    duplicates.add_argument(
        "--min-similarity",
        "--threshold",
        dest="threshold",
        type=fraction,
        default=MIN_SIMILARITY,
        metavar="S",
        help="cosine similarity of the embeddings from which a neighbour is compared by pixels; "
        f"a lower value compares more pairs (default: {MIN_SIMILARITY})",
    )
    duplicates.add_argument(
        "--neighbours",
        type=positive_int,
        default=CANDIDATE_NEIGHBOURS,
        metavar="N",
        help=f"nearest photos by embedding of each photo compared by pixels (default: {CANDIDATE_NEIGHBOURS})",
    )
    duplicates.add_argument(
        "--pixel-neighbours",
        type=_count,
        default=PIXEL_NEIGHBOURS,
        metavar="N",
        help="nearest photos by pixel signature of each photo compared too; 0: only the embeddings' candidates, "
        f"and only their photos are read (default: {PIXEL_NEIGHBOURS})",
    )
    duplicates.add_argument("--output", type=Path, help="table of the groups (default: DIR/duplicates.csv)")
    duplicates.add_argument("--overwrite", action="store_true", help="replace the table if it exists")

    cluster = commands.add_parser("cluster", help="group the photos the model could not name, to review together")
    _add_index_dir(cluster)
    cluster.add_argument("--below-prob", type=fraction, help="also take photos whose top probability is below P")
    cluster.add_argument("--min-cluster-size", type=positive_int, default=5, metavar="N")
    cluster.add_argument("--output-dir", type=Path, help="contact sheets and clusters.csv (default: DIR/clusters)")
    cluster.add_argument(
        "--overwrite", action="store_true", help="replace an earlier cluster run's files in the folder (only those)"
    )
    return parser


def _build_or_add(args: argparse.Namespace) -> None:
    from birder.search.build import IndexOptions, run_index

    # Every option's destination is the name of its field (the folder aside); -j left out keeps the default
    given = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(IndexOptions)}
    options = IndexOptions(**{**{k: v for (k, v) in given.items() if v is not None}, "output": args.index})
    report = run_index(options, add=args.command == "add")
    print(f"Index '{args.index}': {report.total} photos ({report.added} added, {report.failures} could not be read)")
    print(f"Vector index: {report.plan_description}")
    print(f"Embedded in {report.dtype}")
    print(f"Took {report.seconds:.1f} s")


def _query(args: argparse.Namespace) -> None:
    from birder.search.build import load_embedding_model
    from birder.search.query import query_photo, query_recorded
    from birder.search.store import PhotoIndex

    if (args.photo is None) == (args.path_in_index is None):
        raise BirderError("give either a PHOTO or --path-in-index P")
    index = PhotoIndex(args.index)
    if args.photo is not None:
        if args.model is None and args.weights is None:
            raise BirderError("a query photo is embedded with the index's model: pass -n NAME or --weights FILE")
        loaded = load_embedding_model(args.model, args.weights, args.network, args.device, dtype=args.dtype)
        results = query_photo(index, loaded, args.photo, args.k)
    else:
        results = query_recorded(index, args.path_in_index, args.k)
    for rank, result in enumerate(results, start=1):
        species = f"{result['prediction']} {result['probability']:.2f}" if result["prediction"] else ""
        print(f"{rank:>3}  {result['similarity']:.4f}  {result['path']}  {species}")


def _duplicates(args: argparse.Namespace) -> None:
    from birder.io.outputs import check_output_file
    from birder.search.duplicates import search_duplicates, write_duplicates
    from birder.search.store import PhotoIndex, index_inputs

    index = PhotoIndex(args.index)
    output = args.output or args.index / "duplicates.csv"
    check_output_file(output, inputs=index_inputs(index), overwrite=args.overwrite, option="--output")
    report = search_duplicates(
        index, args.threshold, neighbours=args.neighbours, pixel_neighbours=args.pixel_neighbours
    )
    write_duplicates(output, index, report)
    groups = report.groups
    extra = sum(len(group.members) - 1 for group in groups)
    print(
        f"{report.candidates} candidate pairs, {report.compared} compared by pixels, {report.confirmed} copies: "
        f"{len(groups)} groups, {extra} photos could go (a suggestion: nothing was deleted); table: {output}"
    )
    for number, group in enumerate(groups[:20], start=1):
        (keep, *others) = index.rows(group.members)
        print(f"  group {number}: keep {keep['path']}; copies: {', '.join(o['path'] for o in others[:3])}")
        if len(others) > 3:
            print(f"    and {len(others) - 3} more")
    if report.unreadable:
        print(f"{len(report.unreadable)} photos could not be read (not compared; in the table):")
        for reason in list(report.unreadable.values())[:20]:
            print(f"  {reason}")


def _cluster(args: argparse.Namespace) -> None:
    from birder.io.outputs import check_outside_photos, folders_of, prepare_output_folder
    from birder.search.cluster import CLUSTER_OUTPUTS, review_clusters
    from birder.search.store import PhotoIndex, index_inputs

    output = args.output_dir or args.index / "clusters"
    index = PhotoIndex(args.index)
    # Contact sheets among the indexed photos would be indexed as photos by the next build over their folder
    option = "--output-dir" if args.output_dir else "the contact sheets' folder (default DIR/clusters; --output-dir)"
    check_outside_photos(output, folders_of(index.photos.column("path").to_pylist()), option)
    folder = prepare_output_folder(
        output, "birder-index cluster", CLUSTER_OUTPUTS, inputs=index_inputs(index), overwrite=args.overwrite
    )
    report = review_clusters(index, output, args.below_prob, args.min_cluster_size)
    folder.finish()
    if report.photos == 0:
        print("No photos to review (none labelled unknown; --below-prob P takes uncertain ones too)")
        return
    print(f"{report.photos} photos to review: {report.clusters} clusters, {report.unclustered} in none; {output}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        configure_logging(logging.INFO, "%(message)s")
    handlers = {"build": _build_or_add, "add": _build_or_add, "query": _query}
    handlers.update({"duplicates": _duplicates, "cluster": _cluster})
    return run_command(PROG, lambda: handlers[args.command](args))


if __name__ == "__main__":
    sys.exit(main())

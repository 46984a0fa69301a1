"""``review-crops``: the reviewed animals as training data for ``birder-train --train-csv``.

    python -m birder.tools review-crops results/ --output-dir adapt/
    birder-train --init model.pt --train-csv adapt/train.csv --val-csv adapt/val.csv --output-dir runs/adapt

Each reviewed box is cropped (``--margin``, as ``birder-predict --crop-margin``) into ``adapt/crops/<label>/``; a
reviewed photo without boxes is used whole. Whole cameras go to one split (``--val-share`` of the cameras to
validation), so the validation figures speak of cameras the model was not adapted on
(:func:`birder.review.answers.write_review_crops`).
"""

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any, name: str) -> None:
    parser = subparsers.add_parser(name, help="crops and train/val CSVs of the reviewed animals (birder-train)")
    parser.add_argument("results_dir", type=Path, metavar="RESULTS_DIR", help="a birder-predict output folder")
    parser.add_argument("--output-dir", type=Path, required=True, metavar="DIR", help="crops, train.csv, val.csv")
    parser.add_argument("--reviews", type=Path, metavar="FILE", help="the decisions (default: RESULTS_DIR/reviews.csv)")
    parser.add_argument("--val-share", type=float, default=0.2, metavar="F", help="cameras for validation (0.2)")
    parser.add_argument("--margin", type=float, default=0.1, metavar="F", help="crop margin per side (0.1)")
    parser.add_argument("--seed", type=int, default=0, help="which cameras go to validation (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace what an earlier review-crops wrote in DIR")


def run(args: argparse.Namespace) -> int:
    from birder.io.outputs import check_outside_photos, folders_of, prepare_output_folder
    from birder.review.answers import read_reviewed, write_review_crops
    from birder.review.store import REVIEWS_FILE

    # The outputs rule of every command: never into another run's folder, never onto the decisions it reads, and
    # no crops among the photos (the next birder-predict over their folder would classify them)
    reviews = args.reviews or args.results_dir / REVIEWS_FILE
    reviewed = read_reviewed(args.results_dir, args.reviews)
    photos = (photo.file for unit in reviewed.folder.units for photo in unit.photos)
    check_outside_photos(args.output_dir, folders_of(photos), "--output-dir")
    folder = prepare_output_folder(
        args.output_dir,
        "python -m birder.tools review-crops",
        ("train.csv", "val.csv", "crops/*"),
        inputs=[reviews],
        overwrite=args.overwrite,
        can_resume=False,
    )
    report = write_review_crops(
        args.results_dir,
        args.output_dir,
        val_share=args.val_share,
        margin=args.margin,
        seed=args.seed,
        reviews=args.reviews,
        reviewed=reviewed,
    )
    folder.finish()
    print(
        f"{report.train} training and {report.val} validation images ({report.crops} crops of boxes), cameras "
        f"{report.cameras[0]} / {report.cameras[1]}"
    )
    for reason, count in sorted(report.left_out.items()):
        print(f"  left out: {count} {reason}")
    print(f"  train         {report.train_csv}")
    print(f"  val           {report.val_csv}")
    return 0

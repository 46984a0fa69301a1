"""``birder-predict``: classify folders of photos, writing results tables and a summary.

Examples::

    birder-predict -n vit_l16_mim-eu-common photos/                 # downloads the model on first use
    birder-predict --weights vit_l16_mim-eu-common.pt --network vit_l16 photos/ --save-embeddings
    torchrun --nproc_per_node 4 -m birder.scripts.predict -n vit_l16_mim-eu-common /data/photos --resume
    birder-predict -n vit_l16_mim-eu-common --detector det.pt photos/ --draw boxes/ --export md-json
    birder-predict -n vit_l16_mim-eu-common --boxes md_output.json photos/ --export md-json  # MegaDetector's boxes
    birder-predict -n vit_l16_mim-eu-common --manifest photos.txt --shard 2/8 --output-dir out/2  # job 2 of 8
    python -m birder.tools merge-results out/* -o merged                                          # once all are done

The run is :func:`birder.runs.predict.run_prediction`; this module turns arguments into its options (the typed
groups of :mod:`birder.runs.predict_options`, each argument's destination the name of its option in its group) and
its errors into exit codes. A mistake the user can fix (bad path,
unknown model, no photos) ends with one line on stderr and exit code 2. A failure that is no single photo's (the
model or the transform raising) ends the run with one line and exit code 1; photos that cannot be decoded never
do: they are listed in ``failures.csv``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from birder.errors import BirderError
from birder.geo.export import export_options
from birder.geo.predict import GeoOptions, add_geo_arguments
from birder.inference.optimize import DTYPE_CHOICES
from birder.introspection.explain import EXPLAIN_METHODS
from birder.io.journal import OUTPUT_FORMATS
from birder.log_setup import configure_logging
from birder.run_options import fraction, positive_int
from birder.runs.predict import run_prediction
from birder.runs.predict_options import (
    DECODE_MODES,
    DEFAULT_WORKERS,
    DETECTION_EXPORTS,
    PROG,
    DetectionOptions,
    ExecutionOptions,
    ModelOptions,
    OutputOptions,
    PredictionOptions,
)
from birder.scripts.common import (  # noqa: F401 (the exit codes: tests and callers read them here)
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    add_decision_arguments,
    add_model_arguments,
    add_run_arguments,
    decision_options,
    options_group,
    run_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Classify photos (files and folders, searched recursively) with a birder model."
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="photo files and/or folders (or --manifest)")
    what = parser.add_argument_group("many photos, many jobs (instead of INPUT)")
    what.add_argument(
        "--manifest",
        metavar="FILE",
        help="the photos, one path per line (relative to FILE's folder; blank lines and # comments ignored), "
        "or a .parquet file with a 'path' column; results follow its order",
    )
    what.add_argument(
        "--shard",
        metavar="K/N",
        help="classify only the K-th of N contiguous blocks of the photos (1 <= K <= N), so N independent jobs "
        "each take one and together cover every photo once; merge their output folders with "
        "'python -m birder.tools merge-results'",
    )

    add_model_arguments(parser)

    prep = parser.add_argument_group("preprocessing")
    prep.add_argument(
        "--size", type=positive_int, nargs="+", metavar="PX", help="input size H [W] (default: the model's)"
    )
    prep.add_argument("--center-crop", type=float, default=1.0, metavar="F", help="fraction kept (default: 1.0)")
    prep.add_argument("--simple-crop", action="store_true", help="resize the shorter side, keeping the aspect ratio")
    prep.add_argument("--tta", action="store_true", help="average five crops per photo (5x slower)")

    run = add_run_arguments(parser, batch_size=32, num_workers=DEFAULT_WORKERS, dtype=DTYPE_CHOICES, amp=True)
    run.add_argument("--quantize", choices=("int8",), help="int8 dynamic quantization of linear layers (CPU only)")
    run.add_argument("--compile", action="store_true", help="torch.compile the network (slow start, faster run)")

    out = parser.add_argument_group("outputs")
    out.add_argument("--output-dir", type=Path, default=Path("results"), metavar="DIR", help="(default: results)")
    out.add_argument(
        "--format", dest="table_format", choices=OUTPUT_FORMATS, default="csv", help="format of the tables"
    )
    out.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="(default: 5)")
    out.add_argument("--min-prob", type=fraction, default=0.0, metavar="P", help="below P: 'uncertain'")
    out.add_argument("--species", type=Path, metavar="FILE", help="only these classes (one name per line)")
    out.add_argument("--save-probabilities", action="store_true", help="the full probability table")
    out.add_argument("--save-logits", action="store_true", help="the logits table")
    out.add_argument("--save-embeddings", action="store_true", help="the embeddings table")
    out.add_argument("--save-features", action="store_true", help="detection feature maps, one file per photo")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run, skipping photos done")
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's results in --output-dir (and --explain/--save-crops/--draw, --plot): only "
        "the files birder-predict wrote are deleted; without it (or --resume) such a folder is refused",
    )
    out.add_argument("--chunk-size", type=positive_int, default=256, metavar="N", help="photos per durable write")
    out.add_argument("--show", action="store_true", help="show photos with their top-k species (matplotlib)")
    out.add_argument("--plot", type=Path, metavar="FILE", help="save that picture to FILE (.png, .pdf, ...)")
    out.add_argument("--plot-max", type=positive_int, default=8, metavar="N", help="photos in the picture (default: 8)")
    out.add_argument("--explain", metavar="DIR", help="write an explanation overlay PNG per photo into DIR")
    out.add_argument(
        "--explain-method",
        choices=EXPLAIN_METHODS,
        default="rollout",
        help="attention rollout (default), or Grad-CAM / LayerCAM of the top species (extra 'explain')",
    )

    det = parser.add_argument_group("crop-then-classify (a row per detected box)")
    det.add_argument("--detector", metavar="FILE", help="a detector file (birder-train-det): classify each box found")
    det.add_argument(
        "--boxes",
        metavar="FILE",
        help="instead of --detector, the boxes you already have: a MegaDetector batch output (MegaDetector, "
        "AddaxAI, SpeciesNet's ensemble), SpeciesNet predictions or a COCO (Camera Traps) file with boxes; its "
        "animals are classified, people and vehicles pass through",
    )
    det.add_argument(
        "--boxes-root",
        metavar="DIR",
        help="the folder the --boxes file's relative paths start from (default: the one INPUT folder, else the "
        "photos' common folder)",
    )
    det.add_argument(
        "--det-threshold", type=fraction, default=0.5, metavar="S", help="boxes scoring at least S (default: 0.5)"
    )
    det.add_argument(
        "--crop-margin",
        type=float,
        default=0.1,
        metavar="F",
        help="grow each crop by F of its box's width and height on each side (default: 0.1)",
    )
    det.add_argument(
        "--fallback-whole-image",
        action="store_true",
        help="a photo without boxes gets the whole photo's answer (source: whole-image)",
    )
    det.add_argument("--save-crops", metavar="DIR", help="write each box's crop into DIR (<photo>-<hash>_box<N>.jpg)")
    det.add_argument("--draw", metavar="DIR", help="write each photo with its labelled boxes into DIR")
    det.add_argument(
        "--decode",
        choices=DECODE_MODES,
        help="reduced (default): JPEGs decoded at the smallest DCT scale the detector and each crop need; "
        "full: every photo at full resolution (slower, the reference)",
    )

    add_decision_arguments(parser)
    add_geo_arguments(
        parser, extra_exports=[("md-json", "MegaDetector batch output (with --detector, or --boxes written back)")]
    )
    return parser


def options_from_args(args: argparse.Namespace) -> PredictionOptions:
    """The run's options, group by group, from parsed arguments (each argument's destination is the name of its
    option in its group); a mistake no group can hold raises :class:`~birder.errors.BirderError`."""
    return PredictionOptions(
        inputs=args.inputs,
        manifest=args.manifest,
        shard=args.shard,
        model=options_group(ModelOptions, args, name=args.model),
        execution=options_group(ExecutionOptions, args),
        output=options_group(OutputOptions, args),
        decision=decision_options(args),
        detection=_detection_options(args),
        geo=options_group(
            GeoOptions,
            args,
            exports=tuple(name for name in args.exports if name not in DETECTION_EXPORTS),
            camtrap=export_options(args),
        ),
    )


def _detection_options(args: argparse.Namespace) -> DetectionOptions | None:
    """The crop-then-classify group: None without ``--detector`` or ``--boxes`` (exactly one of the two), whose
    options are then refused in one line."""
    exports = tuple(name for name in args.exports if name in DETECTION_EXPORTS)
    if args.detector is not None and args.boxes is not None:
        raise BirderError(
            "--detector finds the boxes and --boxes reads them from a file: give one of the two, not both"
        )
    if args.detector is None and args.boxes is None:
        needs_detector = {
            f"--export {exports[0] if exports else ''}": bool(exports),
            "--fallback-whole-image": args.fallback_whole_image,
            "--save-crops": args.save_crops is not None,
            "--draw": args.draw is not None,
            "--boxes-root": args.boxes_root is not None,
            "--decode": args.decode is not None,
        }
        for option, given in needs_detector.items():
            if given:
                raise BirderError(
                    f"{option} is about detected boxes: it needs --detector FILE (a birder-train-det file) or "
                    "--boxes FILE (a MegaDetector, SpeciesNet or COCO file)"
                )
        return None
    if args.boxes_root is not None and args.boxes is None:
        raise BirderError("--boxes-root is where the paths of a --boxes file start: it needs --boxes FILE")
    return options_group(DetectionOptions, args, exports=exports, decode=args.decode or DECODE_MODES[0])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        configure_logging(logging.INFO, "%(message)s")

    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun every rank hits an error: rank 0 says it
    return run_command(PROG, lambda: run_prediction(options_from_args(args)), quiet=quiet, resume_hint=True)


if __name__ == "__main__":
    sys.exit(main())

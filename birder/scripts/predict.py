"""``birder-predict``: classify folders of photos, writing results tables and a summary.

Examples::

    birder-predict -n vit_l16_mim-eu-common photos/                 # downloads the model on first use
    birder-predict --weights vit_l16_mim-eu-common.pt --network vit_l16 photos/ --save-embeddings
    torchrun --nproc_per_node 4 -m birder.scripts.predict -n vit_l16_mim-eu-common /data/photos --resume

The work is done by :mod:`birder.inference.predictor` (the batch loop), :mod:`birder.inference.dataset` (finding
and decoding photos) and :mod:`birder.inference.writers` (the tables); this module only wires them to arguments.
A mistake the user can fix (bad path, unknown model, no photos) ends with one line on stderr and exit code 2. A
failure that is no single photo's (the model or the transform raising) ends the run with one line and exit code 1;
photos that cannot be decoded never do: they are listed in ``failures.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from birder.data.transforms import classification_transform
from birder.distributed import DistInfo, barrier, compute_on_main, distributed_session, main_first
from birder.errors import BirderError, ImageDecodeError
from birder.inference import predictor as P
from birder.inference.dataset import discover_images
from birder.inference.optimize import optimize_for_inference
from birder.inference.writers import (
    JournalSet,
    PredictionTables,
    feature_file_name,
    finalize_run,
    prepare_run,
    write_feature_file,
)
from birder.io.atomic import atomic_write_path
from birder.io.checkpoint import ModelInfo, get_num_classes_from_signature, get_size_from_signature
from birder.io.images import load_image
from birder.net.base import BaseNet

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
PROG = "birder-predict"


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Classify photos (files and folders, searched recursively) with a birder model."
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="photo files and/or folders")

    model = parser.add_argument_group("model")
    model.add_argument("-n", "--model", metavar="NAME", help="pretrained model, e.g. vit_l16_mim-eu-common")
    model.add_argument("--weights", metavar="FILE", help="a local model file (.pt or .safetensors)")
    model.add_argument("--network", help="network of --weights when the file does not name it (e.g. vit_l16)")

    prep = parser.add_argument_group("preprocessing")
    prep.add_argument("--size", type=_positive, nargs="+", metavar="PX", help="input size H [W] (default: the model's)")
    prep.add_argument("--center-crop", type=float, default=1.0, metavar="F", help="fraction kept (default: 1.0)")
    prep.add_argument("--simple-crop", action="store_true", help="resize the shorter side, keeping the aspect ratio")
    prep.add_argument("--tta", action="store_true", help="average five crops per photo (5x slower)")

    run = parser.add_argument_group("execution")
    run.add_argument("-b", "--batch-size", type=_positive, default=32, metavar="N", help="(default: 32)")
    workers = min(4, os.cpu_count() or 1)
    run.add_argument(
        "-j", "--num-workers", type=int, default=workers, metavar="N", help=f"decoding processes (default: {workers})"
    )
    run.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: cuda > mps > cpu")
    run.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    run.add_argument("--quantize", choices=("int8",), help="int8 dynamic quantization of linear layers (CPU only)")
    run.add_argument("--amp", action="store_true", help="automatic mixed precision")
    run.add_argument("--compile", action="store_true", help="torch.compile the network (slow start, faster run)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    out = parser.add_argument_group("outputs")
    out.add_argument("--output-dir", type=Path, default=Path("results"), metavar="DIR", help="(default: results)")
    out.add_argument("--format", choices=("csv", "parquet"), default="csv", help="format of the tables")
    out.add_argument("--top-k", type=_positive, default=5, metavar="K", help="(default: 5)")
    out.add_argument("--min-prob", type=_probability, default=0.0, metavar="P", help="below P: 'uncertain'")
    out.add_argument("--species", type=Path, metavar="FILE", help="only these classes (one name per line)")
    out.add_argument("--save-probabilities", action="store_true", help="the full probability table")
    out.add_argument("--save-logits", action="store_true", help="the logits table")
    out.add_argument("--save-embeddings", action="store_true", help="the embeddings table")
    out.add_argument("--save-features", action="store_true", help="detection feature maps, one file per photo")
    out.add_argument("--resume", action="store_true", help="continue an interrupted run, skipping photos done")
    out.add_argument("--chunk-size", type=_positive, default=256, metavar="N", help="photos per durable write")
    out.add_argument("--show", action="store_true", help="show photos with their top-k species (matplotlib)")
    out.add_argument("--plot", type=Path, metavar="FILE", help="save that picture to FILE (.png, .pdf, ...)")
    out.add_argument("--plot-max", type=_positive, default=8, metavar="N", help="photos in the picture (default: 8)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        return run(args)
    except BirderError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank hits it: say it once
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, P.PredictionError) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


@dataclass
class _Job:
    """Everything the run needs once the model is loaded; the same on every rank."""

    args: argparse.Namespace
    net: BaseNet
    model_info: ModelInfo
    transform: Callable[[Any], torch.Tensor]
    selection: P.ClassSelection
    tables: PredictionTables
    settings: dict[str, Any]


def _check_arguments(args: argparse.Namespace) -> None:
    if args.model is None and args.weights is None:
        raise BirderError("no model given: pass a pretrained name (-n vit_l16_mim-eu-common) or --weights FILE")
    if args.size is not None and len(args.size) > 2:
        raise BirderError(f"--size takes one or two numbers (H [W]), got {len(args.size)}")
    if not args.center_crop > 0:
        raise BirderError(f"--center-crop must be a positive fraction, got {args.center_crop}")
    if args.quantize and args.device not in ("auto", "cpu"):
        raise BirderError("--quantize int8 runs on the CPU only: drop it, or use --device cpu")


def _settings(args: argparse.Namespace, size: tuple[int, int], tables: list[str], species: list[str] | None) -> dict:
    """What shapes the rows: a --resume must match it, so one table never mixes two kinds of rows."""
    return {
        "model": args.model,
        "weights": os.path.abspath(args.weights) if args.weights else None,
        "network": args.network,
        "size": list(size),
        "center_crop": args.center_crop,
        "simple_crop": args.simple_crop,
        "tta": args.tta,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "amp": args.amp,
        "top_k": args.top_k,
        "min_prob": args.min_prob,
        "species": species,
        "tables": tables,
        "format": args.format,
    }


def _prepare(args: argparse.Namespace, context: DistInfo, device: torch.device) -> _Job:
    """Load the model (rank 0 first: a download happens once), convert it, and set up classes and tables."""
    species = P.read_species_file(args.species) if args.species is not None else None
    progress_bar = context.is_main and not args.no_progress
    (net, model_info) = main_first(
        context, lambda: P.load_inference_model(args.model, args.weights, args.network, progress_bar=progress_bar)
    )
    if not model_info.class_to_idx or get_num_classes_from_signature(model_info.signature) == 0:
        raise BirderError("this model has no classification head (a pretraining encoder); it cannot classify")

    size = get_size_from_signature(model_info.signature)
    if args.size is not None:
        size = (args.size[0], args.size[-1])
        net.adjust_size(size)
    net = optimize_for_inference(net, args.quantize or args.dtype).to(device)
    if args.compile:
        net = P.compile_for_inference(net)

    selection = P.ClassSelection(model_info.class_to_idx, species)
    if selection.unknown and context.is_main:
        shown = ", ".join(selection.unknown[:10]) + (" ..." if len(selection.unknown) > 10 else "")
        print(
            f"{PROG}: warning: {len(selection.unknown)} name(s) in {args.species} are not classes of this model "
            f"and are ignored: {shown}",
            file=sys.stderr,
        )

    tables = PredictionTables(
        selection.names,
        args.top_k,
        all_class_names=selection.all_names,
        probabilities=args.save_probabilities,
        logits=args.save_logits,
        embedding_dim=net.embedding_size if args.save_embeddings else None,
        features=args.save_features,
    )
    transform = classification_transform(size, model_info.rgb_stats, args.center_crop, args.simple_crop)
    settings = _settings(args, size, tables.names, species)
    return _Job(args, net, model_info, transform, selection, tables, settings)


def _plan(job: _Job) -> tuple[list[str], list[int], int, bool]:
    """(rank 0) The photos, the indices of those still to do, this attempt's number, whether to merge old tables."""
    paths = [str(path) for path in discover_images(job.args.inputs)]
    state = prepare_run(job.args.output_dir, job.tables.specs, job.args.format, job.settings, job.args.resume)
    remaining = [index for (index, path) in enumerate(paths) if path not in state.done]
    if state.done:
        print(f"Resuming: {len(paths) - len(remaining)} of {len(paths)} photos already done", file=sys.stderr)
    return (paths, remaining, state.attempt, state.include_final)


def _batch_rows(job: _Job, batch: P.PredictionBatch, paths: list[str]) -> dict[str, list[list[str]]]:
    """The table rows of one batch (feature maps, when asked for, are written to their files here)."""
    rows = job.tables.failure_rows((paths[index], reason) for (index, reason) in batch.failures)
    if not batch.indices:
        return rows

    batch_paths = [paths[index] for index in batch.indices]
    probabilities = job.selection.apply(batch.probabilities)
    (top_indices, top_probabilities) = P.top_k(probabilities, job.tables.top_k)
    feature_files = None
    if batch.features is not None:
        feature_files = [feature_file_name(path) for path in batch_paths]
        for i, path in enumerate(batch_paths):
            maps = {name: value[i] for (name, value) in batch.features.items()}
            write_feature_file(job.args.output_dir / "features" / feature_files[i], maps, path)

    rows.update(
        job.tables.rows(
            batch_paths,
            probabilities,
            top_indices,
            top_probabilities,
            batch.metadata,
            min_prob=job.args.min_prob,
            logits=batch.logits,
            embeddings=batch.embeddings,
            feature_files=feature_files,
        )
    )
    return rows


def _predict(job: _Job, context: DistInfo, paths: list[str], mine: list[int], attempt: int) -> float:
    """Classify this rank's photos into its journals; returns the seconds it took."""
    args = job.args
    predictor = P.Predictor(
        job.net,
        job.transform,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        tta=args.tta,
        amp=args.amp,
        return_embedding=args.save_embeddings,
        return_logits=args.save_logits,
        return_features=args.save_features,
    )
    started = time.perf_counter()
    journals = JournalSet(args.output_dir, job.tables.specs, context.rank, attempt, args.chunk_size)
    progress = tqdm(
        total=len(mine),
        unit="img",
        desc="Classifying" if not context.distributed else f"Classifying (rank 0 of {context.world_size})",
        disable=args.no_progress or not context.is_main,
        dynamic_ncols=True,
    )
    # Closed whatever happens: the rows of the batches that finished become durable (a --resume skips them)
    with progress, contextlib.closing(journals):
        for batch in predictor.predict_files(paths, mine):
            journals.add(_batch_rows(job, batch, paths), batch.num_photos)
            progress.update(batch.num_photos)
    return time.perf_counter() - started


def _finish(
    job: _Job, paths: list[str], include_final: bool, processed: int, elapsed: float, run_info: dict[str, Any]
) -> None:
    """(rank 0) Merge every rank's journals into the final tables, print the summary, draw the picture."""
    args = job.args
    summary = P.RunSummary(job.selection.names, job.tables.top_k)
    shown: list[tuple[str, str, list[tuple[str, float]]]] = []

    def on_result(row: list[str]) -> None:
        (path, prediction, top) = job.tables.parse_result(row)
        summary.add(path, prediction, [name for (name, _) in top])
        if len(shown) < args.plot_max:
            shown.append((path, prediction, top))

    def on_failure(row: list[str]) -> None:
        summary.failures += 1

    written = finalize_run(
        args.output_dir,
        job.tables.specs,
        args.format,
        {path: index for (index, path) in enumerate(paths)},
        include_final=include_final,
        on_row={"results": on_result, "failures": on_failure},
        # Called after the merge has fed the summary every row
        run_info=lambda: {"summary": summary.as_dict(), "seconds": round(elapsed, 3), **run_info},
    )

    rate = processed / elapsed if elapsed > 0 else 0.0
    print(summary.format())
    print(f"This run: {processed} photos in {elapsed:.1f} s ({rate:.1f} img/s)")
    for name, path in written.items():
        print(f"  {name:<13} {path}")
    if args.plot is not None or args.show:
        plot_predictions(shown, args.plot, args.show)


def run(args: argparse.Namespace) -> int:
    """Classify ``args.inputs`` as the parsed command line says; raises :class:`BirderError` on user mistakes."""
    _check_arguments(args)
    device_name = "cpu" if args.quantize else args.device
    with distributed_session(device_name, timeout=P.COLLECTIVE_TIMEOUT) as context:
        device = context.device
        job = _prepare(args, context, device)
        # Rank 0 finds the photos and what is left to do; every rank gets the same plan, then its own share
        (paths, remaining, attempt, include_final) = compute_on_main(context, lambda: _plan(job))
        mine = P.shard_indices(remaining, context.rank, context.world_size)
        elapsed = _predict(job, context, paths, mine, attempt)

        barrier(context)  # every rank's journals are complete and on disk
        if context.is_main:
            run_info = {
                "photos_this_run": len(remaining),
                "world_size": context.world_size,
                "device": str(device),
                "torch": torch.__version__,
            }
            _finish(job, paths, include_final, len(remaining), elapsed, run_info)
        return 0


# ---------------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------------


def plot_predictions(
    predictions: Sequence[tuple[str, str, Sequence[tuple[str, float]]]],
    output: str | os.PathLike | None = None,
    show: bool = False,
) -> None:
    """One row per photo: the photo, and a bar chart of its top-k species (``(path, prediction, top)`` items).

    Writes the figure to ``output`` (any format matplotlib knows, by extension) and/or shows it on screen.
    """
    try:
        import matplotlib
    except ImportError:
        raise BirderError("--show / --plot need matplotlib: pip install 'birder[plot]'") from None

    if not show:
        matplotlib.use("Agg")  # no display needed to write a file (servers, CI)
    import matplotlib.pyplot as plt

    count = max(1, len(predictions))
    (figure, axes) = plt.subplots(count, 2, figsize=(10, 2.6 * count), squeeze=False)
    for row_axes, (path, prediction, top) in zip(axes, predictions, strict=False):
        (photo_axis, bar_axis) = row_axes
        try:
            photo_axis.imshow(load_image(path))
        except ImageDecodeError:
            photo_axis.text(0.5, 0.5, "(unreadable)", ha="center", va="center")
        photo_axis.set_title(f"{Path(path).parent.name}/{Path(path).name}: {prediction}", fontsize=9)
        photo_axis.axis("off")

        names = [name for (name, _) in top][::-1]  # most probable at the top
        values = [prob for (_, prob) in top][::-1]
        bar_axis.barh(names, values, color="tab:green")
        bar_axis.set_xlim(0, 1)
        bar_axis.set_xlabel("probability")
        bar_axis.tick_params(axis="y", labelsize=8)

    figure.tight_layout()
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(output) as tmp:
            figure.savefig(tmp, format=output.suffix.lstrip(".").lower() or "png", dpi=100)
    if show:
        plt.show()
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())

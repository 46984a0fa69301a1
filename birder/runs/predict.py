"""A ``birder-predict`` run as one library call: :func:`run_prediction` plans, predicts and finishes.

1. Plan (rank 0): find the photos (under the inputs, or in a manifest; with ``shard``, only this job's block of
   them: :mod:`birder.runs.photo_lists`) and, on a resume, those already done
   (:func:`~birder.io.journal.prepare_run`). Every rank gets the same plan, then its own share.
2. Predict (every rank): the batch loop (:class:`~birder.inference.predictor.Predictor`) writes this rank's
   journals (:class:`~birder.io.journal.JournalSet`); :mod:`birder.inference.tables` shapes the rows.
3. Finish (rank 0, once every rank's journals are on disk): merge them into the final tables, print the summary,
   draw the picture (:func:`~birder.plots.plot_predictions`).

What differs between kinds of run is a kind's :class:`~birder.runs.steps.RunSteps` (prepare, predict, tally,
after): whole photos here (:class:`ClassificationSteps`); with a detector (``options.detection``,
``birder-predict --detector``) :class:`birder.runs.detect.DetectionSteps`: each detected box is cropped and
classified, a row per box, in the same frame (plan, shards, journals, merge, resume). The options are typed
groups (:mod:`birder.runs.predict_options`).

Under ``torchrun`` every process calls :func:`run_prediction` (devices and process groups: :mod:`birder.distributed`).
A mistake the user can fix raises :class:`~birder.errors.BirderError`; a failure that is no single photo's (the
model or the transform raising) raises :class:`~birder.inference.predictor.PredictionError`. Photos that cannot be
decoded never raise: they are listed in the failures table. A ``KeyboardInterrupt`` leaves the journals closed and
durable: the same run with ``resume=True`` continues.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from birder.distributed import DistInfo, barrier, compute_on_main, distributed_session
from birder.errors import BirderError
from birder.geo.predict import check_geo_options
from birder.inference import predictor as P
from birder.inference.tables import COLUMNS_HINT, write_feature_files
from birder.io.journal import JOURNAL_DIR, RUN_INFO_FILE, finalize_run, prepare_run
from birder.io.outputs import OutputFolder, check_output_file, check_outside_photos, folders_of
from birder.plots import plot_predictions
from birder.runs.detect import DetectionSteps
from birder.runs.photo_lists import parse_shard, select_photos
from birder.runs.predict_options import DEFAULT_WORKERS, PROG, PredictionOptions
from birder.runs.stages import StageTimes, stages_info
from birder.runs.steps import PredictionJob, RunPlan, RunSteps, Tally, classified_rows, journal_batches, make_predictor

# Named here too (a caller of run_prediction, older callers): the options' module and the frame's
__all__ = [
    "DEFAULT_WORKERS",
    "PREDICTION_OUTPUTS",
    "PROG",
    "ClassificationSteps",
    "PredictionOptions",
    "RunReport",
    "RunSteps",
    "output_folders",
    "run_prediction",
    "run_steps",
]

# What a run (or a merge of shards: birder.runs.merge) writes in its --output-dir, whatever its options: a
# later run there needs --resume or --overwrite, and --overwrite clears these and nothing else
_TABLE_NAMES = ("results", "failures", "probabilities", "logits", "embeddings", "features", "photos", "events")
PREDICTION_OUTPUTS = (
    *(f"{name}.{fmt}" for name in _TABLE_NAMES for fmt in ("csv", "parquet")),
    RUN_INFO_FILE,
    f"{JOURNAL_DIR}/*",
    "features/*.safetensors",
    "camtrap-dp/*",
    "coco-ct.json",
    "megadetector.json",
    "missing.txt",
)
# Files written per photo in the folders of --explain, --save-crops and --draw (birder.inference.tables.photo_file_stem)
# Files written per photo in the folders of --explain, --save-crops and --draw (birder.inference.tables.photo_file_stem)
_PHOTO_STEM = "*-" + "[0-9a-f]" * 12


@dataclass(frozen=True)
class RunReport:
    """What a run did. The summary and the tables are rank 0's (it merges); other ranks get ``None`` and ``{}``."""

    summary: P.RunSummary | None
    tables: dict[str, Path]  # table name -> final file
    photos_this_run: int  # every rank's, the photos a resume skipped not counted
    seconds: float  # this rank's batch loop


def run_prediction(options: PredictionOptions, steps: RunSteps | None = None) -> RunReport:
    """Classify ``options.inputs`` into the tables in ``options.output.output_dir``, as ``birder-predict`` does:
    with ``steps`` (a kind of run), or those :func:`run_steps` chooses for the options.

    It also says what the command line says: the summary and the tables written on stdout (rank 0), a progress bar
    (unless ``progress`` is off), a resume's count and unknown species on stderr.
    """
    steps = steps if steps is not None else run_steps(options)
    _check_options(options, steps)
    execution = options.execution
    device_name = "cpu" if execution.quantize else execution.device
    with distributed_session(device_name, timeout=P.COLLECTIVE_TIMEOUT) as context:
        job = steps.prepare(options, context)
        plan = compute_on_main(context, lambda: _plan(job))
        mine = P.shard_indices(plan.remaining, context.rank, context.world_size)
        elapsed = steps.predict(job, context, plan, mine)

        barrier(context)  # every rank's journals are complete and on disk
        if not context.is_main:
            return RunReport(None, {}, len(plan.remaining), elapsed)

        run_info = {
            "photos_this_run": len(plan.remaining),
            "world_size": context.world_size,
            "device": str(context.device),
            "torch": torch.__version__,
            "dtype": job.dtype.dtype,
            "dtype_reason": job.dtype.reason,
            **steps.run_info(job),
            **stages_info(steps.times, elapsed),
            **plan.run_info,
        }
        tally = steps.tally(job)
        report = _finish(job, plan, elapsed, run_info, tally)
        for line in steps.summary_lines(job):
            print(line)
        if steps.times is not None and steps.times.seconds:
            print(steps.times.format(elapsed, execution.num_workers))
        if job.geo is not None:
            _finish_geo(job)
        steps.after(job, plan)
        output = options.output
        if output.plot is not None or output.show:
            plot_predictions(tally.shown, output.plot, output.show)
        for folder in plan.outputs:
            folder.finish()
        return report


def run_steps(options: PredictionOptions) -> RunSteps:
    """The kind of run the options ask for: crop-then-classify with a detector, else whole photos."""
    if options.detection is not None:
        return DetectionSteps(options.detection)
    return ClassificationSteps()


# ---------------------------------------------------------------------------------------------------------------------
# Checking and planning
# ---------------------------------------------------------------------------------------------------------------------


def _check_options(options: PredictionOptions, steps: RunSteps) -> None:
    (model, execution, output) = (options.model, options.execution, options.output)
    if bool(options.inputs) == (options.manifest is not None):
        given = "both" if options.inputs else "neither"
        raise BirderError(
            f"give photos as INPUT files/folders or as --manifest FILE, exactly one of the two ({given} given)"
        )
    if options.shard is not None:
        parse_shard(options.shard)
    if model.name is None and model.weights is None:
        raise BirderError("no model given: pass a pretrained name (-n vit_l16_mim-eu-common) or --weights FILE")
    if model.size is not None and len(model.size) > 2:
        raise BirderError(f"--size takes one or two numbers (H [W]), got {len(model.size)}")
    if not model.center_crop > 0:
        raise BirderError(f"--center-crop must be a positive fraction, got {model.center_crop}")
    if execution.quantize and execution.device not in ("auto", "cpu"):
        raise BirderError("--quantize int8 runs on the CPU only: drop it, or use --device cpu")
    steps.check(options)
    check_geo_options(options.geo)
    for folder in output_folders(options):
        folder.check(inputs=options.input_files(), resume=output.resume, overwrite=output.overwrite)
    if output.plot is not None:
        # The picture is redrawn by a resumed run
        overwrite = output.overwrite or output.resume
        check_output_file(output.plot, inputs=options.input_files(), overwrite=overwrite, option="--plot")
    _check_images_outside(options, options.inputs)


def _check_images_outside(options: PredictionOptions, photo_inputs: Sequence[str | os.PathLike]) -> None:
    """No crops, drawings, overlays or plot among the photos (:func:`check_outside_photos`); ``--output-dir`` holds
    tables, not images."""
    for folder in output_folders(options):
        if folder.option != "--output-dir":
            check_outside_photos(folder.folder, photo_inputs, folder.option)
    if options.output.plot is not None:
        check_outside_photos(options.output.plot, photo_inputs, "--plot")


def output_folders(options: PredictionOptions) -> list[OutputFolder]:
    """The folders a run writes into: ``output_dir``, and those of ``--explain``, ``--save-crops``, ``--draw``."""
    detection = options.detection
    photo_folders = (
        ("--explain", options.output.explain, f"{_PHOTO_STEM}.png"),
        ("--save-crops", detection.save_crops if detection is not None else None, f"{_PHOTO_STEM}_box*.jpg"),
        ("--draw", detection.draw if detection is not None else None, f"{_PHOTO_STEM}.jpg"),
    )
    folders = [OutputFolder(options.output.output_dir, PROG, PREDICTION_OUTPUTS)]
    for option, folder, pattern in photo_folders:
        if folder is not None:
            # No manifest among the images: their names (a photo's stem and hash) say which are a run's
            folders.append(OutputFolder(Path(folder), PROG, (pattern,), option, record=False))
    return folders


def _plan(job: PredictionJob) -> RunPlan:
    """(rank 0) Find the photos (this shard's) and, on a resume, those already done."""
    (options, output) = (job.options, job.options.output)
    shard = parse_shard(options.shard) if options.shard is not None else None
    selection = select_photos(options.inputs, options.manifest, shard, PROG)
    paths = selection.paths
    if options.manifest is not None:  # the photos' folders are known only now (given folders: _check_options)
        _check_images_outside(options, folders_of(paths))
    unmatched = job.geo.unmatched_locations(paths) if job.geo is not None else None
    if unmatched:
        print(f"{PROG}: warning: {unmatched}", file=sys.stderr)
    # Only now, with the model loaded and the photos found, is an earlier run's output cleared (--overwrite)
    inputs = options.input_files()
    outputs = [
        folder.claim(inputs=inputs, resume=output.resume, overwrite=output.overwrite)
        for folder in output_folders(options)
    ]
    state = prepare_run(
        output.output_dir,
        job.tables.specs,
        output.table_format,
        # The list and the shard shape which rows a folder holds: a resume or a merge must see the same
        {**job.settings, **selection.settings},
        output.resume,
        columns_hint=COLUMNS_HINT,
    )
    remaining = [index for (index, path) in enumerate(paths) if path not in state.done]
    if state.done:
        print(f"Resuming: {len(paths) - len(remaining)} of {len(paths)} photos already done", file=sys.stderr)
    return RunPlan(paths, remaining, state.attempt, state.include_final, selection.run_info, outputs)


# ---------------------------------------------------------------------------------------------------------------------
# Classifying whole photos
# ---------------------------------------------------------------------------------------------------------------------


class ClassificationSteps(RunSteps):
    """A run that classifies whole photos: a row per photo."""

    def predict(self, job: PredictionJob, context: DistInfo, plan: RunPlan, mine: list[int]) -> float:
        """Classify this rank's photos into its journals; returns the seconds it took."""
        predictor = make_predictor(job)
        times = self.times = StageTimes()

        def batches() -> Iterator[tuple[dict[str, list[list[str]]], int]]:
            # The time in the loop's next batch is the wait for the loader's photos and the network's own seconds
            for batch in times.waited(predictor.predict_files(plan.paths, mine)):
                times.add("waiting", -batch.model_seconds)
                times.add("decode", batch.decode_seconds)
                times.add("classifier", batch.model_seconds)
                with times.timed("decision"):
                    rows = _batch_rows(job, batch, plan.paths)
                yield (rows, batch.num_photos)
                if job.options.output.explain is not None:
                    _write_explanations(job, batch, plan.paths)

        return journal_batches(job, context, plan, len(mine), batches(), "Classifying", times)

    def tally(self, job: PredictionJob) -> Tally:
        return PhotoTally(job)


def _batch_rows(job: PredictionJob, batch: P.PredictionBatch, paths: list[str]) -> dict[str, list[list[str]]]:
    """The table rows of one batch (feature maps, when asked for, are written to their files here)."""
    rows = job.tables.failure_rows((paths[index], reason) for (index, reason) in batch.failures)
    if not batch.indices:
        return rows

    batch_paths = [paths[index] for index in batch.indices]
    feature_files = None
    if batch.features is not None:
        feature_files = write_feature_files(job.options.output.output_dir / "features", batch_paths, batch.features)
    outputs = (batch.probabilities, batch.embeddings, batch.logits)
    rows.update(classified_rows(job, batch_paths, batch.metadata, outputs, feature_files=feature_files))
    return rows


def _write_explanations(job: PredictionJob, batch: P.PredictionBatch, paths: list[str]) -> None:
    """``--explain DIR``: an overlay PNG per classified photo, its top species and probability written on it."""
    from birder.introspection.files import write_overlays

    if not batch.indices:
        return
    (top, probabilities) = P.top_k(job.selection.apply(batch.probabilities), 1)
    labels = [f"{job.selection.names[int(i[0])]} {float(p[0]):.2f}" for (i, p) in zip(top, probabilities, strict=True)]
    batch_paths = [paths[index] for index in batch.indices]
    output = job.options.output
    assert output.explain is not None
    write_overlays(job.net, job.transform, batch_paths, labels, Path(output.explain), output.explain_method)


class PhotoTally(Tally):
    """A classification run's: a row per photo."""

    def callbacks(self) -> dict[str, Callable[[list[str]], None]]:
        return {**super().callbacks(), "results": self.on_result}

    def on_result(self, row: list[str]) -> None:
        (path, prediction, top) = self.job.tables.parse_result(row)
        self.summary.add(path, prediction, [name for (name, _) in top])
        if len(self.shown) < self.job.options.output.plot_max:
            self.shown.append((path, prediction, top))


def _finish(job: PredictionJob, plan: RunPlan, elapsed: float, run_info: dict[str, Any], tally: Tally) -> RunReport:
    """(rank 0) Merge every rank's journals into the final tables and print the summary, counted (by ``tally``)
    from the merged rows."""
    written = finalize_run(
        job.options.output.output_dir,
        job.tables.specs,
        job.options.output.table_format,
        {path: index for (index, path) in enumerate(plan.paths)},
        include_final=plan.include_final,
        on_row=tally.callbacks(),
        # Called after the merge has fed the summary every row
        run_info=lambda: {"summary": tally.as_dict(), "seconds": round(elapsed, 3), **run_info},
    )
    report = RunReport(tally.summary, written, len(plan.remaining), elapsed)
    _print_report(tally.format(), report)
    print(f"  dtype         {job.dtype}")  # said once, with the summary: an error on stderr stays one line
    return report


def _print_report(summary: str, report: RunReport) -> None:
    rate = report.photos_this_run / report.seconds if report.seconds > 0 else 0.0
    print(summary)
    print(f"This run: {report.photos_this_run} photos in {report.seconds:.1f} s ({rate:.1f} img/s)")
    for name, path in report.tables.items():
        print(f"  {name:<13} {path}")


# ---------------------------------------------------------------------------------------------------------------------
# Where and when: events and camera-trap exports (birder.geo), from the final tables
# ---------------------------------------------------------------------------------------------------------------------


def _finish_geo(job: PredictionJob) -> None:
    """(rank 0) Group the photos into events (--events) and write the exports (--export)."""
    assert job.geo is not None
    output = job.options.output
    for line in job.geo.finish(
        output.output_dir, output.table_format, job.tables.results, job.tables.top_k, lambda p: _event_labels(job, p)
    ):
        print(line)


def _event_labels(job: PredictionJob, probabilities: Any) -> list[str]:
    """The answers for events' combined probabilities (already through the prior): the run's decision steps 5-8,
    less an unknown test that needs a photo's logits or embeddings (an event has neither)."""
    policy = job.policy
    if policy.needs_logits or policy.needs_embeddings:
        policy = dataclasses.replace(policy, unknown=None)
    return policy.decide(probabilities).label

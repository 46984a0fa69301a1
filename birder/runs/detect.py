"""Crop-then-classify: ``birder-predict --detector det.pt`` (or ``--boxes FILE``), a row per box.

The run is :func:`birder.runs.predict.run_prediction`'s (plan, ``torchrun`` shards, journals, resume, merge,
failures table); the steps here are those that differ (:class:`DetectionSteps`, a
:class:`~birder.runs.steps.RunSteps`), and its options are the run's ``detection`` group
(:class:`~birder.runs.predict_options.DetectionOptions`):

- prepare: the classifier as for any run (``-n NAME`` or ``--weights FILE``), and the run's box source
  (:mod:`birder.runs.box_sources`): the detector (:func:`~birder.inference.model.load_for_inference`: its backbone
  and pyramid in the run's ``--dtype``, ``auto`` giving bfloat16 only where the device has it natively; its box
  operations float32), or the boxes file a user already has (``--boxes``:
  :class:`~birder.runs.box_sources.FileBoxes`, whose people, vehicles and detections below the threshold pass
  through unclassified; the photos it lists as failed or does not list are failures, never decoded);
- predict: each batch of photos is decoded in the loader's workers, JPEGs at the smallest DCT scale that keeps the
  detector's input size (:class:`~birder.inference.dataset.DetectionInputs`; ``decode="full"``: every photo at full
  resolution, :func:`~birder.io.images.load_image`), the detector finds boxes in all of them in one pass
  (:func:`~birder.inference.detection.detect_tensors`; boxes in full-resolution pixels), boxes scoring at least
  ``det_threshold`` are cropped with a margin (the rectangle of :func:`~birder.inference.crops.crop_box`): from
  the reduced decode, resampled straight to the classifier's size, where it has the pixels
  (:meth:`~birder.io.images.ReducedImage.crop_resized`), else from one more decode at the scale the smallest box
  needs (full resolution: :func:`~birder.inference.crops.crop_box` as with ``decode="full"``). The crops of
  consecutive photos are classified together in ``batch_size`` chunks (:class:`CropQueue`) through the
  classifier's own preprocessing and batch loop (``classification_transform``,
  :meth:`~birder.inference.predictor.Predictor.predict_tensor`) and the decision order
  (:func:`birder.runs.steps.classified_rows`: species list, prior, top-k, ``label`` / ``rank`` /
  ``label_probability``). Each stage's seconds go to ``run.json`` (:mod:`birder.runs.stages`);
- after the merge: the MegaDetector batch output (``--export md-json``), from the final tables (with
  ``--boxes``: the file itself written back with the species of its detections).

Tables (:class:`DetectionTables`):

- ``results``: a row per box: ``path``, ``box`` (its index in the photo, best score first), ``detections`` (the
  photo's number of boxes), ``x1 y1 x2 y2`` (the box in the photo's pixels, EXIF orientation applied),
  ``det_class``, ``det_score``, ``source`` (``detection``; a boxes file's box that is not classified: ``passed``
  at or above the threshold, empty below), then the columns of a classification run: prediction,
  top-k, EXIF date and position, the answer. A photo without a box keeps one row with ``detections`` 0 and empty
  species columns, or with ``fallback_whole_image`` the whole photo's answer, ``source`` ``whole-image``.
- ``photos``: ``path``, ``width``, ``height``, ``detections``: a photo is done once its row is on disk (written
  after its boxes' rows: a run killed in the middle of a photo's boxes redoes the photo).
- ``failures``: as for classification.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from birder.distributed import DistInfo
from birder.errors import BirderError, CheckpointError, ImageDecodeError, one_line
from birder.geo.results import SOURCE_DETECTION, SOURCE_PASSED, SOURCE_WHOLE_IMAGE
from birder.inference import predictor as P
from birder.inference.crops import (
    crop_box,
    md_batch_output,
    md_detection,
    md_taxonomy_description,
    md_timestamp,
    write_md_json,
)
from birder.inference.dataset import DetectionInput, DetectionInputs, PhotoBatch
from birder.inference.detection import detect_tensors
from birder.inference.model import AS_LOADED
from birder.inference.optimize import DtypeChoice
from birder.inference.tables import PredictionTables, photo_file_stem
from birder.inference.taxonomy import Taxonomy
from birder.io.images import ReducedImage, crop_rectangle, load_image, load_image_reduced
from birder.io.journal import final_path
from birder.io.table_files import PATH_COLUMN, Column, Row, TableSpec, read_table_rows, write_table
from birder.runs.box_sources import BoxSource, FileBoxes, SourceBox
from birder.runs.predict_options import DECODE_MODES, DetectionOptions, PredictionOptions
from birder.runs.stages import StageTimes
from birder.runs.steps import (
    PredictionJob,
    RunPlan,
    RunSteps,
    Tally,
    classified_rows,
    journal_batches,
    make_predictor,
)

MD_JSON_FILE = "megadetector.json"
# Photos per loader batch when each is kept at full resolution (--decode full, a boxes file): a 12 MP photo is 36 MB,
# and two workers with two batches each in flight besides the one being cropped held 7.7 GB at 32 photos a batch
# (the field-chain benchmark). The classifier's batches still fill: its crops are queued across loader batches.
FULL_PHOTOS_PER_BATCH = 4
# What a box row says before the classifier's columns
BOX_COLUMNS = (
    Column("box", "int64"),
    Column("detections", "int64"),
    Column("x1", "float32", ".2f"),
    Column("y1", "float32", ".2f"),
    Column("x2", "float32", ".2f"),
    Column("y2", "float32", ".2f"),
    Column("det_class"),
    Column("det_score", "float32", ".6f"),
    Column("source"),
)
_BOX_COLOURS = ((255, 64, 64), (64, 160, 255), (255, 200, 0), (64, 220, 120), (220, 90, 255), (255, 140, 40))


def check_options(options: PredictionOptions, detection: DetectionOptions) -> None:
    """Refuse, in one line and before anything loads, what a crop-then-classify run cannot do."""
    if (detection.detector is None) == (detection.boxes is None):
        given = "both" if detection.detector is not None else "neither"
        raise BirderError(
            "crop-then-classify takes its boxes from --detector FILE (a birder-train-det file) or --boxes FILE (a "
            f"MegaDetector, SpeciesNet or COCO file), exactly one of the two ({given} given)"
        )
    if detection.boxes_root is not None and detection.boxes is None:
        raise BirderError("--boxes-root is where the paths of a --boxes file start: it needs --boxes FILE")
    if detection.detector is not None and not Path(detection.detector).is_file():
        raise BirderError(f"--detector '{detection.detector}' does not exist (a birder-train-det .pt file expected)")
    if detection.boxes is not None and not Path(detection.boxes).is_file():
        raise BirderError(
            f"--boxes '{detection.boxes}' does not exist (a MegaDetector batch output, SpeciesNet predictions or "
            "COCO JSON file expected)"
        )
    if detection.decode not in DECODE_MODES:
        raise BirderError(f"--decode must be one of {', '.join(DECODE_MODES)}, got '{detection.decode}'")
    if not 0.0 <= detection.det_threshold <= 1.0:
        raise BirderError(f"--det-threshold must be between 0 and 1, got {detection.det_threshold}")
    if not detection.crop_margin >= 0.0:
        raise BirderError(f"--crop-margin must be a fraction >= 0, got {detection.crop_margin}")
    # Options of a classification run that have no per-box meaning (yet)
    output = options.output
    per_photo = {
        "--save-probabilities": output.save_probabilities,
        "--save-logits": output.save_logits,
        "--save-embeddings": output.save_embeddings,
        "--save-features": output.save_features,
        "--explain": bool(output.explain),
        "--plot": bool(output.plot),
        "--show": output.show,
    }
    source = "--detector" if detection.detector is not None else "--boxes"
    for option, given in per_photo.items():
        if given:
            raise BirderError(f"{option} is not available with {source}: it is per photo, rows are per box here")


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------


class DetectionTables(PredictionTables):
    """The tables of a crop-then-classify run (see the module's docstring)."""

    def __init__(self, class_names: Sequence[str], top_k: int, **kwargs: Any) -> None:
        super().__init__(class_names, top_k, lead_columns=BOX_COLUMNS, **kwargs)
        # The photos table marks a photo done, after all of its boxes' rows
        self.results = TableSpec(self.results.name, self.results.columns)
        self.photos = TableSpec(
            "photos",
            (Column(PATH_COLUMN), Column("width", "int64"), Column("height", "int64"), Column("detections", "int64")),
            marks_done=True,
        )
        self.specs = (self.failures, self.results, self.photos)
        header = self.results.header
        self.columns = {name: header.index(name) for name in header}

    def empty_row(self, path: str, metadata: Sequence[Any]) -> Row:
        """The row of a photo without a box: ``detections`` 0, the species columns empty, EXIF as for the rest."""
        return self.box_row(path, [None, 0, *([None] * (len(BOX_COLUMNS) - 2))], metadata)

    def box_row(self, path: str, lead: Sequence[Any], metadata: Sequence[Any]) -> Row:
        """The row of a box that is not classified (``lead``: its :data:`BOX_COLUMNS` cells): the species columns
        empty, EXIF as for the rest."""
        values: list[Any] = [path, *lead, None, *([None] * 2 * self.top_k), *metadata]
        return self.results.format_row(values + [None] * (len(self.results.columns) - len(values)))

    def caption(self, row: Row) -> str:
        """What a drawn box says: the answer (or the top species) and its probability."""
        (label, probability) = (row[self.columns["prediction"]], row[self.columns["top1_prob"]])
        if "label" in self.columns:
            (label, probability) = (row[self.columns["label"]], row[self.columns["label_probability"]])
        return f"{label} {float(probability):.2f}" if probability else label


# ---------------------------------------------------------------------------------------------------------------------
# Preparing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DetectionStep(BoxSource):
    """The detector of a run and what it does with the boxes: the box source of ``--detector``."""

    net: torch.nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    class_names: list[str]  # the detector's (its class_to_idx order)
    options: DetectionOptions
    size: tuple[int, int] = (0, 0)  # the detector's input (H, W): what a reduced decode must keep
    dtype: DtypeChoice = AS_LOADED  # its backbone and pyramid's, and why

    def settings(self) -> dict[str, Any]:
        """What shapes the rows (a resume must match it: one table never mixes decodes or detector dtypes)."""
        options = self.options
        assert options.detector is not None
        return {
            "detector": os.path.abspath(options.detector),
            "det_threshold": options.det_threshold,
            "crop_margin": options.crop_margin,
            "fallback_whole_image": options.fallback_whole_image,
            "decode": options.decode,
            "detector_dtype": self.dtype.dtype,
        }

    def decodes_in_full(self) -> bool:
        return self.options.decode == "full"

    def input_transform(self) -> Callable[[Image.Image], DetectionInput]:
        if self.decodes_in_full():
            return PhotoAndDetectorInput(self.transform)
        return DetectionInputs(self.transform, self.size)

    def boxes(self, inputs: Sequence[DetectionInput], paths: Sequence[str]) -> list[list[SourceBox]]:
        """The boxes the detector finds in a batch of decoded photos, best first, in full-resolution pixels."""
        try:
            found = detect_tensors(
                self.net,
                [item.tensor for item in inputs],
                [item.full_hw for item in inputs],  # boxes in the full-resolution photo's pixels
                score_threshold=self.options.det_threshold,
            )
        except Exception as exc:
            raise P.model_failure(paths[0], exc, "the detector") from exc
        return [
            [
                SourceBox(number, (box[0], box[1], box[2], box[3]), self.class_names[label], score)
                for (number, (box, score, label)) in enumerate(
                    zip(detections.boxes.tolist(), detections.scores.tolist(), detections.labels.tolist(), strict=True)
                )
            ]
            for detections in found
        ]


def load_detection_step(options: DetectionOptions, device: torch.device, dtype: str = "float32") -> DetectionStep:
    """The ``--detector`` file, ready for inference on ``device``, its backbone and pyramid in ``dtype`` (``auto``:
    bfloat16 only where ``device`` has it natively); torchvision's box operations stay float32."""
    from birder.inference.model import load_for_inference

    try:
        loaded = load_for_inference(weights=Path(options.detector), detector=True, device=device, dtype=dtype)
    except CheckpointError as err:
        raise BirderError(f"--detector: {err}") from None
    return DetectionStep(loaded.net, loaded.transform, loaded.class_names, options, loaded.size, loaded.dtype)


class DetectionSteps(RunSteps):
    """Crop-then-classify, a kind of run (see the module's docstring): a row per box. It serves one run: the box
    source (the detector, loaded by :meth:`prepare`, or the boxes file, read by :meth:`check`) is kept for the
    other steps."""

    tables_class = DetectionTables

    def __init__(self, options: DetectionOptions) -> None:
        self.options = options
        self._source: BoxSource | None = None
        self.times = StageTimes()

    @property
    def source(self) -> BoxSource:
        """Where the run's boxes come from (once :meth:`prepare` has loaded it)."""
        if self._source is None:
            raise RuntimeError("the box source is loaded by DetectionSteps.prepare, which has not run")
        return self._source

    @property
    def step(self) -> DetectionStep:
        """The run's detector (once :meth:`prepare` has loaded it; a run with --boxes has none)."""
        if not isinstance(self.source, DetectionStep):
            raise RuntimeError("this crop-then-classify run takes its boxes from a file: it has no detector")
        return self.source

    def check(self, options: PredictionOptions) -> None:
        check_options(options, self.options)
        if self.options.boxes is not None:
            # Read now: a malformed file is one line before the model loads and before any output is touched
            self._source = FileBoxes(self.options, options.inputs)

    def prepare(self, options: PredictionOptions, context: DistInfo) -> PredictionJob:
        job = super().prepare(options, context)
        if job.geo is not None:
            # Events and exports of boxes: an event's species and counts come from its boxes (birder.geo.box_events)
            job.geo = dataclasses.replace(job.geo, per_box=True)
        if self.options.detector is not None:
            self._source = load_detection_step(self.options, context.device, job.options.execution.dtype)
        elif self._source is None:  # a library caller who skipped check()
            self._source = FileBoxes(self.options, options.inputs)
        job.settings.update(self.source.settings())
        return job

    def predict(self, job: PredictionJob, context: DistInfo, plan: RunPlan, mine: list[int]) -> float:
        """Find (or look up), crop and classify this rank's photos' boxes into its journals; returns the seconds."""
        source = self.source
        source.start(plan.paths, report=context.is_main, whole_list=job.options.shard is None)
        # Photos the source has no boxes for (a file's failed or missing ones) are failures, never decoded
        skipped = {index: reason for index in mine if (reason := source.failure(plan.paths[index])) is not None}
        predictor = make_predictor(job)
        loaded = [index for index in mine if index not in skipped]
        per_batch = min(predictor.batch_size, FULL_PHOTOS_PER_BATCH) if source.decodes_in_full() else None
        loader = predictor.loader(
            plan.paths, loaded, transform=source.input_transform(), stack=False, batch_size=per_batch
        )
        times = self.times = StageTimes()
        queue = CropQueue(job, predictor, plan.paths, times)
        batches = _detection_rows(job, source, queue, times.waited(loader), plan.paths, times)
        with_skipped = _with_skipped(job, batches, skipped, plan.paths)
        return journal_batches(job, context, plan, len(mine), with_skipped, "Detecting", times)

    def tally(self, job: PredictionJob) -> Tally:
        return DetectionTally(job, self.options)

    def run_info(self, job: PredictionJob) -> dict[str, Any]:
        if not isinstance(self.source, DetectionStep):
            return {}
        step = self.step
        return {
            "detector_dtype": step.dtype.dtype,
            "detector_dtype_reason": step.dtype.reason,
            "decode": step.options.decode,
        }

    def summary_lines(self, job: PredictionJob) -> list[str]:
        if not isinstance(self.source, DetectionStep):
            return []
        return [f"  detector      {self.step.dtype}, decode {self.step.options.decode}"]

    def after(self, job: PredictionJob, plan: RunPlan) -> None:
        """(rank 0, after the merge) The failure rows of a boxes file's paths that match no photo;
        ``--export md-json``."""
        source = self.source
        unmatched = source.unmatched_failures()
        if unmatched:
            add_failure_rows(job, unmatched)
        if "md-json" in self.options.exports:
            if isinstance(source, FileBoxes):
                path = write_md_boxes(job, source)
            else:
                path = write_md_results(job, plan, self.step)
            print(f"  {'export':<13} {path}")


def detection_tables(job: PredictionJob) -> DetectionTables:
    """The tables of a crop-then-classify run's job (prepared by :meth:`DetectionSteps.prepare`)."""
    if not isinstance(job.tables, DetectionTables):
        raise TypeError("a crop-then-classify job has DetectionTables: prepare it with DetectionSteps.prepare")
    return job.tables


# ---------------------------------------------------------------------------------------------------------------------
# Predicting
# ---------------------------------------------------------------------------------------------------------------------


class PhotoAndDetectorInput:
    """The dataset's transform of a ``decode="full"`` detection run: the photo decoded at full resolution
    (:func:`~birder.io.images.load_image`, the loader's default) and the detector's input."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, photo: Image.Image) -> DetectionInput:
        return DetectionInput(ReducedImage(photo, photo.size, 1), self.transform(photo))


@dataclass
class _Photo:
    """A photo on its way to the journals: its boxes (images for the classifier, or boxes passing through) and, as
    they are classified, their rows (the photo is done when every one has its row)."""

    index: int  # its place in the run's paths
    full_size: tuple[int, int]  # (width, height) at full resolution, EXIF orientation applied
    # The decode, kept only for --save-crops and --draw: photos wait in the queue until the classifier's batch is
    # full, and a full-resolution decode is 36 MB a 12 MP photo
    photo: ReducedImage | None
    metadata: Any
    images: list[_Image]

    @property
    def done(self) -> bool:
        return all(image.row is not None for image in self.images)

    @property
    def rows(self) -> list[Row]:
        return [image.row for image in self.images if image.row is not None]


@dataclass
class _Image:
    """One box of a photo (or the whole photo) and its row's lead cells; ``image`` is what the classifier gets
    (None: a box that passes through unclassified, its row made at once)."""

    owner: _Photo
    image: Image.Image | None
    lead: list[Any]
    row: Row | None = None


def _photos_and_tensors(batch: PhotoBatch) -> list[DetectionInput]:
    """The photos of a batch with their detector inputs: this run's loader keeps them as pairs (``stack=False``)."""
    if not isinstance(batch.inputs, list):
        raise P.PredictionError("a crop-then-classify batch holds (photo, tensor) pairs: its loader must not stack")
    return batch.inputs


class CropQueue:
    """The images waiting for the classifier, across photos and loader batches: classified ``batch_size`` at a
    time, so the classifier always gets full batches (photos without a box add nothing); photos leave in order,
    once all their images are classified (a photo's row in the photos table marks it done: it comes last)."""

    def __init__(self, job: PredictionJob, predictor: P.Predictor, paths: list[str], times: StageTimes) -> None:
        (self.job, self.predictor, self.paths, self.times) = (job, predictor, paths, times)
        self.waiting: list[_Image] = []
        self.photos: deque[_Photo] = deque()

    def add(self, photo: _Photo) -> None:
        self.photos.append(photo)
        self.waiting.extend(image for image in photo.images if image.image is not None)

    def ready(self, flush: bool = False) -> list[_Photo]:
        """The photos whose rows are all there, in order, after classifying every full chunk (``flush``: what is
        left as well: the last photos of the run)."""
        size = self.job.options.execution.batch_size
        while len(self.waiting) >= size or (flush and self.waiting):
            (chunk, self.waiting) = (self.waiting[:size], self.waiting[size:])
            self._classify(chunk)
        done = []
        while self.photos and self.photos[0].done:
            done.append(self.photos.popleft())
        return done

    def _classify(self, chunk: list[_Image]) -> None:
        (job, times) = (self.job, self.times)
        paths = [self.paths[image.owner.index] for image in chunk]
        with times.timed("crops"):
            inputs = torch.stack([job.transform(image.image) for image in chunk])
        with times.timed("classifier"):
            try:
                (probabilities, embeddings, logits, _) = self.predictor.predict_tensor(inputs)
            except Exception as exc:
                raise P.model_failure(paths[0], exc) from exc
        with times.timed("decision"):
            rows = classified_rows(
                job,
                paths,
                [image.owner.metadata for image in chunk],
                (probabilities, embeddings, logits),
                lead_values=[image.lead for image in chunk],
            )["results"]
        for image, row in zip(chunk, rows, strict=True):
            image.row = row


def _detection_rows(
    job: PredictionJob,
    source: BoxSource,
    queue: CropQueue,
    batches: Iterator[PhotoBatch],
    paths: list[str],
    times: StageTimes,
) -> Iterator[tuple[dict[str, list[Row]], int]]:
    """``(rows by table, photos)`` as photos are done: each loader batch's boxes found and cropped into ``queue``."""
    tables = detection_tables(job)
    for batch in batches:
        times.add("decode", batch.seconds)
        (rows, photos) = _batch_rows(job, source, batch, paths, times)
        for photo in photos:
            queue.add(photo)
        yield _done_rows(tables, source.options, rows, queue.ready(), paths, times)
    yield _done_rows(tables, source.options, {}, queue.ready(flush=True), paths, times)


def _with_skipped(
    job: PredictionJob,
    batches: Iterable[tuple[dict[str, list[Row]], int]],
    skipped: Mapping[int, str],
    paths: list[str],
) -> Iterator[tuple[dict[str, list[Row]], int]]:
    """The failure rows of the ``skipped`` photos (index -> reason: never decoded) first, then ``batches`` (the
    merge puts the final tables in the photos' order)."""
    if skipped:
        rows = detection_tables(job).failure_rows((paths[index], skipped[index]) for index in sorted(skipped))
        yield (rows, len(skipped))
    yield from batches


def _box_source_cell(box: SourceBox) -> str | None:
    """A box row's ``source``: classified; passed through and counted (a file's person or vehicle); or neither
    (a file's detection below the threshold, kept for reference)."""
    if box.classify:
        return SOURCE_DETECTION
    return SOURCE_PASSED if box.counted else None


_WHOLE_IMAGE_LEAD = (None, 0, None, None, None, None, None, None, SOURCE_WHOLE_IMAGE)


def _batch_rows(
    job: PredictionJob, source: BoxSource, batch: PhotoBatch, paths: list[str], times: StageTimes
) -> tuple[dict[str, list[Row]], list[_Photo]]:
    """The failure rows of one batch of photos, and its photos with their boxes, cropped for the classifier."""
    if batch.run_error is not None:
        raise P.PredictionError(f"{batch.run_error}; check the preprocessing options (size, crop)")
    tables = detection_tables(job)
    failures = [(paths[index], reason) for (index, reason) in batch.failures]
    if not batch.indices:
        return (tables.failure_rows(failures), [])

    inputs = _photos_and_tensors(batch)
    with times.timed("detector"):
        found = source.boxes(inputs, [paths[index] for index in batch.indices])

    # Each photo's boxes in the source's order (the detector's: best first): crops for the classifier, the boxes
    # that pass through unclassified in their places (their rows made now), or the whole photo, or none
    options = source.options
    photos = []
    with times.timed("crops"):
        for index, item, metadata, boxes in zip(batch.indices, inputs, batch.metadata, found, strict=True):
            whole = options.fallback_whole_image and not any(box.counted for box in boxes)
            try:
                crops = classifier_crops(
                    job.transform, item.photo, paths[index], [box.corners for box in boxes if box.classify],
                    options.crop_margin,
                )  # fmt: skip
                (width, height) = item.photo.full_size
                if whole:
                    crops += classifier_crops(
                        job.transform, item.photo, paths[index], [(0.0, 0.0, float(width), float(height))], 0.0
                    )
            except ImageDecodeError as exc:  # changed on disk since the first decode: the photo's failure
                failures.append((paths[index], one_line(exc, limit=500)))
                continue
            keep = options.save_crops is not None or options.draw is not None
            photo = _Photo(index, item.photo.full_size, item.photo if keep else None, metadata, [])
            given = iter(crops)
            for box in boxes:
                lead = [box.number, len(boxes), *box.corners, box.category, box.score, _box_source_cell(box)]
                image = _Image(photo, next(given) if box.classify else None, lead)
                if image.image is None:
                    image.row = tables.box_row(paths[index], lead, metadata)
                photo.images.append(image)
            if whole:
                photo.images.append(_Image(photo, next(given), list(_WHOLE_IMAGE_LEAD)))
            photos.append(photo)
    return (tables.failure_rows(failures), photos)


def classifier_crops(
    transform: Callable[[Image.Image], torch.Tensor],
    photo: ReducedImage,
    path: str | os.PathLike,
    boxes: Sequence[Sequence[float]],
    margin: float,
) -> list[Image.Image]:
    """Each of ``boxes`` (full-resolution xyxy) grown by ``margin``, as the classifier's ``transform`` is to get it:
    from a full-resolution decode, the crop :func:`~birder.inference.crops.crop_box` cuts; from a reduced one,
    resampled straight to the size the transform resizes that crop to
    (:meth:`~birder.io.images.ReducedImage.crop_resized`, its exact edges), where the decode has that many pixels,
    the others from one more decode of ``path`` at the scale the smallest of them needs.

    Raises:
        ImageDecodeError: ``path`` could not be decoded a second time (it changed on disk since).
    """
    if photo.reduction == 1:
        return [crop_box(photo.image, box, margin) for box in boxes]
    targets = [_resized_size(transform, crop_rectangle(photo.full_size, box, margin)) for box in boxes]
    crops = [photo.crop_resized(box, margin, target) for (box, target) in zip(boxes, targets, strict=True)]
    missing = [number for (number, crop) in enumerate(crops) if crop is None]
    if missing:
        reduction = min(photo.crop_reduction(boxes[number], margin, targets[number]) for number in missing)
        again = load_image_reduced(path, max_reduction=reduction)
        for number in missing:
            crop = again.crop_resized(boxes[number], margin, targets[number]) if again.reduction > 1 else None
            crops[number] = crop if crop is not None else crop_box(again.image, boxes[number], margin)
    return [crop for crop in crops if crop is not None]


def _resized_size(transform: Callable[[Image.Image], torch.Tensor], rectangle: Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` the classifier's transform resizes a crop of ``rectangle`` (full-resolution pixels) to; a
    transform that does not say keeps the crop's full-resolution size (a full decode then cuts it)."""
    (left, top, right, bottom) = rectangle
    resized = getattr(transform, "resized_size", None)
    return resized(bottom - top, right - left) if resized is not None else (bottom - top, right - left)


def _done_rows(
    tables: DetectionTables,
    options: DetectionOptions,
    rows: dict[str, list[Row]],
    done: list[_Photo],
    paths: list[str],
    times: StageTimes,
) -> tuple[dict[str, list[Row]], int]:
    """``(rows by table, photos)``: ``rows`` (the failures) and the rows of the photos ``done``, in order."""
    (results, photo_rows) = ([], [])
    for photo in done:
        path = paths[photo.index]
        results += photo.rows if photo.images else [tables.empty_row(path, photo.metadata)]
        detections = sum(image.lead[-1] in (SOURCE_DETECTION, SOURCE_PASSED) for image in photo.images)
        (width, height) = photo.full_size
        photo_rows.append(tables.photos.format_row([path, width, height, detections]))
        with times.timed("writing"):
            if photo.photo is not None:
                _write_files(options, tables, path, photo.photo, photo.images, photo.rows)
    if done:
        rows = {**rows, "results": results, "photos": photo_rows}
    return (rows, len(rows.get("failures", ())) + len(done))


def _write_files(
    options: DetectionOptions,
    tables: DetectionTables,
    path: str,
    photo: ReducedImage,
    images: list[_Image],
    rows: list[Row],
) -> None:
    """``--save-crops DIR`` (each box's crop) and ``--draw DIR`` (the photo with its labelled boxes): both from the
    full-resolution photo, decoded again here when the run decoded it reduced."""
    if options.save_crops is None and options.draw is None:
        return
    boxes = [(image, row) for (image, row) in zip(images, rows, strict=False) if image.lead[-1] == SOURCE_DETECTION]
    full = photo.image if photo.reduction == 1 else load_image(path)
    stem = photo_file_stem(path)
    if options.save_crops is not None:
        folder = Path(options.save_crops)
        folder.mkdir(parents=True, exist_ok=True)
        for image, _ in boxes:
            crop_box(full, image.lead[2:6], options.crop_margin).save(
                folder / f"{stem}_box{image.lead[0]}.jpg", quality=95
            )
    if options.draw is not None:
        folder = Path(options.draw)
        folder.mkdir(parents=True, exist_ok=True)
        labelled = [(image.lead[2:6], tables.caption(row)) for (image, row) in boxes]
        draw_boxes(full, labelled).save(folder / f"{stem}.jpg", quality=90)


def draw_boxes(photo: Image.Image, boxes: Sequence[tuple[Sequence[float], str]]) -> Image.Image:
    """A copy of ``photo`` with each ``(box x1 y1 x2 y2, caption)`` drawn as a rectangle and a label above it."""
    image = photo.convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 300))
    font = ImageFont.load_default(size=max(10, round(max(image.size) / 40)))
    for number, (box, caption) in enumerate(boxes):
        colour = _BOX_COLOURS[number % len(_BOX_COLOURS)]
        (x1, y1, x2, y2) = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        (left, top, right, bottom) = draw.textbbox((0, 0), caption, font=font)
        (text_w, text_h) = (right - left + 2 * width, bottom - top + 2 * width)
        # Above the box, else inside it; moved left where it would run off the photo
        (x, y) = (max(0.0, min(x1, image.width - text_w)), y1 - text_h if y1 >= text_h else y1)
        draw.rectangle((x, y, x + text_w, y + text_h), fill=colour)
        draw.text((x + width - left, y + width - top), caption, fill=(0, 0, 0), font=font)
    return image


# ---------------------------------------------------------------------------------------------------------------------
# Finishing: the summary, the MegaDetector batch output
# ---------------------------------------------------------------------------------------------------------------------


class DetectionTally(Tally):
    """A crop-then-classify run's summary: boxes and photos; the species counted per box."""

    def __init__(self, job: PredictionJob, options: DetectionOptions | None = None) -> None:
        super().__init__(job)
        self.tables = detection_tables(job)
        self.summary.noun = "boxes"
        self.from_file = options is not None and options.boxes is not None
        (self.photos, self.empty, self.boxes, self.whole, self.passed) = (0, 0, 0, 0, 0)

    def callbacks(self) -> dict[str, Callable[[Row], None]]:
        return {**super().callbacks(), "results": self.on_result, "photos": self.on_photo}

    def on_photo(self, row: Row) -> None:
        self.photos += 1
        self.empty += row[3] == "0"

    def on_result(self, row: Row) -> None:
        source = row[self.tables.columns["source"]]
        self.passed += source == SOURCE_PASSED
        if source not in (SOURCE_DETECTION, SOURCE_WHOLE_IMAGE):
            return  # no box, or one that passed through unclassified
        (path, prediction, top) = self.tables.parse_result(row)
        self.summary.add(path, prediction, [name for (name, _) in top])
        self.boxes += source == SOURCE_DETECTION
        self.whole += source == SOURCE_WHOLE_IMAGE

    def as_dict(self) -> dict[str, Any]:
        counts = {"photos": self.photos, "boxes": self.boxes, "photos_without_detections": self.empty}
        passed = {"boxes_passed_through": self.passed} if self.from_file else {}
        return {**self.summary.as_dict(), **counts, "whole_image_answers": self.whole, **passed}

    def format(self) -> str:
        whole = f", {self.whole} answered as whole images" if self.whole else ""
        if self.from_file:
            header = (
                f"Classified {self.boxes} boxes of the boxes file in {self.photos} photos ({self.empty} without "
                f"any{whole}; {self.passed} people and vehicles passed through), {self.summary.failures} not "
                "classified (unreadable, or failed or missing in the boxes file)."
            )
        else:
            header = (
                f"Detected {self.boxes} boxes in {self.photos} photos ({self.empty} without any{whole}), "
                f"{self.summary.failures} could not be read."
            )
        return self.summary.format(header=header)


def _md_base(inputs: Sequence[str | os.PathLike], paths: Sequence[str]) -> str:
    """The folder the batch output's ``file`` entries are relative to: the one folder given, else the photos'
    deepest common folder."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        return os.path.abspath(inputs[0])
    return os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in paths])


def write_md_results(job: PredictionJob, plan: RunPlan, step: DetectionStep) -> Path:
    """The MegaDetector batch output (docs/compatibility.md) of the run's final tables: every photo, its boxes
    with the detector's category and score, the box normalised to the photo, the species top-k as
    ``classifications``; unreadable photos with their ``failure``."""
    (options, tables) = (job.options, detection_tables(job))
    folder = Path(options.output.output_dir)
    columns = tables.columns

    def read(spec: TableSpec) -> Iterator[Row]:
        return read_table_rows(final_path(folder, spec, options.output.table_format), spec)

    sizes = {row[0]: (int(row[1]), int(row[2])) for row in read(tables.photos)}
    failures = {row[0]: row[1] for row in read(tables.failures)}
    species = {name: str(index) for (index, name) in enumerate(tables.class_names)}
    categories = {name: str(index + 1) for (index, name) in enumerate(step.class_names)}
    boxes: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in read(tables.results):
        if row[columns["source"]] != SOURCE_DETECTION:
            continue
        top = [pair for pair in tables.parse_result(row)[2] if pair[0]]
        box = [float(row[columns[name]]) for name in ("x1", "y1", "x2", "y2")]
        detection = md_detection(
            box,
            float(row[columns["det_score"]]),
            categories[row[columns["det_class"]]],
            sizes[row[0]],
            [(species[name], probability) for (name, probability) in top],
        )
        boxes[row[0]].append(detection)

    base = _md_base(options.inputs, plan.paths)
    images = []
    for path in plan.paths:
        file = Path(os.path.relpath(os.path.abspath(path), base)).as_posix()
        if path in failures:
            images.append({"file": file, "failure": failures[path]})
        elif path in sizes:
            images.append({"file": file, "detections": boxes.get(path, [])})
    model = options.model
    info = {
        "classifier": model.name or (Path(model.weights).name if model.weights is not None else None),
        "classification_completion_time": md_timestamp(),
        "detector_metadata": {"typical_detection_threshold": step.options.det_threshold},
    }
    # With a taxonomy, each species' ranks as SpeciesNet writes them: review tools read the scientific name there
    taxonomy = options.decision.taxonomy
    lineage = Taxonomy.from_csv(taxonomy).lineage if taxonomy else None
    output = md_batch_output(
        images,
        {index: name for (name, index) in categories.items()},
        {index: name for (name, index) in species.items()},
        detector=Path(step.options.detector).name,
        info=info,
        classification_descriptions=(
            {index: md_taxonomy_description(name, lineage.get(name)) for (name, index) in species.items()}
            if lineage is not None
            else None
        ),
    )
    return write_md_json(folder / MD_JSON_FILE, output)


def add_failure_rows(job: PredictionJob, failures: Sequence[tuple[str, str]]) -> None:
    """(rank 0, after the merge) Add ``(path, reason)`` rows that are no photo of the run (a boxes file's paths
    matching none) to the final failures table. The merge of a resumed run drops them (they are no input of it)
    before they are added again: never twice."""
    (options, tables) = (job.options, detection_tables(job))
    path = final_path(Path(options.output.output_dir), tables.failures, options.output.table_format)
    rows = list(read_table_rows(path, tables.failures)) if path.is_file() else []
    write_table(path, tables.failures, [*rows, *tables.failure_rows(failures)["failures"]])


def write_md_boxes(job: PredictionJob, source: FileBoxes) -> Path:
    """``--export md-json`` of a run with ``--boxes``: the boxes file written back as a MegaDetector batch output
    with each classified detection's top-k species as ``classifications`` (and with ``--taxonomy`` the species'
    ranks as ``classification_category_descriptions``), every other field as the file has it."""
    (options, tables) = (job.options, detection_tables(job))
    folder = Path(options.output.output_dir)
    columns = tables.columns
    classified: dict[str, dict[int, list[tuple[str, float]]]] = defaultdict(dict)
    for row in read_table_rows(final_path(folder, tables.results, options.output.table_format), tables.results):
        if row[columns["source"]] == SOURCE_DETECTION:
            top = [pair for pair in tables.parse_result(row)[2] if pair[0]]
            classified[row[0]][int(row[columns["box"]])] = top
    taxonomy = options.decision.taxonomy
    lineage = Taxonomy.from_csv(taxonomy).lineage if taxonomy else None
    model = options.model
    return source.write_md(
        folder / MD_JSON_FILE,
        classified,
        class_names=tables.class_names,
        descriptions=(
            {name: md_taxonomy_description(name, lineage.get(name)) for name in tables.class_names}
            if lineage is not None
            else None
        ),
        classifier=model.name or (Path(model.weights).name if model.weights is not None else None),
    )

"""Crop-then-classify: ``birder-predict --detector det.pt`` (or ``--boxes FILE``), a row per box.

The run is :func:`birder.runs.predict.run_prediction`'s (plan, ``torchrun`` shards, journals, resume, merge,
failures table); the steps here are those that differ (:class:`DetectionSteps`, a
:class:`~birder.runs.steps.RunSteps`), and its options are the run's ``detection`` group
(:class:`~birder.runs.predict_options.DetectionOptions`):

- prepare: the classifier as for any run (``-n NAME`` or ``--weights FILE``), and the run's box source
  (:mod:`birder.runs.box_sources`): the detector (:func:`~birder.net.detection.checkpoint.load_detector`, run in
  float32), or the boxes file a user already has (``--boxes``: :class:`~birder.runs.box_sources.FileBoxes`, whose
  people, vehicles and detections below the threshold pass through unclassified);
- predict: each batch of photos is decoded once (:func:`~birder.io.images.load_image`), the detector finds boxes
  in all of them in one pass (:func:`~birder.inference.detection.detect_tensors`; a boxes file instead gives each
  photo's, and the photos it lists as failed or does not list are failures, never decoded), boxes scoring at least
  ``det_threshold`` are cropped with a margin (:func:`~birder.inference.crops.crop_box`) and every crop goes
  through the classifier's own preprocessing and batch loop (``classification_transform``,
  :meth:`~birder.inference.predictor.Predictor.predict_tensor`) and the decision order
  (:func:`birder.runs.steps.classified_rows`: species list, prior, top-k, ``label`` / ``rank`` /
  ``label_probability``);
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
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from birder.distributed import DistInfo
from birder.errors import BirderError, CheckpointError
from birder.inference import predictor as P
from birder.inference.crops import (
    crop_box,
    md_batch_output,
    md_detection,
    md_taxonomy_description,
    md_timestamp,
    write_md_json,
)
from birder.inference.dataset import PhotoBatch
from birder.inference.detection import detect_tensors
from birder.inference.tables import PredictionTables, photo_file_stem
from birder.inference.taxonomy import Taxonomy
from birder.io.journal import final_path
from birder.io.table_files import PATH_COLUMN, Column, Row, TableSpec, read_table_rows, write_table
from birder.runs.box_sources import SOURCE_PASSED, BoxSource, FileBoxes, SourceBox
from birder.runs.predict_options import DetectionOptions, PredictionOptions
from birder.runs.steps import (
    PredictionJob,
    RunPlan,
    RunSteps,
    Tally,
    classified_rows,
    journal_batches,
    make_predictor,
)

SOURCE_DETECTION = "detection"
SOURCE_WHOLE_IMAGE = "whole-image"
MD_JSON_FILE = "megadetector.json"
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

    def settings(self) -> dict[str, Any]:
        """What shapes the rows (a resume must match it)."""
        options = self.options
        assert options.detector is not None
        return {
            "detector": os.path.abspath(options.detector),
            "det_threshold": options.det_threshold,
            "crop_margin": options.crop_margin,
            "fallback_whole_image": options.fallback_whole_image,
        }

    def input_transform(self) -> Callable[[Image.Image], tuple[Image.Image, torch.Tensor]]:
        return PhotoAndDetectorInput(self.transform)

    def boxes(
        self, photos: Sequence[Image.Image], inputs: Sequence[Any], paths: Sequence[str]
    ) -> list[list[SourceBox]]:
        """The boxes the detector finds in a batch of decoded photos (``inputs``: its tensors), best first."""
        try:
            found = detect_tensors(
                self.net,
                list(inputs),
                [(photo.height, photo.width) for photo in photos],
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


def load_detection_step(options: DetectionOptions, device: torch.device) -> DetectionStep:
    """The ``--detector`` file, ready for inference on ``device`` (float32: torchvision's box operations)."""
    from birder.inference.model import load_for_inference

    try:
        loaded = load_for_inference(weights=Path(options.detector), detector=True, device=device)
    except CheckpointError as err:
        raise BirderError(f"--detector: {err}") from None
    return DetectionStep(loaded.net, loaded.transform, loaded.class_names, options)


class DetectionSteps(RunSteps):
    """Crop-then-classify, a kind of run (see the module's docstring): a row per box. It serves one run: the box
    source (the detector, loaded by :meth:`prepare`, or the boxes file, read by :meth:`check`) is kept for the
    other steps."""

    tables_class = DetectionTables

    def __init__(self, options: DetectionOptions) -> None:
        self.options = options
        self._source: BoxSource | None = None

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
            self._source = load_detection_step(self.options, context.device)
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
        loader = predictor.loader(plan.paths, loaded, transform=source.input_transform(), stack=False)
        batches = _with_skipped(
            job, loader, skipped, plan.paths, lambda batch: _batch_rows(job, source, predictor, batch, plan.paths)
        )
        return journal_batches(job, context, plan, len(mine), batches, "Detecting")

    def tally(self, job: PredictionJob) -> Tally:
        return DetectionTally(job, self.options)

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
    """The dataset's transform of a detection run: the decoded photo (for the crops) and the detector's input."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, photo: Image.Image) -> tuple[Image.Image, torch.Tensor]:
        return (photo, self.transform(photo))


@dataclass
class _Image:
    """One image for the classifier: a box's crop or a whole photo, and its row's lead cells."""

    photo: int  # its photo's place in the batch
    image: Image.Image | None  # None: a box that passes through unclassified (its row has the lead cells only)
    lead: list[Any]


def _photos_and_tensors(batch: PhotoBatch) -> list[tuple[Image.Image, torch.Tensor]]:
    """The photos of a batch with their detector inputs: this run's loader keeps them as pairs (``stack=False``)."""
    if not isinstance(batch.inputs, list):
        raise P.PredictionError("a crop-then-classify batch holds (photo, tensor) pairs: its loader must not stack")
    return batch.inputs


def _box_source_cell(box: SourceBox) -> str | None:
    """A box row's ``source``: classified; passed through and counted (a file's person or vehicle); or neither
    (a file's detection below the threshold, kept for reference)."""
    if box.classify:
        return SOURCE_DETECTION
    return SOURCE_PASSED if box.counted else None


def _batch_rows(
    job: PredictionJob, source: BoxSource, predictor: P.Predictor, batch: PhotoBatch, paths: list[str]
) -> tuple[dict[str, list[Row]], int]:
    """``(rows by table, photos)`` of one batch of photos."""
    if batch.run_error is not None:
        raise P.PredictionError(f"{batch.run_error}; check the preprocessing options (size, crop)")
    tables = detection_tables(job)
    rows = tables.failure_rows((paths[index], reason) for (index, reason) in batch.failures)
    count = len(batch.indices) + len(batch.failures)
    if not batch.indices:
        return (rows, count)

    inputs = _photos_and_tensors(batch)
    photos = [photo for (photo, _) in inputs]
    batch_paths = [paths[i] for i in batch.indices]
    found = source.boxes(photos, [extra for (_, extra) in inputs], batch_paths)

    # Each photo's images for the classifier: its boxes' crops in the source's order (or the whole photo, or
    # none), with the boxes that pass through unclassified in their places
    options = source.options
    per_photo: list[list[_Image]] = []
    for place, (photo, boxes) in enumerate(zip(photos, found, strict=True)):
        mine = [
            _Image(
                place,
                crop_box(photo, box.corners, options.crop_margin) if box.classify else None,
                [box.number, len(boxes), *box.corners, box.category, box.score, _box_source_cell(box)],
            )
            for box in boxes
        ]
        if not any(box.counted for box in boxes) and options.fallback_whole_image:
            mine.append(_Image(place, photo, [None, 0, None, None, None, None, None, None, SOURCE_WHOLE_IMAGE]))
        per_photo.append(mine)

    images = [image for mine in per_photo for image in mine if image.image is not None]
    classified = _classify(job, predictor, images, batch_paths, batch.metadata)
    (results, photo_rows) = ([], [])
    for index, photo, metadata, mine in zip(batch.indices, photos, batch.metadata, per_photo, strict=True):
        boxes = [
            next(classified) if image.image is not None else tables.box_row(paths[index], image.lead, metadata)
            for image in mine
        ]
        results += boxes or [tables.empty_row(paths[index], metadata)]
        detections = sum(image.lead[-1] in (SOURCE_DETECTION, SOURCE_PASSED) for image in mine)
        photo_rows.append(tables.photos.format_row([paths[index], photo.width, photo.height, detections]))
        _write_files(options, tables, paths[index], photo, mine, boxes)
    rows.update({"results": results, "photos": photo_rows})
    return (rows, count)


def _with_skipped(
    job: PredictionJob,
    loader: Iterable[PhotoBatch],
    skipped: Mapping[int, str],
    paths: list[str],
    batch_rows: Callable[[PhotoBatch], tuple[dict[str, list[Row]], int]],
) -> Iterator[tuple[dict[str, list[Row]], int]]:
    """``batch_rows`` of each batch the loader gives, with the failure rows of the ``skipped`` photos (index ->
    reason: never decoded) in their places: a journal's rows follow the photos' order."""
    tables = detection_tables(job)
    pending = sorted(skipped)
    for batch in loader:
        (rows, count) = batch_rows(batch)
        last = max([*batch.indices, *(index for (index, _) in batch.failures)], default=-1)
        before = [index for index in pending if index < last]
        if before:
            pending = pending[len(before) :]
            failures = sorted([*batch.failures, *((index, skipped[index]) for index in before)])
            rows.update(tables.failure_rows((paths[index], reason) for (index, reason) in failures))
            count += len(before)
        yield (rows, count)
    if pending:
        yield (tables.failure_rows((paths[index], skipped[index]) for index in pending), len(pending))


def _classify(
    job: PredictionJob, predictor: P.Predictor, images: list[_Image], paths: list[str], metadata: Sequence[Any]
) -> Iterator[Row]:
    """The results rows of ``images`` (crops and whole photos), classified ``batch_size`` at a time."""
    size = job.options.execution.batch_size
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        inputs = torch.stack([job.transform(image.image) for image in chunk])
        try:
            (probabilities, embeddings, logits, _) = predictor.predict_tensor(inputs)
        except Exception as exc:
            raise P.model_failure(paths[chunk[0].photo], exc) from exc
        yield from classified_rows(
            job,
            [paths[image.photo] for image in chunk],
            [metadata[image.photo] for image in chunk],
            (probabilities, embeddings, logits),
            lead_values=[image.lead for image in chunk],
        )["results"]


def _write_files(
    options: DetectionOptions,
    tables: DetectionTables,
    path: str,
    photo: Image.Image,
    images: list[_Image],
    rows: list[Row],
) -> None:
    """``--save-crops DIR`` (each box's crop) and ``--draw DIR`` (the photo with its labelled boxes)."""
    boxes = [(image, row) for (image, row) in zip(images, rows, strict=False) if image.lead[-1] == SOURCE_DETECTION]
    crops = [(image.image, image.lead) for (image, _) in boxes if image.image is not None]
    stem = photo_file_stem(path)
    if options.save_crops is not None:
        folder = Path(options.save_crops)
        folder.mkdir(parents=True, exist_ok=True)
        for crop, lead in crops:
            crop.save(folder / f"{stem}_box{lead[0]}.jpg", quality=95)
    if options.draw is not None:
        folder = Path(options.draw)
        folder.mkdir(parents=True, exist_ok=True)
        labelled = [(image.lead[2:6], tables.caption(row)) for (image, row) in boxes]
        draw_boxes(photo, labelled).save(folder / f"{stem}.jpg", quality=90)


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

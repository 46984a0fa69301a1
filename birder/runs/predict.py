"""A ``birder-predict`` run as one library call: :func:`run_prediction` plans, predicts and finishes.

1. Plan (rank 0): find the photos (under the inputs, or in a manifest; with ``shard``, only this job's block of
   them: :mod:`birder.runs.photo_lists`) and, on a resume, those already done
   (:func:`~birder.io.journal.prepare_run`). Every rank gets the same plan, then its own share.
2. Predict (every rank): the batch loop (:class:`~birder.inference.predictor.Predictor`) writes this rank's
   journals (:class:`~birder.io.journal.JournalSet`); :mod:`birder.inference.tables` shapes the rows.
3. Finish (rank 0, once every rank's journals are on disk): merge them into the final tables, print the summary,
   draw the picture (:func:`~birder.plots.plot_predictions`).

With a detector (``detector``, ``birder-predict --detector``) the steps that differ are
:mod:`birder.runs.detect`'s (:class:`RunSteps`): each detected box is cropped and classified, a row per
box, in the same frame (plan, shards, journals, merge, resume).

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
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from birder.data.transforms import classification_transform
from birder.distributed import DistInfo, barrier, compute_on_main, distributed_session, main_first
from birder.errors import BirderError
from birder.geo.camtrap import CamtrapOptions
from birder.geo.events import DEFAULT_GAP
from birder.geo.predict import GeoOptions, GeoStep, check_geo_options
from birder.inference import predictor as P
from birder.inference.decision import DecisionPolicy, policy_from_options
from birder.inference.model import load_for_inference
from birder.inference.optimize import AMP_DTYPES, DtypeChoice, choose_dtype, optimize_for_inference
from birder.inference.tables import COLUMNS_HINT, PredictionTables, write_feature_files
from birder.io.checkpoint import ModelInfo, get_num_classes_from_signature, get_size_from_signature
from birder.io.journal import JOURNAL_DIR, RUN_INFO_FILE, JournalSet, finalize_run, prepare_run
from birder.io.outputs import OutputFolder, check_output_file
from birder.net.base import BaseNet
from birder.plots import plot_predictions
from birder.runs.photo_lists import parse_shard, select_photos

# The name the run's messages go by
PROG = "birder-predict"
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
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
_PHOTO_STEM = "*-" + "[0-9a-f]" * 12
PHOTO_FOLDER_OUTPUTS = {
    "explain": ("--explain", (f"{_PHOTO_STEM}.png",)),
    "save_crops": ("--save-crops", (f"{_PHOTO_STEM}_box*.jpg",)),
    "draw": ("--draw", (f"{_PHOTO_STEM}.jpg",)),
}


@dataclass
class PredictionOptions:
    """What to classify and how: ``birder-predict``'s arguments, with the same names and defaults."""

    inputs: Sequence[str | os.PathLike] = ()  # photo files and/or folders (searched recursively)
    # Or a file listing the photos (birder.runs.photo_lists): one path per line, or a Parquet "path" column
    manifest: str | os.PathLike | None = None
    shard: str | None = None  # "K/N": only the K-th of N contiguous blocks of the photos (independent jobs)
    # The model: a pretrained name, or a local file (and its network, when the file does not name it)
    model: str | None = None
    weights: str | os.PathLike | None = None
    network: str | None = None
    # Preprocessing
    size: Sequence[int] | None = None  # H [W]; None: the model's
    center_crop: float = 1.0
    simple_crop: bool = False
    tta: bool = False
    # Execution
    batch_size: int = 32
    num_workers: int = DEFAULT_WORKERS
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 where native (CUDA, CPUs with AMX/AVX512-BF16), else float32
    quantize: str | None = None
    amp: str | None = None  # autocast: "auto" (a bare --amp: float16 on GPUs, bfloat16 on the CPU), "bf16", "fp16"
    compile: bool = False
    progress: bool = True
    # Outputs
    output_dir: Path = Path("results")
    table_format: str = "csv"
    top_k: int = 5
    min_prob: float = 0.0
    species: str | os.PathLike | None = None  # a file of class names, one per line
    save_probabilities: bool = False
    save_logits: bool = False
    save_embeddings: bool = False
    save_features: bool = False
    resume: bool = False
    overwrite: bool = False  # replace what an earlier run wrote in output_dir (and the other output folders)
    chunk_size: int = 256
    show: bool = False
    plot: str | os.PathLike | None = None
    plot_max: int = 8
    explain: str | os.PathLike | None = None  # a folder: one explanation overlay PNG per photo
    explain_method: str = "rollout"
    # The answer (label, rank, label_probability: birder.inference.decision)
    uncalibrated: bool = False  # ignore the model's calibration (temperature, fitted thresholds, unknown test)
    thresholds: str = "per-species"  # per-species (the calibrated model's, else --min-prob), global or none
    taxonomy: str | os.PathLike | None = None  # species,genus,family,order CSV: fall back to higher ranks
    unknown_method: str | None = None  # None: the model's own unknown test (if any); "none": no test
    unknown_threshold: float | None = None
    # Where and when (birder.geo): the location-and-season prior, events, camera-trap exports
    prior: str | os.PathLike | None = None  # a .bpr file (birder-prior build)
    prior_strength: float = 1.0  # posterior ∝ p(species | photo) × prior ** strength; 0: flags only
    lat: float | None = None  # the place and date of every photo (over EXIF)
    lon: float | None = None
    date: str | None = None
    locations: str | os.PathLike | None = None  # CSV of path, latitude, longitude, date per photo (over all)
    events: bool = False  # group photos into events by folder and time gap
    event_gap: str = DEFAULT_GAP
    exports: Sequence[str] = ()  # camtrap-dp, coco-ct
    timezone: str | None = None  # the photos' clock (Camtrap DP)
    deployment_lat: float | None = None  # camera position where photos have no GPS (Camtrap DP)
    deployment_lon: float | None = None
    project_title: str = "birder predictions"
    contributor: str = "birder"
    # Crop-then-classify (birder.runs.detect): each box a detector finds is classified, a row per box
    detector: str | os.PathLike | None = None  # a birder-train-det file
    det_threshold: float = 0.5  # boxes scoring below it are dropped
    crop_margin: float = 0.1  # each crop grows by this fraction of its box's width and height on each side
    fallback_whole_image: bool = False  # a photo without boxes gets the whole photo's answer (source whole-image)
    save_crops: str | os.PathLike | None = None  # a folder: each crop as a JPEG
    draw: str | os.PathLike | None = None  # a folder: each photo with its labelled boxes

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)


@dataclass(frozen=True)
class RunReport:
    """What a run did. The summary and the tables are rank 0's (it merges); other ranks get ``None`` and ``{}``."""

    summary: P.RunSummary | None
    tables: dict[str, Path]  # table name -> final file
    photos_this_run: int  # every rank's, the photos a resume skipped not counted
    seconds: float  # this rank's batch loop


def run_prediction(options: PredictionOptions) -> RunReport:
    """Classify ``options.inputs`` into the tables in ``options.output_dir``, as ``birder-predict`` does.

    It also says what the command line says: the summary and the tables written on stdout (rank 0), a progress bar
    (unless ``progress`` is off), a resume's count and unknown species on stderr.
    """
    _check_options(options)
    steps = _run_steps(options)
    device_name = "cpu" if options.quantize else options.device
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
            **plan.run_info,
        }
        tally = steps.tally(job)
        report = _finish(job, plan, elapsed, run_info, tally)
        if job.geo is not None:
            _finish_geo(job)
        steps.after(job, plan)
        if options.plot is not None or options.show:
            plot_predictions(tally.shown, options.plot, options.show)
        for folder in plan.outputs:
            folder.finish()
        return report


@dataclass(frozen=True)
class RunSteps:
    """The steps that differ between kinds of run (classifying photos here; crop-then-classify in
    :mod:`birder.runs.detect`); :func:`run_prediction` runs them in the same frame: ranks, plan, journals,
    merge."""

    prepare: Callable[[PredictionOptions, DistInfo], PredictionJob]
    predict: Callable[
        [PredictionJob, DistInfo, RunPlan, list[int]], float
    ]  # this rank's photos into its journals; seconds
    tally: Callable[[PredictionJob], Tally]  # what the summary counts in the merged rows
    after: Callable[[PredictionJob, RunPlan], None]  # (rank 0, after the merge) what is written from the final tables


def _run_steps(options: PredictionOptions) -> RunSteps:
    if options.detector is not None:
        from birder.runs import detect as detect_run

        return detect_run.STEPS
    return RunSteps(prepare_job, _predict, PhotoTally, lambda job, plan: None)


# ---------------------------------------------------------------------------------------------------------------------
# Preparing: the model, the classes, the tables
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PredictionJob:
    """Everything the run needs once the model is loaded; the same on every rank."""

    options: PredictionOptions
    net: BaseNet
    transform: Callable[[Any], torch.Tensor]
    selection: P.ClassSelection
    tables: PredictionTables
    settings: dict[str, Any]
    dtype: DtypeChoice  # what the network runs in, and why
    policy: DecisionPolicy = field(default_factory=lambda: DecisionPolicy([]))  # the answer: label, rank, ...
    geo: GeoStep | None = None  # the location prior, events, exports (None: none asked for)
    detection: Any = None  # with --detector: the detector step (birder.runs.detect.DetectionStep)


def _check_options(options: PredictionOptions) -> None:
    if bool(options.inputs) == (options.manifest is not None):
        given = "both" if options.inputs else "neither"
        raise BirderError(
            f"give photos as INPUT files/folders or as --manifest FILE, exactly one of the two ({given} given)"
        )
    if options.shard is not None:
        parse_shard(options.shard)
    if options.model is None and options.weights is None:
        raise BirderError("no model given: pass a pretrained name (-n vit_l16_mim-eu-common) or --weights FILE")
    if options.size is not None and len(options.size) > 2:
        raise BirderError(f"--size takes one or two numbers (H [W]), got {len(options.size)}")
    if not options.center_crop > 0:
        raise BirderError(f"--center-crop must be a positive fraction, got {options.center_crop}")
    if options.quantize and options.device not in ("auto", "cpu"):
        raise BirderError("--quantize int8 runs on the CPU only: drop it, or use --device cpu")
    check_detection_options(options)
    check_geo_options(geo_options(options))
    for folder in output_folders(options):
        folder.check(inputs=input_files(options), resume=options.resume, overwrite=options.overwrite)
    if options.plot is not None:
        # The picture is redrawn by a resumed run
        overwrite = options.overwrite or options.resume
        check_output_file(options.plot, inputs=input_files(options), overwrite=overwrite, option="--plot")


def input_files(options: PredictionOptions) -> list[str | os.PathLike]:
    """The files a run reads besides the photos: no output may be one of them."""
    named = (options.weights, options.detector, options.manifest, options.species, options.taxonomy)
    return [path for path in (*named, options.prior, options.locations) if path is not None]


def output_folders(options: PredictionOptions) -> list[OutputFolder]:
    """The folders a run writes into: ``output_dir``, and those of ``--explain``, ``--save-crops``, ``--draw``."""
    folders = [OutputFolder(options.output_dir, PROG, PREDICTION_OUTPUTS)]
    for name, (option, patterns) in PHOTO_FOLDER_OUTPUTS.items():
        folder = getattr(options, name)
        if folder is not None:
            # No manifest among the images: their names (a photo's stem and hash) say which are a run's
            folders.append(OutputFolder(Path(folder), PROG, patterns, option, record=False))
    return folders


def check_detection_options(options: PredictionOptions) -> None:
    """Refuse the crop-then-classify options without ``--detector`` (with it: ``detect_run`` checks its own)."""
    if options.detector is not None:
        from birder.runs import detect as detect_run

        detect_run.check_options(options)
        return
    needs_detector = {
        "--export md-json": any(name in DETECTION_EXPORTS for name in options.exports),
        "--fallback-whole-image": options.fallback_whole_image,
        "--save-crops": options.save_crops is not None,
        "--draw": options.draw is not None,
    }
    for option, given in needs_detector.items():
        if given:
            raise BirderError(f"{option} is about detected boxes: it needs --detector FILE (a birder-train-det file)")


# Exports written from a crop-then-classify run's own tables (birder.runs.detect), not by birder.geo
DETECTION_EXPORTS = ("md-json",)


def geo_options(options: PredictionOptions) -> GeoOptions:
    """The options as :mod:`birder.geo` sees them: its exports only."""
    return GeoOptions(
        prior=options.prior,
        prior_strength=options.prior_strength,
        lat=options.lat,
        lon=options.lon,
        date=options.date,
        locations=options.locations,
        events=options.events,
        event_gap=options.event_gap,
        exports=[name for name in options.exports if name not in DETECTION_EXPORTS],
        camtrap=CamtrapOptions(
            timezone=options.timezone,
            deployment_lat=options.deployment_lat,
            deployment_lon=options.deployment_lon,
            project_title=options.project_title,
            contributor=options.contributor,
        ),
    )


def _settings(
    options: PredictionOptions, size: tuple[int, int], tables: list[str], species: list[str] | None, dtype: str
) -> dict[str, Any]:
    """What shapes the rows: a resume must match it, so one table never mixes two kinds of rows."""
    return {
        "model": options.model,
        "weights": os.path.abspath(options.weights) if options.weights else None,
        "network": options.network,
        "size": list(size),
        "center_crop": options.center_crop,
        "simple_crop": options.simple_crop,
        "tta": options.tta,
        "dtype": dtype,  # the one resolved: resuming an auto run on another machine must not mix dtypes
        "quantize": options.quantize,
        "amp": options.amp if options.amp in AMP_DTYPES else options.amp is not None,  # as before: a bare --amp True
        "top_k": options.top_k,
        "min_prob": options.min_prob,
        "species": species,
        "tables": tables,
        "format": options.table_format,
    }


def _load_network(
    options: PredictionOptions, context: DistInfo, dtype: DtypeChoice
) -> tuple[BaseNet, ModelInfo, tuple[int, int]]:
    """The network (rank 0 loads first: a download happens once), converted for inference; its info and size."""
    progress_bar = context.is_main and options.progress
    loaded = main_first(
        context,
        lambda: load_for_inference(
            options.model, options.weights, options.network, device=torch.device("cpu"), progress_bar=progress_bar
        ),
    )
    (net, model_info) = (loaded.net, loaded.info)
    if not model_info.class_to_idx or get_num_classes_from_signature(model_info.signature) == 0:
        raise BirderError("this model has no classification head (a pretraining encoder); it cannot classify")

    size = get_size_from_signature(model_info.signature)
    if options.size is not None:
        size = (options.size[0], options.size[-1])
        net.adjust_size(size)
    net = optimize_for_inference(net, options.quantize or dtype.dtype).to(context.device)
    if options.compile:
        net = P.compile_for_inference(net)
    return (net, model_info, size)


def _warn_unknown_species(selection: P.ClassSelection, species_file: str | os.PathLike) -> None:
    shown = ", ".join(selection.unknown[:10]) + (" ..." if len(selection.unknown) > 10 else "")
    print(
        f"{PROG}: warning: {len(selection.unknown)} name(s) in {species_file} are not classes of this model "
        f"and are ignored: {shown}",
        file=sys.stderr,
    )


def prepare_job(
    options: PredictionOptions, context: DistInfo, tables_class: type[PredictionTables] = PredictionTables
) -> PredictionJob:
    """Load the model and set up the classes, the transform and the tables (of ``tables_class``)."""
    species = P.read_species_file(options.species) if options.species is not None else None
    dtype = _choose_dtype(options, context)
    (net, model_info, size) = _load_network(options, context, dtype)
    selection = P.ClassSelection(model_info.class_to_idx, species)
    if selection.unknown and context.is_main:
        _warn_unknown_species(selection, options.species)

    policy = _decision_policy(options, net, selection)
    geo = GeoStep.from_options(geo_options(options), selection.all_names, selection.indices, options.top_k)
    tables = tables_class(
        selection.names,
        options.top_k,
        all_class_names=selection.all_names,
        # Events combine each photo's image probabilities: --events keeps their table
        probabilities=options.save_probabilities or options.events,
        logits=options.save_logits,
        embedding_dim=net.embedding_size if options.save_embeddings else None,
        features=options.save_features,
        decisions=policy.active,
        extra_result_columns=geo.result_columns() if geo is not None else (),
    )
    transform = classification_transform(size, model_info.rgb_stats, options.center_crop, options.simple_crop)
    settings = _settings(options, size, tables.names, species, dtype.dtype)
    settings.update(_decision_settings(policy))
    settings.update(geo.settings() if geo is not None else {})
    return PredictionJob(options, net, transform, selection, tables, settings, dtype, policy=policy, geo=geo)


def _decision_policy(options: PredictionOptions, net: BaseNet, selection: P.ClassSelection) -> DecisionPolicy:
    """Steps 5-8 of the decision order for the run's classes, from the model's calibration and the options."""
    return policy_from_options(net, selection.names, options, model_class_names=selection.all_names)


def _decision_settings(policy: DecisionPolicy) -> dict[str, Any]:
    """What the answer adds to the run's settings: nothing for an uncalibrated model without decision options, so
    such a run's settings (and a resume of an older run) stay as they were."""
    if not policy.active and policy.temperature == 1.0:
        return {}
    return {"decision": policy.describe()}


def _choose_dtype(options: PredictionOptions, context: DistInfo) -> DtypeChoice:
    """The dtype the run uses (``auto`` resolved for the run's device)."""
    if options.quantize:
        return DtypeChoice("float32", f"--quantize {options.quantize}: float32 activations, int8 weights")
    return choose_dtype(options.dtype, context.device)


# ---------------------------------------------------------------------------------------------------------------------
# Planning and predicting
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """The same on every rank: the photos, the indices of those still to do, the attempt, what the merge includes."""

    paths: list[str]
    remaining: list[int]
    attempt: int
    include_final: bool  # the final tables of an earlier run are merged in
    run_info: dict[str, Any] = field(default_factory=dict)  # what run.json records about the photos (the shard)
    outputs: list[OutputFolder] = field(default_factory=list)  # the folders claimed for this run (rank 0's)


def _plan(job: PredictionJob) -> RunPlan:
    """(rank 0) Find the photos (this shard's) and, on a resume, those already done."""
    options = job.options
    shard = parse_shard(options.shard) if options.shard is not None else None
    selection = select_photos(options.inputs, options.manifest, shard, PROG)
    paths = selection.paths
    unmatched = job.geo.unmatched_locations(paths) if job.geo is not None else None
    if unmatched:
        print(f"{PROG}: warning: {unmatched}", file=sys.stderr)
    # Only now, with the model loaded and the photos found, is an earlier run's output cleared (--overwrite)
    inputs = input_files(options)
    outputs = [
        folder.claim(inputs=inputs, resume=options.resume, overwrite=options.overwrite)
        for folder in output_folders(options)
    ]
    state = prepare_run(
        options.output_dir,
        job.tables.specs,
        options.table_format,
        # The list and the shard shape which rows a folder holds: a resume or a merge must see the same
        {**job.settings, **selection.settings},
        options.resume,
        columns_hint=COLUMNS_HINT,
    )
    remaining = [index for (index, path) in enumerate(paths) if path not in state.done]
    if state.done:
        print(f"Resuming: {len(paths) - len(remaining)} of {len(paths)} photos already done", file=sys.stderr)
    return RunPlan(paths, remaining, state.attempt, state.include_final, selection.run_info, outputs)


def _batch_rows(job: PredictionJob, batch: P.PredictionBatch, paths: list[str]) -> dict[str, list[list[str]]]:
    """The table rows of one batch (feature maps, when asked for, are written to their files here)."""
    rows = job.tables.failure_rows((paths[index], reason) for (index, reason) in batch.failures)
    if not batch.indices:
        return rows

    batch_paths = [paths[index] for index in batch.indices]
    feature_files = None
    if batch.features is not None:
        feature_files = write_feature_files(job.options.output_dir / "features", batch_paths, batch.features)
    outputs = (batch.probabilities, batch.embeddings, batch.logits)
    rows.update(classified_rows(job, batch_paths, batch.metadata, outputs, feature_files=feature_files))
    return rows


def classified_rows(
    job: PredictionJob,
    paths: list[str],
    metadata: Sequence[Any],
    outputs: tuple[Any, Any, Any],
    *,
    feature_files: Sequence[str] | None = None,
    lead_values: Sequence[Sequence[Any]] | None = None,
) -> dict[str, list[list[str]]]:
    """The rows of classified images (photos, or crops: ``paths`` then repeats a photo's), from the classifier's
    ``outputs`` ``(probabilities, embeddings, logits)``: the species restricted to the run's, the prior, top-k and
    the answer (decision steps 4-8)."""
    (raw_probabilities, embeddings, logits) = outputs
    probabilities = job.selection.apply(raw_probabilities)
    # Step 4, the location prior (--prior): top-k and answer are the adjusted ones; the probabilities table and
    # the image_top columns keep the image's own
    (adjusted, prior, geo_cells) = _geo_batch(job, paths, metadata, probabilities)
    (top_indices, top_probabilities) = P.top_k(adjusted, job.tables.top_k)
    decisions = None
    if job.policy.active:
        decisions = job.policy.decide(
            probabilities,
            logits=logits,
            embeddings=embeddings,
            prior=prior,
            prior_strength=job.options.prior_strength,
        )
    given = {"min_prob": job.options.min_prob, "logits": logits, "embeddings": embeddings, "decisions": decisions}
    given.update(feature_files=feature_files, extra_values=geo_cells, lead_values=lead_values)
    return job.tables.rows(paths, probabilities, top_indices, top_probabilities, metadata, **given)


def _geo_batch(
    job: PredictionJob, paths: list[str], metadata: Sequence[Any], probabilities: Any
) -> tuple[Any, Any, list[list[Any]] | None]:
    """``(adjusted probabilities, prior [B, classes] or None, added cells or None)``: without geo options, the
    probabilities as they are (the tables stay byte for byte what they were)."""
    if job.geo is None:
        return (probabilities, None, None)
    return job.geo.batch(paths, metadata, probabilities, job.selection.names)


def make_predictor(job: PredictionJob) -> P.Predictor:
    """The batch loop of the run's classifier: what to compute (the outputs the tables need), then how."""
    options = job.options
    return P.Predictor(
        job.net,
        job.transform,
        tta=options.tta,
        return_embedding="embeddings" in job.tables.names or job.policy.needs_embeddings,
        return_logits="logits" in job.tables.names or job.policy.needs_logits,
        return_features="features" in job.tables.names,
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        amp=options.amp is not None,
        amp_dtype=AMP_DTYPES.get(options.amp or ""),  # None: the device's (auto)
        calibrated=not options.uncalibrated,
    )


def _predict(job: PredictionJob, context: DistInfo, plan: RunPlan, mine: list[int]) -> float:
    """Classify this rank's photos into its journals; returns the seconds it took."""
    predictor = make_predictor(job)

    def batches() -> Iterator[tuple[dict[str, list[list[str]]], int]]:
        for batch in predictor.predict_files(plan.paths, mine):
            yield (_batch_rows(job, batch, plan.paths), batch.num_photos)
            if job.options.explain is not None:
                _write_explanations(job, batch, plan.paths)

    return journal_batches(job, context, plan, len(mine), batches(), "Classifying")


def journal_batches(
    job: PredictionJob,
    context: DistInfo,
    plan: RunPlan,
    total: int,
    batches: Iterable[tuple[Mapping[str, list[list[str]]], int]],
    verb: str,
) -> float:
    """Write ``(rows by table, photos)`` of each batch into this rank's journals, with a progress bar (rank 0);
    returns the seconds it took."""
    options = job.options
    started = time.perf_counter()
    journals = JournalSet(options.output_dir, job.tables.specs, context.rank, plan.attempt, options.chunk_size)
    progress = tqdm(
        total=total,
        unit="img",
        desc=verb if not context.distributed else f"{verb} (rank 0 of {context.world_size})",
        disable=not options.progress or not context.is_main,
        dynamic_ncols=True,
    )
    # Closed whatever happens: the rows of the batches that finished become durable (a resume skips them)
    with progress, journals:
        for rows, photos in batches:
            journals.add(rows, photos)
            progress.update(photos)
    return time.perf_counter() - started


def _write_explanations(job: PredictionJob, batch: P.PredictionBatch, paths: list[str]) -> None:
    """``--explain DIR``: an overlay PNG per classified photo, its top species and probability written on it."""
    from birder.introspection.files import write_overlays

    if not batch.indices:
        return
    (top, probabilities) = P.top_k(job.selection.apply(batch.probabilities), 1)
    labels = [f"{job.selection.names[int(i[0])]} {float(p[0]):.2f}" for (i, p) in zip(top, probabilities, strict=True)]
    batch_paths = [paths[index] for index in batch.indices]
    write_overlays(job.net, job.transform, batch_paths, labels, Path(job.options.explain), job.options.explain_method)


# ---------------------------------------------------------------------------------------------------------------------
# Finishing
# ---------------------------------------------------------------------------------------------------------------------


# A photo in the picture: (path, prediction, [(class, probability), ...])
_Shown = tuple[str, str, list[tuple[str, float]]]


class Tally:
    """What the summary counts, fed each merged row of the final tables (``callbacks``: table -> function)."""

    def __init__(self, job: PredictionJob) -> None:
        self.job = job
        self.summary = P.RunSummary(job.selection.names, job.tables.top_k)
        self.shown: list[_Shown] = []  # the first photos, for the picture (--plot, --show)

    def callbacks(self) -> dict[str, Callable[[list[str]], None]]:
        return {"failures": self.on_failure}

    def on_failure(self, row: list[str]) -> None:
        self.summary.failures += 1

    def as_dict(self) -> dict[str, Any]:
        return self.summary.as_dict()

    def format(self) -> str:
        return self.summary.format()


class PhotoTally(Tally):
    """A classification run's: a row per photo."""

    def callbacks(self) -> dict[str, Callable[[list[str]], None]]:
        return {**super().callbacks(), "results": self.on_result}

    def on_result(self, row: list[str]) -> None:
        (path, prediction, top) = self.job.tables.parse_result(row)
        self.summary.add(path, prediction, [name for (name, _) in top])
        if len(self.shown) < self.job.options.plot_max:
            self.shown.append((path, prediction, top))


def _finish(job: PredictionJob, plan: RunPlan, elapsed: float, run_info: dict[str, Any], tally: Tally) -> RunReport:
    """(rank 0) Merge every rank's journals into the final tables and print the summary, counted (by ``tally``)
    from the merged rows."""
    written = finalize_run(
        job.options.output_dir,
        job.tables.specs,
        job.options.table_format,
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
    options = job.options
    for line in job.geo.finish(
        options.output_dir, options.table_format, job.tables.results, job.tables.top_k, lambda p: _event_labels(job, p)
    ):
        print(line)


def _event_labels(job: PredictionJob, probabilities: Any) -> list[str]:
    """The answers for events' combined probabilities (already through the prior): the run's decision steps 5-8,
    less an unknown test that needs a photo's logits or embeddings (an event has neither)."""
    policy = job.policy
    if policy.needs_logits or policy.needs_embeddings:
        policy = dataclasses.replace(policy, unknown=None)
    return policy.decide(probabilities).label

"""What every kind of ``birder-predict`` run shares, and the interface of a kind (:class:`RunSteps`).

:func:`birder.runs.predict.run_prediction` runs a kind's steps in one frame (ranks, plan, journals, merge, resume):
classifying whole photos (:class:`birder.runs.predict.ClassificationSteps`) or crop-then-classify
(:class:`birder.runs.detect.DetectionSteps`). A kind of run is a :class:`RunSteps`; what it needs from the frame
is here, so that no kind imports another or the frame:

- :func:`prepare_job`: the classifier, its classes, transform and tables (of the kind's table class), the answer
  and the geo step, in a :class:`PredictionJob`;
- :func:`classified_rows`: the rows of classified images (photos or crops), through the decision order;
- :func:`make_predictor`: the classifier's batch loop; :func:`journal_batches`: rows into this rank's journals;
- :class:`Tally`: what the summary counts in the merged rows.
"""

from __future__ import annotations

import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from birder.data.transforms import classification_transform
from birder.distributed import DistInfo, main_first
from birder.errors import BirderError
from birder.geo.predict import GeoStep
from birder.inference import predictor as P
from birder.inference.decision import DecisionPolicy, policy_from_options
from birder.inference.model import load_for_inference
from birder.inference.optimize import AMP_DTYPES, DtypeChoice, choose_dtype, optimize_for_inference
from birder.inference.tables import PredictionTables
from birder.io.checkpoint import ModelInfo, get_num_classes_from_signature, get_size_from_signature
from birder.io.journal import JournalSet
from birder.io.outputs import OutputFolder
from birder.net.base import BaseNet
from birder.runs.predict_options import PROG, PredictionOptions
from birder.runs.stages import StageTimes


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


@dataclass(frozen=True)
class RunPlan:
    """The same on every rank: the photos, the indices of those still to do, the attempt, what the merge includes."""

    paths: list[str]
    remaining: list[int]
    attempt: int
    include_final: bool  # the final tables of an earlier run are merged in
    run_info: dict[str, Any] = field(default_factory=dict)  # what run.json records about the photos (the shard)
    outputs: list[OutputFolder] = field(default_factory=list)  # the folders claimed for this run (rank 0's)


class RunSteps(ABC):
    """A kind of run: the steps that differ between kinds, which :func:`birder.runs.predict.run_prediction` runs
    in the same frame (ranks, plan, journals, merge). An instance serves one run: what a kind loads besides the
    classifier (a detector) is kept on it by :meth:`prepare`."""

    tables_class: type[PredictionTables] = PredictionTables  # the kind's tables
    times: StageTimes | None = None  # where this rank's time went (set by predict): run.json's "stages"

    def check(self, options: PredictionOptions) -> None:
        """Refuse, in one line and before anything loads, what this kind of run cannot do (nothing by default)."""
        return None

    def prepare(self, options: PredictionOptions, context: DistInfo) -> PredictionJob:
        """Load what the run needs (every rank): the classifier and the rest of :func:`prepare_job`, with the
        kind's tables; a kind that loads more (a detector) adds it here."""
        return prepare_job(options, context, self.tables_class)

    @abstractmethod
    def predict(self, job: PredictionJob, context: DistInfo, plan: RunPlan, mine: list[int]) -> float:
        """This rank's photos (``mine``: indices into ``plan.paths``) into its journals; returns the seconds."""

    @abstractmethod
    def tally(self, job: PredictionJob) -> Tally:
        """What the summary counts in the merged rows."""

    def after(self, job: PredictionJob, plan: RunPlan) -> None:
        """(rank 0, after the merge) What is written from the final tables (nothing by default)."""
        return None

    def run_info(self, job: PredictionJob) -> dict[str, Any]:
        """What ``run.json`` records about this kind's own models besides the classifier (nothing by default)."""
        return {}

    def summary_lines(self, job: PredictionJob) -> list[str]:
        """Lines of the end-of-run summary about this kind's own models (none by default)."""
        return []


# ---------------------------------------------------------------------------------------------------------------------
# Preparing: the model, the classes, the tables
# ---------------------------------------------------------------------------------------------------------------------


def _settings(
    options: PredictionOptions, size: tuple[int, int], tables: list[str], species: list[str] | None, dtype: str
) -> dict[str, Any]:
    """What shapes the rows: a resume must match it, so one table never mixes two kinds of rows."""
    (model, execution, output) = (options.model, options.execution, options.output)
    return {
        "model": model.name,
        "weights": os.path.abspath(model.weights) if model.weights else None,
        "network": model.network,
        "size": list(size),
        "center_crop": model.center_crop,
        "simple_crop": model.simple_crop,
        "tta": model.tta,
        "dtype": dtype,  # the one resolved: resuming an auto run on another machine must not mix dtypes
        "quantize": execution.quantize,
        # as before: a bare --amp True
        "amp": execution.amp if execution.amp in AMP_DTYPES else execution.amp is not None,
        "top_k": output.top_k,
        "min_prob": output.min_prob,
        "species": species,
        "tables": tables,
        "format": output.table_format,
    }


def _load_network(
    options: PredictionOptions, context: DistInfo, dtype: DtypeChoice
) -> tuple[BaseNet, ModelInfo, tuple[int, int]]:
    """The network (rank 0 loads first: a download happens once), converted for inference; its info and size."""
    (model, execution) = (options.model, options.execution)
    progress_bar = context.is_main and execution.progress
    loaded = main_first(
        context,
        lambda: load_for_inference(
            model.name, model.weights, model.network, device=torch.device("cpu"), progress_bar=progress_bar
        ),
    )
    (net, model_info) = (loaded.net, loaded.info)
    if not model_info.class_to_idx or get_num_classes_from_signature(model_info.signature) == 0:
        raise BirderError("this model has no classification head (a pretraining encoder); it cannot classify")

    size = get_size_from_signature(model_info.signature)
    if model.size is not None:
        size = (model.size[0], model.size[-1])
        net.adjust_size(size)
    net = optimize_for_inference(net, execution.quantize or dtype.dtype).to(context.device)
    if execution.compile:
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
    output = options.output
    species = P.read_species_file(output.species) if output.species is not None else None
    dtype = _choose_dtype(options, context)
    (net, model_info, size) = _load_network(options, context, dtype)
    selection = P.ClassSelection(model_info.class_to_idx, species)
    if selection.unknown and context.is_main and output.species is not None:
        _warn_unknown_species(selection, output.species)

    policy = _decision_policy(options, net, selection)
    geo = GeoStep.from_options(options.geo, selection.all_names, selection.indices, output.top_k)
    tables = tables_class(
        selection.names,
        output.top_k,
        all_class_names=selection.all_names,
        # Events combine each photo's image probabilities: --events keeps their table
        probabilities=output.save_probabilities or options.geo.events,
        logits=output.save_logits,
        embedding_dim=net.embedding_size if output.save_embeddings else None,
        features=output.save_features,
        decisions=policy.active,
        extra_result_columns=geo.result_columns() if geo is not None else (),
    )
    model = options.model
    transform = classification_transform(size, model_info.rgb_stats, model.center_crop, model.simple_crop)
    settings = _settings(options, size, tables.names, species, dtype.dtype)
    settings.update(_decision_settings(policy))
    settings.update(geo.settings() if geo is not None else {})
    return PredictionJob(options, net, transform, selection, tables, settings, dtype, policy=policy, geo=geo)


def _decision_policy(options: PredictionOptions, net: BaseNet, selection: P.ClassSelection) -> DecisionPolicy:
    """Steps 5-8 of the decision order for the run's classes, from the model's calibration and the options."""
    return policy_from_options(
        net, selection.names, options.decision, min_prob=options.output.min_prob, model_class_names=selection.all_names
    )


def _decision_settings(policy: DecisionPolicy) -> dict[str, Any]:
    """What the answer adds to the run's settings: nothing for an uncalibrated model without decision options, so
    such a run's settings (and a resume of an older run) stay as they were."""
    if not policy.active and policy.temperature == 1.0:
        return {}
    return {"decision": policy.describe()}


def _choose_dtype(options: PredictionOptions, context: DistInfo) -> DtypeChoice:
    """The dtype the run uses (``auto`` resolved for the run's device)."""
    execution = options.execution
    if execution.quantize:
        return DtypeChoice("float32", f"--quantize {execution.quantize}: float32 activations, int8 weights")
    return choose_dtype(execution.dtype, context.device)


# ---------------------------------------------------------------------------------------------------------------------
# Predicting
# ---------------------------------------------------------------------------------------------------------------------


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
            prior_strength=job.options.geo.prior_strength,
        )
    min_prob = job.options.output.min_prob
    given = {"min_prob": min_prob, "logits": logits, "embeddings": embeddings, "decisions": decisions}
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
    execution = job.options.execution
    return P.Predictor(
        job.net,
        job.transform,
        tta=job.options.model.tta,
        return_embedding="embeddings" in job.tables.names or job.policy.needs_embeddings,
        return_logits="logits" in job.tables.names or job.policy.needs_logits,
        return_features="features" in job.tables.names,
        batch_size=execution.batch_size,
        num_workers=execution.num_workers,
        amp=execution.amp is not None,
        amp_dtype=AMP_DTYPES.get(execution.amp or ""),  # None: the device's (auto)
        calibrated=not job.options.decision.uncalibrated,
    )


def journal_batches(
    job: PredictionJob,
    context: DistInfo,
    plan: RunPlan,
    total: int,
    batches: Iterable[tuple[Mapping[str, list[list[str]]], int]],
    verb: str,
    times: StageTimes | None = None,
) -> float:
    """Write ``(rows by table, photos)`` of each batch into this rank's journals, with a progress bar (rank 0);
    returns the seconds it took. ``times`` gets the journals' seconds as ``writing``."""
    execution = job.options.execution
    started = time.perf_counter()
    journals = JournalSet(
        job.options.output.output_dir, job.tables.specs, context.rank, plan.attempt, execution.chunk_size
    )
    progress = tqdm(
        total=total,
        unit="img",
        desc=verb if not context.distributed else f"{verb} (rank 0 of {context.world_size})",
        disable=not execution.progress or not context.is_main,
        dynamic_ncols=True,
    )
    # Closed whatever happens: the rows of the batches that finished become durable (a resume skips them)
    with progress, journals:
        for rows, photos in batches:
            written = time.perf_counter()
            journals.add(rows, photos)
            if times is not None:
                times.add("writing", time.perf_counter() - written)
            progress.update(photos)
        closing = time.perf_counter()  # the last rows are committed as the journals close
    if times is not None:
        times.add("writing", time.perf_counter() - closing)
    return time.perf_counter() - started


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

"""A ``birder-calibrate`` run as one library call: :func:`calibrate_model_file`.

1. Load the model and list the photos: ``val`` (and ``train``), classes checked against the model's. Every mistake
   a user can make is found here, before anything is written.
2. One pass over the validation photos (and the training photos) for the raw logits and embeddings
   (:mod:`birder.inference.labeled`).
3. Fit: the temperature (:func:`~birder.inference.calibration.fit_temperature_checked`: too few photos, or labels
   the logits do not favour, are refused); with ``target_precision`` the per-species thresholds on the calibrated
   probabilities; the unknown test and its settings, chosen on folds of held-out classes
   (:mod:`birder.inference.unknown_choice`); with ``train`` the class statistics of the embedding unknown tests, with
   the chosen shrinkage and k (and the ensemble's members, the best knn and relative Mahalanobis, normalised on the
   validation photos); with ``keep_known`` (or ``unknown_threshold``) the unknown thresholds on the
   validation photos.
4. Write, each atomically: the class statistics to ``<output stem>.stats.safetensors``, then the model to
   ``output`` with the calibration in its metadata (:mod:`birder.io.calibration`). The state dict is the input's,
   unchanged; the input file is never written to.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from birder.errors import BirderError
from birder.inference.calibration import (
    CalibrationMetrics,
    ThresholdFit,
    calibration_metrics,
    fit_species_thresholds,
    fit_temperature_checked,
    softmax,
)
from birder.inference.labeled import LabeledPhotos, ModelOutputs, collect_outputs, collect_stand_in_outputs
from birder.inference.model import load_for_inference
from birder.inference.stand_ins import DEFAULT_PER_KIND
from birder.inference.unknown import (
    DEFAULT_BANK_PER_CLASS,
    DEFAULT_NEIGHBOURS,
    DEFAULT_SHRINKAGE,
    EMBEDDING_METHODS,
    METHODS,
    ClassStatistics,
    fit_ensemble,
    threshold_for_keep_rate,
    unknown_scores,
)
from birder.inference.unknown_choice import DEFAULT_FOLDS, SelectionError, UnknownChoice, choose_unknown_test
from birder.io.calibration import Calibration, head_digest, stats_path_for
from birder.io.checkpoint import CHECKPOINT_FORMATS, checkpoint_format, is_export_file
from birder.io.outputs import check_output_file
from birder.loading import save_model
from birder.review.answers import labeled_or_reviewed_photos
from birder.runs.predict import DEFAULT_WORKERS

PROG = "birder-calibrate"


@dataclass
class CalibrateOptions:
    """``birder-calibrate``'s arguments, with the same names and defaults."""

    val: str | os.PathLike  # ImageFolder root or CSV of path,label rows
    output: str | os.PathLike  # the calibrated copy (.pt or .safetensors)
    train: str | os.PathLike | None = None  # for the class statistics of the embedding unknown tests
    model: str | None = None
    weights: str | os.PathLike | None = None
    network: str | None = None
    target_precision: float | None = None  # per-species thresholds for this precision
    min_photos: int = 10  # fewer predictions of a species: it keeps the global threshold
    keep_known: float | None = None  # unknown thresholds keeping this share of known validation photos
    unknown_method: str | None = None  # None or "auto": the best on folds of held-out classes; else forced
    unknown_threshold: float | None = None  # the unknown method's threshold, given directly
    unknown_folds: int = DEFAULT_FOLDS  # folds over classes for the choice of the unknown test
    bank_per_class: int = DEFAULT_BANK_PER_CLASS  # training embeddings kept per class for knn
    stand_in_photos: int = DEFAULT_PER_KIND  # made stand-in unknowns per kind for the choice (0: the folds alone)
    seed: int = 0  # of the folds' draw of classes and of the made stand-ins
    batch_size: int = 32
    workers: int = DEFAULT_WORKERS
    device: str = "auto"
    progress: bool = True
    overwrite: bool = False  # replace an existing output file (never the input model)


@dataclass(frozen=True)
class CalibrationReport:
    calibration: Calibration
    before: CalibrationMetrics  # on the validation photos, T = 1
    after: CalibrationMetrics  # with the fitted temperature
    thresholds: ThresholdFit | None
    choice: UnknownChoice | None  # how the unknown test was chosen (None: not possible, see choice_note)
    choice_note: str | None  # why there was no choice, and what was used instead
    val_photos: int
    train_photos: int
    unreadable: int
    model_path: Path
    stats_path: Path | None


def calibrate_model_file(options: CalibrateOptions) -> CalibrationReport:
    """Fit a calibration on ``options.val`` and write the calibrated copy of the model to ``options.output``."""
    output = _check_options(options)
    loaded = load_for_inference(
        options.model, options.weights, options.network, device=options.device, progress_bar=options.progress
    )
    (net, info) = (loaded.net, loaded.info)
    if not info.class_to_idx:
        raise BirderError("this model has no classification head (a pretraining encoder); it cannot be calibrated")

    class_names = loaded.class_names
    val_photos = labeled_or_reviewed_photos(options.val, info.class_to_idx)
    train_photos = labeled_or_reviewed_photos(options.train, info.class_to_idx) if options.train is not None else None
    forced = _forced_unknown_method(options)

    transform = loaded.transform

    def outputs(photos: LabeledPhotos, name: str) -> ModelOutputs:
        return collect_outputs(
            net,
            transform,
            photos.paths,
            photos.targets,
            batch_size=options.batch_size,
            workers=options.workers,
            progress=options.progress,
            description=name,
        )

    val = outputs(val_photos, "validation")
    if not len(val):
        raise BirderError(f"{options.val}: none of the {len(val_photos.paths)} photos could be read")
    train = outputs(train_photos, "training") if train_photos is not None else None

    fit = fit_temperature_checked(val.logits, val.targets, source=f"--val {options.val}")
    probabilities = softmax(val.logits, fit.temperature)
    thresholds = None
    if options.target_precision is not None:
        thresholds = fit_species_thresholds(
            probabilities, val.targets, class_names, options.target_precision, min_photos=options.min_photos
        )

    def made() -> dict[str, ModelOutputs]:
        return collect_stand_in_outputs(
            net,
            transform,
            val,
            options.stand_in_photos,
            seed=options.seed,
            batch_size=options.batch_size,
            workers=options.workers,
            progress=options.progress,
        )

    (choice, choice_note) = _choose(options, val, train, class_names, fit.temperature, forced, loaded.device, made)
    statistics = None
    if train is not None:
        statistics = ClassStatistics.fit(
            train.embeddings,
            train.targets,
            class_names,
            shrinkage=choice.shrinkage if choice is not None else DEFAULT_SHRINKAGE,
            neighbours=choice.neighbours if choice is not None else DEFAULT_NEIGHBOURS,
            bank_per_class=options.bank_per_class,
        )
        # The ensemble the folds scored is kept (the chosen test, or for birder-eval and --unknown-method ensemble)
        # unless the user forced a single method
        ensemble = choice.ensemble if choice is not None and forced in (None, "ensemble") else None
        if ensemble is not None:
            known = np.asarray(val.targets) >= 0
            members = [(member.method, member.neighbours) for member in ensemble.members]
            statistics = replace(
                statistics,
                ensemble=fit_ensemble(
                    members,
                    probabilities=probabilities[known],
                    logits=np.asarray(val.logits)[known],
                    embeddings=np.asarray(val.embeddings)[known],
                    statistics=statistics,
                ),
            )
    stats_path = stats_path_for(output) if statistics is not None else None
    method = _unknown_method(options, forced, choice)

    calibration = Calibration(
        temperature=fit.temperature,
        species_thresholds=thresholds.thresholds if thresholds is not None else {},
        target_precision=options.target_precision,
        unknown_method=method,
        unknown_thresholds=_unknown_thresholds(options, method, val, probabilities, statistics),
        keep_known=options.keep_known,
        stats_file=stats_path.name if stats_path is not None else None,
        head_digest=head_digest(net.state_dict()),
        temperature_note=fit.note,
        unknown_selection=choice.record() if choice is not None else None,
    )

    if statistics is not None:
        statistics.save(stats_path)
    net.calibration = calibration
    save_model(net, output, info)
    return CalibrationReport(
        calibration=replace(calibration, stats_path=stats_path),
        before=calibration_metrics(val.logits, val.targets),
        after=calibration_metrics(val.logits, val.targets, fit.temperature),
        thresholds=thresholds,
        choice=choice,
        choice_note=choice_note,
        val_photos=len(val),
        train_photos=len(train) if train is not None else 0,
        unreadable=len(val.unreadable) + (len(train.unreadable) if train is not None else 0),
        model_path=output,
        stats_path=stats_path,
    )


def _check_options(options: CalibrateOptions) -> Path:
    output = Path(options.output)
    if output.suffix.lower().lstrip(".") not in CHECKPOINT_FORMATS:
        checkpoint_format(output)  # raises the one-line error naming the expected extensions
    if options.weights is not None and is_export_file(options.weights):
        raise BirderError(f"{options.weights}: an export; calibrate the .pt or .safetensors file, then export it")
    # The input model is never modified: the output is a new file (or, with overwrite, an earlier calibration's)
    inputs = (options.weights, options.val, options.train)
    check_output_file(output, inputs=inputs, overwrite=options.overwrite, option="-o")
    if options.train is not None:
        check_output_file(stats_path_for(output), inputs=inputs, overwrite=options.overwrite, option="-o (statistics)")
    for option, value in (("--target-precision", options.target_precision), ("--keep-known", options.keep_known)):
        if value is not None and not 0.0 < value <= 1.0:
            raise BirderError(f"{option} must be in (0, 1], got {value}")
    if options.min_photos < 1:
        raise BirderError(f"--min-photos must be at least 1, got {options.min_photos}")
    if options.stand_in_photos < 0:
        raise BirderError(f"--stand-in-photos must be 0 or more, got {options.stand_in_photos}")
    if options.unknown_folds < 2:
        raise BirderError(f"--unknown-folds must be at least 2, got {options.unknown_folds}")
    if options.bank_per_class < 1:
        raise BirderError(f"--bank-per-class must be at least 1, got {options.bank_per_class}")
    return output


def _forced_unknown_method(options: CalibrateOptions) -> str | None:
    """The method ``--unknown-method`` forces (None: the best on the folds), checked before any photo is read."""
    method = None if options.unknown_method in (None, "auto") else options.unknown_method
    if method is not None and options.keep_known is None and options.unknown_threshold is None:
        raise BirderError("--unknown-method needs --keep-known (a keep-rate of known photos) or --unknown-threshold")
    if method is not None and method not in METHODS:
        raise BirderError(f"unknown method '{method}'; choose one of: auto, {', '.join(METHODS)}")
    if method in EMBEDDING_METHODS and options.train is None:
        raise BirderError(f"the '{method}' unknown test needs class statistics: pass --train with training photos")
    if options.unknown_threshold is not None and method is None:
        raise BirderError("--unknown-threshold needs --unknown-method: a threshold belongs to one method's score")
    return method


def _choose(
    options: CalibrateOptions,
    val: ModelOutputs,
    train: ModelOutputs | None,
    class_names: list[str],
    temperature: float,
    forced: str | None,
    device: torch.device,
    made: Callable[[], dict[str, ModelOutputs]],
) -> tuple[UnknownChoice | None, str | None]:
    """The unknown test chosen on folds of held-out classes and the stand-in unknowns ``made`` makes (once the photos
    can support a choice), or None and why (too few classes: the defaults)."""
    try:
        choice = choose_unknown_test(
            val,
            class_names,
            train=train,
            temperature=temperature,
            folds=options.unknown_folds,
            seed=options.seed,
            bank_per_class=options.bank_per_class,
            forced=forced,
            device=device,
            made=made,
        )
    except SelectionError as err:
        if forced == "ensemble":
            raise BirderError(f"--unknown-method ensemble: {err}") from None
        default = forced or ("knn" if train is not None else "msp")
        return (None, f"{err}; using {default}, shrinkage {DEFAULT_SHRINKAGE}, k = {DEFAULT_NEIGHBOURS}")
    return (choice, None)


def _unknown_method(options: CalibrateOptions, forced: str | None, choice: UnknownChoice | None) -> str | None:
    """The unknown test the calibrated model applies by default (None: none)."""
    if options.keep_known is None and options.unknown_threshold is None:
        return None
    if forced is not None:
        return forced
    if choice is not None:
        return choice.chosen.method
    return "knn" if options.train is not None else "msp"


def _unknown_thresholds(
    options: CalibrateOptions,
    method: str | None,
    val: ModelOutputs,
    probabilities: np.ndarray,
    statistics: ClassStatistics | None,
) -> dict[str, float]:
    """A threshold per available method at the keep-rate (so predict can switch methods), and the given one."""
    if method is None:
        return {}

    thresholds = {}
    if options.keep_known is not None:
        available = [
            name
            for name in METHODS
            if name not in EMBEDDING_METHODS or (statistics is not None and statistics.supports(name))
        ]
        for name in available:
            scores = unknown_scores(
                name, probabilities=probabilities, logits=val.logits, embeddings=val.embeddings, statistics=statistics
            )
            thresholds[name] = threshold_for_keep_rate(scores, options.keep_known)
    if options.unknown_threshold is not None:
        thresholds[method] = float(options.unknown_threshold)
    return thresholds

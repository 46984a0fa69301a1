"""Calibration arithmetic: temperature scaling, how well probabilities match accuracy, per-species thresholds.

- :func:`fit_temperature`: the temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``
  on labelled photos (LBFGS on ``log T``, so ``T`` stays positive). One number: the ranking of species never
  changes, only how sure the probabilities are. :func:`fit_temperature_checked` first refuses photos that cannot
  give a meaningful one (too few; logits no better than uniform) and keeps ``T = 1`` when every photo is right.
- :func:`calibration_metrics`: expected calibration error (15 equal-width confidence bins, as the trainer's
  ``val_ece``), negative log-likelihood, Brier score, and the bins of a reliability diagram.
- :func:`fit_species_thresholds`: for each species, the lowest threshold on the calibrated top probability at
  which the photos predicted as that species reach a target precision.

Everything takes numpy arrays of one pass over the photos (:mod:`birder.inference.labeled`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from birder.errors import BirderError

ECE_BINS = 15
# log T is kept in [-5, 5]: T from 0.007 to 148, far beyond what any trained network needs
_LOG_T_LIMIT = 5.0
# The fewest labelled photos a temperature is fitted on. One number fitted to the likelihood of N photos: drawn
# logits of 10 classes with a known temperature give a fitted T within -29 % / +31 % of it in 90 % of draws from 20
# photos, -54 % / +54 % from 10, a factor 3.4 from 5 (and one draw in 200 at the 0.007 or 148 limit below 20).
MIN_TEMPERATURE_PHOTOS = 20

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]


def softmax(logits: FloatArray, temperature: float = 1.0) -> npt.NDArray[np.float64]:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(logits: FloatArray, targets: IntArray, *, max_iter: int = 100) -> float:
    """The temperature minimising the mean negative log-likelihood of ``targets`` under ``softmax(logits / T)``."""
    if len(targets) == 0:
        raise BirderError("no photos to fit a temperature on")

    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    targets_t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits_t / log_t.clamp(-_LOG_T_LIMIT, _LOG_T_LIMIT).exp(), targets_t)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().clamp(-_LOG_T_LIMIT, _LOG_T_LIMIT).exp())


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    note: str | None = None  # why no temperature was fitted (T = 1 kept); None when fitted


def fit_temperature_checked(
    logits: FloatArray, targets: IntArray, source: str = "the validation photos"
) -> TemperatureFit:
    """:func:`fit_temperature`, refusing data on which its optimum is not a meaningful number.

    The mean negative log-likelihood is convex in ``1 / T``. Its slope at ``1 / T = 0`` is the mean over photos of
    (mean logit - the labelled class's logit), and as ``1 / T`` grows it tends to the mean of (top logit - labelled
    logit). So the optimum is finite and positive exactly when the labelled class's logit is above the average
    logit on average and at least one photo is predicted wrong. Otherwise:

    - fewer than :data:`MIN_TEMPERATURE_PHOTOS` photos: refused (:class:`BirderError`), the fit would follow the
      chance errors of a few photos (one wrong photo of one gives ``T`` = 148, the search's upper limit);
    - the labelled class no better than the average class: refused, ``T`` would grow without bound (every answer
      flattened to uniform); the labels are most likely not the model's classes;
    - every photo predicted right: ``T`` would shrink without bound (every answer certain); ``T = 1`` is kept
      (the model's own probabilities) and the note says why.
    """
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    count = len(targets)
    if count < MIN_TEMPERATURE_PHOTOS:
        raise BirderError(
            f"{source}: {count} readable photo(s); a temperature needs at least {MIN_TEMPERATURE_PHOTOS} labelled "
            f"photos (with fewer it follows the chance errors of a few photos): add photos"
        )
    rows = np.arange(count)
    labelled = logits[rows, targets]
    if not (logits.mean(axis=1) - labelled).mean() < 0:
        raise BirderError(
            f"{source}: the model's logit of the labelled class is on average no higher than its mean logit, so no "
            "temperature fits (it would flatten every answer to uniform): check that the labels are the model's classes"
        )
    if (logits.argmax(axis=1) == targets).all():
        return TemperatureFit(
            1.0,
            f"all {count} photos are predicted right, so the likelihood keeps rising as T falls to 0: no temperature "
            "fitted, T = 1 kept (add photos the model gets wrong to fit one)",
        )

    temperature = fit_temperature(logits, targets)
    if math.log(temperature) >= _LOG_T_LIMIT - 1e-6:
        raise BirderError(
            f"{source}: the fitted temperature {temperature:.4g} is at the upper limit of the search (the photos "
            "barely favour the labelled class): check that the labels are the model's classes, or add photos"
        )
    if math.log(temperature) <= -_LOG_T_LIMIT + 1e-6:
        return TemperatureFit(
            1.0,
            f"the fit of T runs to the lower limit of the search ({temperature:.4g}: nearly every photo right with a "
            "wide margin): no temperature fitted, T = 1 kept (add photos the model gets wrong to fit one)",
        )
    return TemperatureFit(temperature)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per confidence bin: photos, mean confidence and accuracy (NaN for empty bins)."""

    edges: npt.NDArray[np.float64]  # [bins + 1]
    counts: npt.NDArray[np.int64]
    confidence: npt.NDArray[np.float64]
    accuracy: npt.NDArray[np.float64]


@dataclass(frozen=True)
class CalibrationMetrics:
    ece: float
    nll: float
    brier: float
    photos: int
    bins: ReliabilityBins = field(repr=False)


def calibration_metrics(
    logits: FloatArray, targets: IntArray, temperature: float = 1.0, bins: int = ECE_BINS
) -> CalibrationMetrics:
    """ECE, NLL and Brier score of ``softmax(logits / temperature)`` against ``targets``."""
    targets = np.asarray(targets)
    count = len(targets)
    if count == 0:
        nan = float("nan")
        empty = ReliabilityBins(
            np.linspace(0, 1, bins + 1), np.zeros(bins, np.int64), np.full(bins, nan), np.full(bins, nan)
        )
        return CalibrationMetrics(nan, nan, nan, 0, empty)

    probabilities = softmax(logits, temperature)
    rows = np.arange(count)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == targets).astype(np.float64)
    # Same binning as the trainer's ECE: bin = floor(confidence * bins), the top edge in the last bin
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    confidence_sums = np.bincount(index, weights=confidence, minlength=bins)
    correct_sums = np.bincount(index, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        reliability = ReliabilityBins(
            np.linspace(0.0, 1.0, bins + 1), counts, confidence_sums / counts, correct_sums / counts
        )

    one_hot = np.zeros_like(probabilities)
    one_hot[rows, targets] = 1.0
    return CalibrationMetrics(
        ece=float(np.abs(confidence_sums - correct_sums).sum() / count),
        nll=float(-np.log(np.maximum(probabilities[rows, targets], 1e-300)).mean()),
        brier=float(((probabilities - one_hot) ** 2).sum(axis=1).mean()),
        photos=count,
        bins=reliability,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Per-species thresholds
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdFit:
    """Per-species thresholds, and the species left to the global threshold (too few photos predicted as them) or
    that never reach the target precision (threshold 1.0: answered at species level only when certain)."""

    thresholds: dict[str, float]
    too_few: list[str]
    unreachable: list[str]


def fit_species_thresholds(
    probabilities: FloatArray,
    targets: IntArray,
    class_names: Sequence[str],
    target_precision: float,
    *,
    min_photos: int = 10,
) -> ThresholdFit:
    """For each species, the lowest threshold ``t`` on the top probability such that, among the photos whose top
    species it is with a probability of at least ``t``, a share ``target_precision`` truly are that species.

    Fitted on the quantity it is applied to: pass the calibrated probabilities the predictions will use. A species
    predicted for fewer than ``min_photos`` photos gets no threshold of its own (it uses the global one).
    """
    if not 0.0 < target_precision <= 1.0:
        raise BirderError(f"the target precision must be in (0, 1], got {target_precision}")

    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets)
    top = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    (thresholds, too_few, unreachable) = ({}, [], [])
    for index, name in enumerate(class_names):
        rows = np.flatnonzero(top == index)
        if len(rows) < min_photos:
            too_few.append(name)
            continue

        order = rows[np.argsort(-confidence[rows], kind="stable")]
        precision = np.cumsum(targets[order] == index) / np.arange(1, len(order) + 1)
        # Keeping the i most confident photos is a threshold at the i-th confidence; ties keep all their photos
        reached = [
            i for i in range(len(order)) if precision[i] >= target_precision and _ends_a_tie(confidence, order, i)
        ]
        if reached:
            thresholds[name] = float(confidence[order[reached[-1]]])
        else:
            thresholds[name] = 1.0
            unreachable.append(name)

    return ThresholdFit(thresholds, too_few, unreachable)


def _ends_a_tie(confidence: npt.NDArray[np.float64], order: npt.NDArray[np.int64], i: int) -> bool:
    return i == len(order) - 1 or confidence[order[i + 1]] < confidence[order[i]]

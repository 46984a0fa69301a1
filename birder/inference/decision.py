"""The one decision order from a network's logits to the answer a user reads: ``label``, ``rank``,
``label_probability`` (and ``unknown_score``). The library, ``birder-predict`` and ``birder-serve`` all go through it.

1. **logits** of the network (``return_logits=True`` returns these, untouched).
2. **temperature**: ``logits / T``, ``T`` from the model's calibration (``net.calibration``, set when a file written
   by ``birder-calibrate`` is loaded; 1 otherwise, so an uncalibrated file gives exactly Birder's numbers).
   ``calibrated=False`` / ``--uncalibrated`` leaves ``T`` at 1 and ignores everything the calibration fitted.
3. **softmax** (with test-time augmentation: averaged over the views). Steps 1-3 run in
   :func:`~birder.inference.classification.infer_batch`, through :func:`calibrated_softmax`.
4. **prior** (where and when the photo was taken; optional): ``posterior ∝ p(species | photo) × prior ** strength``,
   renormalised (:func:`apply_prior`). A regional species list (``--species``) is the 0/1 prior of this step.
5. **unknown test** (optional): the photo's ``unknown_score`` by the chosen method
   (:mod:`birder.inference.unknown`); above the threshold the label is ``unknown``.
6. **species threshold**: the top species answers when its probability reaches its threshold: the species' own
   (``birder-calibrate --target-precision``) when there is one, else the global one (``--min-prob``).
7. **taxonomic fallback** (with a taxonomy): otherwise the genus, then family, then order whose summed probability
   reaches that same threshold (:func:`birder.inference.taxonomy.fallback`); otherwise ``uncertain``.
8. **answer**: ``label`` (a species, genus, family or order name, ``unknown`` or ``uncertain``), its ``rank``
   (``species``, ``genus``, ``family``, ``order``; empty for ``unknown`` and ``uncertain``) and
   ``label_probability`` (the probability, or summed probability, of the label; empty for those two).

``prediction`` (the tables' column) keeps its old meaning: the top species, ``uncertain`` under ``--min-prob``.
Steps 4-8 are :meth:`DecisionPolicy.decide` (built by :func:`build_policy`): whatever classifies a crop or a photo
(the detection rows to come included) gets its answer there, so there is one order and one set of thresholds.

Every threshold is fitted on the quantity it is applied to: the species thresholds and the ``msp`` unknown
threshold on the calibrated probabilities (no prior, no TTA), the ``energy`` one on the raw logits, the embedding
ones on the embeddings; ``--uncalibrated`` therefore drops the fitted thresholds along with the temperature.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from birder.errors import BirderError
from birder.inference.taxonomy import NO_RANK, RankGroups, Taxonomy, fallback
from birder.inference.unknown import EMBEDDING_METHODS, METHODS, ClassStatistics, unknown_scores
from birder.io.calibration import Calibration

UNKNOWN = "unknown"
THRESHOLD_MODES = ("per-species", "global", "none")
# The answer's fields, in table and JSON order
FIELDS = ("label", "rank", "label_probability", "unknown_score")

FloatArray = npt.NDArray[np.floating]


# ---------------------------------------------------------------------------------------------------------------------
# Steps 2-4: temperature, softmax, prior
# ---------------------------------------------------------------------------------------------------------------------


def model_calibration(net: Any, calibrated: bool = True) -> Calibration | None:
    """The calibration a loaded network carries (``net.calibration``), or None (uncalibrated, or not asked for)."""
    return getattr(net, "calibration", None) if calibrated else None


def model_temperature(net: Any, calibrated: bool = True) -> float:
    calibration = model_calibration(net, calibrated)
    return calibration.temperature if calibration is not None else 1.0


def calibrated_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Steps 2-3: ``softmax(logits / T)`` in float32; with ``T == 1`` exactly Birder's ``softmax(logits)``."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.softmax(logits, dim=1)


def check_prior_strength(strength: float, name: str = "prior strength") -> float:
    """``strength`` as a float when it is a finite number >= 0, else a one-line :class:`BirderError` (NaN or
    infinity would turn every posterior into NaN or zero: the image's answer, said to be the prior's)."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise BirderError(f"{name} must be a finite number >= 0, got {strength}")
    return value


def apply_prior(
    probabilities: FloatArray, prior: FloatArray | None = None, strength: float = 1.0
) -> npt.NDArray[np.float64]:
    """Step 4: ``p × prior ** strength``, renormalised per photo. ``prior``: ``[classes]`` or ``[B, classes]``.

    A photo whose every species the prior rules out (all products zero) keeps its image-only probabilities: the
    prior has nothing to say there rather than a division by zero.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    strength = check_prior_strength(strength)
    if prior is None or strength == 0.0:
        return probabilities

    prior = np.broadcast_to(np.asarray(prior, dtype=np.float64), probabilities.shape)
    if (prior < 0).any():
        raise BirderError("a prior cannot be negative")
    posterior = probabilities * prior**strength
    total = posterior.sum(axis=1, keepdims=True)
    return np.where(total > 0, posterior / np.where(total > 0, total, 1.0), probabilities)


# ---------------------------------------------------------------------------------------------------------------------
# Steps 5-8: unknown test, thresholds, fallback, answer
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnknownTest:
    method: str
    threshold: float
    statistics: ClassStatistics | None = None

    def scores(
        self, probabilities: FloatArray, logits: FloatArray | None, embeddings: FloatArray | None
    ) -> npt.NDArray[np.float64]:
        return unknown_scores(
            self.method, probabilities=probabilities, logits=logits, embeddings=embeddings, statistics=self.statistics
        )


@dataclass(frozen=True)
class Decisions:
    """The answers of a batch of photos (lists and arrays of one entry per photo)."""

    label: list[str]
    rank: list[str]
    label_probability: npt.NDArray[np.float64]  # NaN for unknown / uncertain
    unknown_score: npt.NDArray[np.float64]  # NaN without an unknown test

    def row(self, i: int) -> dict[str, Any]:
        """Photo ``i``'s answer as plain values (None where there is no number), in :data:`FIELDS` order."""
        return {
            "label": self.label[i],
            "rank": self.rank[i],
            "label_probability": _number(self.label_probability[i]),
            "unknown_score": _number(self.unknown_score[i]),
        }


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


@dataclass(frozen=True)
class DecisionPolicy:
    """Steps 5-8 for one list of classes (the model's, or a regional selection of them)."""

    class_names: list[str]
    global_threshold: float = 0.0
    # [classes], NaN where the species has no threshold of its own (the global one applies); None: none at all
    species_thresholds: npt.NDArray[np.float64] | None = None
    taxonomy_groups: dict[str, RankGroups] | None = None
    unknown: UnknownTest | None = None
    temperature: float = 1.0  # step 2, applied before (recorded here for run settings and /v1/models)
    calibrated: bool = True  # whether steps 1-3 are to use the model's temperature (infer_batch's ``calibrated``)

    @property
    def active(self) -> bool:
        """Whether the answer can differ from the top species (beyond the global threshold's ``uncertain``)."""
        return self.unknown is not None or self.taxonomy_groups is not None or self.species_thresholds is not None

    @property
    def needs_embeddings(self) -> bool:
        return self.unknown is not None and self.unknown.method in EMBEDDING_METHODS

    @property
    def needs_logits(self) -> bool:
        return self.unknown is not None and self.unknown.method == "energy"

    def thresholds_for(self, top: npt.NDArray[np.integer]) -> npt.NDArray[np.float64]:
        thresholds = np.full(len(top), self.global_threshold, dtype=np.float64)
        if self.species_thresholds is not None:
            own = self.species_thresholds[top]
            thresholds = np.where(np.isnan(own), thresholds, own)
        return thresholds

    def decide(
        self,
        probabilities: FloatArray,
        *,
        logits: FloatArray | None = None,
        embeddings: FloatArray | None = None,
        prior: FloatArray | None = None,
        prior_strength: float = 1.0,
    ) -> Decisions:
        """Steps 4-8 for ``probabilities`` ``[B, len(class_names)]`` (already through steps 1-3). ``logits`` (raw,
        the model's classes) and ``embeddings`` are needed by the ``energy`` and embedding unknown tests."""
        probabilities = apply_prior(probabilities, prior, prior_strength)
        top = probabilities.argmax(axis=1)
        answers = fallback(probabilities, self.thresholds_for(top), self.class_names, self.taxonomy_groups)
        labels = list(answers.labels)
        ranks = list(answers.ranks)
        answer_probabilities = answers.probabilities.copy()
        scores = np.full(len(top), np.nan)
        if self.unknown is not None:
            scores = self.unknown.scores(probabilities, logits, embeddings)
            for row in np.flatnonzero(scores > self.unknown.threshold):
                (labels[row], ranks[row], answer_probabilities[row]) = (UNKNOWN, NO_RANK, np.nan)

        return Decisions(labels, ranks, answer_probabilities, scores)

    def describe(self) -> dict[str, Any]:
        """What shapes the answers, as plain values (a resumed run must match it; ``/v1/models`` shows it)."""
        own = self.species_thresholds
        return {
            "temperature": self.temperature,
            "global_threshold": self.global_threshold,
            "species_thresholds": 0 if own is None else int((~np.isnan(own)).sum()),
            "taxonomy": self.taxonomy_groups is not None,
            "unknown_method": self.unknown.method if self.unknown else None,
            "unknown_threshold": self.unknown.threshold if self.unknown else None,
        }


# ---------------------------------------------------------------------------------------------------------------------
# A policy from a model and the options of a command
# ---------------------------------------------------------------------------------------------------------------------


def build_policy(
    net: Any,
    class_names: Sequence[str],
    *,
    calibrated: bool = True,
    thresholds: str = "per-species",
    min_prob: float = 0.0,
    taxonomy: Taxonomy | str | os.PathLike | None = None,
    unknown_method: str | None = None,
    unknown_threshold: float | None = None,
    model_class_names: Sequence[str] | None = None,
) -> DecisionPolicy:
    """The policy ``birder-predict`` and ``birder-serve`` apply, from the model's calibration and their options.

    ``class_names``: the classes answers are over (a regional selection, or all of the model's);
    ``model_class_names``: all of the model's (for the class statistics; default: ``class_names``).
    ``unknown_method``: None for the model's own test (if calibrated with one), ``"none"`` for no test, or a
    method; its threshold is ``unknown_threshold`` or the one the calibration fitted for it.
    """
    if thresholds not in THRESHOLD_MODES:
        raise BirderError(f"--thresholds must be one of {', '.join(THRESHOLD_MODES)}, got '{thresholds}'")
    calibration = model_calibration(net, calibrated)
    if thresholds == "per-species" and not calibrated and getattr(net, "calibration", None) is not None:
        # Asked for explicitly or not, the fitted thresholds describe calibrated probabilities only
        thresholds = "global"

    if isinstance(taxonomy, str | os.PathLike):
        taxonomy = Taxonomy.from_csv(taxonomy)
    return DecisionPolicy(
        class_names=list(class_names),
        global_threshold=min_prob if thresholds != "none" else 0.0,
        species_thresholds=_species_thresholds(calibration, class_names) if thresholds == "per-species" else None,
        taxonomy_groups=taxonomy.groups(class_names) if taxonomy is not None else None,
        unknown=_unknown_test(calibration, unknown_method, unknown_threshold, model_class_names or class_names),
        temperature=calibration.temperature if calibration is not None else 1.0,
        calibrated=calibrated,
    )


@dataclass(frozen=True)
class DecisionOptions:
    """How a command decides the answer from the probabilities (the ``answer`` options of birder-predict and
    birder-serve, same names); the global threshold is each command's ``--min-prob``."""

    uncalibrated: bool = False  # ignore the model's calibration (temperature, fitted thresholds, unknown test)
    thresholds: str = "per-species"  # per-species (the calibrated model's, else --min-prob), global or none
    taxonomy: str | os.PathLike | None = None  # species,genus,family,order CSV: fall back to higher ranks
    unknown_method: str | None = None  # None: the model's own unknown test (if any); "none": no test
    unknown_threshold: float | None = None


def policy_from_options(
    net: Any,
    class_names: Sequence[str],
    options: DecisionOptions,
    *,
    min_prob: float,
    model_class_names: Sequence[str] | None = None,
) -> DecisionPolicy:
    """:func:`build_policy` from a command's answer options and its global threshold (``--min-prob``)."""
    return build_policy(
        net,
        class_names,
        calibrated=not options.uncalibrated,
        thresholds=options.thresholds,
        min_prob=min_prob,
        taxonomy=options.taxonomy,
        unknown_method=options.unknown_method,
        unknown_threshold=options.unknown_threshold,
        model_class_names=model_class_names,
    )


def _species_thresholds(calibration: Calibration | None, class_names: Sequence[str]) -> npt.NDArray[np.float64] | None:
    if calibration is None or not calibration.species_thresholds:
        return None
    own = calibration.species_thresholds
    return np.array([own.get(name, np.nan) for name in class_names], dtype=np.float64)


def _unknown_test(
    calibration: Calibration | None, method: str | None, threshold: float | None, class_names: Sequence[str]
) -> UnknownTest | None:
    if method is None:
        method = calibration.unknown_method if calibration is not None else None
        if method is None:
            if threshold is not None:
                raise BirderError("--unknown-threshold needs --unknown-method (the model has no unknown test)")
            return None
    if method == "none":
        return None
    if method not in METHODS:
        raise BirderError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)} (or none)")

    if threshold is None:
        fitted = calibration.unknown_thresholds if calibration is not None else {}
        if method not in fitted:
            raise BirderError(
                f"no threshold for the '{method}' unknown test: pass --unknown-threshold, or calibrate the model "
                "with birder-calibrate --keep-known 0.95"
            )
        threshold = fitted[method]

    statistics = None
    if method in EMBEDDING_METHODS:
        stats_path = calibration.stats_path if calibration is not None else None
        if stats_path is None:
            raise BirderError(f"the '{method}' unknown test needs class statistics: run birder-calibrate with --train")
        statistics = ClassStatistics.load(stats_path, class_names)
    return UnknownTest(method, float(threshold), statistics)

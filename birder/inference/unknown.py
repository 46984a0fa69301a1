"""The unknown test: a per-photo ``unknown_score`` (higher: less like the model's species), five ways.

- ``msp``: 1 - the maximum (calibrated) species probability;
- ``energy``: -logsumexp of the raw logits (the negative free energy; low for inputs the network has seen the like of);
- ``mahalanobis``: the smallest squared Mahalanobis distance of the embedding to a class mean, with one covariance
  shared by all classes, shrunk towards a scaled identity by an amount estimated from the data (Ledoit-Wolf or
  OAS, from scikit-learn) or not at all (``none``, offered only when the covariance is well-conditioned);
- ``relative_mahalanobis``: that distance minus the distance to one Gaussian fitted to all training embeddings
  (the same shrinkage): directions along which every class varies (lighting, background) count less;
- ``nearest_mahalanobis``: the smallest squared Mahalanobis distance (the same shared covariance) to a training
  embedding of the kNN bank rather than to a class mean: a photo near one training photo is known even where its
  class is not one Gaussian (on the benchmark's digits, real scans, the best test on true unknowns in every run,
  0.935-0.956 against 0.915-0.944 for the best other);
- ``knn``: 1 - the cosine similarity of the normalised embedding to its k-th nearest training embedding, in a bank of
  at most ``bank_per_class`` training embeddings per class, searched exactly with faiss (``faiss.knn``, the flat
  inner-product search of :mod:`birder.search`'s exact index; numpy when faiss is not installed);
- ``ensemble``: the mean of several of the above, each z-normalised by the mean and spread of its score on the
  known validation photos (:class:`EnsembleMember`): chosen when the folds cannot tell its members apart and their
  mean separates the stand-in unknowns better than any one of them. Its Mahalanobis members share the statistics'
  shrinkage and its kNN members their bank, so it adds a few numbers to the sidecar's header (:func:`ensemble_scores`).

The embedding methods need :class:`ClassStatistics`, computed from training photos by ``birder-calibrate
--train`` into the model's sidecar file. Which method is the default and its settings (shrinkage estimator, k) are
chosen on the user's own photos by :mod:`birder.inference.unknown_choice`. A threshold is chosen on known
(validation) photos for a keep-rate (:func:`threshold_for_keep_rate`); a photo whose score is above it is
``unknown``. :func:`auroc` and :func:`fpr_at_tpr` measure how well a method separates known photos from photos of
other classes.

The sidecar's size is bounded (:func:`sidecar_bytes`): class means in float32, two ``D x D`` precision matrices in
float64 (the within-class one and the background one; float64 because an unshrunk covariance can have a condition
number where float32 would spoil the distances), the bank in float16 and its rows' lengths in float32 (for
nearest_mahalanobis). At the card's scale (707 classes, 1024-d, 64 per class) that is 2.9 + 16.8 + 92.7 + 0.2 =
112.5 MB; the ensemble's members (method, k, centre, scale) add under
1 kB of header, whatever the number of classes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypedDict, Unpack

import numpy as np
import numpy.typing as npt
import torch

from birder.errors import BirderError, CheckpointError
from birder.io.calibration import read_stats_file, write_stats_file

METHODS = ("msp", "energy", "mahalanobis", "relative_mahalanobis", "nearest_mahalanobis", "knn", "ensemble")
# The methods that need class statistics (the ensemble's members are stored in them)
EMBEDDING_METHODS = ("mahalanobis", "relative_mahalanobis", "nearest_mahalanobis", "knn", "ensemble")
# The methods an ensemble's members can be
SINGLE_METHODS = METHODS[:-1]
# The methods that measure with the shared within-class covariance (and so have a shrinkage setting)
MAHALANOBIS_METHODS = ("mahalanobis", "relative_mahalanobis", "nearest_mahalanobis")
# How the shared covariance is shrunk towards (trace / D) * I: estimated from the data, or not at all
SHRINKAGE_ESTIMATORS = ("ledoit_wolf", "oas", "none")
DEFAULT_SHRINKAGE = "ledoit_wolf"
DEFAULT_NEIGHBOURS = 5
# Training embeddings kept per class for kNN: bounds the sidecar (707 classes x 64 x 1024 half floats = 92.7 MB).
DEFAULT_BANK_PER_CLASS = 64
# An unshrunk covariance is used only below this condition number (float64 inverts it to about 1e-8 relative), and
# only from at least as many photos (less one per class mean) as dimensions
MAX_CONDITION = 1e8
# Variance (relative to the largest) below which the embeddings are taken not to vary in a direction at all
NULL_VARIANCE = 1e-10
# Rows a covariance is estimated from (a seeded sample beyond): 50 per dimension at 1024-d, 400 MB of float64
MAX_COVARIANCE_ROWS = 50_000
# Up to this many queries kNN runs in numpy (one BLAS product); more go to faiss, which blocks and threads them
_FEW_QUERIES = 8
_CHUNK = 16_384

FloatArray = npt.NDArray[np.floating]
# What each score is computed from (the embedding methods: embeddings)
_INPUTS = {"msp": "probabilities", "energy": "raw logits"}
# An ensemble member's spread on known photos is at least this (a constant score would divide by zero)
_MIN_SCALE = 1e-12


def normalise(embeddings: FloatArray) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length, float32."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


def sidecar_bytes(classes: int, dim: int, bank_per_class: int = DEFAULT_BANK_PER_CLASS) -> int:
    """The most bytes of tensors a sidecar holds for ``classes`` classes of ``dim``-d embeddings (the safetensors
    header adds a few kB): means, presence, two precision matrices, the background mean, the float16 bank and its
    rows' lengths."""
    return classes * dim * 4 + classes + 2 * dim * dim * 8 + dim * 8 + classes * bank_per_class * (dim * 2 + 4)


# ---------------------------------------------------------------------------------------------------------------------
# Covariance
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Covariance:
    """A shared covariance as estimated, and its inverse."""

    precision: npt.NDArray[np.float64]  # [D, D]
    shrinkage: float  # the weight of the scaled identity (0: none)
    condition: float  # of the estimated covariance


def estimate_covariance(
    centred: FloatArray, estimator: str | float, rng: np.random.Generator | None = None
) -> Covariance:
    """The covariance of rows already centred (on their class means, or on the mean of all), shrunk towards
    ``(trace / D) * I``: by Ledoit-Wolf's or OAS's estimate of the amount (``"ledoit_wolf"``, ``"oas"``), not at all
    (``"none"``), or by a given weight in [0, 1].

    At most :data:`MAX_COVARIANCE_ROWS` rows are used (a seeded sample beyond).
    """
    from sklearn.covariance import OAS, LedoitWolf, empirical_covariance

    rows = np.asarray(centred, dtype=np.float64)
    if len(rows) > MAX_COVARIANCE_ROWS:
        rng = rng or np.random.default_rng(0)
        rows = rows[np.sort(rng.choice(len(rows), size=MAX_COVARIANCE_ROWS, replace=False))]
    if estimator == "ledoit_wolf":
        fitted = LedoitWolf(assume_centered=True, store_precision=False).fit(rows)
        (covariance, shrinkage) = (fitted.covariance_, float(fitted.shrinkage_))
    elif estimator == "oas":
        fitted = OAS(assume_centered=True, store_precision=False).fit(rows)
        (covariance, shrinkage) = (fitted.covariance_, float(fitted.shrinkage_))
    elif estimator == "none":
        (covariance, shrinkage) = (empirical_covariance(rows, assume_centered=True), 0.0)
    elif isinstance(estimator, float | int) and not isinstance(estimator, bool) and 0.0 <= estimator <= 1.0:
        empirical = empirical_covariance(rows, assume_centered=True)
        scale = max(np.trace(empirical) / empirical.shape[0], 1e-12)
        shrinkage = float(estimator)
        covariance = (1.0 - shrinkage) * empirical + shrinkage * scale * np.eye(empirical.shape[0])
    else:
        raise BirderError(
            f"unknown covariance shrinkage {estimator!r}; choose one of: {', '.join(SHRINKAGE_ESTIMATORS)} "
            "or a weight in [0, 1]"
        )
    (precision, condition) = _inverse(covariance)
    return Covariance(precision, shrinkage, condition)


def _inverse(covariance: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], float]:
    """The inverse of a symmetric covariance and its condition number.

    Directions whose variance is below :data:`NULL_VARIANCE` of the largest are directions the embeddings never
    vary in (a final LayerNorm leaves one: its outputs have a fixed weighted sum), so every embedding has the same
    component there; they get no weight (the pseudo-inverse) and do not count in the condition number."""
    (values, vectors) = np.linalg.eigh((covariance + covariance.T) / 2)
    top = float(values.max())
    if not top > 0:
        raise BirderError("the training embeddings do not vary (a zero covariance): check the training photos")
    kept = values > top * NULL_VARIANCE
    condition = top / float(values[kept].min())
    return ((vectors[:, kept] / values[kept]) @ vectors[:, kept].T, condition)


# ---------------------------------------------------------------------------------------------------------------------
# The ensemble's members
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsembleMember:
    """One score of the ``ensemble`` method and how it is normalised: ``(score - centre) / scale``, its mean and
    standard deviation on the known validation photos (no unknown photos needed)."""

    method: str  # one of SINGLE_METHODS
    neighbours: int | None = None  # knn's k (the Mahalanobis members use the statistics' shrinkage)
    centre: float = 0.0
    scale: float = 1.0

    def describe(self) -> str:
        return f"{self.method} k={self.neighbours}" if self.method == "knn" else self.method

    def record(self) -> dict[str, object]:
        return {"method": self.method, "neighbours": self.neighbours, "centre": self.centre, "scale": self.scale}

    @classmethod
    def from_record(cls, record: dict[str, object]) -> EnsembleMember:
        method = str(record["method"])
        if method not in SINGLE_METHODS:
            raise CheckpointError(f"an ensemble member of unknown method '{method}' (calibrate again)")
        neighbours = record.get("neighbours")
        return cls(
            method, None if neighbours is None else int(neighbours), float(record["centre"]), float(record["scale"])
        )


class ScoreInputs(TypedDict, total=False):
    """What an unknown test scores photos from: the classifier's outputs and the class statistics (each test needs
    some of them: :func:`unknown_scores`)."""

    probabilities: FloatArray | None
    logits: FloatArray | None
    embeddings: FloatArray | None
    statistics: ClassStatistics | None


def member_scores(member: EnsembleMember, **inputs: Unpack[ScoreInputs]) -> npt.NDArray[np.float64]:
    """A member's raw (not normalised) unknown score of each photo."""
    if member.method == "knn":
        (embeddings, statistics) = (inputs.get("embeddings"), inputs.get("statistics"))
        if embeddings is None or statistics is None:
            raise BirderError("the 'knn' unknown test needs embeddings and class statistics")
        return statistics.knn(embeddings, member.neighbours)
    return unknown_scores(member.method, **inputs)


def fit_ensemble(
    members: Sequence[tuple[str, int | None]], **inputs: Unpack[ScoreInputs]
) -> tuple[EnsembleMember, ...]:
    """The ensemble of ``members`` (``(method, k)``, k for knn only) normalised on known photos: each member's
    centre and scale are the mean and standard deviation of its score on them."""
    fitted = []
    for method, neighbours in members:
        raw = member_scores(EnsembleMember(method, neighbours), **inputs)
        fitted.append(EnsembleMember(method, neighbours, float(raw.mean()), max(float(raw.std()), _MIN_SCALE)))
    return tuple(fitted)


def ensemble_scores(members: Sequence[EnsembleMember], **inputs: Unpack[ScoreInputs]) -> npt.NDArray[np.float64]:
    """The mean of the members' normalised scores (higher: more likely unknown)."""
    if not members:
        raise BirderError(
            "the model's class statistics hold no ensemble (birder-calibrate found no candidates its folds could not "
            "tell apart, or a single --unknown-method was forced): choose another --unknown-method"
        )
    total = 0.0
    for member in members:
        raw = member_scores(member, **inputs)
        total = total + (raw - member.centre) / member.scale
    return np.asarray(total, dtype=np.float64) / len(members)


# ---------------------------------------------------------------------------------------------------------------------
# The class statistics
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassStatistics:
    """Embedding statistics of the model's classes, fitted on training photos."""

    class_names: list[str]
    means: npt.NDArray[np.float64]  # [C, D]; rows of classes without photos are unused
    present: npt.NDArray[np.bool_]  # [C]: the class had training photos
    precision: npt.NDArray[np.float64]  # [D, D], the inverse of the shrunk shared within-class covariance
    bank: npt.NDArray[np.float32]  # [N, D] normalised training embeddings
    neighbours: int = DEFAULT_NEIGHBOURS
    # One Gaussian of all training embeddings, for relative_mahalanobis (None in sidecars of older releases)
    background_mean: npt.NDArray[np.float64] | None = None  # [D]
    background_precision: npt.NDArray[np.float64] | None = None  # [D, D]
    shrinkage: str | float = DEFAULT_SHRINKAGE  # the estimator (or the fixed weight) of both covariances
    shrinkage_weights: tuple[float, float] = (0.0, 0.0)  # the fitted weights: within-class, background
    bank_per_class: int = DEFAULT_BANK_PER_CLASS
    # Of the two estimated covariances (within-class, background); not stored: only the fit decides on them
    conditions: tuple[float, float] = field(default=(float("nan"), float("nan")), compare=False)
    # The members of the ``ensemble`` method, normalised on known photos (empty: no ensemble)
    ensemble: tuple[EnsembleMember, ...] = ()
    # [N] each bank row's length before it was normalised: the bank times these are the training embeddings that
    # nearest_mahalanobis measures to (None in sidecars of older releases)
    bank_norms: npt.NDArray[np.float32] | None = None

    @classmethod
    def fit(
        cls,
        embeddings: FloatArray,
        targets: npt.NDArray[np.integer],
        class_names: Sequence[str],
        *,
        shrinkage: str | float = DEFAULT_SHRINKAGE,
        neighbours: int = DEFAULT_NEIGHBOURS,
        bank_per_class: int = DEFAULT_BANK_PER_CLASS,
    ) -> ClassStatistics:
        embeddings = np.asarray(embeddings, dtype=np.float64)
        targets = np.asarray(targets)
        (count, dim) = embeddings.shape
        if count < 2:
            raise BirderError(f"class statistics need at least 2 training photos, got {count}")
        if neighbours < 1 or bank_per_class < 1:
            raise BirderError(f"kNN needs k >= 1 and >= 1 photo per class, got {neighbours} and {bank_per_class}")

        means = np.zeros((len(class_names), dim))
        present = np.zeros(len(class_names), dtype=bool)
        for index in np.unique(targets):
            means[index] = embeddings[targets == index].mean(axis=0)
            present[index] = True

        within = estimate_covariance(embeddings - means[targets], shrinkage)
        background_mean = embeddings.mean(axis=0)
        background = estimate_covariance(embeddings - background_mean, shrinkage)
        conditions = (within.condition, background.condition)
        banked = embeddings[knn_bank_rows(targets, bank_per_class)]
        if shrinkage == "none":  # fewer photos than dimensions: singular whatever its numbers say
            conditions = tuple(
                value if count - used >= dim else float("inf")
                for (value, used) in zip(conditions, (int(present.sum()), 1), strict=True)
            )
        # Rounded as the sidecar stores them: thresholds fitted now give the same answers after a reload
        return cls(
            list(class_names),
            means.astype(np.float32).astype(np.float64),
            present,
            within.precision,
            _half(normalise(banked)),
            neighbours,
            background_mean,
            background.precision,
            shrinkage,
            (within.shrinkage, background.shrinkage),
            bank_per_class,
            conditions,
            bank_norms=np.linalg.norm(banked, axis=1).astype(np.float32),
        )

    def supports(self, method: str) -> bool:
        if method == "ensemble":
            return bool(self.ensemble) and all(
                member.method not in EMBEDDING_METHODS or self.supports(member.method) for member in self.ensemble
            )
        if method == "relative_mahalanobis":
            return self.background_mean is not None
        if method == "nearest_mahalanobis":
            return self.bank_norms is not None
        return method in EMBEDDING_METHODS

    def describe(self, method: str) -> str:
        """The settings ``method`` scores with, in words: ``"oas (weight 0.031)"``,
        ``"k=1 of 640 (at most 64 per class)"``."""
        if method == "knn":
            return f"k={self.neighbours} of {len(self.bank)} (at most {self.bank_per_class} per class)"
        if method == "ensemble":
            return "mean of " + " + ".join(member.describe() for member in self.ensemble)
        if method in MAHALANOBIS_METHODS:
            weight = self.shrinkage_weights[0]
            name = self.shrinkage if isinstance(self.shrinkage, str) else "fixed"
            return name if name == "none" else f"{name} (weight {weight:.3g})"
        return ""

    # Scores

    @cached_property
    def _projected_means(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """``P m`` of every class with photos, and ``m^T P m``: computed once (707 x 1024 x 1024 multiply-adds)."""
        means = self.means[self.present]
        projected = means @ self.precision  # [C, D] (P is symmetric)
        return (projected, np.einsum("cd,cd->c", projected, means))

    def mahalanobis(self, embeddings: FloatArray) -> npt.NDArray[np.float64]:
        """The smallest squared distance to a class mean, ``[B]``."""
        embeddings = np.asarray(embeddings, dtype=np.float64)
        (projected, constant) = self._projected_means
        # (e - m)^T P (e - m) = e^T P e - 2 e^T P m + m^T P m, for every class at once
        own = np.einsum("bd,de,be->b", embeddings, self.precision, embeddings)
        return (own[:, None] - 2.0 * (embeddings @ projected.T) + constant[None, :]).min(axis=1)

    def relative_mahalanobis(self, embeddings: FloatArray) -> npt.NDArray[np.float64]:
        """The smallest squared distance to a class mean minus the squared distance to the background Gaussian."""
        if self.background_mean is None or self.background_precision is None:
            raise CheckpointError(
                "these class statistics have no background Gaussian (written by an older birder-calibrate): run "
                "birder-calibrate --train again for relative_mahalanobis"
            )
        centred = np.asarray(embeddings, dtype=np.float64) - self.background_mean
        background = np.einsum("bd,de,be->b", centred, self.background_precision, centred)
        return self.mahalanobis(embeddings) - background

    @cached_property
    def _whitening(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """``W`` with ``W W^T = P`` (the within-class precision), and the training embeddings of the bank times
        ``W``: in that space the squared Euclidean distance is the squared Mahalanobis one. Computed once, in float32
        (at the card's scale 45,248 x 1024 x 1024 multiply-adds, about a second)."""
        if self.bank_norms is None:
            raise CheckpointError(
                "these class statistics keep no bank lengths (written by an older birder-calibrate): run "
                "birder-calibrate --train again for nearest_mahalanobis"
            )
        (weights, vectors) = np.linalg.eigh(self.precision)
        # An unshrunk precision can have rounding-negative eigenvalues in directions the photos never vary in
        whitening = (vectors * np.sqrt(np.clip(weights, 0.0, None))).astype(np.float32)
        return (whitening, (self.bank * self.bank_norms[:, None]) @ whitening)

    def nearest_mahalanobis(self, embeddings: FloatArray) -> npt.NDArray[np.float64]:
        """The smallest squared Mahalanobis distance to a training embedding of the bank, ``[B]``."""
        (whitening, bank) = self._whitening
        queries = np.asarray(embeddings, dtype=np.float32) @ whitening
        return nearest_squared_distances(bank, queries)

    def knn(self, embeddings: FloatArray, neighbours: int | None = None) -> npt.NDArray[np.float64]:
        """1 - the cosine similarity to the k-th nearest training embedding, ``[B]`` (k: ``self.neighbours``)."""
        k = neighbours or self.neighbours
        return 1.0 - nearest_similarities(self.bank, normalise(embeddings), k)[:, -1].astype(np.float64)

    def score(self, method: str, embeddings: FloatArray) -> npt.NDArray[np.float64]:
        if method == "mahalanobis":
            return self.mahalanobis(embeddings)
        if method == "relative_mahalanobis":
            return self.relative_mahalanobis(embeddings)
        if method == "nearest_mahalanobis":
            return self.nearest_mahalanobis(embeddings)
        if method == "knn":
            return self.knn(embeddings)
        if method == "ensemble" and all(member.method in EMBEDDING_METHODS for member in self.ensemble):
            return ensemble_scores(self.ensemble, embeddings=embeddings, statistics=self)
        raise BirderError(f"'{method}' is not an embedding unknown test ({', '.join(EMBEDDING_METHODS)})")

    # The sidecar file

    def save(self, path: str | Path) -> Path:
        tensors = {
            "class_means": torch.from_numpy(self.means.astype(np.float32)),
            "class_present": torch.from_numpy(self.present.astype(np.uint8)),
            "precision": torch.from_numpy(self.precision.astype(np.float64)),
            "knn_bank": torch.from_numpy(self.bank.astype(np.float16)),
        }
        if self.background_mean is not None and self.background_precision is not None:
            tensors["background_mean"] = torch.from_numpy(self.background_mean.astype(np.float64))
            tensors["background_precision"] = torch.from_numpy(self.background_precision.astype(np.float64))
        if self.bank_norms is not None:
            tensors["knn_bank_norms"] = torch.from_numpy(self.bank_norms.astype(np.float32))
        info = {
            "classes": self.class_names,
            "neighbours": self.neighbours,
            "shrinkage": self.shrinkage,
            "shrinkage_weights": list(self.shrinkage_weights),
            "bank_per_class": self.bank_per_class,
            "ensemble": [member.record() for member in self.ensemble],
        }
        return write_stats_file(path, tensors, info)

    @classmethod
    def load(cls, path: str | Path, class_names: Sequence[str]) -> ClassStatistics:
        (tensors, info) = read_stats_file(path)
        if info.get("classes") != list(class_names):
            raise CheckpointError(f"{path}: class statistics of other classes than the model's (calibrate again)")
        try:
            background = tensors.get("background_mean"), tensors.get("background_precision")
            return cls(
                list(class_names),
                tensors["class_means"].double().numpy(),
                tensors["class_present"].bool().numpy(),
                tensors["precision"].double().numpy(),
                tensors["knn_bank"].float().numpy(),
                int(info.get("neighbours", DEFAULT_NEIGHBOURS)),
                background[0].double().numpy() if background[0] is not None else None,
                background[1].double().numpy() if background[1] is not None else None,
                info.get("shrinkage", 0.1),  # older sidecars: the fixed weight they were fitted with
                tuple(info.get("shrinkage_weights", (0.1, 0.1))),
                int(info.get("bank_per_class", 32)),
                ensemble=tuple(EnsembleMember.from_record(member) for member in info.get("ensemble", [])),
                bank_norms=tensors["knn_bank_norms"].float().numpy() if "knn_bank_norms" in tensors else None,
            )
        except KeyError as err:
            raise CheckpointError(f"{path}: not a class-statistics file (no {err} tensor)") from None


def knn_bank_rows(targets: npt.NDArray[np.integer], bank_per_class: int) -> npt.NDArray[np.intp]:
    """The photos of the kNN bank: at most ``bank_per_class`` of each class, evenly spaced over the class's photos
    (not the first ones: folders are often in time order)."""
    targets = np.asarray(targets)
    rows = []
    for index in np.unique(targets):
        members = np.flatnonzero(targets == index)
        rows.append(members[np.linspace(0, len(members) - 1, min(len(members), bank_per_class)).round().astype(int)])
    return np.unique(np.concatenate(rows))


def _half(values: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Rounded to float16 as the sidecar stores them (thresholds fitted now give the same answers after a reload)."""
    return np.asarray(values).astype(np.float16).astype(np.float32)


def knn_bank(embeddings: FloatArray, targets: npt.NDArray[np.integer], bank_per_class: int) -> npt.NDArray[np.float32]:
    """The kNN bank: the normalised embeddings of :func:`knn_bank_rows`, rounded to float16 as the sidecar stores
    them."""
    return _half(normalise(np.asarray(embeddings)[knn_bank_rows(targets, bank_per_class)]))


def nearest_similarities(bank: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int) -> np.ndarray:
    """The cosine similarities ``[Q, k']`` (``k' = min(k, len(bank))``) of each normalised query to its nearest rows
    of the normalised ``bank``, most similar first: exact, by faiss's flat inner-product search when installed (a
    bank of 45,000 x 1024 against thousands of queries: blocked BLAS and a heap per query), else by numpy."""
    k = min(k, len(bank))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    searched = _faiss_search(bank, queries, k, "METRIC_INNER_PRODUCT")
    if searched is not None:
        return searched
    best = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    for start in range(0, len(bank), _CHUNK):
        similarities = np.concatenate([best, queries @ bank[start : start + _CHUNK].T], axis=1)
        best = -np.partition(-similarities, k - 1, axis=1)[:, :k] if similarities.shape[1] > k else similarities
    return -np.sort(-best, axis=1)


def nearest_squared_distances(bank: npt.NDArray[np.float32], queries: npt.NDArray[np.float32]) -> np.ndarray:
    """The smallest squared Euclidean distance ``[Q]`` of each query to a row of ``bank``: exact, by faiss's flat L2
    search when installed and there are many queries, else by numpy in blocks of the bank."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    searched = _faiss_search(bank, queries, 1, "METRIC_L2")
    if searched is not None:
        return np.maximum(searched[:, 0].astype(np.float64), 0.0)
    own = np.einsum("qd,qd->q", queries, queries)
    best = np.full(len(queries), np.inf)
    for start in range(0, len(bank), _CHUNK):
        block = bank[start : start + _CHUNK]
        distances = own[:, None] - 2.0 * (queries @ block.T) + np.einsum("nd,nd->n", block, block)[None, :]
        best = np.minimum(best, distances.min(axis=1))
    return np.maximum(best, 0.0)


def _faiss_search(
    bank: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int, metric: str
) -> np.ndarray | None:
    """faiss's exact flat search of each query's ``k`` best values in ``bank`` (``metric``: ``"METRIC_INNER_PRODUCT"``
    or ``"METRIC_L2"``, squared), or None where numpy is to search instead: a few queries (one BLAS product) or faiss
    not installed."""
    if len(queries) <= _FEW_QUERIES:
        return None
    # Not birder.search's import_faiss: inference sits below search in the layers (pyproject's import contract)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its lines on which CPU build it loads
    try:
        import faiss
    except ImportError:
        return None
    (values, _) = faiss.knn(queries, np.ascontiguousarray(bank, dtype=np.float32), k, metric=getattr(faiss, metric))
    return values


def unknown_scores(
    method: str,
    *,
    probabilities: FloatArray | None = None,
    logits: FloatArray | None = None,
    embeddings: FloatArray | None = None,
    statistics: ClassStatistics | None = None,
) -> npt.NDArray[np.float64]:
    """The unknown score of each photo by ``method`` (higher: more likely unknown); it needs ``probabilities``
    (``msp``), raw ``logits`` (``energy``) or ``embeddings`` and ``statistics`` (the embedding methods)."""
    needed = {"msp": probabilities, "energy": logits}.get(method, embeddings)
    if needed is None:
        raise BirderError(f"the '{method}' unknown test needs the photos' {_INPUTS.get(method, 'embeddings')}")
    if method == "msp":
        return 1.0 - np.asarray(probabilities, dtype=np.float64).max(axis=1)
    if method == "energy":
        logits = np.asarray(logits, dtype=np.float64)
        peak = logits.max(axis=1)
        return -(peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1)))
    if method in EMBEDDING_METHODS:
        if statistics is None:
            raise BirderError(f"the '{method}' unknown test needs class statistics: run birder-calibrate with --train")
        if method == "ensemble":
            return ensemble_scores(
                statistics.ensemble,
                probabilities=probabilities,
                logits=logits,
                embeddings=embeddings,
                statistics=statistics,
            )
        return statistics.score(method, embeddings)

    raise BirderError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------------------------------------------
# Thresholds and how well a method separates known from unknown photos
# ---------------------------------------------------------------------------------------------------------------------


def threshold_for_keep_rate(known_scores: FloatArray, keep: float) -> float:
    """The score under which (inclusive) a share ``keep`` of known photos falls: above it, a photo is unknown."""
    if not 0.0 < keep <= 1.0:
        raise BirderError(f"the keep-rate of known photos must be in (0, 1], got {keep}")
    # The smallest score s with share(scores <= s) >= keep
    return float(np.quantile(np.asarray(known_scores, dtype=np.float64), keep, method="inverted_cdf"))


def auroc(known: FloatArray, unknown: FloatArray) -> float:
    """The probability that an unknown photo scores higher than a known one (ties count half): the area under the
    ROC curve of the scores, unknown photos being the positives."""
    known = np.asarray(known, dtype=np.float64)
    unknown = np.asarray(unknown, dtype=np.float64)
    if not len(known) or not len(unknown):
        return float("nan")

    scores = np.concatenate([known, unknown])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Tied scores share the mean of their ranks
    (_, inverse, counts) = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.bincount(inverse, weights=ranks) / counts
    ranks = mean_rank[inverse]
    unknown_rank_sum = ranks[len(known) :].sum()
    return float((unknown_rank_sum - len(unknown) * (len(unknown) + 1) / 2) / (len(known) * len(unknown)))


def fpr_at_tpr(known: FloatArray, unknown: FloatArray, tpr: float = 0.95) -> float:
    """The share of unknown photos accepted as known at the threshold that keeps a share ``tpr`` of known ones."""
    unknown = np.asarray(unknown, dtype=np.float64)
    if not len(unknown) or not len(known):
        return float("nan")
    return float((unknown <= threshold_for_keep_rate(known, tpr)).mean())

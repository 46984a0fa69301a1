"""The unknown test: a per-photo ``unknown_score`` (higher: less like the model's species), four ways.

- ``msp``: 1 - the maximum (calibrated) species probability;
- ``energy``: -logsumexp of the raw logits (the negative free energy; low for inputs the network has seen the like of);
- ``mahalanobis``: the smallest squared Mahalanobis distance of the embedding to a class mean, with one covariance
  shared by all classes (shrunk towards a scaled identity so that it inverts with few photos per class);
- ``knn``: 1 - the cosine similarity of the normalised embedding to its k-th nearest training embedding.

The two embedding methods need :class:`ClassStatistics`, computed from training photos by ``birder-calibrate
--train`` into the model's sidecar file. A threshold is chosen on known (validation) photos for a keep-rate
(:func:`threshold_for_keep_rate`); a photo whose score is above it is ``unknown``. :func:`auroc` and
:func:`fpr_at_tpr` measure how well a method separates known photos from photos of other classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from birder.errors import BirderError, CheckpointError
from birder.io.calibration import read_stats_file, write_stats_file

METHODS = ("msp", "energy", "mahalanobis", "knn")
EMBEDDING_METHODS = ("mahalanobis", "knn")
# Covariance shrinkage towards (trace / D) * I: a 1024-d covariance from a few photos per class is singular.
DEFAULT_SHRINKAGE = 0.1
DEFAULT_NEIGHBOURS = 5
# Training embeddings kept per class for kNN: bounds the sidecar (707 classes x 32 x 1024 half floats = 46 MB).
DEFAULT_BANK_PER_CLASS = 32

FloatArray = npt.NDArray[np.floating]
# What each score is computed from (the embedding methods: embeddings)
_INPUTS = {"msp": "probabilities", "energy": "raw logits"}


def _normalise(embeddings: FloatArray) -> npt.NDArray[np.float32]:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class ClassStatistics:
    """Embedding statistics of the model's classes, fitted on training photos."""

    class_names: list[str]
    means: npt.NDArray[np.float64]  # [C, D]; rows of classes without photos are unused
    present: npt.NDArray[np.bool_]  # [C]: the class had training photos
    precision: npt.NDArray[np.float64]  # [D, D], the inverse of the shrunk shared covariance
    bank: npt.NDArray[np.float32]  # [N, D] normalised training embeddings
    neighbours: int = DEFAULT_NEIGHBOURS

    @classmethod
    def fit(
        cls,
        embeddings: FloatArray,
        targets: npt.NDArray[np.integer],
        class_names: Sequence[str],
        *,
        shrinkage: float = DEFAULT_SHRINKAGE,
        neighbours: int = DEFAULT_NEIGHBOURS,
        bank_per_class: int = DEFAULT_BANK_PER_CLASS,
    ) -> ClassStatistics:
        embeddings = np.asarray(embeddings, dtype=np.float64)
        targets = np.asarray(targets)
        (count, dim) = embeddings.shape
        if count < 2:
            raise BirderError(f"class statistics need at least 2 training photos, got {count}")

        means = np.zeros((len(class_names), dim))
        present = np.zeros(len(class_names), dtype=bool)
        bank_rows = []
        for index in np.unique(targets):
            rows = np.flatnonzero(targets == index)
            means[index] = embeddings[rows].mean(axis=0)
            present[index] = True
            # Evenly spaced over the class's photos, not the first ones: folders are often in time order.
            bank_rows.append(rows[np.linspace(0, len(rows) - 1, min(len(rows), bank_per_class)).round().astype(int)])

        centred = embeddings - means[targets]
        covariance = centred.T @ centred / count
        scale = np.trace(covariance) / dim
        shrunk = (1.0 - shrinkage) * covariance + shrinkage * max(scale, 1e-12) * np.eye(dim)
        bank = _normalise(embeddings[np.unique(np.concatenate(bank_rows))])
        return cls(list(class_names), means, present, np.linalg.inv(shrunk), bank, neighbours)

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

    def knn(self, embeddings: FloatArray) -> npt.NDArray[np.float64]:
        """1 - the cosine similarity to the k-th nearest training embedding, ``[B]``."""
        similarity = _normalise(embeddings) @ self.bank.T
        k = min(self.neighbours, self.bank.shape[0])
        kth = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
        return 1.0 - kth.astype(np.float64)

    # The sidecar file

    def save(self, path: str | Path) -> Path:
        tensors = {
            "class_means": torch.from_numpy(self.means.astype(np.float32)),
            "class_present": torch.from_numpy(self.present.astype(np.uint8)),
            "precision": torch.from_numpy(self.precision.astype(np.float32)),
            "knn_bank": torch.from_numpy(self.bank.astype(np.float16)),
        }
        return write_stats_file(path, tensors, {"classes": self.class_names, "neighbours": self.neighbours})

    @classmethod
    def load(cls, path: str | Path, class_names: Sequence[str]) -> ClassStatistics:
        (tensors, info) = read_stats_file(path)
        if info.get("classes") != list(class_names):
            raise CheckpointError(f"{path}: class statistics of other classes than the model's (calibrate again)")
        try:
            return cls(
                list(class_names),
                tensors["class_means"].double().numpy(),
                tensors["class_present"].bool().numpy(),
                tensors["precision"].double().numpy(),
                tensors["knn_bank"].float().numpy(),
                int(info.get("neighbours", DEFAULT_NEIGHBOURS)),
            )
        except KeyError as err:
            raise CheckpointError(f"{path}: not a class-statistics file (no {err} tensor)") from None


def unknown_scores(
    method: str,
    *,
    probabilities: FloatArray | None = None,
    logits: FloatArray | None = None,
    embeddings: FloatArray | None = None,
    statistics: ClassStatistics | None = None,
) -> npt.NDArray[np.float64]:
    """The unknown score of each photo by ``method`` (higher: more likely unknown); it needs ``probabilities``
    (``msp``), raw ``logits`` (``energy``) or ``embeddings`` and ``statistics`` (``mahalanobis``, ``knn``)."""
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
        return statistics.mahalanobis(embeddings) if method == "mahalanobis" else statistics.knn(embeddings)

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

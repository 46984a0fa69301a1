"""Which unknown test, with which settings, on the user's own photos, without unknown photos: folds over classes.

The classes that have validation photos (and training photos, for the embedding methods) are shuffled with a seed
and split into ``folds`` groups. Each fold holds one group out as stand-in unknowns: every candidate is fitted as if
those classes did not exist, then scores the validation photos; the kept classes' photos are the known ones, the
held-out classes' photos the unknown ones, and the fold's figure is the AUROC of the two. The candidate with the best
mean AUROC over the folds is chosen (a tie goes to the earlier, cheaper one in :func:`candidates`).

The candidates (:func:`candidates`): ``msp``, ``energy``; ``mahalanobis`` and ``relative_mahalanobis`` with the
shared covariance shrunk by Ledoit-Wolf's or OAS's estimate or not at all (``none``, only where every fold's and the
full covariance are well-conditioned); ``knn`` for each k of :data:`NEIGHBOUR_GRID` over the bank of
``bank_per_class`` training embeddings per class that prediction will search.

What makes a fold fair to each candidate:

- **embedding methods**: class means, both covariances (their shrinkage estimated on the fold's own photos) and the
  kNN bank are fitted on the training photos of the kept classes only;
- **msp / energy**: the network's head has a row for each held-out class, which a model that never saw them would
  not have. The softmax (with the calibrated temperature) and the logsumexp run over the kept classes' logits only:
  the head of the same network with those rows removed;
- **what no fold removes**: the backbone (and the kept rows of the head) were trained with the held-out classes, so
  their photos sit where training with them put them: apart from the kept classes, and with kept-class logits
  pushed down. Stand-in unknowns are therefore easier than true ones for every candidate, so fold AUROCs run higher
  than those on true unknowns; what the choice needs is their order. ``benchmarks/unknown_choice.py`` measures how
  far the chosen candidate falls from the best one on true unknowns, on two differently generated data sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError
from birder.inference.calibration import softmax
from birder.inference.unknown import (
    DEFAULT_BANK_PER_CLASS,
    DEFAULT_NEIGHBOURS,
    DEFAULT_SHRINKAGE,
    MAHALANOBIS_METHODS,
    MAX_CONDITION,
    METHODS,
    SHRINKAGE_ESTIMATORS,
    ClassStatistics,
    auroc,
    knn_bank,
    nearest_similarities,
    normalise,
)

DEFAULT_FOLDS = 5
# The fewest classes folds can hold out from: a fold keeps at least two (a softmax over one logit is constant)
MIN_CLASSES = 3
NEIGHBOUR_GRID = (1, 2, 3, 5, 10, 20, 50)


class Labelled(Protocol):
    """Photos through the model: :class:`birder.inference.labeled.ModelOutputs` is one."""

    logits: npt.NDArray[np.floating]
    embeddings: npt.NDArray[np.floating]
    targets: npt.NDArray[np.integer]


class SelectionError(BirderError):
    """The photos cannot support a choice (too few classes): the caller falls back to a default."""


@dataclass(frozen=True)
class Candidate:
    method: str
    shrinkage: str | None = None  # the Mahalanobis methods
    neighbours: int | None = None  # knn

    @property
    def settings(self) -> dict[str, Any]:
        if self.method in MAHALANOBIS_METHODS:
            return {"shrinkage": self.shrinkage}
        if self.method == "knn":
            return {"neighbours": self.neighbours}
        return {}

    def describe(self) -> str:
        if self.method == "knn":
            return f"k={self.neighbours}"
        return self.shrinkage or ""


@dataclass(frozen=True)
class CandidateResult:
    candidate: Candidate
    fold_auroc: tuple[float, ...] = ()
    skipped: str | None = None  # why it was not scored

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_auroc)) if self.fold_auroc else float("nan")

    @property
    def sd(self) -> float:
        return float(np.std(self.fold_auroc, ddof=1)) if len(self.fold_auroc) > 1 else 0.0

    def record(self) -> dict[str, Any]:
        return {
            "method": self.candidate.method,
            "settings": self.candidate.settings,
            "fold_auroc": [round(value, 6) for value in self.fold_auroc],
            "mean": None if math.isnan(self.mean) else round(self.mean, 6),
            "sd": round(self.sd, 6),
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class UnknownChoice:
    """The candidates' fold AUROCs and the one kept (``forced``: the method the user asked for, its best settings)."""

    results: list[CandidateResult]
    chosen: Candidate
    folds: int
    classes: int  # the classes the folds held out from
    seed: int
    bank_per_class: int
    forced: bool = False
    held_out: list[int] = field(default_factory=list)  # classes held out per fold

    def best(self, method: str) -> CandidateResult | None:
        scored = [result for result in self.results if result.candidate.method == method and not result.skipped]
        return max(scored, key=lambda result: result.mean) if scored else None

    @property
    def shrinkage(self) -> str:
        """The class statistics' estimator: that of the best Mahalanobis candidate (both methods share it)."""
        scored = [r for r in self.results if r.candidate.method in MAHALANOBIS_METHODS and not r.skipped]
        if self.chosen.method in MAHALANOBIS_METHODS:
            return str(self.chosen.shrinkage)
        return str(max(scored, key=lambda r: r.mean).candidate.shrinkage) if scored else DEFAULT_SHRINKAGE

    @property
    def neighbours(self) -> int:
        """The class statistics' k: that of the best knn candidate."""
        if self.chosen.method == "knn":
            return int(self.chosen.neighbours)
        best = self.best("knn")
        return int(best.candidate.neighbours) if best is not None else DEFAULT_NEIGHBOURS

    def record(self) -> dict[str, Any]:
        """What the calibration file keeps (JSON)."""
        return {
            "chosen": {"method": self.chosen.method, "settings": self.chosen.settings},
            "forced": self.forced,
            "folds": self.folds,
            "classes": self.classes,
            "held_out_per_fold": self.held_out,
            "seed": self.seed,
            "bank_per_class": self.bank_per_class,
            "candidates": [result.record() for result in self.results],
        }

    def format(self) -> str:
        """The table ``birder-calibrate`` prints: candidate, settings, fold AUROC mean ± sd; ``*`` marks the choice."""
        (fewest, most) = (min(self.held_out), max(self.held_out))
        lines = [
            f"unknown test chosen on {self.folds} folds of held-out classes ({fewest}"
            + (f"-{most}" if most != fewest else "")
            + f" of {self.classes} classes per fold as stand-in unknowns, seed {self.seed})"
            + (" [method forced by --unknown-method]" if self.forced else "")
            + ":",
            f"    {'candidate':<22}{'settings':<14}fold AUROC",
        ]
        for result in self.results:
            mark = "*" if result.candidate == self.chosen else " "
            figure = f"skipped: {result.skipped}" if result.skipped else f"{result.mean:.4f} ± {result.sd:.4f}"
            lines.append(f"  {mark} {result.candidate.method:<22}{result.candidate.describe():<14}{figure}")
        return "\n".join(lines)


def candidates(
    with_embeddings: bool,
    estimators: Sequence[str] = SHRINKAGE_ESTIMATORS,
    neighbour_grid: Sequence[int] = NEIGHBOUR_GRID,
) -> list[Candidate]:
    """Every candidate, cheapest first: msp and energy, then (with training embeddings) the Mahalanobis methods per
    shrinkage estimator and knn per k."""
    found = [Candidate("msp"), Candidate("energy")]
    if with_embeddings:
        for method in MAHALANOBIS_METHODS:
            found += [Candidate(method, shrinkage=estimator) for estimator in estimators]
        found += [Candidate("knn", neighbours=k) for k in neighbour_grid]
    return found


def choose_unknown_test(
    val: Labelled,
    class_names: Sequence[str],
    *,
    train: Labelled | None = None,
    temperature: float = 1.0,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    bank_per_class: int = DEFAULT_BANK_PER_CLASS,
    estimators: Sequence[str] = SHRINKAGE_ESTIMATORS,
    neighbour_grid: Sequence[int] = NEIGHBOUR_GRID,
    forced: str | None = None,
) -> UnknownChoice:
    """Score every candidate on folds over classes (module docstring) and keep the best by mean AUROC; with
    ``forced`` (a method name), keep that method with its best settings.

    Raises :class:`SelectionError` when fewer than :data:`MIN_CLASSES` classes have photos to hold out.
    """
    if folds < 2:
        raise BirderError(f"the unknown-test choice needs at least 2 folds, got {folds}")
    if forced is not None and forced not in METHODS:
        raise BirderError(f"unknown method '{forced}'; choose one of: {', '.join(METHODS)}")
    val_targets = np.asarray(val.targets)
    eligible = np.unique(val_targets[val_targets >= 0])
    if train is not None:
        eligible = np.intersect1d(eligible, np.asarray(train.targets))
    if len(eligible) < MIN_CLASSES:
        where = "--val and --train" if train is not None else "--val"
        raise SelectionError(
            f"choosing the unknown test needs photos of at least {MIN_CLASSES} classes in {where} (got "
            f"{len(eligible)}): folds hold some classes out as stand-in unknowns and keep at least two"
        )

    count = min(folds, len(eligible))
    groups = np.array_split(np.random.default_rng(seed).permutation(eligible), count)
    listed = candidates(train is not None, estimators, neighbour_grid)
    scores: dict[Candidate, list[float]] = {candidate: [] for candidate in listed}
    skipped: dict[Candidate, str] = {}
    if train is not None and "none" in estimators:
        # The shrinkage "none" is offered only when the full data's covariances invert well (the folds check theirs)
        full = ClassStatistics.fit(train.embeddings, train.targets, class_names, shrinkage="none", bank_per_class=1)
        _skip_ill_conditioned(full, "all training photos", listed, skipped)

    for number, held in enumerate(groups, start=1):
        _score_fold(number, held, val, train, class_names, temperature, bank_per_class, listed, scores, skipped)

    results = [
        CandidateResult(candidate, () if candidate in skipped else tuple(scores[candidate]), skipped.get(candidate))
        for candidate in listed
    ]
    scored = [result for result in results if not result.skipped and not math.isnan(result.mean)]
    pool = [result for result in scored if forced is None or result.candidate.method == forced]
    if not pool:
        raise SelectionError(f"no candidate of the '{forced}' unknown test could be scored on these photos")
    chosen = max(pool, key=lambda result: result.mean).candidate  # max keeps the first of equals: the cheaper
    return UnknownChoice(
        results, chosen, count, len(eligible), seed, bank_per_class, forced is not None, [len(g) for g in groups]
    )


def _skip_ill_conditioned(
    statistics: ClassStatistics, where: str, listed: Sequence[Candidate], skipped: dict[Candidate, str]
) -> None:
    worst = max(statistics.conditions)
    if not worst <= MAX_CONDITION:
        for candidate in listed:
            if candidate.shrinkage == "none" and candidate not in skipped:
                skipped[candidate] = f"covariance ill-conditioned ({worst:.1e} on {where})"


def _score_fold(
    number: int,
    held: npt.NDArray[np.integer],
    val: Labelled,
    train: Labelled | None,
    class_names: Sequence[str],
    temperature: float,
    bank_per_class: int,
    listed: Sequence[Candidate],
    scores: dict[Candidate, list[float]],
    skipped: dict[Candidate, str],
) -> None:
    """Add fold ``number``'s AUROC of each candidate to ``scores`` (``held``: its stand-in unknown classes)."""
    val_targets = np.asarray(val.targets)
    unknown = np.isin(val_targets, held)
    known = (val_targets >= 0) & ~unknown
    if train is not None:
        known &= np.isin(val_targets, np.asarray(train.targets))  # a class without training photos has no statistics
    kept_classes = ~np.isin(np.arange(len(class_names)), held)
    logits = np.asarray(val.logits, dtype=np.float64)[:, kept_classes]  # the head without the held-out rows

    def add(candidate: Candidate, values: npt.NDArray[np.float64]) -> None:
        if candidate in scores and candidate not in skipped:
            scores[candidate].append(auroc(values[known], values[unknown]))

    add(Candidate("msp"), 1.0 - softmax(logits, temperature).max(axis=1))
    peak = logits.max(axis=1)
    add(Candidate("energy"), -(peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))))
    if train is None:
        return

    train_targets = np.asarray(train.targets)
    rows = ~np.isin(train_targets, held)
    (embeddings, targets) = (np.asarray(train.embeddings)[rows], train_targets[rows])
    queries = np.asarray(val.embeddings)
    grid = [candidate.neighbours for candidate in listed if candidate.method == "knn"]
    if grid:
        bank = knn_bank(embeddings, targets, bank_per_class)
        similarities = nearest_similarities(bank, normalise(queries), max(grid))
        for k in grid:
            add(Candidate("knn", neighbours=k), 1.0 - similarities[:, min(k, similarities.shape[1]) - 1])
    for estimator in dict.fromkeys(c.shrinkage for c in listed if c.shrinkage is not None):
        if all(c in skipped for c in listed if c.shrinkage == estimator):
            continue
        statistics = ClassStatistics.fit(embeddings, targets, class_names, shrinkage=estimator, bank_per_class=1)
        if estimator == "none":
            _skip_ill_conditioned(statistics, f"fold {number}", listed, skipped)
        for method in MAHALANOBIS_METHODS:
            add(Candidate(method, shrinkage=estimator), statistics.score(method, queries))

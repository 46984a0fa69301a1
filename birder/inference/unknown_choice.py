"""Which unknown test, with which settings, on the user's own photos, without unknown photos: stand-in unknowns of two
sorts, held-out classes and photos made from the known ones.

**Folds over classes.** The classes that have validation photos (and training photos, for the embedding methods) are
shuffled with a seed and split into ``folds`` groups. Each fold holds one group out as stand-in unknowns: every
candidate is fitted as if those classes did not exist, then scores the validation photos; the kept classes' photos
are the known ones, the held-out classes' photos the unknown ones, and the fold's figure is the AUROC of the two
(with training photos, the mean over two views of the stand-in unknowns: below).

**Made stand-ins** (:mod:`birder.inference.stand_ins`, ``made``): photos made from the validation photos (two
classes blended or cut together, tiles shuffled, colours swapped, turned), which the network never saw. Every
candidate is fitted as prediction fits it (on every training photo; msp and energy from the network's own logits)
and scored on the known validation photos against each kind: one AUROC per kind.

**The choice.** A candidate's score (:attr:`CandidateResult.score`) is the lower of its two sorts' figures: its fold
figure and its mean AUROC over the made kinds. No one sort of stand-in is like a user's new species and each misleads
on some data; a test must hold on both. The best score wins, the first of equals (the cheaper in
:func:`candidates`). On the benchmark's 15 runs of five generators (``benchmarks/unknown_choice.py``), the folds
alone chose within 0.01 of the best candidate on true unknowns in 6 runs (mean gap 0.020; on digits, where plain
Mahalanobis was best, they ranked knn first, and on textures every candidate tied at 1.0); with the made stand-ins
(then the mean of the fold figure and each kind's AUROC, each one vote), 8 (mean gap 0.015). On a sixth generator
kept back until then (leaves, weak models of top-1 0.42-0.52) 1 of 3 where the folds' rule had 2: over the 18 runs 9
against 8, mean gap 0.021 against 0.023. On a seventh, bird-call spectrograms, kept back until that rule (with
nearest_mahalanobis not chosen on its own) was fixed: gaps 0.013, 0.011 and 0.004, 1 of 3 within 0.01; over the 21
runs 10, mean gap 0.019. Ten ways of combining the two sorts were then compared on those 21 runs' recorded figures;
the lower of the two sorts' means had the lowest mean gap (0.015, within 0.01 in 12 of 21). Before it was looked at
on an eighth generator (plankton micrographs, run once with the one-vote-per-kind rule) it was set to replace that
rule if, over all 24 runs, it came within 0.01 as often and had the lower mean gap. It did (13 of 24 against 11,
mean gap 0.019 against 0.022); on the plankton runs alone the two tied (gaps 0.000, 0.119, 0.013 against 0.000,
0.113, 0.016).

The candidates (:func:`candidates`): ``msp``, ``energy``; ``mahalanobis``, ``relative_mahalanobis`` and
``nearest_mahalanobis`` (not chosen on its own: below) with the shared covariance shrunk by Ledoit-Wolf's or OAS's
estimate or not at all (``none``, only where every fold's and the full covariance are well-conditioned); ``knn`` for
each k of :data:`NEIGHBOUR_GRID` over the bank of ``bank_per_class`` training embeddings per class that prediction
will search.

What makes a fold fair to each candidate:

- **embedding methods**: class means, both covariances (their shrinkage estimated on the fold's own photos) and the
  kNN bank are fitted on the training photos of the kept classes only;
- **msp / energy**: the network's head was trained with the held-out classes: on their photos it learned to push
  every other class's logit down, so dropping their rows from the head is not enough (on generated shapes that made
  energy's fold AUROC 0.79 where its AUROC on true unknowns was 0.52). With training photos, each fold fits a new
  linear head on the kept classes' training embeddings (multinomial logistic regression, :func:`fit_linear_head`;
  the network's head is linear on the embedding too) and scores with its logits, msp at a temperature fitted on
  the fold's known validation photos. The same head fitted on every class gives the same AUROC on true unknowns as
  the network's own (0.475 and 0.538 against 0.474 and 0.520 there), and the fold figure of energy drops to 0.57.
  Without training photos (msp against energy only) the softmax and logsumexp run over the kept classes' logits;
- **the backbone learned the held-out classes**: no fold removes that, so their photos sit where training with them
  put them, apart from the kept classes, each class along a direction of its own. Scored as they are, stand-in
  unknowns are easier than true ones, and not equally for every method. So each fold scores every candidate in two
  views of its stand-in unknowns (:data:`STAND_IN_VIEWS`), both fitted on the kept classes' training photos:

  - ``as_learned``: the embeddings as they are;
  - ``onto_kept_span``: each held-out class's validation photos moved so that the class mean lies in the span of the
    kept classes' means (:func:`move_onto_kept_span`): what of the class the kept classes' features express stays,
    the direction only it has is dropped, its photos' scatter is kept. A network that never saw the class could
    only describe it with the features of the classes it knows.

  The fold's figure of a candidate is the mean of its two AUROCs. On the benchmark's realistic models (top-1
  0.76-0.97; shapes, digits and glyphs, 9 runs) the candidates' figures in ``onto_kept_span`` followed their AUROCs
  on true unknowns more closely than as learned (correlation over the candidates 0.76-0.96 against 0.38-0.94) and
  than three other views tried (the held-out directions removed, the class moved onto its nearest kept class or
  between its two nearest: as low as -0.17); the two together chose better than as learned alone.

**nearest_mahalanobis** (the Mahalanobis distance to the nearest training photo of the bank) is scored on the same
folds and stand-ins, kept in the record, reported by ``birder-eval --unknown-dir`` with the statistics' shrinkage
and forceable (``--unknown-method nearest_mahalanobis``), but not chosen on its own. On the benchmark's digits it was
the best test on true unknowns in all 3 runs (0.935-0.956 against 0.915-0.944 for the best other) and the score
chose it there; but over the 18 runs of six generators, with it in the pool the choice was within 0.01 of the best
in 8 runs against 9 (mean gap 0.025 against 0.021) and the chosen test's AUROC moved by -0.002 on average (+0.008
on the 9 runs of digits, glyphs and textures, -0.012 on the weaker shapes, critters and leaves models, where the
score also chose it and it was worse).

**The ensemble.** The distance to the nearest training photos (knn) and the distance to the class means measured
against the distance to the centre of all photos (relative Mahalanobis) fail on different unknowns; their
z-normalised mean (:func:`ensemble_members`: the best k and the best relative Mahalanobis by score, with the
shrinkage the class statistics will hold, each score z-normalised on the known photos as prediction normalises it on
the known validation photos, :func:`birder.inference.unknown.fit_ensemble`) is scored on the same folds, views and
made stand-ins, kept in the sidecar (``birder-eval --unknown-dir`` reports it; ``--unknown-method ensemble`` uses
it), but not chosen on its own: it led the score in 13 of the 15 runs and was within 0.01 of the best single
candidate in 7 (mean gap 0.0154), where the best single candidate by score was in 8 (0.0148). Needs training
photos.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from birder.errors import BirderError
from birder.inference.calibration import fit_temperature_checked, softmax
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
# The fold's linear head: L2 weight on standardised embeddings (0.0001 to 0.01 gave the same AUROCs), LBFGS steps,
# and training photos per class it sees (evenly spaced; bounds its cost at the card's scale)
HEAD_WEIGHT_DECAY = 1e-3
HEAD_ITERATIONS = 100
HEAD_PHOTOS_PER_CLASS = 64
# The fewest classes folds can hold out from: a fold keeps at least two (a softmax over one logit is constant)
MIN_CLASSES = 3
NEIGHBOUR_GRID = (1, 2, 3, 5, 10, 20, 50, 100)
# The ways a fold shows its stand-in unknowns to the candidates (module docstring); a fold's figure is their mean
STAND_IN_VIEWS = ("as_learned", "onto_kept_span")
# Scored, kept in the sidecar and forceable with --unknown-method, but never chosen on their own (module docstring)
NOT_CHOSEN_ON_THEIR_OWN = ("ensemble", "nearest_mahalanobis")


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
    members: tuple[Candidate, ...] = ()  # ensemble: the candidates whose normalised scores it averages

    @property
    def settings(self) -> dict[str, Any]:
        if self.method in MAHALANOBIS_METHODS:
            return {"shrinkage": self.shrinkage}
        if self.method == "knn":
            return {"neighbours": self.neighbours}
        if self.method == "ensemble":
            return {"members": [{"method": member.method, **member.settings} for member in self.members]}
        return {}

    def describe(self) -> str:
        if self.method == "knn":
            return f"k={self.neighbours}"
        if self.method == "ensemble":
            return " + ".join(f"{member.method} {member.describe()}".rstrip() for member in self.members)
        return self.shrinkage or ""


@dataclass(frozen=True)
class CandidateResult:
    candidate: Candidate
    fold_auroc: tuple[float, ...] = ()  # per fold: the mean over the views of its stand-in unknowns
    skipped: str | None = None  # why it was not scored
    # Per view of the stand-in unknowns (STAND_IN_VIEWS), the AUROC of each fold; empty without training photos
    view_auroc: dict[str, tuple[float, ...]] = field(default_factory=dict, compare=False)
    # Per kind of made stand-in unknowns (birder.inference.stand_ins.MADE_KINDS), the AUROC of the validation photos
    # against them, the candidate fitted on every training photo as prediction fits it; empty when none were made
    made_auroc: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def mean(self) -> float:
        """The mean fold AUROC."""
        return float(np.mean(self.fold_auroc)) if self.fold_auroc else float("nan")

    @property
    def score(self) -> float:
        """What the choice ranks by: the lower of the two sorts of stand-in's figures, the folds' mean and the mean
        over the made kinds (the folds' mean alone when none were made). A test must hold on both sorts."""
        if math.isnan(self.mean):
            return float("nan")
        if not self.made_auroc:
            return self.mean
        return min(self.mean, float(np.mean(list(self.made_auroc.values()))))

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
            "view_auroc": {view: [round(value, 6) for value in values] for (view, values) in self.view_auroc.items()},
            "made_auroc": {kind: round(value, 6) for (kind, value) in self.made_auroc.items()},
            "score": None if math.isnan(self.score) else round(self.score, 6),
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

    @property
    def ensemble(self) -> Candidate | None:
        """The ensemble candidate the folds scored (None: fewer than two members, or no training photos)."""
        return next((r.candidate for r in self.results if r.candidate.method == "ensemble" and not r.skipped), None)

    def best(self, method: str) -> CandidateResult | None:
        scored = [result for result in self.results if result.candidate.method == method and not result.skipped]
        return max(scored, key=lambda result: result.score) if scored else None

    @property
    def shrinkage(self) -> str:
        """The class statistics' estimator: that of the best Mahalanobis candidate (both methods and the ensemble's
        Mahalanobis members share it)."""
        if self.chosen.method in MAHALANOBIS_METHODS:
            return str(self.chosen.shrinkage)
        return _best_shrinkage(self.results)

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
        """The table ``birder-calibrate`` prints: candidate, settings, fold AUROC mean ± sd, then (with training
        photos) its mean in each view of the stand-in unknowns; ``*`` marks the choice."""
        (fewest, most) = (min(self.held_out), max(self.held_out))
        shown = [view for view in STAND_IN_VIEWS if any(view in result.view_auroc for result in self.results)]
        kinds = list(dict.fromkeys(kind for result in self.results for kind in result.made_auroc))
        lines = [
            f"unknown test chosen on {self.folds} folds of held-out classes ({fewest}"
            + (f"-{most}" if most != fewest else "")
            + f" of {self.classes} classes per fold as stand-in unknowns, seed {self.seed})"
            + (f" and on {len(kinds)} kinds of stand-ins made from the validation photos" if kinds else "")
            + (" [method forced by --unknown-method]" if self.forced else "")
            + (": score = the lower of the fold AUROC and the made kinds' mean" if kinds else ":"),
            f"    {'candidate':<22}{'settings':<14}{'fold AUROC':<18}"
            + "".join(f"{v:>16}" for v in shown)
            + "".join(f"{k:>10}" for k in kinds)
            + (f"{'score':>9}" if kinds else ""),
        ]
        for result in self.results:
            mark = "*" if result.candidate == self.chosen else " "
            figure = f"skipped: {result.skipped}" if result.skipped else f"{result.mean:.4f} ± {result.sd:.4f}"
            if not result.skipped:
                figure = f"{figure:<18}" + "".join(f"{np.mean(result.view_auroc[v]):>16.4f}" for v in shown)
                figure += "".join(f"{result.made_auroc[k]:>10.4f}" for k in kinds if k in result.made_auroc)
                figure += f"{result.score:>9.4f}" if kinds else ""
            ensemble = result.candidate.method == "ensemble"
            settings = f"mean of {len(result.candidate.members)}" if ensemble else result.candidate.describe()
            lines.append(f"  {mark} {result.candidate.method:<22}{settings:<14}{figure}".rstrip())
            if ensemble:
                lines.append(f"      (normalised scores of: {result.candidate.describe()})")
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
    device: torch.device | str = "cpu",
    made: Callable[[], Mapping[str, Labelled]] | None = None,
) -> UnknownChoice:
    """Score every candidate on folds over classes and, when ``made`` is given, on the stand-in unknowns it makes
    (called once the photos are known to support a choice: making them runs the network), then keep the best score
    (module docstring); with ``forced`` (a method name), keep that method with its best settings. ``device``: where
    the folds' linear heads are fitted.

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
    views: dict[Candidate, dict[str, list[float]]] = {}
    skipped: dict[Candidate, str] = {}
    if train is not None and "none" in estimators:
        # The shrinkage "none" is offered only when the full data's covariances invert well (the folds check theirs)
        full = ClassStatistics.fit(train.embeddings, train.targets, class_names, shrinkage="none", bank_per_class=1)
        _skip_ill_conditioned(full, "all training photos", listed, skipped)

    fold_scores: list[FoldScores] = []
    for number, held in enumerate(groups, start=1):
        _score_fold(
            number, held, val, train, class_names, temperature, bank_per_class, listed, scores, skipped, device, views,
            fold_scores,
        )  # fmt: skip
    made_scores = None
    stand_ins = made() if made is not None else {}  # only now: the photos they cost go to waste without a choice
    if stand_ins:
        made_scores = _made_scores(
            val, train, stand_ins, class_names, temperature, bank_per_class, listed, skipped, device
        )

    results = [
        CandidateResult(
            candidate,
            () if candidate in skipped else tuple(scores[candidate]),
            skipped.get(candidate),
            {} if candidate in skipped else {view: tuple(v) for (view, v) in views.get(candidate, {}).items()},
            {}
            if candidate in skipped or made_scores is None
            else made_scores.figures(made_scores.by_candidate[candidate]),
        )
        for candidate in listed
    ]
    if fold_scores:
        ensemble = _ensemble_result(results, fold_scores, made_scores)
        if ensemble is not None:
            results.append(ensemble)
    scored = [result for result in results if not result.skipped and not math.isnan(result.mean)]
    if forced is not None:
        pool = [result for result in scored if result.candidate.method == forced]
    else:  # scored for birder-eval and --unknown-method, not chosen (module docstring)
        pool = [result for result in scored if result.candidate.method not in NOT_CHOSEN_ON_THEIR_OWN]
    if not pool:
        raise SelectionError(f"no candidate of the '{forced}' unknown test could be scored on these photos")
    chosen = _best_of(pool)
    return UnknownChoice(
        results, chosen, count, len(eligible), seed, bank_per_class, forced is not None, [len(g) for g in groups]
    )


def _best_of(pool: Sequence[CandidateResult]) -> Candidate:
    """The best score (the first of equals: the cheaper in :func:`candidates`)."""
    return max(pool, key=lambda result: result.score).candidate


def candidate_scores(
    statistics: ClassStatistics, candidate: Candidate, queries: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """The unknown scores of an embedding-based ``candidate`` (kNN or a Mahalanobis kind) from fitted class
    statistics: how the benchmark and the tests measure a candidate on true unknowns."""
    if candidate.method == "knn":
        return statistics.knn(queries, candidate.neighbours)
    return statistics.score(candidate.method, queries)


def fit_linear_head(
    embeddings: npt.ArrayLike,
    targets: npt.ArrayLike,
    classes: npt.NDArray[np.integer],
    *,
    device: torch.device | str = "cpu",
) -> Callable[[npt.ArrayLike], npt.NDArray[np.float64]]:
    """A linear softmax head over ``classes`` fitted on training embeddings (multinomial logistic regression on
    standardised embeddings, L2 weight :data:`HEAD_WEIGHT_DECAY`, LBFGS); returns the function giving its logits.

    At most :data:`HEAD_PHOTOS_PER_CLASS` photos per class, evenly spaced, are used. Seedless: it starts from zero
    weights and LBFGS is deterministic."""
    targets = np.asarray(targets)
    rows = []
    for index in classes:
        members = np.flatnonzero(targets == index)
        count = min(len(members), HEAD_PHOTOS_PER_CLASS)
        rows.append(members[np.linspace(0, len(members) - 1, count).round().astype(int)])
    rows = np.concatenate(rows)
    inputs = torch.as_tensor(np.asarray(embeddings, dtype=np.float32)[rows], device=device)
    labels = torch.as_tensor(np.searchsorted(classes, targets[rows]), device=device)
    (mean, spread) = (inputs.mean(dim=0), inputs.std(dim=0) + 1e-6)
    inputs = (inputs - mean) / spread
    weight = torch.zeros(inputs.shape[1], len(classes), device=device, requires_grad=True)
    bias = torch.zeros(len(classes), device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=HEAD_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(inputs @ weight + bias, labels) + HEAD_WEIGHT_DECAY * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)

    def logits(queries: npt.ArrayLike) -> npt.NDArray[np.float64]:
        with torch.no_grad():
            standard = (torch.as_tensor(np.asarray(queries, dtype=np.float32), device=device) - mean) / spread
            return (standard @ weight + bias).double().cpu().numpy()

    return logits


def _fold_temperature(logits: npt.NDArray[np.float64], targets: npt.NDArray[np.integer]) -> float:
    """The temperature birder-calibrate would fit for the fold's head: 1 where it would keep 1 or refuse."""
    try:
        return fit_temperature_checked(logits, targets, source="fold").temperature
    except BirderError:
        return 1.0


def _skip_ill_conditioned(
    statistics: ClassStatistics, where: str, listed: Sequence[Candidate], skipped: dict[Candidate, str]
) -> None:
    worst = max(statistics.conditions)
    if not worst <= MAX_CONDITION:
        for candidate in listed:
            if candidate.shrinkage == "none" and candidate not in skipped:
                skipped[candidate] = (
                    f"unshrunk covariance singular or ill-conditioned on {where} (condition {worst:.1e}, limit "
                    f"{MAX_CONDITION:.0e}, or fewer photos than dimensions)"
                )


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
    device: torch.device | str,
    views: dict[Candidate, dict[str, list[float]]] | None = None,
    fold_scores: list[FoldScores] | None = None,
) -> None:
    """Add fold ``number``'s AUROC of each candidate to ``scores`` (``held``: its stand-in unknown classes): with
    training photos the mean over :data:`STAND_IN_VIEWS`, each view's figure also to ``views``, and the candidates'
    scores in each view to ``fold_scores`` (for the ensemble)."""
    val_targets = np.asarray(val.targets)
    unknown = np.isin(val_targets, held)
    known = (val_targets >= 0) & ~unknown
    if train is not None:
        known &= np.isin(val_targets, np.asarray(train.targets))  # a class without training photos has no statistics
    kept_classes = ~np.isin(np.arange(len(class_names)), held)
    logits = np.asarray(val.logits, dtype=np.float64)[:, kept_classes]  # without training photos: the rows kept

    def add(candidate: Candidate, values: npt.NDArray[np.float64]) -> None:
        if candidate in scores and candidate not in skipped:
            scores[candidate].append(auroc(values[known], values[unknown]))

    queries = np.asarray(val.embeddings)
    if train is None:
        add(Candidate("msp"), _msp(logits, temperature))
        add(Candidate("energy"), _energy(logits))
        return

    train_targets = np.asarray(train.targets)
    rows = ~np.isin(train_targets, held)
    (embeddings, targets) = (np.asarray(train.embeddings)[rows], train_targets[rows])
    means = _class_means(train.embeddings, train_targets)
    span_queries = move_onto_kept_span(means, held, queries, val_targets)
    # One fit on the kept classes' embeddings; the views differ only in where the held-out photos are
    fitted = _view_scores(
        f"fold {number}", embeddings, targets, [queries, span_queries], known, val_targets, class_names,
        bank_per_class, listed, skipped, device,
    )  # fmt: skip
    by_view = dict(zip(STAND_IN_VIEWS, fitted, strict=True))
    if fold_scores is not None:
        fold_scores.append(FoldScores(by_view, known, unknown))
    for candidate in scores:
        if candidate in skipped or candidate not in by_view["as_learned"]:
            continue
        figures = [auroc(by_view[view][candidate][known], by_view[view][candidate][unknown]) for view in STAND_IN_VIEWS]
        scores[candidate].append(float(np.mean(figures)))
        if views is not None:
            for view, figure in zip(STAND_IN_VIEWS, figures, strict=True):
                views.setdefault(candidate, {}).setdefault(view, []).append(figure)


def _view_scores(
    where: str,
    embeddings: npt.NDArray[np.floating],
    targets: npt.NDArray[np.integer],
    query_sets: Sequence[npt.NDArray[np.floating]],
    known: npt.NDArray[np.bool_],
    val_targets: npt.NDArray[np.integer],
    class_names: Sequence[str],
    bank_per_class: int,
    listed: Sequence[Candidate],
    skipped: dict[Candidate, str],
    device: torch.device | str,
    head_logits: Sequence[npt.NDArray[np.float64]] | None = None,
    temperature: float = 1.0,
) -> list[dict[Candidate, npt.NDArray[np.float64]]]:
    """Every candidate's unknown scores of each of ``query_sets`` (the fold's validation photos in one view of its
    stand-in unknowns; the known photos the same in each), fitted on the kept classes' training embeddings
    (``embeddings``, ``targets``) once. msp and energy: from a linear head fitted on them, or from ``head_logits``
    (one array per query set) at ``temperature`` where the network's own head is the right one."""
    found: list[dict[Candidate, npt.NDArray[np.float64]]] = [{} for _ in query_sets]
    classes = np.unique(targets)
    if head_logits is None:
        head = fit_linear_head(embeddings, targets, classes, device=device)
        temperature = _fold_temperature(head(query_sets[0][known]), np.searchsorted(classes, val_targets[known]))
    for number, (queries, scores) in enumerate(zip(query_sets, found, strict=True)):
        logits = head(queries) if head_logits is None else head_logits[number]
        scores[Candidate("msp")] = _msp(logits, temperature)
        scores[Candidate("energy")] = _energy(logits)

    grid = [candidate.neighbours for candidate in listed if candidate.method == "knn"]
    if grid:
        bank = knn_bank(embeddings, targets, bank_per_class)
        for queries, scores in zip(query_sets, found, strict=True):
            similarities = nearest_similarities(bank, normalise(queries), max(grid))
            for k in grid:
                scores[Candidate("knn", neighbours=k)] = 1.0 - similarities[:, min(k, similarities.shape[1]) - 1]
    for estimator in dict.fromkeys(c.shrinkage for c in listed if c.shrinkage is not None):
        if all(c in skipped for c in listed if c.shrinkage == estimator):
            continue
        statistics = ClassStatistics.fit(
            embeddings, targets, class_names, shrinkage=estimator, bank_per_class=bank_per_class
        )
        if estimator == "none":
            _skip_ill_conditioned(statistics, where, listed, skipped)
        for method in dict.fromkeys(c.method for c in listed if c.shrinkage == estimator):
            for queries, scores in zip(query_sets, found, strict=True):
                scores[Candidate(method, shrinkage=estimator)] = statistics.score(method, queries)
    return found


def _msp(logits: npt.NDArray[np.float64], temperature: float) -> npt.NDArray[np.float64]:
    return 1.0 - softmax(logits, temperature).max(axis=1)


def _energy(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    peak = logits.max(axis=1)
    return -(peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1)))


def _class_means(embeddings: npt.ArrayLike, targets: npt.NDArray[np.integer]) -> dict[int, npt.NDArray[np.float64]]:
    """The mean training embedding of every class with training photos."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    return {int(index): embeddings[targets == index].mean(axis=0) for index in np.unique(targets)}


def move_onto_kept_span(
    means: dict[int, npt.NDArray[np.float64]],
    held: npt.ArrayLike,
    queries: npt.ArrayLike,
    query_targets: npt.NDArray[np.integer],
) -> npt.NDArray[np.float32]:
    """The validation embeddings with each held-out class's photos moved so that its mean lies in the span of the
    kept classes' means (about their centre): what of the class the kept classes' features can express stays, the
    direction it alone has is dropped; its photos' scatter about their mean is kept."""
    held_set = {int(index) for index in np.asarray(held)}
    kept = [index for index in means if index not in held_set]
    centre = np.mean([means[index] for index in kept], axis=0)
    # An orthonormal basis of the span: the centred means sum to zero, so their rank is at most one less than their
    # count (a QR would add a direction outside the span); directions of negligible weight are dropped
    (vectors, weights, _) = np.linalg.svd(np.stack([means[index] - centre for index in kept], axis=1), False)
    basis = vectors[:, weights > weights.max(initial=0.0) * 1e-9]
    moved = np.array(queries, dtype=np.float64)
    for index in sorted(held_set):
        if index in means:
            offset = means[index] - centre
            moved[query_targets == index] -= offset - basis @ (basis.T @ offset)
    return moved.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# The ensemble
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldScores:
    """Every candidate's scores of a fold's validation photos in each view of its stand-in unknowns."""

    by_view: dict[str, dict[Candidate, npt.NDArray[np.float64]]]
    known: npt.NDArray[np.bool_]
    unknown: npt.NDArray[np.bool_]


def _best_shrinkage(results: Sequence[CandidateResult]) -> str:
    """The estimator of the best scored Mahalanobis candidate the choice can keep: the one the class statistics are
    fitted with."""
    scored = [
        r
        for r in results
        if r.candidate.method in MAHALANOBIS_METHODS
        and r.candidate.method not in NOT_CHOSEN_ON_THEIR_OWN
        and not r.skipped
        and r.fold_auroc
    ]
    return str(max(scored, key=lambda r: r.score).candidate.shrinkage) if scored else DEFAULT_SHRINKAGE


def ensemble_members(results: Sequence[CandidateResult]) -> tuple[Candidate, ...]:
    """The best knn (its k) and the best relative Mahalanobis (with the shrinkage the statistics will hold, so
    prediction can score it) on the folds: the distance to the nearest training photos and the distance to the class
    means against the distance to the centre of all photos, two tests that fail on different unknowns; none when
    either was not scored."""
    shrinkage = _best_shrinkage(results)
    members = []
    for method in ("knn", "relative_mahalanobis"):
        scored = [
            result
            for result in results
            if result.candidate.method == method
            and not result.skipped
            and result.fold_auroc
            and (method != "relative_mahalanobis" or result.candidate.shrinkage == shrinkage)
        ]
        if not scored:
            return ()
        members.append(max(scored, key=lambda result: result.score).candidate)  # the first of equals: the cheaper
    return tuple(members)


def normalised_mean(
    member_scores: Sequence[npt.NDArray[np.float64]], known: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float64]:
    """The mean of the members' scores, each z-normalised on the ``known`` photos (as prediction normalises them on
    the known validation photos)."""
    total = np.zeros(len(member_scores[0]))
    for values in member_scores:
        reference = values[known]
        total += (values - reference.mean()) / max(float(reference.std()), 1e-12)
    return total / len(member_scores)


@dataclass(frozen=True)
class MadeScores:
    """Every candidate's unknown scores of the validation photos followed by the made stand-in unknowns."""

    by_candidate: dict[Candidate, npt.NDArray[np.float64]]
    known: npt.NDArray[np.bool_]  # the known validation photos' rows
    kinds: dict[str, npt.NDArray[np.bool_]]  # each made kind's rows

    def figures(self, values: npt.NDArray[np.float64]) -> dict[str, float]:
        """The AUROC of the known photos against each made kind, of the scores ``values`` (one per row)."""
        return {kind: auroc(values[self.known], values[rows]) for (kind, rows) in self.kinds.items()}


def _made_scores(
    val: Labelled,
    train: Labelled | None,
    made: Mapping[str, Labelled],
    class_names: Sequence[str],
    temperature: float,
    bank_per_class: int,
    listed: Sequence[Candidate],
    skipped: dict[Candidate, str],
    device: torch.device | str,
) -> MadeScores:
    """Every candidate fitted as prediction fits it (the statistics and the kNN bank on every training photo; msp
    and energy from the network's own logits at the calibration ``temperature``), scoring the validation photos and
    the ``made`` stand-in unknowns (:mod:`birder.inference.stand_ins`)."""
    val_targets = np.asarray(val.targets)
    known = val_targets >= 0
    if train is not None:
        known &= np.isin(val_targets, np.asarray(train.targets))
    sizes = [len(outputs.logits) for outputs in made.values()]
    known_rows = np.concatenate([known, np.zeros(sum(sizes), dtype=bool)])
    (kinds, start) = ({}, len(val_targets))
    for kind, size in zip(made, sizes, strict=True):
        kinds[kind] = np.zeros(len(known_rows), dtype=bool)
        kinds[kind][start : start + size] = True
        start += size
    # The network's own head at the calibration temperature: what prediction scores msp and energy with
    logits = np.concatenate([np.asarray(val.logits, dtype=np.float64)] + [np.asarray(o.logits) for o in made.values()])
    if train is None:
        found = {Candidate("msp"): _msp(logits, temperature), Candidate("energy"): _energy(logits)}
    else:
        queries = np.concatenate([np.asarray(val.embeddings)] + [np.asarray(o.embeddings) for o in made.values()])
        targets = np.concatenate([val_targets, np.full(sum(sizes), -1)])
        (found,) = _view_scores(
            "all training photos", np.asarray(train.embeddings), np.asarray(train.targets), [queries], known_rows,
            targets, class_names, bank_per_class, listed, skipped, device, [logits], temperature,
        )  # fmt: skip
    return MadeScores(found, known_rows, kinds)


def _ensemble_result(
    results: Sequence[CandidateResult], fold_scores: Sequence[FoldScores], made_scores: MadeScores | None = None
) -> CandidateResult | None:
    """The ensemble of :func:`ensemble_members` scored on the same folds, views and made stand-ins as every
    candidate."""
    members = ensemble_members(results)
    if not members:
        return None
    per_fold: list[float] = []
    per_view: dict[str, list[float]] = {view: [] for view in STAND_IN_VIEWS}
    for fold in fold_scores:
        figures = []
        for view in STAND_IN_VIEWS:
            combined = normalised_mean([fold.by_view[view][member] for member in members], fold.known)
            figures.append(auroc(combined[fold.known], combined[fold.unknown]))
            per_view[view].append(figures[-1])
        per_fold.append(float(np.mean(figures)))
    made_auroc = {}
    if made_scores is not None:
        combined = normalised_mean([made_scores.by_candidate[member] for member in members], made_scores.known)
        made_auroc = made_scores.figures(combined)
    return CandidateResult(
        Candidate("ensemble", members=members),
        tuple(per_fold),
        None,
        {v: tuple(f) for (v, f) in per_view.items()},
        made_auroc,
    )

"""Which unit a person should look at next: ``--order plan`` (default), ``least-sure``, ``species``, ``random``.

A survey's product is a list of species per camera (a *record*: this species was seen at this camera). A wrong
record is one the answers claim that is not there (every answer of that species at that camera is wrong) or one
that is there and no answer claims (the species was always called something else). Reviewing a unit fixes its
answers; it fixes a record only when it is the record's last doubtful piece of evidence. ``plan`` puts first the
unit whose review most reduces the expected number of wrong records; ``least-sure`` (lowest answer probability
first) spends reviews on units that are doubtful but often change nothing (a common species at a camera that has
fifty sure photos of it).

The error model, learned from the decisions made so far (:class:`ErrorModel`):

- how often an answer is wrong, per answered label and calibrated-probability band: the calibrated error
  ``1 - p`` of each answer, times a factor that the reviews estimate (observed errors over the errors the
  probabilities expected; shrunk towards the band's factor, and that towards 1, with a pseudo-count of
  :data:`PRIOR_ERRORS` expected errors: with no review yet, the calibrated probabilities are taken at their word);
- what a wrong answer usually was: the model's own alternatives (its top-k, renormalised) mixed with the
  corrections seen so far for that label (and ``blank``: no animal);
- for an abstention (``uncertain``, ``unknown``, a genus): its top-k, less the share of reviewed abstentions that
  were blank.

The expected wrong records (:meth:`Planner.expected_wrong`) treat units as independent: for each camera and
species, the chance that no unit truly shows it is the product over units of ``1 - P(unit shows it)``; a claimed
record is wrong with that chance, an unclaimed one with its complement. The value of reviewing a unit is the
expected drop of that sum over the unit's possible true answers, computed for every unit at once (numpy) from the
per-camera products (:meth:`Planner.gains`). The page shows the expected wrong records left per species.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

ORDERS = ("plan", "least-sure", "species", "random")
# The calibrated-probability bands the error rates are learned (and review-stats reports) in
BANDS = (0.0, 0.5, 0.7, 0.9, 0.97, 1.0000001)
# Pseudo-count, in expected errors, of the prior that the calibrated probabilities are right
PRIOR_ERRORS = 3.0
# Weight, in reviews, of the model's own alternatives in "what a wrong answer usually was"
ALTERNATIVES_WEIGHT = 2.0
# Prior share of blank among wrong answers and among abstentions (no animal), before any review
PRIOR_BLANK = 0.05
# Possible true answers kept per unit (beside "no species")
MAX_OUTCOMES = 6
_EPSILON = 1e-6

BLANK_OUTCOME = "blank"
OTHER_OUTCOME = "other"  # an animal of no species the survey records (unknown, a genus): no record


def band_of(probability: float) -> int:
    """The index of the band holding ``probability`` (see :data:`BANDS`)."""
    for index in range(len(BANDS) - 1):
        if probability < BANDS[index + 1]:
            return index
    return len(BANDS) - 2


def band_name(index: int) -> str:
    return f"{BANDS[index]:.2f}-{min(BANDS[index + 1], 1.0):.2f}"


@dataclass(frozen=True)
class Item:
    """One answer of the machine to be checked: a unit's, or a box's.

    ``label`` is the species the answer records (None: it records none: an abstention, a higher rank, blank);
    ``probability`` its calibrated probability; ``alternatives`` the top-k ``(species, probability)``.
    """

    label: str | None
    probability: float
    alternatives: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class PlanUnit:
    """A unit as the planner sees it: its camera and its answers (one, or one per box)."""

    unit_id: str
    camera: str
    items: tuple[Item, ...]
    sureness: float  # for least-sure and as the tie-break
    label: str  # the answer shown (species order)
    start: str = ""


@dataclass(frozen=True)
class Truth:
    """What a person decided: the true outcome of each item (a species, ``blank`` or ``other``) and the species
    the unit shows (its records)."""

    outcomes: tuple[str, ...]  # per item, in the unit's item order (shorter: the rest unknown)
    species: frozenset[str]


# ---------------------------------------------------------------------------------------------------------------------
# The error model
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ErrorModel:
    """How often answers are wrong, per label and band, and what they were instead (learned from reviews)."""

    band_factor: list[float] = field(default_factory=lambda: [1.0] * (len(BANDS) - 1))
    label_factor: dict[tuple[str, int], float] = field(default_factory=dict)
    confusions: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> outcome -> count
    abstention_blank: float = PRIOR_BLANK

    @classmethod
    def fit(cls, reviewed: Sequence[tuple[Item, str]]) -> ErrorModel:
        """From ``(item, true outcome)`` pairs of the reviewed units."""
        bands = len(BANDS) - 1
        (errors, expected) = ([0.0] * bands, [0.0] * bands)
        by_label: dict[tuple[str, int], list[float]] = {}
        confusions: dict[str, dict[str, float]] = {}
        (abstentions, blank_abstentions) = (0, 0)
        for item, outcome in reviewed:
            if item.label is None:
                abstentions += 1
                blank_abstentions += outcome == BLANK_OUTCOME
                continue
            band = band_of(item.probability)
            wrong = float(outcome != item.label)
            errors[band] += wrong
            expected[band] += 1.0 - item.probability
            pair = by_label.setdefault((item.label, band), [0.0, 0.0])
            pair[0] += wrong
            pair[1] += 1.0 - item.probability
            if wrong:
                seen = confusions.setdefault(item.label, {})
                seen[outcome] = seen.get(outcome, 0.0) + 1.0

        band_factor = [(errors[b] + PRIOR_ERRORS) / (expected[b] + PRIOR_ERRORS) for b in range(bands)]
        label_factor = {
            (label, band): (wrong + PRIOR_ERRORS * band_factor[band]) / (exp + PRIOR_ERRORS)
            for ((label, band), (wrong, exp)) in by_label.items()
        }
        blank = (blank_abstentions + PRIOR_BLANK * 10) / (abstentions + 10)
        return cls(band_factor, label_factor, confusions, blank)

    def error(self, item: Item) -> float:
        """The chance that a species answer is wrong."""
        assert item.label is not None
        band = band_of(item.probability)
        factor = self.label_factor.get((item.label, band), self.band_factor[band])
        return min(max((1.0 - item.probability) * factor, _EPSILON), 1.0 - _EPSILON)

    def outcomes(self, item: Item) -> list[tuple[str, float]]:
        """The item's possible true outcomes with their chances (summing to 1; ``other``: no species record)."""
        if item.label is None:
            top = [(name, p) for (name, p) in item.alternatives if p > 0]
            total = sum(p for (_, p) in top) or 1.0
            keep = 1.0 - self.abstention_blank
            # The top-k need not sum to 1: what they leave is an animal the list does not name
            share = min(total, 1.0)
            found = [(name, keep * share * p / total) for (name, p) in top[:MAX_OUTCOMES]]
            rest = 1.0 - self.abstention_blank - sum(p for (_, p) in found)
            return [*found, (BLANK_OUTCOME, self.abstention_blank), (OTHER_OUTCOME, max(rest, 0.0))]

        error = self.error(item)
        weights: dict[str, float] = {}
        others = [(name, p) for (name, p) in item.alternatives if name != item.label and p > 0]
        total = sum(p for (_, p) in others)
        for name, p in others:
            weights[name] = weights.get(name, 0.0) + ALTERNATIVES_WEIGHT * p / (total or 1.0)
        weights[BLANK_OUTCOME] = weights.get(BLANK_OUTCOME, 0.0) + ALTERNATIVES_WEIGHT * PRIOR_BLANK
        for name, count in self.confusions.get(item.label, {}).items():
            weights[name] = weights.get(name, 0.0) + count
        weights.pop(item.label, None)
        ranked = sorted(weights.items(), key=lambda pair: -pair[1])[: MAX_OUTCOMES - 1]
        mass = sum(w for (_, w) in weights.items())
        found = [(item.label, 1.0 - error)] + [(name, error * w / mass) for (name, w) in ranked]
        rest = 1.0 - sum(p for (_, p) in found)
        return [*found, (OTHER_OUTCOME, max(rest, 0.0))]


# ---------------------------------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------------------------------


class Planner:
    """Expected wrong records and the value of reviewing each unit, given the decisions so far.

    Units with one answer (events, photos) are computed together as arrays (a re-plan of thousands of units takes
    milliseconds); units with several (photos with boxes) one by one, over the sets of species they may show.
    """

    def __init__(self, units: Sequence[PlanUnit]) -> None:
        self.units = list(units)
        self.cameras = sorted({unit.camera for unit in self.units})
        self._camera_index = {camera: index for (index, camera) in enumerate(self.cameras)}
        self.species: dict[str, int] = {}
        for unit in self.units:
            for item in unit.items:
                if item.label is not None:
                    self._index(item.label)
                for name, _ in item.alternatives:
                    self._index(name)
        self._unit_camera = np.array([self._camera_index[unit.camera] for unit in self.units], dtype=np.int64)
        self._single = np.array([i for (i, unit) in enumerate(self.units) if len(unit.items) == 1], dtype=np.int64)
        self._multi = [i for (i, unit) in enumerate(self.units) if len(unit.items) != 1]
        width = max([len(self.units[i].items[0].alternatives) for i in self._single] + [1])
        count = len(self._single)
        self._label = np.full(count, -1, dtype=np.int64)
        self._probability = np.zeros(count)
        self._alternative = np.full((count, width), -1, dtype=np.int64)
        self._alternative_p = np.zeros((count, width))
        for row, unit_index in enumerate(self._single):
            item = self.units[unit_index].items[0]
            self._label[row] = -1 if item.label is None else self.species[item.label]
            self._probability[row] = item.probability
            for slot, (name, probability) in enumerate(item.alternatives):
                self._alternative[row, slot] = self.species[name]
                self._alternative_p[row, slot] = probability
        self._band = np.searchsorted(np.array(BANDS[1:-1]), self._probability, side="right")
        self._model = ErrorModel()
        self.truths: dict[str, Truth] = {}

    def _index(self, name: str) -> int:
        if name in (BLANK_OUTCOME, OTHER_OUTCOME):
            return -1
        return self.species.setdefault(name, len(self.species))

    def fit(self, truths: Mapping[str, Truth]) -> ErrorModel:
        reviewed = []
        for unit in self.units:
            truth = truths.get(unit.unit_id)
            if truth is None:
                continue
            for index, item in enumerate(unit.items):
                if index < len(truth.outcomes):
                    reviewed.append((item, truth.outcomes[index]))
                elif len(unit.items) == 1:
                    reviewed.append((item, _single_outcome(item, truth)))
        return ErrorModel.fit(reviewed)

    def prepare(self, truths: Mapping[str, Truth]) -> None:
        """Learn the error model from ``truths`` (unit id -> what a person decided) and build the per-camera
        products the gains and expected wrong records come from."""
        self._model = model = self.fit(truths)
        self.truths = dict(truths)
        for truth in truths.values():
            for name in truth.species:
                self._index(name)
        for label, seen in model.confusions.items():
            self._index(label)
            for name in seen:
                self._index(name)
        (cameras, species) = (len(self.cameras), len(self.species))
        self._log_none = np.zeros((cameras, species))  # sum over unreviewed units of log(1 - P(shows s))
        self._certain = np.zeros((cameras, species), dtype=np.int64)  # reviewed units that show s
        self._claims = np.zeros((cameras, species), dtype=np.int64)  # units whose output records s
        reviewed = np.array([unit.unit_id in truths for unit in self.units], dtype=bool)
        for unit_index in np.flatnonzero(reviewed):
            camera = self._unit_camera[unit_index]
            for name in truths[self.units[unit_index].unit_id].species:
                self._certain[camera, self.species[name]] += 1
                self._claims[camera, self.species[name]] += 1

        # Units of one answer: [pending, slots] arrays of the species each may show and the chance it does
        pending_rows = np.flatnonzero(~reviewed[self._single]) if len(self._single) else np.zeros(0, dtype=np.int64)
        self._rows = pending_rows
        (self._slot, self._slot_p) = self._single_outcomes(pending_rows)
        camera = self._unit_camera[self._single[pending_rows]]
        valid = self._slot >= 0
        (row_of, slot_of) = np.nonzero(valid)
        np.add.at(
            self._log_none,
            (camera[row_of], self._slot[row_of, slot_of]),
            np.log(np.maximum(1.0 - self._slot_p[row_of, slot_of], _EPSILON)),
        )
        claiming = self._label[pending_rows] >= 0
        np.add.at(self._claims, (camera[claiming], self._label[pending_rows][claiming]), 1)

        # Units of several answers, one by one
        self._multi_outcomes: dict[int, tuple[list[frozenset[int]], list[float], dict[int, float], frozenset[int]]]
        self._multi_outcomes = {}
        for unit_index in self._multi:
            unit = self.units[unit_index]
            if reviewed[unit_index]:
                continue
            camera_index = self._unit_camera[unit_index]
            claims = frozenset(self.species[item.label] for item in unit.items if item.label is not None)
            for index in claims:
                self._claims[camera_index, index] += 1
            (sets, chances) = self._unit_outcomes(unit)
            marginal: dict[int, float] = {}
            for members, chance in zip(sets, chances, strict=True):
                for index in members:
                    marginal[index] = marginal.get(index, 0.0) + chance
            for index, chance in marginal.items():
                self._log_none[camera_index, index] += math.log(max(1.0 - chance, _EPSILON))
            self._multi_outcomes[unit_index] = (sets, chances, marginal, claims)

    def _single_outcomes(self, rows: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """``(species [rows, slots], chance [rows, slots])`` of units of one answer (species -1: an empty slot);
        slot 0 is the answer itself for a species answer. What is left (blank, other) records nothing."""
        model = self._model
        count = len(rows)
        species_count = len(self.species)
        slots = np.full((count, MAX_OUTCOMES), -1, dtype=np.int64)
        chances = np.zeros((count, MAX_OUTCOMES))
        if count == 0:
            return (slots, chances)
        label = self._label[rows]
        probability = self._probability[rows]
        band = self._band[rows]
        alternative = self._alternative[rows]
        alternative_p = self._alternative_p[rows]

        bands = len(BANDS) - 1
        factor = np.tile(np.array(model.band_factor), (species_count, 1))
        for (name, band_index), value in model.label_factor.items():
            factor[self.species[name], band_index] = value
        # "What it usually was": per answered label, the corrections seen (last column: blank)
        confusion = np.zeros((species_count, species_count + 1))
        for name, seen in model.confusions.items():
            for outcome, count_seen in seen.items():
                column = species_count if outcome == BLANK_OUTCOME else self.species.get(outcome, -1)
                if column >= 0:
                    confusion[self.species[name], column] += count_seen

        answered = label >= 0
        error = np.clip((1.0 - probability) * factor[np.maximum(label, 0), np.minimum(band, bands - 1)], _EPSILON, 1.0)
        error = np.minimum(error, 1.0 - _EPSILON)
        usable = (alternative >= 0) & (alternative != label[:, None])
        total = (alternative_p * usable).sum(axis=1)

        # Species answers: slot 0 the answer; then the likeliest other outcomes, by weight
        chunk = max(1, 2_000_000 // (species_count + 1))
        for start in range(0, count, chunk):
            part = slice(start, min(start + chunk, count))
            rows_here = np.flatnonzero(answered[part]) + start
            if not len(rows_here):
                continue
            weights = confusion[label[rows_here]].copy()
            weights[:, species_count] += ALTERNATIVES_WEIGHT * PRIOR_BLANK
            (r, c) = np.nonzero(usable[rows_here])
            shares = alternative_p[rows_here][r, c] / np.maximum(total[rows_here][r], _EPSILON)
            np.add.at(weights, (r, alternative[rows_here][r, c]), ALTERNATIVES_WEIGHT * shares)
            weights[np.arange(len(rows_here)), label[rows_here]] = 0.0
            mass = weights.sum(axis=1)
            weights[:, species_count] = 0.0  # blank records nothing: it stays in the mass, not in a slot
            top = np.argsort(-weights, axis=1, kind="stable")[:, : MAX_OUTCOMES - 1]
            top_weight = np.take_along_axis(weights, top, axis=1)
            slots[rows_here, 0] = label[rows_here]
            chances[rows_here, 0] = 1.0 - error[rows_here]
            kept = top_weight > 0
            width = 1 + top.shape[1]  # fewer species than slots: the rest stay empty
            slots[rows_here, 1:width] = np.where(kept, top, -1)
            chances[rows_here, 1:width] = np.where(kept, error[rows_here, None] * top_weight / mass[:, None], 0.0)

        # Abstentions: their top-k, less the blank share
        abstaining = np.flatnonzero(~answered)
        if len(abstaining):
            alt = alternative[abstaining][:, :MAX_OUTCOMES]
            alt_p = np.where(alt >= 0, alternative_p[abstaining][:, :MAX_OUTCOMES], 0.0)
            alt_total = alt_p.sum(axis=1, keepdims=True)
            share = np.minimum(alt_total, 1.0) / np.maximum(alt_total, _EPSILON)
            slots[abstaining, : alt.shape[1]] = alt
            chances[abstaining, : alt.shape[1]] = (1.0 - model.abstention_blank) * alt_p * share
        return (slots, chances)

    def _unit_outcomes(self, unit: PlanUnit) -> tuple[list[frozenset[int]], list[float]]:
        """The sets of species a unit of several answers (boxes) may truly show, with their chances: every answer
        right, or one answer wrong in each of its ways (the rest renormalised)."""
        per_item = [self._model.outcomes(item) for item in unit.items]
        if not per_item:
            return ([frozenset()], [1.0])

        def species_of(name: str) -> frozenset[int]:
            index = self.species.get(name, -1)
            return frozenset() if index < 0 else frozenset({index})

        if len(per_item) == 1:
            return ([species_of(name) for (name, _) in per_item[0]], [p for (_, p) in per_item[0]])
        firsts = [outcomes[0] for outcomes in per_item]
        base = [species_of(name) for (name, _) in firsts]
        all_right = math.prod(p for (_, p) in firsts)
        (sets, chances) = ([frozenset().union(*base)], [all_right])
        for position, outcomes in enumerate(per_item):
            (_, right) = firsts[position]
            for name, p in outcomes[1:]:
                changed = list(base)
                changed[position] = species_of(name)
                sets.append(frozenset().union(*changed))
                chances.append(all_right / max(right, _EPSILON) * p)
        total = sum(chances) or 1.0
        return (sets, [chance / total for chance in chances])

    # -----------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _terms(
        log_none: npt.NDArray[np.float64], certain: npt.NDArray[np.int64], claims: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        """The chance each (camera, species) record is wrong: claimed and absent, or present and not claimed."""
        none = np.where(certain > 0, 0.0, np.exp(log_none))
        return np.where(claims > 0, none, 1.0 - none)

    def expected_wrong(self) -> dict[str, float]:
        """Per species, the expected number of wrong records (cameras) left."""
        terms = self._terms(self._log_none, self._certain, self._claims)
        per_species = terms.sum(axis=0)
        return {name: float(per_species[index]) for (name, index) in self.species.items()}

    def gains(self) -> npt.NDArray[np.float64]:
        """Per unit, the expected drop in wrong records per review if a person reviewed it now (0: reviewed).

        Two views, the larger counts: what reviewing this one unit changes (one step ahead), and, for a unit that
        claims a doubtful record, the record's chance to be wrong over the reviews expected to settle it (its
        claimants are looked at likeliest-true first; the first true one settles it, else all must be seen).
        Without the second, a false record claimed by several units would never be worth one review.
        """
        gains = np.zeros(len(self.units))
        gains[self._single[self._rows]] = self._single_gains()
        for unit_index in self._multi_outcomes:
            gains[unit_index] = self._multi_gain(unit_index)
        return np.maximum(gains, self._record_rates())

    def _single_gains(self) -> npt.NDArray[np.float64]:
        (slot, chance) = (self._slot, self._slot_p)
        if not len(slot):
            return np.zeros(0)
        camera = self._unit_camera[self._single[self._rows]][:, None]
        valid = slot >= 0
        index = np.where(valid, slot, 0)
        log_none = self._log_none[camera, index]
        certain = self._certain[camera, index]
        claims = self._claims[camera, index]
        claimed = np.zeros_like(claims)
        claimed[:, 0] = self._label[self._rows] >= 0
        before = self._terms(log_none, certain, claims)
        # The unit's factor leaves the products; it records what it truly shows (nothing, if blank or other)
        log_rest = log_none - np.log(np.maximum(1.0 - chance, _EPSILON))
        removed = self._terms(log_rest, certain, claims - claimed)
        shown = self._terms(log_rest, certain + 1, claims - claimed + 1)
        change = ((removed - before) * valid).sum(axis=1) + (chance * (shown - removed) * valid).sum(axis=1)
        return -change

    def _multi_gain(self, unit_index: int) -> float:
        (sets, chances, marginal, claims) = self._multi_outcomes[unit_index]
        camera = self._unit_camera[unit_index]
        members = sorted(set(marginal) | set(claims))
        if not members:
            return 0.0
        index = np.array(members)
        log_none = self._log_none[camera, index]
        certain = self._certain[camera, index]
        claims_now = self._claims[camera, index]
        before = self._terms(log_none, certain, claims_now)
        unit_p = np.array([marginal.get(i, 0.0) for i in members])
        claimed = np.array([i in claims for i in members], dtype=np.int64)
        shows = np.array([[i in outcome for i in members] for outcome in sets], dtype=np.int64)
        log_rest = log_none - np.log(np.maximum(1.0 - unit_p, _EPSILON))
        after = self._terms(log_rest[None, :], certain[None, :] + shows, claims_now[None, :] - claimed + shows)
        return float(-(np.array(chances) * (after - before[None, :]).sum(axis=1)).sum())

    def _record_rates(self) -> npt.NDArray[np.float64]:
        """Per unit, the best settling rate (wrong records per review) of the doubtful records it claims."""
        rates = np.zeros(len(self.units))
        (units, keys, chances) = ([], [], [])
        species_count = max(len(self.species), 1)
        rows = self._rows
        claiming = self._label[rows] >= 0
        if claiming.any():
            units.append(self._single[rows][claiming])
            keys.append(self._unit_camera[self._single[rows][claiming]] * species_count + self._label[rows][claiming])
            chances.append(self._slot_p[claiming, 0])
        for unit_index, (_, _, marginal, claims) in self._multi_outcomes.items():
            for index in claims:
                units.append(np.array([unit_index]))
                keys.append(np.array([self._unit_camera[unit_index] * species_count + index]))
                chances.append(np.array([marginal.get(index, 0.0)]))
        if not units:
            return rates
        unit_of = np.concatenate(units)
        key = np.concatenate(keys)
        chance = np.clip(np.concatenate(chances), 0.0, 1.0 - _EPSILON)
        order = np.lexsort((-chance, key))
        (unit_of, key, chance) = (unit_of[order], key[order], chance[order])
        logs = np.log1p(-chance)
        cumulative = np.cumsum(logs)
        first = np.r_[True, key[1:] != key[:-1]]
        group = np.cumsum(first) - 1
        group_start = np.flatnonzero(first)
        before_start = np.where(group_start > 0, cumulative[np.maximum(group_start - 1, 0)], 0.0)
        # P(every earlier claimant of the record was wrong): the chance this review is still needed
        still_needed = np.exp(cumulative - logs - before_start[group])
        cost = np.bincount(group, weights=still_needed)
        (camera, species) = np.divmod(key[group_start], species_count)
        wrong = self._terms(
            self._log_none[camera, species], self._certain[camera, species], self._claims[camera, species]
        )
        rate = wrong / np.maximum(cost, _EPSILON)
        np.maximum.at(rates, unit_of, rate[group])
        return rates


def _single_outcome(item: Item, truth: Truth) -> str:
    """The true outcome of a unit's only answer, from the species a person said the unit shows."""
    if item.label is not None and item.label in truth.species:
        return item.label
    if truth.species:
        return sorted(truth.species)[0]
    return truth.outcomes[0] if truth.outcomes else BLANK_OUTCOME


# ---------------------------------------------------------------------------------------------------------------------
# Orders
# ---------------------------------------------------------------------------------------------------------------------


def order_units(
    units: Sequence[PlanUnit], order: str, truths: Mapping[str, Truth], *, seed: int = 0, planner: Planner | None = None
) -> list[int]:
    """The indices of the units not yet reviewed, in the order a person should see them."""
    pending = [i for (i, unit) in enumerate(units) if unit.unit_id not in truths]
    if order == "least-sure":
        return sorted(pending, key=lambda i: (units[i].sureness, i))
    if order == "species":
        return sorted(pending, key=lambda i: (units[i].label.lower(), units[i].camera, units[i].start, i))
    if order == "random":
        rank = np.random.default_rng(seed).permutation(len(units))
        return sorted(pending, key=lambda i: rank[i])
    if order != "plan":
        raise ValueError(f"unknown order '{order}'; one of {', '.join(ORDERS)}")
    planner = planner or Planner(units)
    planner.prepare(truths)
    gains = planner.gains()
    return sorted(pending, key=lambda i: (-round(float(gains[i]), 9), units[i].sureness, i))

"""Taxonomic fallback: when the species is unclear, answer with the genus, family or order that is clear.

A taxonomy is a CSV file with the columns ``species, genus, family, order`` (a header row, one row per species,
species named as the model's classes). For a photo whose top species is under its threshold, the probabilities
are summed within each genus, then each family, then each order; the answer is the most specific rank whose
largest sum reaches the same threshold (:func:`fallback`). Where that step sits in the whole decision:
:mod:`birder.inference.decision`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError

RANKS = ("species", "genus", "family", "order")
HIGHER_RANKS = RANKS[1:]
# The label of a photo no rank answers, and its rank (empty)
UNCERTAIN = "uncertain"
NO_RANK = ""
# How many names an error message lists before it summarises
_SHOWN = 5


class TaxonomyError(BirderError):
    """A taxonomy file that cannot be used with the model (unreadable, malformed, species missing or repeated)."""


def _listing(names: Sequence[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


@dataclass(frozen=True)
class RankGroups:
    """One rank over a list of species: the group names and, per species, the index of its group."""

    names: list[str]
    of_species: npt.NDArray[np.int64]  # [species]

    @cached_property
    def _membership(self) -> npt.NDArray[np.float64]:
        membership = np.zeros((len(self.of_species), len(self.names)), dtype=np.float64)
        membership[np.arange(len(self.of_species)), self.of_species] = 1.0
        return membership

    def sums(self, probabilities: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """``[B, species]`` -> ``[B, groups]``: the probability of each group."""
        return probabilities.astype(np.float64) @ self._membership


@dataclass(frozen=True)
class Taxonomy:
    """The genus, family and order of each species (``lineage[species] = (genus, family, order)``)."""

    lineage: dict[str, tuple[str, str, str]]
    source: str = "taxonomy"

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> Taxonomy:
        """Read ``species, genus, family, order`` rows; a repeated species or an empty cell is one-line error."""
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.reader(handle))
        except FileNotFoundError:
            raise TaxonomyError(f"taxonomy file '{path}' does not exist") from None
        except (OSError, UnicodeDecodeError, csv.Error) as err:  # csv.Error: a field over csv's size limit
            raise TaxonomyError(f"cannot read taxonomy file '{path}': {' '.join(str(err).split())}") from None

        header = [cell.strip().lower() for cell in rows[0]] if rows else []
        if header[:4] != list(RANKS):
            raise TaxonomyError(f"{path}: the first row must be the header 'species,genus,family,order'")

        lineage: dict[str, tuple[str, str, str]] = {}
        repeated: list[str] = []
        for line_number, row in enumerate(rows[1:], start=2):
            cells = [cell.strip() for cell in row[:4]]
            if not any(cells):
                continue
            if len(cells) < 4 or not all(cells):
                raise TaxonomyError(f"{path}:{line_number}: expected species,genus,family,order, got {','.join(row)!r}")
            if cells[0] in lineage:
                repeated.append(cells[0])
            lineage[cells[0]] = (cells[1], cells[2], cells[3])

        if repeated:
            raise TaxonomyError(f"{path}: species listed more than once: {_listing(repeated)} (one row per species)")
        if not lineage:
            raise TaxonomyError(f"{path}: no species rows after the header")
        return cls(lineage, str(path))

    def check_covers(self, class_names: Sequence[str]) -> None:
        missing = [name for name in class_names if name not in self.lineage]
        if missing:
            raise TaxonomyError(
                f"{self.source}: {len(missing)} of the model's species are missing: {_listing(missing)} "
                "(add a row for each)"
            )

    def groups(self, class_names: Sequence[str]) -> dict[str, RankGroups]:
        """Per higher rank, the groups of ``class_names`` (every name must be in the taxonomy)."""
        self.check_covers(class_names)
        result = {}
        for position, rank in enumerate(HIGHER_RANKS):
            names: list[str] = []
            index: dict[str, int] = {}
            of_species = []
            for species in class_names:
                group = self.lineage[species][position]
                if group not in index:
                    index[group] = len(names)
                    names.append(group)
                of_species.append(index[group])
            result[rank] = RankGroups(names, np.array(of_species, dtype=np.int64))
        return result

    def ancestors(self, species: str) -> Mapping[str, str]:
        """``{rank: name}`` of a species, itself included."""
        return dict(zip(RANKS, (species, *self.lineage[species]), strict=True))


@dataclass(frozen=True)
class Answers:
    """One answer per photo: the label, its rank (empty for ``uncertain``) and the label's probability."""

    labels: list[str]
    ranks: list[str]
    probabilities: npt.NDArray[np.float64]  # NaN where no rank answers


def fallback(
    probabilities: npt.NDArray[np.floating],
    thresholds: npt.NDArray[np.floating],
    class_names: Sequence[str],
    groups: Mapping[str, RankGroups] | None,
) -> Answers:
    """The most specific answer whose probability reaches each photo's threshold.

    ``probabilities``: ``[B, species]``; ``thresholds``: ``[B]``. The top species answers when its probability
    reaches the threshold; otherwise the largest genus sum, then family, then order (with ``groups``, from
    :meth:`Taxonomy.groups`); otherwise the photo is ``uncertain``. Ties go to the first group in class order.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    top = probabilities.argmax(axis=1)
    labels = [class_names[index] for index in top]
    ranks = ["species"] * len(top)
    answer_probabilities = probabilities[np.arange(len(top)), top]
    pending = answer_probabilities < thresholds

    for rank in HIGHER_RANKS if groups else ():
        if not pending.any():
            break
        sums = groups[rank].sums(probabilities[pending])
        best = sums.argmax(axis=1)
        best_sums = sums[np.arange(len(best)), best]
        for row, group, total in zip(np.flatnonzero(pending), best, best_sums, strict=True):
            if total >= thresholds[row]:
                (labels[row], ranks[row], answer_probabilities[row]) = (groups[rank].names[group], rank, total)
                pending[row] = False

    for row in np.flatnonzero(pending):
        (labels[row], ranks[row], answer_probabilities[row]) = (UNCERTAIN, NO_RANK, np.nan)
    return Answers(labels, ranks, answer_probabilities)


# ---------------------------------------------------------------------------------------------------------------------
# Scoring answers against true species (birder-eval --taxonomy)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoverageRow:
    """The answers at one threshold: precision of the emitted labels and the share of photos at each rank."""

    threshold: float
    precision: float  # correct emitted labels / emitted labels (NaN when nothing is emitted)
    answered: float  # share of photos with a label (any rank)
    shares: dict[str, float]  # rank -> share of photos answered at that rank


def coverage_table(
    probabilities: npt.NDArray[np.floating],
    targets: npt.NDArray[np.integer],
    class_names: Sequence[str],
    taxonomy: Taxonomy,
    thresholds: Sequence[float],
) -> list[CoverageRow]:
    """For each threshold (the same for every species), how precise the emitted labels are and at which ranks.

    A label is correct when it names the true species or one of its genus, family or order.
    """
    groups = taxonomy.groups(class_names)
    truth = [taxonomy.ancestors(class_names[target]) for target in targets]
    count = max(len(truth), 1)
    rows = []
    for threshold in thresholds:
        answers = fallback(probabilities, np.full(len(truth), threshold), class_names, groups)
        emitted = [i for (i, rank) in enumerate(answers.ranks) if rank]
        correct = sum(answers.labels[i] == truth[i][answers.ranks[i]] for i in emitted)
        shares = {rank: sum(r == rank for r in answers.ranks) / count for rank in RANKS}
        rows.append(
            CoverageRow(
                float(threshold), correct / len(emitted) if emitted else float("nan"), len(emitted) / count, shares
            )
        )
    return rows

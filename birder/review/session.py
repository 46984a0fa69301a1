"""A review of one results folder: its units, its decisions, the order, what a screen shows. The web app
(:mod:`birder.review.app`) is a thin layer over :class:`ReviewSession`; tests and the benchmark drive it directly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from birder.errors import BirderError
from birder.review.folder import BLANK, UNKNOWN, ReviewFolder, ReviewUnit, is_species_label, read_review_folder
from birder.review.plan import BLANK_OUTCOME, ORDERS, OTHER_OUTCOME, Item, Planner, PlanUnit, Truth, order_units
from birder.review.store import REVIEWS_FILE, Label, ReviewStore, Submission, clean_text

# Another tab is not shown a unit someone was just shown, for this long (unless nothing else is left)
LEASE_SECONDS = 120.0
SEARCH_RESULTS = 12
DEFAULT_REVIEWER = "reviewer"


@dataclass(frozen=True)
class Names:
    """What a person can answer with, and the rank of each name: the model's classes (species), the taxonomy's
    species, genera, families and orders; ``blank`` and ``unknown``."""

    species: frozenset[str]
    ranks: Mapping[str, str]  # name -> species, genus, family or order

    @classmethod
    def build(cls, class_names: Iterable[str], taxonomy: str | os.PathLike | None = None) -> Names:
        ranks: dict[str, str] = {}
        if taxonomy is not None:
            from birder.inference.taxonomy import Taxonomy

            for species, (genus, family, order) in Taxonomy.from_csv(taxonomy).lineage.items():
                ranks.setdefault(order, "order")
                ranks.setdefault(family, "family")
                ranks.setdefault(genus, "genus")
                ranks[species] = "species"
        for name in class_names:
            ranks[name] = "species"
        return cls(frozenset(name for (name, rank) in ranks.items() if rank == "species"), ranks)

    def rank(self, label: str) -> str:
        """``species`` for a species (or a name no list knows: a person typed a species the model lacks), else
        ``genus`` ... ``order``, ``blank`` or ``unknown``."""
        if label == BLANK:
            return BLANK
        if label == UNKNOWN:
            return UNKNOWN
        return self.ranks.get(label, "species")

    def outcome(self, label: str) -> str:
        """A decision's label as the error model counts it: a species, ``blank`` or ``other``."""
        rank = self.rank(label)
        if rank == "species":
            return label
        return BLANK_OUTCOME if rank == BLANK else OTHER_OUTCOME

    def search(self, query: str, limit: int = SEARCH_RESULTS) -> list[dict[str, str]]:
        """Names containing every word of ``query`` (case-insensitive), those starting with it first."""
        words = query.lower().split()
        if not words:
            return []
        found = [name for name in self.ranks if all(word in name.lower() for word in words)]
        query_text = " ".join(words)
        found.sort(key=lambda name: (not name.lower().startswith(query_text), _rank_order(self.ranks[name]), name))
        return [{"name": name, "rank": self.ranks[name]} for name in found[:limit]]


def _rank_order(rank: str) -> int:
    return ("species", "genus", "family", "order").index(rank) if rank in ("species", "genus", "family", "order") else 4


@dataclass
class _Lease:
    client: str
    until: float


@dataclass
class ReviewSession:
    """The units of a folder, the decisions in its ``reviews.csv`` and the order to show the rest in."""

    folder: ReviewFolder
    store: ReviewStore
    names: Names
    order: str = "plan"
    seed: int = 0
    _plan_units: list[PlanUnit] = field(default_factory=list)
    _planner: Planner | None = None
    _order_cache: tuple[Any, list[int]] | None = None
    _leases: dict[str, _Lease] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _unit_index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise BirderError(f"unknown order '{self.order}'; choose one of: {', '.join(ORDERS)}")
        self._plan_units = [self._plan_unit(unit) for unit in self.folder.units]
        self._planner = Planner(self._plan_units)
        self._unit_index = {unit.unit_id: index for (index, unit) in enumerate(self.folder.units)}

    @classmethod
    def open(
        cls,
        results_dir: str | os.PathLike,
        *,
        order: str = "plan",
        seed: int = 0,
        taxonomy: str | os.PathLike | None = None,
        reviews: str | os.PathLike | None = None,
    ) -> ReviewSession:
        folder = read_review_folder(results_dir)
        if not folder.units:
            raise BirderError(f"'{results_dir}' holds no classified photos to review")
        store = ReviewStore(Path(reviews) if reviews is not None else Path(results_dir) / REVIEWS_FILE, folder.model)
        return cls(folder, store, Names.build(folder.class_names, taxonomy), order, seed)

    def _plan_unit(self, unit: ReviewUnit) -> PlanUnit:
        answers = [box.answer for box in unit.boxes] if unit.boxes else [unit.answer]
        items = tuple(
            Item(answer.label if is_species_label(answer) else None, answer.sureness, answer.top) for answer in answers
        )
        if not unit.boxes and unit.answer.label == BLANK:
            items = ()  # the detector found nothing: no answer to check, only a chance of a missed animal
        return PlanUnit(unit.unit_id, unit.camera, items, unit.sureness, unit.answer.label, unit.start)

    # -----------------------------------------------------------------------------------------------------------------
    # Decisions
    # -----------------------------------------------------------------------------------------------------------------

    def current(self) -> dict[str, Submission]:
        """Per unit, the decision that counts (latest not undone, of any reviewer)."""
        return self.store.refresh().current()

    def truths(self, current: Mapping[str, Submission] | None = None) -> dict[str, Truth]:
        """The decisions as the planner reads them."""
        current = self.current() if current is None else current
        truths = {}
        for unit_id, submission in current.items():
            index = self._unit_index.get(unit_id)
            if index is not None:
                truths[unit_id] = self._truth(self.folder.units[index], submission)
        return truths

    def _truth(self, unit: ReviewUnit, submission: Submission) -> Truth:
        whole = submission.whole
        by_box = {label.box: label.label for label in submission.labels if label.box}
        if unit.boxes:
            outcomes = tuple(
                self.names.outcome(by_box.get(box.key, whole.label if whole is not None else box.answer.label))
                for box in unit.boxes
            )
        else:
            outcomes = (self.names.outcome(whole.label),) if whole is not None else ()
        labels = [label.label for label in submission.labels]
        species = frozenset(label for label in labels if self.names.rank(label) == "species")
        return Truth(outcomes, species)

    def decide(
        self,
        unit_id: str,
        reviewer: str,
        labels: Sequence[Mapping[str, Any]],
        *,
        count: int | None = None,
        comment: str = "",
        seconds: float | None = None,
        decision_id: str | None = None,
    ) -> Submission:
        """Record a decision on a unit: ``labels`` of ``{"label": ...}`` for the whole unit, or one
        ``{"box": "<photo>:<box>", "label": ...}`` per box corrected (a box not named keeps the whole-unit label,
        else the machine's answer: it is written out, so the file says what every box is)."""
        unit = self._unit(unit_id)
        reviewer = clean_text(reviewer) or DEFAULT_REVIEWER
        if count is not None and not 0 <= int(count) <= 100_000:
            raise BirderError(f"a count of individuals must be between 0 and 100000, got {count}")
        whole = next((clean_text(entry.get("label")) for entry in labels if not entry.get("box")), "")
        boxes = {str(entry["box"]): clean_text(entry.get("label")) for entry in labels if entry.get("box")}
        unknown_boxes = sorted(set(boxes) - {box.key for box in unit.boxes})
        if unknown_boxes:
            raise BirderError(f"unit '{unit_id}' has no box {unknown_boxes[0]}")
        rows: list[Label] = []
        if unit.boxes:  # every box's label written out: the file says what each box is
            for box in unit.boxes:
                label = boxes.get(box.key) or whole or box.answer.label
                individuals = 0 if self.names.rank(label) == BLANK else 1
                rows.append(Label(label, box.key, individuals, box.answer.label, box.answer.probability))
            if count is not None:  # a count given for the photo overrides one per box
                rows.append(Label(whole or _dominant(rows), "", int(count), unit.answer.label, unit.answer.probability))
        else:
            if not whole:
                raise BirderError("a decision needs a label (a species, blank or unknown)")
            individuals = 0 if self.names.rank(whole) == BLANK else count
            rows.append(Label(whole, "", individuals, unit.answer.label, unit.answer.probability))
        with self._lock:
            submission = self.store.decide(
                unit=unit.unit_id,
                kind=unit.kind,
                reviewer=reviewer,
                labels=rows,
                comment=comment,
                seconds=seconds,
                decision_id=decision_id,
            )
            self._leases.pop(unit.unit_id, None)
            return submission

    def undo(self, reviewer: str, undo_id: str | None = None) -> ReviewUnit | None:
        """Take back the reviewer's latest decision; returns its unit (to show again), None when nothing is left."""
        with self._lock:
            submission = self.store.undo(clean_text(reviewer) or DEFAULT_REVIEWER, undo_id)
        if submission is None:
            return None
        return self.folder.unit(submission.unit)

    def _unit(self, unit_id: str) -> ReviewUnit:
        unit = self.folder.unit(unit_id)
        if unit is None:
            raise BirderError(f"no unit '{unit_id}' in this results folder")
        return unit

    # -----------------------------------------------------------------------------------------------------------------
    # Order
    # -----------------------------------------------------------------------------------------------------------------

    def pending_order(self) -> list[int]:
        """The indices of the units not yet decided, in this session's order (re-planned after each decision)."""
        with self._lock:
            current = self.current()
            key = tuple(sorted((unit, submission.decision_id) for (unit, submission) in current.items()))
            if self._order_cache is not None and self._order_cache[0] == key:
                return self._order_cache[1]
            order = order_units(
                self._plan_units, self.order, self.truths(current), seed=self.seed, planner=self._planner
            )
            self._order_cache = (key, order)
            return order

    def next_unit(self, client: str = "", skipped: Iterable[str] = ()) -> ReviewUnit | None:
        """The next unit to show ``client`` (a browser tab): the first in order not decided, not skipped by it and
        not just shown to another tab; None when every unit is decided."""
        skipped = set(skipped)
        now = time.monotonic()
        with self._lock:
            order = self.pending_order()
            candidates = [self.folder.units[index] for index in order]
            fresh = [unit for unit in candidates if unit.unit_id not in skipped] or candidates
            for unit in fresh:
                lease = self._leases.get(unit.unit_id)
                if lease is None or lease.client == client or lease.until < now:
                    self._leases[unit.unit_id] = _Lease(client, now + LEASE_SECONDS)
                    return unit
            return fresh[0] if fresh else None

    def expected_wrong(self) -> dict[str, float]:
        """Per species, the expected wrong species-per-camera records left (the plan's model)."""
        with self._lock:
            assert self._planner is not None
            self._planner.prepare(self.truths())
            return self._planner.expected_wrong()

    # -----------------------------------------------------------------------------------------------------------------
    # What the page shows
    # -----------------------------------------------------------------------------------------------------------------

    def unit_index(self, unit_id: str) -> int:
        return self._unit_index[unit_id]

    def view(self, unit: ReviewUnit, reviewer: str = "") -> dict[str, Any]:
        """A unit as the page shows it (JSON)."""
        index = self._unit_index[unit.unit_id]
        mine = self.store.refresh().current_by_reviewer().get((unit.unit_id, clean_text(reviewer)))
        latest = self.store.state.current().get(unit.unit_id)
        return {
            "index": index,
            "id": unit.unit_id,
            "kind": unit.kind,
            "camera": unit.camera,
            "start": unit.start,
            "photos": [
                {
                    "number": number,
                    "path": photo.path,
                    "name": os.path.basename(photo.path),
                    "missing": photo.missing,
                    "taken": photo.taken,
                    "size": list(photo.size or _photo_size(photo.file, photo.missing) or ()) or None,
                }
                for (number, photo) in enumerate(unit.photos)
            ],
            "answer": unit.answer.as_dict(),
            "boxes": [
                {
                    "key": box.key,
                    "photo": box.photo,
                    "xyxy": list(box.xyxy),
                    "det_score": box.det_score,
                    "answer": box.answer.as_dict(),
                }
                for box in unit.boxes
            ],
            "decision": _submission_view(mine),
            "latest": _submission_view(latest),
        }

    def progress(self) -> dict[str, Any]:
        current = self.current()
        decided = sum(1 for unit in self.folder.units if unit.unit_id in current)
        return {"decided": decided, "total": len(self.folder.units)}


def _dominant(rows: Sequence[Label]) -> str:
    labels = [row.label for row in rows if row.label != BLANK]
    return max(set(labels), key=labels.count) if labels else BLANK


def _submission_view(submission: Submission | None) -> dict[str, Any] | None:
    if submission is None:
        return None
    return {
        "decision_id": submission.decision_id,
        "reviewer": submission.reviewer,
        "time": submission.time,
        "labels": [{"box": label.box, "label": label.label, "count": label.count} for label in submission.labels],
        "comment": submission.comment,
    }


def _photo_size(file: Path, missing: bool) -> tuple[int, int] | None:
    """A photo's (width, height) as shown (EXIF rotation applied), from its header only."""
    if missing:
        return None
    try:
        from PIL import Image

        with Image.open(file) as image:
            (width, height) = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception:
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)

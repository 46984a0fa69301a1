"""The decisions of a review: ``reviews.csv`` in the results folder, appended, never rewritten.

Every decision is one *submission*: a ``decide`` row for the whole unit (``box`` empty), or one row per box of a
photo (``box`` = ``<photo>:<box>``), all with the same ``decision_id``. ``Z`` (undo) appends an ``undo`` row naming
the submission it takes back. Nothing is ever deleted: the file is the history.

What counts (:meth:`ReviewStore.current`): per unit and reviewer, the latest submission not undone (in file
order: last write wins); the unit's answer is the latest such submission of any reviewer. A submission whose
``decision_id`` is already in the file (a request retried after a lost answer, a second click) is not written
again, so two tabs or two reviewers never duplicate a decision and never lose one.

The file is written through :class:`birder.io.journal.AppendOnlyTable`: one locked write and an ``fsync`` per
submission, so a kill at any moment loses at most the submission being written, and a line cut in the middle is
set aside in ``reviews.csv.torn`` (said in one line) instead of breaking the rows after it. Several processes
(``birder-review`` started twice on one folder) share the file: each reads what the others appended.

Every row records the model whose answers were reviewed; a file made on another model's results (the folder was
predicted again) is refused in one line rather than mixing the two models' agreement and error rates.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from birder.errors import BirderError
from birder.io.journal import AppendOnlyTable

REVIEWS_FILE = "reviews.csv"
COLUMNS = (
    "decision_id",
    "time",  # UTC, ISO 8601
    "reviewer",
    "model",  # the model whose answers were reviewed
    "unit",  # the event id, or the photo's path
    "kind",  # event or photo
    "box",  # empty: the whole unit; else <photo>:<box>
    "action",  # decide or undo
    "label",  # a species, a genus or family, "blank" (no animal) or "unknown" (an animal of no listed kind)
    "count",  # individuals (empty: not counted)
    "comment",
    "machine_label",  # what the machine answered, for agreement and error rates
    "machine_probability",
    "seconds",  # time the screen was shown before the decision
    "undoes",  # (undo rows) the decision_id taken back
)
DECIDE = "decide"
UNDO = "undo"
_LONGEST_TEXT = 2000  # a comment or label longer than this is cut (one CSV line stays one line)


@dataclass(frozen=True)
class Label:
    """One row of a submission: a label for the whole unit (``box`` empty) or for one box."""

    label: str
    box: str = ""
    count: int | None = None
    machine_label: str = ""
    machine_probability: float | None = None


@dataclass
class Submission:
    decision_id: str
    time: str
    reviewer: str
    unit: str
    kind: str
    labels: list[Label]
    comment: str = ""
    seconds: float | None = None
    sequence: int = 0  # its place in the file
    undone: bool = False

    @property
    def whole(self) -> Label | None:
        """The label of the whole unit, when the submission gives one."""
        return next((label for label in self.labels if not label.box), None)

    @property
    def count(self) -> int | None:
        """Individuals: the whole unit's count when given, else the sum over its boxes."""
        whole = self.whole
        if whole is not None and whole.count is not None:
            return whole.count
        counts = [label.count for label in self.labels if label.box and label.count is not None]
        return sum(counts) if counts else None


def clean_text(text: str | None) -> str:
    """One line of at most :data:`_LONGEST_TEXT` characters (a row of the file is always one line)."""
    return " ".join(str(text or "").split())[:_LONGEST_TEXT]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _float(text: str) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _int(text: str) -> int | None:
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


@dataclass
class ReviewState:
    """Everything the file says, in file order."""

    submissions: dict[str, Submission] = field(default_factory=dict)  # decision_id -> submission
    order: list[str] = field(default_factory=list)  # decision ids in file order
    undo_ids: set[str] = field(default_factory=set)  # the ids of the undo rows

    def current(self) -> dict[str, Submission]:
        """Per unit, the submission that counts: the latest not undone, of any reviewer."""
        latest: dict[str, Submission] = {}
        for decision_id in self.order:
            submission = self.submissions[decision_id]
            if not submission.undone:
                latest[submission.unit] = submission
        return latest

    def current_by_reviewer(self) -> dict[tuple[str, str], Submission]:
        """Per (unit, reviewer), the latest submission not undone."""
        latest: dict[tuple[str, str], Submission] = {}
        for decision_id in self.order:
            submission = self.submissions[decision_id]
            if not submission.undone:
                latest[(submission.unit, submission.reviewer)] = submission
        return latest

    def last_of(self, reviewer: str) -> Submission | None:
        """The reviewer's latest submission not undone (what Z takes back)."""
        for decision_id in reversed(self.order):
            submission = self.submissions[decision_id]
            if submission.reviewer == reviewer and not submission.undone:
                return submission
        return None


class ReviewStore:
    """``reviews.csv`` of one results folder for one model (see the module's docstring). Thread-safe.

    ``writable=False`` reads an existing file without touching it (exports, statistics, calibration): a torn last
    line is then skipped, not set aside.
    """

    def __init__(self, path: str | Path, model: str, *, writable: bool = True) -> None:
        self.path = Path(path)
        self.model = model
        self.table = AppendOnlyTable(self.path, COLUMNS)
        self.state = ReviewState()
        self.notes: list[str] = []  # one line per repair or skipped row, for the command to show
        self.writable = writable
        self._lock = threading.Lock()  # reading
        self._write_lock = threading.RLock()  # a check that an id is new, and its write, as one step
        if writable:
            self.notes += self.table.open()
        else:
            self.table.check_header()
        self.refresh()

    def refresh(self) -> ReviewState:
        """Read what was appended since (by this process or another)."""
        with self._lock:
            (rows, malformed) = self.table.read_new()
            if malformed:
                self.notes.append(f"{self.path}: {malformed} line(s) with the wrong number of cells were skipped")
            for row in rows:
                self._apply(dict(zip(COLUMNS, row, strict=True)))
            return self.state

    def _apply(self, row: dict[str, str]) -> None:
        if row["model"] and row["model"] != self.model:
            raise BirderError(
                f"{self.path} holds decisions on the answers of model '{row['model']}', but this results folder "
                f"is now from '{self.model}' (predicted again?): move {self.path.name} away to review the new "
                "answers, or give --reviews another file"
            )
        decision_id = row["decision_id"]
        if row["action"] == UNDO:
            self.state.undo_ids.add(decision_id)
            target = self.state.submissions.get(row["undoes"])
            if target is not None:
                target.undone = True
            return
        if row["action"] != DECIDE:
            return
        label = Label(
            row["label"], row["box"], _int(row["count"]), row["machine_label"], _float(row["machine_probability"])
        )
        existing = self.state.submissions.get(decision_id)
        if existing is not None and existing.unit == row["unit"]:
            if all(known.box != label.box for known in existing.labels):
                existing.labels.append(label)  # the next box of the same submission
            return
        submission = Submission(
            decision_id,
            row["time"],
            row["reviewer"],
            row["unit"],
            row["kind"],
            [label],
            row["comment"],
            _float(row["seconds"]),
            sequence=len(self.state.order),
        )
        self.state.submissions[decision_id] = submission
        self.state.order.append(decision_id)

    # -----------------------------------------------------------------------------------------------------------------

    def decide(
        self,
        *,
        unit: str,
        kind: str,
        reviewer: str,
        labels: Sequence[Label],
        comment: str = "",
        seconds: float | None = None,
        decision_id: str | None = None,
    ) -> Submission:
        """Append a submission (nothing when ``decision_id`` is already in the file); returns it."""
        if not labels:
            raise BirderError("a decision needs a label (for the unit, or for each box)")
        decision_id = decision_id or uuid.uuid4().hex
        with self._write_lock:
            self.refresh()
            known = self.state.submissions.get(decision_id)
            if known is not None:
                return known
            self._append(self._rows(decision_id, unit, kind, reviewer, labels, comment, seconds))
            return self.state.submissions[decision_id]

    def _rows(
        self,
        decision_id: str,
        unit: str,
        kind: str,
        reviewer: str,
        labels: Sequence[Label],
        comment: str,
        seconds: float | None,
    ) -> list[list[str]]:
        time = _now()
        rows = []
        for label in labels:
            if not clean_text(label.label):
                raise BirderError("a decision's label is empty")
            rows.append(
                [
                    decision_id,
                    time,
                    clean_text(reviewer),
                    self.model,
                    unit,
                    kind,
                    label.box,
                    DECIDE,
                    clean_text(label.label),
                    "" if label.count is None else str(int(label.count)),
                    clean_text(comment),
                    label.machine_label,
                    "" if label.machine_probability is None else f"{label.machine_probability:.6f}",
                    "" if seconds is None else f"{seconds:.2f}",
                    "",
                ]
            )
        return rows

    def undo(self, reviewer: str, undo_id: str | None = None) -> Submission | None:
        """Take back the reviewer's latest decision not yet undone; returns it (None: nothing to undo).

        ``undo_id`` names the undo itself: the same undo sent twice takes back one decision, not two.
        """
        with self._write_lock:
            self.refresh()
            undo_id = undo_id or uuid.uuid4().hex
            if undo_id in self.state.undo_ids:
                return None
            target = self.state.last_of(clean_text(reviewer))
            if target is None:
                return None
            row = [undo_id, _now(), clean_text(reviewer), self.model, target.unit, target.kind, "", UNDO]
            self._append([[*row, "", "", "", "", "", "", target.decision_id]])
            return target

    def _append(self, rows: list[list[str]]) -> None:
        if not self.writable:
            raise BirderError(f"{self.path} was opened to be read only")
        self.notes += self.table.append(rows)
        self.refresh()


def read_reviews(path: str | Path, model: str) -> ReviewStore | None:
    """The decisions in ``path`` (read only), None when there is no such file."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    return ReviewStore(path, model, writable=False)

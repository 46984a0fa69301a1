"""What a review says about the machine: ``python -m birder.tools review-stats RESULTS_DIR``.

Counted over the decisions that count (per unit, the latest not undone), per answer checked (a unit's, or each
box's):

- agreement: the person kept the machine's answer (an abstention kept as ``unknown``, no box kept as ``blank``);
- corrections by calibrated-probability band (the bands of ``--order plan``): how often answers of that band were
  changed, beside the error their probabilities promised (``1 -`` the mean probability): a calibrated model's two
  figures agree;
- per species the machine answered, its precision among the reviewed answers, with a 95 % Wilson score interval
  (sound for few reviews and for precisions near 0 or 1, where the normal approximation fails);
- review speed: seconds per decision (the page measures the time each screen was shown) and decisions per hour,
  per reviewer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from birder.review.answers import Reviewed
from birder.review.folder import BLANK, UNKNOWN, Answer, is_species_label
from birder.review.plan import BANDS, band_name, band_of

Z_95 = 1.959964


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (``(0, 1)`` with no trial)."""
    if trials == 0:
        return (0.0, 1.0)
    share = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Checked:
    """One answer a person checked."""

    answer: Answer
    label: str  # what the person said
    reviewer: str

    @property
    def agrees(self) -> bool:
        machine = self.answer.label
        if machine in ("uncertain", "unknown", ""):
            return self.label == UNKNOWN
        return self.label == machine


def checked_answers(reviewed: Reviewed) -> list[Checked]:
    found = []
    for unit in reviewed.folder.units:
        submission = reviewed.current.get(unit.unit_id)
        if submission is None:
            continue
        whole = submission.whole
        if unit.boxes:
            by_box = {label.box: label.label for label in submission.labels if label.box}
            for box in unit.boxes:
                label = by_box.get(box.key) or (whole.label if whole is not None else None)
                if label is not None:
                    found.append(Checked(box.answer, label, submission.reviewer))
        elif whole is not None:
            found.append(Checked(unit.answer, whole.label, submission.reviewer))
    return found


def review_stats(reviewed: Reviewed) -> dict[str, Any]:
    """The figures of the module's docstring, as plain values."""
    current = reviewed.current
    checked = checked_answers(reviewed)
    units = reviewed.folder.units
    decided = sum(1 for unit in units if unit.unit_id in current)
    history = reviewed.store.state if reviewed.store is not None else None
    stats: dict[str, Any] = {
        "results_dir": str(reviewed.folder.directory),
        "model": reviewed.folder.model,
        "units": len(units),
        "decided": decided,
        "decisions_in_history": len(history.order) if history is not None else 0,
        "undone": sum(s.undone for s in history.submissions.values()) if history is not None else 0,
        "answers_checked": len(checked),
        "agreement": _share(sum(c.agrees for c in checked), len(checked)),
        "blank": sum(c.label == BLANK for c in checked),
        "bands": _bands(checked),
        "species": _species(checked),
        "speed": _speed(reviewed),
    }
    return stats


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _bands(checked: Sequence[Checked]) -> list[dict[str, Any]]:
    rows = []
    for index in range(len(BANDS) - 1):
        inside = [c for c in checked if is_species_label(c.answer) and band_of(c.answer.sureness) == index]
        if not inside:
            continue
        corrected = sum(not c.agrees for c in inside)
        mean_probability = statistics.fmean(c.answer.sureness for c in inside)
        rows.append(
            {
                "band": band_name(index),
                "checked": len(inside),
                "corrected": corrected,
                "correction_rate": _share(corrected, len(inside)),
                "expected_error": round(1.0 - mean_probability, 4),
            }
        )
    return rows


def _species(checked: Sequence[Checked]) -> list[dict[str, Any]]:
    by_label: dict[str, list[Checked]] = {}
    for c in checked:
        if is_species_label(c.answer):
            by_label.setdefault(c.answer.label, []).append(c)
    rows = []
    for label, answers in sorted(by_label.items(), key=lambda pair: (-len(pair[1]), pair[0])):
        confirmed = sum(c.agrees for c in answers)
        (low, high) = wilson_interval(confirmed, len(answers))
        corrections: dict[str, int] = {}
        for c in answers:
            if not c.agrees:
                corrections[c.label] = corrections.get(c.label, 0) + 1
        rows.append(
            {
                "species": label,
                "checked": len(answers),
                "confirmed": confirmed,
                "precision": round(confirmed / len(answers), 4),
                "ci95": [round(low, 4), round(high, 4)],
                "usually_instead": max(corrections, key=corrections.__getitem__) if corrections else None,
            }
        )
    return rows


def _speed(reviewed: Reviewed) -> list[dict[str, Any]]:
    if reviewed.store is None:
        return []
    by_reviewer: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for submission in reviewed.store.state.submissions.values():
        counts[submission.reviewer] = counts.get(submission.reviewer, 0) + 1
        if submission.seconds is not None and submission.seconds > 0:
            by_reviewer.setdefault(submission.reviewer, []).append(submission.seconds)
    rows = []
    for reviewer in sorted(counts):
        seconds = by_reviewer.get(reviewer, [])
        mean = statistics.fmean(seconds) if seconds else None
        rows.append(
            {
                "reviewer": reviewer,
                "decisions": counts[reviewer],
                "median_seconds": round(statistics.median(seconds), 2) if seconds else None,
                "per_hour": round(3600.0 / mean, 1) if mean else None,
            }
        )
    return rows


def format_stats(stats: dict[str, Any]) -> str:
    """The figures as the command prints them."""

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"{stats['results_dir']} (model {stats['model']}): {stats['decided']} of {stats['units']} units decided "
        f"({stats['decisions_in_history']} decisions in the history, {stats['undone']} undone)",
        f"agreement with the machine: {percent(stats['agreement'])} of {stats['answers_checked']} answers checked "
        f"({stats['blank']} blank)",
    ]
    if stats["bands"]:
        lines.append("corrections by probability band:")
        lines.append(f"  {'band':<11} {'checked':>7} {'corrected':>9} {'rate':>7} {'expected':>8}")
        for row in stats["bands"]:
            lines.append(
                f"  {row['band']:<11} {row['checked']:>7} {row['corrected']:>9} {percent(row['correction_rate']):>7} "
                f"{percent(row['expected_error']):>8}"
            )
    if stats["species"]:
        lines.append("precision per species answered (95% Wilson interval):")
        width = max(len(row["species"]) for row in stats["species"])
        for row in stats["species"]:
            (low, high) = row["ci95"]
            instead = f"  usually instead: {row['usually_instead']}" if row["usually_instead"] else ""
            lines.append(
                f"  {row['species']:<{width}} {row['confirmed']:>4}/{row['checked']:<4} {percent(row['precision']):>7} "
                f"[{percent(low)}, {percent(high)}]{instead}"
            )
    if stats["speed"]:
        lines.append("review speed:")
        for row in stats["speed"]:
            median = "-" if row["median_seconds"] is None else f"{row['median_seconds']:.1f} s"
            per_hour = "-" if row["per_hour"] is None else f"{row['per_hour']:.0f}"
            lines.append(f"  {row['reviewer']}: {row['decisions']} decisions, median {median}, {per_hour} per hour")
    return "\n".join(lines)

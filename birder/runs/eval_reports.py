"""What ``birder-eval`` reports about the answers beyond accuracy, from one pass over the photos:

- calibration: ECE, NLL and Brier score before (``T = 1``) and after the model's temperature, and a reliability
  diagram (:func:`calibration_report`);
- unknown detection (``--unknown-dir``: photos of classes outside the model): AUROC and FPR at 95 % TPR of each
  unknown-test method with the settings ``birder-calibrate`` chose, beside the AUROC it measured on its folds of
  held-out classes, the chosen method marked (:func:`unknown_detection`);
- taxonomic fallback (``--taxonomy``): for a range of thresholds, the precision of the emitted labels and the share
  of photos answered at each rank (:func:`taxonomy_coverage`).

Each has a text form for the terminal and a CSV (and PNG) for ``--output-dir``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from birder.inference.calibration import CalibrationMetrics, calibration_metrics, softmax
from birder.inference.dataset import discover_images
from birder.inference.decision import model_calibration
from birder.inference.labeled import ModelOutputs, collect_outputs
from birder.inference.taxonomy import RANKS, CoverageRow, Taxonomy, coverage_table
from birder.inference.unknown import EMBEDDING_METHODS, METHODS, ClassStatistics, auroc, fpr_at_tpr, unknown_scores
from birder.io.calibration import Calibration
from birder.plots import save_coverage_png, save_reliability_diagram_png
from birder.training.evaluation import CheckpointScores, write_csv

# The thresholds of the coverage table: 0 (always the species) to 0.99
COVERAGE_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)
KEEP_RATE = 0.95  # the TPR of "FPR at 95 % TPR": the share of known photos kept
# A method this much better (AUROC) than the model's own test on the user's unknown photos is pointed out
BETTER_TEST_MARGIN = 0.01


def _number(value: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    write_csv(path, header, rows)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemperatureReport:
    temperature: float
    before: CalibrationMetrics
    after: CalibrationMetrics


def calibration_report(outputs: ModelOutputs, temperature: float) -> TemperatureReport:
    return TemperatureReport(
        temperature,
        calibration_metrics(outputs.logits, outputs.targets),
        calibration_metrics(outputs.logits, outputs.targets, temperature),
    )


def format_calibration(report: TemperatureReport) -> str:
    (before, after) = (report.before, report.after)
    return (
        f"calibration (temperature {report.temperature:.4f}): ECE {_number(before.ece)} -> {_number(after.ece)}, "
        f"NLL {_number(before.nll)} -> {_number(after.nll)}, Brier {_number(before.brier)} -> {_number(after.brier)}"
    )


def write_calibration(report: TemperatureReport, output_dir: str | Path) -> list[Path]:
    """``calibration.csv`` (the metrics and the reliability bins) and ``reliability_diagram.png``."""
    output_dir = Path(output_dir)
    rows: list[list[object]] = []
    for name, metrics in (("uncalibrated", report.before), ("calibrated", report.after)):
        rows.append([name, "all", metrics.photos, metrics.ece, metrics.nll, metrics.brier, "", ""])
        bins = metrics.bins
        for i in range(len(bins.counts)):
            label = f"{bins.edges[i]:.3f}-{bins.edges[i + 1]:.3f}"
            rows.append([name, label, int(bins.counts[i]), "", "", "", bins.confidence[i], bins.accuracy[i]])
    header = ["probabilities", "bin", "photos", "ece", "nll", "brier", "mean_confidence", "accuracy"]
    written = [_write_csv(output_dir / "calibration.csv", header, rows)]
    picture = save_reliability_diagram_png(
        {"uncalibrated": report.before.bins, f"calibrated (T = {report.temperature:.3g})": report.after.bins},
        output_dir / "reliability_diagram.png",
    )
    return written + ([picture] if picture is not None else [])


# ---------------------------------------------------------------------------------------------------------------------
# Unknown detection
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionRow:
    method: str
    auroc: float
    fpr_at_95_tpr: float
    settings: str = ""  # e.g. "k=1 of 640 (at most 64 per class)", "oas (weight 0.031)"
    fold_auroc: float = float("nan")  # birder-calibrate's estimate on held-out classes, for these settings
    chosen: bool = False  # the calibrated model's own unknown test


def unknown_detection(
    known: ModelOutputs,
    unknown: ModelOutputs,
    temperature: float = 1.0,
    statistics: ClassStatistics | None = None,
    calibration: Calibration | None = None,
) -> list[DetectionRow]:
    """Each method's separation of ``known`` photos (the model's classes) from ``unknown`` ones; the embedding
    methods only with class statistics (with the settings they hold). ``calibration`` adds the fold AUROC of each
    method's settings and marks the model's own method."""
    rows = []
    for method in METHODS:
        if method in EMBEDDING_METHODS and (statistics is None or not statistics.supports(method)):
            continue

        def scores(outputs: ModelOutputs, method: str = method) -> np.ndarray:
            return unknown_scores(
                method,
                probabilities=softmax(outputs.logits, temperature),
                logits=outputs.logits,
                embeddings=outputs.embeddings,
                statistics=statistics,
            )

        (known_scores, unknown_scores_) = (scores(known), scores(unknown))
        rows.append(
            DetectionRow(
                method,
                auroc(known_scores, unknown_scores_),
                fpr_at_tpr(known_scores, unknown_scores_, KEEP_RATE),
                statistics.describe(method) if statistics is not None else "",
                _fold_auroc(calibration, method, statistics),
                calibration is not None and calibration.unknown_method == method,
            )
        )
    return rows


def _fold_auroc(calibration: Calibration | None, method: str, statistics: ClassStatistics | None) -> float:
    """The mean fold AUROC ``birder-calibrate`` recorded for ``method`` with the settings it scores with here."""
    selection = calibration.unknown_selection if calibration is not None else None
    if not selection:
        return float("nan")
    settings: dict[str, object] = {}
    if method == "knn" and statistics is not None:
        settings = {"neighbours": statistics.neighbours}
    elif method in EMBEDDING_METHODS and statistics is not None:
        settings = {"shrinkage": statistics.shrinkage}
    for candidate in selection.get("candidates", []):
        if candidate.get("method") == method and candidate.get("settings") == settings:
            mean = candidate.get("mean")
            return float(mean) if mean is not None else float("nan")
    return float("nan")


def format_detection(rows: Sequence[DetectionRow], known: int, unknown: int) -> str:
    lines = [
        f"unknown detection ({known} known, {unknown} unknown photos):",
        f"    {'method':<22}{'AUROC':>6}  FPR@95%TPR  fold AUROC  settings (* the model's own test)",
    ]
    lines += [
        f"  {'*' if row.chosen else ' '} {row.method:<22}{_number(row.auroc)}  {_number(row.fpr_at_95_tpr):>10}  "
        f"{_number(row.fold_auroc):>10}  {row.settings}".rstrip()
        for row in rows
    ]
    hint = better_test(rows)
    if hint is not None:
        own = next(row for row in rows if row.chosen)
        lines.append(
            f"  on these photos {hint.method} separates the unknown ones better than the model's own test "
            f"({hint.auroc:.4f} against {own.auroc:.4f}): birder-calibrate --unknown-method {hint.method} keeps it"
        )
    return "\n".join(lines)


def better_test(rows: Sequence[DetectionRow]) -> DetectionRow | None:
    """The method with the highest AUROC when it beats the model's own test by at least :data:`BETTER_TEST_MARGIN`
    (the choice was made without unknown photos; with some at hand, the user can keep the test they favour)."""
    own = next((row for row in rows if row.chosen), None)
    scored = [row for row in rows if not math.isnan(row.auroc)]
    if own is None or math.isnan(own.auroc) or not scored:
        return None
    best = max(scored, key=lambda row: row.auroc)
    return best if best.auroc - own.auroc >= BETTER_TEST_MARGIN else None


def write_detection(rows: Sequence[DetectionRow], output_dir: str | Path) -> list[Path]:
    header = ["method", "auroc", "fpr_at_95_tpr", "settings", "fold_auroc", "chosen"]
    table = [[row.method, row.auroc, row.fpr_at_95_tpr, row.settings, row.fold_auroc, int(row.chosen)] for row in rows]
    return [_write_csv(Path(output_dir) / "unknown_detection.csv", header, table)]


# ---------------------------------------------------------------------------------------------------------------------
# Taxonomic fallback
# ---------------------------------------------------------------------------------------------------------------------


def taxonomy_coverage(
    outputs: ModelOutputs,
    class_names: Sequence[str],
    taxonomy: Taxonomy,
    temperature: float = 1.0,
    thresholds: Sequence[float] = COVERAGE_THRESHOLDS,
) -> list[CoverageRow]:
    """The coverage/precision table of the taxonomic fallback on the (calibrated) probabilities."""
    probabilities = softmax(outputs.logits, temperature)
    return coverage_table(probabilities, outputs.targets, class_names, taxonomy, thresholds)


def format_coverage(rows: Sequence[CoverageRow]) -> str:
    lines = ["taxonomic fallback (share of photos answered at each rank, precision of the labels emitted):"]
    lines.append("  threshold  " + "  ".join(f"{rank:>7}" for rank in RANKS) + "  answered  precision")
    for row in rows:
        shares = "  ".join(f"{row.shares[rank]:>7.3f}" for rank in RANKS)
        lines.append(f"  {row.threshold:>9.2f}  {shares}  {row.answered:>8.3f}  {_number(row.precision, 3):>9}")
    return "\n".join(lines)


def write_coverage(rows: Sequence[CoverageRow], output_dir: str | Path) -> list[Path]:
    """``taxonomy_coverage.csv`` and ``taxonomy_coverage.png``."""
    output_dir = Path(output_dir)
    header = ["threshold", *RANKS, "answered", "precision"]
    table = [[row.threshold, *(row.shares[rank] for rank in RANKS), row.answered, row.precision] for row in rows]
    written = [_write_csv(output_dir / "taxonomy_coverage.csv", header, table)]
    picture = save_coverage_png(
        [row.threshold for row in rows],
        [row.precision for row in rows],
        [row.shares["species"] for row in rows],
        output_dir / "taxonomy_coverage.png",
    )
    return written + ([picture] if picture is not None else [])


# ---------------------------------------------------------------------------------------------------------------------
# All of them, for birder-eval
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnswerReports:
    """What ``birder-eval`` adds to its scores; each part is None when not asked for (or not possible)."""

    calibration: TemperatureReport | None = None  # only for a calibrated model
    detection: list[DetectionRow] | None = None
    detection_photos: tuple[int, int] = (0, 0)  # known, unknown
    coverage: list[CoverageRow] | None = None

    def format(self) -> str:
        parts = []
        if self.calibration is not None:
            parts.append(format_calibration(self.calibration))
        if self.detection is not None:
            parts.append(format_detection(self.detection, *self.detection_photos))
        if self.coverage is not None:
            parts.append(format_coverage(self.coverage))
        return "\n".join(parts)

    def write(self, output_dir: str | Path) -> list[Path]:
        written = []
        if self.calibration is not None:
            written += write_calibration(self.calibration, output_dir)
        if self.detection is not None:
            written += write_detection(self.detection, output_dir)
        if self.coverage is not None:
            written += write_coverage(self.coverage, output_dir)
        return written


def answer_reports(
    scores: CheckpointScores,
    *,
    unknown_dir: str | os.PathLike | None = None,
    taxonomy: Taxonomy | str | os.PathLike | None = None,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = False,
) -> AnswerReports:
    """The reports of a scored model: calibration (when it has one), unknown detection against the photos of
    ``unknown_dir``, taxonomic coverage with ``taxonomy``."""
    calibration = model_calibration(scores.net)
    temperature = calibration.temperature if calibration is not None else 1.0
    detection = None
    counts = (0, 0)
    if unknown_dir is not None:
        photos = discover_images([unknown_dir])
        unknown = collect_outputs(
            scores.net, scores.transform, photos, batch_size=batch_size, workers=workers, progress=progress
        )
        statistics = None
        if calibration is not None and calibration.stats_path is not None and calibration.stats_path.is_file():
            statistics = ClassStatistics.load(calibration.stats_path, scores.class_names)
        detection = unknown_detection(scores.outputs, unknown, temperature, statistics, calibration)
        counts = (len(scores.outputs), len(unknown))
    coverage = None
    if taxonomy is not None:
        taxonomy = taxonomy if isinstance(taxonomy, Taxonomy) else Taxonomy.from_csv(taxonomy)
        coverage = taxonomy_coverage(scores.outputs, scores.class_names, taxonomy, temperature)

    return AnswerReports(
        calibration_report(scores.outputs, temperature) if calibration is not None else None,
        detection,
        counts,
        coverage,
    )

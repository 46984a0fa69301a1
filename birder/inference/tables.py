"""The tables ``birder-predict`` writes: their columns, the rows of a batch, and the per-photo feature files.

- ``results``: path, prediction (the top class, or ``uncertain`` below ``min_prob``), top-k classes and
  probabilities, EXIF date and GPS position; when the answer can be more than the top class (an unknown test,
  per-species thresholds, a taxonomy: :mod:`birder.inference.decision`), then ``label``, ``rank``,
  ``label_probability`` and ``unknown_score``.
- ``failures``: path, error (the one-line reason). Always CSV: failures are few and read by people.
- optional ``probabilities`` (one column per class), ``logits`` (per class of the model), ``embeddings``
  (``e0`` .. ``e<D-1>`` in CSV; in Parquet one ``embedding`` column, ``FixedSizeList<float32>``:
  :func:`~birder.io.table_files.embedding_table`) and ``features`` (path, the name of the photo's feature file).

A photo is done once it has a results or a failures row (a failed photo is not retried on resume: its reason is
known). How the tables are journaled, resumed and merged is :mod:`birder.io.journal`'s business.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from birder.io.atomic import atomic_write_path
from birder.io.table_files import (
    PATH_COLUMN,
    Column,
    Row,
    TableSpec,
    embedding_table,
    float_columns,
    string_columns,
)

UNCERTAIN = "uncertain"
METADATA_COLUMNS = (
    Column("exif_datetime"),
    Column("gps_latitude", "float64", ".7f"),  # 7 decimals: about a centimetre
    Column("gps_longitude", "float64", ".7f"),
)
# The answer's columns (birder.inference.decision.FIELDS), appended so that the columns before keep their places
DECISION_COLUMNS = (
    Column("label"),
    Column("rank"),
    Column("label_probability", "float32", ".6f"),
    Column("unknown_score", "float64", ".6g"),
)
# What changes the columns between two runs, for the message of a resume that finds other columns
COLUMNS_HINT = "different --top-k, --species or model?"


def shown_top_k(requested: int, num_classes: int) -> int:
    """The top-k a run's tables show: what was asked, but never more than the run's classes (asking for more is
    no error) and at least one. Every table with top-k columns takes its count from here, so they agree."""
    return max(1, min(requested, num_classes))


def _result_columns(
    top_k: int, decisions: bool = False, extra: Sequence[Column] = (), lead: Sequence[Column] = ()
) -> tuple[Column, ...]:
    # ``lead``: what a row is about beside its photo (a detected box: birder.runs.detect), after the path
    columns = [Column(PATH_COLUMN), *lead, Column("prediction")]
    for rank in range(1, top_k + 1):
        columns += [Column(f"top{rank}_class"), Column(f"top{rank}_prob", "float32", ".6f")]
    # ``extra``: columns of optional steps (the location prior, events: birder.geo.predict), last
    return (*columns, *METADATA_COLUMNS, *(DECISION_COLUMNS if decisions else ()), *extra)


def _per_path_table(name: str, columns: tuple[Column, ...]) -> TableSpec:
    return TableSpec(name, (Column(PATH_COLUMN), *columns))


class PredictionTables:
    """The tables of one prediction run (see the module's docstring), and its rows for each batch."""

    def __init__(
        self,
        class_names: Sequence[str],
        top_k: int,
        *,
        all_class_names: Sequence[str] | None = None,
        probabilities: bool = False,
        logits: bool = False,
        embedding_dim: int | None = None,
        features: bool = False,
        decisions: bool = False,
        extra_result_columns: Sequence[Column] = (),
        lead_columns: Sequence[Column] = (),
    ) -> None:
        self.top_k = shown_top_k(top_k, len(class_names))
        self.lead = len(lead_columns)
        self.results = TableSpec(
            "results", _result_columns(self.top_k, decisions, extra_result_columns, lead_columns), marks_done=True
        )
        self.failures = TableSpec("failures", string_columns(PATH_COLUMN, "error"), fixed_format="csv", marks_done=True)

        extra = []
        if probabilities:
            extra.append(_per_path_table("probabilities", float_columns(class_names)))
        if logits:
            extra.append(_per_path_table("logits", float_columns(all_class_names or class_names)))
        if embedding_dim is not None:
            extra.append(embedding_table(embedding_dim))
        if features:
            extra.append(_per_path_table("features", string_columns("file")))
        # Also the commit order: the photo tables last, so "done" implies every other row of the photo is on disk
        self.specs: tuple[TableSpec, ...] = (*extra, self.failures, self.results)
        self.class_names = list(class_names)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def rows(
        self,
        paths: Sequence[str],
        probabilities: Any,
        top_indices: Any,
        top_probabilities: Any,
        metadata: Sequence[Sequence[Any]],
        *,
        min_prob: float = 0.0,
        logits: Any = None,
        embeddings: Any = None,
        feature_files: Sequence[str] | None = None,
        decisions: Any = None,
        extra_values: Sequence[Sequence[Any]] | None = None,
        lead_values: Sequence[Sequence[Any]] | None = None,
    ) -> dict[str, list[Row]]:
        """The rows of every table but failures for a batch of classified photos (arrays ``[B, ...]``);
        ``decisions`` (:class:`~birder.inference.decision.Decisions`) fills the answer's columns, ``lead_values``
        the lead columns."""
        results = []
        for i, path in enumerate(paths):
            top = [
                (self.class_names[int(idx)], float(prob))
                for (idx, prob) in zip(top_indices[i], top_probabilities[i], strict=True)
            ]
            prediction = top[0][0] if top[0][1] >= min_prob else UNCERTAIN
            lead = lead_values[i] if lead_values is not None else ()
            values = [path, *lead, prediction, *(value for pair in top for value in pair), *metadata[i]]
            if decisions is not None:
                values += list(decisions.row(i).values())
            if extra_values is not None:
                values += list(extra_values[i])
            results.append(self.results.format_row(values))

        rows: dict[str, list[Row]] = {"results": results}
        per_photo = {"probabilities": probabilities, "logits": logits, "embeddings": embeddings}
        for spec in self.specs:
            if spec.name in per_photo:
                values = per_photo[spec.name]
                rows[spec.name] = [spec.format_row([path, *values[i]]) for (i, path) in enumerate(paths)]
            elif spec.name == "features":
                rows[spec.name] = [[path, name] for (path, name) in zip(paths, feature_files or (), strict=True)]

        return rows

    def failure_rows(self, failures: Iterable[tuple[str, str]]) -> dict[str, list[Row]]:
        return {"failures": [[path, reason] for (path, reason) in failures]}

    def parse_result(self, row: Row) -> tuple[str, str, list[tuple[str, float]]]:
        """``(path, prediction, [(class, probability), ...])`` of a results row."""
        first = 1 + self.lead  # the prediction's column
        top = [(row[first + 1 + 2 * i], float(row[first + 2 + 2 * i])) for i in range(self.top_k)]
        return (row[0], row[first], top)


# ---------------------------------------------------------------------------------------------------------------------
# Per-photo files (detection features)
# ---------------------------------------------------------------------------------------------------------------------


def photo_file_stem(path: str) -> str:
    """A stable, unique file stem for what a run writes about a photo (feature maps, crops, drawings): readable
    stem plus a hash of the full path, so photos of the same name in two folders never share a file."""
    digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)[:40]
    return f"{stem}-{digest}"


def feature_file_name(path: str) -> str:
    """A stable, unique file name for a photo's feature maps (:func:`photo_file_stem`)."""
    return f"{photo_file_stem(path)}.safetensors"


def write_feature_file(path: Path, features: Mapping[str, Any], photo: str) -> None:
    """Save one photo's feature maps (numpy or tensors, ``[D, h, w]``) to a ``.safetensors`` file, atomically."""
    import torch
    from safetensors.torch import save_file

    tensors = {name: torch.as_tensor(value).contiguous() for (name, value) in features.items()}
    with atomic_write_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"path": photo})


def write_feature_files(directory: Path, paths: Sequence[str], features: Mapping[str, Any]) -> list[str]:
    """Save the feature maps of a batch (``name -> [B, D, h, w]``), one file per photo; returns the file names."""
    names = [feature_file_name(path) for path in paths]
    for i, (path, name) in enumerate(zip(paths, names, strict=True)):
        write_feature_file(directory / name, {key: value[i] for (key, value) in features.items()}, path)
    return names

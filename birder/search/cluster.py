"""Photos to review together: HDBSCAN clusters over the photos the model could not name, with contact sheets.

Which photos: those labelled ``unknown`` (the decision order's label, once the model is calibrated), else those
whose top probability is below ``below_prob``. :func:`select_for_review` is the one place that decides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from birder.errors import BirderError, ImageDecodeError
from birder.io.atomic import atomic_write_path
from birder.io.images import load_image
from birder.io.table_files import PATH_COLUMN, Column, TableSpec, write_table
from birder.search.store import PhotoIndex

UNKNOWN_LABEL = "unknown"
_REDUCED_DIM = 32  # HDBSCAN's cost grows with the dimension; 32 principal components keep the neighbourhoods
_THUMB = 128
_SHEET_COLUMNS = 6
_SHEET_MAX = 36
CLUSTERS_SPEC = TableSpec(
    "clusters", (Column(PATH_COLUMN), Column("cluster"), Column("prediction"), Column("probability", "float32", ".4f"))
)
# What review_clusters writes in its folder (birder.io.outputs: a later run there needs --overwrite)
CLUSTER_OUTPUTS = ("clusters.csv", "cluster_[0-9][0-9][0-9]*.png")


def select_for_review(
    predictions: Sequence[str], probabilities: npt.ArrayLike, below_prob: float | None
) -> npt.NDArray[np.bool_]:
    """Photos labelled unknown, or (with ``below_prob``) whose top probability is below it."""
    chosen = np.array([prediction == UNKNOWN_LABEL for prediction in predictions], dtype=bool)
    if below_prob is not None:
        chosen |= np.nan_to_num(np.asarray(probabilities, dtype=np.float64), nan=0.0) < below_prob
    return chosen


def cluster_vectors(vectors: npt.NDArray[np.float32], min_cluster_size: int = 5) -> npt.NDArray[np.int64]:
    """HDBSCAN labels of unit ``vectors`` (-1: in no cluster), on their leading principal components."""
    try:
        import hdbscan
    except ImportError:
        raise BirderError("clustering needs hdbscan: pip install 'birder[search]'") from None

    if len(vectors) < max(2, min_cluster_size):
        return np.full(len(vectors), -1, dtype=np.int64)
    centred = vectors - vectors.mean(axis=0)
    dims = min(_REDUCED_DIM, len(vectors) - 1, vectors.shape[1])
    (_, _, components) = np.linalg.svd(centred, full_matrices=False)
    reduced = (centred @ components[:dims].T).astype(np.float64)
    labels = hdbscan.HDBSCAN(min_cluster_size=min_cluster_size).fit_predict(reduced)
    return labels.astype(np.int64)


def contact_sheet(paths: Sequence[str], output: Path, title: str) -> Path:
    """A PNG grid of thumbnails of ``paths`` (at most 36) under ``title``, written atomically."""
    shown = list(paths)[:_SHEET_MAX]
    columns = min(_SHEET_COLUMNS, max(1, len(shown)))
    rows = math.ceil(len(shown) / columns)
    header = 24
    sheet = Image.new("RGB", (columns * _THUMB, header + rows * _THUMB), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for position, path in enumerate(shown):
        try:
            thumb = load_image(path)
            thumb.thumbnail((_THUMB - 4, _THUMB - 4))
        except ImageDecodeError:
            thumb = Image.new("RGB", (_THUMB - 4, _THUMB - 4), (200, 200, 200))
        (row, column) = divmod(position, columns)
        sheet.paste(thumb, (column * _THUMB + 2, header + row * _THUMB + 2))
    with atomic_write_path(output) as tmp:
        sheet.save(tmp, format="PNG")
    return output


@dataclass(frozen=True)
class ClusterReport:
    photos: int  # photos selected for review
    clusters: int
    unclustered: int


def review_clusters(
    index: PhotoIndex, output: Path, below_prob: float | None, min_cluster_size: int = 5
) -> ClusterReport:
    """Cluster the photos to review; write ``clusters.csv`` (cluster -1: none) and ``cluster_NNN.png`` sheets."""
    photos = index.photos
    predictions = photos.column("prediction").to_pylist()
    chosen = np.nonzero(select_for_review(predictions, photos.column("probability"), below_prob))[0]
    if len(chosen) == 0:
        return ClusterReport(0, 0, 0)

    labels = cluster_vectors(index.embeddings(chosen), min_cluster_size)
    rows = index.rows(chosen)
    table = [
        CLUSTERS_SPEC.format_row([row["path"], int(label), row["prediction"], row["probability"]])
        for (row, label) in zip(rows, labels, strict=True)
    ]
    write_table(output / "clusters.csv", CLUSTERS_SPEC, table)
    numbers = sorted(set(labels.tolist()) - {-1})
    for number in numbers:
        members = [row["path"] for (row, label) in zip(rows, labels, strict=True) if label == number]
        contact_sheet(members, output / f"cluster_{number:03d}.png", f"cluster {number}: {len(members)} photos")
    return ClusterReport(len(chosen), len(numbers), int((labels == -1).sum()))

"""Near-duplicate photos (bursts, copies, re-exports): groups of photos whose embeddings nearly coincide.

Every photo is searched for its nearest neighbours; pairs at or above a cosine similarity ``threshold`` are joined
into groups (connected components). In each group the photo to keep is the one with the most pixels, then the
sharpest (variance of the Laplacian of its grey levels), then the earliest (EXIF date), then the first path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from birder.errors import ImageDecodeError
from birder.io.images import load_image
from birder.io.table_files import PATH_COLUMN, Column, TableSpec, write_table
from birder.search.store import PhotoIndex
from birder.search.vectors import VectorIndex, chunks, gather_rows

# Candidates per photo: a near-duplicate ranks first among them even by approximate (PQ) scores
NEIGHBOURS = 4
# Near-duplicates fall in the same k-means cell (or the next one): two cells are enough to find them
_DUPLICATE_NPROBE = 2
_QUERY_CHUNK = 16_384
_CALIBRATION_QUERIES = 1000

DUPLICATES_SPEC = TableSpec(
    "duplicates",
    (
        Column(PATH_COLUMN),
        Column("group"),
        Column("keep"),
        Column("similarity", "float32", ".4f"),
        Column("pixels"),
        Column("sharpness", "float32", ".2f"),
        Column("exif_datetime"),
    ),
)


@dataclass(frozen=True)
class DuplicateGroup:
    members: list[int]  # photo ids, the one to keep first
    similarity: list[float]  # of each member to the one kept (1.0 for itself)
    pixels: list[int]
    sharpness: list[float]


def near_pairs(index: VectorIndex, threshold: float, neighbours: int = NEIGHBOURS) -> npt.NDArray[np.int64]:
    """``[P, 2]`` photo id pairs (``a < b``) with cosine similarity at least ``threshold``.

    Each photo's nearest ``neighbours`` by the index's approximate scores are candidates; a candidate whose score is
    within :func:`approximation_margin` of ``threshold`` is checked exactly (reading its row), the others are not:
    most photos have no near-duplicate, and their rows are never read.
    """
    found = []
    vectors = index.vectors
    margin = approximation_margin(index, neighbours)
    for part in chunks(len(index), _QUERY_CHUNK):
        queries = np.asarray(vectors[part])
        (approx, ids) = index.approximate_search(queries, neighbours + 1, nprobe=_DUPLICATE_NPROBE)
        rows = np.broadcast_to(np.arange(part.start, part.stop)[:, None], ids.shape)
        candidate = (ids >= 0) & (ids != rows) & (approx >= threshold - margin)
        (local, other) = (rows[candidate] - part.start, ids[candidate])
        exact = np.einsum("pd,pd->p", queries[local], gather_rows(vectors, other))
        pairs = np.stack([local + part.start, other], axis=1)
        found.append(pairs[exact >= threshold])

    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found), axis=1)
    return np.unique(pairs, axis=0)


def approximation_margin(index: VectorIndex, neighbours: int = NEIGHBOURS) -> float:
    """How far below the exact cosine similarity the index's approximate score of a pair may fall (0 for flat).

    Measured on the index itself: a sample of its vectors searched as :func:`near_pairs` does, approximate scores
    against exact ones. The codes score a vector against itself (or its near copy) lower than 1, by what they lose
    of it; the margin is 1.5 times the largest shortfall seen, plus 0.02.
    """
    if index.plan.kind == "flat":
        return 0.0
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(index), size=min(_CALIBRATION_QUERIES, len(index)), replace=False))
    queries = np.asarray(index.vectors[sample])
    (approx, ids) = index.approximate_search(queries, neighbours + 1, nprobe=_DUPLICATE_NPROBE)
    valid = ids >= 0
    exact = np.einsum("qcd,qd->qc", gather_rows(index.vectors, np.where(valid, ids, 0)), queries)
    shortfall = float(np.max(np.where(valid, exact - approx, 0.0), initial=0.0))
    return 1.5 * shortfall + 0.02


def connected_groups(pairs: npt.NDArray[np.int64]) -> list[list[int]]:
    """Groups of ids joined by ``pairs`` (union-find), each sorted, in order of their smallest id."""
    parent: dict[int, int] = {}

    def root(node: int) -> int:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]  # path halving
            node = parent[node]
        return node

    for a, b in pairs.tolist():
        (ra, rb) = (root(a), root(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    groups: dict[int, list[int]] = {}
    for node in sorted(parent):
        groups.setdefault(root(node), []).append(node)
    return list(groups.values())


def sharpness(pixels: npt.NDArray[np.uint8]) -> float:
    """Variance of the 4-neighbour Laplacian of the grey levels: higher is sharper."""
    grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var()) if laplacian.size else 0.0


def photo_quality(path: str | os.PathLike) -> tuple[int, float]:
    """``(pixels, sharpness)`` of a photo file; ``(0, 0.0)`` if it can no longer be read."""
    try:
        image = load_image(path)
    except ImageDecodeError:
        return (0, 0.0)
    return (image.width * image.height, sharpness(np.asarray(image)))


def keep_order(members: Sequence[int], facts: dict[int, tuple[int, float, str | None, str]]) -> list[int]:
    """``members`` with the one to keep first: most pixels, sharpest, earliest (no date: last), first path."""

    def key(member: int) -> tuple:
        (pixels, sharp, taken, path) = facts[member]
        return (-pixels, -sharp, taken is None, taken or "", path)

    return sorted(members, key=key)


def find_duplicates(index: PhotoIndex, threshold: float) -> list[DuplicateGroup]:
    """Groups of near-identical photos of ``index``, each with the photo to keep first."""
    groups = connected_groups(near_pairs(index.vectors, threshold))
    result = []
    for members in groups:
        rows = index.rows(members)
        facts = {}
        for member, row in zip(members, rows, strict=True):
            (pixels, sharp) = photo_quality(row["path"])
            facts[member] = (pixels, sharp, row["exif_datetime"], row["path"])
        ordered = keep_order(members, facts)
        vectors = index.embeddings(ordered)
        similarity = (vectors @ vectors[0]).astype(float).tolist()
        result.append(
            DuplicateGroup(ordered, similarity, [facts[m][0] for m in ordered], [facts[m][1] for m in ordered])
        )
    return result


def write_duplicates(path: Path, index: PhotoIndex, groups: Sequence[DuplicateGroup]) -> int:
    """``duplicates.csv``: one row per photo in a group; returns the number of rows."""
    rows = []
    for number, group in enumerate(groups, start=1):
        for position, row in enumerate(index.rows(group.members)):
            keep = "yes" if position == 0 else "no"
            values = [row["path"], number, keep, group.similarity[position], group.pixels[position]]
            rows.append(DUPLICATES_SPEC.format_row([*values, group.sharpness[position], row["exif_datetime"]]))
    return write_table(path, DUPLICATES_SPEC, rows)

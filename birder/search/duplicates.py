"""Duplicates that are copies: photos that are the same exposure saved again (re-exported, rescaled, recompressed,
cropped by a few percent), found among the photos of an index.

Embeddings alone cannot tell a copy from another photo of the same species: a classifier's embedding is made to be
the same for every photo of a class. So the embeddings only find *candidates*, and the pixels decide:

1. **Candidates**: each photo's ``neighbours`` nearest photos in the faiss index with a cosine similarity of at
   least ``threshold`` (a generous search: copies that cropping or re-encoding moved in embedding space are kept);
   and, as a classifier may rank a copy behind many look-alikes of its class, each photo's ``pixel_neighbours``
   nearest by pixel signature (:func:`~.pixels.signatures`). On benchmarks/duplicates.py's two photo sets, a small
   ViT classifier's embedding of a planted copy is its original's nearest for 10-12 % of the pairs and among the
   16 nearest for about half; the pixel signature's for 72-74 %, among the 4 nearest for 99-100 %. Every photo
   is read once, into a grey thumbnail (:mod:`.pixels`), kept in memory (4 KiB each).
2. **Confirmation**: pairs whose signatures are alike (:data:`~.pixels.MIN_SIGNATURE_SIMILARITY`) are aligned
   (crops of up to :data:`~.pixels.MAX_CROP` at each end of each axis, either photo) and compared block by block.
   Only pairs whose worst block differs by at most :data:`~.pixels.MAX_BLOCK_DIFFERENCE` (units of the photos'
   contrast) are copies.
3. **Groups**: photos are taken in the order of the one to keep (most pixels, then the sharpest, the earliest by
   EXIF date, the first path); a photo not yet in a group keeps, in its group, every photo not yet in a group that
   is confirmed as *its own* copy. A group is a star: every photo marked for removal was compared with the photo
   kept and confirmed. Nothing is joined through a chain (A~B and B~C with A!~C never puts C in A's group): a
   connected component would, and a complete-linkage group would ask more than the removal needs (that B and C be
   copies of each other, when the question is only whether the kept photo holds what each removed one shows).

Nothing is ever deleted: the table only suggests which photo to keep, and says for each pair why it is a copy.
Photos that cannot be read are listed (and never grouped).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from birder.errors import ImageDecodeError
from birder.io.table_files import PATH_COLUMN, Column, TableSpec, write_table
from birder.search import pixels
from birder.search.pixels import Thumbnail, read_thumbnail
from birder.search.store import PhotoIndex
from birder.search.vectors import (
    EXACT_LIMIT,
    VectorIndex,
    build_index,
    choose_plan,
    chunks,
    exact_search,
    gather_rows,
)

logger = logging.getLogger(__name__)

# Candidates per photo for near_pairs (vectors alone): a near-duplicate ranks first among them even by approximate
# (PQ) scores
NEIGHBOURS = 4
# Candidates of the duplicate search: generous, the pixels decide. A copy among many photos of its species can rank
# behind look-alikes in a classifier's embedding space
CANDIDATE_NEIGHBOURS = 16
MIN_SIMILARITY = 0.5  # cosine similarity from which a neighbour is a candidate
# Candidates by pixel signature too: a copy is among its original's nearest by signature, whatever the model
PIXEL_NEIGHBOURS = 4
# Near-duplicates fall in the same k-means cell (or the next one): two cells are enough to find them
_DUPLICATE_NPROBE = 2
_QUERY_CHUNK = 16_384
_CALIBRATION_QUERIES = 1000
_PAIR_CHUNK = 512  # pairs compared at a time: [chunk, 2, 64, 64] floats and the refinement's trials

DUPLICATES_SPEC = TableSpec(
    "duplicates",
    (
        Column(PATH_COLUMN),
        Column("group"),
        Column("suggestion"),  # keep / remove: a suggestion only, nothing is deleted
        Column("copy_of"),  # the photo kept in the group, which this one was compared with
        Column("similarity", "float32", ".4f"),  # embeddings' cosine similarity to the photo kept
        Column("block_difference", "float32", ".3f"),  # the pixel test's figure: at most MAX_BLOCK_DIFFERENCE
        Column("ssim", "float32", ".4f"),  # structural similarity of the aligned thumbnails
        Column("crop"),  # what the photo kept shows beyond this one at each end, in % of a side
        Column("reason"),
        Column("pixels"),
        Column("sharpness", "float32", ".2f"),
        Column("exif_datetime"),
    ),
)


@dataclass(frozen=True)
class PairEvidence:
    """Why a photo is a copy of the photo kept in its group."""

    similarity: float  # cosine similarity of the embeddings
    block_difference: float  # worst block's RMS difference of the aligned thumbnails, units of contrast
    ssim: float
    crop: tuple[float, float, float, float]  # the kept photo's edges (left, right, top, bottom) this one lacks

    def reason(self) -> str:
        return (
            f"same pixels after alignment: worst block differs by {self.block_difference:.3f} "
            f"<= {pixels.MAX_BLOCK_DIFFERENCE} (SSIM {self.ssim:.3f}); embeddings {self.similarity:.3f}"
        )


@dataclass(frozen=True)
class DuplicateGroup:
    members: list[int]  # photo ids, the one to keep first
    evidence: list[PairEvidence | None]  # of each member against the one kept (None for itself)
    pixels: list[int]
    sharpness: list[float]

    @property
    def similarity(self) -> list[float]:
        """Cosine similarity of each member's embedding to the kept one's (1.0 for itself)."""
        return [1.0 if item is None else item.similarity for item in self.evidence]


@dataclass
class DuplicateReport:
    groups: list[DuplicateGroup]
    candidates: int  # pairs found by embedding or by pixel signature
    compared_pairs: npt.NDArray[np.int64]  # [m, 2] of them, the pairs aligned and compared (signatures alike)
    block_difference: npt.NDArray[np.float32]  # [m] their pixel test's figure
    confirmed: int  # pairs found to be copies (before grouping)
    photos_read: int
    unreadable: dict[int, str] = field(default_factory=dict)  # photo id -> why it could not be read
    seconds: dict[str, float] = field(default_factory=dict)  # search, thumbnails, comparison, grouping

    @property
    def compared(self) -> int:
        return len(self.compared_pairs)


# ---------------------------------------------------------------------------------------------------------------------
# Candidates by embedding
# ---------------------------------------------------------------------------------------------------------------------


def candidate_pairs(
    index: VectorIndex, threshold: float, neighbours: int = CANDIDATE_NEIGHBOURS
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """``[P, 2]`` photo id pairs (``a < b``), each photo with its ``neighbours`` nearest by the index's scores whose
    score is at least ``threshold`` less :func:`approximation_margin` (0 for a flat index), and those scores.

    The rows of the vectors are not read: the scores are faiss's (exact for a flat index, approximate for IVF-PQ).
    """
    margin = approximation_margin(index, neighbours)
    (found, scores) = ([], [])
    for part in chunks(len(index), _QUERY_CHUNK):
        queries = np.asarray(index.vectors[part])
        (approx, ids) = index.approximate_search(queries, neighbours + 1, nprobe=_DUPLICATE_NPROBE)
        rows = np.broadcast_to(np.arange(part.start, part.stop)[:, None], ids.shape)
        candidate = (ids >= 0) & (ids != rows) & (approx >= threshold - margin)
        found.append(np.stack([rows[candidate], ids[candidate]], axis=1))
        scores.append(approx[candidate])

    if not found or not sum(map(len, found)):
        return (np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32))
    pairs = np.sort(np.concatenate(found), axis=1)
    score = np.concatenate(scores).astype(np.float32)
    # A pair found from both ends: once, with the higher score
    order = np.lexsort((-score, pairs[:, 1], pairs[:, 0]))
    (pairs, score) = (pairs[order], score[order])
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
    return (pairs[first], score[first])


def exact_similarity(index: VectorIndex, pairs: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """Cosine similarity of the embeddings of each pair, read from the stored vectors."""
    if not len(pairs):
        return np.zeros(0, dtype=np.float32)
    return np.einsum("pd,pd->p", gather_rows(index.vectors, pairs[:, 0]), gather_rows(index.vectors, pairs[:, 1]))


def near_pairs(index: VectorIndex, threshold: float, neighbours: int = NEIGHBOURS) -> npt.NDArray[np.int64]:
    """``[P, 2]`` photo id pairs (``a < b``) with cosine similarity at least ``threshold`` (embeddings alone).

    Each photo's nearest ``neighbours`` by the index's approximate scores are candidates; a candidate whose score is
    within :func:`approximation_margin` of ``threshold`` is checked exactly (reading its row), the others are not:
    most photos have no near-duplicate, and their rows are never read.
    """
    (pairs, _) = candidate_pairs(index, threshold, neighbours)
    return pairs[exact_similarity(index, pairs) >= threshold]


def approximation_margin(index: VectorIndex, neighbours: int = NEIGHBOURS) -> float:
    """How far below the exact cosine similarity the index's approximate score of a pair may fall (0 for flat).

    Measured on the index itself: a sample of its vectors searched as :func:`candidate_pairs` does, approximate
    scores against exact ones. The codes score a vector against itself (or its near copy) lower than 1, by what they
    lose of it; the margin is 1.5 times the largest shortfall seen, plus 0.02.
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


# ---------------------------------------------------------------------------------------------------------------------
# Grouping
# ---------------------------------------------------------------------------------------------------------------------


def connected_groups(pairs: npt.NDArray[np.int64]) -> list[list[int]]:
    """Groups of ids joined by ``pairs`` (union-find), each sorted, in order of their smallest id.

    Chains: A~B and B~C join A and C. Right for vectors that are near-identical (benchmarks/similarity.py), not for
    photos to delete (:func:`star_groups`).
    """
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


def star_groups(pairs: npt.NDArray[np.int64], keep_first: Sequence[int]) -> list[list[int]]:
    """Groups of confirmed copy ``pairs``: the photo to keep, then its own confirmed copies (see the module doc).

    ``keep_first``: every photo of ``pairs``, the one to keep first. A photo whose copies are all in other groups
    already, and which is a copy of none of their kept photos, stays out of every group.
    """
    partners: dict[int, set[int]] = {}
    for a, b in pairs.tolist():
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    rank = {photo: position for (position, photo) in enumerate(keep_first)}
    grouped: set[int] = set()
    groups = []
    for photo in keep_first:
        if photo in grouped or photo not in partners:
            continue
        copies = sorted((p for p in partners[photo] if p not in grouped), key=rank.__getitem__)
        if copies:
            groups.append([photo, *copies])
            grouped.update(groups[-1])
    return groups


def keep_order(members: Sequence[int], facts: dict[int, tuple[int, float, str | None, str]]) -> list[int]:
    """``members`` with the one to keep first: most pixels, sharpest, earliest (no date: last), first path."""

    def key(member: int) -> tuple:
        (pixel_count, sharp, taken, path) = facts[member]
        return (-pixel_count, -sharp, taken is None, taken or "", path)

    return sorted(members, key=key)


# ---------------------------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------------------------


def read_thumbnails(paths: dict[int, str], workers: int | None = None) -> tuple[dict[int, Thumbnail], dict[int, str]]:
    """Each photo read once (threads: decoding releases the GIL); the ones that cannot be read, with the reason."""

    def read(item: tuple[int, str]) -> tuple[int, Thumbnail | str]:
        try:
            return (item[0], read_thumbnail(item[1]))
        except ImageDecodeError as exc:
            return (item[0], str(exc))

    workers = workers or min(8, os.cpu_count() or 1)
    (thumbnails, unreadable) = ({}, {})
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for photo, result in pool.map(read, paths.items()):
            if isinstance(result, Thumbnail):
                thumbnails[photo] = result
            else:
                unreadable[photo] = result
    return (thumbnails, unreadable)


def confirm_pairs(pairs: npt.NDArray[np.int64], thumbnails: dict[int, Thumbnail]) -> pixels.PixelComparison:
    """The pixel test of every pair (both photos in ``thumbnails``), ``_PAIR_CHUNK`` at a time."""
    results = [pixels.PixelComparison(*(np.zeros((0, *shape), dtype=np.float32) for shape in ((), (), (4,))))]
    for part in chunks(len(pairs), _PAIR_CHUNK):
        first = np.stack([thumbnails[a].grey for a in pairs[part, 0]])
        second = np.stack([thumbnails[b].grey for b in pairs[part, 1]])
        results.append(pixels.compare_thumbnails(first, second))
    return pixels.PixelComparison(
        np.concatenate([r.block_difference for r in results]),
        np.concatenate([r.ssim for r in results]),
        np.concatenate([r.offsets for r in results]),
    )


def signature_pairs(
    thumbnails: dict[int, Thumbnail], neighbours: int, exact_limit: int = EXACT_LIMIT
) -> npt.NDArray[np.int64]:
    """``[P, 2]`` photo id pairs (``a < b``): each photo with its ``neighbours`` nearest by pixel signature
    (:func:`~.pixels.signatures`), those at least :data:`~.pixels.MIN_SIGNATURE_SIMILARITY` alike.

    Exact search up to ``exact_limit`` photos; above, a faiss index of the signatures built as the
    embeddings' is (:func:`~.vectors.build_index`: IVF-PQ, its best candidates re-scored exactly).
    """
    ids = np.array(sorted(thumbnails), dtype=np.int64)
    if len(ids) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    vectors = np.stack([thumbnails[photo].signature for photo in ids])
    k = min(neighbours + 1, len(ids))
    if len(ids) <= exact_limit:
        (scores, found) = exact_search(vectors, vectors, k)
    else:
        logger.info("pixel signatures of %d photos: a vector index of their own", len(ids))
        signature_index = build_index(vectors, choose_plan(len(ids), vectors.shape[1], exact_limit))
        (scores, found) = signature_index.search(vectors, k)
    rows = np.broadcast_to(np.arange(len(ids))[:, None], found.shape)
    near = (found >= 0) & (found != rows) & (scores >= pixels.MIN_SIGNATURE_SIMILARITY)
    return np.unique(np.sort(np.stack([ids[rows[near]], ids[found[near]]], axis=1), axis=1), axis=0)


def search_duplicates(
    index: PhotoIndex,
    threshold: float = MIN_SIMILARITY,
    *,
    neighbours: int = CANDIDATE_NEIGHBOURS,
    pixel_neighbours: int = PIXEL_NEIGHBOURS,
) -> DuplicateReport:
    """Groups of copies among the photos of ``index`` (see the module doc), each with the photo to keep first.

    ``pixel_neighbours`` 0: only the embeddings' candidates, and only their photos are read.
    """
    started = time.perf_counter()
    (pairs, _) = candidate_pairs(index.vectors, threshold, neighbours)
    searched = time.perf_counter()

    involved = np.arange(len(index)) if pixel_neighbours else np.unique(pairs)
    paths = dict(zip(involved.tolist(), index.photos.column("path").take(involved).to_pylist(), strict=True))
    (thumbnails, unreadable) = read_thumbnails(paths)
    for photo in sorted(unreadable):
        logger.warning("%s", unreadable[photo])
    read = time.perf_counter()

    if pixel_neighbours:
        pairs = np.unique(np.concatenate([pairs, signature_pairs(thumbnails, pixel_neighbours)]), axis=0)
    pairs = pairs[np.isin(pairs, list(thumbnails)).all(axis=1)] if len(pairs) else pairs
    signature_of = {photo: thumbnail.signature for (photo, thumbnail) in thumbnails.items()}
    alike = np.array([signature_of[a] @ signature_of[b] for (a, b) in pairs.tolist()], dtype=np.float32)
    # Pairs whose signatures differ this much are not copies: no alignment is tried
    compared = pairs[alike >= pixels.MIN_SIGNATURE_SIMILARITY] if len(pairs) else pairs
    comparison = confirm_pairs(compared, thumbnails)
    is_copy = comparison.is_copy
    copies = compared[is_copy]
    # The evidence: exact similarity of the embeddings (the index's scores may be approximate), the pixel test
    similarity = exact_similarity(index.vectors, copies)
    evidence_of = {
        (int(a), int(b)): (float(s), float(d), float(q), tuple(float(v) for v in o))
        for (a, b), s, d, q, o in zip(
            copies,
            similarity,
            comparison.block_difference[is_copy],
            comparison.ssim[is_copy],
            comparison.offsets[is_copy],
            strict=True,
        )
    }
    compared_at = time.perf_counter()

    groups = _groups(index, copies, evidence_of, thumbnails)
    seconds = {
        "search": searched - started,
        "thumbnails": read - searched,
        "comparison": compared_at - read,
        "grouping": time.perf_counter() - compared_at,
    }
    return DuplicateReport(
        groups,
        len(pairs),
        compared,
        comparison.block_difference,
        len(copies),
        len(thumbnails),
        unreadable,
        seconds,
    )


def _groups(
    index: PhotoIndex,
    copies: npt.NDArray[np.int64],
    evidence_of: dict[tuple[int, int], tuple[float, float, float, tuple[float, ...]]],
    thumbnails: dict[int, Thumbnail],
) -> list[DuplicateGroup]:
    photos = np.unique(copies).tolist()
    facts = {}
    for photo, row in zip(photos, index.rows(photos), strict=True):
        thumbnail = thumbnails[photo]
        facts[photo] = (thumbnail.pixels, thumbnail.sharpness, row["exif_datetime"], row["path"])
    groups = []
    for members in star_groups(copies, keep_order(photos, facts)):
        kept = members[0]
        evidence: list[PairEvidence | None] = [None]
        for member in members[1:]:
            (similarity, difference, ssim, offsets) = evidence_of[(min(kept, member), max(kept, member))]
            # offsets: x start, x end, y start, y end; positive where the pair's first (smaller id) shows more
            sign = 1.0 if kept < member else -1.0
            lacks = (sign * offsets[0], sign * offsets[1], sign * offsets[2], sign * offsets[3])
            evidence.append(PairEvidence(similarity, difference, ssim, lacks))
        groups.append(DuplicateGroup(members, evidence, [facts[m][0] for m in members], [facts[m][1] for m in members]))
    return groups


def find_duplicates(index: PhotoIndex, threshold: float = MIN_SIMILARITY, **options: int) -> list[DuplicateGroup]:
    """Groups of copies among the photos of ``index``, each with the photo to keep first (:func:`search_duplicates`)."""
    return search_duplicates(index, threshold, **options).groups


def _crop_text(crop: tuple[float, float, float, float]) -> str:
    """The kept photo's edges this one lacks (negative: this one shows more), in % of a side."""
    names = ("left", "right", "top", "bottom")
    return " ".join(f"{name} {100 * value:+.1f}%" for (name, value) in zip(names, crop, strict=True))


def write_duplicates(path: Path, index: PhotoIndex, report: DuplicateReport) -> int:
    """``duplicates.csv``: one row per photo in a group, then one per candidate photo that could not be read;
    returns the number of rows."""
    rows = []
    for number, group in enumerate(report.groups, start=1):
        recorded = index.rows(group.members)
        kept_path = recorded[0]["path"]
        for position, row in enumerate(recorded):
            evidence = group.evidence[position]
            if evidence is None:
                values = [row["path"], number, "keep", "", 1.0, None, None, "", "the photo to keep in its group"]
            else:
                values = [row["path"], number, "remove", kept_path, evidence.similarity, evidence.block_difference]
                values += [evidence.ssim, _crop_text(evidence.crop), evidence.reason()]
            values += [group.pixels[position], group.sharpness[position], row["exif_datetime"]]
            rows.append(DUPLICATES_SPEC.format_row(values))
    unreadable = sorted(report.unreadable)
    for photo, row in zip(unreadable, index.rows(unreadable), strict=True):
        values = [row["path"], None, "", "", None, None, None, "", f"not compared: {report.unreadable[photo]}"]
        rows.append(DUPLICATES_SPEC.format_row([*values, None, None, row["exif_datetime"]]))
    return write_table(path, DUPLICATES_SPEC, rows)

"""The vector index: unit embeddings searched by inner product (= cosine similarity) with faiss.

Two kinds, chosen by collection size (:func:`choose_plan`):

- ``flat``: exact search, for collections up to :data:`EXACT_LIMIT` photos (a scan of 20,000 x 1024 floats is a
  few milliseconds).
- ``ivfpq``: an inverted file over ``nlist`` (about 2 sqrt(N)) k-means cells with product-quantized codes of the
  residuals (``m`` sub-quantizers of 8 bits, one per 16 dimensions: 64 bytes for 1024 floats), its ``rerank`` best
  candidates re-scored exactly from ``vectors.npy``. The codes rank neighbours only roughly; the exact re-score of
  a few hundred candidates restores the order for the price of reading those rows. ``nprobe`` (cells searched) and
  ``rerank`` are tuned at build time on a sample of the collection: the cheapest pair that reaches
  :data:`TARGET_RECALL` against exact search.

8-bit codes in faiss's plain layout (``IndexIVFPQ``), not the 4-bit fast-scan one: faiss memory-maps only the plain
inverted lists (``IO_FLAG_MMAP``), a fast-scan index is read whole into memory. The scan of a few cells is a small
part of a query either way; the exact re-rank and the cell search dominate.

A search of a few queries runs on one thread: faiss's OpenMP threads cost more than they save on one query (and on
a loaded machine a parallel region waits for the slowest thread). Batches (duplicates, tuning) use them all.

Files: ``vectors.npy`` (float32 ``[N, D]``, unit rows, row i = photo i) and ``vectors.faiss``. Both are
memory-mapped on load: an index of a million photos opens instantly and costs memory only for the pages read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from birder.errors import BirderError
from birder.io.atomic import atomic_write_path

EXACT_LIMIT = 20_000
TARGET_RECALL = 0.97  # on the tuning sample, a margin over the 0.95 promised
TUNING_QUERIES = 200
TUNING_K = 10
NPROBE_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
RERANK_LADDER = (64, 128, 256, 512)
CELLS_PER_SQRT_N = 2
DIMS_PER_SUBQUANTIZER = 16
PQ_BITS = 8
FEW_QUERIES = 8  # up to this many queries a search runs on one thread
_TRAIN_PER_CELL = 40  # faiss wants at least 39 training points per k-means centroid
_MAX_TRAIN = 100_000
_PQ_TRAIN = 65_536  # 256 centroids per sub-quantizer: faiss asks for 39 x 256 points at least
_CHUNK = 65_536

VECTORS_FILE = "vectors.npy"
FAISS_FILE = "vectors.faiss"

logger = logging.getLogger(__name__)
Floats = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]


def import_faiss() -> Any:
    # faiss's loader logs which build it tries (8 lines at INFO, one a failure to find an AVX2 build) through
    # Python logging as it is imported: noise on every command's stderr. Its warnings still show.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        raise BirderError("similarity search needs faiss: pip install 'birder[search]'") from None
    return faiss


@dataclass(frozen=True)
class IndexPlan:
    """Which index and its search parameters (see the module docstring)."""

    kind: str  # "flat" or "ivfpq"
    nlist: int = 0
    m: int = 0  # PQ sub-quantizers: a code is m * nbits / 8 bytes
    nbits: int = PQ_BITS
    nprobe: int = 0
    rerank: int = 0

    def describe(self) -> str:
        if self.kind == "flat":
            return "flat (exact inner-product search)"
        return (
            f"ivfpq: IVF{self.nlist},PQ{self.m}x{self.nbits} (inner product, {self.m * self.nbits // 8}-byte codes); "
            f"search nprobe={self.nprobe}, exact re-rank of the best {self.rerank} candidates"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_plan(count: int, dim: int, exact_limit: int = EXACT_LIMIT) -> IndexPlan:
    """The index for ``count`` vectors of dimension ``dim`` (search parameters tuned later for ``ivfpq``)."""
    if count <= exact_limit:
        return IndexPlan("flat")

    # About 2 sqrt(N) cells (a power of two), each with enough vectors to train its centroid. More cells make a
    # query scan fewer codes, but the k-means training and the assignment of every vector (build, duplicates) cost
    # in proportion to them; the 4 sqrt(N) of the faiss guidelines would double both for a scan already cheap
    # (2048 cells of ~500 codes at a million vectors)
    nlist = 2 ** round(math.log2(CELLS_PER_SQRT_N * math.sqrt(count)))
    nlist = max(64, min(nlist, count // _TRAIN_PER_CELL))
    # One 8-bit sub-quantizer per 16 dimensions (a 64-byte code for 1024), m dividing dim
    m = next(m for m in range(max(1, dim // DIMS_PER_SUBQUANTIZER), 0, -1) if dim % m == 0)
    # 2**nbits centroids per sub-quantizer want 39 training points each: fewer bits for a small collection
    nbits = next(bits for bits in range(PQ_BITS, 4, -1) if count >= _TRAIN_PER_CELL * 2**bits or bits == 5)
    return IndexPlan("ivfpq", nlist=nlist, m=m, nbits=nbits, nprobe=NPROBE_LADDER[0], rerank=RERANK_LADDER[0])


@contextlib.contextmanager
def search_threads(queries: int) -> Iterator[None]:
    """faiss's threads for a search of ``queries`` queries: one for a few (:data:`FEW_QUERIES`), else all.

    OpenMP keeps the thread count per calling thread: concurrent searches (the server's) do not disturb each other.
    """
    if queries > FEW_QUERIES:
        yield
        return
    faiss = import_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def normalize(vectors: npt.ArrayLike) -> Floats:
    """Rows scaled to unit length (a zero row stays zero), as float32."""
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


def chunks(count: int, size: int = _CHUNK) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


# ---------------------------------------------------------------------------------------------------------------------
# Exact search (ground truth, re-ranking, flat)
# ---------------------------------------------------------------------------------------------------------------------


def exact_search(vectors: Floats, queries: Floats, k: int) -> tuple[Floats, Ids]:
    """The ``k`` most similar rows of ``vectors`` (any array, a memmap too: read in chunks) for each query."""
    best_sims = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for part in chunks(len(vectors)):
        sims = queries @ np.asarray(vectors[part]).T
        ids = np.broadcast_to(np.arange(part.start, part.stop), sims.shape)
        sims = np.concatenate([best_sims, sims], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        keep = min(k, sims.shape[1])
        top = np.argpartition(-sims, keep - 1, axis=1)[:, :keep]
        (best_sims, best_ids) = (np.take_along_axis(sims, top, 1), np.take_along_axis(ids, top, 1))
    order = np.argsort(-best_sims, axis=1, kind="stable")
    return (np.take_along_axis(best_sims, order, 1), np.take_along_axis(best_ids, order, 1))


def gather_rows(vectors: Floats, ids: Ids) -> Floats:
    """``vectors[ids]`` for ids of any shape, read in sorted order (sequential pages of a memory-mapped file)."""
    (unique, inverse) = np.unique(ids, return_inverse=True)
    return np.asarray(vectors[unique])[inverse.reshape(ids.shape)]


def rerank(vectors: Floats, queries: Floats, candidates: Ids, k: int) -> tuple[Floats, Ids]:
    """Re-score ``candidates`` ``[Q, C]`` (-1: none) exactly and keep the ``k`` best of each row."""
    # Rows gathered for a few queries at a time: [q, C, D] floats stay under ~64 MB
    step = max(1, (1 << 24) // max(1, candidates.shape[1] * vectors.shape[1]))
    parts = [_rerank_part(vectors, queries[part], candidates[part], k) for part in chunks(len(queries), step)]
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _rerank_part(vectors: Floats, queries: Floats, candidates: Ids, k: int) -> tuple[Floats, Ids]:
    rows = gather_rows(vectors, np.where(candidates >= 0, candidates, 0))  # [Q, C, D]
    sims = np.einsum("qcd,qd->qc", rows, queries)
    sims = np.where(candidates >= 0, sims, -np.inf).astype(np.float32)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(sims, order, 1), np.take_along_axis(candidates, order, 1))


def recall_at(found: Ids, truth: Ids) -> float:
    """The share of the true neighbours found (recall@k, k = truth's width)."""
    hits = sum(len(np.intersect1d(f, t)) for (f, t) in zip(found, truth, strict=True))
    return hits / truth.size


# ---------------------------------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------------------------------


class VectorIndex:
    """A faiss index plus the exact vectors it re-ranks with; row ``i`` of both is photo ``i``."""

    def __init__(self, index: Any, vectors: Floats, plan: IndexPlan) -> None:
        self.index = index
        self.vectors = vectors
        self.plan = plan

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: npt.ArrayLike, k: int, *, nprobe: int | None = None) -> tuple[Floats, Ids]:
        """Cosine similarities and ids ``[Q, k]`` of the nearest photos (-1 and -inf where fewer exist)."""
        queries = normalize(np.atleast_2d(queries))
        if self.plan.kind == "flat":
            with search_threads(len(queries)):
                return self.index.search(queries, k)

        (_, candidates) = self.approximate_search(queries, max(k, self.plan.rerank), nprobe=nprobe)
        return rerank(self.vectors, queries, candidates, k)

    def approximate_search(self, queries: Floats, k: int, *, nprobe: int | None = None) -> tuple[Floats, Ids]:
        """faiss's own answer, without the exact re-rank: approximate similarities for ``ivfpq`` (exact for flat)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with search_threads(len(queries)):
            if self.plan.kind == "flat":
                return self.index.search(queries, k)
            # Per call, not set on the index: concurrent searches (the server) may use different values
            params = import_faiss().SearchParametersIVF(nprobe=nprobe or self.plan.nprobe)
            return self.index.search(queries, k, params=params)

    def search_cost(self, nprobe: int, rerank_count: int) -> float:
        """Bytes a query reads, roughly: the codes and ids of ``nprobe`` average cells and ``rerank_count`` rows."""
        code_bytes = self.plan.m * self.plan.nbits / 8 + 8
        return nprobe * len(self) / max(self.plan.nlist, 1) * code_bytes + rerank_count * self.dim * 4

    def tuned(self, rng: np.random.Generator | None = None) -> VectorIndex:
        """(ivfpq) The same index with the cheapest ``(nprobe, rerank)`` (:meth:`search_cost`) reaching
        :data:`TARGET_RECALL` on a sample of its own vectors as queries."""
        if self.plan.kind != "ivfpq":
            return self

        rng = rng or np.random.default_rng(0)
        sample = np.sort(rng.choice(len(self), size=min(TUNING_QUERIES, len(self)), replace=False))
        queries = np.asarray(self.vectors[sample])
        # Each query is a vector of the index: its own match is left out, or it would flatter the recall
        (_, truth) = exact_search(self.vectors, queries, TUNING_K + 1)
        truth = _without_self(truth, sample)
        best: tuple[float, int, int] | None = None
        for nprobe in (n for n in NPROBE_LADDER if n <= self.plan.nlist):
            if best is not None and self.search_cost(nprobe, 0) >= best[0]:
                break  # more cells cost more than the best pair found, whatever the re-rank
            # One faiss search per nprobe: the best R candidates are the first R of the longest list
            (_, candidates) = self.approximate_search(queries, RERANK_LADDER[-1], nprobe=nprobe)
            for rerank_count in RERANK_LADDER:
                (_, found) = rerank(self.vectors, queries, candidates[:, :rerank_count], TUNING_K + 1)
                cost = self.search_cost(nprobe, rerank_count)
                if (best is None or cost < best[0]) and recall_at(_without_self(found, sample), truth) >= TARGET_RECALL:
                    best = (cost, nprobe, rerank_count)
        if best is None:  # never reached: search everything the index has
            best = (0.0, self.plan.nlist, RERANK_LADDER[-1])
        return VectorIndex(self.index, self.vectors, _replace(self.plan, nprobe=best[1], rerank=best[2]))

    def extended(self, new_vectors: Floats) -> VectorIndex:
        """The faiss index with ``new_vectors`` (unit rows, already the last rows of ``self.vectors``) added."""
        for part in chunks(len(new_vectors)):
            self.index.add(np.ascontiguousarray(new_vectors[part]))
        return self

    def save(self, directory: Path) -> None:
        faiss = import_faiss()
        with atomic_write_path(directory / FAISS_FILE) as tmp:
            faiss.write_index(self.index, os.fspath(tmp))


def _without_self(ids: Ids, own: Ids) -> Ids:
    """The first ``k - 1`` ids of each row other than the row's own id (``[Q, k]`` -> ``[Q, k - 1]``)."""
    return np.stack([row[row != me][: ids.shape[1] - 1] for (row, me) in zip(ids, own, strict=True)])


def _replace(plan: IndexPlan, **changes: Any) -> IndexPlan:
    return IndexPlan(**{**plan.as_dict(), **changes})


def build_index(vectors: Floats, plan: IndexPlan, rng: np.random.Generator | None = None) -> VectorIndex:
    """A new index over ``vectors`` (unit rows, e.g. the memory-mapped ``vectors.npy``), tuned if approximate."""
    faiss = import_faiss()
    rng = rng or np.random.default_rng(0)
    dim = vectors.shape[1]
    started = time.perf_counter()
    index = faiss.IndexFlatIP(dim) if plan.kind == "flat" else _trained_ivfpq(vectors, plan, rng)
    trained = time.perf_counter()
    for part in chunks(len(vectors)):
        index.add(np.ascontiguousarray(vectors[part]))
    added = time.perf_counter()
    result = VectorIndex(index, vectors, plan).tuned(rng)
    logger.info(
        "vector index: trained in %.1f s, %d vectors added in %.1f s, search tuned in %.1f s",
        trained - started,
        len(vectors),
        added - trained,
        time.perf_counter() - added,
    )
    return result


def read_faiss(directory: Path, *, mmap: bool = False) -> Any:
    """The faiss index file of ``directory``; memory-mapped and read-only with ``mmap``."""
    faiss = import_faiss()
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(os.fspath(directory / FAISS_FILE), flags)


def _sample(vectors: Floats, count: int, rng: np.random.Generator) -> Floats:
    rows = np.sort(rng.choice(len(vectors), size=min(count, len(vectors)), replace=False))
    return np.ascontiguousarray(vectors[rows])


def _trained_ivfpq(vectors: Floats, plan: IndexPlan, rng: np.random.Generator) -> Any:
    """An empty IVF-PQ index: cells from spherical k-means on a large sample, codebooks from a smaller one."""
    faiss = import_faiss()
    dim = vectors.shape[1]
    # 10 k-means iterations place the cells about as well as faiss's default 25 for search, in 40 % of the time
    kmeans = faiss.Kmeans(dim, plan.nlist, niter=10, spherical=True, seed=int(rng.integers(2**31)))
    kmeans.train(_sample(vectors, max(_MAX_TRAIN, plan.nlist * _TRAIN_PER_CELL), rng))
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(kmeans.centroids)
    index = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.m, plan.nbits, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.niter = 10
    index.train(_sample(vectors, _PQ_TRAIN, rng))  # the quantizer is trained already: only the codebooks are
    return index


def load_index(directory: Path, plan: IndexPlan) -> VectorIndex:
    """The index saved in ``directory`` for searching, memory-mapped (both the faiss file and the exact vectors)."""
    vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
    index = read_faiss(directory, mmap=True)
    if index.ntotal != len(vectors):
        raise BirderError(
            f"index '{directory}' is inconsistent ({index.ntotal} indexed vectors, {len(vectors)} stored): "
            "build it again"
        )
    return VectorIndex(index, vectors, plan)

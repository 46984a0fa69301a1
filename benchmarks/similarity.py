"""Similarity-search figures: recall, latency, build time, bytes per vector, duplicate detection, indexing overhead.

    python -m benchmarks.similarity                   # 1,000,000 vectors of dimension 1024 (about 20 minutes)
    python -m benchmarks.similarity --vectors 100000  # a smaller run (1,000 clusters: the same neighbour structure)
    python -m benchmarks.similarity --overhead-photos 300 --vectors 0   # only the indexing overhead

The collection has neighbour structure like photo embeddings: clusters of varying size (10,000 for a million
vectors, one per 100 vectors in a smaller run), each vector a unit vector made of its cluster's centre plus noise
in a 64-dimensional subspace (one of a pool of random subspaces), plus planted near-duplicates (a copy of a vector
with a little noise). Vectors are generated in chunks straight into the memory-mapped ``vectors.npy`` of an index
folder, then indexed by :func:`birder.search.vectors.build_index` with the plan of
:func:`~birder.search.vectors.choose_plan`: the code ``birder-index build`` runs. Ground truth: exact search for
1,000 held-out queries (new members of the clusters), searched one at a time as ``birder-index query`` and the
server do (faiss on one thread for a single query: :func:`~birder.search.vectors.search_threads`).

Latency is wall-clock time per query; on a machine shared with other work it includes waiting for a core, so the
process CPU time per query (``thread_time``) is printed beside it, with the load average. ``--reuse`` keeps the
generated vectors of an earlier run in ``--workdir`` (the index is always built anew).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from birder.search.vectors import (
    FAISS_FILE,
    VECTORS_FILE,
    IndexPlan,
    build_index,
    choose_plan,
    chunks,
    exact_search,
    import_faiss,
    load_index,
    normalize,
    recall_at,
)

SUBSPACE_DIM = 64
SUBSPACE_POOL = 64
NOISE = 0.9  # noise norm relative to the unit centre: members sit at cosine ~0.75 from it, ~0.55 from each other
DUPLICATE_NOISE = 0.05  # a near-duplicate is at cosine ~0.999 from its original
K = 10
PLANTED_FILE = "planted.npy"
VECTORS_PER_CLUSTER = 100  # the 10,000 clusters for 1,000,000 vectors


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores (shared with other work: see load)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other work: see load)"


class Collection:
    """Clusters of vectors as described in the module docstring, generated from a seed in any number of chunks."""

    def __init__(self, dim: int, clusters: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = normalize(rng.standard_normal((clusters, dim), dtype=np.float32))
        bases = rng.standard_normal((SUBSPACE_POOL, dim, SUBSPACE_DIM), dtype=np.float32)
        self.bases = np.stack([np.linalg.qr(b)[0] for b in bases]).astype(np.float32)  # orthonormal columns
        # Cluster sizes vary (log-normal), as species do in a photo collection
        self.weights = rng.lognormal(0.0, 1.0, size=clusters)
        self.weights /= self.weights.sum()

    def members(self, cluster_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        coefficients = rng.standard_normal((len(cluster_ids), SUBSPACE_DIM), dtype=np.float32)
        coefficients *= NOISE / np.sqrt(SUBSPACE_DIM)
        vectors = self.centres[cluster_ids]
        subspaces = cluster_ids % SUBSPACE_POOL
        for subspace in np.unique(subspaces):  # one matrix product per subspace, not a [n, dim, 64] gather
            rows = subspaces == subspace
            vectors[rows] += coefficients[rows] @ self.bases[subspace].T
        return normalize(vectors)

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        return self.members(rng.choice(len(self.centres), size=count, p=self.weights), rng)


def generate(path: Path, count: int, duplicates: int, collection: Collection, seed: int) -> np.ndarray:
    """Write ``count`` vectors to ``path`` (.npy, in chunks); the last ``duplicates`` rows are near-copies of random
    earlier rows. Returns the planted pairs ``[duplicates, 2]``."""
    rng = np.random.default_rng(seed)
    stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, collection.dim))
    originals = count - duplicates
    for part in chunks(originals, 32_768):
        stored[part] = collection.draw(part.stop - part.start, rng)
    sources = np.sort(rng.choice(originals, size=duplicates, replace=False))
    copies = np.asarray(stored[sources]) + rng.standard_normal((duplicates, collection.dim), dtype=np.float32) * (
        DUPLICATE_NOISE / np.sqrt(collection.dim)
    )
    stored[originals:] = normalize(copies)
    stored.flush()
    return np.stack([sources, np.arange(originals, count)], axis=1)


def rss_mib() -> dict[str, float]:
    """Resident memory in MiB: private (``anon``: what the process owns) and file-backed (``file``: pages of
    memory-mapped files, shared with the page cache and dropped under memory pressure)."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            for key, name in (("RssAnon:", "anon"), ("RssFile:", "file")):
                if line.startswith(key):
                    found[name] = int(line.split()[1]) / 1024
    return found


def inverted_lists_kind(index: object) -> str:
    """The class of the faiss index's inverted lists: ``OnDiskInvertedLists`` when they are memory-mapped."""
    faiss = import_faiss()
    lists = faiss.extract_index_ivf(index).invlists
    return type(faiss.downcast_InvertedLists(lists)).__name__


def search_figures(directory: Path, collection: Collection, plan_dict: dict, queries_count: int) -> dict:
    rng = np.random.default_rng(12345)
    queries = collection.draw(queries_count, rng)
    started = time.perf_counter()
    (_, truth) = exact_search(np.load(directory / VECTORS_FILE, mmap_mode="r"), queries, K)
    exact_s = time.perf_counter() - started

    # Resident memory of the index alone: its mapping opened after the exact search's was closed
    rss_before = rss_mib()
    started = time.perf_counter()
    index = load_index(directory, IndexPlan(**plan_dict))
    load_s = time.perf_counter() - started
    memory_after_load = {key: value - rss_before[key] for (key, value) in rss_mib().items()}

    index.search(queries[:20], K)  # warm the code paths (and the pages of the first lists)
    (latencies, cpu_ms, found) = ([], [], [])
    load_before = os.getloadavg()
    for query in queries:
        (started, started_cpu) = (time.perf_counter(), time.thread_time())
        (_, ids) = index.search(query[None], K)
        latencies.append((time.perf_counter() - started) * 1000)
        cpu_ms.append((time.thread_time() - started_cpu) * 1000)
        found.append(ids[0])
    figures = {
        "search_parameters": index.plan.describe(),
        "recall_at_10": recall_at(np.stack(found), truth),
        "query_ms_p50": float(np.percentile(latencies, 50)),
        "query_ms_p99": float(np.percentile(latencies, 99)),
        "query_cpu_ms_p50": float(np.percentile(cpu_ms, 50)),
        "query_cpu_ms_p99": float(np.percentile(cpu_ms, 99)),
        "load_average_during_queries": [round(value, 2) for value in (*load_before, *os.getloadavg())],
        "faiss_threads_single_query": 1,
        "load_s": load_s,
        "inverted_lists": inverted_lists_kind(index.index),
        "exact_search_1000_queries_s": exact_s,
        "memory_mib_after_load": memory_after_load,
        "memory_mib_after_load_and_queries": {key: value - rss_before[key] for (key, value) in rss_mib().items()},
    }
    print(
        f"search ({figures['search_parameters']}): recall@10 {figures['recall_at_10']:.4f}, "
        f"p50 {figures['query_ms_p50']:.2f} ms, p99 {figures['query_ms_p99']:.2f} ms "
        f"(CPU p50 {figures['query_cpu_ms_p50']:.2f} ms, p99 {figures['query_cpu_ms_p99']:.2f} ms; "
        f"load average before/after {figures['load_average_during_queries']})",
        flush=True,
    )
    return figures


def duplicate_figures(directory: Path, plan_dict: dict, planted: np.ndarray, threshold: float) -> dict:
    from birder.search.duplicates import connected_groups, near_pairs

    index = load_index(directory, IndexPlan(**plan_dict))
    started = time.perf_counter()
    pairs = near_pairs(index, threshold)
    seconds = time.perf_counter() - started
    groups = connected_groups(pairs)
    group_of = {member: number for (number, group) in enumerate(groups) for member in group}
    planted_found = sum(1 for (a, b) in planted if a in group_of and group_of[a] == group_of.get(b))
    planted_set = {tuple(sorted(pair)) for pair in planted.tolist()}
    # A found pair is right when it is a planted pair (generated vectors are otherwise never that close)
    correct = sum(1 for pair in pairs.tolist() if tuple(pair) in planted_set)
    return {
        "threshold": threshold,
        "seconds": seconds,
        "pairs_found": len(pairs),
        "groups": len(groups),
        "pair_precision": correct / max(len(pairs), 1),
        "pair_recall": planted_found / max(len(planted), 1),
    }


def vector_benchmark(args: argparse.Namespace, workdir: Path) -> dict:
    clusters = args.clusters or max(1, args.vectors // VECTORS_PER_CLUSTER)
    collection = Collection(args.dim, clusters, seed=0)
    duplicates = max(1, args.vectors // 1000)
    started = time.perf_counter()
    stored = workdir / VECTORS_FILE
    reused = args.reuse and stored.is_file() and (workdir / PLANTED_FILE).is_file()
    if reused and np.load(stored, mmap_mode="r").shape == (args.vectors, args.dim):
        planted = np.load(workdir / PLANTED_FILE)
    else:
        reused = False
        planted = generate(stored, args.vectors, duplicates, collection, seed=1)
        np.save(workdir / PLANTED_FILE, planted)
    generate_s = time.perf_counter() - started

    vectors = np.load(stored, mmap_mode="r")
    plan = choose_plan(len(vectors), args.dim)
    started = time.perf_counter()
    index = build_index(vectors, plan)
    index.save(workdir)
    build_s = time.perf_counter() - started
    print(f"index: {index.plan.describe()} (built in {build_s:.1f} s)", flush=True)
    plan_dict = index.plan.as_dict()
    del index, vectors
    figures = {
        "vectors": args.vectors,
        "dim": args.dim,
        "clusters": clusters,
        "planted_duplicates": duplicates,
        "generate_s": None if reused else generate_s,
        "build_s": build_s,
        "plan": plan_dict,
        "bytes_per_vector_disk": {
            "faiss": os.path.getsize(workdir / FAISS_FILE) / args.vectors,
            "vectors_npy": os.path.getsize(workdir / VECTORS_FILE) / args.vectors,
        },
    }
    figures["search"] = search_figures(workdir, collection, plan_dict, args.queries)
    for moment in ("after_load", "after_load_and_queries"):
        memory = figures["search"][f"memory_mib_{moment}"]
        figures[f"bytes_per_vector_memory_{moment}"] = {
            key: value * 2**20 / args.vectors for (key, value) in memory.items()
        }
    figures["duplicates"] = duplicate_figures(workdir, plan_dict, planted, args.threshold)
    print(f"duplicates: {figures['duplicates']}", flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--clusters", type=int, help="default: one per 100 vectors (10,000 for a million)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threshold", type=float, default=0.98, help="duplicate cosine similarity")
    parser.add_argument("--overhead-photos", type=int, default=0, help="also measure indexing overhead on N photos")
    parser.add_argument("--workdir", type=Path, help="where the index files go (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="keep the vectors generated earlier in --workdir")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/similarity.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="birder-similarity-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpu": cpu_name(), "load_average_before": os.getloadavg()}
    try:
        if args.vectors > 0:
            results["index"] = vector_benchmark(args, workdir)
        if args.overhead_photos > 0:
            from benchmarks.similarity_overhead import overhead_figures

            results["overhead"] = overhead_figures(args.overhead_photos, workdir / "photos")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(results, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

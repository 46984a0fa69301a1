"""Similarity-search figures: recall, latency, build time, bytes per vector, duplicate detection, indexing overhead.

    python -m benchmarks.similarity                   # 1,000,000 vectors of dimension 1024 (about 15 minutes)
    python -m benchmarks.similarity --vectors 100000  # a smaller run
    python -m benchmarks.similarity --overhead-photos 300 --vectors 0   # only the indexing overhead

The collection has neighbour structure like photo embeddings: 10,000 clusters of varying size, each vector a unit
vector made of its cluster's centre plus noise in a 64-dimensional subspace (one of a pool of random subspaces),
plus planted near-duplicates (a copy of a vector with a little noise). Vectors are generated in chunks straight
into the memory-mapped ``vectors.npy`` of an index folder, then indexed as ``birder-index build`` does. Ground
truth: exact search for 1,000 held-out queries (new members of the clusters). Every figure is printed with the CPU.
"""

from __future__ import annotations

import argparse
import json
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
    build_index,
    choose_plan,
    chunks,
    exact_search,
    load_index,
    normalize,
    recall_at,
)

SUBSPACE_DIM = 64
SUBSPACE_POOL = 64
NOISE = 0.9  # noise norm relative to the unit centre: members sit at cosine ~0.75 from it, ~0.55 from each other
DUPLICATE_NOISE = 0.05  # a near-duplicate is at cosine ~0.999 from its original
K = 10


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


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


def search_figures(directory: Path, collection: Collection, plan_dict: dict, queries_count: int) -> dict:
    from birder.search.vectors import IndexPlan

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

    index.search(queries[:20], K)  # warm the code paths (and the pages of the first lists)
    latencies = []
    found = []
    for query in queries:
        started = time.perf_counter()
        (_, ids) = index.search(query[None], K)
        latencies.append((time.perf_counter() - started) * 1000)
        found.append(ids[0])
    return {
        "recall_at_10": recall_at(np.stack(found), truth),
        "query_ms_p50": float(np.percentile(latencies, 50)),
        "query_ms_p99": float(np.percentile(latencies, 99)),
        "load_s": load_s,
        "exact_search_1000_queries_s": exact_s,
        "memory_mib_after_load_and_queries": {key: value - rss_before[key] for (key, value) in rss_mib().items()},
    }


def duplicate_figures(directory: Path, plan_dict: dict, planted: np.ndarray, threshold: float) -> dict:
    from birder.search.duplicates import connected_groups, near_pairs
    from birder.search.vectors import IndexPlan

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
    collection = Collection(args.dim, args.clusters, seed=0)
    duplicates = max(1, args.vectors // 1000)
    started = time.perf_counter()
    planted = generate(workdir / VECTORS_FILE, args.vectors, duplicates, collection, seed=1)
    generate_s = time.perf_counter() - started

    vectors = np.load(workdir / VECTORS_FILE, mmap_mode="r")
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
        "clusters": args.clusters,
        "planted_duplicates": duplicates,
        "generate_s": generate_s,
        "build_s": build_s,
        "plan": plan_dict,
        "bytes_per_vector_disk": {
            "faiss": os.path.getsize(workdir / FAISS_FILE) / args.vectors,
            "vectors_npy": os.path.getsize(workdir / VECTORS_FILE) / args.vectors,
        },
    }
    figures["search"] = search_figures(workdir, collection, plan_dict, args.queries)
    memory = figures["search"]["memory_mib_after_load_and_queries"]
    figures["bytes_per_vector_memory"] = {key: value * 2**20 / args.vectors for (key, value) in memory.items()}
    figures["duplicates"] = duplicate_figures(workdir, plan_dict, planted, args.threshold)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threshold", type=float, default=0.98, help="duplicate cosine similarity")
    parser.add_argument("--overhead-photos", type=int, default=0, help="also measure indexing overhead on N photos")
    parser.add_argument("--workdir", type=Path, help="where the index files go (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/similarity.json"))
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="birder-similarity-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpu": cpu_name()}
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

"""Indexing overhead: what ``birder-index build`` costs beyond the embedding pass birder-predict would make.

    python -m benchmarks.similarity --overhead-photos 300 --vectors 0
    python -m benchmarks.similarity_overhead --photos 300     # the same figures alone

On ``photos`` generated photos (one object on a textured background, ``benchmarks.synthetic``) at the model's input
size, with a ViT-S/16 at 224 x 224 (random weights: the time of a forward pass does not depend on them):

- **embedding pass**: birder-predict's loop, :class:`~birder.inference.predictor.Predictor` with
  ``return_embedding=True`` over the files (the same loader: decoding, EXIF, transform, batches, workers), its
  batches consumed and dropped;
- **build**: :func:`birder.search.build.run_index` into a new folder with the same model object, batch size and
  workers: the same pass plus the journal (a durable write per chunk), ``photos.parquet``, ``vectors.npy``, the
  vector index and ``index.json``.

Overhead = (build - embedding pass) / embedding pass. One warm-up of each (page cache, worker start-up code,
PyTorch's kernels), then the two alternate ``repeats`` times and the medians are compared; alternating keeps a
change of machine load from landing on one side only. Model loading is outside both timings (the build is handed
the loaded model). The ViT-S/16 is the smallest network a user would index with; the published ViT-L/16 costs about
13 times more per photo while the indexing work per photo grows only with the embedding's size (1024 vs 384
floats), so its overhead share is smaller.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

NETWORK = "vit_s16"
SIZE = 224
CLASSES = [0, 9, 18, 27, 36, 45]
BATCH_SIZE = 32
TARGET = 0.05


def _model(size: int) -> Any:
    from birder.data.transforms import classification_transform
    from birder.model_registry import registry
    from birder.search.build import LoadedModel
    from birder.search.fingerprint import model_fingerprint

    torch.manual_seed(0)
    net = registry.net_factory(NETWORK, len(CLASSES), size=(size, size)).eval()
    transform = classification_transform((size, size), {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    names = [f"class_{i}" for i in range(len(CLASSES))]
    description = {"name": None, "weights": None, "network": NETWORK}
    return LoadedModel(net, transform, names, model_fingerprint(net, transform), description)


def _photos(count: int, root: Path, size: int) -> list[str]:
    from benchmarks.synthetic import make_class_folder

    per_class = -(-count // len(CLASSES))
    make_class_folder(root, CLASSES, per_class, size=size, seed=0)
    paths = sorted(str(path) for path in root.rglob("*.png"))
    return paths[:count]


def _timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def overhead_figures(
    photos: int,
    workdir: Path,
    *,
    repeats: int = 3,
    batch_size: int = BATCH_SIZE,
    num_workers: int | None = None,
    size: int = SIZE,
) -> dict[str, Any]:
    """Embedding-pass and build times on ``photos`` generated photos written under ``workdir`` (removed after)."""
    from birder.inference.predictor import Predictor
    from birder.search import build as build_module
    from birder.search.build import IndexOptions, run_index

    workers = num_workers if num_workers is not None else IndexOptions([], Path()).num_workers
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        paths = _photos(photos, workdir / "photos", size)
        loaded = _model(size)

        def embedding_pass() -> None:
            predictor = Predictor(
                loaded.net, loaded.transform, batch_size=batch_size, num_workers=workers, return_embedding=True
            )
            for batch in predictor.predict_files(paths):
                assert batch.embeddings is not None and not batch.failures

        finish_seconds: list[float] = []
        original_finish = build_module._finish

        def timed_finish(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original_finish(*args, **kwargs)
            finally:
                finish_seconds.append(time.perf_counter() - started)

        def build(run: int) -> None:
            output = workdir / f"index-{run}"
            options = IndexOptions(
                paths, output, batch_size=batch_size, num_workers=workers, device="cpu", progress=False
            )
            report = run_index(options, add=False, loaded=loaded)
            assert report.total == len(paths) and report.failures == 0
            shutil.rmtree(output)

        build_module._finish = timed_finish  # type: ignore[assignment]
        try:
            forward_times = []
            build_times = []
            _timed(embedding_pass)  # warm-up, not counted
            _timed(lambda: build(-1))
            finish_seconds.clear()
            for run in range(repeats):
                forward_times.append(_timed(embedding_pass))
                build_times.append(_timed(lambda run=run: build(run)))
        finally:
            build_module._finish = original_finish  # type: ignore[assignment]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    forward = statistics.median(forward_times)
    built = statistics.median(build_times)
    overhead = (built - forward) / forward
    figures = {
        "photos": photos,
        "model": f"{NETWORK} at {size}x{size}, random weights, embedding {loaded.net.embedding_size} floats",
        "batch_size": batch_size,
        "num_workers": workers,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "embedding_pass_s": forward_times,
        "build_s": build_times,
        "build_finish_s": finish_seconds,
        "embedding_pass_median_s": forward,
        "build_median_s": built,
        "embedding_pass_ms_per_photo": forward / photos * 1000,
        "overhead": overhead,
        "overhead_target": TARGET,
        "load_average_after": os.getloadavg(),
    }
    print(
        f"indexing overhead on {photos} photos ({figures['model']}, batch {batch_size}, {workers} workers): "
        f"embedding pass {forward:.2f} s, build {built:.2f} s (median of {repeats}) -> {overhead:+.1%} "
        f"(target <= {TARGET:.0%})",
        flush=True,
    )
    return figures


def main() -> None:
    from benchmarks.similarity import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--output", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args()

    results = {"cpu": cpu_name(), "load_average_before": os.getloadavg()}
    workdir = Path(tempfile.mkdtemp(prefix="birder-overhead-"))
    results["overhead"] = overhead_figures(
        args.photos, workdir, repeats=args.repeats, batch_size=args.batch_size, num_workers=args.num_workers
    )
    print(json.dumps(results, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

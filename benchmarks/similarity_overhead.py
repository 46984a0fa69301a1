"""Indexing overhead: what ``birder-index build`` costs beyond the network's forward pass.

    python -m benchmarks.similarity --overhead-photos 300 --vectors 0
    python -m benchmarks.similarity_overhead --photos 300     # the same figures alone

On ``photos`` generated photos (one object on a textured background, ``benchmarks.synthetic``) at the model's input
size, with a ViT-S/16 at 224 x 224 (random weights: the time of a forward pass does not depend on them) in the
dtype ``birder-index build`` would choose here (``--dtype auto``: bfloat16 on a CPU with native bf16), each repeat
runs :func:`birder.search.build.run_index` into a new folder and measures its parts where they run:

- **forward**: :meth:`~birder.inference.predictor.Predictor.predict_tensor` (the network on each batch);
- **loading**: the rest of the embedding loop (decoding, EXIF, transform, batching), what birder-predict does too;
- **journal**: the journal rows of each batch (:func:`~birder.search.build.batch_rows`) and their durable writes;
- **finish**: ``photos.parquet``, ``vectors.npy``, the vector index, ``failures.csv`` and ``index.json``;
- **setup**: the rest of the run (finding the photos, preparing the journal folder).

Overhead = (journal + finish + setup) / forward, the issue's measure (indexing work beyond the forward pass); the
share of the whole embedding pass (forward + loading) is printed beside it.

Each part is timed in process CPU time, not wall-clock time: on a machine shared with other work, waiting for a core
lands on whichever part happens to run, and a wall-clock difference of two runs (build minus a bare embedding pass)
is mostly that noise. The network runs on one thread and the photos are decoded in the process (no workers), so the
process's CPU time is the work itself (a second thread spinning at a barrier would count as work). Median of
``repeats`` runs after a warm-up. Wall-clock times of the same parts are recorded too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

NETWORK = "vit_s16"
SIZE = 224
CLASSES = [0, 9, 18, 27, 36, 45]
BATCH_SIZE = 32
TARGET = 0.05
PARTS = ("forward", "embed_loop", "journal", "finish", "total")


def _model(size: int, dtype: str) -> Any:
    from birder.data.transforms import classification_transform
    from birder.inference.optimize import choose_dtype, optimize_for_inference
    from birder.model_registry import registry
    from birder.search.build import LoadedModel
    from birder.search.fingerprint import model_fingerprint

    torch.manual_seed(0)
    net = registry.net_factory(NETWORK, len(CLASSES), size=(size, size)).eval()
    transform = classification_transform((size, size), {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    names = [f"class_{i}" for i in range(len(CLASSES))]
    description = {"name": None, "weights": None, "network": NETWORK}
    fingerprint = model_fingerprint(net, transform)
    # As load_embedding_model does for birder-index build
    choice = choose_dtype(dtype, "cpu")
    net = optimize_for_inference(net, choice.dtype)
    return LoadedModel(net, transform, names, fingerprint, description, choice)


def _photos(count: int, root: Path, size: int) -> list[str]:
    from benchmarks.synthetic import make_class_folder

    per_class = -(-count // len(CLASSES))
    make_class_folder(root, CLASSES, per_class, size=size, seed=0)
    paths = sorted(str(path) for path in root.rglob("*.png"))
    return paths[:count]


class _Clock:
    """CPU and wall-clock seconds spent inside each named part (nested parts count in both)."""

    def __init__(self) -> None:
        self.cpu = dict.fromkeys(PARTS, 0.0)
        self.wall = dict.fromkeys(PARTS, 0.0)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        (cpu, wall) = (time.process_time(), time.perf_counter())
        try:
            yield
        finally:
            self.cpu[name] += time.process_time() - cpu
            self.wall[name] += time.perf_counter() - wall

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return function(*args, **kwargs)

        return timed


@contextmanager
def _instrumented(clock: _Clock) -> Iterator[None]:
    """The build's parts timed where they run (module attributes patched, restored on exit)."""
    from birder.inference.predictor import Predictor
    from birder.search import build as build_module

    class TimedJournals(build_module.JournalSet):  # type: ignore[misc,name-defined]
        def add(self, *args: Any, **kwargs: Any) -> None:
            with clock.part("journal"):
                super().add(*args, **kwargs)

        def close(self) -> None:
            with clock.part("journal"):
                super().close()

    saved = {name: getattr(build_module, name) for name in ("batch_rows", "_embed", "_finish", "JournalSet")}
    saved_forward = Predictor.predict_tensor
    build_module.batch_rows = clock.wrap("journal", saved["batch_rows"])
    build_module._embed = clock.wrap("embed_loop", saved["_embed"])
    build_module._finish = clock.wrap("finish", saved["_finish"])
    build_module.JournalSet = TimedJournals
    Predictor.predict_tensor = clock.wrap("forward", saved_forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(build_module, name, value)
        Predictor.predict_tensor = saved_forward  # type: ignore[method-assign]


def _split(times: dict[str, float]) -> dict[str, float]:
    """Measured parts -> the reported ones (journal time is inside the embedding loop, which holds the forward)."""
    loading = times["embed_loop"] - times["forward"] - times["journal"]
    setup = times["total"] - times["embed_loop"] - times["finish"]
    overhead = times["journal"] + times["finish"] + setup
    return {
        "forward": times["forward"],
        "loading": loading,
        "journal": times["journal"],
        "finish": times["finish"],
        "setup": setup,
        "overhead": overhead,
        "overhead_share_of_forward": overhead / times["forward"],
        "overhead_share_of_embedding_pass": overhead / (times["forward"] + loading),
    }


def overhead_figures(
    photos: int,
    workdir: Path,
    *,
    repeats: int = 5,
    batch_size: int = BATCH_SIZE,
    size: int = SIZE,
    dtype: str = "auto",
) -> dict[str, Any]:
    """The parts of ``repeats`` builds over ``photos`` generated photos written under ``workdir`` (removed after)."""
    from birder.search.build import IndexOptions, run_index

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs: list[dict[str, float]] = []
    walls: list[dict[str, float]] = []
    try:
        paths = _photos(photos, workdir / "photos", size)
        loaded = _model(size, dtype)
        for run in range(repeats + 1):  # the first is a warm-up (page cache, kernels), not counted
            output = workdir / f"index-{run}"
            options = IndexOptions(paths, output, batch_size=batch_size, num_workers=0, device="cpu", progress=False)
            clock = _Clock()
            with _instrumented(clock), clock.part("total"):
                report = run_index(options, add=False, loaded=loaded)
            assert report.total == len(paths) and report.failures == 0
            shutil.rmtree(output)
            if run > 0:
                runs.append(_split(clock.cpu))
                walls.append(_split(clock.wall))
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(workdir, ignore_errors=True)

    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    wall_median = {key: statistics.median(run[key] for run in walls) for key in walls[0]}
    figures = {
        "photos": photos,
        "model": f"{NETWORK} at {size}x{size}, random weights, embedding {loaded.net.embedding_size} floats",
        "dtype": str(loaded.dtype),
        "batch_size": batch_size,
        "num_workers": 0,
        "torch_threads": 1,
        "repeats": repeats,
        "cpu_s_median": median,
        "cpu_s_runs": runs,
        "wall_s_median": wall_median,
        "forward_cpu_ms_per_photo": median["forward"] / photos * 1000,
        "overhead": median["overhead_share_of_forward"],
        "overhead_target": TARGET,
        "load_average_after": os.getloadavg(),
    }
    print(
        f"indexing overhead on {photos} photos ({figures['model']}, {figures['dtype']}, batch {batch_size}), "
        f"process CPU time, median of {repeats}: forward {median['forward']:.2f} s, loading {median['loading']:.2f} s; "
        f"journal {median['journal']:.3f} s + finish {median['finish']:.3f} s + setup {median['setup']:.3f} s = "
        f"{median['overhead']:.3f} s -> {median['overhead_share_of_forward']:.1%} of the forward pass "
        f"({median['overhead_share_of_embedding_pass']:.1%} of the embedding pass; target <= {TARGET:.0%})",
        flush=True,
    )
    return figures


def main() -> None:
    from benchmarks.similarity import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--dtype", default="auto", help="as birder-index build --dtype (default: auto)")
    parser.add_argument("--output", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args()

    results = {"cpu": cpu_name(), "load_average_before": os.getloadavg()}
    workdir = Path(tempfile.mkdtemp(prefix="birder-overhead-"))
    results["overhead"] = overhead_figures(
        args.photos, workdir, repeats=args.repeats, batch_size=args.batch_size, dtype=args.dtype
    )
    print(json.dumps(results, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

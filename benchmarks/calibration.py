"""What calibration costs at prediction time: the card's model shape with and without a full calibration.

    python -m benchmarks.calibration [--workdir DIR] [--batch-size 2] [--repeats 5] [--output FILE] [--tiny]

The model is vit_l16 with 707 classes at 256 px, random weights (``benchmarks.load_memory``'s checkpoint). Its
calibrated copy carries everything ``birder-calibrate`` can add: a temperature, a threshold for every species, the
unknown thresholds and a class-statistics sidecar (means, shared precision matrix, 32 normalised embeddings per
class for kNN), and prediction uses a 707-species taxonomy. Both are timed the way ``birder-predict`` runs them:

- load: ``birder.load_model`` (plus, for the calibrated one, the decision policy with its class statistics);
- predict: ``infer_batch`` on a batch of transformed photos, plus steps 4-8 of the decision order (knn unknown
  test, per-species thresholds, taxonomic fallback) for the calibrated one.

Runs alternate between the two models; figures are medians. The extra work is also timed on its own (steps 4-8 on
the batch's probabilities and embeddings, many times: it is small and deterministic), which stays readable on a
busy machine where two forward passes of the same model differ by more than the overhead. The target (issue:
calibrated answers) is no more than 5 % extra time per photo.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import birder
from benchmarks.load_memory import ensure_checkpoint
from birder.inference.classification import infer_batch
from birder.inference.decision import build_policy
from birder.inference.optimize import cpu_model
from birder.inference.unknown import ClassStatistics
from birder.io.atomic import atomic_write_path
from birder.io.calibration import Calibration, head_digest, stats_path_for

TARGET_OVERHEAD = 0.05


def _calibrated_copy(plain: Path, workdir: Path) -> tuple[Path, Path]:
    """The calibrated copy of ``plain`` (written once) and a taxonomy of its classes."""
    path = workdir / f"{plain.stem}_calibrated.pt"
    taxonomy = workdir / f"{plain.stem}_taxonomy.csv"
    (net, info) = birder.load_model(plain, inference=True)
    names = sorted(info.class_to_idx, key=info.class_to_idx.__getitem__)
    if not taxonomy.is_file():
        rows = [f"{name},G{i // 4},F{i // 20},O{i // 100}" for (i, name) in enumerate(names)]
        taxonomy.write_text("species,genus,family,order\n" + "\n".join(rows) + "\n", encoding="utf-8")
    if path.is_file():
        return (path, taxonomy)

    print(f"writing {path} and its class statistics (once)...", flush=True)
    rng = np.random.default_rng(0)
    dim = net.embedding_size
    targets = np.repeat(np.arange(len(names)), 32)
    statistics_ = ClassStatistics.fit(rng.normal(size=(len(targets), dim)).astype(np.float32), targets, names)
    statistics_.save(stats_path_for(path))
    net.calibration = Calibration(
        temperature=1.7,
        species_thresholds=dict.fromkeys(names, 0.6),
        target_precision=0.95,
        unknown_method="knn",
        unknown_thresholds={"msp": 0.9, "energy": -2.0, "mahalanobis": 2000.0, "knn": 0.5},
        keep_known=0.95,
        stats_file=stats_path_for(path).name,
        head_digest=head_digest(net.state_dict()),
    )
    birder.save_model(net, path, info)
    return (path, taxonomy)


def _seconds(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def run(workdir: Path, batch_size: int, repeats: int, tiny: bool) -> dict:
    plain = ensure_checkpoint(workdir, "pt", tiny=tiny)
    (calibrated, taxonomy) = _calibrated_copy(plain, workdir)

    def load_plain() -> object:
        return birder.load_model(plain, inference=True)

    def load_calibrated() -> tuple:
        (net, info) = birder.load_model(calibrated, inference=True)
        names = sorted(info.class_to_idx, key=info.class_to_idx.__getitem__)
        return (net, build_policy(net, names, min_prob=0.5, taxonomy=taxonomy))

    (plain_net, info) = load_plain()
    (calibrated_net, policy) = load_calibrated()
    size = birder.get_size_from_signature(info.signature)
    inputs = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0))

    def predict_plain() -> object:
        return infer_batch(plain_net, inputs)

    def predict_calibrated() -> object:
        (probabilities, embeddings) = infer_batch(calibrated_net, inputs, return_embedding=True)
        return policy.decide(probabilities, embeddings=embeddings)

    predict_plain()  # warm-up: first-call allocations are nobody's overhead
    predict_calibrated()
    (probabilities, embeddings) = infer_batch(calibrated_net, inputs, return_embedding=True)
    decision_runs = [_seconds(lambda: policy.decide(probabilities, embeddings=embeddings)) for _ in range(50)]
    times: dict[str, list[float]] = {name: [] for name in ("load_plain", "load_calibrated", "predict_plain", "predict")}
    for _ in range(repeats):  # interleaved: drifts of the machine hit both alike
        times["load_plain"].append(_seconds(load_plain))
        times["load_calibrated"].append(_seconds(load_calibrated))
        times["predict_plain"].append(_seconds(predict_plain))
        times["predict"].append(_seconds(predict_calibrated))

    median = {name: statistics.median(values) for (name, values) in times.items()}
    per_photo = {
        "plain": median["predict_plain"] / batch_size,
        "calibrated": median["predict"] / batch_size,
        "decision_steps": statistics.median(decision_runs) / batch_size,
    }
    return {
        "machine": {"cpu_model": cpu_model(), "threads": torch.get_num_threads()},
        "model": plain.name,
        "batch_size": batch_size,
        "repeats": repeats,
        "runs_s": times,
        "load_s": {"plain": median["load_plain"], "calibrated": median["load_calibrated"]},
        "per_photo_s": per_photo,
        "predict_overhead": per_photo["calibrated"] / per_photo["plain"] - 1.0,
        "decision_overhead": per_photo["decision_steps"] / per_photo["plain"],
        "load_overhead_s": median["load_calibrated"] - median["load_plain"],
        "target_overhead": TARGET_OVERHEAD,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work"), help="where the model files go")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a tiny stand-in for the model (smoke runs)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/calibration.json"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    report = run(args.workdir, args.batch_size, args.repeats, args.tiny)
    machine = report["machine"]
    print(f"{report['model']} on {machine['cpu_model']}, {machine['threads']} threads, batch {report['batch_size']}:")
    print(f"  load:      plain {report['load_s']['plain']:.3f} s, calibrated {report['load_s']['calibrated']:.3f} s")
    per_photo = report["per_photo_s"]
    print(
        f"  per photo: plain {per_photo['plain']:.3f} s, calibrated {per_photo['calibrated']:.3f} s: "
        f"{100 * report['predict_overhead']:+.2f} % (target: at most {100 * TARGET_OVERHEAD:.0f} %)"
    )
    print(
        f"  the added steps alone: {1000 * per_photo['decision_steps']:.2f} ms per photo, "
        f"{100 * report['decision_overhead']:.3f} % of the plain time per photo"
    )
    with atomic_write_path(args.output) as tmp_path:
        tmp_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

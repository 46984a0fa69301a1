"""``birder-predict --detector`` end to end, ``--decode full`` (the path before reduced decoding) against
``--decode reduced`` (the default), with ``-j 0`` and ``-j 2``: photos/hour and each stage's seconds (``run.json``).

    python -m benchmarks.detect_run                          # 24 photos of 4000 x 3000: about 4 minutes on 2 cores
    python -m benchmarks.detect_run --threshold 0.993        # fewer boxes: most frames empty, as camera traps are
    python -m benchmarks.detect_run --tiny                   # a smoke run (seconds)

The photos are ``benchmarks.decode``'s textured camera-trap scenes (JPEG quality 90); the detector a seeded Faster
R-CNN on vit_t16 at 512 px whose class scores are spread out (``benchmarks.decode.seeded_detector``: ``--threshold``
picks how many boxes a photo gets), the classifier a seeded vit_t16 at 224 px (10 classes): small models, so that
decoding and cropping show. Each configuration runs the same command a user would (``birder-predict``'s ``main``),
one after the other on the same photos; the figures are wall times on whatever else the machine is running (the
machine's load is recorded).
"""

import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

import birder
from benchmarks.decode import REPORTED_FLAGS, STATS, seeded_detector, write_photo
from benchmarks.inference import machine_description
from birder.inference.optimize import cpu_flags
from birder.io.checkpoint import ModelInfo, make_signature
from birder.model_registry import registry
from birder.net.detection.checkpoint import save_detector
from birder.scripts.predict import main as predict_main

TINY_CONFIG = {"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64}


def make_models(workdir: Path, detector_size: int, classifier_size: int, tiny: bool) -> tuple[Path, Path]:
    """The seeded detector and classifier files (made once per work folder)."""
    (detector, classifier) = (workdir / f"det_{detector_size}.pt", workdir / f"cls_{classifier_size}.pt")
    if not detector.is_file():
        det = seeded_detector("vit_t16", detector_size, tiny=tiny)
        info = ModelInfo({"animal": 0, "person": 1, "vehicle": 2}, make_signature(3, (detector_size,) * 2, 3), STATS)
        save_detector(det, detector, info)
    if not classifier.is_file():
        torch.manual_seed(0)
        config = TINY_CONFIG if tiny else None
        net = registry.net_factory("vit_t16", 10, config=config, size=(classifier_size, classifier_size)).eval()
        birder.save_model(net, classifier, birder.ModelInfo({f"species_{i}": i for i in range(10)}, None, STATS))
    return (detector, classifier)


def run_once(photos: Path, detector: Path, classifier: Path, output: Path, decode: str, workers: int, threshold: float):
    args = ["--weights", str(classifier), "--detector", str(detector), str(photos), "-j", str(workers)]
    args += ["--no-progress", "--overwrite", "--det-threshold", str(threshold), "--output-dir", str(output)]
    started = time.perf_counter()
    if predict_main([*args, "--decode", decode]) != 0:
        raise SystemExit(f"birder-predict --decode {decode} -j {workers} failed")
    wall = time.perf_counter() - started
    run = json.loads((output / "run.json").read_text())
    with open(output / "results.csv", newline="") as handle:
        boxes = sum(row["source"] == "detection" for row in csv.DictReader(handle))
    photos_done = run["photos_this_run"]
    return {
        "command_s": round(wall, 2),
        "loop_s": run["seconds"],
        "photos_per_hour": round(3600 * photos_done / run["seconds"]) if run["seconds"] > 0 else None,
        "boxes": boxes,
        "detector_dtype": run["detector_dtype"],
        "stages_s": {stage: values["seconds"] for stage, values in run["stages"].items()},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/birder_bench_detect_run"))
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--threshold", type=float, default=0.985, help="--det-threshold (0.985: about 2 boxes a photo)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 4 small photos, tiny networks")
    parser.add_argument("--output", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args(argv)

    (photo_size, detector_size, classifier_size) = ((4000, 3000), 512, 224)
    if args.tiny:
        (args.photos, photo_size, detector_size, classifier_size) = (4, (800, 600), 128, 32)
    photos = args.workdir / f"photos_{photo_size[0]}"
    photos.mkdir(parents=True, exist_ok=True)
    for index in range(args.photos):
        if not (photos / f"scene_{index:03d}.jpg").is_file():
            write_photo(photos / f"scene_{index:03d}.jpg", photo_size, index)
    (detector, classifier) = make_models(args.workdir, detector_size, classifier_size, args.tiny)

    machine = machine_description(torch.device("cpu"))
    flags = cpu_flags()
    machine["flags_of_note"] = {flag: flag in flags for flag in REPORTED_FLAGS}
    machine["load_average_at_start"] = os.getloadavg()
    report: dict[str, Any] = {
        "machine": machine,
        "photos": args.photos,
        "photo_size": list(photo_size),
        "detector": f"faster_rcnn vit_t16 {detector_size} px (seeded)",
        "classifier": f"vit_t16 {classifier_size} px (seeded)",
        "threshold": args.threshold,
        "runs": {},
    }
    print(f"CPU: {machine['cpu_model']}, {machine['threads']} threads; flags: {machine['flags_of_note']}")
    for workers in args.workers:
        for decode in ("full", "reduced"):
            name = f"{decode} -j {workers}"
            output = args.workdir / f"out_{decode}_{workers}"
            report["runs"][name] = run_once(photos, detector, classifier, output, decode, workers, args.threshold)
            print(name, json.dumps(report["runs"][name]), flush=True)
        (full, reduced) = (report["runs"][f"full -j {workers}"], report["runs"][f"reduced -j {workers}"])
        report[f"speedup_j{workers}"] = round(full["loop_s"] / reduced["loop_s"], 2) if reduced["loop_s"] else None
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()

"""What crop-then-classify buys on small animals in large frames: species top-1 against whole-image classification.

    python -m benchmarks.crop_classify [--workdir DIR] [--output FILE]      # 11 CPU-minutes: ~6 min on 2 cores
    python -m benchmarks.crop_classify --detector det.pt                      # an existing detector, not trained here
    python -m benchmarks.crop_classify --tiny                                 # a smoke run (seconds)

1. Generated data (``benchmarks.synthetic``: rendered objects on cluttered backgrounds, 8 classes, each its own
   shape and colour pair): object photos for the classifier (the object fills most of the frame, as a crop does),
   scenes with 1-4 objects for the detector, and held-out test scenes with **exactly one object each, covering at most
   5 % of the frame** (``--area``), each in a folder named after its object's class.
2. A small ViT classifier trained on the object photos (``birder.training.classification.train_classifier``).
3. A class-agnostic detector ("object", as MegaDetector's "animal") trained by ``birder-train-det`` (Faster R-CNN
   on the ViTDet pyramid, its backbone initialised from the classifier), unless ``--detector`` gives one.
4. The same classifier, through ``birder-predict``'s own run (:func:`birder.runs.predict.run_prediction`), on the
   test scenes: whole images, then ``--detector`` crop-then-classify. A photo's answer with a detector is its
   best-scoring box's top-1; **a photo without a box (none scoring ``--threshold``, 0.1) counts as wrong**. Also:
   the crops of the true boxes (the upper bound a perfect detector would give) and the detector's recall (best box
   IoU >= 0.5 with the object).

Target: crop-then-classify beats whole-image top-1 by 20 points or more.
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import birder
from benchmarks.inference import machine_description, machine_label
from benchmarks.synthetic import class_name, make_class_folder, make_scene, write_coco_scenes
from birder.inference.classification import infer_batch
from birder.inference.crops import crop_box
from birder.io.images import load_image
from birder.runs.predict import run_prediction
from birder.runs.predict_options import (
    DetectionOptions,
    ExecutionOptions,
    ModelOptions,
    OutputOptions,
    PredictionOptions,
)
from birder.scripts import train_det
from birder.training.classification import TrainConfig, train_classifier

# 8 classes, each its own shape and colour pair: a small ViT learns them from object photos in a few minutes; in a
# whole scene the object is a few pixels of the classifier's input among clutter of every colour
CLASSES = [index * 9 for index in range(8)]
# Patch 8 keeps a 20-30 px object several patches wide at the detector's 128 px
BACKBONE = {"patch_size": 8, "hidden_dim": 64, "num_layers": 4, "num_heads": 4, "mlp_dim": 128}
TINY_BACKBONE = {"patch_size": 8, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}
# Few proposals and boxes: scenes hold a handful of objects; the head's cost stays below the backbone's
DETECTOR_HEAD = {
    "fpn_channels": 32,
    "anchor_sizes": [16, 32, 64, 128],
    "representation_size": 256,
    "rpn_batch_size_per_image": 64,
    "box_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 30,
    "box_detections_per_img": 10,
}
OBJECT = "object"


# The sizes, counts and schedules: option -> (default, --tiny's value, what it is)
SETTINGS = {
    "scene-size": (256, 96, "test and training scenes, px a side"),
    "classifier-size": (64, 64, "classifier input, px a side"),
    "classifier-per-class": (60, 3, "object photos per class to train the classifier on"),
    "classifier-epochs": (12, 1, "classifier training epochs"),
    "detector-size": (128, 64, "detector input (long side), px"),
    "detector-scenes": (200, 6, "scenes to train the detector on (1-4 objects each)"),
    "detector-epochs": (10, 1, "birder-train-det epochs"),
    "test-scenes": (200, 4, "held-out scenes, one object each"),
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("crop_classify_work"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/crop_classify.json"))
    parser.add_argument("--detector", type=Path, help="a detector file to use instead of training one")
    parser.add_argument("--area", type=float, nargs=2, default=(0.01, 0.05), help="object's share of the frame")
    for name, (default, _, text) in SETTINGS.items():
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default: {default})")
    parser.add_argument("--margin", type=float, default=0.2, help="--crop-margin of the crops")
    parser.add_argument("--threshold", type=float, default=0.1, help="--det-threshold of the boxes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: tiny data, networks and schedules")
    args = parser.parse_args(argv)
    if args.tiny:
        for name, (_, tiny, _) in SETTINGS.items():
            setattr(args, name.replace("-", "_"), tiny)
    return args


def _object_crop_fill(margin: float) -> float:
    """The share of a crop's side its object covers when cropped with ``margin``: the classifier trains at it."""
    return 1.0 / (1.0 + 2.0 * margin)


def make_data(args: argparse.Namespace) -> dict[str, Path]:
    """The classifier's object photos, the detector's scenes (class-agnostic COCO) and the test scenes."""
    root = args.workdir / "data"
    classes = CLASSES[:2] if args.tiny else CLASSES
    fill = min(0.95, _object_crop_fill(args.margin) * 1.05)  # object_on_background draws it 85-100 % of this
    size = (args.scene_size, args.scene_size)
    paths = {"crops": root / "crops", "test": root / "test", "truth": root / "test_boxes.json"}
    per_val = max(2, args.classifier_per_class // 4)
    for split, count, seed in (("train", args.classifier_per_class, 0), ("val", per_val, 1)):
        make_class_folder(paths["crops"] / split, classes, count, size=args.classifier_size, seed=seed, fill=fill)
    for split, count, seed in (
        ("det_train", args.detector_scenes, 2),
        ("det_val", max(4, args.detector_scenes // 5), 3),
    ):
        coco = write_coco_scenes(
            root / split, count, seed=seed, size=size, classes=classes, num_objects=(1, 4), area_range=args.area
        )
        paths[split] = _class_agnostic(coco)

    rng = np.random.default_rng(4)
    truth = {}
    for index in range(args.test_scenes):
        scene = make_scene(rng, size=size, classes=classes, num_objects=(1, 1), area_range=tuple(args.area))
        path = paths["test"] / class_name(scene.labels[0]) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        scene.image.save(path)
        truth[str(path)] = {"class": class_name(scene.labels[0]), "box": list(scene.boxes[0])}
    paths["truth"].write_text(json.dumps(truth))
    return paths


def _class_agnostic(path: Path) -> Path:
    """The COCO file with every category merged into one, "object": a detector of animals, not of species."""
    coco = json.loads(path.read_text())
    coco["categories"] = [{"id": 1, "name": OBJECT}]
    for annotation in coco["annotations"]:
        annotation["category_id"] = 1
    agnostic = path.with_name("agnostic.json")
    agnostic.write_text(json.dumps(coco))
    return agnostic


def train_models(args: argparse.Namespace, data: dict[str, Path]) -> dict[str, object]:
    """The classifier, then (unless given) the detector from its backbone; seconds of each."""
    started = time.perf_counter()
    result = train_classifier(
        TrainConfig(
            output_dir=args.workdir / "classifier",
            data_dir=data["crops"],
            network="vit_t16",
            model_config=TINY_BACKBONE if args.tiny else BACKBONE,
            size=args.classifier_size,
            epochs=args.classifier_epochs,
            warmup_epochs=min(1, args.classifier_epochs - 1),
            batch_size=32,
            lr=3e-3,
            aug_level=1,
            workers=0,
            progress_bar=False,
        )
    )
    trained = {
        "classifier": result.model_path,
        "classifier_val_top1": result.validation[args.classifier_epochs].top1,
        "classifier_seconds": time.perf_counter() - started,
    }
    if args.detector is not None:
        return {**trained, "detector": args.detector, "detector_trained_here": False}

    started = time.perf_counter()
    output = args.workdir / "detector"
    head = ["--network", "faster_rcnn", "--model-config", json.dumps(DETECTOR_HEAD), "--size", str(args.detector_size)]
    data_args = ["--train-json", str(data["det_train"]), "--val-json", str(data["det_val"])]
    schedule = ["--epochs", str(args.detector_epochs), "--warmup-epochs", "1", "--batch-size", "4", "--lr", "1e-3"]
    rest = ["--init", str(result.model_path), "--layer-decay", "0.8", "--workers", "0", "--no-progress"]
    rest += ["--output-dir", str(output), "--save-every", "1000"]
    if train_det.main([*head, *data_args, *schedule, *rest]) != 0:
        raise RuntimeError("birder-train-det failed")
    with open(output / "det_metrics.csv", newline="") as handle:
        curve = [round(float(row["map50"]), 3) for row in csv.DictReader(handle)]
    return {
        **trained,
        "detector": output / f"faster_rcnn_vit_t16_{args.detector_epochs}.pt",
        "detector_trained_here": True,
        "detector_map50_by_epoch": curve,
        "detector_seconds": time.perf_counter() - started,
    }


def _predict(
    args: argparse.Namespace,
    data: dict[str, Path],
    classifier: Path,
    name: str,
    detection: DetectionOptions | None = None,
) -> Path:
    """``birder-predict`` over the test scenes (the library call behind the command); returns the results table."""
    output = args.workdir / name
    options = PredictionOptions(
        inputs=[data["test"]],
        model=ModelOptions(weights=classifier),
        execution=ExecutionOptions(num_workers=0, progress=False, dtype="float32"),
        output=OutputOptions(output_dir=output, top_k=1),
        detection=detection,
    )
    run_prediction(options)
    return output / "results.csv"


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def evaluate(args: argparse.Namespace, data: dict[str, Path], trained: dict[str, object]) -> dict[str, object]:
    """Top-1 of whole images, of crop-then-classify (best box; none: wrong), of the true boxes' crops; recall."""
    truth = json.loads(data["truth"].read_text())
    classifier = Path(str(trained["classifier"]))
    started = time.perf_counter()
    whole = {row["path"]: row["top1_class"] for row in _read(_predict(args, data, classifier, "whole"))}
    whole_seconds = time.perf_counter() - started

    started = time.perf_counter()
    detection = DetectionOptions(str(trained["detector"]), det_threshold=args.threshold, crop_margin=args.margin)
    best: dict[str, dict[str, str]] = {}
    for row in _read(_predict(args, data, classifier, "crops", detection)):
        if row["path"] not in best:  # rows of a photo come best box first
            best[row["path"]] = row
    crop_seconds = time.perf_counter() - started

    (net, info) = birder.load_model(classifier, inference=True)
    transform = birder.classification_transform((args.classifier_size, args.classifier_size), info.rgb_stats)
    names = sorted(info.class_to_idx, key=lambda name: info.class_to_idx[name])
    counts = {"whole": 0, "crop": 0, "true_box_crop": 0, "found": 0, "missed": 0}
    for path, item in truth.items():
        (x, y, w, h) = item["box"]
        true_box = [x, y, x + w, y + h]
        counts["whole"] += whole[path] == item["class"]
        row = best[path]
        if row["detections"] == "0":
            counts["missed"] += 1
        else:
            counts["crop"] += row["top1_class"] == item["class"]
            box = [float(row[key]) for key in ("x1", "y1", "x2", "y2")]
            counts["found"] += _iou(box, true_box) >= 0.5
        crop = crop_box(load_image(path), true_box, args.margin)
        with torch.inference_mode():
            (probs, _) = infer_batch(net, transform(crop).unsqueeze(0))
        counts["true_box_crop"] += names[int(np.argmax(probs[0]))] == item["class"]

    total = len(truth)
    top1 = {key: counts[key] / total for key in ("whole", "crop", "true_box_crop")}
    return {
        "photos": total,
        "top1": top1,
        "gain_points": 100.0 * (top1["crop"] - top1["whole"]),
        "photos_without_a_box": counts["missed"],
        "detector_recall_iou50": counts["found"] / total,
        "seconds": {"whole_image_run": whole_seconds, "crop_then_classify_run": crop_seconds},
    }


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description(torch.device("cpu"))
    data = make_data(args)
    trained = train_models(args, data)
    results = evaluate(args, data, trained)
    report = {
        "machine": machine,
        "settings": {key: str(value) if isinstance(value, Path) else value for (key, value) in vars(args).items()},
        "training": {key: str(value) if isinstance(value, Path) else value for (key, value) in trained.items()},
        **results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))

    top1 = results["top1"]
    detector = "trained here by birder-train-det" if trained["detector_trained_here"] else f"given: {args.detector}"
    print(f"Crop-then-classify vs whole image, {results['photos']} held-out scenes (one object, <= 5 % of the frame)")
    print(f"  machine       {machine_label(machine)}")
    print(f"  classifier    vit_t16 at {args.classifier_size} px, val top-1 {trained['classifier_val_top1']:.3f}")
    print(f"  detector      faster_rcnn, class-agnostic, {detector}")
    print(f"  whole image   top-1 {top1['whole']:.3f}")
    print(f"  crop+classify top-1 {top1['crop']:.3f} ({results['photos_without_a_box']} photos without a box: wrong)")
    print(f"  true boxes    top-1 {top1['true_box_crop']:.3f} (a perfect detector)")
    print(f"  gain          {results['gain_points']:+.1f} points (target: +20)")
    print(f"  recall        {results['detector_recall_iou50']:.3f} (best box IoU >= 0.5 with the object)")
    print(f"  report        {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

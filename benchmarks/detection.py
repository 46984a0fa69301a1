"""Detection: the mAP@.5 curve of a longer training run on generated scenes, and detector images/s on the CPU.

    python -m benchmarks.detection                       # both sections: about 20 minutes on two CPU cores
    python -m benchmarks.detection --sections speed      # vit_b16 / vit_l16 at 512 and 1024 px, float32, bfloat16
    python -m benchmarks.detection --sections curve --heads retinanet --detector-epochs 60
    python -m benchmarks.detection --tiny                # a smoke run (seconds)
    python -m benchmarks.detection --metrics runs/det/det_metrics.csv   # adds a birder-train-det run's curve
    python -m benchmarks.detection --sections counts     # boxes per photo against true counts (reuses the curve's)

**Curve.** The slow test's recipe (``tests/test_detection_learning.py`` imports it from here), longer and on more
data: generated scenes (``benchmarks.synthetic``: 0-3 objects of four shapes of one colour pair, 2-10 % of the
frame each, on cluttered backgrounds, 128 px), a tiny ViT (patch 8) classifier trained on object photos to start the
backbone from, then ``birder-train-det``'s training of each head, scored by pycocotools on the validation scenes
every epoch and on more held-out scenes once at the end. One compute thread: networks this small gain little from
a second one, and lose much when other processes want the cores. Target: mAP@.5 >= 0.8.

**Speed.** Random weights (speed does not depend on them; NMS aside, whose share is small with few boxes), one
photo per call, the median of ``--runs`` calls after ``--warmup``. bfloat16 is autocast, as ``--amp bf16``; it is
measured only where it is native (CUDA, or a CPU with AVX512-BF16 or AMX): elsewhere it is emulated, far slower than
float32, and printed as "not measured". Every figure is printed with the machine's label (CPU model, flags, threads).

**Counts.** Does a box count animals? Held-out scenes with exactly 0-4 objects each (drawn evenly), those with two or
more laid out apart, touching (boxes meeting or sharing a sliver of at most 10 % of the smaller side) or
overlapping (a later object drawn over an earlier one, hiding 15-40 % of the smaller box), a third of them each
(``benchmarks.synthetic.write_count_scenes``). The detector is a faster_rcnn of the curve's recipe trained for
``--count-epochs`` (60; by ``birder-train-det``'s own argument parsing, cached in ``--workdir`` and reused while the
recipe stays the same), run through ``birder-predict --detector`` itself (its ``main``, default flags: the default
threshold, class-agnostic merging) with the curve's classifier. Scene sets: ``tune``, the curve's kind of scene
(cluttered 128 px squares, objects 2-10 % of the frame), the one every choice was made on; ``final``, built
differently (a foliage background under uneven light, 160 x 120 px landscape photos, smaller objects: 1.5-6 % of
the frame); ``fresh``, another draw of final's generator (``--count-sets tune final fresh``). Reported:
the share of photos whose box count equals the truth (overall, by true count, by layout), the largest IoU between
two kept boxes of a photo and how many pairs exceed 0.5, mAP@.5 (pycocotools, the detector's own output).

Crop-then-classify against whole-image top-1 is ``benchmarks/crop_classify.py``'s.
"""

import argparse
import csv
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.inference import machine_description, machine_label
from benchmarks.synthetic import box_iou_xywh, make_class_folder, write_coco_scenes, write_count_scenes
from birder.model_registry import registry
from birder.scripts import predict, train_det
from birder.training.amp import autocast
from birder.training.classification import TrainConfig, train_classifier
from birder.training.detection import train_detector
from birder.training.detection_eval import evaluate_detector_file

# The learning recipe (the slow test's and this benchmark's)

# Four shapes of one colour pair: the classes differ by shape alone.
CLASSES = [0, 1, 2, 3]
SCENE_SIZE = 128
# Patch 8 keeps 18-40 px objects several patches wide at 128 px.
BACKBONE = {"patch_size": 8, "hidden_dim": 64, "num_layers": 4, "num_heads": 4, "mlp_dim": 128}
# Objects are squares of 18-40 px: one aspect ratio, anchors of 16-32 px on the two finest levels (strides 4, 8).
PYRAMID = {"fpn_channels": 32, "anchor_sizes": [16, 32, 64, 128], "aspect_ratios": [1.0]}
# Few proposals and small heads: the heads' cost stays near the backbone's. RetinaNet's focal loss down-weights the
# anchors it already scores as not of a class less than the paper's (0.25, 2) do: it learns to tell the shapes
# apart in hundreds of steps instead of thousands.
HEAD_CONFIGS: dict[str, dict[str, Any]] = {
    "faster_rcnn": {
        **PYRAMID,
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 50,
        "rpn_batch_size_per_image": 64,
        "box_batch_size_per_image": 64,
        "representation_size": 256,
    },
    "retinanet": {**PYRAMID, "topk_candidates": 200, "focal_alpha": 0.5, "focal_gamma": 1.0},
}
# The pyramid and head learn at 3e-3, the backbone's blocks 0.6x less per block down to the patch embedding; mild
# scale jitter (a cropped-off sliver of an object is a box the detector cannot learn from). The training scenes'
# objects never touch: copy-paste on every photo shows the detector touching and partly hidden ones (the counts
# section's tuning scenes got their count right in 89.0 % of photos without it, 95.7 % at 0.5, 98.7 % at 1).
OPTIMISATION = ["--lr", "3e-3", "--layer-decay", "0.6", "--warmup-epochs", "1", "--batch-size", "4"]
AUGMENTATION = ["--scale-range", "0.8", "1.25", "--copy-paste", "1"]
RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class Scale:
    """How much data and training: the slow test's (:data:`TEST_SCALE`) or this benchmark's."""

    crops_per_class: int = 200  # object photos per class the classifier learns from (64 px)
    classifier_epochs: int = 40
    train_scenes: int = 160  # scenes birder-train-det learns from
    val_scenes: int = 40  # scored every epoch
    held_out_scenes: int = 200  # scored once, by the last epoch's file
    detector_epochs: int = 30


TEST_SCALE = Scale()
BENCHMARK_SCALE = Scale(crops_per_class=400, train_scenes=480, val_scenes=80, held_out_scenes=400, detector_epochs=30)
TINY_SCALE = Scale(
    crops_per_class=4, classifier_epochs=1, train_scenes=6, val_scenes=3, held_out_scenes=3, detector_epochs=1
)
TINY_BACKBONE = {"patch_size": 8, "hidden_dim": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32}


def prepare_data(root: Path, scale: Scale, backbone: dict[str, Any] | None = None) -> dict[str, Any]:
    """Object photos and the classifier trained on them, then the training, validation and held-out scenes (COCO
    files). Returns their paths, the classifier's validation top-1 and the seconds it all took."""
    started = time.perf_counter()
    make_class_folder(root / "crops" / "train", CLASSES, scale.crops_per_class, size=64, seed=0, fill=0.5)
    make_class_folder(root / "crops" / "val", CLASSES, 10, size=64, seed=1, fill=0.5)
    result = train_classifier(
        TrainConfig(
            output_dir=root / "classifier",
            data_dir=root / "crops",
            network="vit_t16",
            model_config=backbone or BACKBONE,
            size=64,
            epochs=scale.classifier_epochs,
            warmup_epochs=1,
            batch_size=32,
            lr=3e-3,
            aug_level=1,
            workers=0,
            progress_bar=False,
        )
    )
    scenes = {"size": (SCENE_SIZE, SCENE_SIZE), "classes": CLASSES, "num_objects": (0, 3)}
    return {
        "classifier": result.model_path,
        "classifier_top1": result.validation[scale.classifier_epochs].top1,
        "train": write_coco_scenes(root / "train", scale.train_scenes, seed=1, **scenes),
        "val": write_coco_scenes(root / "val", scale.val_scenes, seed=2, **scenes),
        "held_out": write_coco_scenes(root / "held_out", scale.held_out_scenes, seed=3, **scenes),
        "seconds": time.perf_counter() - started,
    }


def train_det_args(head: str, data: dict[str, Any], output_dir: Path, epochs: int) -> list[str]:
    """``birder-train-det``'s arguments for ``head`` on :func:`prepare_data`'s data."""
    args = ["--network", head, "--init", str(data["classifier"]), "--size", str(SCENE_SIZE)]
    args += ["--model-config", json.dumps(HEAD_CONFIGS[head])]
    args += ["--train-json", str(data["train"]), "--val-json", str(data["val"]), "--output-dir", str(output_dir)]
    args += ["--epochs", str(epochs), *OPTIMISATION, *AUGMENTATION]
    return [*args, "--workers", "0", "--no-progress", "--save-every", str(epochs)]


def read_curve(path: Path) -> list[dict[str, Any]]:
    """mAP and mAP@.5 by epoch from a ``det_metrics.csv``."""
    with open(path, newline="") as handle:
        return [
            {"epoch": int(row["epoch"]), "map": float(row["map"]), "map50": float(row["map50"])}
            for row in csv.DictReader(handle)
        ]


def learning_curve(head: str, data: dict[str, Any], output_dir: Path, epochs: int) -> dict[str, Any]:
    """Train ``head`` as ``birder-train-det`` does (its own argument parsing); the curve with the seconds since
    the start at the end of each epoch's training, then the last epoch's file scored on the held-out scenes."""
    config = train_det.det_config_from_args(
        train_det.build_parser().parse_args(train_det_args(head, data, output_dir, epochs))
    )
    trained_until: dict[int, float] = {}
    started = time.perf_counter()
    result = train_detector(config, on_batch=lambda event: trained_until.__setitem__(event.epoch, time.perf_counter()))
    seconds = time.perf_counter() - started
    curve = read_curve(output_dir / "det_metrics.csv")
    for row in curve:
        row["seconds"] = round(trained_until[row["epoch"]] - started, 1)
    assert result.model_path is not None
    # What the file was trained with: the counts section reuses it only while the recipe stays the same
    (output_dir / RECIPE_FILE).write_text(json.dumps(recipe_settings(head, data, output_dir, epochs)))
    held_out = evaluate_detector_file(result.model_path, data["held_out"], workers=0, progress_bar=False)
    return {
        "head": head,
        "epochs": epochs,
        "seconds": round(seconds, 1),
        "curve": curve,
        "held_out_map": held_out.map,
        "held_out_map50": held_out.map50,
        "held_out_per_class_ap50": {c.name: c.ap50 for c in held_out.per_class},
    }


# Speed


def bf16_reason(machine: dict[str, Any], device: torch.device) -> str | None:
    """Why bfloat16 is not measured here (None: it is native)."""
    if device.type == "cuda" or machine.get("cpu_native_bf16"):
        return None
    return "not measured: no native bf16 on this CPU (no AVX512-BF16 or AMX), it would be emulated"


def images_per_s(det: torch.nn.Module, size: int, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    images = [torch.randn(3, size, size, device=device)]
    timings = []
    with torch.inference_mode(), autocast(device, torch.bfloat16 if dtype == "bfloat16" else None):
        for run in range(args.warmup + args.runs):
            started = time.perf_counter()
            det(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if run >= args.warmup:
                timings.append(time.perf_counter() - started)
    return {"images_per_s": 1.0 / statistics.median(timings), "seconds_runs": [round(t, 4) for t in timings]}


def speed_section(args: argparse.Namespace, machine: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Measured rows, and the combinations not measured (with the reason)."""
    device = torch.device(args.device)
    (measured, skipped) = ([], [])
    for backbone in args.backbones:
        for size in args.sizes:
            for head in args.heads:
                torch.manual_seed(0)
                body = registry.net_factory(backbone, 0, config=TINY_BACKBONE if args.tiny else None, size=(size, size))
                config = {"fpn_channels": 16} if args.tiny else {}
                if args.window_size:
                    config["window_size"] = args.window_size  # ViTDet: windowed attention but in 4 global blocks
                det = registry.detection_net_factory(head, 4, body, config=config or None, size=(size, size))
                det = det.eval().to(device)
                for dtype in args.dtypes:
                    case = {"head": head, "backbone": backbone, "size": size, "dtype": dtype}
                    if args.window_size:
                        case["window_size"] = args.window_size
                    reason = bf16_reason(machine, device) if dtype == "bfloat16" else None
                    if reason is not None:
                        skipped.append({**case, "reason": reason})
                        continue
                    measured.append({**case, **images_per_s(det, size, dtype, args)})
                    print(f"  {head:<12} {backbone:<8} {size:>5} px {dtype:<9} {measured[-1]['images_per_s']:.3f}")
    return (measured, skipped)


def print_speed(label: str, measured: list[dict], skipped: list[dict]) -> None:
    print(f"\nDetector images/s (one photo per call) on {label}")
    rows = [(r["head"], r["backbone"], r["size"], r["dtype"], f"{r['images_per_s']:.3f}") for r in measured]
    rows += [(r["head"], r["backbone"], r["size"], r["dtype"], "not measured") for r in skipped]
    for head, backbone, size, dtype, value in sorted(rows):
        print(f"{head:<12} {backbone:<8} {size:>5} px  {dtype:<9} {value}")
    for reason in sorted({r["reason"] for r in skipped}):
        print(f"bfloat16 {reason}")


def curve_section(args: argparse.Namespace) -> dict[str, Any]:
    scale = curve_scale(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.curve_threads)
    try:
        data = prepare_data(args.workdir, scale, TINY_BACKBONE if args.tiny else None)
        print(f"classifier top-1 {data['classifier_top1']:.3f}; data and classifier in {data['seconds']:.0f} s")
        runs = [learning_curve(head, data, args.workdir / head, scale.detector_epochs) for head in args.heads]
    finally:
        torch.set_num_threads(threads)
    for run in runs:
        print(f"\n{run['head']}: mAP@.5 by epoch ({run['seconds']:.0f} s of training, {args.curve_threads} thread)")
        for row in run["curve"]:
            print(
                f"  epoch {row['epoch']:>3}  {row['seconds']:>7.1f} s  mAP@.5 {row['map50']:.3f}  mAP {row['map']:.3f}"
            )
        print(f"  held-out scenes ({scale.held_out_scenes}): mAP@.5 {run['held_out_map50']:.3f}")
    return {
        "scale": asdict(scale),
        "threads": args.curve_threads,
        "classifier_top1": data["classifier_top1"],
        "data_seconds": round(data["seconds"], 1),
        "runs": runs,
    }


# Counts

COUNT_HEAD = "faster_rcnn"
# Two differently generated sets of scenes with known counts: "tune" is the curve's kind of scene, "final" is not
COUNT_SETS: dict[str, dict[str, Any]] = {
    "tune": {"seed": 10, "size": (SCENE_SIZE, SCENE_SIZE), "background": "clutter", "area_range": (0.02, 0.10)},
    "final": {"seed": 20, "size": (120, 160), "background": "foliage", "area_range": (0.015, 0.06)},
    # Another draw of final's generator: untouched after final had been looked at (and the recipe changed since)
    "fresh": {"seed": 21, "size": (120, 160), "background": "foliage", "area_range": (0.015, 0.06)},
}
TRUE_COUNTS = (0, 4)
# The curve's recipe trained twice as long: partly hidden animals are learnt later than apart ones (30 epochs: 98.7 %
# of the tuning scenes counted right, 60: 99.7 %)
COUNT_EPOCHS = 60


def curve_scale(args: argparse.Namespace) -> Scale:
    """The curve section's scale with the command line's overrides."""
    scale = TINY_SCALE if args.tiny else BENCHMARK_SCALE
    overrides = {key: getattr(args, key) for key in asdict(scale) if getattr(args, key, None) is not None}
    return Scale(**{**asdict(scale), **overrides})


def recipe_settings(head: str, data: dict[str, Any], output_dir: Path, epochs: int) -> dict[str, Any]:
    """The settings ``birder-train-det`` runs with for :func:`train_det_args` (order-free, comparable)."""
    config = train_det.det_config_from_args(
        train_det.build_parser().parse_args(train_det_args(head, data, output_dir, epochs))
    )
    return json.loads(json.dumps(asdict(config), default=str))


def curve_detector(args: argparse.Namespace, head: str) -> tuple[Path, Path, bool]:
    """The curve recipe's classifier and a ``head`` detector trained by it for ``args.count_epochs`` epochs, in
    ``args.workdir`` (``<head>_counts``): reused when the detector there was trained with the recipe's settings of
    today (``RECIPE_FILE`` beside it), else trained now (the data and the classifier too when missing). Returns them
    and whether the detector was trained now."""
    scale = curve_scale(args)
    scale = Scale(**{**asdict(scale), "detector_epochs": args.count_epochs})
    data = {
        "classifier": args.workdir / "classifier" / f"vit_t16_{scale.classifier_epochs}.pt",
        **{split: args.workdir / split / "annotations.json" for split in ("train", "val", "held_out")},
    }
    output_dir = args.workdir / f"{head}_counts"
    detector = output_dir / f"{head}_vit_t16_{scale.detector_epochs}.pt"
    recipe = recipe_settings(head, data, output_dir, scale.detector_epochs)
    recorded = output_dir / RECIPE_FILE
    if detector.is_file() and recorded.is_file() and json.loads(recorded.read_text()) == recipe:
        return (data["classifier"], detector, False)
    # On the caller's threads (counts_section runs on --curve-threads)
    if not all(Path(path).is_file() for path in data.values()):
        data = prepare_data(args.workdir, scale, TINY_BACKBONE if args.tiny else None)
    if output_dir.exists():
        shutil.rmtree(output_dir)  # another recipe's run: birder-train-det refuses a used folder
    learning_curve(head, data, output_dir, scale.detector_epochs)
    return (Path(data["classifier"]), detector, True)


def pair_overlaps(coco: dict[str, Any]) -> dict[str, list[float]]:
    """The true boxes' IoU of each touching or overlapping pair (boxes sharing any area), by the photo's layout."""
    boxes: dict[int, list[list[float]]] = {}
    for annotation in coco["annotations"]:
        boxes.setdefault(annotation["image_id"], []).append(annotation["bbox"])
    ious: dict[str, list[float]] = {"touching": [], "overlapping": []}
    for image in coco["images"]:
        if image["layout"] not in ious:
            continue
        found = boxes.get(image["id"], [])
        for i, first in enumerate(found):
            for second in found[i + 1 :]:
                if (iou := box_iou_xywh(tuple(first), tuple(second))) > 0:
                    ious[image["layout"]].append(iou)
    return ious


def _share(hits: list[bool]) -> dict[str, Any]:
    return {"photos": len(hits), "correct": sum(hits), "share": sum(hits) / len(hits) if hits else float("nan")}


def count_scores(annotations: Path, run_dir: Path) -> dict[str, Any]:
    """A ``birder-predict --detector`` run's boxes per photo against the scenes' true counts, and how much its kept
    boxes of one photo overlap."""
    coco = json.loads(annotations.read_text())
    with open(run_dir / "photos.csv", newline="") as handle:
        counted = {Path(row["path"]).name: int(row["detections"]) for row in csv.DictReader(handle)}
    kept: dict[str, list[tuple[float, float, float, float]]] = {}
    with open(run_dir / "results.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["x1"]:
                (x1, y1, x2, y2) = (float(row[key]) for key in ("x1", "y1", "x2", "y2"))
                kept.setdefault(Path(row["path"]).name, []).append((x1, y1, x2 - x1, y2 - y1))
    (overall, by_count, by_layout) = ([], {}, {})
    errors = {"fewer": 0, "more": 0}
    for image in coco["images"]:
        name = Path(image["file_name"]).name
        if name not in counted:
            raise RuntimeError(f"{name}: not in the run's photos.csv")
        hit = counted[name] == image["count"]
        overall.append(hit)
        by_count.setdefault(image["count"], []).append(hit)
        by_layout.setdefault(image["layout"], []).append(hit)
        if not hit:
            errors["fewer" if counted[name] < image["count"] else "more"] += 1
    pair_ious = [
        box_iou_xywh(first, second)
        for boxes in kept.values()
        for i, first in enumerate(boxes)
        for second in boxes[i + 1 :]
    ]
    with open(run_dir / "run.json") as handle:
        settings = json.load(handle).get("settings", {})
    return {
        "threshold": settings.get("det_threshold"),
        "overall": _share(overall),
        "by_true_count": {str(count): _share(hits) for count, hits in sorted(by_count.items())},
        "by_layout": {layout: _share(hits) for layout, hits in sorted(by_layout.items())},
        "miscounted": errors,
        "kept_boxes": sum(len(boxes) for boxes in kept.values()),
        "max_kept_pair_iou": max(pair_ious, default=0.0),
        "kept_pairs_over_half": sum(iou > 0.5 for iou in pair_ious),
    }


def count_set(name: str, args: argparse.Namespace, classifier: Path, detector: Path, tag: str) -> dict[str, Any]:
    """One scene set: written (cached), run through ``birder-predict --detector`` with its defaults, scored
    (``tag`` names the run's folder)."""
    root = args.workdir / f"counts_{name}"
    spec = COUNT_SETS[name]
    annotations = root / "annotations.json"
    if not annotations.is_file():
        write_count_scenes(root, args.count_scenes, classes=CLASSES, num_objects=TRUE_COUNTS, **spec)
    run_dir = args.workdir / f"counts_{name}_run_{tag}"
    argv = ["--weights", str(classifier), "--detector", str(detector), str(root / "images")]
    argv += ["--output-dir", str(run_dir), "--overwrite", "-j", "0", "--no-progress", "--device", args.device]
    if predict.main(argv) != 0:
        raise RuntimeError(f"birder-predict {' '.join(argv)} failed")
    scores = count_scores(annotations, run_dir)
    ious = pair_overlaps(json.loads(annotations.read_text()))
    scores["true_pair_iou"] = {
        layout: {"pairs": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}
        for layout, values in ious.items()
        if values
    }
    held_out = evaluate_detector_file(detector, annotations, workers=0, progress_bar=False, device=args.device)
    return {
        "set": name,
        "detector": str(detector),
        "scenes": args.count_scenes,
        "generator": spec,
        **scores,
        "map50": held_out.map50,
    }


def counts_section(args: argparse.Namespace, label: str) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.curve_threads)
    try:
        (classifier, detector, trained) = curve_detector(args, COUNT_HEAD)
        detectors = [("recipe", detector), *((f"extra{i}", path) for i, path in enumerate(args.count_detectors))]
        sets = [count_set(name, args, classifier, path, tag) for (tag, path) in detectors for name in args.count_sets]
    finally:
        torch.set_num_threads(threads)
    print(f"\nBoxes per photo against true counts (the recipe's {'trained now' if trained else 'cached'}) on {label}")
    for result in sets:
        overall = result["overall"]
        print(f"{result['detector']}")
        print(
            f"{result['set']:<6} threshold {result['threshold']}: count right in {overall['correct']}/"
            f"{overall['photos']} photos ({overall['share']:.1%}); fewer boxes than objects in "
            f"{result['miscounted']['fewer']}, more in {result['miscounted']['more']}; mAP@.5 {result['map50']:.3f}"
        )
        per_count = ", ".join(f"{k}: {v['share']:.0%} of {v['photos']}" for k, v in result["by_true_count"].items())
        print(f"       by true count  {per_count}")
        per_layout = ", ".join(f"{k}: {v['share']:.0%} of {v['photos']}" for k, v in result["by_layout"].items())
        print(f"       by layout      {per_layout}")
        for layout, iou in result["true_pair_iou"].items():
            print(
                f"       true {layout} pairs: {iou['pairs']}, box IoU {iou['min']:.2f}-{iou['max']:.2f} "
                f"(median {iou['median']:.2f})"
            )
        print(
            f"       kept boxes {result['kept_boxes']}: largest IoU of two in one photo "
            f"{result['max_kept_pair_iou']:.3f}, pairs over 0.5: {result['kept_pairs_over_half']}"
        )
    return {"head": COUNT_HEAD, "detector": str(detector), "trained_now": trained, "sets": sets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=["speed", "curve", "counts"], default=["speed", "curve"])
    parser.add_argument("--heads", nargs="+", default=["faster_rcnn", "retinanet"])
    parser.add_argument("--backbones", nargs="+", default=["vit_b16", "vit_l16"], help="speed section")
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="speed section")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument(
        "--window-size", type=int, default=0, help="speed section: windowed attention (patches; 0: global, default)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    for key, value in asdict(BENCHMARK_SCALE).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"curve section (default {value})")
    parser.add_argument("--curve-threads", type=int, default=1, help="compute threads of the curve section")
    parser.add_argument("--workdir", type=Path, default=Path("detection_work"))
    parser.add_argument("--count-scenes", type=int, default=300, help="counts section: scenes in each set")
    parser.add_argument(
        "--count-epochs", type=int, default=COUNT_EPOCHS, help="counts section: the recipe's detector's epochs"
    )
    parser.add_argument(
        "--count-detectors", nargs="*", type=Path, default=[], help="counts section: more detector files to count with"
    )
    parser.add_argument(
        "--count-sets", nargs="+", choices=sorted(COUNT_SETS), default=["tune", "final"], help="counts section"
    )
    parser.add_argument("--metrics", type=Path, help="a det_metrics.csv of birder-train-det: its curve is reported")
    parser.add_argument("--tiny", action="store_true", help="tiny ViTs, 64 and 128 px, tiny data (smoke run)")
    parser.add_argument("--output", type=Path, default=Path("detection.json"))
    args = parser.parse_args(argv)
    if args.tiny:
        (args.backbones, args.sizes, args.runs, args.warmup) = (["vit_t16"], [64, 128], 1, 0)
        (args.count_scenes, args.count_epochs) = (min(args.count_scenes, 6), TINY_SCALE.detector_epochs)

    machine = machine_description(torch.device(args.device))
    label = machine_label(machine)
    report: dict[str, Any] = {"machine": machine, "machine_label": label, "speed": [], "speed_not_measured": []}
    if args.metrics is not None:
        report["map_curve"] = read_curve(args.metrics)
    if "curve" in args.sections:
        report["curve"] = curve_section(args)
    if "counts" in args.sections:
        report["counts"] = counts_section(args, label)
    if "speed" in args.sections:
        (report["speed"], report["speed_not_measured"]) = speed_section(args, machine)
        print_speed(label, report["speed"], report["speed_not_measured"])
    args.output.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

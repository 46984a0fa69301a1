"""What distillation buys: a small student taught by a larger teacher against the same student on labels alone.

    python -m benchmarks.distillation [--workdir DIR] [--epochs 60] [--output FILE] [--skip-speed] [--tiny]

1. Generated data (``benchmarks.synthetic``: rendered objects on cluttered backgrounds, 10 classes: 5 colour pairs
   x disc / cross): the students' labelled training split (``--train-per-class`` photos), a validation split
   (scored every epoch by the trainer) and a held-out split, each from its own seed.
2. The teacher, larger (about 6x the student's parameters), is trained first, on ``--teacher-data-factor`` times
   as many photos of the same classes: a large model that knows more than the small labelled set shows, as a
   big pretrained network fine-tuned on a full archive does. With a factor of 1 it sees the students' photos only.
3. Two students (three with ``hard``), the same network, data, epochs, seed and recipe (strong augmentation,
   ``--aug-level 3``): one on the labels alone, the others distilled from the teacher with the command line's
   defaults (``--distill soft``: alpha 0.5, temperature 2; ``--distill hard``), through ``birder.training`` as
   ``birder-train --teacher ... --distill ...`` runs them.
4. Held-out top-1 of teacher and students; the gain of the distilled students over the label-only one (target:
   2 points or more).

And, in the same run, the speed of the full-size networks a real distillation would pair, with random weights:
vit_s16 against vit_l16 at 256 px (images/s, interleaved medians of ``--repeats`` runs, in float32 and in the
dtype ``--dtype auto`` picks here).

Small networks on a few cores run faster on one thread (``--train-threads``): no oversubscription.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import birder
from benchmarks.inference import machine_description
from benchmarks.synthetic import class_name, make_class_folder
from birder.inference.classification import infer_batch
from birder.inference.optimize import choose_dtype, optimize_for_inference
from birder.io.images import load_image
from birder.model_registry import registry
from birder.training.classification import TrainConfig, train_classifier

# 5 colour pairs x 2 shapes (disc, cross): colour alone tells 5 groups, the shape the rest.
CLASSES = [palette * 8 + shape for palette in range(5) for shape in (0, 3)]
IMAGE_SIZE = 48
# Both from the ViT family, patch 8 at 48 px: 37 tokens. Teacher 0.47 M parameters, student 0.07 M.
TEACHER = ("vit_b16", {"hidden_dim": 96, "num_layers": 4, "num_heads": 4, "mlp_dim": 384, "patch_size": 8})
STUDENT = ("vit_s16", {"hidden_dim": 48, "num_layers": 3, "num_heads": 4, "mlp_dim": 96, "patch_size": 8})
TINY_TEACHER = ("vit_b16", {"hidden_dim": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 8})
TINY_STUDENT = ("vit_s16", {"hidden_dim": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32, "patch_size": 8})
STUDENT_RECIPE = {"aug_level": 3}  # random crops down to 20 % of the area, erasing: the labels get noisy


def make_data(root: Path, train_per_class: int, held_out_per_class: int, teacher_factor: int) -> Path:
    """``root/{train,val,held_out}`` and the teacher's ``root/teacher/train`` (ImageFolders); made once."""
    if not (root / "held_out").is_dir():
        make_class_folder(root / "train", CLASSES, train_per_class, size=IMAGE_SIZE, seed=0)
        make_class_folder(root / "val", CLASSES, max(4, train_per_class // 4), size=IMAGE_SIZE, seed=1)
        if teacher_factor > 1:
            extra = (teacher_factor - 1) * train_per_class
            make_class_folder(root / "teacher_extra", CLASSES, extra, size=IMAGE_SIZE, seed=3)
        make_class_folder(root / "held_out", CLASSES, held_out_per_class, size=IMAGE_SIZE, seed=2)
    return root


def train(name: str, workdir: Path, data: Path, network: tuple[str, dict], epochs: int, **extra: object) -> Path:
    """One ``birder-train`` run (as the library runs it); returns the final checkpoint."""
    settings = {
        "output_dir": workdir / name, "data_dir": data, "network": network[0], "model_config": network[1],
        "size": IMAGE_SIZE, "rgb_stats": "birder", "epochs": epochs, "warmup_epochs": 1, "batch_size": 32,
        "lr": 2e-3, "aug_level": 1, "workers": 0, "save_every": epochs, "progress_bar": False, "seed": 0,
    }  # fmt: skip
    config = TrainConfig(**{**settings, **extra})
    started = time.perf_counter()
    result = train_classifier(config)
    print(f"  {name}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return result.model_path


def write_labels(data: Path, name: str, folders: list[str]) -> Path:
    """A CSV of ``path,label`` rows for the photos under ``data/<folder>/<class name>/`` of every folder."""
    paths = [path for folder in folders for path in sorted((data / folder).rglob("*.png"))]
    rows = ["path,label", *(f"{path.relative_to(data)},{path.parent.name}" for path in paths)]
    (data / name).write_text("\n".join(rows) + "\n")
    return data / name


def teacher_data(data: Path, teacher_factor: int) -> dict[str, object]:
    """The teacher's training data: the students' photos, plus the extra ones when it has more."""
    if teacher_factor <= 1:
        return {}
    train_csv = write_labels(data, "teacher_train.csv", ["train", "teacher_extra"])
    return {"data_dir": None, "train_csv": train_csv, "val_csv": write_labels(data, "teacher_val.csv", ["val"])}


def held_out_top1(model_path: Path, data: Path) -> float:
    (net, info) = birder.load_model(model_path, inference=True)
    transform = birder.classification_transform(birder.get_size_from_signature(info.signature), info.rgb_stats)
    (correct, total) = (0, 0)
    for class_id in CLASSES:
        folder = data / "held_out" / class_name(class_id)
        batch = torch.stack([transform(load_image(path)) for path in sorted(folder.iterdir())])
        (probs, _) = infer_batch(net, batch)
        correct += int((probs.argmax(1) == info.class_to_idx[class_name(class_id)]).sum())
        total += len(batch)
    return correct / total


def speed_ratio(size: int, batch_size: int, repeats: int, dtypes: list[str]) -> dict:
    """vit_s16 and vit_l16 (random weights, 707 classes) at ``size`` px: images/s, interleaved, per dtype."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch_size, 3, size, size, generator=generator)
    cases = {}
    for network in ("vit_s16", "vit_l16"):
        torch.manual_seed(0)
        base = registry.net_factory(network, 707, size=(size, size))
        for dtype in dtypes:
            net = optimize_for_inference(copy.deepcopy(base), dtype)
            cases[(network, dtype)] = (net, inputs.to(getattr(torch, dtype)))
        del base
    times: dict[tuple[str, str], list[float]] = {key: [] for key in cases}
    with torch.inference_mode():
        for net, x in cases.values():
            net(x)  # warm-up
        for _ in range(repeats):
            for key, (net, x) in cases.items():
                started = time.perf_counter()
                net(x)
                times[key].append(time.perf_counter() - started)

    report: dict = {"size": size, "batch_size": batch_size, "repeats": repeats}
    for dtype in dtypes:
        (s16, l16) = (batch_size / statistics.median(times[(n, dtype)]) for n in ("vit_s16", "vit_l16"))
        report[dtype] = {"vit_s16_images_per_s": s16, "vit_l16_images_per_s": l16, "speedup": s16 / l16}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/results/distillation"))
    parser.add_argument("--epochs", type=int, default=60, help="of each student")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--teacher-data-factor", type=int, default=5, help="the teacher's photos per student photo")
    parser.add_argument("--train-per-class", type=int, default=20, help="the students' labelled photos per class")
    parser.add_argument("--held-out-per-class", type=int, default=100)
    parser.add_argument("--skip-hard", action="store_true", help="train no hard-distilled student")
    parser.add_argument("--skip-speed", action="store_true", help="do not time vit_s16 against vit_l16")
    parser.add_argument("--skip-training", action="store_true", help="only time vit_s16 against vit_l16")
    parser.add_argument("--speed-size", type=int, default=256)
    parser.add_argument("--speed-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--train-threads", type=int, default=1, help="torch threads while training the small networks (default: 1)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny networks and data: a smoke run of the benchmark")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    report: dict = {"machine": machine_description(torch.device("cpu"))}
    if not args.skip_training:
        report.update(distill(args))
    if not args.skip_speed:
        report["speed"] = speed(args)

    report["seconds"] = time.perf_counter() - started
    print(f"({report['seconds']:.0f} s)")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    return 0


def distill(args: argparse.Namespace) -> dict:
    """Teacher, then the students; their held-out top-1 and the gains."""
    (teacher_net, student_net) = (TINY_TEACHER, TINY_STUDENT) if args.tiny else (TEACHER, STUDENT)
    data = make_data(args.workdir / "data", args.train_per_class, args.held_out_per_class, args.teacher_data_factor)
    print(f"distillation: {len(CLASSES)} classes at {IMAGE_SIZE} px, {args.train_per_class} labelled photos per class "
          f"(teacher: {args.teacher_data_factor}x)")  # fmt: skip
    # Small networks on a few cores run faster on one thread (no oversubscription); the speed part uses them all.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.train_threads)
    extra = teacher_data(data, args.teacher_data_factor)
    teacher = train("teacher", args.workdir, data, teacher_net, args.teacher_epochs, **extra)
    runs = {"labels_only": {}, "soft": {"teacher": str(teacher), "distill": "soft"}}
    if not args.skip_hard:
        runs["hard"] = {"teacher": str(teacher), "distill": "hard"}
    students = {}
    for name, distill in runs.items():
        recipe = {**STUDENT_RECIPE, **distill}
        students[name] = train(f"student_{name}", args.workdir, data, student_net, args.epochs, **recipe)

    top1 = {name: held_out_top1(path, data) for (name, path) in {"teacher": teacher, **students}.items()}
    torch.set_num_threads(threads)
    report = {
        "data": {
            "classes": len(CLASSES),
            "train_per_class": args.train_per_class,
            "size": IMAGE_SIZE,
            "held_out_images": len(CLASSES) * args.held_out_per_class,
        },
        "teacher": {
            "network": teacher_net[0],
            "config": teacher_net[1],
            "epochs": args.teacher_epochs,
            "photos_per_class": args.train_per_class * max(1, args.teacher_data_factor),
        },
        "student": {"network": student_net[0], "config": student_net[1], "epochs": args.epochs, **STUDENT_RECIPE},
        "held_out_top1": top1,
        "gain_points": {name: 100 * (top1[name] - top1["labels_only"]) for name in runs if name != "labels_only"},
    }
    print(f"held-out top-1 on {report['data']['held_out_images']} photos:")
    for name, value in top1.items():
        gain = report["gain_points"].get(name)
        print(f"  {name:<12} {value:.3f}" + (f"  ({gain:+.1f} points over labels only)" if gain is not None else ""))

    return report


def speed(args: argparse.Namespace) -> dict:
    """vit_s16 against vit_l16 in float32 and in the dtype ``auto`` picks on this machine."""
    auto = choose_dtype("auto", "cpu").dtype
    dtypes = ["float32"] + ([auto] if auto != "float32" else [])
    size = 32 if args.tiny else args.speed_size
    report = speed_ratio(size, args.speed_batch_size, args.repeats, dtypes)
    for dtype in dtypes:
        figures = report[dtype]
        print(f"vit_s16 vs vit_l16 at {size} px, {dtype}: {figures['vit_s16_images_per_s']:.2f} vs "
              f"{figures['vit_l16_images_per_s']:.2f} images/s = {figures['speedup']:.1f}x")  # fmt: skip
    return report


if __name__ == "__main__":
    sys.exit(main())

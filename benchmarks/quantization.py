"""Top-1 agreement of the fast inference modes with float32, on a small model actually trained.

    python -m benchmarks.quantization [--workdir DIR] [--epochs N] [--images 800] [--modes ...] [--output FILE]

A random-weight network has near-uniform outputs, so its top-1 flips with any rounding: agreement measured on
one says little. Here a small ViT is trained by the training pipeline (``birder.training``) on generated photos
(10 classes told apart by colour, stripe period and direction, under noise), then ``--images`` held-out photos go
through float32 and each fast mode (bfloat16, float16, int8 dynamic, and int8-static when torchao is installed):
the share of identical top-1 answers, the mean and the largest probability difference are reported.

The gate (at development time, not at run time): a mode may be an automatic choice (``--dtype auto``) only if its
top-1 agreement is at least 0.99 (``auto_eligible`` in the JSON). The agreement of a random-weight vit_l16 (at 64
px, to keep it short) is reported too, not gated.
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import birder
from birder.inference.classification import infer_batch
from birder.inference.optimize import optimize_for_inference, quantize_int8_static
from birder.io.images import load_image
from birder.model_registry import registry
from birder.training.classification import TrainConfig, train_classifier

SMALL_VIT = {"hidden_dim": 96, "num_layers": 4, "num_heads": 4, "mlp_dim": 384, "patch_size": 8}
IMAGE_SIZE = 48
# Class k: a base colour, a stripe period (0: none) and stripe direction.
COLOURS = [(200, 60, 50), (60, 170, 80), (60, 80, 200), (210, 200, 70), (150, 80, 170)]
PATTERNS = [(0, "h"), (5, "h"), (5, "v"), (9, "h"), (9, "v")]
CLASSES = [(COLOURS[k % 5], PATTERNS[(k * 2 + k // 5) % 5]) for k in range(10)]


def synthetic_photo(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    (colour, (period, direction)) = CLASSES[label]
    pixels = np.array(colour, dtype=np.float64)[None, None, :] + rng.normal(0, 35, (size, size, 3))
    pixels += rng.normal(0, 25, 3)[None, None, :]  # per-photo colour cast: classes overlap a little
    if period:
        if direction == "h":
            pixels[::period] = 255 - pixels[::period]
        else:
            pixels[:, ::period] = 255 - pixels[:, ::period]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_dataset(root: Path, per_class: int, seed: int) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(seed)
    files = []
    for label in range(len(CLASSES)):
        folder = root / f"species_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            path = folder / f"{index:04d}.png"
            synthetic_photo(label, rng).save(path)
            files.append((path, label))

    return files


AUTO_GATE = 0.99  # a mode may be chosen automatically only with at least this top-1 agreement
FAST_MODES = ["bfloat16", "float16", "int8", "int8-static"]


def _probabilities(net: torch.nn.Module, batch: torch.Tensor, mode: str, calibration: torch.Tensor) -> np.ndarray:
    if mode != "int8-static":
        return infer_batch(optimize_for_inference(_copy(net), mode), batch)[0]
    # Static int8 computes the logits only (its compiled graph is the forward); calibrated on training images.
    quantized = quantize_int8_static(_copy(net), (calibration,))
    return torch.softmax(quantized(batch).float(), dim=1).numpy()


def agreement(
    net: torch.nn.Module, batch: torch.Tensor, modes: list[str], calibration: torch.Tensor | None = None
) -> dict[str, dict]:
    """Per mode: the share of images whose top-1 equals float32's, the mean and largest probability difference."""
    reference = optimize_for_inference(net, "float32")
    (expected, _) = infer_batch(reference, batch)
    report = {}
    for mode in modes:
        probs = _probabilities(net, batch, mode, calibration if calibration is not None else batch[:32])
        difference = np.abs(probs - expected)
        top1 = float((probs.argmax(1) == expected.argmax(1)).mean())
        report[mode] = {
            "top1_agreement": top1,
            "mean_prob_diff": float(difference.mean()),
            "max_prob_diff": float(difference.max()),
            "auto_eligible": top1 >= AUTO_GATE,
        }

    return report


def available_modes(modes: list[str]) -> list[str]:
    """``modes`` less int8-static when torchao (the ``int8`` extra) is not installed."""
    has_torchao = importlib.util.find_spec("torchao") is not None
    return [mode for mode in modes if mode != "int8-static" or has_torchao]


def _copy(net: torch.nn.Module) -> torch.nn.Module:
    clone = registry.net_factory(net.network_name, net.num_classes, config=net.config_override, size=net.size)
    clone.load_state_dict(net.state_dict())
    return clone


def checkpoint_agreement(path: Path, photos: Path, modes: list[str]) -> dict:
    """The agreement of a model already trained, on photos in ``photos/<class name>/`` (calibrated on every 10th)."""
    (net, info) = birder.load_model(path)
    transform = birder.classification_transform(birder.get_size_from_signature(info.signature), info.rgb_stats)
    files = sorted(photos.rglob("*.png"))
    batch = torch.stack([transform(load_image(file)) for file in files])
    labels = np.array([info.class_to_idx[file.parent.name] for file in files])
    (probs, _) = infer_batch(optimize_for_inference(_copy(net), "float32"), batch)
    return {
        "network": net.network_name,
        "held_out_top1": float((probs.argmax(1) == labels).mean()),
        "images": len(files),
        "agreement": agreement(net, batch, available_modes(modes), batch[::10]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/results/quantization"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--images", type=int, default=800, help="held-out photos compared across modes")
    parser.add_argument("--modes", nargs="+", default=FAST_MODES, help="fast modes compared with float32")
    parser.add_argument("--skip-vit-l16", action="store_true", help="do not report the random-weight vit_l16")
    parser.add_argument("--checkpoint", type=Path, nargs="+", help="measure these trained models instead")
    parser.add_argument("--photos", type=Path, help="with --checkpoint: labelled photos, <class name>/<file>.png")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.checkpoint:
        report = {str(path): checkpoint_agreement(path, args.photos, args.modes) for path in args.checkpoint}
        print(json.dumps(report, indent=2))
        if args.output is not None:
            args.output.write_text(json.dumps(report, indent=2))
        return 0

    data = args.workdir / "data"
    if not (data / "train").is_dir():
        make_dataset(data / "train", args.train_per_class, seed=0)
        make_dataset(data / "val", max(4, args.train_per_class // 6), seed=1)
    held_out = make_dataset(args.workdir / "held_out", -(-args.images // len(CLASSES)), seed=2)[: args.images]

    config = TrainConfig(
        output_dir=args.workdir / "model", data_dir=data, network="vit_b16", model_config=SMALL_VIT,
        size=IMAGE_SIZE, rgb_stats="birder", epochs=args.epochs, warmup_epochs=1, batch_size=32, lr=2e-3,
        aug_level=1, workers=0, save_every=args.epochs, progress_bar=False,
    )  # fmt: skip
    result = train_classifier(config)
    val_top1 = result.validation[max(result.validation)].top1 if result.validation else None
    (net, info) = birder.load_model(result.model_path)
    transform = birder.classification_transform(birder.get_size_from_signature(info.signature), info.rgb_stats)
    batch = torch.stack([transform(load_image(path)) for (path, _) in held_out])
    calibration = torch.stack([transform(load_image(path)) for path in sorted((data / "train").rglob("*.png"))[::20]])
    labels = np.array([label for (_, label) in held_out])
    (probs, _) = infer_batch(optimize_for_inference(_copy(net), "float32"), batch)
    report = {
        "trained_model": {
            "network": "vit_b16",
            "config": SMALL_VIT,
            "size": IMAGE_SIZE,
            "epochs": args.epochs,
            "val_top1": val_top1,
            "held_out_top1": float((probs.argmax(1) == labels).mean()),
            "images": len(held_out),
            "agreement": agreement(net, batch, available_modes(args.modes), calibration),
        }
    }

    if not args.skip_vit_l16:
        torch.manual_seed(0)
        vit_l16 = registry.net_factory("vit_l16", 707, size=(64, 64))
        random_batch = torch.randn(args.images, 3, 64, 64, generator=torch.Generator().manual_seed(5))
        report["random_vit_l16_64px"] = {"images": args.images, "agreement": agreement(vit_l16, random_batch, ["int8"])}

    report["seconds"] = time.perf_counter() - started
    trained = report["trained_model"]
    print(f"trained {trained['network']} {SMALL_VIT} at {IMAGE_SIZE} px: held-out top-1 {trained['held_out_top1']:.3f}")
    for mode, figures in trained["agreement"].items():
        print(f"  {mode:<11} top-1 agreement with float32 on {len(held_out)} photos: {figures['top1_agreement']:.3f} "
              f"(mean prob diff {figures['mean_prob_diff']:.5f}, max {figures['max_prob_diff']:.4f})"
              f"{'' if figures['auto_eligible'] else f' below the {AUTO_GATE} gate'}")  # fmt: skip
    if "random_vit_l16_64px" in report:
        figures = report["random_vit_l16_64px"]["agreement"]["int8"]
        print(f"  random-weight vit_l16 (64 px), int8: top-1 agreement {figures['top1_agreement']:.3f} (not gated)")
    print(f"({report['seconds']:.0f} s)")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))

    return 0


if __name__ == "__main__":
    sys.exit(main())

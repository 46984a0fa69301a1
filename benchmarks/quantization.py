"""Top-1 agreement of the fast inference modes with float32, on a small model actually trained.

    python -m benchmarks.quantization [--workdir DIR] [--epochs N] [--images 200] [--output FILE]

A random-weight network has near-uniform outputs, so its top-1 flips with any rounding: agreement measured on
one says little. Here a small ViT is trained by the training pipeline (``birder.training``) on generated photos
(10 classes told apart by colour, stripe period and direction, under noise), then ``--images`` held-out photos go
through float32, int8 and bfloat16, and the share of identical top-1 answers is reported (target for int8: 99%).
The agreement of a random-weight vit_l16 (at 64 px, to keep it short) is reported too, not gated.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import birder
from birder.inference.classification import infer_batch
from birder.inference.optimize import optimize_for_inference
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


def agreement(net: torch.nn.Module, batch: torch.Tensor, modes: list[str]) -> dict[str, float]:
    """Share of images whose top-1 in each mode equals float32's, and the largest probability difference."""
    reference = optimize_for_inference(net, "float32")
    (expected, _) = infer_batch(reference, batch)
    report = {}
    for mode in modes:
        fast = optimize_for_inference(_copy(net), mode)
        (probs, _) = infer_batch(fast, batch)
        report[mode] = {
            "top1_agreement": float((probs.argmax(1) == expected.argmax(1)).mean()),
            "max_prob_diff": float(np.abs(probs - expected).max()),
        }

    return report


def _copy(net: torch.nn.Module) -> torch.nn.Module:
    clone = registry.net_factory(net.network_name, net.num_classes, config=net.config_override, size=net.size)
    clone.load_state_dict(net.state_dict())
    return clone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/results/quantization"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--images", type=int, default=200, help="held-out photos compared across modes")
    parser.add_argument("--skip-vit-l16", action="store_true", help="do not report the random-weight vit_l16")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.perf_counter()
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
            "agreement": agreement(net, batch, ["int8", "bfloat16"]),
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
        print(f"  {mode:<9} top-1 agreement with float32 on {len(held_out)} photos: {figures['top1_agreement']:.3f} "
              f"(max prob diff {figures['max_prob_diff']:.4f})")  # fmt: skip
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

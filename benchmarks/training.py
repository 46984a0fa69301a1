"""Training throughput (images/s) of MAE pretraining steps and supervised fine-tuning steps.

    python -m benchmarks.training                       # vit_b16 at 224 px, on a GPU when there is one
    python -m benchmarks.training --tiny                # a tiny ViT at 32 px: a smoke run in seconds on a CPU
    python -m benchmarks.training --network vit_l16 --batch-size 64 --amp bf16 --compile --output result.json

Both measurements go through the trainers' own optimisation loop (:class:`birder.training.loop.Trainer`: AMP,
accumulation, clipping, EMA, optimizer and schedule) on synthetic in-memory batches, so data loading is left out:
the figures are the model's ceiling, to compare settings and machines. The first ``--warmup`` steps (allocator,
cuDNN / compile warm-up) are not timed.
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from birder.data.training import TrainingBatch
from birder.distributed import DistInfo
from birder.model_registry import registry
from birder.training.amp import AMP_DTYPES, amp_dtype, grad_scaler
from birder.training.ema import ModelEMA
from birder.training.loop import EpochProgress, Trainer
from birder.training.optim import build_optimizer, param_groups
from birder.training.schedule import cosine_with_warmup

TINY_ENCODER = {"hidden_dim": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64, "patch_size": 8}
TINY_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, "decoder_mlp_dim": 64}


def synthetic_batches(count: int, batch_size: int, size: int, num_classes: int) -> list[TrainingBatch]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    targets = torch.randint(num_classes, (batch_size,), generator=generator)
    return [TrainingBatch(torch.arange(batch_size), images, targets, []) for _ in range(count)]


def measure(trainer: Trainer, args: argparse.Namespace, num_classes: int) -> dict:
    """Untimed warm-up steps, then timed ones; returns images/s and the mean step time."""
    device = trainer.dist.device
    (warmup, steps) = (args.warmup, args.steps)
    trainer.train_epoch(synthetic_batches(warmup, args.batch_size, args.size, num_classes), EpochProgress(0), warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    started = time.perf_counter()
    progress = EpochProgress(1)
    trainer.train_epoch(synthetic_batches(steps, args.batch_size, args.size, num_classes), progress, steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": steps * args.batch_size / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "loss": progress.loss_sum / progress.samples,
    }


def make_trainer(model: torch.nn.Module, groups: list[dict], loss_fn, args, dist: DistInfo, ema=None) -> Trainer:
    optimizer = build_optimizer("adamw", groups, betas=(0.9, 0.95))
    dtype = amp_dtype(args.amp)
    return Trainer(
        model,
        dist=dist,
        optimizer=optimizer,
        scheduler=cosine_with_warmup(optimizer, args.warmup + args.steps, 0),
        scaler=grad_scaler(dist.device, dtype),
        loss_fn=loss_fn,
        amp_dtype=dtype,
        clip_grad_norm=1.0,
        ema=ema,
        compile=args.compile,
        progress_bar=False,
    )


def bench_mim(args: argparse.Namespace, dist: DistInfo) -> dict:
    model_config = TINY_ENCODER if args.tiny else None
    encoder = registry.net_factory(args.network, 0, config=model_config, size=(args.size, args.size))
    mae = registry.mim_net_factory("mae_vit", encoder, config=TINY_DECODER if args.tiny else None).to(dist.device)
    trainer = make_trainer(mae, param_groups(mae, 1.5e-4, 0.05), lambda m, b: m(b.images).loss, args, dist)
    return measure(trainer, args, num_classes=1)


def bench_fine_tune(args: argparse.Namespace, dist: DistInfo) -> dict:
    model_config = TINY_ENCODER if args.tiny else None
    net = registry.net_factory(args.network, args.num_classes, config=model_config, size=(args.size, args.size))
    net = net.to(dist.device)
    groups = param_groups(net, 1e-3, 0.05, layer_decay=0.8)
    ema = ModelEMA(net, 0.9999) if args.ema else None

    def loss_fn(model: torch.nn.Module, batch: TrainingBatch) -> torch.Tensor:
        return F.cross_entropy(model(batch.images), batch.targets, label_smoothing=0.1)

    return measure(make_trainer(net, groups, loss_fn, args, dist, ema), args, num_classes=args.num_classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="vit_b16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=707, help="fine-tuning head size (the card's: 707)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--ema", action="store_true", help="fine-tuning keeps an EMA of the weights")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: a GPU when there is one)")
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT at 32 px, batch 16, 20 steps")
    parser.add_argument("--only", choices=("mim", "fine-tune"), help="run one of the two measurements")
    parser.add_argument("--output", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.tiny:
        (args.size, args.batch_size, args.steps, args.num_classes) = (32, 16, 20, 10)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = DistInfo(0, 1, 0, device)
    torch.manual_seed(0)
    setting = {
        "network": args.network + (" (tiny config)" if args.tiny else ""),
        "size": args.size,
        "batch_size": args.batch_size,
        "amp": args.amp or "float32",
        "compile": args.compile,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    print(", ".join(f"{key}: {value}" for key, value in setting.items()), flush=True)
    results = {}
    for name, bench in (("mim", bench_mim), ("fine-tune", bench_fine_tune)):
        if args.only not in (None, name):
            continue
        results[name] = bench(args, dist)
        figures = results[name]
        print(
            f"{name:>9}: {figures['images_per_s']:9.1f} images/s  ({figures['step_ms']:.1f} ms per step of "
            f"{args.batch_size}, {args.steps} steps timed after {args.warmup})",
            flush=True,
        )

    if args.output is not None:
        args.output.write_text(json.dumps({"setting": setting, "results": results}, indent=2) + "\n")

    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Inference speed measured against the machine's own matrix-multiply limit.

    python -m benchmarks.inference [--device cpu|cuda] [--modes float32 int8 ...] [--batch-sizes 1 4 16]

For each inference mode (dtype or int8) and batch size, one run measures, interleaved and repeated (the median of
``--repeats`` >= 5 is reported):

- the GEMM peak: the network's own linear-layer shapes (qkv, proj, mlp up, mlp down of one block) at the same
  token count, as plain ``F.linear`` calls in that dtype (for int8: dynamically quantized linears);
- the network's images/s, turned into achieved FLOP/s with the exact FLOP count of its config
  (``ViT.count_flops``: 162.1 GFLOP for vit_l16 at 256 px), and its ratio to that peak.

Absolute figures vary on shared machines; ratios taken in the same run do not. Other sections (load time and peak
memory, time to first prediction, training images/s) come from their own benchmark modules when run with --all.
"""

import argparse
import copy
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from benchmarks import load_memory, quantization, training
from birder.inference.optimize import optimize_for_inference
from birder.inference.predictor import compile_for_inference
from birder.model_registry import registry
from birder.net.vit import ViT

# A tiny network for the test suite's smoke run: same code paths, milliseconds per call.
TINY_CONFIG = {"hidden_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 256}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def block_gemms(net: ViT, tokens: int, mode: str, device: torch.device) -> tuple[Callable[[], object], int]:
    """The four GEMMs of one encoder block at ``tokens`` rows in ``mode``, and their FLOP count."""
    dim = net.hidden_dim
    mlp_dim = net.config["mlp_dim"]
    shapes = [(3 * dim, dim), (dim, dim), (mlp_dim, dim), (dim, mlp_dim)]  # (out, in) of qkv, proj, fc1, fc2
    flops = 2 * tokens * sum(out_f * in_f for (out_f, in_f) in shapes)
    dtype = torch.float32 if mode == "int8" else getattr(torch, mode)
    generator = torch.Generator().manual_seed(0)
    layers = nn.ModuleList(nn.Linear(in_f, out_f) for (out_f, in_f) in shapes)
    layers = optimize_for_inference(layers.to(device), mode)
    inputs = {
        in_f: torch.randn(tokens, in_f, generator=generator).to(device=device, dtype=dtype) for (_, in_f) in shapes
    }

    def run() -> None:
        with torch.inference_mode():
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    F.linear(inputs[layer.in_features], layer.weight, layer.bias)
                else:  # a dynamically quantized linear
                    layer(inputs[layer.in_features])

    return (run, flops)


def measure(
    network: str,
    size: tuple[int, int],
    num_classes: int,
    modes: list[str],
    batch_sizes: list[int],
    repeats: int,
    device: torch.device,
    config: dict | None = None,
    compile_net: bool = False,
) -> list[dict]:
    torch.manual_seed(0)
    base = registry.net_factory(network, num_classes, config=config, size=size).to(device).eval()
    flops_per_image = base.count_flops()
    tokens_per_image = base.num_special_tokens + base.grid_size[0] * base.grid_size[1]
    cases = []
    for mode in modes:
        # Float modes convert in place: each mode gets its own copy of the same weights.
        net = optimize_for_inference(copy.deepcopy(base), mode)
        if compile_net:
            net = compile_for_inference(net)
        dtype = torch.float32 if mode == "int8" else getattr(torch, mode)
        for batch_size in batch_sizes:
            inputs = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(1))
            inputs = inputs.to(device=device, dtype=dtype)

            def forward(net: nn.Module = net, inputs: torch.Tensor = inputs) -> None:
                with torch.inference_mode():
                    net(inputs)

            (gemm, gemm_flops) = block_gemms(base, batch_size * tokens_per_image, mode, device)
            forward()  # warm-up: allocator, kernels, lazy init
            gemm()
            cases.append(
                {
                    "mode": mode,
                    "batch_size": batch_size,
                    "forward": forward,
                    "gemm": gemm,
                    "gemm_flops": gemm_flops,
                    "model_times": [],
                    "gemm_times": [],
                }
            )

    # Interleave: every repeat visits every case, so slow drifts of the machine hit all of them alike.
    for _ in range(repeats):
        for case in cases:
            case["gemm_times"].append(_time_call(case["gemm"], device))
            case["model_times"].append(_time_call(case["forward"], device))

    results = []
    for case in cases:
        model_s = statistics.median(case["model_times"])
        gemm_s = statistics.median(case["gemm_times"])
        images_per_s = case["batch_size"] / model_s
        achieved = images_per_s * flops_per_image
        peak = case["gemm_flops"] / gemm_s
        results.append(
            {
                "mode": case["mode"],
                "batch_size": case["batch_size"],
                "images_per_s": images_per_s,
                "achieved_gflops": achieved / 1e9,
                "gemm_peak_gflops": peak / 1e9,
                "ratio_to_peak": achieved / peak,
                "model_s_median": model_s,
                "model_s_runs": case["model_times"],
                "gemm_s_runs": case["gemm_times"],
            }
        )

    float32 = {r["batch_size"]: r["images_per_s"] for r in results if r["mode"] == "float32"}
    for result in results:
        if result["batch_size"] in float32:
            result["speedup_vs_float32"] = result["images_per_s"] / float32[result["batch_size"]]

    return results


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without either, bf16 matmuls are emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def emulated_bf16_peak(network: str, size: tuple[int, int], repeats: int, config: dict | None) -> dict:
    """The bf16 GEMM rate at one image's token count, recorded when bf16 inference is skipped as hopeless."""
    with torch.device("meta"):
        net = registry.net_factory(network, 1, config=config, size=size)
    tokens = net.num_special_tokens + net.grid_size[0] * net.grid_size[1]
    cpu = torch.device("cpu")
    times = {}
    for mode in ("float32", "bfloat16"):
        real = registry.net_factory(network, 1, config={**(config or {}), "num_layers": 1}, size=size)
        (gemm, flops) = block_gemms(real, tokens, mode, cpu)
        gemm()
        times[mode] = flops / statistics.median(_time_call(gemm, cpu) for _ in range(repeats)) / 1e9
    return {"gemm_gflops_float32": times["float32"], "gemm_gflops_bfloat16": times["bfloat16"]}


def time_to_first_prediction(weights: Path, workdir: Path, repeats: int) -> dict:
    """Wall time of ``birder-predict`` on one photo, from process start to exit (import, load, predict, write)."""
    photo = workdir / "first_prediction" / "photo.jpg"
    photo.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (480, 640, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(photo)
    command = [sys.executable, "-m", "birder.scripts.predict", str(photo), "--weights", str(weights), "-j", "0",
               "--no-progress", "--device", "cpu", "--output-dir", str(photo.parent / "results")]  # fmt: skip
    times = []
    for _ in range(repeats):
        shutil.rmtree(photo.parent / "results", ignore_errors=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "runs": times, "weights": str(weights)}


def _run_json(main_fn: Callable[[list[str]], int], argv: list[str], output: Path) -> dict:
    """Run another benchmark module's ``main`` with ``--output`` and read its JSON back."""
    if main_fn([*argv, "--output", str(output)]) != 0:
        raise RuntimeError(f"benchmark {main_fn.__module__} failed")
    return json.loads(output.read_text())


def machine_description(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(results: list[dict]) -> None:
    print(f"{'mode':<10} {'batch':>5} {'img/s':>9} {'GFLOP/s':>9} {'GEMM peak':>10} {'ratio':>6} {'vs fp32':>8}")
    for r in results:
        print(
            f"{r['mode']:<10} {r['batch_size']:>5} {r['images_per_s']:>9.2f} {r['achieved_gflops']:>9.1f} "
            f"{r['gemm_peak_gflops']:>10.1f} {r['ratio_to_peak']:>6.2f} {r.get('speedup_vs_float32', 0):>8.2f}"
        )


SECTIONS = ("throughput", "load", "first-prediction", "training", "quantization")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="vit_l16")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--num-classes", type=int, default=707)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--modes", nargs="+", default=None, help="default: cpu float32 int8 (+ bfloat16 with native bf16); cuda bf16"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: cpu 1 4 16; cuda up to 256")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median reported), at least 5")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/results"), help="checkpoints, data")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (pays off on GPUs; on this 2-core AVX2 CPU vit_l16 batch 4 ran 0.91x eager)",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny network, for a smoke run of the benchmark itself")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/inference.json"))
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (figures are medians of at least 5 interleaved runs)")

    device = torch.device(args.device)
    config = TINY_CONFIG if args.tiny else None
    size = (32, 32) if args.tiny else tuple(args.size)
    native_bf16 = device.type == "cuda" or cpu_has_native_bf16()
    modes = args.modes or (["float32", "int8"] + (["bfloat16"] if native_bf16 else []) if device.type == "cpu"
                           else ["float32", "bfloat16"])  # fmt: skip
    batch_sizes = args.batch_sizes or ([1, 4, 16] if device.type == "cpu" else [1, 16, 64, 256])
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {
        "network": args.network,
        "size": list(size),
        "tiny": args.tiny,
        "machine": machine_description(device),
    }

    if "throughput" in args.sections:
        report["throughput"] = measure(
            args.network, size, args.num_classes, modes, batch_sizes, args.repeats, device, config, args.compile
        )
        if device.type == "cpu" and not native_bf16 and "bfloat16" not in modes:
            report["bfloat16_skipped"] = {
                "reason": "no native bf16 on this CPU: bf16 matmuls are emulated, far below float32",
                **emulated_bf16_peak(args.network, size, args.repeats, config),
            }
        print(f"{args.network} at {size[0]}x{size[1]} on {device} ({report['machine']['cpu_capability']}, "
              f"{report['machine']['threads']} threads)")  # fmt: skip
        print_table(report["throughput"])
        if "bfloat16_skipped" in report:
            skipped = report["bfloat16_skipped"]
            print(f"bfloat16 skipped: {skipped['reason']} (GEMM {skipped['gemm_gflops_bfloat16']:.1f} vs "
                  f"{skipped['gemm_gflops_float32']:.1f} GFLOP/s)")  # fmt: skip

    tiny_flag = ["--tiny"] if args.tiny else []
    if "load" in args.sections:
        report["load"] = _run_json(
            load_memory.main,
            ["--workdir", str(args.workdir), "--formats", "pt", *tiny_flag],
            args.workdir / "load.json",
        )
    if "first-prediction" in args.sections:
        weights = load_memory.ensure_checkpoint(args.workdir, "pt", tiny=args.tiny)
        report["first_prediction"] = time_to_first_prediction(weights, args.workdir, args.repeats)
        print(f"time to first prediction (birder-predict, one photo): {report['first_prediction']['seconds']:.2f} s")
    if "training" in args.sections:
        training_args = tiny_flag or ["--network", args.network, "--size", str(size[0]), "--batch-size", "2",
                                      "--steps", "3", "--warmup", "1", "--device", str(device)]  # fmt: skip
        report["training"] = _run_json(training.main, training_args, args.workdir / "training.json")
    if "quantization" in args.sections:
        quantization_args = ["--workdir", str(args.workdir / "quantization")]
        if args.tiny:
            quantization_args += ["--epochs", "1", "--train-per-class", "4", "--images", "20", "--skip-vit-l16"]
        report["quantization"] = _run_json(quantization.main, quantization_args, args.workdir / "quantization.json")

    report["seconds"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

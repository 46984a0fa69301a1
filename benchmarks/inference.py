"""Inference speed measured against the machine's own matrix-multiply limit.

    python -m benchmarks.inference [--device cpu|cuda] [--modes float32 int8 ...] [--batch-sizes 1 4 16]
    python -m benchmarks.inference --device cuda --sections throughput [--compile]   # the GPU run, as prepared

For each inference mode (dtype or int8) and batch size, one run measures, interleaved and repeated (the median of
``--repeats`` >= 5 is reported):

- the GEMM peak: the network's own linear-layer shapes (qkv, proj, mlp up, mlp down of one block) at the same
  token count, as linear layers in that mode (int8: dynamically quantized; int8-static: torchao's PT2E static
  quantization compiled by inductor, the ``int8`` extra);
- the network's images/s, turned into achieved FLOP/s with the exact FLOP count of its config
  (``ViT.count_flops``: 162.1 GFLOP for vit_l16 at 256 px), and its ratio to that peak;
- MFU: the achieved FLOP/s against the device's measured bf16 matmul peak (one large square GEMM, the best of
  ``--repeats``), whatever the mode: what the hardware could do at best. Target on a GPU: 0.60 for vit_l16 at
  batch 256 in bfloat16.

On CUDA the defaults are the GPU plan: float32 and bfloat16, batch 1, 64 and 256 (``--compile`` adds
``torch.compile``). The JSON names the machine: CPU model and SIMD/matrix flags, GPU name and capability.

Absolute figures vary on shared machines; ratios taken in the same run do not. Other sections (load time and peak
memory, time to first prediction, training images/s) come from their own benchmark modules when run with --all.
"""

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from benchmarks import load_memory, quantization, training
from birder.inference.optimize import (
    cpu_flags,
    cpu_model,
    native_bf16,
    optimize_for_inference,
    quantize_int8_static,
)
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


class BlockGemms(nn.Module):
    """The four linear layers of one encoder block: qkv, proj and mlp up read ``x``, mlp down reads ``hidden``."""

    def __init__(self, dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.qkv(x), self.proj(x), self.fc1(x), self.fc2(hidden))


def mode_input_dtype(mode: str) -> torch.dtype:
    """The dtype a mode's network takes: the int8 modes quantize float32 inputs themselves."""
    return torch.float32 if mode.startswith("int8") else getattr(torch, mode)


def convert(net: nn.Module, mode: str, calibration: tuple[torch.Tensor, ...]) -> nn.Module:
    """``net`` in ``mode``; ``int8-static`` is calibrated on ``calibration`` (the forward's inputs)."""
    if mode == "int8-static":
        return quantize_int8_static(net, calibration)
    return optimize_for_inference(net, mode)


def block_gemms(net: ViT, tokens: int, mode: str, device: torch.device) -> tuple[Callable[[], object], int]:
    """The four GEMMs of one encoder block at ``tokens`` rows in ``mode``, and their FLOP count."""
    (dim, mlp_dim) = (net.hidden_dim, net.config["mlp_dim"])
    flops = 2 * tokens * (3 * dim * dim + dim * dim + 2 * mlp_dim * dim)
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(tokens, width, generator=generator).to(device) for width in (dim, mlp_dim))
    gemms = convert(BlockGemms(dim, mlp_dim).to(device), mode, inputs)
    inputs = tuple(x.to(mode_input_dtype(mode)) for x in inputs)

    def run() -> None:
        with torch.inference_mode():
            gemms(*inputs)

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
        # Float modes convert in place: each mode gets its own copy of the same weights. Static int8 is compiled
        # anyway; its calibration on random inputs gives meaningless ranges but the same kernels (speed only).
        calibration = (torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2)).to(device),)
        net = convert(copy.deepcopy(base), mode, calibration)
        if compile_net and mode != "int8-static":
            net = compile_for_inference(net)
        dtype = mode_input_dtype(mode)
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
    return bool(native_bf16(cpu_flags()))


# The flags that decide matmul speed, kept in the JSON (the full list is long and says nothing more about it).
_SPEED_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")


def speed_flags(flags: frozenset[str]) -> list[str]:
    return sorted(flag for flag in flags if flag.startswith(_SPEED_FLAG_PREFIXES))


def bf16_gemm_peak(device: torch.device, n: int, repeats: int) -> float:
    """The device's bf16 matmul rate in GFLOP/s: one ``n`` x ``n`` x ``n`` GEMM, the best of ``repeats``."""
    generator = torch.Generator().manual_seed(0)
    (a, b) = (torch.randn(n, n, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    with torch.inference_mode():
        a @ b  # warm-up
        best = min(_time_call(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def add_mfu(results: list[dict], peak_gflops: float) -> None:
    for result in results:
        result["mfu"] = result["achieved_gflops"] / peak_gflops


def default_plan(device_type: str, native: bool) -> tuple[list[str], list[int]]:
    """Modes and batch sizes when not given: the GPU plan on CUDA; on a CPU bfloat16 only where native."""
    if device_type == "cuda":
        return (["float32", "bfloat16"], [1, 64, 256])
    return (["float32", "int8"] + (["bfloat16"] if native else []), [1, 4, 16])


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
    flags = cpu_flags()
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_flags": speed_flags(flags),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": bool(native_bf16(flags)),
        # Other processes on a shared machine slow every figure alike; ratios from one run hold better.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def machine_label(info: dict) -> str:
    """One line naming the machine, printed with every table (figures without one are not comparable)."""
    notable = [flag for flag in info["cpu_flags"] if flag.startswith("amx") or "bf16" in flag or "vnni" in flag]
    cpu = f"{info['cpu_model']} ({', '.join(notable) or 'no bf16/VNNI/AMX'}), {info['threads']} threads"
    return f"{info['gpu']} (capability {info['gpu_capability']}), host {cpu}" if "gpu" in info else cpu


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(results: list[dict]) -> None:
    print(
        f"{'mode':<10} {'batch':>5} {'img/s':>9} {'GFLOP/s':>9} {'GEMM peak':>10} {'ratio':>6} {'vs fp32':>8} "
        f"{'MFU':>6}"
    )
    for r in results:
        print(
            f"{r['mode']:<10} {r['batch_size']:>5} {r['images_per_s']:>9.2f} {r['achieved_gflops']:>9.1f} "
            f"{r['gemm_peak_gflops']:>10.1f} {r['ratio_to_peak']:>6.2f} {_ratio(r.get('speedup_vs_float32')):>8} "
            f"{r.get('mfu', 0):>6.2f}"
        )


SECTIONS = ("throughput", "load", "first-prediction", "training", "quantization")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="vit_l16")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--num-classes", type=int, default=707)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=None,
        help="default: cpu float32 int8 (+ bfloat16 if native); cuda float32, bfloat16",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: cpu 1 4 16; cuda 1 64 256")
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
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (figures for it are 'not measured here')")
    config = TINY_CONFIG if args.tiny else None
    size = (32, 32) if args.tiny else tuple(args.size)
    native_bf16 = device.type == "cuda" or cpu_has_native_bf16()
    (default_modes, default_batches) = default_plan(device.type, native_bf16)
    (modes, batch_sizes) = (args.modes or default_modes, args.batch_sizes or default_batches)
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
        peak_n = 256 if args.tiny else (8192 if device.type == "cuda" else 2048)
        report["bf16_gemm_peak_gflops"] = bf16_gemm_peak(device, peak_n, args.repeats)
        add_mfu(report["throughput"], report["bf16_gemm_peak_gflops"])
        if device.type == "cpu" and not native_bf16 and "bfloat16" not in modes:
            report["bfloat16_skipped"] = {
                "reason": "no native bf16 on this CPU: bf16 matmuls are emulated, far below float32",
                **emulated_bf16_peak(args.network, size, args.repeats, config),
            }
        print(f"{args.network} at {size[0]}x{size[1]} on {device}: {machine_label(report['machine'])}")
        print_table(report["throughput"])
        print(f"MFU: against the measured bf16 GEMM peak, {report['bf16_gemm_peak_gflops']:.1f} GFLOP/s")
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
            quantization_args += ["--modes", "bfloat16", "int8"]  # no compile in a smoke run
        report["quantization"] = _run_json(quantization.main, quantization_args, args.workdir / "quantization.json")

    report["seconds"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

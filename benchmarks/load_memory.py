"""Peak memory and time of loading a full-size vit_l16 checkpoint and classifying one photo.

    python -m benchmarks.load_memory [--workdir DIR] [--formats pt safetensors] [--output FILE]

Each measurement runs in a fresh interpreter so its peak resident set size (``ru_maxrss``) is its own. The
baseline is the same interpreter after ``import birder`` (torch and torchvision loaded), with no model. The target
(issue: core library) is ``peak - baseline <= 1.3 x file size``; the published Birder peaks at about 2.6x.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Runs in the child interpreter: prints one JSON line.
_CHILD = r"""
import json, resource, sys, time
import numpy as np
from PIL import Image
import birder
from birder.inference.classification import infer_image

path = sys.argv[1]
result = {}
if path != "-":
    start = time.perf_counter()
    (net, info) = birder.load_model(path, inference=True)
    result["load_s"] = time.perf_counter() - start
    transform = birder.classification_transform(birder.get_size_from_signature(info.signature), info.rgb_stats)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    start = time.perf_counter()
    (probs, _) = infer_image(net, photo, transform)
    result["predict_s"] = time.perf_counter() - start
    result["top1"] = int(probs.argmax())
# VmHWM is this process's own peak; ru_maxrss would carry the parent's peak across fork + exec on Linux.
try:
    with open("/proc/self/status") as status:
        hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result["peak_rss_bytes"] = hwm_kb * 1024
print(json.dumps(result))
"""


def _run_child(path: str) -> dict:
    output = subprocess.run([sys.executable, "-c", _CHILD, path], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


# A tiny stand-in for smoke runs of the benchmark itself.
TINY_CONFIG = {"hidden_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 256}


def ensure_checkpoint(workdir: Path, file_format: str, tiny: bool = False) -> Path:
    """A seeded, randomly initialised vit_l16 (707 classes, 256 px) written once and reused."""
    path = workdir / f"vit_l16{'_tiny' if tiny else ''}_random_707_256px.{file_format}"
    if path.is_file():
        return path

    import torch

    import birder
    from birder.io.checkpoint import make_signature
    from birder.model_registry import registry

    print(f"writing {path} (once)...", flush=True)
    torch.manual_seed(0)
    net = registry.net_factory("vit_l16", 707, size=(256, 256), config=TINY_CONFIG if tiny else None)
    info = birder.ModelInfo({f"species_{i:03d}": i for i in range(707)}, make_signature(3, (256, 256), 707),
                            {"mean": (0.5248, 0.5372, 0.5086), "std": (0.2135, 0.2103, 0.2622)})  # fmt: skip
    birder.save_model(net, path, info)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/results"), help="where checkpoints go")
    parser.add_argument("--formats", nargs="+", default=["pt", "safetensors"], choices=["pt", "safetensors"])
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is reported")
    parser.add_argument("--tiny", action="store_true", help="a tiny network, for a smoke run of the benchmark itself")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    baselines = [_run_child("-")["peak_rss_bytes"] for _ in range(args.repeats)]
    baseline = int(statistics.median(baselines))
    report: dict = {"baseline_rss_bytes": baseline, "formats": {}}
    print(f"baseline (python + import birder): {baseline / 2**20:.0f} MiB")
    print(f"{'format':<12} {'file MiB':>9} {'peak MiB':>9} {'over base':>10} {'x file':>7} {'load s':>7} {'pred s':>7}")
    for file_format in args.formats:
        path = ensure_checkpoint(args.workdir, file_format, tiny=args.tiny)
        file_size = path.stat().st_size
        runs = [_run_child(str(path)) for _ in range(args.repeats)]
        median = {key: statistics.median(run[key] for run in runs) for key in ("peak_rss_bytes", "load_s", "predict_s")}
        ratio = (median["peak_rss_bytes"] - baseline) / file_size
        report["formats"][file_format] = {"file_bytes": file_size, **median, "ratio_over_baseline": ratio}
        print(
            f"{file_format:<12} {file_size / 2**20:>9.0f} {median['peak_rss_bytes'] / 2**20:>9.0f} "
            f"{(median['peak_rss_bytes'] - baseline) / 2**20:>10.0f} {ratio:>7.2f} "
            f"{median['load_s']:>7.2f} {median['predict_s']:>7.2f}"
        )

    report["target_ratio"] = 1.3
    report["meets_target"] = all(f["ratio_over_baseline"] <= 1.3 for f in report["formats"].values())
    print(f"target: peak - baseline <= 1.3 x file size: {'met' if report['meets_target'] else 'NOT met'}")
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))

    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - started:.0f} s)")
    sys.exit(code)

"""Server memory under concurrent explanations of very large photos.

    python -m benchmarks.serve_memory [--requests 4] [--side 7000] [--method rollout] [--network vit_s16 --full]

``birder-serve`` is started as its own process on 127.0.0.1 with its default limits (extra options after ``--``
go to it), with a model saved once with random weights: by default a small ViT (2 blocks, 64 wide) at 224 px, whose
explanations run through the same code as a full-size one's. After one warm-up explanation (of a small photo) the
server's resident size is read (the baseline), its peak is reset (``/proc/<pid>/clear_refs``), and ``--requests``
explanations of a ``--side`` x ``--side`` PNG (a smooth picture: about 150 KB on disk, 49 megapixels at 7000) are
sent at once. The peak is the larger of the kernel's ``VmHWM`` and the resident size sampled every 5 ms.

Prints the baseline, the peak, the growth and the bound the README states for these settings
(:func:`birder.serve.memory.memory_bound`), with each request's status and time. Linux only (reads ``/proc``).
"""

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import birder
from birder.io.checkpoint import ModelInfo, make_signature
from birder.model_registry import registry

SMALL_CONFIG = {"hidden_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 128}
RGB_STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
MIB = 2**20


def make_model(directory: Path, network: str, size: int, full: bool) -> Path:
    torch.manual_seed(0)
    net = registry.net_factory(network, 10, config=None if full else SMALL_CONFIG, size=(size, size)).eval()
    info = ModelInfo({f"species_{i}": i for i in range(10)}, make_signature(3, (size, size), 10), RGB_STATS)
    return birder.save_model(net, directory / f"{network}_memory.safetensors", info)


def large_png(side: int) -> bytes:
    """A ``side`` x ``side`` RGB PNG of smooth gradients: tens of megapixels in a small file."""
    ramp = Image.linear_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
    image = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.point(lambda v: 255 - v)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def small_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


class RssSampler:
    """The largest ``VmRSS`` of a process, read every ``interval_s`` in a thread (where ``clear_refs`` is refused,
    ``VmHWM`` would count from the process's start)."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak_kib = max(self.peak_kib, memory_kib(self.pid, "VmRSS"))
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, options: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "birder.scripts.serve", "--weights", str(model), "--port", str(port)]
    # The server runs this checkout's birder, whatever the working directory
    root = str(Path(birder.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([*command, "--log-level", "warning", *options], env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"birder-serve exited with code {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return (process, url)
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError("birder-serve did not start in time")


async def explain_all(url: str, payload: bytes, count: int, method: str) -> list[tuple[int, float, str]]:
    import httpx

    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def explain_one() -> tuple[int, float, str]:
            started = time.perf_counter()
            files = {"image": ("large.png", payload, "image/png")}
            response = await client.post(f"/v1/explain?method={method}", files=files)
            error = response.json().get("error", "") if response.status_code != 200 else ""
            return (response.status_code, round(time.perf_counter() - started, 2), error)

        return await asyncio.gather(*(explain_one() for _ in range(count)))


def run(args: argparse.Namespace) -> dict[str, object]:
    import httpx

    from birder.scripts.serve import build_parser, settings_from_args
    from birder.serve.memory import memory_bound

    with tempfile.TemporaryDirectory(prefix="birder-bench-serve-memory-") as tmp:
        model = args.weights or make_model(Path(tmp), args.network, args.size, args.full)
        payload = large_png(args.side)
        (process, url) = start_server(model, args.server_options)
        try:
            warm_up = httpx.post(
                f"{url}/v1/explain?method={args.method}", files={"image": ("s.png", small_png())}, timeout=600
            )
            assert warm_up.status_code == 200, warm_up.text
            input_size = httpx.get(f"{url}/v1/models", timeout=60).json()["models"][0]["input_size"]
            baseline_kib = memory_kib(process.pid, "VmRSS")
            with contextlib.suppress(OSError):
                Path(f"/proc/{process.pid}/clear_refs").write_text("5")
            with RssSampler(process.pid) as sampler:
                answers = asyncio.run(explain_all(url, payload, args.requests, args.method))
            peak_kib = max(sampler.peak_kib, memory_kib(process.pid, "VmHWM"))
        finally:
            process.terminate()
            process.wait(timeout=60)

    settings = settings_from_args(build_parser().parse_args(["--weights", "x", *args.server_options]))
    bound = memory_bound(settings, tuple(input_size))
    return {
        "photo": f"{args.side}x{args.side} PNG, {len(payload) / 1024:.0f} KiB",
        "requests": args.requests,
        "method": args.method,
        "model": str(args.weights)
        if args.weights
        else f"{args.network} at {args.size} px" + ("" if args.full else " (small)"),
        "statuses": [status for (status, _, _) in answers],
        "seconds": [seconds for (_, seconds, _) in answers],
        "errors": sorted({error for (_, _, error) in answers if error}),
        "baseline_mib": round(baseline_kib / 1024, 1),
        "peak_mib": round(peak_kib / 1024, 1),
        "growth_mib": round((peak_kib - baseline_kib) / 1024, 1),
        "bound_mib": round(bound["total"] / MIB, 1),
        "bound_terms_mib": {key: round(value / MIB, 1) for (key, value) in bound.items() if key != "total"},
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4, help="explanations sent at once (default: %(default)s)")
    parser.add_argument("--side", type=int, default=7000, help="the photo's width and height (default: %(default)s)")
    parser.add_argument("--method", default="rollout", help="explanation method (default: %(default)s)")
    parser.add_argument("--network", default="vit_s16", help="network with random weights (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="its input size (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="the network's full size, not the small config")
    parser.add_argument("--weights", type=Path, help="a model file to serve instead")
    parser.add_argument("server_options", nargs="*", help="options for birder-serve (after --)")
    args = parser.parse_args(argv)
    figures = run(args)
    print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()

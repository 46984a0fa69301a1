"""Server throughput against batch prediction, on the same photos.

    python -m benchmarks.serve [--network vit_s16] [--images 256] [--concurrency 64] [--batch-size 32]

Both sides run the same model file, saved once with random weights (or ``--weights``):

- batch prediction: ``birder-predict``'s loop (:class:`birder.inference.predictor.Predictor`, ``DataLoader``
  workers decoding ahead) over the photo files, timed from the first photo to the last result;
- the server: ``birder-serve`` started as its own process on 127.0.0.1, sent every photo as a multipart
  ``POST /v1/classify`` by ``--concurrency`` concurrent clients (httpx, asyncio) from this process, timed the same
  way. The client's own CPU use counts against the server, as it would on a one-machine deployment.

Prints images/s of both, their ratio (the target is 0.8 or more) and the server's mean batch size from
/healthz. Absolute figures vary on shared machines; the ratio of runs made back to back varies less, and with
``--repeats`` the sides alternate and medians are reported.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import birder
from birder.io.checkpoint import ModelInfo, make_signature
from birder.model_registry import registry

# A tiny network for a smoke run: same code paths, milliseconds per image.
TINY_CONFIG = {"hidden_dim": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 256}
RGB_STATS = {"mean": (0.5191, 0.5306, 0.4877), "std": (0.2316, 0.2304, 0.2588)}


def make_photos(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """JPEG photos of phone-camera-thumbnail size (640x480 and 480x640), smooth enough to compress like photos."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        (height, width) = (480, 640) if index % 2 == 0 else (640, 480)
        coarse = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        path = directory / f"photo_{index:04d}.jpg"
        image.save(path, "JPEG", quality=88)
        paths.append(path)
    return paths


def make_model(directory: Path, network: str, size: int, num_classes: int, tiny: bool) -> Path:
    torch.manual_seed(0)
    config = TINY_CONFIG if tiny else None
    net = registry.net_factory(network, num_classes, config=config, size=(size, size)).eval()
    class_to_idx = {f"species_{i}": i for i in range(num_classes)}
    info = ModelInfo(class_to_idx, make_signature(3, (size, size), num_classes), RGB_STATS)
    return birder.save_model(net, directory / f"{network}_bench.safetensors", info)


def predict_images_per_second(model_path: Path, photos: list[Path], batch_size: int, workers: int) -> float:
    """``birder-predict``'s loop over ``photos``: images/s from the first photo to the last result."""
    from birder.inference.predictor import Predictor

    (net, model_info) = birder.load_model(model_path, inference=True)
    transform = birder.classification_transform(birder.get_size_from_signature(model_info.signature), RGB_STATS)
    predictor = Predictor(net, transform, batch_size=batch_size, num_workers=workers, read_metadata=False)
    for _ in predictor.predict_files(photos[:batch_size]):  # warm-up: first-call allocations, worker start-up
        pass

    started = time.perf_counter()
    done = sum(len(batch.indices) for batch in predictor.predict_files(photos))
    elapsed = time.perf_counter() - started
    assert done == len(photos), f"predicted {done} of {len(photos)} photos"
    return len(photos) / elapsed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``birder-serve`` in a child process, on a free loopback port."""

    def __init__(self, model_path: Path, batch_size: int, window_ms: float) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "birder.scripts.serve", "--weights", str(model_path)]
        command += ["--port", str(self.port), "--max-batch-size", str(batch_size)]
        command += ["--batch-window-ms", str(window_ms), "--log-level", "warning", "--timeout", "600"]
        self.process = subprocess.Popen(command)

    def wait_ready(self, timeout_s: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"birder-serve exited with code {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("birder-serve did not start in time")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def _send_all(url: str, payloads: list[tuple[str, bytes]], concurrency: int) -> list[int]:
    import httpx

    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def send(name: str, data: bytes) -> int:
            async with semaphore:
                response = await client.post("/v1/classify", files={"image": (name, data, "image/jpeg")})
                return response.status_code

        return await asyncio.gather(*(send(name, data) for (name, data) in payloads))


def serve_images_per_second(server: ServerProcess, photos: list[Path], concurrency: int) -> float:
    payloads = [(path.name, path.read_bytes()) for path in photos]  # read before the clock starts
    asyncio.run(_send_all(server.url, payloads[:concurrency], concurrency))  # warm-up

    started = time.perf_counter()
    statuses = asyncio.run(_send_all(server.url, payloads, concurrency))
    elapsed = time.perf_counter() - started
    failed = [status for status in statuses if status != 200]
    assert not failed, f"{len(failed)} requests failed: {sorted(set(failed))}"
    return len(photos) / elapsed


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="vit_s16", help="network built with random weights (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help="a model file to use instead of a random network")
    parser.add_argument("--size", type=int, default=224, help="input size of the random network (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=707)
    parser.add_argument("--tiny", action="store_true", help="a tiny config of the network (smoke test)")
    parser.add_argument("--images", type=int, default=256, help="photos per run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="predict batch size = server max batch size")
    parser.add_argument("--window-ms", type=float, default=5.0, help="server batching window (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="predict's decode workers")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each side; medians reported")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="birder-bench-serve-") as tmp:
        directory = Path(tmp)
        photos = make_photos(directory, args.images)
        model_path = args.weights or make_model(directory, args.network, args.size, args.num_classes, args.tiny)

        server = ServerProcess(model_path, args.batch_size, args.window_ms)
        try:
            server.wait_ready()
            (predict_rates, serve_rates) = ([], [])
            for _ in range(args.repeats):
                predict_rates.append(predict_images_per_second(model_path, photos, args.batch_size, args.workers))
                serve_rates.append(serve_images_per_second(server, photos, args.concurrency))
            import httpx

            health = httpx.get(f"{server.url}/healthz").json()
        finally:
            server.stop()

    predict_rate = statistics.median(predict_rates)
    serve_rate = statistics.median(serve_rates)
    figures: dict[str, object] = {
        "model": str(args.weights) if args.weights else f"{args.network} ({args.size} px, random weights)",
        "photos": args.images,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "torch_threads": torch.get_num_threads(),
        "predict_images_per_s": round(predict_rate, 2),
        "serve_images_per_s": round(serve_rate, 2),
        "ratio": round(serve_rate / predict_rate, 3),
        "server_mean_batch_size": health["mean_batch_size"],
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"model: {figures['model']}, {args.images} photos (640x480 JPEG), batch {args.batch_size}")
        print(f"birder-predict: {predict_rate:8.2f} images/s")
        print(f"birder-serve:   {serve_rate:8.2f} images/s  ({args.concurrency} concurrent clients)")
        print(f"ratio serve/predict: {serve_rate / predict_rate:.3f}  (target >= 0.8)")
        print(f"server mean batch size: {health['mean_batch_size']}")
    return figures


if __name__ == "__main__":
    main()

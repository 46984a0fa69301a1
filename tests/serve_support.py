"""Helpers shared by the server tests: a real uvicorn server on a free loopback port (in a thread, or in a
subprocess whose memory can be read), a tiny model, photos."""

import argparse
import contextlib
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import make_tiny_vit
from PIL import Image

import birder
from birder.inference.classification import infer_batch
from birder.io.checkpoint import ModelInfo, make_signature
from birder.io.images import load_image

TESTS_DIR = Path(__file__).parent

SPECIES = ["Eurasian Wren", "European Robin", "Great Tit", "Common Blackbird", "Eurasian Blue Tit"]
TINY_SIZE = (32, 48)
RGB_STATS = {"mean": (0.5191, 0.5306, 0.4877), "std": (0.2316, 0.2304, 0.2588)}


def tiny_model_info(num_classes: int = len(SPECIES)) -> ModelInfo:
    class_to_idx = {name: index for (index, name) in enumerate(SPECIES[:num_classes])}
    return ModelInfo(class_to_idx, make_signature(3, TINY_SIZE, num_classes), RGB_STATS)


def saved_and_loaded_tiny_model(directory: Path) -> tuple[torch.nn.Module, ModelInfo]:
    """A tiny ViT through the real file path: built, saved with birder.save_model, loaded back for inference."""
    net = make_tiny_vit(num_classes=len(SPECIES), size=TINY_SIZE, seed=3)
    path = birder.save_model(net, directory / "tiny_birds.safetensors", tiny_model_info())
    return birder.load_model(path, inference=True)


@contextlib.contextmanager
def running_server(app: object) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here, handed to uvicorn: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def encode(image: Image.Image, file_format: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format, **save_args)
    return buffer.getvalue()


def make_photos(directory: Path) -> dict[str, Path]:
    """Small photos in the formats and modes users send (JPEG, grayscale PNG, RGBA PNG, palette GIF, EXIF-rotated)."""
    rng = np.random.default_rng(7)
    directory.mkdir(parents=True, exist_ok=True)

    def noise(height: int, width: int, channels: int) -> np.ndarray:
        shape = (height, width, channels) if channels > 1 else (height, width)
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    rotated = Image.fromarray(noise(40, 70, 3))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photos = {
        "robin.jpg": encode(Image.fromarray(noise(60, 90, 3)), "JPEG", quality=90),
        "wren.png": encode(Image.fromarray(noise(50, 50, 1), mode="L"), "PNG"),
        "tit.png": encode(Image.fromarray(noise(45, 80, 4), mode="RGBA"), "PNG"),
        "blackbird.gif": encode(Image.fromarray(noise(64, 48, 3)).convert("P"), "GIF"),
        "rotated.jpg": encode(rotated, "JPEG", exif=exif.tobytes()),
    }
    paths = {}
    for name, data in photos.items():
        paths[name] = directory / name
        paths[name].write_bytes(data)
    return paths


def expected_outputs(net: torch.nn.Module, model_info: ModelInfo, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """What the library gives for one photo on its own: ``(probabilities, embedding)`` of ``infer_batch``."""
    transform = birder.classification_transform(birder.get_size_from_signature(model_info.signature), RGB_STATS)
    (probs, embedding) = infer_batch(net, transform(load_image(path)).unsqueeze(0), return_embedding=True)
    assert embedding is not None
    return (probs[0], embedding[0])


def padded_photo(total_bytes: int) -> bytes:
    """A valid small JPEG padded with zeros to ``total_bytes``: a large upload that decodes in no time.

    Decoders stop at the JPEG's end marker, so only the bytes of the request weigh on the server's memory.
    """
    photo = encode(Image.new("RGB", (48, 32), (120, 90, 60)), "JPEG")
    assert len(photo) < total_bytes
    return photo + bytes(total_bytes - len(photo))


class SlowNet(torch.nn.Module):
    """A network that stalls ``delay_s`` per batch while ``slow`` is set: a stand-in for an overloaded server.

    ``entered`` is set once a batch has reached the network, so a test knows its request is being computed;
    ``finished`` once a batch is through its stall.
    """

    def __init__(self, net: torch.nn.Module, delay_s: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.delay_s = delay_s
        self.slow = threading.Event()
        self.entered = threading.Event()
        self.finished = threading.Event()

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        if self.slow.is_set():
            time.sleep(self.delay_s)
        self.finished.set()
        return self.net.embedding(x)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net.classify(embedding)


def serve_main(argv: list[str] | None = None) -> None:
    """Body of the server subprocess of :func:`server_process`: a saved model, made slow, served on an open socket."""
    import uvicorn

    from birder.serve.app import ServeSettings, create_app

    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--max-inflight-mb", type=float, required=True)
    parser.add_argument("--delay-s", type=float, required=True)
    args = parser.parse_args(argv)

    (net, model_info) = birder.load_model(args.model, inference=True)
    slow_net = SlowNet(net, args.delay_s)
    slow_net.slow.set()
    settings = ServeSettings(max_inflight_bytes=int(args.max_inflight_mb * 2**20), batch_window_ms=5, timeout_s=60)
    app = create_app(slow_net, model_info, name="flooded", settings=settings)
    sock = socket.socket(fileno=args.fd)  # the listening socket the test bound: no race for the port
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


@contextlib.contextmanager
def server_process(model: Path, *, max_inflight_mb: float, delay_s: float) -> Iterator[tuple[str, int]]:
    """:func:`serve_main` in a subprocess on a free 127.0.0.1 port; yields the base URL and the process id."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    code = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import serve_support; serve_support.serve_main()"
    command = [sys.executable, "-c", code, str(model), "--fd", str(sock.fileno())]
    command += ["--max-inflight-mb", str(max_inflight_mb), "--delay-s", str(delay_s)]
    # Its output goes to a file, not a pipe: a pipe nobody reads would stall a server that logs a lot.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT)
        sock.close()  # the subprocess holds its own copy
        try:
            _wait_until_serving(url, process, log)
            yield (url, process.pid)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)


def _wait_until_serving(url: str, process: subprocess.Popen, log: Any) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise RuntimeError(f"the server subprocess exited with {process.returncode}: {output[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError("the server subprocess did not start within 60 s")
        time.sleep(0.1)


def memory_kib(pid: int, field: str) -> int:
    """A memory figure of a process from ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"no {field} in /proc/{pid}/status")


def reset_peak_memory(pid: int) -> None:
    """Resets the process's ``VmHWM`` to its current RSS (Linux's ``clear_refs`` value 5).

    Where the kernel refuses, the peak keeps counting from the process's start: an overestimate, never an under.
    """
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")

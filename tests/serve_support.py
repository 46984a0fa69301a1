"""Helpers shared by the server tests: a real uvicorn server on a free loopback port, a tiny model, photos."""

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from conftest import make_tiny_vit
from PIL import Image

import birder
from birder.inference.classification import infer_batch
from birder.io.checkpoint import ModelInfo, make_signature
from birder.io.images import load_image

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

"""The server's memory bound (birder.serve.memory): the budget that holds decoding to it, the per-pixel costs it
counts (measured against what decoding takes), and the server's resident size under explanations of very large
photos (benchmarks/serve_memory.py) against the bound the README states."""

import asyncio
import concurrent.futures
import contextlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from birder.serve.memory import Budget, decode_cost, default_decode_bytes, run_held

ROOT = Path(__file__).resolve().parents[1]
LINUX = Path("/proc/self/clear_refs").exists()


def test_budget_grants_in_order_and_a_cancelled_wait_holds_nothing() -> None:
    async def scenario() -> None:
        budget = Budget(10)
        await budget.acquire(6)
        large = asyncio.create_task(budget.acquire(8))
        await asyncio.sleep(0)
        small = asyncio.create_task(budget.acquire(3))  # would fit beside the 6, but comes after the 8
        await asyncio.sleep(0)
        assert (large.done(), small.done(), budget.held, budget.waiting) == (False, False, 6, 2)
        assert not budget.try_acquire(1)  # nobody jumps the queue

        budget.release(6)
        await asyncio.sleep(0)
        assert (large.done(), small.done(), budget.held) == (True, False, 8)
        budget.release(8)
        await asyncio.sleep(0)
        assert small.done() and budget.held == 3

        waiting = asyncio.create_task(budget.acquire(9))
        await asyncio.sleep(0)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert (budget.held, budget.waiting) == (3, 0)
        assert budget.try_acquire(7) and budget.held == 10
        budget.release(10)
        with pytest.raises(ValueError, match="can never fit"):
            await budget.acquire(11)

    asyncio.run(scenario())


def test_work_abandoned_by_its_request_stays_counted_until_its_thread_is_done() -> None:
    async def scenario() -> None:
        budget = Budget(2)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        finish = threading.Event()
        try:
            await budget.acquire(1)
            with pytest.raises(TimeoutError):  # the request gives up; its thread does not
                await asyncio.wait_for(run_held(budget, 1, pool, finish.wait, 30), 0.05)
            await budget.acquire(1)
            with pytest.raises(TimeoutError):  # queued behind the first: never started, dropped
                await asyncio.wait_for(run_held(budget, 1, pool, time.sleep, 30), 0.05)
            for _ in range(100):
                if budget.held == 1:
                    break
                await asyncio.sleep(0.01)
            assert budget.held == 1  # the dropped one gave its share back; the running one holds it

            finish.set()
            for _ in range(500):
                if budget.held == 0:
                    break
                await asyncio.sleep(0.01)
            assert budget.held == 0
        finally:
            finish.set()
            pool.shutdown(wait=True)

    asyncio.run(scenario())


def _png_header(width: int, height: int, bit_depth: int, colour_type: int) -> Image.Image:
    """A PNG of that size opened from its header (its pixel data empty): what the budget sees before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    palette = chunk(b"PLTE", bytes(range(3))) if colour_type == 3 else b""
    body = chunk(b"IHDR", header) + palette + chunk(b"IDAT", b"") + chunk(b"IEND", b"")
    return Image.open(io.BytesIO(b"\x89PNG\r\n\x1a\n" + body))


def test_a_photo_of_any_8_bit_kind_at_the_pixel_limit_fits_the_default_decoding_budget() -> None:
    side = math.isqrt(50_000_000)  # --max-pixels' default
    budget = default_decode_bytes(50_000_000)
    # Grayscale, RGB, palette, grayscale with alpha, RGBA; PNGs count as rotated (their EXIF may follow the pixels)
    for colour_type in (0, 2, 3, 4, 6):
        header = _png_header(side, side, 8, colour_type)
        assert decode_cost(header) <= budget, header.mode
    # 16 bits a channel at the same size take about twice that: refused with 413 by default, not decoded
    assert decode_cost(_png_header(side, side, 16, 0)) > budget


# ---------------------------------------------------------------------------------------------------------------------
# What decoding takes, against what the budget counts
# ---------------------------------------------------------------------------------------------------------------------

# Runs in a fresh interpreter: decode one file as a route does, and print the cost counted and the memory taken.
_PROBE = r"""
import json, sys
from pathlib import Path
from birder.data.transforms import classification_transform
from birder.inference.crops import crop_box
from birder.inference.detection import detection_transform
from birder.serve.memory import decode_cost
from birder.serve.uploads import decode_opened, open_upload

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

(path, route) = sys.argv[1:3]
stats = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
(transform, detect_transform) = (classification_transform((224, 224), stats), detection_transform((1024, 1024), stats))
opened = open_upload(Path(path).read_bytes(), "photo", 10**9)
cost = decode_cost(opened, crops=route == "detect")
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
photo = decode_opened(opened, "photo")
if route == "detect":  # the detector's copy, then each box's crop (the whole photo here) for the classifier
    detect_transform(photo)
    transform(crop_box(photo, [0, 0, photo.width, photo.height], 0.1))
else:
    transform(photo)
print(json.dumps({"cost": cost, "used": status("VmHWM") - before}))
"""


def _photo(directory: Path, kind: str) -> Path:
    """A 3000 x 2000 photo of ``kind`` (noise: no decoder shortcut)."""
    noise = np.random.default_rng(0).integers(0, 255, (2000, 3000, 3), dtype=np.uint8)
    rgb = Image.fromarray(noise)
    exif = rgb.getexif()
    exif[0x0112] = 6
    images = {
        "rgb.jpg": (rgb, {}),
        "rotated.jpg": (rgb, {"exif": exif.tobytes()}),
        "gray.png": (Image.fromarray(noise[..., 0]), {}),
        "palette_transparent.png": (rgb.convert("P"), {"transparency": 0}),
        "rgba.png": (Image.fromarray(np.dstack([noise, noise[..., 0]]), "RGBA"), {}),
        "deep.png": (Image.fromarray(noise[..., 0].astype(np.uint16) * 200), {}),
        "float.tif": (Image.fromarray(noise[..., 0].astype(np.float32) / 300), {}),
        "cmyk.jpg": (rgb.convert("CMYK"), {}),
    }
    (image, options) = images[kind]
    path = directory / kind
    image.save(path, **options)
    return path


def _measured(path: Path, route: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), route], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_costs(tmp_path: Path, cases: list[tuple[str, str]]) -> None:
    for kind, route in cases:
        figures = _measured(_photo(tmp_path, kind), route)
        print(f"{kind} {route}: used {figures['used'] / 2**20:.1f} MiB, counted {figures['cost'] / 2**20:.1f} MiB")
        assert figures["used"] <= figures["cost"], (kind, route, figures)


@pytest.mark.skipif(not LINUX, reason="reads the process's memory from Linux's /proc")
def test_decoding_takes_no_more_than_the_budget_counts(tmp_path: Path) -> None:
    # An 8-bit photo, rotated and cropped (the most of the common kind), and one with alpha; every kind: slow
    _check_costs(tmp_path, [("rotated.jpg", "detect"), ("rgba.png", "classify")])


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads the process's memory from Linux's /proc")
def test_decoding_of_every_kind_of_photo_takes_no_more_than_the_budget_counts(tmp_path: Path) -> None:
    kinds = ["rgb.jpg", "rotated.jpg", "gray.png", "palette_transparent.png", "rgba.png", "deep.png", "float.tif"]
    _check_costs(tmp_path, [(kind, route) for kind in [*kinds, "cmyk.jpg"] for route in ("classify", "detect")])


# ---------------------------------------------------------------------------------------------------------------------
# The server under explanations of very large photos
# ---------------------------------------------------------------------------------------------------------------------


def _explain_memory(argv: list[str]) -> dict:
    from benchmarks.serve_memory import main

    figures = main(argv)
    assert figures["statuses"] == [200] * figures["requests"], figures
    # Explanations hold request bodies, decoded photos and what waits for the model; the batch queue is not theirs
    terms = figures["bound_terms_mib"]
    explain_bound = terms["bodies"] + terms["decoding"] + terms["explanations"]
    assert figures["growth_mib"] <= explain_bound <= figures["bound_mib"], figures
    return figures


@pytest.mark.skipif(not LINUX, reason="reads the server's memory from Linux's /proc")
def test_an_explanation_of_a_large_photo_stays_within_the_servers_bound() -> None:
    # 6 megapixels with small limits: the map used to be drawn at the photo's size (about 85 bytes a pixel, 500 MB)
    server = ["--max-inflight-mb", "32", "--max-pixels", "10000000", "--max-decode-mb", "100"]
    _explain_memory(["--requests", "1", "--side", "2500", "--", *server])


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads the server's memory from Linux's /proc")
def test_four_explanations_of_49_megapixel_photos_stay_within_the_bound_the_readme_states() -> None:
    # The default limits (a longer --timeout only so that a busy CI machine cannot turn the test into a 504)
    figures = _explain_memory(["--requests", "4", "--side", "7000", "--", "--timeout", "300"])
    assert figures["bound_mib"] < 2400  # the README's figure for the default settings (a 224 px model)

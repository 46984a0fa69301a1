"""How much memory ``birder-serve`` may use for the requests it is serving, and what holds it to that.

A request's memory is its body (held under ``--max-inflight-mb`` by :class:`~birder.serve.uploads.InflightLimit`),
its decoded photo (held under ``--max-decode-mb`` by a :class:`Budget`, below), and what the model works on: the
photo at the model's input resolution waiting for a batch (``max_queue`` of them at most) or for an explanation
(``max_explanations``), which run one at a time. A photo is decoded, resized to the model's input and dropped in one
step of a decode thread: nothing holds a full-size photo after that.

:func:`memory_bound` adds these up: the README's figure (section "Serving") comes from it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from PIL import Image

if TYPE_CHECKING:
    from birder.serve.app import ServeSettings

T = TypeVar("T")

# Peak bytes per pixel of decoding a photo (birder.io.images.load_image) and resizing it for the model, by the kind
# of image (measured in fresh processes, 6 MP photos: tests/test_serve_memory.py keeps them above what decoding
# takes). PIL holds 8-bit RGB in 4 bytes a pixel; alpha is composited on white through three RGBA images; 16-bit,
# 32-bit and float images are scaled through float64 arrays.
BYTES_PER_PIXEL_8BIT = 6  # RGB, grayscale, palette (measured 4.8 to 5.8)
BYTES_PER_PIXEL_CMYK = 10  # measured 8.9
BYTES_PER_PIXEL_ALPHA = 22  # an alpha band or a transparent colour (measured 17.0 to 20.0)
BYTES_PER_PIXEL_HIGH_DEPTH = 46  # 16-bit, 32-bit integer, float, and any mode not named here (measured 39 to 41)
BYTES_PER_PIXEL_ROTATED = 4  # EXIF-rotated: one rotated copy
BYTES_PER_PIXEL_CROPS = 6  # /v1/detect: the detector's own copy (3 bytes a pixel), then one crop at a time (4)
# Allocator and decoder state beside the pixels, per image
DECODE_OVERHEAD_BYTES = 4 * 2**20
# Default of --max-decode-mb, per pixel of --max-pixels: an 8-bit photo with alpha (and maybe rotated: a PNG) at the
# pixel limit fits
DEFAULT_DECODE_BYTES_PER_MAX_PIXEL = 26

_8BIT_MODES = frozenset({"1", "L", "P", "RGB", "YCbCr", "LAB", "HSV", "RGBX"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION = 0x0112


def decode_cost(image: Image.Image, *, crops: bool = False) -> int:
    """Bytes that decoding ``image`` (opened, its pixels not read yet) and preparing it for the model take at the
    peak; ``crops``: the photo is also cropped (``/v1/detect``)."""
    (width, height) = image.size
    if image.mode in _ALPHA_MODES or ("transparency" in image.info and image.mode in _8BIT_MODES):
        per_pixel = BYTES_PER_PIXEL_ALPHA
    elif image.mode in _8BIT_MODES:
        per_pixel = BYTES_PER_PIXEL_8BIT
    elif image.mode == "CMYK":
        per_pixel = BYTES_PER_PIXEL_CMYK
    else:
        per_pixel = BYTES_PER_PIXEL_HIGH_DEPTH
    if _is_rotated(image):
        per_pixel += BYTES_PER_PIXEL_ROTATED
    if crops:
        per_pixel += BYTES_PER_PIXEL_CROPS
    return width * height * per_pixel + DECODE_OVERHEAD_BYTES


def _is_rotated(image: Image.Image) -> bool:
    """Whether load_image will rotate ``image`` (a copy), read from its header alone."""
    if image.format == "PNG" and "exif" not in image.info:
        # A PNG's EXIF may follow its pixels, and PIL's getexif() would decode them all to find it (outside the
        # budget): counted as rotated
        return True
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1) not in (None, 1)
    except Exception:  # an unreadable EXIF block: load_image ignores it too (and rotates nothing)
        return False


def default_decode_bytes(max_pixels: int) -> int:
    return max_pixels * DEFAULT_DECODE_BYTES_PER_MAX_PIXEL + DECODE_OVERHEAD_BYTES


class Budget:
    """An amount (bytes, or a count) that work in flight holds, never more than ``limit`` at once.

    :meth:`acquire` waits its turn (first come, first served: a large amount is not passed over by a stream of
    small ones). Only the event loop's thread calls it and :meth:`release`; :func:`run_holding` hands a release
    from a worker thread over to the loop.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a budget needs a limit of at least 1, got {limit}")
        self.limit = limit
        self.held = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for (_, future) in self._waiters if not future.done())

    def try_acquire(self, amount: int) -> bool:
        """Holds ``amount`` if it fits now and nobody is waiting; else holds nothing."""
        if self._waiters or self.held + amount > self.limit:
            return False
        self.held += amount
        return True

    async def acquire(self, amount: int) -> None:
        """Holds ``amount``, waiting for room; cancelled (a timeout), it holds nothing."""
        if amount > self.limit:
            raise ValueError(f"{amount} can never fit a budget of {self.limit}")
        if self.try_acquire(amount):
            return
        entry = (amount, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.release(amount)  # granted just as the wait was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()  # it may have been the one the others waited behind
            raise

    def release(self, amount: int) -> None:
        self.held -= amount
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            (amount, future) = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.held + amount > self.limit:
                return
            self._waiters.popleft()
            self.held += amount
            future.set_result(None)


async def run_holding(
    budget: Budget, amount: int, pool: concurrent.futures.Executor, function: Callable[..., T], *args: Any
) -> T:
    """``function(*args)`` in ``pool`` with ``amount`` of ``budget`` held (waiting for it first) until it has
    returned in its thread: :func:`run_held`."""
    await budget.acquire(amount)
    return await run_held(budget, amount, pool, function, *args)


async def run_held(
    budget: Budget, amount: int, pool: concurrent.futures.Executor, function: Callable[..., T], *args: Any
) -> T:
    """``function(*args)`` in ``pool``; the ``amount`` of ``budget`` the caller holds is released when it has
    returned in its thread (or, not started, was dropped).

    A request that stops waiting (a timeout) does not stop the thread; what the thread uses stays counted until
    it is done, so abandoned work cannot take the server over its bound. Work not started yet is dropped.
    """
    loop = asyncio.get_running_loop()
    try:
        future = pool.submit(function, *args)
    except BaseException:
        budget.release(amount)
        raise

    def released(_: concurrent.futures.Future[T]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone, and its budget too
            loop.call_soon_threadsafe(budget.release, amount)

    future.add_done_callback(released)
    return await asyncio.wrap_future(future)


def input_tensor_bytes(input_size: tuple[int, int]) -> int:
    """A photo at the model's input resolution: three float32 channels."""
    return 3 * input_size[0] * input_size[1] * 4


def memory_bound(settings: ServeSettings, input_size: tuple[int, int]) -> dict[str, int]:
    """The bytes the requests being served may hold at once, by what holds them, and their ``total``: the server's
    growth above its idle size, apart from the model's own working memory for one batch and one explanation.

    - ``bodies``: request bodies, twice ``max_inflight_bytes`` (a JSON body's text is decoded beside it);
    - ``decoding``: ``max_decode_bytes``;
    - ``batch_queue``: ``max_queue`` photos at the model's input resolution, waiting for a batch;
    - ``explanations``: ``max_explanations`` photos at the input resolution, and as many overlays
      (``OVERLAY_MAX_SIDE`` a side: the map in float32, its RGBA layer and the PNG).
    """
    from birder.serve.extras import OVERLAY_MAX_SIDE

    tensor = input_tensor_bytes(input_size)
    overlay = OVERLAY_MAX_SIDE * OVERLAY_MAX_SIDE * (4 + 4 + 4)
    terms = {
        "bodies": 2 * settings.max_inflight_bytes,
        "decoding": settings.max_decode_bytes,
        "batch_queue": settings.max_queue * tensor,
        "explanations": settings.max_explanations * (tensor + overlay),
    }
    return {**terms, "total": sum(terms.values())}

"""Dynamic batching: concurrent requests share one forward pass.

Each request hands in one preprocessed image and awaits its own row of the result. A collector task groups
waiting images into a batch: it sends the batch off as soon as ``max_batch_size`` images are there, or when the
oldest has waited ``window_s``, but never while the previous batch is still running (the next batch fills up
meanwhile, which is what makes a loaded server batch well). Batches run one at a time in a worker thread, so
the event loop keeps accepting requests while the model computes.
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from birder.errors import check_at_least

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


class QueueFullError(Exception):
    """More images are waiting than the batcher accepts: the server is overloaded."""


@dataclass(frozen=True)
class BatchInfo:
    """How one image was served: the size of its batch and where its time went."""

    batch_size: int
    queue_s: float
    inference_s: float


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    largest_batch: int = 0

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0


@dataclass
class _Pending:
    inputs: torch.Tensor
    future: "asyncio.Future[tuple[Any, BatchInfo]]"
    enqueued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher(Generic[Result]):
    """Groups :meth:`submit` calls into batches for ``run_batch``.

    ``run_batch`` takes the stacked inputs ``[B, ...]`` and returns ``B`` per-image results; it runs in a
    dedicated worker thread. Call :meth:`start` and :meth:`stop` from the event loop that serves requests.
    """

    def __init__(
        self,
        run_batch: Callable[[torch.Tensor], Sequence[Result]],
        *,
        max_batch_size: int = 32,
        window_s: float = 0.005,
        max_queue: int = 1024,
    ) -> None:
        check_at_least(max_batch_size, 1, "max_batch_size", ValueError)
        check_at_least(window_s, 0, "the batching window", ValueError)

        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task[None] | None = None
        self._running: asyncio.Future[Any] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        # One worker: batches run one after the other, each using all of torch's intra-op threads.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="birder-infer")
        self._task = asyncio.create_task(self._collect(), name="birder-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            # Joining the worker waits for the running batch (seconds on a big model): done in a thread so the
            # event loop keeps answering other requests and delivers that batch's results meanwhile.
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, inputs: torch.Tensor) -> tuple[Result, BatchInfo]:
        """Queue one image (``inputs`` without a batch dimension) and wait for its result.

        Cancelling the wait (a request timeout) withdraws the image if its batch has not started yet.
        """
        if not self.alive:
            raise RuntimeError("the batcher is not running")

        future: asyncio.Future[tuple[Any, BatchInfo]] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(inputs, future))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self._queue.maxsize} images are already waiting") from None

        return await future

    async def _collect(self) -> None:
        while True:
            batch: list[_Pending] = []
            try:
                await self._gather(batch)
                self._launch(batch)
            except asyncio.CancelledError:
                # stop(): requests held for the next batch are answered, not left to time out.
                self._fail(batch, RuntimeError("the server is shutting down"))
                raise
            except Exception as err:
                # One bad batch (inputs that do not stack, a worker that cannot start) fails its own requests
                # only; the loop carries on so the next requests are served and /healthz stays "ok".
                logger.exception("batch of %d images failed before running", len(batch))
                self._fail(batch, err)

    async def _gather(self, batch: list[_Pending]) -> None:
        """Fills ``batch`` (in place, so that a failure still knows whom to answer) with the next batch."""
        batch.append(await self._queue.get())
        if self._running is not None:
            # Wait for the worker; the queue keeps filling meanwhile. Errors are reported by _deliver.
            await asyncio.wait([self._running])

        deadline = batch[0].enqueued_at + self.window_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break

        # Requests that timed out while waiting are dropped, not computed.
        batch[:] = [pending for pending in batch if not pending.future.done()]

    def _launch(self, batch: list[_Pending]) -> None:
        """Hands ``batch`` to the worker thread; :meth:`_deliver` answers its requests when it is done."""
        if not batch:
            return
        started = time.perf_counter()
        inputs = torch.stack([pending.inputs for pending in batch])
        running = asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, inputs)
        running.add_done_callback(lambda done: self._deliver(done, batch, started))
        self._running = running

    @staticmethod
    def _fail(batch: list[_Pending], error: BaseException) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    def _deliver(self, done: "asyncio.Future[Sequence[Any]]", batch: list[_Pending], started: float) -> None:
        finished = time.perf_counter()
        error = done.exception() if not done.cancelled() else RuntimeError("the batch was cancelled")
        if error is None:
            results = done.result()
            if len(results) != len(batch):
                error = RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} images")
        if error is not None:
            logger.error("batch of %d images failed: %s", len(batch), error)
            self._fail(batch, error)
            return

        self.stats.batches += 1
        self.stats.images += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():  # its request may have timed out meanwhile
                info = BatchInfo(len(batch), started - pending.enqueued_at, finished - started)
                pending.future.set_result((result, info))

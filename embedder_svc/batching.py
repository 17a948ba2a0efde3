"""Micro-batching: single images from concurrent requests share one inference run.

A batch runs once `max_batch_size` images are queued, or `max_wait_s` after the oldest queued image
arrived, whichever comes first. One batch runs at a time; images arriving meanwhile queue for the
next, so under load batches fill up by themselves while a lone request waits at most `max_wait_s`."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np

from embedder_svc.metrics import EmbedderMetrics

logger = logging.getLogger(__name__)

InferFunction = Callable[[np.ndarray], Awaitable[np.ndarray]]


class BatcherClosed(Exception):
    """The batcher stopped (service shutting down) before this image ran."""


@dataclass
class _Pending:
    tensor: np.ndarray
    future: asyncio.Future[np.ndarray]
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    def __init__(self, infer: InferFunction, max_batch_size: int, max_wait_s: float, metrics: EmbedderMetrics) -> None:
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._metrics = metrics
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="embedder-batcher")

    async def submit(self, tensor: np.ndarray) -> np.ndarray:
        """Runs one preprocessed image [C, H, W] in some batch; returns its output row.
        Raises the backend's error if its batch failed, `BatcherClosed` on shutdown."""
        if self._closed:
            raise BatcherClosed("embedder is shutting down")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(tensor, future))
        self._arrived.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wait_for_batch()
            count = min(self.max_batch_size, len(self._queue))
            # A caller that gave up (cancelled call) leaves a done future behind: skip its image.
            batch = [item for item in (self._queue.popleft() for _ in range(count)) if not item.future.done()]
            if batch:
                await self._run_batch(batch)

    async def _wait_for_batch(self) -> None:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0].arrived + self.max_wait_s
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _run_batch(self, batch: list[_Pending]) -> None:
        self._metrics.batch_size.observe(len(batch))
        started = time.perf_counter()
        try:
            outputs = await self._infer(np.stack([item.tensor for item in batch]))
        except asyncio.CancelledError:  # closing while this batch ran
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherClosed("embedder is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - the failure belongs to each waiting caller
            logger.error("inference failed for a batch of %d: %s", len(batch), error)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        finally:
            self._metrics.inference_seconds.observe(time.perf_counter() - started)
        for item, row in zip(batch, outputs):
            if not item.future.done():
                item.future.set_result(row)

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosed("embedder is shutting down"))

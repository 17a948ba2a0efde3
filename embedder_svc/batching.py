"""Micro-batching: single images from concurrent requests share one inference run.

A batch runs once `max_batch_size` images are queued, or `max_wait_s` after the oldest queued image
arrived, whichever comes first. One batch runs at a time; images arriving meanwhile queue for the
next, so under load batches fill up by themselves while a lone request waits at most `max_wait_s`.

Traces: a batch serves several requests, each in its own trace. Each traced request in a batch gets
two spans of its own, children of its EmbedImages span: `batch wait` (from its images' arrival to the
batch's start) and `inference` (the batch's run), both tagged with the batch's id and size. So every
trace shows its whole embedder time without following links, and a batch's requests are found by its
id (`vsearch.batch.id`); one span per batch, linked to the requests, would leave a gap in each trace.

A lone image: with no wait configured and nothing queued or running, `run_now` runs it at once on the
thread that prepared it, as a batch of one (same metrics, same spans, `vsearch.batch.inline` true),
saving the queue's wake-up and two thread hops; images arriving meanwhile queue as they would behind a
running batch."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np
from opentelemetry.context import Context

from embedder_svc.metrics import EmbedderMetrics
from service_kit.tracing import current_trace, record_span

logger = logging.getLogger(__name__)

InferFunction = Callable[[np.ndarray], Awaitable[np.ndarray]]
# The backend's blocking run, safe on any thread (one run at a time: the backend's own lock).
BlockingInferFunction = Callable[[np.ndarray], np.ndarray]


class BatcherClosed(Exception):
    """The batcher stopped (service shutting down) before this image ran."""


@dataclass
class _Pending:
    tensor: np.ndarray
    future: asyncio.Future[np.ndarray]
    arrived: float = field(default_factory=time.monotonic)
    # The submitting request's trace context and arrival (time.time_ns), when it is traced.
    trace: Context | None = None
    arrived_ns: int = 0


class MicroBatcher:
    def __init__(
        self, infer: InferFunction, max_batch_size: int, max_wait_s: float, metrics: EmbedderMetrics,
        infer_blocking: BlockingInferFunction | None = None,
    ) -> None:
        self._infer = infer
        self._infer_blocking = infer_blocking
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._metrics = metrics
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._running_batch = False
        self._batch_ids = itertools.count(1)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="embedder-batcher")

    async def submit(self, tensor: np.ndarray) -> np.ndarray:
        """Runs one preprocessed image [C, H, W] in some batch; returns its output row.
        Raises the backend's error if its batch failed, `BatcherClosed` on shutdown."""
        if self._closed:
            raise BatcherClosed("embedder is shutting down")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        trace = current_trace()
        self._queue.append(_Pending(tensor, future, trace=trace, arrived_ns=0 if trace is None else time.time_ns()))
        self._arrived.set()
        return await future

    @property
    def idle(self) -> bool:
        """Whether an image run now by `run_now` would delay no other, and would have run at once in the
        queue too: no wait configured, nothing queued, no batch running, and the backend can run on the
        caller's thread. Read on the event loop."""
        return (self._infer_blocking is not None and self.max_wait_s == 0 and not self._queue
                and not self._running_batch and not self._closed)

    def run_now(self, tensor: np.ndarray, trace: Context | None = None) -> np.ndarray:
        """Runs one preprocessed image as a batch of one on the calling (worker) thread, for a caller that
        found the batcher `idle`; `trace` is its request's context (`current_trace()`, taken on the
        event loop). Raises the backend's error."""
        if self._infer_blocking is None:
            raise RuntimeError("this backend cannot run on the caller's thread")
        if self._closed:
            raise BatcherClosed("embedder is shutting down")
        started = time.perf_counter()
        started_ns = time.time_ns() if trace is not None else 0
        failure: BaseException | None = None
        try:
            return self._infer_blocking(tensor[np.newaxis])[0]
        except BaseException as error:
            failure = error
            raise
        finally:
            self._metrics.batch_size.observe(1)
            self._metrics.inference_seconds.observe(time.perf_counter() - started)
            self._metrics.lone_runs.inc()
            if trace is not None:
                _record_batch_spans(trace, {"vsearch.batch.id": next(self._batch_ids), "vsearch.batch.size": 1,
                                            "vsearch.batch.images_of_request": 1, "vsearch.batch.inline": True},
                                    started_ns, started_ns, time.time_ns(), failure)

    async def _run(self) -> None:
        while True:
            await self._wait_for_batch()
            count = min(self.max_batch_size, len(self._queue))
            # A caller that gave up (cancelled call) leaves a done future behind: skip its image.
            batch = [item for item in (self._queue.popleft() for _ in range(count)) if not item.future.done()]
            if batch:
                self._running_batch = True
                try:
                    await self._run_batch(batch)
                finally:
                    self._running_batch = False

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
        traced = [item for item in batch if item.trace is not None]
        started = time.perf_counter()
        started_ns = time.time_ns() if traced else 0
        failure: BaseException | None = None
        try:
            outputs = await self._infer(np.stack([item.tensor for item in batch]))
        except asyncio.CancelledError:  # closing while this batch ran
            failure = BatcherClosed("embedder is shutting down")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherClosed("embedder is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - the failure belongs to each waiting caller
            failure = error
            logger.error("inference failed for a batch of %d: %s", len(batch), error)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        finally:
            self._metrics.inference_seconds.observe(time.perf_counter() - started)
            if traced:
                self._trace_batch(traced, len(batch), started_ns, failure)
        for item, row in zip(batch, outputs):
            if not item.future.done():
                item.future.set_result(row)

    def _trace_batch(self, traced: list[_Pending], size: int, started_ns: int, failure: BaseException | None) -> None:
        """Each traced request's `batch wait` and `inference` spans (see the module's docstring). A
        request's images were submitted together and share its context object."""
        batch_id = next(self._batch_ids)
        ended_ns = time.time_ns()
        by_request: dict[int, list[_Pending]] = {}
        for item in traced:
            by_request.setdefault(id(item.trace), []).append(item)
        for items in by_request.values():
            attributes = {
                "vsearch.batch.id": batch_id, "vsearch.batch.size": size,
                "vsearch.batch.images_of_request": len(items),
            }
            _record_batch_spans(items[0].trace, attributes, min(item.arrived_ns for item in items), started_ns,
                                ended_ns, failure)

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


def _record_batch_spans(
    context: Context, attributes: dict[str, object], arrived_ns: int, started_ns: int, ended_ns: int,
    failure: BaseException | None,
) -> None:
    """A request's two spans for one batch: `batch wait` from its images' arrival to the batch's start,
    and `inference`, the batch's run."""
    record_span("batch wait", arrived_ns, started_ns, context=context, attributes=attributes)
    record_span("inference", started_ns, ended_ns, context=context, attributes=attributes, error=failure)

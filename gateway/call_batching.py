"""Concurrent searches share their downstream calls: one EmbedImages of many query images, one Search of
many query vectors.

A call for a key starts at once while fewer than `max_in_flight` calls for that key are running, so a
lone search waits for nothing (and its call is made from its own task, as without batching); searches
arriving while they run queue, and the next call (started
when one ends) carries every one queued, up to `max_items` (and `max_weight`, e.g. bytes). Under load
each downstream hop, its executor hops and its per-call work are paid once per call instead of once
per search (measured on 2 cores at 32 concurrent cache misses: see docs/benchmarks.md).

Each search keeps its own deadline: it stops waiting when its time is up, and a call runs until the
latest deadline among the searches it carries. A search that stops waiting before its call is sent
is left out of it, and a call that no search waits for any more is cancelled. A call runs in the
context (trace) of the first search it carries."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Hashable, Sequence, TypeVar

import grpc

from service_kit.status import ServiceError

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# Sends the items of one call; returns one outcome per item, in order: its result, or the exception
# that item alone failed with. Raising fails every item of the call. `timeout` is in seconds, or None
# for the caller's default.
SendFunction = Callable[[Hashable, list[ItemT], "float | None"], Awaitable[Sequence["ResultT | BaseException"]]]


@dataclass(eq=False)
class _Waiting(Generic[ItemT, ResultT]):
    item: ItemT
    weight: int
    # Absolute, time.monotonic; None: no deadline of its own.
    deadline: float | None
    future: asyncio.Future[ResultT]
    context: contextvars.Context
    # Once sent: the call, and every search it carries.
    call: asyncio.Task[None] | None = None
    batch: list[_Waiting[ItemT, ResultT]] | None = None


@dataclass
class _Key(Generic[ItemT, ResultT]):
    in_flight: int = 0
    queue: deque[_Waiting[ItemT, ResultT]] = field(default_factory=deque)


class CallBatcher(Generic[ItemT, ResultT]):
    def __init__(
        self, send: SendFunction, what: str, max_in_flight: int, max_items: int, max_weight: int | None = None,
    ) -> None:
        self._send = send
        # Named in the error of a search whose deadline passed while it waited.
        self._what = what
        self.max_in_flight = max(1, max_in_flight)
        self.max_items = max(1, max_items)
        self.max_weight = max_weight
        self._keys: dict[Hashable, _Key[ItemT, ResultT]] = {}
        # The running calls, referenced so they are not collected mid-flight.
        self._calls: set[asyncio.Task[None]] = set()

    async def submit(self, key: Hashable, item: ItemT, deadline: float | None = None, weight: int = 0) -> ResultT:
        """`item`'s outcome, from a call that carries it with others of the same key."""
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
        if state.in_flight < self.max_in_flight and not state.queue:
            return await self._send_alone(key, state, item, deadline)
        waiting = _Waiting(
            item, weight, deadline, asyncio.get_running_loop().create_future(), contextvars.copy_context()
        )
        state.queue.append(waiting)
        if state.in_flight < self.max_in_flight:
            self._start(key, state)
        try:
            if deadline is None:
                return await waiting.future
            async with asyncio.timeout(deadline - time.monotonic()):
                return await waiting.future
        except TimeoutError:
            self._left(waiting)
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self._what}: deadline exceeded") from None
        except asyncio.CancelledError:
            self._left(waiting)
            raise

    async def _send_alone(
        self, key: Hashable, state: _Key[ItemT, ResultT], item: ItemT, deadline: float | None
    ) -> ResultT:
        """Nothing to share a call with: the call is sent from the caller's own task, with no hop
        through another (measured: +12% on a lone cache miss's latency when every call took one)."""
        state.in_flight += 1
        try:
            (outcome,) = await self._send(key, [item], None if deadline is None else deadline - time.monotonic())
        finally:
            state.in_flight -= 1
            self._start(key, state)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @staticmethod
    def _left(waiting: _Waiting[ItemT, ResultT]) -> None:
        """A search stopped waiting: its call is cancelled if it was the last one waiting for it."""
        call, batch = waiting.call, waiting.batch
        if call is not None and batch is not None and not call.done() and all(
            other.future.done() for other in batch
        ):
            call.cancel()

    def _start(self, key: Hashable, state: _Key[ItemT, ResultT]) -> None:
        """Starts a call with the searches queued first (those still waiting), if any."""
        batch: list[_Waiting[ItemT, ResultT]] = []
        weight = 0
        while state.queue and len(batch) < self.max_items:
            waiting = state.queue[0]
            if waiting.future.done():  # stopped waiting (deadline, or its caller went away)
                state.queue.popleft()
                continue
            if batch and self.max_weight is not None and weight + waiting.weight > self.max_weight:
                break
            batch.append(state.queue.popleft())
            weight += waiting.weight
        if not batch:
            if not state.in_flight:
                self._keys.pop(key, None)
            return
        state.in_flight += 1
        call = asyncio.get_running_loop().create_task(self._call(key, state, batch), context=batch[0].context)
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        for waiting in batch:
            waiting.call, waiting.batch = call, batch

    async def _call(self, key: Hashable, state: _Key[ItemT, ResultT], batch: list[_Waiting[ItemT, ResultT]]) -> None:
        try:
            deadlines = [waiting.deadline for waiting in batch]
            timeout = None if None in deadlines else max(deadlines) - time.monotonic()  # type: ignore[type-var]
            try:
                outcomes = await self._send(key, [waiting.item for waiting in batch], timeout)
            except asyncio.CancelledError:  # the gateway is stopping
                for waiting in batch:
                    waiting.future.cancel()
                raise
            except Exception as error:  # noqa: BLE001 - the failure belongs to each search carried
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(error)
                return
            for waiting, outcome in zip(batch, outcomes, strict=True):
                if waiting.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    waiting.future.set_exception(outcome)
                else:
                    waiting.future.set_result(outcome)
        finally:
            for waiting in batch:  # no cycles left behind
                waiting.call = waiting.batch = None
            state.in_flight -= 1
            self._start(key, state)

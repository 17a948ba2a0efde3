"""Which index generation the gateway keys result-cache lookups by."""

from __future__ import annotations

import asyncio

from conftest import ManualClock
from gateway.index_generation import IndexGenerationTracker


class Downstream:
    """Stands in for VectorSearch.Stats: answers the generation it holds, optionally slowly."""

    def __init__(self) -> None:
        self.generation = 100
        self.calls = 0
        self.release: asyncio.Event | None = None

    async def fetch(self) -> int:
        self.calls += 1
        answer = self.generation
        if self.release is not None:
            await self.release.wait()
        return answer


async def test_refresh_zero_asks_every_time_so_any_write_is_seen():
    downstream = Downstream()
    tracker = IndexGenerationTracker(downstream.fetch, refresh_s=0)
    assert await tracker.current() == 100
    downstream.generation = 101  # written by someone else
    assert await tracker.current() == 101
    assert downstream.calls == 2


async def test_refresh_interval_reuses_the_answer_but_sees_own_writes_at_once():
    downstream, clock = Downstream(), ManualClock()
    tracker = IndexGenerationTracker(downstream.fetch, refresh_s=1.0, clock=clock)
    assert await tracker.current() == 100
    downstream.generation = 101  # a write elsewhere: not seen until the interval passes
    clock.now = 0.5
    assert await tracker.current() == 100
    tracker.observe_write(102)  # a write through this gateway: seen at once
    assert await tracker.current() == 102
    assert downstream.calls == 1
    clock.now = 1.6
    assert await tracker.current() == 101
    assert downstream.calls == 2


async def test_concurrent_callers_share_one_refresh():
    downstream = Downstream()
    downstream.release = asyncio.Event()
    tracker = IndexGenerationTracker(downstream.fetch, refresh_s=1.0, clock=ManualClock())
    waiting = [asyncio.ensure_future(tracker.current()) for _ in range(5)]
    await asyncio.sleep(0)
    downstream.release.set()
    assert await asyncio.gather(*waiting) == [100] * 5
    assert downstream.calls == 1


async def test_a_refresh_that_raced_a_write_does_not_roll_the_generation_back():
    downstream, clock = Downstream(), ManualClock()
    downstream.release = asyncio.Event()
    tracker = IndexGenerationTracker(downstream.fetch, refresh_s=1.0, clock=clock)
    stale = asyncio.ensure_future(tracker.current())  # reads 100 before the write lands
    while downstream.calls == 0:
        await asyncio.sleep(0)
    tracker.observe_write(101)
    downstream.release.set()
    assert await stale == 100
    assert tracker.known == 101
    assert await tracker.current() == 101

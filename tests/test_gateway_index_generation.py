"""The index generation cached results are checked against: search_svc's (the in-process cache, with
a stand-in for Stats) and the one every gateway shares in Redis (a real redis-server: restarted, its
counter evicted, down, paused)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from conftest import ManualClock, RedisProcess, metric_value, wait_until
from gateway.cache import QueryCache, RedisStore, generation_key
from gateway.index_generation import IndexGenerationTracker, SharedGenerations
from gateway.settings import CacheSettings


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


# ---- shared in Redis -----------------------------------------------------------------------------


class Shared:
    """`SharedGenerations` over a real Redis, as one gateway holds them."""

    def __init__(self, redis: RedisProcess, **cache_settings: object) -> None:
        self.registry = CollectorRegistry()
        settings = CacheSettings(**{"redis_timeout_s": 0.5, "generation_bump_timeout_s": 0.3, **cache_settings})
        self.store = RedisStore(redis.url, settings.redis_timeout_s)
        self.cache = QueryCache(self.store, settings, self.registry)
        self.generations = SharedGenerations(self.cache, self.registry, retry_interval_s=0.05)
        self.generations.default_collection = "vsearch_images"

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.registry, name, labels)

    async def close(self) -> None:
        await self.generations.close()
        await self.cache.close()


@pytest.fixture
async def shared(redis_server: RedisProcess):
    one = Shared(redis_server)
    yield one
    await one.close()


async def test_every_gateway_sees_every_bump_per_collection(redis_server: RedisProcess, shared: Shared):
    other = Shared(redis_server)  # a second gateway on the same Redis
    try:
        first = await shared.generations.read("c")
        assert first is not None and await other.generations.read("c") == first
        bumped = await other.generations.bump("c")
        assert bumped == first + 1
        assert await shared.generations.read("c") == bumped
        # Another collection moves on its own; no collection named means search_svc's default one.
        elsewhere = await shared.generations.read("d")
        await shared.generations.bump("c")
        assert await shared.generations.read("d") == elsewhere
        default = await shared.generations.bump("")
        assert await other.generations.read("vsearch_images") == default
        assert shared.metric("vsearch_gateway_generation_bumps_total", outcome="ok") == 2
    finally:
        await other.close()


async def test_a_counter_lost_to_eviction_or_a_redis_restart_comes_back_above_every_old_value(
    redis_server: RedisProcess, shared: Shared
):
    seen = [await shared.generations.read("c")]
    seen += [await shared.generations.bump("c") for _ in range(3)]
    await shared.store.client.delete(generation_key("c"))  # evicted (allkeys-lru may take any key)
    after_eviction = await shared.generations.read("c")
    assert after_eviction > max(seen)
    seen.append(await shared.generations.bump("c"))

    redis_server.kill()  # no persistence: the restarted Redis has lost every key
    redis_server.start()
    await wait_until(lambda: shared.generations.read("c"), timeout=10, what="Redis answers again")
    assert await shared.generations.read("c") > max(seen)


async def test_with_redis_down_a_write_still_succeeds_and_its_bump_lands_once_redis_is_back(
    redis_server: RedisProcess, shared: Shared
):
    before = await shared.generations.read("c")
    redis_server.kill()
    assert await shared.generations.bump("c") is None  # the write is acknowledged all the same
    assert not shared.generations.trusted("c") and shared.generations.trusted("d")
    assert await shared.generations.read("c") is None  # nothing cached for "c" is trusted here
    assert shared.metric("vsearch_gateway_generation_bumps_pending") == 1
    redis_server.start()
    await wait_until(lambda: shared.generations.trusted("c"), timeout=10, what="the bump retried until it lands")
    assert await shared.generations.read("c") > before
    assert shared.metric("vsearch_gateway_generation_bumps_pending") == 0


async def test_a_bump_that_times_out_on_a_live_redis_is_retried_until_it_lands(
    redis_server: RedisProcess, shared: Shared
):
    """Redis is up and keeps its keys but does not take writes in time (CLIENT PAUSE WRITE): the write
    through this gateway is acknowledged, the gateway trusts no cached result of the collection, and the
    retried bump moves the counter on as soon as Redis takes writes again; cached results of the other
    collections are trusted meanwhile."""
    before = await shared.generations.read("c")
    other = await shared.generations.read("d")
    admin = RedisStore(redis_server.url, timeout_s=1.0)
    try:
        await admin.client.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
        assert await shared.generations.bump("c") is None
        assert not shared.generations.trusted("c")
        # A search's lookup (MGET) is a read: not paused, and "d" is trusted.
        assert (await shared.cache.lookup(None, None, shared.generations.key("d"))).generation == other
        assert shared.generations.trusted("d")
        assert shared.metric("vsearch_gateway_generation_bumps_total", outcome="failed") >= 1
        await admin.client.execute_command("CLIENT", "UNPAUSE")
        await wait_until(lambda: shared.generations.trusted("c"), timeout=10, what="the retried bump landed")
        assert await shared.generations.read("c") > before
    finally:
        await admin.close()


async def test_a_write_bumped_while_an_earlier_retry_was_in_flight_keeps_its_own_retry(
    redis_server: RedisProcess, shared: Shared
):
    redis_server.kill()
    assert await shared.generations.bump("c") is None
    shared.generations.bump_soon("c")  # another write failed meanwhile: it needs a bump after it
    assert not shared.generations.trusted("c")
    redis_server.start()
    await wait_until(lambda: shared.generations.trusted("c"), timeout=10, what="the bumps landed")

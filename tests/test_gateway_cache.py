"""The gateway's query cache: both stores (a real redis-server and the in-process LRU) behave alike, keys
separate what must be separate, a result is taken only at the generation it was computed at, Redis keeps
the shared generation counters, and a dead or silent Redis costs a bounded miss, never an error."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from conftest import ManualClock, RedisProcess, redis_binary, wait_until
from gateway.cache import (
    LoopLagTolerantTimeout,
    LruTtlStore,
    QueryCache,
    RedisStore,
    canonical_filter,
    embedding_cache_key,
    generation_key,
    item_query_key,
    result_cache_key,
)
from gateway.settings import CacheSettings
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2


class StoreUnderTest:
    """One store plus a way to let time pass for it: a fake clock for the LRU, real time for Redis
    (whose TTLs are its own)."""

    def __init__(self, store, clock: ManualClock | None) -> None:
        self.store = store
        self.clock = clock

    async def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    async def past_ttl(self, ttl_s: float, key: str) -> None:
        """Lets the `ttl_s` of the entry under `key` run out, and checks it is gone: the LRU's clock moves
        past it; Redis, which expires on its own clock, is polled until it is gone (no fixed sleep)."""
        async def gone() -> bool:
            return await self.store.get_many([key]) == [None]

        if self.clock is not None:
            self.clock.now += ttl_s + 0.05
            assert await gone()
        else:
            await wait_until(gone, ttl_s + 10, f"{key!r} expired")


@pytest.fixture(scope="module")
def shared_redis():
    """One redis-server for the store tests (emptied before each); the kill tests start their own."""
    server = RedisProcess(redis_binary())
    server.start()
    yield server
    server.kill()


@pytest.fixture(params=["lru", "redis"])
async def store(request):
    if request.param == "lru":
        clock = ManualClock(1000.0)
        under_test = StoreUnderTest(LruTtlStore(max_entries=100, clock=clock), clock)
    else:
        redis_store = RedisStore(request.getfixturevalue("shared_redis").url, timeout_s=1.0)
        await redis_store.client.flushdb()
        under_test = StoreUnderTest(redis_store, None)
    yield under_test
    await under_test.store.close()


def counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# A search's reads and writes, through the calls the gateway makes: `lookup` reads the embedding, a
# result and a generation counter in one round trip, `result_at` takes the result only if it was computed
# at the generation given, and `save_in_background` writes.

async def cached_embedding(cache: QueryCache, key: str) -> np.ndarray | None:
    return (await cache.lookup(key, None)).embedding


async def cached_result(cache: QueryCache, key: str, generation: int = 1) -> gateway_pb2.VisualSearchResponse | None:
    return cache.result_at(await cache.lookup(None, key), generation)


async def save(
    cache: QueryCache,
    embedding: tuple[str, np.ndarray] | None = None,
    result: tuple[str, int, gateway_pb2.VisualSearchResponse] | None = None,
) -> None:
    cache.save_in_background(result=result, embedding=embedding)
    await cache.writes_done()


async def test_stores_get_what_was_set_and_none_for_unknown_keys(store):
    assert await store.store.get_many(["absent"]) == [None]
    await store.store.set_many([("a", b"\x00\x01binary", 60)])
    assert await store.store.get_many(["a"]) == [b"\x00\x01binary"]
    await store.store.set_many([("a", b"replaced", 60)])
    assert await store.store.get_many(["a"]) == [b"replaced"]


# Long enough that a stalled machine cannot expire an entry before its "still there" check; Redis's
# tests wait this long in real time.
SHORT_TTL_S = 2.0


async def test_stores_expire_entries_after_their_ttl(store):
    await store.store.set_many([("short", b"1", SHORT_TTL_S)])
    await store.store.set_many([("long", b"2", 60)])
    await store.advance(0.05)
    assert await store.store.get_many(["short"]) == [b"1"]
    await store.past_ttl(SHORT_TTL_S, "short")
    assert await store.store.get_many(["long"]) == [b"2"]


async def test_stores_read_and_write_several_entries_in_one_call(store):
    await store.store.set_many([("a", b"1", 60), ("b", b"2", SHORT_TTL_S)])
    assert await store.store.get_many(["a", "absent", "b"]) == [b"1", None, b"2"]
    await store.past_ttl(SHORT_TTL_S, "b")
    assert await store.store.get_many(["a", "b"]) == [b"1", None]


class DelayingProxy:
    """TCP proxy in its own threads (so it runs while the test's event loop is blocked) that holds
    every reply for `delay_s` (which the test may change): a network round trip of that length."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port, self.delay_s = target_port, delay_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies:
                    time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


async def test_a_redis_reply_that_arrives_in_time_to_a_busy_event_loop_is_taken(shared_redis):
    """Redis answers within the timeout, but the loop is blocked (other requests' work) until after
    the deadline: the answer is taken, where a plain timeout threw it away and counted a cache error
    (which also puts Redis in cool-down for every search)."""
    proxy = DelayingProxy(shared_redis.port, delay_s=0.02)
    redis_store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", timeout_s=0.05)
    try:
        await redis_store.client.set("k", b"v")  # connected, outside the bound
        loop = asyncio.get_running_loop()
        loop.call_later(0.005, time.sleep, 0.2)  # the GET is out; its answer comes at 20 ms
        assert await redis_store.get_many(["k"]) == [b"v"]
        loop.call_later(0.005, time.sleep, 0.2)
        assert await redis_store.get_many(["k", "absent"]) == [b"v", None]
    finally:
        await redis_store.close()
        proxy.close()


async def test_a_burst_of_timeouts_costs_those_calls_only_but_lasting_ones_start_the_cool_down(shared_redis):
    """Concurrent calls that all answer late (one busy Redis, a starved machine) used to put the cache in
    cool-down for every search for a second; now only timeouts that last `redis_timeouts_for_s`, with no
    answer in between, do. An error (refused, reset) still starts it at once (see the killed-Redis test)."""
    proxy = DelayingProxy(shared_redis.port, delay_s=0.0)
    registry = CollectorRegistry()
    settings = CacheSettings(redis_timeout_s=0.2, redis_cooldown_s=30, redis_timeouts_for_s=0.5)
    store = RedisStore(f"redis://127.0.0.1:{proxy.port}/0", settings.redis_timeout_s)
    cache = QueryCache(store, settings, registry)
    vector = np.ones(4, dtype=np.float32)

    async def found() -> bool:
        cached = await cached_embedding(cache, "e")
        return cached is not None

    try:
        await store.client.set("e", vector.tobytes())
        async def all_found() -> bool:
            return all(await asyncio.gather(*(found() for _ in range(8))))

        # 8 connections open and warm (their first calls may be slow on a loaded machine).
        await wait_until(all_found, timeout=10, what="8 concurrent lookups answered")
        # Later than any bound, loop lag given back included (2 s at most): these calls must time out.
        proxy.delay_s = 3.0
        errors = counter(registry, "vsearch_gateway_cache_errors_total")
        assert not any(await asyncio.gather(*(found() for _ in range(8))))
        assert counter(registry, "vsearch_gateway_cache_errors_total") == errors + 8
        proxy.delay_s = 0.0
        assert await found()  # tried, and answered: no cool-down

        proxy.delay_s = 3.0
        started = time.perf_counter()
        while time.perf_counter() - started < settings.redis_timeouts_for_s + 0.2:
            assert not await found()
        errors = counter(registry, "vsearch_gateway_cache_errors_total")
        proxy.delay_s = 0.0
        # In cool-down now: not even tried, so nothing more fails, and nothing is found.
        assert not await found()
        assert counter(registry, "vsearch_gateway_cache_errors_total") == errors
    finally:
        await cache.close()
        proxy.close()


async def test_loop_lag_tolerant_timeout_still_bounds_calls():
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        async with LoopLagTolerantTimeout(0.05, max_seconds=1.0):
            await asyncio.sleep(10)
    assert time.perf_counter() - started < 0.5
    # A loop that stays busy gets its lag back only up to max_seconds.
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        async with LoopLagTolerantTimeout(0.05, max_seconds=0.3):
            while True:
                time.sleep(0.06)
                await asyncio.sleep(0)
    assert 0.25 < time.perf_counter() - started < 0.6

    # A cancellation from outside stays a cancellation.
    async def cancelled_inside() -> None:
        async with LoopLagTolerantTimeout(5, max_seconds=5):
            await asyncio.sleep(10)

    task = asyncio.create_task(cancelled_inside())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_lru_evicts_the_least_recently_used_entry():
    store = LruTtlStore(max_entries=3, clock=ManualClock(1000.0))
    for key in ("a", "b", "c"):
        await store.set_many([(key, key.encode(), 60)])
    assert await store.get_many(["a"]) == [b"a"]  # "a" is now the most recently used; "b" the least
    await store.set_many([("d", b"d", 60)])
    assert len(store) == 3
    assert await store.get_many(["b"]) == [None]
    assert await store.get_many(["a", "c", "d"]) == [b"a", b"c", b"d"]


async def test_query_cache_round_trips_embeddings_and_results_and_counts(store):
    registry = CollectorRegistry()
    cache = QueryCache(store.store, CacheSettings(), registry)
    embedding = np.random.default_rng(0).standard_normal(1280).astype(np.float32)

    assert await cached_embedding(cache, "e") is None
    await save(cache, embedding=("e", embedding))
    cached = await cached_embedding(cache, "e")
    assert cached is not None and cached.dtype == np.float32
    np.testing.assert_array_equal(cached, embedding)  # raw float32 bytes: bit-exact

    response = gateway_pb2.VisualSearchResponse(index_generation=7, model_version="m@1")
    response.hits.add(id="x", score=0.5, image_uri="file:///x.jpg").metadata.update({"category": "shoes"})
    assert await cached_result(cache, "r") is None
    await save(cache, result=("r", 7, response))
    assert await cached_result(cache, "r", generation=7) == response

    assert counter(registry, "vsearch_gateway_cache_hits_total", cache="embedding") == 1
    assert counter(registry, "vsearch_gateway_cache_misses_total", cache="embedding") == 1
    assert counter(registry, "vsearch_gateway_cache_hits_total", cache="result") == 1
    assert counter(registry, "vsearch_gateway_cache_misses_total", cache="result") == 1
    assert counter(registry, "vsearch_gateway_cache_errors_total") == 0


class CountingStore(LruTtlStore):
    def __init__(self) -> None:
        super().__init__(max_entries=100)
        self.reads = 0

    async def get_many(self, keys):
        self.reads += 1
        return await super().get_many(keys)


async def test_a_result_is_taken_only_at_the_generation_it_was_computed_at():
    registry = CollectorRegistry()
    store = CountingStore()
    cache = QueryCache(store, CacheSettings(), registry)
    response = gateway_pb2.VisualSearchResponse(index_generation=7)
    response.hits.add(id="x", score=0.5)
    await save(cache, embedding=("e", np.ones(4, dtype=np.float32)), result=("r", 7, response))

    lookup = await cache.lookup("e", "r")
    assert store.reads == 1 and lookup.embedding is not None and lookup.result_generation == 7
    assert cache.result_at(lookup, 7) == response
    assert cache.result_at(lookup, 8) is None  # the index moved on since it was computed
    assert cache.result_at(lookup, None) is None  # the generation is unknown: nothing cached is trusted
    assert store.reads == 1
    assert counter(registry, "vsearch_gateway_cache_hits_total", cache="embedding") == 1
    assert counter(registry, "vsearch_gateway_cache_hits_total", cache="result") == 1
    assert counter(registry, "vsearch_gateway_cache_misses_total", cache="result") == 2
    # A newer result replaces the older one under the same key.
    await save(cache, result=("r", 8, gateway_pb2.VisualSearchResponse(index_generation=8)))
    assert (await cached_result(cache, "r", generation=8)).index_generation == 8
    assert await cached_result(cache, "r", generation=7) is None


def redis_calls(client_info: dict, command: str) -> int:
    return int(client_info.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_redis_gives_the_embedding_the_result_and_the_generation_in_one_round_trip(shared_redis):
    redis_store = RedisStore(shared_redis.url, timeout_s=1.0)
    await redis_store.client.flushdb()
    cache = QueryCache(redis_store, CacheSettings(), CollectorRegistry())
    try:
        created = await redis_store.generation(generation_key("c"), bump=False)
        await save(cache, embedding=("e", np.ones(4, dtype=np.float32)),
                   result=("r", created, gateway_pb2.VisualSearchResponse(index_generation=created)))
        await redis_store.client.config_resetstat()
        lookup = await cache.lookup("e", "r", generation_key("c"))
        stats = await redis_store.client.info("commandstats")
        # One MGET, nothing else.
        assert redis_calls(stats, "mget") == 1
        assert sum(redis_calls(stats, name) for name in ("get", "evalsha", "eval")) == 0
        assert lookup.answered and lookup.generation == created and lookup.result_generation == created
        assert cache.result_at(lookup, lookup.generation).index_generation == created
        absent = await cache.lookup(None, "r", generation_key("other"))
        assert absent.answered and absent.generation is None  # missing, truly: the store answered
    finally:
        await cache.close()


async def test_redis_generation_counters_start_from_its_clock_and_never_repeat(shared_redis):
    """Created from Redis's clock when missing, so that a counter lost (evicted, or with a restart of a
    Redis without persistence) comes back above every value it had; a bump adds one; a read changes
    nothing; a bump after a drop lets the counter expire, any later bump keeps it."""
    redis_store = RedisStore(shared_redis.url, timeout_s=1.0)
    await redis_store.client.flushdb()
    key = generation_key("c")
    try:
        seconds, micros = await redis_store.client.time()
        first = await redis_store.generation(key, bump=False)
        assert first >= seconds * 1_000_000 + micros
        assert await redis_store.generation(key, bump=False) == first
        bumped = [await redis_store.generation(key, bump=True) for _ in range(3)]
        assert bumped == [first + 1, first + 2, first + 3]
        assert await redis_store.client.ttl(key) == -1  # kept

        await redis_store.client.delete(key)  # what an eviction does
        again = await redis_store.generation(key, bump=True)
        assert again > first + 3

        dropped = await redis_store.generation(key, bump=True, expire_ms=60_000)
        assert dropped == again + 1 and 0 < await redis_store.client.pttl(key) <= 60_000
        assert await redis_store.generation(key, bump=True) == dropped + 1
        assert await redis_store.client.ttl(key) == -1
    finally:
        await redis_store.close()


async def test_query_cache_applies_each_kind_its_own_ttl():
    clock = ManualClock(1000.0)
    cache = QueryCache(
        LruTtlStore(100, clock=clock), CacheSettings(embedding_ttl_s=100, result_ttl_s=10), CollectorRegistry(), clock
    )
    await save(cache, embedding=("e", np.ones(4, dtype=np.float32)))
    await save(cache, result=("r", 1, gateway_pb2.VisualSearchResponse(index_generation=1)))
    clock.now += 11
    assert await cached_result(cache, "r") is None
    assert await cached_embedding(cache, "e") is not None
    clock.now += 90
    assert await cached_embedding(cache, "e") is None


async def test_a_killed_redis_gives_quick_misses_and_counted_errors(redis_server):
    registry = CollectorRegistry()
    # The cool-down runs on a test clock: it cannot end while the test checks it, nor need a real wait.
    clock = ManualClock(1000.0)
    settings = CacheSettings(redis_timeout_s=0.05, redis_cooldown_s=5)
    cache = QueryCache(RedisStore(redis_server.url, settings.redis_timeout_s), settings, registry, clock)
    await save(cache, embedding=("e", np.ones(8, dtype=np.float32)))
    assert await cached_embedding(cache, "e") is not None

    redis_server.kill()
    started = time.perf_counter()
    assert await cached_embedding(cache, "e") is None
    assert await cached_result(cache, "r") is None
    await save(cache, result=("r", 1, gateway_pb2.VisualSearchResponse()))
    await save(cache, embedding=("e", np.ones(8, dtype=np.float32)))
    assert time.perf_counter() - started < 0.5
    assert counter(registry, "vsearch_gateway_cache_errors_total") >= 1

    # During the cool-down Redis is not even tried: misses cost nothing and add no errors.
    errors = counter(registry, "vsearch_gateway_cache_errors_total")
    started = time.perf_counter()
    for _ in range(20):
        assert await cached_result(cache, "r") is None
    assert time.perf_counter() - started < 0.5  # loose: a busy CI machine; the error count is the proof
    assert counter(registry, "vsearch_gateway_cache_errors_total") == errors

    # Once it is back, the cache is used again.
    redis_server.start()
    clock.now += settings.redis_cooldown_s + 0.05
    await save(cache, embedding=("e2", np.ones(8, dtype=np.float32)))
    assert await cached_embedding(cache, "e2") is not None
    await cache.close()


async def test_a_redis_that_never_answers_costs_at_most_the_timeout():
    """A peer that accepts connections but never replies (a hung Redis, a black-holed route)."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    registry = CollectorRegistry()
    settings = CacheSettings(redis_timeout_s=0.1, redis_cooldown_s=0)
    cache = QueryCache(RedisStore(f"redis://127.0.0.1:{port}/0", settings.redis_timeout_s), settings, registry)
    try:
        for _ in range(3):
            started = time.perf_counter()
            assert await cached_result(cache, "r") is None
            await save(cache, embedding=("e", np.ones(4, dtype=np.float32)))
            assert time.perf_counter() - started < 2 * settings.redis_timeout_s + 0.15
        assert counter(registry, "vsearch_gateway_cache_errors_total") == 6
    finally:
        await cache.close()
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


def condition(field: str, op: int, value) -> search_pb2.Condition:
    result = search_pb2.Condition(field=field, op=op)
    if isinstance(value, str):
        result.value.string_value = value
    else:
        result.value.number_value = value
    return result


def test_embedding_keys_depend_on_image_crop_and_model_version():
    crop = embedder_pb2.CropBox(x=1, y=2, width=30, height=40)
    base = embedding_cache_key("ab" * 32, None, "m@1")
    assert base == embedding_cache_key("ab" * 32, None, "m@1")
    others = {
        embedding_cache_key("cd" * 32, None, "m@1"),
        embedding_cache_key("ab" * 32, crop, "m@1"),
        embedding_cache_key("ab" * 32, None, "m@2"),
        item_query_key("", "ab" * 32),
    }
    assert base not in others and len(others) == 4
    # An item id query is per collection, and no (collection, id) pair can pose as another.
    assert item_query_key("a", "b:c") != item_query_key("a:b", "c")


def test_result_keys_separate_every_input_and_ignore_condition_order():
    a, b = condition("category", search_pb2.EQ, "shoes"), condition("price", search_pb2.LT, 50.0)
    both = search_pb2.Filter(conditions=[a, b])
    key = result_cache_key("q", 10, both, None)
    assert key == result_cache_key("q", 10, search_pb2.Filter(conditions=[b, a]), None)
    assert canonical_filter(both) == canonical_filter(search_pb2.Filter(conditions=[b, a]))
    variants = [
        result_cache_key("q2", 10, both, None),
        result_cache_key("q", 11, both, None),
        result_cache_key("q", 10, search_pb2.Filter(conditions=[a]), None),
        result_cache_key("q", 10, search_pb2.Filter(conditions=[a, condition("price", search_pb2.LE, 50.0)]), None),
        result_cache_key("q", 10, search_pb2.Filter(conditions=[a, condition("price", search_pb2.LT, 51.0)]), None),
        result_cache_key("q", 10, both, 0.5),
        result_cache_key("q", 10, both, 0.0),
        result_cache_key("q", 10, both, None, collection="eval_1"),
        result_cache_key("q", 10, both, None, offset=10),  # the next page of the same query
    ]
    assert key not in variants and len(set(variants)) == len(variants)
    # Generation counters are per collection, and apart from every other key.
    assert len({generation_key(""), generation_key("a"), generation_key("b"), key}) == 4


def test_any_filter_has_a_result_key_nan_infinities_and_a_thousand_conditions_included():
    """The key is computed before search_svc validates the filter, so that search_svc's refusal (not a
    failure of the key) is what the caller gets: NaN once made the gateway answer INTERNAL."""
    listed = search_pb2.Condition(field="price", op=search_pb2.IN)
    listed.value.list_value.values.add().number_value = math.nan
    filters = [
        search_pb2.Filter(conditions=[condition("price", search_pb2.LT, math.nan)]),
        search_pb2.Filter(conditions=[condition("price", search_pb2.LT, math.inf)]),
        search_pb2.Filter(conditions=[condition("price", search_pb2.LT, -math.inf)]),
        search_pb2.Filter(conditions=[listed]),
        search_pb2.Filter(conditions=[condition("price", search_pb2.LT, float(n)) for n in range(1000)]),
    ]
    keys = [result_cache_key("q", 10, search_filter, None) for search_filter in filters]
    assert len(set(keys)) == len(filters)
    assert keys == [result_cache_key("q", 10, search_filter, None) for search_filter in filters]

"""The order of work in the gateway's Search: what a cache hit waits for, when the embedder is called,
and that cache writes happen after the reply without ever failing it; and, with Redis, the index
generation every gateway shares. The downstreams are stand-ins that can hold a call until the test lets
it go, so the order is observable (each gateway may have its own search_svc replica, with its own
generation, over one index); the cache is the real `QueryCache`, over the in-process store or a real
redis-server (the stores themselves are tested in test_gateway_cache)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from conftest import RedisProcess, metric_value, wait_until
from gateway.cache import LruTtlStore, QueryCache, RedisStore
from gateway.core import VisualSearchCore
from gateway.settings import GatewaySettings
from service_kit.status import ServiceError
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2

VECTOR = [0.5, 0.5, 0.5, 0.5]


class Embedder:
    """Stands in for the Embedder stub. `hold` makes EmbedImages wait until it is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0
        self.called = asyncio.Event()
        self.hold: asyncio.Event | None = None

    async def Info(self, request, timeout):  # noqa: N802 - gRPC's method name
        return embedder_pb2.InfoResponse(model_name="m", model_version="m@1", dimension=4, max_batch_size=32)

    async def EmbedImages(self, request, timeout):  # noqa: N802
        self.calls += 1
        self.called.set()
        try:
            if self.hold is not None:
                await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        result = embedder_pb2.EmbedResult(embedding=embedder_pb2.Embedding(values=VECTOR))
        return embedder_pb2.EmbedImagesResponse(results=[result], model_version="m@1")


class Catalog:
    """What the index holds, shared by every replica in front of it (as one Milvus is): the id of the
    best hit."""

    def __init__(self) -> None:
        self.best = "a"


class Index:
    """Stands in for one search_svc replica's VectorSearch stub, at its own `generation`, over
    `catalog`. `stats_hold` makes Stats wait; `write_error` makes writes fail after they were made."""

    def __init__(self, catalog: Catalog | None = None) -> None:
        self.catalog = catalog or Catalog()
        self.generation = 5
        self.stats_calls = 0
        self.search_calls = 0
        self.stats_hold: asyncio.Event | None = None
        self.write_error: grpc.aio.AioRpcError | None = None

    async def Stats(self, request, timeout):  # noqa: N802
        self.stats_calls += 1
        if self.stats_hold is not None:
            await self.stats_hold.wait()
        return search_pb2.StatsResponse(generation=self.generation, dimension=4, collection="vsearch_images")

    async def Search(self, request, timeout):  # noqa: N802
        self.search_calls += 1
        hits = search_pb2.HitList(hits=[search_pb2.Hit(id=self.catalog.best, score=0.9)])
        return search_pb2.SearchResponse(results=[hits], generation=self.generation)

    async def Delete(self, request, timeout):  # noqa: N802
        """Deletes the best hit, if asked to: the next best is "b"."""
        deleted = int(self.catalog.best in request.ids)
        if deleted:
            self.catalog.best = "b"
            self.generation += 1
        if self.write_error is not None:
            raise self.write_error
        return search_pb2.DeleteResponse(deleted=deleted, generation=self.generation)


class HeldStore(LruTtlStore):
    """The in-process store, whose writes wait for `release` (a slow cache) or fail (a dead one)."""

    def __init__(self) -> None:
        super().__init__(max_entries=100)
        self.release: asyncio.Event | None = None
        self.fail_writes = False

    async def set_many(self, entries) -> None:
        if self.release is not None:
            await self.release.wait()
        if self.fail_writes:
            raise ConnectionError("cache store is down")
        await super().set_many(entries)


class Rig:
    """One gateway's core over stand-in downstreams, with the in-process cache or `store`."""

    def __init__(self, store=None, index: Index | None = None, **cache_settings: object) -> None:
        self.embedder, self.index = Embedder(), index or Index()
        self.store = store if store is not None else HeldStore()
        self.registry = CollectorRegistry()
        settings = GatewaySettings(embedder_address="embedder:1", search_address="search:1", cache=cache_settings)
        self.cache = QueryCache(self.store, settings.cache, self.registry)
        self.core = VisualSearchCore(settings, self.embedder, self.index, self.cache)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def search(self, image: bytes = b"image-1") -> gateway_pb2.VisualSearchResponse:
        return await asyncio.wait_for(self.core.search(gateway_pb2.VisualSearchRequest(image=image, k=3)), 5)

    async def delete(self, *ids: str) -> gateway_pb2.DeleteImagesResponse:
        return await asyncio.wait_for(self.core.delete_images(gateway_pb2.DeleteImagesRequest(ids=ids)), 5)


@pytest.fixture
async def rig() -> Rig:
    rig = Rig()
    await rig.core.connect()
    return rig


async def test_a_hit_calls_neither_embedder_nor_search_and_checks_the_generation_once(rig: Rig) -> None:
    first = await rig.search()
    await rig.cache.writes_done()
    stats_before = rig.index.stats_calls
    second = await rig.search()
    assert not first.from_cache and second.from_cache and second.embedding_from_cache
    assert list(second.hits) == list(first.hits)
    assert (rig.embedder.calls, rig.index.search_calls) == (1, 1)
    assert rig.index.stats_calls == stats_before + 1


async def test_cache_writes_happen_after_the_reply(rig: Rig) -> None:
    rig.store.release = asyncio.Event()
    reply = await rig.search()  # answered while its cache write is still held
    assert not reply.from_cache and reply.timing.total_ms > 0
    assert len(rig.store) == 0
    rig.store.release.set()
    await rig.cache.writes_done()
    assert len(rig.store) == 2  # the embedding and the result
    again = await rig.search()
    assert again.from_cache and rig.embedder.calls == 1
    # The stored result is the search's answer, without the first reply's per-request fields.
    assert again.timing.embed_ms == 0 and again.timing.search_ms == 0


async def test_a_failing_cache_write_never_fails_the_search(rig: Rig) -> None:
    rig.store.fail_writes = True
    reply = await rig.search()
    await rig.cache.writes_done()
    assert not reply.from_cache and [hit.id for hit in reply.hits] == ["a"]
    assert rig.metric("vsearch_gateway_cache_errors_total") == 1


async def test_background_writes_are_bounded() -> None:
    rig = Rig(max_writes_in_flight=2)
    await rig.core.connect()
    rig.store.release = asyncio.Event()
    for n in range(3):
        await rig.search(f"image-{n}".encode())
    assert rig.metric("vsearch_gateway_cache_writes_skipped_total") == 1
    rig.store.release.set()
    await rig.cache.writes_done()
    assert len(rig.store) == 4  # two searches' entries; the third's write was skipped


async def test_an_embedding_miss_calls_the_embedder_without_waiting_for_the_generation(rig: Rig) -> None:
    rig.index.stats_hold = asyncio.Event()

    async def release_stats_once_embedding() -> None:
        await rig.embedder.called.wait()
        rig.index.stats_hold.set()

    releaser = asyncio.create_task(release_stats_once_embedding())
    reply = await rig.search()  # would time out if the embedder were called only after Stats answered
    await releaser
    assert not reply.from_cache and rig.embedder.calls == 1


async def test_a_result_cached_under_an_older_generation_is_not_served(rig: Rig) -> None:
    await rig.search()
    await rig.cache.writes_done()
    rig.index.generation = 6  # a write elsewhere (another gateway, straight to search_svc)
    reply = await rig.search()
    assert not reply.from_cache and reply.embedding_from_cache
    assert reply.index_generation == 6 and rig.index.search_calls == 2 and rig.embedder.calls == 1
    await rig.cache.writes_done()
    assert (await rig.search()).from_cache


async def test_a_result_hit_cancels_the_embedding_started_for_it(rig: Rig) -> None:
    await rig.search()
    await rig.cache.writes_done()
    # The result is still cached but the embedding is gone (evicted, expired): the embedder is called
    # at once, and given up when the result turns out to be there.
    rig.store._entries.pop(next(key for key in rig.store._entries if ":emb:" in key))
    rig.embedder.hold = asyncio.Event()
    reply = await rig.search()
    await asyncio.sleep(0)
    assert reply.from_cache
    assert (rig.embedder.calls, rig.embedder.cancelled) == (2, 1)


# ---- with Redis: the index generation every gateway shares ------------------------------------------


@pytest.fixture
async def gateways(redis_server: RedisProcess):
    """Two gateways on one real Redis, each in front of its own search_svc replica (each with its own
    generation, as replicas have) over one catalog."""
    catalog = Catalog()
    rigs = [
        Rig(RedisStore(redis_server.url, 0.5), Index(catalog), redis_timeout_s=0.5, generation_bump_timeout_s=0.3)
        for _ in range(2)
    ]
    for rig in rigs:
        await rig.core.connect()
    yield rigs
    for rig in rigs:
        await rig.core.close()


async def cached_search(rig: Rig) -> gateway_pb2.VisualSearchResponse:
    """A search, then the same again once its cache write is done: served from the cache."""
    first = await rig.search()
    await rig.cache.writes_done()
    again = await rig.search()
    assert again.from_cache and list(again.hits) == list(first.hits)
    return again


def redis_calls(info: dict, command: str) -> int:
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_with_redis_a_hit_is_one_round_trip_and_no_stats_call(gateways, redis_server: RedisProcess) -> None:
    rig = gateways[0]
    await cached_search(rig)
    stats_before = rig.index.stats_calls
    await rig.store.client.config_resetstat()
    hit = await rig.search()
    info = await rig.store.client.info("commandstats")
    assert hit.from_cache and rig.index.stats_calls == stats_before
    assert redis_calls(info, "mget") == 1
    assert sum(redis_calls(info, name) for name in ("get", "set", "evalsha", "eval")) == 0


async def test_a_delete_through_one_gateway_is_seen_at_once_by_the_others_cached_search(gateways) -> None:
    one, other = gateways
    cached = await cached_search(other)
    assert cached.hits[0].id == "a"
    deleted = await one.delete("a")
    assert deleted.deleted == 1
    # The other gateway's search_svc replica saw no write: its own generation has not moved.
    assert other.index.generation == 5
    after = await other.search()
    assert not after.from_cache and after.embedding_from_cache and after.hits[0].id == "b"
    assert after.index_generation == deleted.index_generation > cached.index_generation
    await other.cache.writes_done()
    assert (await other.search()).from_cache


async def test_a_counter_evicted_is_created_again_by_a_search_and_nothing_older_is_served(gateways) -> None:
    rig = gateways[0]
    cached = await cached_search(rig)
    await rig.store.client.delete(rig.core.shared.key(""))
    again = await rig.search()  # the entry was computed at a generation the new counter is above
    assert not again.from_cache and again.index_generation > cached.index_generation
    await rig.cache.writes_done()
    assert (await rig.search()).from_cache


async def test_with_redis_down_writes_succeed_searches_go_uncached_and_nothing_stale_comes_back(
    gateways, redis_server: RedisProcess
) -> None:
    one, other = gateways
    await cached_search(other)
    redis_server.kill()
    assert (await one.delete("a")).deleted == 1  # acknowledged without its bump
    assert not one.core.shared.trusted("")
    for rig in gateways:
        reply = await rig.search()
        assert not reply.from_cache and reply.hits[0].id == "b"
    assert metric_value(one.registry, "vsearch_gateway_generation_bumps_total", outcome="failed") >= 1
    redis_server.start()  # empty: the counter is created again, above the old one
    await asyncio.wait_for(_trusted(one), 10)
    for rig in gateways:  # cached again once the gateway's cool-down is over; never the stale "a"

        async def served_from_cache(rig: Rig = rig) -> bool:
            reply = await rig.search()
            assert reply.hits[0].id == "b"
            await rig.cache.writes_done()
            return reply.from_cache

        await wait_until(served_from_cache, timeout=10, what="searches cached again")


async def _trusted(rig: Rig) -> None:
    """Until the gateway's pending bump has landed (its background retry)."""
    while not rig.core.shared.trusted(""):
        await asyncio.sleep(0.02)


async def test_a_bump_that_fails_on_a_live_redis_is_retried_and_its_gateway_serves_nothing_stale_meanwhile(
    gateways,
) -> None:
    """Redis keeps its keys but takes no writes in time (CLIENT PAUSE WRITE): the delete is acknowledged
    all the same; the gateway that made it serves that collection uncached until its retried bump lands;
    from then on no gateway serves the result cached before the delete."""
    one, other = gateways
    for rig in gateways:
        await cached_search(rig)
    await one.store.client.execute_command("CLIENT", "PAUSE", "3000", "WRITE")
    try:
        deleted = await one.delete("a")
        assert deleted.deleted == 1
        assert not one.core.shared.trusted("")
        reply = await one.search()
        assert not reply.from_cache and reply.hits[0].id == "b"
    finally:
        await one.store.client.execute_command("CLIENT", "UNPAUSE")
    await asyncio.wait_for(_trusted(one), 10)
    reply = await other.search()
    assert not reply.from_cache and reply.hits[0].id == "b"


async def test_a_write_that_fails_after_it_was_made_still_moves_the_shared_generation(gateways) -> None:
    one, other = gateways
    await cached_search(other)
    one.index.write_error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection reset after the write"
    )
    with pytest.raises(ServiceError) as caught:
        await one.delete("a")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    await asyncio.wait_for(_trusted(one), 10)
    reply = await other.search()
    assert not reply.from_cache and reply.hits[0].id == "b"

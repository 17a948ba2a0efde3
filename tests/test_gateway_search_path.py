"""The order of work in the gateway's Search: what a cache hit waits for, when the embedder is called,
and that cache writes happen after the reply without ever failing it. The downstreams are stand-ins
that can hold a call until the test lets it go, so the order is observable; the cache is the real
`QueryCache` over the in-process store (its Redis behaviour is tested in test_gateway_cache)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from gateway.cache import LruTtlStore, QueryCache
from gateway.core import VisualSearchCore
from gateway.settings import GatewaySettings
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


class Index:
    """Stands in for the VectorSearch stub, at `generation`. `stats_hold` makes Stats wait."""

    def __init__(self) -> None:
        self.generation = 5
        self.stats_calls = 0
        self.search_calls = 0
        self.stats_hold: asyncio.Event | None = None

    async def Stats(self, request, timeout):  # noqa: N802
        self.stats_calls += 1
        if self.stats_hold is not None:
            await self.stats_hold.wait()
        return search_pb2.StatsResponse(generation=self.generation, dimension=4)

    async def Search(self, request, timeout):  # noqa: N802
        self.search_calls += 1
        hits = search_pb2.HitList(hits=[search_pb2.Hit(id="a", score=0.9)])
        return search_pb2.SearchResponse(results=[hits], generation=self.generation)


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
    def __init__(self, **cache_settings: object) -> None:
        self.embedder, self.index, self.store = Embedder(), Index(), HeldStore()
        self.registry = CollectorRegistry()
        settings = GatewaySettings(embedder_address="embedder:1", search_address="search:1", cache=cache_settings)
        self.cache = QueryCache(self.store, settings.cache, self.registry)
        self.core = VisualSearchCore(settings, self.embedder, self.index, self.cache)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def search(self, image: bytes = b"image-1") -> gateway_pb2.VisualSearchResponse:
        return await asyncio.wait_for(self.core.search(gateway_pb2.VisualSearchRequest(image=image, k=3)), 5)


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

"""Which index generation the gateway keys result-cache lookups by, and its settings."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from gateway.index_generation import IndexGenerationTracker
from gateway.settings import GatewaySettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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
    downstream, clock = Downstream(), Clock()
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
    tracker = IndexGenerationTracker(downstream.fetch, refresh_s=1.0, clock=Clock())
    waiting = [asyncio.ensure_future(tracker.current()) for _ in range(5)]
    await asyncio.sleep(0)
    downstream.release.set()
    assert await asyncio.gather(*waiting) == [100] * 5
    assert downstream.calls == 1


async def test_a_refresh_that_raced_a_write_does_not_roll_the_generation_back():
    downstream, clock = Downstream(), Clock()
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


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("GATEWAY_EMBEDDER_ADDRESS", "embedder:50052")
    monkeypatch.setenv("GATEWAY_SEARCH_ADDRESS", "search:50053")
    monkeypatch.setenv("GATEWAY_HTTP_PORT", "0")
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("GATEWAY_CACHE__RESULT_TTL_S", "30")
    monkeypatch.setenv("GATEWAY_CACHE__REDIS_TIMEOUT_S", "0.2")
    monkeypatch.setenv("GATEWAY_GENERATION_REFRESH_MS", "250")
    settings = GatewaySettings()
    assert (settings.embedder_address, settings.search_address) == ("embedder:50052", "search:50053")
    assert settings.port == 50051 and settings.http_port == 0 and settings.http_host == "127.0.0.1"
    assert settings.redis_url == "redis://cache:6379/0"
    assert settings.cache.result_ttl_s == 30 and settings.cache.redis_timeout_s == 0.2
    assert settings.cache.embedding_ttl_s == 86400 and settings.cache.lru_max_entries == 10000
    assert settings.generation_refresh_ms == 250
    assert (settings.default_k, settings.max_k, settings.add_batch_size) == (10, 1000, 32)
    assert settings.max_image_bytes == 20 * 1024 * 1024


def test_downstream_addresses_are_required(monkeypatch):
    monkeypatch.delenv("GATEWAY_EMBEDDER_ADDRESS", raising=False)
    monkeypatch.delenv("GATEWAY_SEARCH_ADDRESS", raising=False)
    with pytest.raises(ValidationError) as caught:
        GatewaySettings()
    assert {error["loc"][0] for error in caught.value.errors()} == {"embedder_address", "search_address"}

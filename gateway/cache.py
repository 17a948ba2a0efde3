"""The gateway's query cache: query embeddings and whole search results, in Redis or in-process.

Both stores have the same semantics (get / set with a TTL). `QueryCache` sits on top and makes the
cache strictly optional: any store failure or slow answer is logged (rate-limited), counted, and
treated as a miss, so a search never fails or hangs because of the cache."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from typing import Callable, Protocol

import numpy as np
import redis.asyncio as redis_asyncio
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.settings import CacheSettings
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# Bump when the key layout or the value encoding changes, so old entries in a shared Redis are ignored.
KEY_PREFIX = "vsearch:gw1"


# ---------------------------------------------------------------------------------------------- keys

def embedding_cache_key(image_sha256: str, crop: embedder_pb2.CropBox | None, model_version: str) -> str:
    """The query embedding of these image bytes, cropped so, by this model."""
    crop_part = "full" if crop is None else f"{crop.x},{crop.y},{crop.width},{crop.height}"
    return f"{KEY_PREFIX}:emb:{model_version}:{image_sha256}:{crop_part}"


def item_query_key(collection: str, item_id: str) -> str:
    """Stands in for the embedding key of an `item_id` query: its vector lives in the index, so the
    index generation in the result key already covers any change to it."""
    return f"{KEY_PREFIX}:item:{len(collection)}:{collection}:{item_id}"


def canonical_filter(search_filter: search_pb2.Filter) -> str:
    """A stable text form of a filter: equal filters (conditions in any order) give equal text."""
    conditions = sorted(
        json.dumps(
            [condition.field, condition.op, json_format.MessageToDict(condition.value)],
            sort_keys=True, separators=(",", ":"),
        )
        for condition in search_filter.conditions
    )
    return "[" + ",".join(conditions) + "]"


def result_cache_key(
    query_key: str, k: int, search_filter: search_pb2.Filter, min_score: float | None, generation: int,
    collection: str = "",
) -> str:
    """A search result is only valid for the index generation it was computed on; keying by the
    generation means a write makes every older entry unreachable (they expire by TTL)."""
    min_score_part = "-" if min_score is None else repr(float(min_score))
    digest = hashlib.sha256(
        "\x00".join([query_key, collection, str(k), canonical_filter(search_filter), min_score_part]).encode()
    ).hexdigest()
    return f"{KEY_PREFIX}:res:{generation}:{digest}"


# -------------------------------------------------------------------------------------------- stores

class CacheStore(Protocol):
    kind: str

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def close(self) -> None: ...


class LruTtlStore:
    """In-process: least recently used entries go first once `max_entries` are held; an entry
    expires `ttl_s` after it was set, by `clock` (injectable for tests)."""

    kind = "lru"

    def __init__(self, max_entries: int, clock: Clock = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if self.clock() >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._entries[key] = (self.clock() + ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()


class RedisStore:
    """Redis, shared by replicas. Every call is bounded by `timeout_s` (socket and overall) and never
    retried: a cache answer that comes late is worth nothing."""

    kind = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.client = redis_asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    async def get(self, key: str) -> bytes | None:
        async with asyncio.timeout(self.timeout_s):
            return await self.client.get(key)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self.client.set(key, value, px=max(1, int(ttl_s * 1000)))

    async def close(self) -> None:
        await self.client.aclose()


def create_store(redis_url: str | None, settings: CacheSettings) -> CacheStore:
    if redis_url:
        return RedisStore(redis_url, settings.redis_timeout_s)
    return LruTtlStore(settings.lru_max_entries)


# ------------------------------------------------------------------------------------------- facade

class RateLimitedLog:
    """At most one warning per `interval_s`, saying how many were held back."""

    def __init__(self, interval_s: float = 10.0, clock: Clock = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last = float("-inf")
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = self.clock()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        logger.warning(message + suffix, *args)
        self._last = now
        self._suppressed = 0


class QueryCache:
    """Typed, failure-proof access to a `CacheStore`: embeddings as raw float32 bytes, results as
    serialized `VisualSearchResponse`s."""

    def __init__(
        self,
        store: CacheStore,
        settings: CacheSettings,
        registry: CollectorRegistry,
        clock: Clock = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.hits = Counter(
            "vsearch_gateway_cache_hits", "Gateway cache hits, by cache (embedding|result).",
            ["cache"], registry=registry,
        )
        self.misses = Counter(
            "vsearch_gateway_cache_misses", "Gateway cache misses, by cache (embedding|result).",
            ["cache"], registry=registry,
        )
        self.errors = Counter(
            "vsearch_gateway_cache_errors",
            "Cache store calls that failed or timed out (each served as a miss / skipped write).",
            registry=registry,
        )
        for kind in ("embedding", "result"):
            self.hits.labels(kind)
            self.misses.labels(kind)
        self._skip_until = float("-inf")
        self._error_log = RateLimitedLog(clock=clock)

    def _available(self) -> bool:
        return self.clock() >= self._skip_until

    def _failed(self, operation: str, error: BaseException) -> None:
        self.errors.inc()
        self._skip_until = self.clock() + self.settings.redis_cooldown_s
        self._error_log.warning(
            "cache %s %s failed (%s); serving uncached, retrying the cache in %.1fs",
            self.store.kind, operation, type(error).__name__ if isinstance(error, TimeoutError) else error,
            self.settings.redis_cooldown_s,
        )

    async def _get(self, key: str) -> bytes | None:
        if not self._available():
            return None
        try:
            return await self.store.get(key)
        except Exception as error:  # noqa: BLE001 - any store failure is a miss
            self._failed("get", error)
            return None

    async def _set(self, key: str, value: bytes, ttl_s: float) -> None:
        if not self._available():
            return
        try:
            await self.store.set(key, value, ttl_s)
        except Exception as error:  # noqa: BLE001 - a lost write only costs a later miss
            self._failed("set", error)

    def _count(self, kind: str, hit: bool) -> None:
        (self.hits if hit else self.misses).labels(kind).inc()

    async def get_embedding(self, key: str) -> np.ndarray | None:
        raw = await self._get(key)
        if raw is not None and len(raw) % 4 == 0 and raw:
            self._count("embedding", True)
            return np.frombuffer(raw, dtype=np.float32)
        self._count("embedding", False)
        return None

    async def set_embedding(self, key: str, embedding: np.ndarray) -> None:
        await self._set(key, np.asarray(embedding, dtype=np.float32).tobytes(), self.settings.embedding_ttl_s)

    async def get_result(self, key: str) -> gateway_pb2.VisualSearchResponse | None:
        raw = await self._get(key)
        if raw is not None:
            response = gateway_pb2.VisualSearchResponse()
            try:
                response.ParseFromString(raw)
            except Exception as error:  # noqa: BLE001 - a corrupt entry is a miss
                self._error_log.warning("cache entry %s unreadable (%s); ignoring it", key, error)
            else:
                self._count("result", True)
                return response
        self._count("result", False)
        return None

    async def set_result(self, key: str, response: gateway_pb2.VisualSearchResponse) -> None:
        await self._set(key, response.SerializeToString(), self.settings.result_ttl_s)

    async def close(self) -> None:
        try:
            await self.store.close()
        except Exception as error:  # noqa: BLE001 - closing a dead connection may fail; nothing to do
            logger.debug("closing cache store: %s", error)

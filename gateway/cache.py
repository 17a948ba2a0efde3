"""The gateway's query cache: query embeddings and whole search results, in Redis or in-process.

Both stores have the same semantics (several gets / several sets with a TTL, in one round trip).
`QueryCache` sits on top and makes the cache strictly optional: any store failure or slow answer is
logged (rate-limited), counted, and treated as a miss, so a search never fails or hangs because of
the cache. A search reads it with `lookup` (one round trip for the embedding and the result under
the generation it guesses) and `result_for` (the result under the generation it then knows), and
writes it with `save_in_background`."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import redis.asyncio as redis_asyncio
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.metrics import CacheMetrics
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
    """A stable text form of a filter: equal filters (conditions in any order) give equal text. Any
    filter has one, NaN, infinities and a thousand conditions included: the key is computed before
    search_svc validates the filter, and a filter it refuses must come back as its refusal."""
    conditions = sorted(
        condition.SerializeToString(deterministic=True).hex() for condition in search_filter.conditions
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

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, entries: Sequence[tuple[str, bytes, float]]) -> None: ...

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

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._get(key) for key in keys]

    async def set_many(self, entries: Sequence[tuple[str, bytes, float]]) -> None:
        for key, value, ttl_s in entries:
            self._set(key, value, ttl_s)

    def _get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if self.clock() >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def _set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._entries[key] = (self.clock() + ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()


class LoopLagTolerantTimeout:
    """Like `asyncio.timeout`, except that time the event loop spent on other work does not count.
    When the deadline's timer runs late, the loop was busy (a loaded gateway, a starved process) and
    the call may not even have been sent yet: it gets that lag back, up to `max_seconds` in all. A
    fast Redis is then not failed, and put in cool-down for every search, for the gateway's own lag."""

    # A timer this late means the loop was busy rather than merely scheduling it.
    LAG_S = 0.002

    def __init__(self, seconds: float, max_seconds: float) -> None:
        self.seconds = seconds
        self.max_seconds = max(seconds, max_seconds)
        self.expired = False
        self._task: asyncio.Task | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._cancelling = 0
        self._deadline = 0.0
        self._last_chance = 0.0

    async def __aenter__(self) -> LoopLagTolerantTimeout:
        self._task = asyncio.current_task()
        if self._task is None:
            raise RuntimeError("LoopLagTolerantTimeout must be used inside a task")
        self._cancelling = self._task.cancelling()
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._deadline, self._last_chance = now + self.seconds, now + self.max_seconds
        self._handle = loop.call_at(self._deadline, self._on_deadline)
        return self

    def _on_deadline(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        lag = now - self._deadline
        if lag > self.LAG_S and now < self._last_chance:
            self._deadline = min(now + lag, self._last_chance)
            self._handle = loop.call_at(self._deadline, self._on_deadline)
            return
        self.expired = True
        assert self._task is not None
        self._task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: object
    ) -> None:
        assert self._handle is not None and self._task is not None
        self._handle.cancel()
        if self.expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError(f"no answer within {self.seconds}s") from exc


class RedisStore:
    """Redis, shared by replicas. Every call is bounded by `timeout_s` of the event loop's time (see
    `LoopLagTolerantTimeout`; 10x that, at least a second, when the loop lags) and never retried: a
    cache answer that comes late is worth nothing."""

    kind = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.max_timeout_s = max(1.0, 10 * timeout_s)
        self.client = redis_asyncio.Redis.from_url(
            url,
            # Only a backstop: `_bounded` limits each call. redis-py's own read timeout is a plain one,
            # which would count the event loop's lag.
            socket_timeout=self.max_timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    def _bounded(self) -> LoopLagTolerantTimeout:
        return LoopLagTolerantTimeout(self.timeout_s, self.max_timeout_s)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        async with self._bounded():
            return await self.client.mget(keys)

    async def set_many(self, entries: Sequence[tuple[str, bytes, float]]) -> None:
        async with self._bounded():
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value, ttl_s in entries:
                    pipe.set(key, value, px=max(1, int(ttl_s * 1000)))
                await pipe.execute()

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


@dataclass(frozen=True)
class CacheLookup:
    """What a search's one cache round trip found. `embedding` is final (counted as a hit or a miss
    already). The result was read under a key the search guessed (the last index generation it knew)
    and answers only for that key: `QueryCache.result_for` takes it, once the generation is known."""

    embedding: np.ndarray | None = None
    guessed_result_key: str | None = None
    guessed_result: gateway_pb2.VisualSearchResponse | None = None


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
        self.metrics = CacheMetrics(registry)
        self._skip_until = float("-inf")
        self._error_log = RateLimitedLog(clock=clock)
        # Strong references: the event loop keeps only weak ones to tasks.
        self._writes_in_flight: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------------------------- reads

    async def lookup(self, embedding_key: str | None, guessed_result_key: str | None) -> CacheLookup:
        """The embedding under `embedding_key` and the result under `guessed_result_key`, in one store
        round trip; a key that is None is not read."""
        keys = [key for key in (embedding_key, guessed_result_key) if key is not None]
        values = iter(await self._read(keys))
        embedding = None
        if embedding_key is not None:
            embedding = _decode_embedding(next(values))
            self.metrics.count_lookup("embedding", embedding is not None)
        guessed_result = None
        if guessed_result_key is not None:
            guessed_result = self._decode_result(next(values), guessed_result_key)
        return CacheLookup(embedding, guessed_result_key, guessed_result)

    async def result_for(self, key: str, lookup: CacheLookup) -> gateway_pb2.VisualSearchResponse | None:
        """The result cached under `key`: the one `lookup` read if it guessed this key (the usual
        case), else read now (the index changed since the guess, or there was no guess)."""
        if key == lookup.guessed_result_key:
            result = lookup.guessed_result
        else:
            result = self._decode_result((await self._read([key]))[0], key)
        self.metrics.count_lookup("result", result is not None)
        return result

    def _decode_result(self, raw: bytes | None, key: str) -> gateway_pb2.VisualSearchResponse | None:
        if raw is None:
            return None
        response = gateway_pb2.VisualSearchResponse()
        try:
            response.ParseFromString(raw)
        except Exception as error:  # noqa: BLE001 - a corrupt entry is a miss
            self._error_log.warning("cache entry %s unreadable (%s); ignoring it", key, error)
            return None
        return response

    async def _read(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        if not self._available():
            return [None] * len(keys)
        try:
            return list(await self.store.get_many(keys))
        except Exception as error:  # noqa: BLE001 - any store failure is a miss
            self._failed("get", error)
            return [None] * len(keys)

    # ------------------------------------------------------------------------------------ writes

    def save_in_background(
        self,
        result: tuple[str, gateway_pb2.VisualSearchResponse] | None = None,
        embedding: tuple[str, np.ndarray] | None = None,
    ) -> None:
        """Stores entries in one round trip without making the caller wait: a search's reply need not
        wait for the cache. Values are serialised now, so the caller may change them afterwards. At
        most `max_writes_in_flight` such writes run at once; beyond that they are skipped (and counted)
        rather than pile up behind a slow store."""
        entries = []
        if result is not None:
            entries.append((result[0], result[1].SerializeToString(), self.settings.result_ttl_s))
        if embedding is not None:
            entries.append((embedding[0], _embedding_bytes(embedding[1]), self.settings.embedding_ttl_s))
        if not entries or not self._available():
            return
        if len(self._writes_in_flight) >= self.settings.max_writes_in_flight:
            self.metrics.writes_skipped.inc()
            return
        task = asyncio.create_task(self._write(entries), name="cache-write")
        self._writes_in_flight.add(task)
        task.add_done_callback(self._writes_in_flight.discard)

    async def writes_done(self) -> None:
        """Waits for the background writes started so far (each is bounded by the store's timeout)."""
        while self._writes_in_flight:
            await asyncio.gather(*self._writes_in_flight, return_exceptions=True)

    async def _write(self, entries: list[tuple[str, bytes, float]]) -> None:
        if not self._available():
            return
        try:
            await self.store.set_many(entries)
        except Exception as error:  # noqa: BLE001 - a lost write only costs a later miss
            self._failed("set", error)

    # ---------------------------------------------------------------------------------- failures

    def _available(self) -> bool:
        return self.clock() >= self._skip_until

    def _failed(self, operation: str, error: BaseException) -> None:
        self.metrics.errors.inc()
        self._skip_until = self.clock() + self.settings.redis_cooldown_s
        self._error_log.warning(
            "cache %s %s failed (%s); serving uncached, retrying the cache in %.1fs",
            self.store.kind, operation, type(error).__name__ if isinstance(error, TimeoutError) else error,
            self.settings.redis_cooldown_s,
        )

    async def close(self) -> None:
        await self.writes_done()
        try:
            await self.store.close()
        except Exception as error:  # noqa: BLE001 - closing a dead connection may fail; nothing to do
            logger.debug("closing cache store: %s", error)


def _decode_embedding(raw: bytes | None) -> np.ndarray | None:
    if raw is not None and len(raw) % 4 == 0 and raw:
        return np.frombuffer(raw, dtype=np.float32)
    return None


def _embedding_bytes(embedding: np.ndarray) -> bytes:
    return np.asarray(embedding, dtype=np.float32).tobytes()

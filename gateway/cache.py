"""The gateway's query cache: query embeddings and whole search results, in Redis or in-process, and,
in Redis, each collection's index generation, which every gateway shares.

Both stores have the same semantics (several gets / several sets with a TTL, in one round trip).
`QueryCache` sits on top and makes the cache strictly optional: any store failure or slow answer is
logged (rate-limited), counted, and treated as a miss, so a search never fails or hangs because of
the cache. A search reads it with `lookup` (one round trip for the embedding, the result and, in
Redis, the collection's generation), takes the result with `result_at` only if it was computed at the
current generation, and writes it with `save_in_background`. Results are stored under a key without
the generation, with the generation they were computed at inside the value (`encode_result`)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import redis.asyncio as redis_asyncio
import redis.exceptions
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.metrics import CacheMetrics
from gateway.settings import CacheSettings
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# Bump when the key layout or the value encoding changes, so old entries in a shared Redis are ignored.
# gw2: result keys without the generation, the generation inside the value; shared generation counters.
KEY_PREFIX = "vsearch:gw2"
# The head of a result entry: the generation it was computed at.
_RESULT_HEAD = struct.Struct(">Q")


# ---------------------------------------------------------------------------------------------- keys

def embedding_cache_key(image_sha256: str, crop: embedder_pb2.CropBox | None, model_version: str) -> str:
    """The query embedding of these image bytes, cropped so, by this model."""
    crop_part = "full" if crop is None else f"{crop.x},{crop.y},{crop.width},{crop.height}"
    return f"{KEY_PREFIX}:emb:{model_version}:{image_sha256}:{crop_part}"


def item_query_key(collection: str, item_id: str) -> str:
    """Stands in for the embedding key of an `item_id` query: its vector lives in the index, so the
    index generation its result entry is checked against already covers any change to it."""
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
    query_key: str, k: int, search_filter: search_pb2.Filter, min_score: float | None, collection: str = "",
    offset: int = 0,
) -> str:
    """Where the latest result of this query is stored: its page of k hits from `offset` (gateway/search_paging.py).
    The key holds no generation: the entry carries the generation it was computed at (`encode_result`), and is
    used only while that is the current one, so one round trip reads the result and the current generation
    together."""
    min_score_part = "-" if min_score is None else repr(float(min_score))
    parts = [query_key, collection, str(k), canonical_filter(search_filter), min_score_part, str(offset)]
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return f"{KEY_PREFIX}:res:{digest}"


def generation_key(collection: str) -> str:
    """The shared index generation of a collection (by its resolved name): an integer counter."""
    return f"{KEY_PREFIX}:gen:{collection}"


def encode_result(generation: int, response: gateway_pb2.VisualSearchResponse) -> bytes:
    return _RESULT_HEAD.pack(generation) + response.SerializeToString()


def result_generation(raw: bytes | None) -> int | None:
    """The generation a stored result was computed at; None for no (or no readable) entry."""
    if raw is None or len(raw) < _RESULT_HEAD.size:
        return None
    return _RESULT_HEAD.unpack_from(raw)[0]


# -------------------------------------------------------------------------------------------- stores

class CacheStore(Protocol):
    kind: str
    # Whether it keeps the shared generation counters (`generation`): only a store every gateway shares.
    shares_generations: bool

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, entries: Sequence[tuple[str, bytes, float]]) -> None: ...

    async def close(self) -> None: ...


class LruTtlStore:
    """In-process: least recently used entries go first once `max_entries` are held; an entry
    expires `ttl_s` after it was set, by `clock` (injectable for tests)."""

    kind = "lru"
    shares_generations = False

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


# A collection's generation counter: created, when missing, from Redis's own clock (microseconds since
# the epoch, one clock for every gateway), so a counter that was evicted or lost with a restart starts
# above any value it had before (it gains one per write, far slower than the clock); then read, or
# bumped. A bump after a drop lets the counter expire once the collection's results have (ARGV[2] ms);
# any other bump keeps it. KEYS[1]: the counter; ARGV[1]: "read" or "bump"; ARGV[2]: expiry, "0" none.
GENERATION_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = redis.call('TIME')
  redis.call('SET', KEYS[1], now[1] .. string.format('%06d', tonumber(now[2])))
end
if ARGV[1] == 'bump' then
  local value = redis.call('INCR', KEYS[1])
  if ARGV[2] ~= '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  else
    redis.call('PERSIST', KEYS[1])
  end
  return value
end
return redis.call('GET', KEYS[1])
"""


class RedisStore:
    """Redis, shared by replicas. Every call is bounded by `timeout_s` of the event loop's time (see
    `LoopLagTolerantTimeout`; 10x that, at least a second, when the loop lags) and never retried: a
    cache answer that comes late is worth nothing. It also keeps the generation counters every
    gateway shares (`generation`)."""

    kind = "redis"
    shares_generations = True

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
        # EVALSHA, and EVAL when Redis does not know the script (first use, after a restart).
        self._generation_script = self.client.register_script(GENERATION_SCRIPT)

    def _bounded(self, timeout_s: float | None = None) -> LoopLagTolerantTimeout:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        return LoopLagTolerantTimeout(timeout_s, max(timeout_s, self.max_timeout_s))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        async with self._bounded():
            return await self.client.mget(keys)

    async def set_many(self, entries: Sequence[tuple[str, bytes, float]]) -> None:
        async with self._bounded():
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value, ttl_s in entries:
                    pipe.set(key, value, px=max(1, int(ttl_s * 1000)))
                await pipe.execute()

    async def generation(self, key: str, bump: bool, expire_ms: int = 0, timeout_s: float | None = None) -> int:
        """The counter under `key` (created from Redis's clock if missing), after adding one if `bump`;
        a bump with `expire_ms` lets it expire that long after (0: never). Bounded by `timeout_s`."""
        async with self._bounded(timeout_s):
            value = await self._generation_script(keys=[key], args=["bump" if bump else "read", str(int(expire_ms))])
        return int(value)

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
    already). The stored result comes with the generation it was computed at, and is for
    `QueryCache.result_at` to take or leave once the current generation is known."""

    embedding: np.ndarray | None = None
    # The stored result, still serialised, and the generation it was computed at.
    result_entry: bytes | None = None
    result_generation: int | None = None
    # The collection's shared generation counter, when it was asked for and exists.
    generation: int | None = None
    # Whether the store was asked and answered: only then does a missing counter mean that it is missing
    # (rather than that the cache is down or in cool-down).
    answered: bool = False


class QueryCache:
    """Typed, failure-proof access to a `CacheStore`: embeddings as raw float32 bytes, results as
    serialized `VisualSearchResponse`s behind the generation they were computed at, and (when the
    store is shared) the generation counters."""

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
        self.registry = registry
        self.metrics = CacheMetrics(registry)
        self._skip_until = float("-inf")
        # Since when every store call has timed out, with no answer in between (None: the last answered).
        self._timing_out_since: float | None = None
        self._error_log = RateLimitedLog(clock=clock)
        # Strong references: the event loop keeps only weak ones to tasks.
        self._writes_in_flight: set[asyncio.Task[None]] = set()

    @property
    def shares_generations(self) -> bool:
        """Whether the store keeps generation counters every gateway shares (Redis)."""
        return self.store.shares_generations

    # ------------------------------------------------------------------------------------- reads

    async def lookup(
        self, embedding_key: str | None, result_key: str | None, generation_key: str | None = None
    ) -> CacheLookup:
        """The embedding under `embedding_key`, the result under `result_key` and the generation counter
        under `generation_key`, in one store round trip; a key that is None is not read."""
        keys = [key for key in (embedding_key, result_key, generation_key) if key is not None]
        read, answered = await self._read(keys)
        values = iter(read)
        embedding = None
        if embedding_key is not None:
            embedding = _decode_embedding(next(values))
            self.metrics.count_lookup("embedding", embedding is not None)
        entry = next(values) if result_key is not None else None
        generation = _decode_counter(next(values)) if generation_key is not None else None
        return CacheLookup(embedding, entry, result_generation(entry), generation, answered)

    def result_at(self, lookup: CacheLookup, generation: int | None) -> gateway_pb2.VisualSearchResponse | None:
        """The result `lookup` found if it was computed at `generation` (the index as it is now; None:
        unknown, so nothing cached can be trusted); counted as a result hit or miss."""
        response = None
        if generation is not None and lookup.result_entry is not None and lookup.result_generation == generation:
            response = gateway_pb2.VisualSearchResponse()
            try:
                response.ParseFromString(memoryview(lookup.result_entry)[_RESULT_HEAD.size:])
            except Exception as error:  # noqa: BLE001 - a corrupt entry is a miss
                self._error_log.warning("cache result entry unreadable (%s); ignoring it", error)
                response = None
        self.metrics.count_lookup("result", response is not None)
        return response

    async def _read(self, keys: Sequence[str]) -> tuple[list[bytes | None], bool]:
        """The values under `keys`, and whether the store answered (all None when it did not)."""
        if not keys:
            return [], False
        if not self._available():
            return [None] * len(keys), False
        try:
            values = list(await self.store.get_many(keys))
        except Exception as error:  # noqa: BLE001 - any store failure is a miss
            self._failed("get", error)
            return [None] * len(keys), False
        self._answered()
        return values, True

    # --------------------------------------------------------------------------- generation counters

    async def read_generation(self, key: str) -> int | None:
        """The shared counter under `key`, created first if it is missing; None when the store cannot
        say now (down, slow, in cool-down)."""
        if not self._available():
            return None
        try:
            value = await self.store.generation(key, bump=False)  # type: ignore[attr-defined]
        except Exception as error:  # noqa: BLE001 - unknown generation: nothing cached is trusted
            self._failed("generation read", error)
            return None
        self._answered()
        return value

    async def bump_generation(self, key: str, expire_ms: int = 0) -> int:
        """Adds one to the shared counter under `key` and returns it; raises when that may not have
        happened. Tried even while the cache is in cool-down, with its own, longer bound
        (`generation_bump_timeout_s`): searches can do without the cache, writes must move this on."""
        try:
            value = await self.store.generation(  # type: ignore[attr-defined]
                key, bump=True, expire_ms=expire_ms, timeout_s=self.settings.generation_bump_timeout_s
            )
        except Exception as error:
            self._failed("generation bump", error)
            raise
        self._answered()
        return value

    # ------------------------------------------------------------------------------------ writes

    def save_in_background(
        self,
        result: tuple[str, int, gateway_pb2.VisualSearchResponse] | None = None,
        embedding: tuple[str, np.ndarray] | None = None,
    ) -> None:
        """Stores entries in one round trip without making the caller wait: a search's reply need not
        wait for the cache. `result` is (key, the generation it was computed at, the response). Values
        are serialised now, so the caller may change them afterwards. At most `max_writes_in_flight`
        such writes run at once; beyond that they are skipped (and counted) rather than pile up behind
        a slow store."""
        entries = []
        if result is not None:
            key, generation, response = result
            entries.append((key, encode_result(generation, response), self.settings.result_ttl_s))
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
            return
        self._answered()

    # ---------------------------------------------------------------------------------- failures

    def _available(self) -> bool:
        return self.clock() >= self._skip_until

    def _answered(self) -> None:
        """A store call answered: it is up (a bump, tried even in cool-down, ends the cool-down too)."""
        self._timing_out_since = None
        self._skip_until = float("-inf")

    def _failed(self, operation: str, error: BaseException) -> None:
        """Counts and logs a failed store call, and puts the store in cool-down (`redis_cooldown_s`,
        calls not even tried) when it is down: at once for an error (refused, reset), but for timeouts
        only once calls have kept timing out for `redis_timeouts_for_s` with no answer in between. A
        burst of late answers from a loaded machine (concurrent calls all waiting on one busy Redis or
        one starved process) then costs only those calls, not every search for the cool-down."""
        self.metrics.errors.inc()
        now = self.clock()
        if isinstance(error, (TimeoutError, redis.exceptions.TimeoutError)):
            if self._timing_out_since is None:
                self._timing_out_since = now
            cool_down = now - self._timing_out_since >= self.settings.redis_timeouts_for_s
        else:
            cool_down = True
        if cool_down:
            self._skip_until = now + self.settings.redis_cooldown_s
            self._timing_out_since = None
        self._error_log.warning(
            "cache %s %s failed (%s); %s",
            self.store.kind, operation, type(error).__name__ if isinstance(error, TimeoutError) else error,
            f"serving uncached, retrying the cache in {self.settings.redis_cooldown_s:.1f}s" if cool_down
            else "served as a miss",
        )

    async def close(self) -> None:
        await self.writes_done()
        try:
            await self.store.close()
        except Exception as error:  # noqa: BLE001 - closing a dead connection may fail; nothing to do
            logger.debug("closing cache store: %s", error)


def _decode_counter(raw: bytes | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:  # not a counter: treated as missing, and the search goes uncached
        return None


def _decode_embedding(raw: bytes | None) -> np.ndarray | None:
    if raw is not None and len(raw) % 4 == 0 and raw:
        return np.frombuffer(raw, dtype=np.float32)
    return None


def _embedding_bytes(embedding: np.ndarray) -> bytes:
    return np.asarray(embedding, dtype=np.float32).tobytes()

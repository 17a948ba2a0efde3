"""Rate limits per API key: searches per second, and image bytes written per second, each a token bucket
per key (`GATEWAY_RATE_LIMIT__*`).

With Redis (`GATEWAY_REDIS_URL`) a key's buckets live there, shared by every gateway replica, and one Lua
script reads, refills and takes from a bucket atomically on Redis's own clock (TIME), so replicas agree
whatever their clocks say. Without Redis each process keeps its own buckets. When Redis fails or is slow
(each call bounded like the cache's), the decision is made in process instead and Redis is left alone
for `redis_cooldown_s`: a request is never refused or failed because Redis is down; meanwhile each
replica limits on its own, so N replicas let up to N times the limit through.

Only callers that presented a key are limited: with no keys configured, and on the internal listener,
nothing is. An AddImages item costs its image's bytes, at most the write burst (so one image always fits
a full bucket); the call is refused at the first item the bucket cannot pay for, and the items before it
may or may not have been indexed by then (AddImages is safe to resend: items already stored unchanged are
not embedded or written again)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator, Callable, TypeVar

import grpc
import redis.asyncio as redis_asyncio
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.api_keys import Caller
from gateway.cache import LoopLagTolerantTimeout, RateLimitedLog
from gateway.metrics import RateLimitMetrics
from gateway.settings import GatewaySettings, RateLimitSettings
from service_kit.status import ServiceError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
T = TypeVar("T")

# Bump when the bucket's layout in Redis changes.
KEY_PREFIX = "vsearch:rl1"

# KEYS[1]: the bucket (a hash: tokens, ts). ARGV: rate per second, burst, cost. Returns
# {1, "0"} when the cost was taken, else {0, seconds until it could be}. Floats travel as strings
# (Redis truncates Lua numbers to integers) and are stored with 17 digits (Lua's tostring keeps 14).
TAKE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', now))
-- A bucket untouched for longer than it takes to refill is full: let Redis forget it.
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, string.format('%.17g', wait)}
"""


@dataclass(frozen=True)
class Bucket:
    kind: str  # "search" or "write"
    rate_per_s: float
    burst: float
    unit: str  # what a token is, for messages

    def describe(self) -> str:
        return f"{self.rate_per_s:g} {self.unit}/s, bursts of {self.burst:g}"


class RateLimited(ServiceError):
    """RESOURCE_EXHAUSTED, with how long to wait: HTTP answers 429 with Retry-After, gRPC puts a
    google.rpc.RetryInfo in the status details."""

    def __init__(self, caller: Caller, bucket: Bucket, retry_after_s: float) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"rate limit: API key {caller.name!r} is over its {bucket.kind} limit ({bucket.describe()}); "
            f"retry in {retry_after_s:.2f}s",
        )
        self.kind = bucket.kind
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """HTTP's Retry-After: whole seconds, rounded up."""
        return str(max(1, math.ceil(self.retry_after_s)))


class LocalBuckets:
    """Token buckets in this process (no Redis, or Redis failing)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def take(self, key: str, bucket: Bucket, cost: float) -> float:
        """0 when `cost` was taken, else the seconds until it could be."""
        now = self.clock()
        tokens, then = self._state.get(key, (bucket.burst, now))
        tokens = min(bucket.burst, tokens + max(0.0, now - then) * bucket.rate_per_s)
        if tokens >= cost:
            self._state[key] = (tokens - cost, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (cost - tokens) / bucket.rate_per_s


class RedisBuckets:
    """Token buckets in Redis, shared by every replica; each take is one script call, bounded like the
    cache's calls and never retried."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.max_timeout_s = max(1.0, 10 * timeout_s)
        self.client = redis_asyncio.Redis.from_url(
            url, socket_timeout=self.max_timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._take = self.client.register_script(TAKE_SCRIPT)

    async def take(self, key: str, bucket: Bucket, cost: float) -> float:
        async with LoopLagTolerantTimeout(self.timeout_s, self.max_timeout_s):
            allowed, wait = await self._take(keys=[key], args=[repr(bucket.rate_per_s), repr(bucket.burst), repr(cost)])
        return 0.0 if int(allowed) else float(wait)

    async def close(self) -> None:
        await self.client.aclose()


class RateLimiter:
    def __init__(
        self,
        settings: RateLimitSettings,
        max_image_bytes: int,
        redis_url: str | None,
        registry: CollectorRegistry,
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.search: Bucket | None = None
        self.write: Bucket | None = None
        if settings.search_per_s is not None:
            burst = settings.burst if settings.burst is not None else max(1, math.ceil(settings.search_per_s))
            self.search = Bucket("search", settings.search_per_s, float(burst), "searches")
        if settings.write_bytes_per_s is not None:
            write_burst = settings.write_burst_bytes
            if write_burst is None:  # a second's worth, and room for one image of the largest size
                write_burst = max(math.ceil(settings.write_bytes_per_s), max_image_bytes)
            self.write = Bucket("write", settings.write_bytes_per_s, float(write_burst), "image bytes")
        self.local = LocalBuckets(clock)
        self.redis = RedisBuckets(redis_url, settings.redis_timeout_s) if redis_url and self.enabled else None
        self.metrics = RateLimitMetrics(registry)
        self._skip_redis_until = float("-inf")
        self._error_log = RateLimitedLog(clock=clock)

    @property
    def enabled(self) -> bool:
        return self.search is not None or self.write is not None

    async def limit_search(self, caller: Caller) -> None:
        """Takes one search from the caller's bucket, or raises `RateLimited`."""
        if self.search is not None and caller.bucket is not None:
            await self._take(self.search, caller, 1.0)

    async def charge_write(self, caller: Caller, image_bytes: int) -> None:
        if self.write is not None and caller.bucket is not None and image_bytes > 0:
            await self._take(self.write, caller, float(min(image_bytes, self.write.burst)))

    def charging_writes(self, caller: Caller, requests: AsyncIterable[T]) -> AsyncIterable[T]:
        """`requests` (AddImages items), each charged to the caller's write bucket as it is read."""
        if self.write is None or caller.bucket is None:
            return requests

        async def charged() -> AsyncIterator[T]:
            async for request in requests:
                await self.charge_write(caller, len(getattr(request, "image", b"") or b""))
                yield request

        return charged()

    async def _take(self, bucket: Bucket, caller: Caller, cost: float) -> None:
        key = f"{KEY_PREFIX}:{bucket.kind}:{caller.bucket}"
        wait: float | None = None
        if self.redis is not None and self.clock() >= self._skip_redis_until:
            try:
                wait = await self.redis.take(key, bucket, cost)
            except Exception as error:  # noqa: BLE001 - Redis down or slow: decide here instead
                self.metrics.redis_errors.inc()
                self._skip_redis_until = self.clock() + self.settings.redis_cooldown_s
                self._error_log.warning(
                    "rate limit: Redis failed (%s); limiting in this process, retrying Redis in %.1fs",
                    type(error).__name__ if isinstance(error, TimeoutError) else error, self.settings.redis_cooldown_s,
                )
        if wait is None:
            wait = self.local.take(key, bucket, cost)
        if wait > 0:
            self.metrics.limited.labels(caller.name, bucket.kind).inc()
            raise RateLimited(caller, bucket, wait)

    async def close(self) -> None:
        if self.redis is not None:
            try:
                await self.redis.close()
            except Exception as error:  # noqa: BLE001 - closing a dead connection may fail; nothing to do
                logger.debug("closing the rate limiter's Redis client: %s", error)


def create_rate_limiter(settings: GatewaySettings, registry: CollectorRegistry) -> RateLimiter:
    return RateLimiter(settings.rate_limit, settings.max_image_bytes, settings.redis_url, registry)

"""The index generation result-cache entries are checked against: a number per collection that changes
on every write, so a result computed at generation G is exactly the answer for the index at G.

Two sources, by cache store:

- `SharedGenerations` (the cache is Redis, which every gateway shares): a counter per collection in
  that Redis. A gateway bumps it after search_svc acknowledged a write (an Upsert batch, a Delete that
  removed something, a DropCollection) and before it acknowledges the write to its caller. A search
  reads it in the same round trip (MGET) as the query's embedding and result, and takes the result only
  if it was computed at the counter's current value; it computes a new one at the value it read
  *before* searching. So once a write is acknowledged through any gateway, no search through any
  gateway gets a result computed before it, whichever search_svc replica served either. A counter that
  is missing (evicted, or lost with a Redis restart) is created from Redis's clock, above any value it
  had. Limits: a write whose bump fails (Redis down or unreachable for `generation_bump_timeout_s`) is
  acknowledged anyway; this gateway then trusts no cached result of that collection and retries the
  bump in the background until it lands, but other gateways may serve results cached before the write
  until then (or until the result TTL). Writes made straight to search_svc, past every gateway, bump
  nothing: results cached before them are served until the next write through a gateway or the TTL.

- `IndexGenerationTracker` (the in-process cache: one gateway, in front of one search_svc): search_svc's
  own generation, read with a Stats call:

  - ``refresh_s == 0``: asked for every lookup, so any write, by anyone, is seen by the next search.
    Costs one small call per search, made concurrently with the cache read.
  - ``refresh_s > 0``: the answer is reused for up to that long. Writes through this gateway update it
    at once (read-your-writes holds here); writes elsewhere may be missed for up to ``refresh_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Awaitable, Callable

from prometheus_client import CollectorRegistry

from gateway.cache import QueryCache, generation_key
from gateway.metrics import GenerationMetrics

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
# Between background attempts at a bump that failed.
BUMP_RETRY_INTERVAL_S = 0.5


class IndexGenerationTracker:
    def __init__(self, fetch: Callable[[], Awaitable[int]], refresh_s: float, clock: Clock = time.monotonic) -> None:
        self._fetch = fetch
        self.refresh_s = refresh_s
        self.clock = clock
        self._known: int | None = None
        self._fetched_at = float("-inf")
        # Bumped by every write seen here, so a fetch that was in flight during a write cannot
        # overwrite the newer generation with the older one it read.
        self._writes = 0
        self._refreshing: asyncio.Task[int] | None = None

    @property
    def known(self) -> int | None:
        return self._known

    def observe_write(self, generation: int) -> None:
        """The generation a write through this gateway answered with: current from now on."""
        self._writes += 1
        self._known = generation
        self._fetched_at = self.clock()

    async def _fetch_and_remember(self) -> int:
        writes_before = self._writes
        generation = await self._fetch()
        if self._writes == writes_before:
            self._known = generation
            self._fetched_at = self.clock()
        return generation

    async def current(self) -> int:
        if self.refresh_s <= 0:
            # Each caller's own call: one started before the caller arrived could predate its write.
            return await self._fetch_and_remember()
        if self._known is not None and self.clock() - self._fetched_at < self.refresh_s:
            return self._known
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._fetch_and_remember())
        # shield: one caller giving up (deadline, cancel) must not cancel the others' refresh.
        return await asyncio.shield(self._refreshing)


class SharedGenerations:
    """Each collection's index generation, in the Redis every gateway shares (see the module's notes).
    Collections are keyed by their resolved name: `default_collection` (search_svc's, learnt at
    startup) stands for requests that name none."""

    def __init__(
        self, cache: QueryCache, registry: CollectorRegistry, retry_interval_s: float = BUMP_RETRY_INTERVAL_S
    ) -> None:
        self.cache = cache
        self.retry_interval_s = retry_interval_s
        self.default_collection = ""
        self.metrics = GenerationMetrics(registry)
        # Collections whose bump has not landed -> (the failure's sequence number, whether it followed a
        # drop). A retry clears an entry only if no newer failure replaced it meanwhile.
        self._pending: dict[str, tuple[int, bool]] = {}
        self._failures = itertools.count(1)
        self._retrying: asyncio.Task[None] | None = None

    def resolved(self, collection: str) -> str:
        return collection or self.default_collection

    def key(self, collection: str) -> str:
        return generation_key(self.resolved(collection))

    def trusted(self, collection: str) -> bool:
        """False while a write to the collection through this gateway has not been followed by a bump:
        its shared generation is behind the index, so no cached result of it can be trusted."""
        return self.resolved(collection) not in self._pending

    async def read(self, collection: str) -> int | None:
        """The collection's generation now (its counter is created if missing); None when Redis cannot
        say, or while the collection's last bump is pending here."""
        if not self.trusted(collection):
            return None
        return await self.cache.read_generation(self.key(collection))

    def _expire_ms(self, dropped: bool) -> int:
        # After a drop, the counter may go once every result computed before it has expired: if the
        # collection comes back later, its counter starts again from Redis's clock, above the old one.
        return int(self.cache.settings.result_ttl_s * 1000) + 60_000 if dropped else 0

    async def bump(self, collection: str, dropped: bool = False) -> int | None:
        """After a write search_svc acknowledged: moves the collection's generation on, so that no
        gateway serves a result cached before the write. Returns the new generation; None when the bump
        failed (Redis down, slow or unreachable): the write stands, and the bump is retried in the
        background while this gateway trusts no cached result of the collection."""
        name = self.resolved(collection)
        try:
            value = await self.cache.bump_generation(generation_key(name), self._expire_ms(dropped))
        except asyncio.CancelledError:
            self._bump_later(name, dropped)  # the caller went away; the write may stand: bump it anyway
            raise
        except Exception as error:  # noqa: BLE001 - the write succeeded; the bump is retried
            self.metrics.bumps.labels("failed").inc()
            logger.warning("index generation bump for collection %r failed (%s); retrying it in the background "
                           "and serving that collection uncached until it lands", name, error)
            self._bump_later(name, dropped)
            return None
        self.metrics.bumps.labels("ok").inc()
        return value

    def bump_soon(self, collection: str, dropped: bool = False) -> None:
        """For a write that failed or was abandoned after it was sent: it may have been made, in part."""
        self._bump_later(self.resolved(collection), dropped)

    def _bump_later(self, name: str, dropped: bool) -> None:
        self._pending[name] = (next(self._failures), dropped or self._pending.get(name, (0, False))[1])
        self.metrics.pending.set(len(self._pending))
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(self._retry_pending(), name="generation-bump-retry")

    async def _retry_pending(self) -> None:
        while True:
            await self._bump_pending()
            if not self._pending:
                return
            await asyncio.sleep(self.retry_interval_s)

    async def _bump_pending(self) -> None:
        """One attempt at every pending bump."""
        for name, (failure, dropped) in list(self._pending.items()):
            try:
                await self.cache.bump_generation(generation_key(name), self._expire_ms(dropped))
            except Exception:  # noqa: BLE001 - logged by the cache (rate-limited); tried again
                self.metrics.bumps.labels("failed").inc()
                continue
            self.metrics.bumps.labels("ok").inc()
            # Cleared only if no write failed its bump since this attempt began: that one needs its own.
            if self._pending.get(name, (None, False))[0] == failure:
                del self._pending[name]
                logger.info("index generation bump for collection %r landed", name)
        self.metrics.pending.set(len(self._pending))

    async def close(self) -> None:
        """Stops retrying, after one last attempt; says which collections were left without their bump."""
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
        if self._pending:
            await self._bump_pending()
        if self._pending:
            logger.error("stopping with the index generation bump of %s not done: other gateways may serve "
                         "results cached before their last writes until the result TTL",
                         ", ".join(repr(name) for name in self._pending))

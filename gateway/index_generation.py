"""Which index generation result-cache lookups are keyed by.

search_svc's generation changes on every write, so a result cached under generation G is exactly the
answer for G. The only question is how fresh the gateway's idea of the *current* generation is:

- ``refresh_s == 0``: asked from search_svc (Stats) for every lookup, so any write, by anyone, is seen
  by the next search. Costs one small call per search, made concurrently with the embedding-cache read.
- ``refresh_s > 0``: the answer is reused for up to that long. Writes through this gateway update it
  at once (read-your-writes holds here); writes elsewhere may be missed for up to ``refresh_s``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

Clock = Callable[[], float]


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

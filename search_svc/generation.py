"""The index generation: a number that changes on every write, so the gateway can tell that cached
search results may be stale.

It never repeats a value seen before, also across restarts and a wiped data file, without storing
anything: it starts at the current time in microseconds and each write sets it to
max(previous + 1, now), so it runs ahead of the clock only while writes come faster than one per
microsecond. (A restart after such a burst, or a clock stepped back by more than the service was
down, could repeat a value; neither is realistic for a catalog index.)

Each replica holds its own generation: several search_svc replicas in front of one Milvus each see
only their own writes. So a cache shared by replicas does not rely on it: the gateways keep one
generation per collection in the Redis they share, and bump it after every write (see
gateway/index_generation.py). This one still labels search_svc's answers, and is what a gateway without
Redis (one gateway in front of one search_svc) checks its in-process cache against."""

from __future__ import annotations

import threading
import time
from typing import Callable


def _now_us() -> int:
    return time.time_ns() // 1000


class IndexGeneration:
    def __init__(self, clock_us: Callable[[], int] = _now_us) -> None:
        self._clock_us = clock_us
        self._lock = threading.Lock()  # advanced from executor threads
        self._value = clock_us()

    @property
    def current(self) -> int:
        with self._lock:
            return self._value

    def advance(self) -> int:
        with self._lock:
            self._value = max(self._value + 1, self._clock_us())
            return self._value

    def advance_to(self, value: int) -> None:
        """Makes the next `advance` exceed `value` (a value seen elsewhere, on a clock that may run ahead)."""
        with self._lock:
            self._value = max(self._value, value)

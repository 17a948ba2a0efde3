"""The index generation: a number that changes on every write, so the gateway can tell that cached
search results may be stale.

It never repeats a value seen before, also across restarts and a wiped data file, without storing
anything: it starts at the current time in microseconds and each write sets it to
max(previous + 1, now), so it runs ahead of the clock only while writes come faster than one per
microsecond. (A restart after such a burst, or a clock stepped back by more than the service was
down, could repeat a value; neither is realistic for a catalog index.)

Limitation: each replica holds its own generation. Several search_svc replicas in front of one
Milvus each see only their own writes; a cache shared by them must not rely on one replica's
generation to notice writes made through another."""

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

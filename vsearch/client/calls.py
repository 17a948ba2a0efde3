"""What the sync and the asyncio client share about making calls: their settings, the deadline of a
call, the API key's metadata, and when an error is retried (RetryPolicy)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from vsearch.client.errors import VsearchError

DEFAULT_TIMEOUT_S = 10.0
# A stream's deadline is fixed when it starts, and an iterable of items has no length to scale it by:
# add() has its own, longer default, and takes timeout= per call.
DEFAULT_ADD_TIMEOUT_S = 300.0
# The gateway accepts messages up to 64 MiB; a ListImages page of items with large metadata can be big.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# While the gateway is away the channel reconnects at most this far apart (gRPC's default grows to
# 120 s), so that a retry notices its return promptly.
RECONNECT_BACKOFF_MAX_MS = 2000
# The smallest deadline an attempt is given (a deadline in the past is gRPC's DEADLINE_EXCEEDED anyway).
MIN_ATTEMPT_TIMEOUT_S = 0.001


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried: on UNAVAILABLE only (the gateway or a service behind it cannot be reached),
    at most `max_attempts` attempts in all, waiting a random time between 0 and
    min(max_backoff_s, initial_backoff_s * multiplier ** (attempt - 1)) before each retry ("full jitter":
    clients that failed together do not come back together). Every attempt and wait fits in the call's
    one deadline (`timeout`): a retry that would not is not made.

    Never retried: any other code (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED... would fail again
    or need the caller's decision), and an AddImages stream once it has started sending items (the
    gateway may already have written some of them)."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 3.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be at least 0 and the multiplier at least 1")

    def backoff_s(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, ceiling)


NO_RETRIES = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class RetryEvent:
    """What `on_retry` is told before each retry."""

    method: str  # the gateway's RPC, e.g. "Search"
    attempt: int  # the attempt that failed, 1-based
    error: VsearchError
    delay_s: float  # the wait before the next attempt


class CallSettings:
    """The settings both clients take, and what they derive from them."""

    def __init__(
        self, address: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
        add_timeout: float = DEFAULT_ADD_TIMEOUT_S, retries: RetryPolicy | None = None,
        on_retry: Callable[[RetryEvent], Any] | None = None,
        credentials: grpc.ChannelCredentials | None = None, options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not address:
            raise ValueError("the gateway's address is empty")
        if timeout <= 0 or add_timeout <= 0:
            raise ValueError("timeout and add_timeout must be positive")
        self.address = address
        self.timeout = timeout
        self.add_timeout = add_timeout
        self.retries = retries if retries is not None else RetryPolicy()
        self.on_retry = on_retry
        self.credentials = credentials
        given = dict(options)
        defaults = {"grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
                    "grpc.max_reconnect_backoff_ms": RECONNECT_BACKOFF_MAX_MS}
        self.channel_options = [*given.items(), *((name, value) for name, value in defaults.items() if name not in given)]
        # Per call, never in an interceptor: the same on both APIs and on every kind of call.
        self.metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {api_key}"),) if api_key else None)

    def deadline(self, timeout: float | None, default: float | None = None) -> float:
        """The monotonic time by which a call must be done: `timeout` seconds from now, else the default."""
        seconds = timeout if timeout is not None else (default if default is not None else self.timeout)
        if seconds <= 0:
            raise ValueError(f"timeout must be positive, got {seconds}")
        return time.monotonic() + seconds

    @staticmethod
    def remaining(deadline: float) -> float:
        return max(deadline - time.monotonic(), MIN_ATTEMPT_TIMEOUT_S)

    def retry_delay(self, error: VsearchError, attempt: int, deadline: float) -> float | None:
        """How long to wait before retrying after `error` ended attempt `attempt`; None: do not retry."""
        if error.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries.max_attempts:
            return None
        delay = self.retries.backoff_s(attempt)
        if time.monotonic() + delay >= deadline:
            return None
        return delay

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"

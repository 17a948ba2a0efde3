"""Readiness: can the gateway answer a search? It can once both downstreams (the embedder, search_svc)
have answered at startup, for as long as neither has been unavailable for longer than a grace period,
and until it drains. `DownstreamMonitor` follows each downstream's own `grpc.health.v1` status (a
`Check` with a deadline, every few seconds, on the channel the calls use) beside the request path:
searches never wait for it, and it never refuses one (a cached answer needs neither downstream)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.metrics import DownstreamMetrics

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Readiness:
    """What /healthz says: SERVING, or why not (`reason`) and which downstreams are missing."""

    serving: bool
    reason: str = ""
    unavailable: tuple[str, ...] = field(default_factory=tuple)

    def json(self) -> dict[str, object]:
        if self.serving:
            return {"status": "SERVING"}
        return {"status": "NOT_SERVING", "reason": self.reason, "unavailable": list(self.unavailable)}


class DownstreamHealth:
    """One downstream's health as last seen: when it last said SERVING, and what went wrong since."""

    def __init__(self, name: str, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self.name = name
        self.stub = health_pb2_grpc.HealthStub(channel)
        self.timeout_s = timeout_s
        self.last_serving = time.monotonic()
        self.problem = ""

    async def check(self) -> None:
        try:
            reply = await self.stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            self.problem = f"{error.code().name}: {error.details()}"
            return
        except Exception as error:  # noqa: BLE001 - whatever it is, this check did not see SERVING
            self.problem = f"{type(error).__name__}: {error}"
            return
        if reply.status == SERVING:
            self.last_serving = time.monotonic()
            self.problem = ""
        else:
            self.problem = f"reports {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"


class DownstreamMonitor:
    """Checks every downstream each `interval_s`; one that has not said SERVING for longer than
    `grace_s` is unavailable. `on_change(unavailable)` is awaited whenever that set changes."""

    def __init__(
        self,
        channels: dict[str, grpc.aio.Channel],
        *,
        grace_s: float,
        interval_s: float,
        timeout_s: float,
        metrics: DownstreamMetrics,
        on_change: Callable[[tuple[str, ...]], Awaitable[None]],
    ) -> None:
        self.downstreams = [DownstreamHealth(name, channel, timeout_s) for name, channel in channels.items()]
        self.grace_s = grace_s
        self.interval_s = interval_s
        self.metrics = metrics
        self.on_change = on_change
        self.unavailable: tuple[str, ...] = ()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Once the gateway's startup saw both downstreams answer: they count as seen now."""
        if self._task is not None:
            return
        now = time.monotonic()
        for downstream in self.downstreams:
            downstream.last_serving = now
            self.metrics.set_available(downstream.name, True)
        self._task = asyncio.create_task(self._run(), name="downstream-monitor")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(downstream.check() for downstream in self.downstreams))
            try:
                await self._evaluate()
            except Exception:  # noqa: BLE001 - a failed health update must not end the monitor
                logger.exception("updating the gateway's health failed")
            await asyncio.sleep(self.interval_s)

    async def _evaluate(self) -> None:
        now = time.monotonic()
        unavailable = tuple(d.name for d in self.downstreams if now - d.last_serving > self.grace_s)
        if unavailable == self.unavailable:
            return
        for downstream in self.downstreams:
            was, now_missing = downstream.name in self.unavailable, downstream.name in unavailable
            if now_missing and not was:
                logger.warning(
                    "%s unavailable for %.1fs (%s): reporting NOT_SERVING; cached searches are still answered",
                    downstream.name, now - downstream.last_serving, downstream.problem or "no answer",
                )
            elif was and not now_missing:
                logger.info("%s answers again", downstream.name)
            self.metrics.set_available(downstream.name, not now_missing)
        self.unavailable = unavailable
        await self.on_change(unavailable)

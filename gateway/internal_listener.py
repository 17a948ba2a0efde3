"""The gateway's internal gRPC listener (`GATEWAY_INTERNAL_PORT`): the VisualSearch API for callers inside
the cluster, without API keys or rate limits, beside the main port that checks them.

A second grpc.aio server in the same process rather than a second port on the main one: grpc's
interceptors and servicers cannot tell which port a call came in on. It shares the main server's health
servicer (so it reports NOT_SERVING while starting and draining, exactly like the main port), its
interceptors' metrics and tracing, and offers reflection too; it stops with the main server, after the
same drain and with the same grace."""

from __future__ import annotations

import asyncio
import logging

from service_kit.server import ManagedServer

logger = logging.getLogger(__name__)


class InternalGrpcListener:
    def __init__(self, main: ManagedServer, port: int) -> None:
        settings = main.settings
        self.grpc_server = main.new_grpc_server()
        self.host = settings.host
        self.port = self.grpc_server.add_insecure_port(f"{settings.host}:{port}")
        self._stopping: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self.grpc_server.start()
        logger.info("gateway internal gRPC (no API keys) listening on %s", self.address)

    def begin_stop(self, grace: float, drain: float) -> None:
        """Keeps answering for `drain` seconds (health already says NOT_SERVING), then gives in-flight
        calls `grace` seconds; runs beside the main server's own stop."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(grace, drain))

    async def _stop(self, grace: float, drain: float) -> None:
        if drain > 0:
            await asyncio.sleep(drain)
        await self.grpc_server.stop(grace)

    async def stopped(self) -> None:
        """Returns once the listener has stopped (a shutdown hook: before the clients it uses close)."""
        if self._stopping is None:
            self.begin_stop(0.0, 0.0)
        assert self._stopping is not None
        await self._stopping

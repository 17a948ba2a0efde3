"""Builds the gateway: gRPC (vsearch.v1.VisualSearch) and HTTP/JSON on one asyncio loop, both over one
`VisualSearchCore`, with channels to the embedder and search_svc, the query cache, and the monitor of
the downstreams' health that readiness follows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Iterator

import uvicorn
from grpc_health.v1 import health_pb2

from gateway.api_keys import create_authenticator
from gateway.cache import QueryCache, create_store
from gateway.core import VisualSearchCore
from gateway.downstream import EMBEDDER, SEARCH
from gateway.http_api import create_app
from gateway.http_limits import http_protocol_class
from gateway.internal_listener import InternalGrpcListener
from gateway.metrics import DownstreamMetrics, HttpConnectionMetrics
from gateway.rate_limit import create_rate_limiter
from gateway.readiness import DownstreamMonitor, Readiness
from gateway.servicer import VisualSearchServicer
from gateway.settings import GatewaySettings
from service_kit.channels import create_channel
from service_kit.server import ManagedServer
from vsearch.v1 import embedder_pb2_grpc, gateway_pb2, gateway_pb2_grpc, search_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["VisualSearch"].full_name
HTTP_START_TIMEOUT_S = 10.0
# A health service name that is SERVING while the process runs, whatever its downstreams do: what a
# liveness probe should ask for (the default "" follows readiness, which an embedder outage turns off).
LIVENESS_SERVICE = "liveness"


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside a process that owns its signals: the gateway's drain handles SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_http_socket(host: str, port: int) -> socket.socket:
    """Bound and listening before start(), so port 0 resolves here and early connections queue."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class GatewayServer(ManagedServer):
    """A ManagedServer that also serves HTTP on `http_port` from `start()` until shutdown."""

    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__("gateway", settings, [SERVICE_NAME])
        self.draining = False
        self.downstreams: DownstreamMonitor | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._http_socket = bind_http_socket(settings.http_host, settings.http_port)
        self.http_port: int = self._http_socket.getsockname()[1]
        self._http_server: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        # GATEWAY_INTERNAL_PORT: the same API without API keys, for callers inside the cluster.
        self.internal = None if settings.internal_port is None else InternalGrpcListener(self, settings.internal_port)

    @property
    def http_address(self) -> str:
        return f"{self.settings.http_host}:{self.http_port}"

    def readiness(self) -> Readiness:
        if self.draining:
            return Readiness(False, "draining")
        if not self.ready:
            return Readiness(False, "starting: waiting for the embedder and the search service to answer")
        unavailable = self.downstreams.unavailable if self.downstreams is not None else ()
        if unavailable:
            return Readiness(False, "downstream unavailable: " + ", ".join(unavailable), unavailable)
        return Readiness(True)

    async def downstreams_changed(self, unavailable: tuple[str, ...]) -> None:
        """The monitor's report (it runs once startup has set SERVING); the health servicer ignores it
        once draining."""
        if not self.draining:
            await self._set_status(
                health_pb2.HealthCheckResponse.NOT_SERVING if unavailable else health_pb2.HealthCheckResponse.SERVING
            )

    async def _monitor_once_ready(self) -> None:
        await self.wait_ready()
        if self.downstreams is not None:
            await self.downstreams.start()

    async def stop_monitor(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
        if self.downstreams is not None:
            await self.downstreams.stop()

    def serve_http(self, app: object) -> None:
        limits = self.settings.http
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # keep the process's structured logging
            access_log=False,  # requests are counted in /metrics instead
            ws="none",
            # h11, with the header deadline, the connection cap and JSON errors (gateway/http_limits.py).
            http=http_protocol_class(limits, HttpConnectionMetrics(self.metrics.registry)),
            timeout_keep_alive=limits.keepalive_timeout_s,  # type: ignore[arg-type] - a float works
            h11_max_incomplete_event_size=limits.max_header_bytes,
            timeout_graceful_shutdown=max(1, round(self.settings.grace_seconds)),
        )
        self._http_server = EmbeddedUvicorn(config)

    async def start(self) -> None:
        await super().start()
        if self.internal is not None:
            await self.internal.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._monitor_task = asyncio.create_task(self._monitor_once_ready())
        if self._http_server is None:
            return
        self._http_task = asyncio.create_task(self._http_server.serve(sockets=[self._http_socket]))
        self._http_task.add_done_callback(self._http_stopped)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HTTP_START_TIMEOUT_S
        while not self._http_server.started:
            if self._http_task.done() or loop.time() > deadline:
                raise RuntimeError(f"gateway HTTP server did not start on {self.http_address}")
            await asyncio.sleep(0.005)
        logger.info("gateway HTTP listening on http://%s", self.http_address)

    def _http_stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self.draining:
            logger.error("gateway HTTP server failed", exc_info=task.exception())

    async def stop(self, grace: float | None = None, drain: float = 0.0) -> None:
        self.draining = True  # /healthz answers 503 from now on, like the gRPC health service
        if self.internal is not None:
            self.internal.begin_stop(self.settings.grace_seconds if grace is None else grace, drain)
        await super().stop(grace, drain)

    async def stop_http(self) -> None:
        if self._http_task is None or self._http_server is None:
            self._http_socket.close()
            return
        self._http_server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._http_task), self.settings.grace_seconds + 5)
        except TimeoutError:
            self._http_server.force_exit = True
            self._http_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._http_task
        except Exception:  # noqa: BLE001 - already logged by the done-callback
            pass


async def create_server(settings: GatewaySettings) -> tuple[GatewayServer, int]:
    """The gateway, not started: gRPC on the returned port, HTTP on `server.http_port` (both bound
    already, so port 0 works for either). `start()` serves both; health turns SERVING once the embedder
    and search_svc have both answered."""
    server = GatewayServer(settings)
    embedder_channel = create_channel(
        settings.embedder_address, max_message_bytes=settings.max_message_bytes, tracing=server.tracing
    )
    search_channel = create_channel(
        settings.search_address, max_message_bytes=settings.max_message_bytes, tracing=server.tracing
    )
    cache = QueryCache(create_store(settings.redis_url, settings.cache), settings.cache, server.metrics.registry)
    core = VisualSearchCore(
        settings,
        embedder_pb2_grpc.EmbedderStub(embedder_channel),
        search_pb2_grpc.VectorSearchStub(search_channel),
        cache,
    )
    # API keys and rate limits on the gRPC port and HTTP; none on the internal listener.
    authenticator = create_authenticator(settings, server.metrics.registry)
    limiter = create_rate_limiter(settings, server.metrics.registry)
    gateway_pb2_grpc.add_VisualSearchServicer_to_server(
        VisualSearchServicer(core, authenticator, limiter), server.grpc_server
    )
    if server.internal is not None:
        gateway_pb2_grpc.add_VisualSearchServicer_to_server(VisualSearchServicer(core), server.internal.grpc_server)
    # Tracing wraps the whole app (outermost), and only when on.
    server.serve_http(server.tracing.asgi(
        create_app(core, settings, server.metrics.registry, server.readiness, authenticator, limiter)
    ))
    # Readiness after startup (SERVING once `core.connect` succeeded): the downstreams' own health,
    # checked beside the request path.
    server.downstreams = DownstreamMonitor(
        {EMBEDDER: embedder_channel, SEARCH: search_channel},
        grace_s=settings.downstream_grace_s,
        interval_s=settings.downstream_check_interval_s,
        timeout_s=settings.downstream_check_timeout_s,
        metrics=DownstreamMetrics(server.metrics.registry, (EMBEDDER, SEARCH)),
        on_change=server.downstreams_changed,
    )
    server.on_startup(core.connect)

    async def close_clients() -> None:
        # core.close: pending index generation bumps get a last try, then the cache closes.
        await asyncio.gather(embedder_channel.close(), search_channel.close(), core.close(), limiter.close())

    # Shutdown hooks run in reverse: the monitor stops, then HTTP (finishing its requests), then the
    # internal listener's calls, then the clients.
    server.on_shutdown(close_clients)
    if server.internal is not None:
        server.on_shutdown(server.internal.stopped)
    server.on_shutdown(server.stop_http)
    server.on_shutdown(server.stop_monitor)
    return server, server.port

"""A grpc.aio server with the library health servicer, reflection, metrics, traces (when configured),
a readiness step that runs after the port is bound, and a drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service_kit.metrics import RpcMetrics, ServiceInterceptor
from service_kit.settings import ServiceSettings, SettingsT, load_settings
from service_kit.structured_logging import configure_logging
from service_kit.tracing import ServiceTracing

logger = logging.getLogger(__name__)

StartupHook = Callable[[], Awaitable[None]]
ShutdownHook = Callable[[], Awaitable[None]]


class ManagedServer:
    """What every service's `create_server(settings)` returns, with the bound port.

    `start()` opens the port at once and reports NOT_SERVING; the service's startup hook (load the
    model, connect to Milvus, ...) then runs in the background and, once it succeeds, every
    registered service name turns SERVING. A failing startup hook is retried with backoff, so a
    service can come up before its dependencies do."""

    def __init__(
        self,
        name: str,
        settings: ServiceSettings,
        service_names: Iterable[str],
        metrics: RpcMetrics | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.metrics = metrics or RpcMetrics(name)
        self.service_names = list(service_names)
        # This service's tracer (settings.tracing); its outbound channels and HTTP app use it too.
        self.tracing = ServiceTracing(name, settings.tracing)
        self.health = health.aio.HealthServicer()
        self.grpc_server = self.new_grpc_server()
        self.port = self.grpc_server.add_insecure_port(f"{settings.host}:{settings.port}")
        self._startup_hooks: list[StartupHook] = []
        self._shutdown_hooks: list[ShutdownHook] = []
        self._startup_task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._metrics_http = None

    def new_grpc_server(self) -> grpc.aio.Server:
        """A grpc.aio server (no port yet) with this service's options, interceptors, health servicer
        and reflection: the main one, or another listener in the same process (the gateway's internal
        port) that must behave exactly like it."""
        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Clients reconnect every few minutes, re-resolving names, so new replicas get traffic.
            ("grpc.max_connection_age_ms", 300_000),
            ("grpc.max_connection_age_grace_ms", 30_000),
        ]
        # Tracing first (outermost): its span covers the other interceptor, and that one's log lines.
        interceptors = [*self.tracing.server_interceptors(), ServiceInterceptor(self.metrics)]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        return server

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def on_startup(self, hook: StartupHook) -> None:
        self._startup_hooks.append(hook)

    def on_shutdown(self, hook: ShutdownHook) -> None:
        self._shutdown_hooks.append(hook)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def _set_status(self, status: int) -> None:
        await self.health.set("", status)
        for service_name in self.service_names:
            await self.health.set(service_name, status)

    async def start(self) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc_server.start()
        if self.settings.metrics_port is not None:
            self._metrics_http = self.metrics.serve_http(self.settings.host, self.settings.metrics_port)
        self._startup_task = asyncio.create_task(self._run_startup())
        logger.info("%s listening on %s", self.name, self.address)

    async def _run_startup(self) -> None:
        delay = 0.2
        while not self._stopping:
            try:
                for hook in self._startup_hooks:
                    await hook()
                break
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure here means "not ready yet"
                logger.warning("%s not ready: %s; retrying in %.1fs", self.name, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        if not self._stopping:
            await self._set_status(health_pb2.HealthCheckResponse.SERVING)
            self._ready.set()
            logger.info("%s serving", self.name)

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self, grace: float | None = None, drain: float = 0.0) -> None:
        """Reports NOT_SERVING, keeps answering for `drain` seconds, then gives in-flight calls
        `grace` seconds before closing, and finally runs the shutdown hooks."""
        if self._stopping:
            return
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        if self._startup_task is not None and not self._startup_task.done():
            self._startup_task.cancel()
        if drain > 0:
            logger.info("%s draining for %.1fs", self.name, drain)
            await asyncio.sleep(drain)
        await self.grpc_server.stop(self.settings.grace_seconds if grace is None else grace)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        for hook in reversed(self._shutdown_hooks):
            try:
                await hook()
            except Exception:  # noqa: BLE001 - keep closing the rest
                logger.exception("%s shutdown hook failed", self.name)
        if self.tracing.enabled:
            await asyncio.to_thread(self.tracing.shutdown)  # exports the spans still queued
        logger.info("%s stopped", self.name)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def serve_until_signalled(server: ManagedServer) -> None:
    """Runs a started-or-not server until SIGTERM or SIGINT, then drains it."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await server.start()
    await stop_requested.wait()
    logger.info("%s: signal received, shutting down", server.name)
    await server.stop(drain=server.settings.drain_seconds)


def run_service(
    name: str,
    settings_cls: type[SettingsT],
    create_server: Callable[[SettingsT], Awaitable[tuple[ManagedServer, int]]],
) -> None:
    """The body of every `python -m <service>`: settings from the environment (or a one-line refusal),
    logging, then the server until SIGTERM or SIGINT."""
    settings = load_settings(settings_cls, name)
    configure_logging(name, settings.log_level, settings.log_format)

    async def main() -> None:
        server, _port = await create_server(settings)
        await serve_until_signalled(server)

    asyncio.run(main())

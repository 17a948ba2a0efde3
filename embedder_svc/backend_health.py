"""Health that follows a remote model server: the embedder turns NOT_SERVING while its backend is not
ready, and SERVING again when it is."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2

from embedder_svc.backends import BackendError
from embedder_svc.engine import EmbeddingEngine, ModelNotLoaded
from service_kit.server import ManagedServer

logger = logging.getLogger(__name__)


class BackendHealthMonitor:
    """Keeps health in step with a backend that can stop being ready after it loaded (a remote
    model server): every `health_interval_s`, and at once after an inference call found it
    unavailable, it asks the backend; NOT_SERVING while it is not ready, SERVING again when it is.
    In-process backends (no interval) are never checked."""

    def __init__(self, server: ManagedServer, engine: EmbeddingEngine) -> None:
        self._server = server
        self._engine = engine
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.serving = True
        self.last_error: BackendError | None = None

    async def start(self) -> None:
        """Startup hook, after the model loaded (health turns SERVING right after)."""
        if self._task is None and self._engine.model.backend.health_interval_s is not None:
            self._task = asyncio.create_task(self._run(), name="embedder-backend-health")

    def backend_failed(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                backend = self._engine.model.backend
            except ModelNotLoaded:  # shutting down
                return
            interval = backend.health_interval_s or 1.0
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await backend.check_ready()
            except BackendError as error:
                self.last_error = error
                await self._set_serving(False, str(error))
            else:
                self.last_error = None
                await self._set_serving(True, backend.describe())

    async def _set_serving(self, serving: bool, reason: str) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        if serving:
            logger.info("embedder backend ready again: %s; SERVING", reason)
        else:
            logger.warning("embedder backend not ready: %s; NOT_SERVING", reason)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        # After a SIGTERM the health servicer ignores this (it stays NOT_SERVING while draining).
        for name in ("", *self._server.service_names):
            await self._server.health.set(name, status)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

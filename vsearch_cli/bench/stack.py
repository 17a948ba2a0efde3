"""The stack a bench talks to: one it starts itself (as `vsearch up` does, on free ports and a temporary
data directory, with metrics endpoints on so stage timings can be read), or one already running."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc

from vsearch_cli.bench.common import CLIENT_MAX_MESSAGE_BYTES, BenchError
from vsearch_cli.bench.procs import child_named
from vsearch_cli.local_stack.launcher import LocalStack
from vsearch_cli.local_stack.layout import StackLayout
from vsearch_cli.local_stack.ports import free_port
from vsearch.v1 import gateway_pb2_grpc, search_pb2, search_pb2_grpc

STACK_START_TIMEOUT_S = 180.0


@dataclass
class BenchLayout(StackLayout):
    """`vsearch up`'s layout plus Prometheus endpoints for the embedder and search_svc (the gateway
    serves /metrics on its HTTP port already)."""

    embedder_metrics_port: int = field(default_factory=free_port)
    search_metrics_port: int = field(default_factory=free_port)

    def environments(self) -> dict[str, dict[str, str]]:
        envs = super().environments()
        envs["embedder"]["EMBEDDER_METRICS_PORT"] = str(self.embedder_metrics_port)
        envs["search"]["SEARCH_METRICS_PORT"] = str(self.search_metrics_port)
        return envs


@dataclass
class StackEndpoints:
    gateway: str
    # Needed for the floor and naive figures, which bypass the gateway.
    search: str | None
    embedder: str | None
    managed: bool
    cache: str
    # service name -> Prometheus URL and pid; known only for a stack the bench started.
    metrics_urls: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    log_dir: Path | None = None

    def describe(self) -> dict[str, object]:
        return {
            "managed": self.managed, "gateway": self.gateway, "search": self.search, "embedder": self.embedder,
            "cache": self.cache,
            "pids": self.pids,
        }


def stack_pids(stack: LocalStack) -> dict[str, int]:
    """Each service's process, plus the `milvus` process that search_svc's Milvus Lite runs."""
    pids = {name: process.pid for name, process in stack.processes.items()}
    if "search" in pids and (milvus := child_named(pids["search"], "milvus")) is not None:
        pids["milvus"] = milvus
    return pids


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=[
        ("grpc.max_send_message_length", CLIENT_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", CLIENT_MAX_MESSAGE_BYTES),
    ])


def new_collection_name(purpose: str) -> str:
    return f"bench_{purpose}_{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def bench_stack(gateway: str | None, search: str | None, embedder: str | None, model_dir: Path,
                      use_redis: bool, keep: bool) -> AsyncIterator[StackEndpoints]:
    if gateway:
        yield StackEndpoints(gateway=gateway, search=search, embedder=embedder, managed=False,
                             cache="unknown (external stack)")
        return
    data_dir = Path(tempfile.mkdtemp(prefix="vsearch-bench-"))
    layout = BenchLayout(
        data_dir=data_dir, model_dir=model_dir, gateway_port=free_port(), http_port=free_port(),
        redis_port=free_port() if use_redis else None,
    )
    stack = LocalStack(layout, data_dir / "logs")
    try:
        try:
            await stack.start(timeout=STACK_START_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as error:
            raise BenchError(f"the local stack did not start: {error}; logs in {data_dir / 'logs'}") from None
        yield StackEndpoints(
            gateway=f"127.0.0.1:{layout.gateway_port}",
            search=f"127.0.0.1:{layout.search_port}",
            embedder=f"127.0.0.1:{layout.embedder_port}",
            managed=True,
            cache="redis" if layout.redis_url else "in-process LRU",
            metrics_urls={
                "gateway": f"http://127.0.0.1:{layout.http_port}/metrics",
                "embedder": f"http://127.0.0.1:{layout.embedder_metrics_port}/metrics",
                "search": f"http://127.0.0.1:{layout.search_metrics_port}/metrics",
            },
            pids=stack_pids(stack),
            log_dir=data_dir / "logs",
        )
    finally:
        stack.stop()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)


async def drop_collection(
    stub: gateway_pb2_grpc.VisualSearchStub | search_pb2_grpc.VectorSearchStub, collection: str
) -> str:
    """Removes the collection a bench wrote (through the gateway or search_svc, which both offer
    DropCollection); says how, never raises (it runs in `finally`)."""
    try:
        reply = await stub.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=60)
    except grpc.aio.AioRpcError as error:
        return f"drop failed: {error.code().name}: {error.details()}"
    return "dropped" if reply.dropped else "not found"

"""The gateway's readiness follows its downstreams: with the embedder (or search_svc) gone for longer than
GATEWAY_DOWNSTREAM_GRACE_S it reports NOT_SERVING on gRPC health and 503 on /healthz, naming the missing
one, while cached searches are still answered; once a new one answers on the same address, SERVING
again. Over the real stack in process (embedder, search_svc, gateway, redis-server).

Helpers local to this file: `wait_until` (polls an async condition with a deadline) and
`gateway_health` (one gRPC health Check of the gateway)."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import in_process_stack, metric_value, wait_until
from embedder_svc.server import create_server as create_embedder
from embedder_svc.settings import EmbedderSettings
from search_svc.server import create_server as create_search
from search_svc.settings import SearchSettings
from vsearch.v1 import gateway_pb2

GRACE_S = 1.0
INTERVAL_S = 0.1
# What a loaded 2-core machine may add: a check's deadline, a scheduling delay.
SLACK_S = 3.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def gateway_health(stack, service: str = "") -> int:
    async with grpc.aio.insecure_channel(stack.gateway_server.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


@pytest.fixture(scope="module")
async def stack(tmp_path_factory, mobilenet_dir, ukbench_bytes):
    data_dir = tmp_path_factory.mktemp("gateway-readiness")
    async with in_process_stack(
        data_dir, mobilenet_dir, cache={"redis_timeout_s": 0.5},
        downstream_grace_s=GRACE_S, downstream_check_interval_s=INTERVAL_S, downstream_check_timeout_s=0.5,
    ) as stack:
        stack.data_dir = data_dir
        stack.replacements = []  # services a test started in place of the stack's own, stopped at the end
        added = await stack.http.post("/v1/images", json={"images": [
            {"image_base64": base64.b64encode(ukbench_bytes[n]).decode(), "id": f"r-{n}"} for n in range(4)
        ]})
        assert added.status_code == 200 and added.json()["indexed"] == 4, added.text
        try:
            yield stack
        finally:
            for server in stack.replacements:
                await server.stop(grace=0)


def available(stack, downstream: str) -> float:
    return metric_value(stack.registry, "vsearch_gateway_downstream_available", downstream=downstream)


async def assert_serving(stack) -> None:
    assert await gateway_health(stack) == SERVING
    health = await stack.http.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})


async def test_a_dead_embedder_turns_the_gateway_not_serving_and_a_new_one_back(stack, mobilenet_dir, ukbench_bytes):
    await assert_serving(stack)
    query = ukbench_bytes[1]
    first = await stack.search(query, k=3)  # cached from now on
    assert not first.from_cache

    port = stack.embedder_server.port
    # Timed from the start of stop(): the embedder may stop answering (and the grace begin) before it returns.
    stopped_at = time.monotonic()
    await stack.embedder_server.stop(grace=0)
    await wait_until(lambda: _health_is(stack, NOT_SERVING), GRACE_S + SLACK_S, "NOT_SERVING")
    took = time.monotonic() - stopped_at
    assert took >= GRACE_S / 2, f"NOT_SERVING after {took:.2f}s: long before the grace period ran out"
    health = await stack.http.get("/healthz")
    assert health.status_code == 503, health.text
    assert health.json()["unavailable"] == ["embedder"] and "embedder" in health.json()["reason"]
    assert available(stack, "embedder") == 0 and available(stack, "search") == 1
    # Not answering searches is not what NOT_SERVING means: cached ones still are, whole.
    again = await stack.search(query, k=3)
    assert again.from_cache and [hit.id for hit in again.hits] == [hit.id for hit in first.hits]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.search(ukbench_bytes[2], k=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "embedder" in refused.value.details()
    # The process itself is alive: what a liveness probe should ask.
    assert await gateway_health(stack, "liveness") == SERVING

    embedder, _ = await create_embedder(EmbedderSettings(model_dir=mobilenet_dir, port=port))
    stack.replacements.append(embedder)
    await embedder.start()
    await embedder.wait_ready(60)
    await wait_until(lambda: _health_is(stack, SERVING), SLACK_S + 2.0, "SERVING again")
    await assert_serving(stack)
    assert available(stack, "embedder") == 1
    assert not (await stack.search(ukbench_bytes[2], k=3)).from_cache


async def test_a_dead_search_service_is_named_too(stack):
    await assert_serving(stack)
    port = stack.search_server.port
    await stack.search_server.stop(grace=0)
    await wait_until(lambda: _health_is(stack, NOT_SERVING), GRACE_S + SLACK_S, "NOT_SERVING")
    health = await stack.http.get("/healthz")
    assert health.status_code == 503 and health.json()["unavailable"] == ["search"], health.text

    search, _ = await create_search(SearchSettings(
        port=port, milvus={"uri": str(Path(stack.data_dir) / "milvus.db")}, faiss={"data_dir": stack.data_dir / "faiss"},
    ))
    stack.replacements.append(search)
    await search.start()
    await search.wait_ready(60)
    await wait_until(lambda: _health_is(stack, SERVING), SLACK_S + 2.0, "SERVING again")
    await assert_serving(stack)
    assert (await stack.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10)).count == 4


async def _health_is(stack, status: int) -> bool:
    return await gateway_health(stack) == status

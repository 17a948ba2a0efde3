"""Rate limits per API key: token buckets for searches and for image bytes written, in Redis (shared by
gateway replicas, on Redis's clock) or in process, and the fallback to in-process limits when Redis dies.
Refusals are RESOURCE_EXHAUSTED with a google.rpc.RetryInfo over gRPC and 429 with Retry-After over HTTP.
Real redis-server, the real stack in process; limits small enough that a refill takes about a second."""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from conftest import ManualClock, in_process_stack, metric_value, run_cli, wait_until
from gateway.api_keys import Caller
from gateway.rate_limit import LocalBuckets, Bucket, RateLimited, RateLimiter
from gateway.server import create_server as create_gateway
from gateway.settings import GatewaySettings, RateLimitSettings
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc

# One search every 2 s: slow enough that a loaded machine cannot refill a bucket between two searches.
SEARCHES_PER_S = 0.5
BURST = 2
INDEXED = 4
WRITTEN = 20  # the image the write-limit test sends


def caller(name: str) -> Caller:
    return Caller(name, frozenset({"search", "write"}), f"bucket-{name}")


# ---- the buckets themselves ------------------------------------------------------------------------


def test_a_local_bucket_refills_at_its_rate_up_to_its_burst():
    clock = ManualClock(100.0)
    buckets = LocalBuckets(clock)
    bucket = Bucket("search", rate_per_s=2.0, burst=3.0, unit="searches")
    assert [buckets.take("k", bucket, 1) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k", bucket, 1) == pytest.approx(0.5)
    clock.now += 0.5
    assert buckets.take("k", bucket, 1) == 0.0
    clock.now += 60  # never more than the burst
    assert [buckets.take("k", bucket, 1) for _ in range(4)][-1] == pytest.approx(0.5)
    assert buckets.take("other", bucket, 1) == 0.0  # one bucket per key


async def test_replicas_share_a_bucket_through_redis(redis_server):
    # One search per 10 s: no stall between the four calls can refill the bucket.
    settings = RateLimitSettings(search_per_s=0.1, burst=3)
    registries = [CollectorRegistry(), CollectorRegistry()]
    replicas = [RateLimiter(settings, 1024, redis_server.url, registry) for registry in registries]
    try:
        shop = caller("shop")
        await replicas[0].limit_search(shop)
        await replicas[1].limit_search(shop)
        await replicas[0].limit_search(shop)
        with pytest.raises(RateLimited) as caught:
            await replicas[1].limit_search(shop)  # the fourth search of three allowed, on the other replica
        retry_after_s = caught.value.retry_after_s
        assert 8 < retry_after_s <= 10 and caught.value.retry_after_header == str(math.ceil(retry_after_s))
        assert "'shop' is over its search limit (0.1 searches/s, bursts of 3)" in caught.value.message
        await replicas[1].limit_search(caller("other"))  # another key, another bucket
        assert metric_value(registries[1], "vsearch_gateway_rate_limited_total", key="shop", kind="search") == 1
        assert metric_value(registries[0], "vsearch_gateway_rate_limited_total", key="shop", kind="search") == 0
        assert all(metric_value(r, "vsearch_gateway_rate_limit_redis_errors_total") == 0 for r in registries)
        # The state is in Redis, with an expiry: nothing is kept forever.
        keys = await replicas[0].redis.client.keys("vsearch:rl1:*")
        assert sorted(keys) == [b"vsearch:rl1:search:bucket-other", b"vsearch:rl1:search:bucket-shop"]
        assert 0 < await replicas[0].redis.client.pttl("vsearch:rl1:search:bucket-shop") <= 31_000
    finally:
        for replica in replicas:
            await replica.close()


async def test_writes_are_charged_in_image_bytes(redis_server):
    # 100 bytes/s: a refill of the 500 bytes missing below takes 5 s, far beyond any stall between calls.
    limiter = RateLimiter(RateLimitSettings(write_bytes_per_s=100, write_burst_bytes=2500), 10_000,
                          redis_server.url, CollectorRegistry())
    try:
        items = [gateway_pb2.AddImageRequest(id=str(n), image=b"x" * 1000) for n in range(3)]

        async def stream():
            for item in items:
                yield item

        seen = []
        with pytest.raises(RateLimited) as caught:
            async for item in limiter.charging_writes(caller("ingest"), stream()):
                seen.append(item.id)
        assert seen == ["0", "1"]  # the third kilobyte did not fit the 2.5 kB burst
        # 500 bytes short: 5 s, less the time (on Redis's clock) since the first charge.
        assert caught.value.kind == "write" and 4 < caught.value.retry_after_s <= 5
        # An image larger than the burst costs the burst: it passes when the bucket is full.
        await limiter.charge_write(caller("big"), 1_000_000)
        with pytest.raises(RateLimited):  # the bucket is empty: 500 bytes take 5 s to refill
            await limiter.charge_write(caller("big"), 500)
    finally:
        await limiter.close()


async def test_when_redis_dies_limits_go_on_in_process(redis_server):
    registry = CollectorRegistry()
    limiter = RateLimiter(RateLimitSettings(search_per_s=0.5, burst=2, redis_cooldown_s=30), 1024,
                          redis_server.url, registry)
    try:
        await limiter.limit_search(caller("shop"))
        redis_server.kill()
        await limiter.limit_search(caller("shop"))  # no error: decided in process
        assert metric_value(registry, "vsearch_gateway_rate_limit_redis_errors_total") == 1
        await limiter.limit_search(caller("shop"))
        with pytest.raises(RateLimited):
            await limiter.limit_search(caller("shop"))  # the in-process bucket's burst (2) is spent
        # In cool-down Redis is not asked again: one error counted, not one per request.
        assert metric_value(registry, "vsearch_gateway_rate_limit_redis_errors_total") == 1
    finally:
        await limiter.close()


# ---- through the gateway -----------------------------------------------------------------------------


def create_key(keys_file, name: str, scopes: str) -> str:
    result = run_cli("keys", "create", name, "--scopes", scopes, "--keys-file", str(keys_file), timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "api-keys.jsonl"
    return path, {name: create_key(path, name, "search,write") for name in ("alice", "bob", "carol", "dave")}


@pytest.fixture(scope="module")
async def stack(tmp_path_factory, mobilenet_dir, ukbench_bytes, keys):
    keys_file, _ = keys
    async with in_process_stack(
        tmp_path_factory.mktemp("gateway-rate-limit"), mobilenet_dir, internal_port=0, auth={"keys_file": keys_file},
        rate_limit={"search_per_s": SEARCHES_PER_S, "burst": BURST,
                    "write_bytes_per_s": 1000, "write_burst_bytes": len(ukbench_bytes[WRITTEN]) * 3 // 2},
    ) as stack:
        async with grpc.aio.insecure_channel(stack.gateway_server.internal.address) as channel:
            summary = await gateway_pb2_grpc.VisualSearchStub(channel).AddImages(
                iter([gateway_pb2.AddImageRequest(id=f"r-{n}", image=ukbench_bytes[n]) for n in range(INDEXED)]),
                timeout=60,
            )
        assert summary.indexed == INDEXED, summary
        yield stack


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def internal_count(stack) -> int:
    """The catalog's size, asked on the internal listener (no key, no limit)."""
    async with grpc.aio.insecure_channel(stack.gateway_server.internal.address) as channel:
        return (await gateway_pb2_grpc.VisualSearchStub(channel).Stats(gateway_pb2.VisualStatsRequest(), timeout=10)).count


async def test_grpc_search_over_the_limit_is_resource_exhausted_with_retry_info(stack, keys):
    _, made = keys
    request = gateway_pb2.VisualSearchRequest(item_id="r-0", k=1)
    for _ in range(BURST):
        await stack.stub.Search(request, timeout=10, metadata=bearer(made["alice"]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.Search(request, timeout=10, metadata=bearer(made["alice"]))
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "API key 'alice' is over its search limit" in error.details() and made["alice"] not in error.details()
    status = rpc_status.from_call(error)  # checks the rich status agrees with the call's code and message
    (detail,) = status.details
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry)
    delay_s = retry.retry_delay.ToTimedelta().total_seconds()
    assert 0 < delay_s <= 1 / SEARCHES_PER_S
    trailers = dict(error.trailing_metadata())
    assert int(trailers["retry-after-ms"]) == pytest.approx(delay_s * 1000, abs=1)
    assert metric_value(stack.registry, "vsearch_gateway_rate_limited_total", key="alice", kind="search") == 1
    # Another key has its own bucket; the internal listener has none.
    await stack.stub.Search(request, timeout=10, metadata=bearer(made["bob"]))
    async with grpc.aio.insecure_channel(stack.gateway_server.internal.address) as channel:
        internal = gateway_pb2_grpc.VisualSearchStub(channel)
        for _ in range(BURST * 3):
            await internal.Search(request, timeout=10)
    # Stats is not a search.
    await stack.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10, metadata=bearer(made["alice"]))

    async def searches_again() -> bool:
        try:
            await stack.stub.Search(request, timeout=10, metadata=bearer(made["alice"]))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        return True

    waited = await wait_until(searches_again, timeout=5, what="alice's bucket refills", interval=0.1)
    assert waited <= delay_s + 1.0


async def test_http_search_over_the_limit_is_429_with_retry_after(stack, keys):
    _, made = keys
    headers = {"X-API-Key": made["carol"]}
    for _ in range(BURST):
        assert (await stack.http.post("/v1/search", json={"item_id": "r-1", "k": 1}, headers=headers)).status_code == 200
    refused = await stack.http.post("/v1/search", json={"item_id": "r-1", "k": 1}, headers=headers)
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= math.ceil(1 / SEARCHES_PER_S)  # seconds, rounded up
    body = refused.json()
    assert body["error"]["code"] == "RESOURCE_EXHAUSTED" and "'carol' is over its search limit" in body["error"]["message"]
    assert metric_value(stack.registry, "vsearch_gateway_rate_limited_total", key="carol", kind="search") == 1
    assert metric_value(stack.registry, "vsearch_http_requests_total", method="POST", route="/v1/search", status="429") >= 1


async def test_writes_over_the_byte_limit_are_refused_on_both_protocols(stack, keys, ukbench_bytes):
    _, made = keys
    before = await internal_count(stack)
    # The burst holds one and a half images: the second is refused, before anything was written.
    items = [gateway_pb2.AddImageRequest(id=f"w-{n}", image=ukbench_bytes[WRITTEN]) for n in range(2)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.AddImages(iter(items), timeout=60, metadata=bearer(made["dave"]))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its write limit (1000 image bytes/s" in caught.value.details()
    retry = error_details_pb2.RetryInfo()
    assert rpc_status.from_call(caught.value).details[0].Unpack(retry) and retry.retry_delay.seconds > 0
    assert await internal_count(stack) == before
    files = [("images", ("a.jpg", ukbench_bytes[22], "image/jpeg"))]
    refused = await stack.http.post("/v1/images", files=files, headers={"X-API-Key": made["dave"]})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 1, refused.text
    assert refused.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert metric_value(stack.registry, "vsearch_gateway_rate_limited_total", key="dave", kind="write") == 2


async def test_gateway_replicas_share_limits_through_redis_and_fall_back_when_it_dies(stack, keys, tmp_path):
    keys_file, _ = keys
    key = await asyncio.to_thread(create_key, keys_file, "erin", "search")
    second, _ = await create_gateway(GatewaySettings(
        embedder_address=stack.embedder_server.address, search_address=stack.search_server.address, port=0,
        http_port=0, redis_url=stack.redis.url, auth={"keys_file": keys_file},
        rate_limit={"search_per_s": SEARCHES_PER_S, "burst": BURST, "redis_cooldown_s": 60},
    ))
    await second.start()
    try:
        await second.wait_ready(30)
        request = {"item_id": "r-2", "k": 1}
        headers = {"X-API-Key": key}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{second.http_port}", timeout=10) as other:
            await wait_until(lambda: _accepted(other, headers), timeout=10, what="the second gateway reads the new key")
            await wait_until(lambda: _accepted(stack.http, headers), timeout=10, what="the first gateway reads the new key")
            # One search on each replica spends the burst (2) for both.
            assert (await stack.http.post("/v1/search", json=request, headers=headers)).status_code == 200
            assert (await other.post("/v1/search", json=request, headers=headers)).status_code == 200
            assert (await stack.http.post("/v1/search", json=request, headers=headers)).status_code == 429
            assert (await other.post("/v1/search", json=request, headers=headers)).status_code == 429
            stack.redis.kill()
            # Redis gone: never a failed request, and each replica limits on its own (a fresh burst here).
            answers = [(await other.post("/v1/search", json=request, headers=headers)).status_code for _ in range(BURST + 1)]
            assert answers == [200] * BURST + [429], answers
            assert metric_value(second.metrics.registry, "vsearch_gateway_rate_limit_redis_errors_total") == 1
    finally:
        await second.stop(grace=1)


async def _accepted(http: httpx.AsyncClient, headers: dict[str, str]) -> bool:
    """A cheap call that needs the key (Stats is not rate limited)."""
    return (await http.get("/v1/stats", headers=headers)).status_code == 200


def test_rate_limit_settings_refuse_a_burst_without_a_rate():
    with pytest.raises(ValueError, match="GATEWAY_RATE_LIMIT__BURST needs GATEWAY_RATE_LIMIT__SEARCH_PER_S"):
        RateLimitSettings(burst=5)
    assert json.loads(RateLimitSettings(search_per_s=2).model_dump_json())["burst"] is None

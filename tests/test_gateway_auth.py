"""API keys with scopes on both of the gateway's checked protocols (gRPC :50051, HTTP), the internal gRPC
listener that checks none, the keys file (made by `vsearch keys`, reread when it changes), and CORS. Over
the real stack in process (embedder, search_svc, gateway, Redis), the CLI as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import REPO_ROOT, ManualClock, in_process_stack, metric_value, run_cli, service_env, wait_until
from gateway.api_keys import KeyFile, KeyFileError, read_key_file
from gateway.server import create_server as create_gateway
from gateway.settings import GatewaySettings
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2

LEGACY_KEY = "legacy-shared-key-0123456789"
ORIGIN = "https://shop.example"
INDEXED = 4


def create_key(keys_file: Path, name: str, scopes: str) -> str:
    """`vsearch keys create`: the key it prints (once) on stdout."""
    result = run_cli("keys", "create", name, "--scopes", scopes, "--keys-file", str(keys_file), timeout=60)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("vs_") and "\n" not in key and name in result.stderr
    return key


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("keys") / "api-keys.jsonl"
    made = {name: create_key(path, name, scopes)
            for name, scopes in [("searcher", "search"), ("writer", "write"), ("operator", "admin")]}
    return path, made


@pytest.fixture(scope="module")
async def stack(tmp_path_factory, mobilenet_dir, ukbench_bytes, keys):
    keys_file, _ = keys
    async with in_process_stack(
        tmp_path_factory.mktemp("gateway-auth"), mobilenet_dir, api_key=LEGACY_KEY, internal_port=0,
        auth={"keys_file": keys_file, "reload_interval_s": 0.05}, cors={"allow_origins": [ORIGIN]},
    ) as stack:
        # Indexed through the internal listener, which needs no key.
        async with grpc.aio.insecure_channel(stack.gateway_server.internal.address) as channel:
            summary = await gateway_pb2_grpc.VisualSearchStub(channel).AddImages(
                iter([gateway_pb2.AddImageRequest(id=f"a-{n}", image=ukbench_bytes[n]) for n in range(INDEXED)]),
                timeout=60,
            )
        assert summary.indexed == INDEXED, summary
        yield stack


async def rpc_code(call) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call ended with (OK and "" when it succeeded)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


async def test_grpc_needs_a_valid_key(stack, keys):
    _, made = keys
    stats = gateway_pb2.VisualStatsRequest()
    refused = metric_value(stack.registry, "vsearch_gateway_auth_refused_total", reason="unauthenticated")
    code, message = await rpc_code(stack.stub.Stats(stats, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in message
    # Right key id, wrong secret; a token of another shape; the legacy key with one character changed.
    key_id = made["searcher"].split("_")[1]
    for wrong in (f"vs_{key_id}_{'A' * 43}", "not-a-key", LEGACY_KEY[:-1] + "X"):
        for metadata in (bearer(wrong), (("x-api-key", wrong),)):
            code, message = await rpc_code(stack.stub.Stats(stats, timeout=10, metadata=metadata))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "wrong API key" in message, wrong
            assert wrong not in message and "AAAA" not in message
    assert metric_value(stack.registry, "vsearch_gateway_auth_refused_total", reason="unauthenticated") == refused + 7
    # Health and reflection stay open: probes carry no key.
    reply = await health_pb2_grpc.HealthStub(stack.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_grpc_scopes(stack, keys, ukbench_bytes):
    _, made = keys
    by_item = gateway_pb2.VisualSearchRequest(item_id="a-0", k=2)
    # search: Search and Stats, nothing that writes.
    reply = await stack.stub.Search(by_item, timeout=10, metadata=bearer(made["searcher"]))
    assert reply.hits[0].id == "a-0"
    assert (await stack.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10,
                                   metadata=(("x-api-key", made["searcher"]),))).count == INDEXED
    denied = metric_value(stack.registry, "vsearch_gateway_auth_refused_total", reason="permission_denied")
    code, message = await rpc_code(stack.stub.AddImages(
        iter([gateway_pb2.AddImageRequest(id="x", image=ukbench_bytes[9])]), timeout=10, metadata=bearer(made["searcher"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert message == "API key 'searcher' may not call AddImages: that needs the 'write' scope (the key has search)"
    code, _ = await rpc_code(stack.stub.DeleteImages(
        gateway_pb2.DeleteImagesRequest(ids=["a-0"]), timeout=10, metadata=bearer(made["searcher"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # write: AddImages and DeleteImages, not Search, not DropCollection.
    summary = await stack.stub.AddImages(
        iter([gateway_pb2.AddImageRequest(id="w-1", image=ukbench_bytes[9], collection="scratch")]),
        timeout=60, metadata=bearer(made["writer"]))
    assert summary.indexed == 1
    deleted = await stack.stub.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=["w-1"], collection="scratch"),
                                            timeout=10, metadata=bearer(made["writer"]))
    assert deleted.deleted == 1
    code, message = await rpc_code(stack.stub.Search(by_item, timeout=10, metadata=bearer(made["writer"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'search' scope" in message
    drop = search_pb2.DropCollectionRequest(collection="scratch")
    code, message = await rpc_code(stack.stub.DropCollection(drop, timeout=10, metadata=bearer(made["writer"])))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'admin' scope" in message
    assert metric_value(stack.registry, "vsearch_gateway_auth_refused_total", reason="permission_denied") == denied + 4
    # admin implies the others; GATEWAY_API_KEY has every scope.
    assert (await stack.stub.Search(by_item, timeout=10, metadata=bearer(made["operator"]))).hits
    assert (await stack.stub.DropCollection(drop, timeout=10, metadata=bearer(made["operator"]))).dropped
    assert (await stack.stub.Search(by_item, timeout=10, metadata=bearer(LEGACY_KEY))).hits
    code, _ = await rpc_code(stack.stub.DropCollection(drop, timeout=10, metadata=(("x-api-key", LEGACY_KEY),)))
    assert code == grpc.StatusCode.OK


async def test_http_keys_and_scopes(stack, keys, ukbench_bytes):
    _, made = keys
    http = stack.http

    def error_of(response: httpx.Response, status: int, code: str) -> str:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and body["error"]["code"] == code, body
        return body["error"]["message"]

    missing = await http.get("/v1/stats")
    assert "missing API key" in error_of(missing, 401, "UNAUTHENTICATED")
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = made["searcher"][:-4] + "AAAA"
    message = error_of(await http.get("/v1/stats", headers={"X-API-Key": wrong}), 401, "UNAUTHENTICATED")
    assert "wrong API key" in message and wrong not in message
    searcher = {"Authorization": f"Bearer {made['searcher']}"}
    assert (await http.get("/v1/stats", headers=searcher)).json()["count"] == INDEXED
    found = await http.post("/v1/search", json={"item_id": "a-1", "k": 2}, headers={"X-API-Key": made["searcher"]})
    assert found.status_code == 200 and found.json()["hits"][0]["id"] == "a-1"
    message = error_of(await http.delete("/v1/images/a-1", headers=searcher), 403, "PERMISSION_DENIED")
    assert message == "API key 'searcher' may not call DeleteImages: that needs the 'write' scope (the key has search)"
    files = [("images", ("x.jpg", ukbench_bytes[10], "image/jpeg"))]
    error_of(await http.post("/v1/images", files=files, headers=searcher), 403, "PERMISSION_DENIED")
    writer = {"X-API-Key": made["writer"]}
    added = await http.post("/v1/images", files=files, data={"ids": json.dumps(["h-1"])}, headers=writer)
    assert added.status_code == 200 and added.json()["indexed"] == 1
    assert (await http.delete("/v1/images/h-1", headers=writer)).status_code == 200
    error_of(await http.post("/v1/search", json={"item_id": "a-1"}, headers=writer), 403, "PERMISSION_DENIED")
    # A path that is no operation needs a valid key, then gets its 404.
    error_of(await http.get("/v1/nothing-here"), 401, "UNAUTHENTICATED")
    error_of(await http.get("/v1/nothing-here", headers=writer), 404, "NOT_FOUND")
    # The page, the docs, probes and the scrape stay open.
    for open_path in ("/healthz", "/metrics", "/", "/openapi.json"):
        assert (await http.get(open_path)).status_code == 200, open_path
    spec = (await http.get("/openapi.json")).json()
    assert {"401", "403", "429"} <= set(spec["paths"]["/v1/search"]["post"]["responses"])


async def test_the_internal_listener_needs_no_key_and_has_health_and_reflection(stack, ukbench_bytes):
    async with grpc.aio.insecure_channel(stack.gateway_server.internal.address) as channel:
        stub = gateway_pb2_grpc.VisualSearchStub(channel)
        assert (await stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10)).count == INDEXED
        assert (await stub.Search(gateway_pb2.VisualSearchRequest(item_id="a-2", k=1), timeout=10)).hits[0].id == "a-2"
        summary = await stub.AddImages(iter([
            gateway_pb2.AddImageRequest(id="i-1", image=ukbench_bytes[11], collection="c2"),
            gateway_pb2.AddImageRequest(id="i-2", image=b"junk"),
        ]), timeout=60)
        assert (summary.indexed, summary.failed) == (1, 1)
        assert (await stub.DropCollection(search_pb2.DropCollectionRequest(collection="c2"), timeout=10)).dropped
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "vsearch.v1.VisualSearch", "liveness"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for answer in reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            assert "vsearch.v1.VisualSearch" in {service.name for service in answer.list_services_response.service}
            break


async def test_the_keys_file_is_reread_when_it_changes(stack, keys):
    keys_file, _ = keys
    stats = gateway_pb2.VisualStatsRequest()
    key = await asyncio.to_thread(create_key, keys_file, "late-comer", "search")

    async def accepted() -> bool:
        return (await rpc_code(stack.stub.Stats(stats, timeout=10, metadata=bearer(key))))[0] == grpc.StatusCode.OK

    await wait_until(accepted, timeout=10, what="a key added to the keys file is accepted")
    revoked = await asyncio.to_thread(run_cli, "keys", "revoke", "late-comer", "--keys-file", str(keys_file))
    assert revoked.returncode == 0, revoked.stderr
    await wait_until(lambda: _refused(stack, key), timeout=10, what="a revoked key is refused")
    listed = await asyncio.to_thread(run_cli, "keys", "list", "--keys-file", str(keys_file))
    assert "searcher" in listed.stdout and "late-comer" not in listed.stdout and "vs_" not in listed.stdout


async def _refused(stack, key: str) -> bool:
    code, _ = await rpc_code(stack.stub.Stats(gateway_pb2.VisualStatsRequest(), timeout=10, metadata=bearer(key)))
    return code == grpc.StatusCode.UNAUTHENTICATED


def test_a_keys_file_that_breaks_keeps_the_keys_loaded_before(tmp_path):
    path = tmp_path / "api-keys.jsonl"
    key = create_key(path, "steady", "search,write")
    clock = ManualClock()
    key_file = KeyFile(path, check_interval_s=1.0, clock=clock)
    key_id = key.split("_")[1]
    assert key_file.get(key_id).scopes == ("search", "write")
    good = path.read_text()
    path.write_text(good + '{"name": "half-written\n')
    clock.now += 1.0
    assert key_file.get(key_id) is not None  # the broken file was read, refused, and the keys kept
    with pytest.raises(KeyFileError, match="line 3: not JSON"):
        read_key_file(path)
    path.write_text("")  # every key revoked
    clock.now += 1.0
    assert key_file.get(key_id) is None


def test_the_gateway_refuses_to_start_on_a_keys_file_it_cannot_read(tmp_path):
    broken = tmp_path / "keys.jsonl"
    broken.write_text('{"name": "x", "key_id": "nothex", "hash": "sha256:00", "scopes": ["search"], "created": ""}\n')
    for path, expected in ((tmp_path / "missing.jsonl", "cannot read the keys file"), (broken, "line 1: key_id")):
        env = service_env("GATEWAY_", GATEWAY_EMBEDDER_ADDRESS="127.0.0.1:1", GATEWAY_SEARCH_ADDRESS="127.0.0.1:2",
                          GATEWAY_AUTH__KEYS_FILE=str(path))
        result = subprocess.run([sys.executable, "-m", "gateway"], env=env, capture_output=True, text=True,
                                timeout=60, cwd=REPO_ROOT)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gateway: refusing to start: invalid setting "
                                                       "GATEWAY_AUTH__KEYS_FILE"), lines
        assert expected in lines[0]


async def test_cors_preflights_and_answers_for_the_allowed_origin_only(stack, keys):
    _, made = keys
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    answer = await stack.http.options("/v1/search", headers=preflight)
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in answer.headers["access-control-allow-headers"].split(",")}
    assert "POST" in answer.headers["access-control-allow-methods"]
    elsewhere = await stack.http.options("/v1/search", headers={**preflight, "Origin": "https://evil.example"})
    assert elsewhere.status_code == 400 and "access-control-allow-origin" not in elsewhere.headers
    # The page at the origin can read the answers, refusals included.
    ok = await stack.http.get("/v1/stats", headers={"Origin": ORIGIN, "X-API-Key": made["searcher"]})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    refused = await stack.http.get("/v1/stats", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in (await stack.http.get(
        "/v1/stats", headers={"Origin": "https://evil.example", "X-API-Key": made["searcher"]})).headers


async def test_without_keys_nothing_is_checked_and_cors_is_off(stack):
    gateway, _ = await create_gateway(GatewaySettings(
        embedder_address=stack.embedder_server.address, search_address=stack.search_server.address, port=0,
        http_port=0,
    ))
    await gateway.start()
    try:
        await gateway.wait_ready(30)
        assert gateway.internal is None  # off by default
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stats = await gateway_pb2_grpc.VisualSearchStub(channel).Stats(gateway_pb2.VisualStatsRequest(), timeout=10)
            assert stats.count == INDEXED
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as http:
            assert (await http.get("/v1/stats")).status_code == 200
            preflight = await http.options("/v1/search", headers={
                "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in preflight.headers
    finally:
        await gateway.stop(grace=1)


async def test_both_listeners_drain_together(stack, keys):
    keys_file, _ = keys
    gateway, _ = await create_gateway(GatewaySettings(
        embedder_address=stack.embedder_server.address, search_address=stack.search_server.address, port=0,
        http_port=0, internal_port=0, auth={"keys_file": keys_file},
    ))
    await gateway.start()
    await gateway.wait_ready(30)

    async def health_of(address: str) -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status

    addresses = (gateway.address, gateway.internal.address)
    for address in addresses:
        assert await health_of(address) == health_pb2.HealthCheckResponse.SERVING
    # A drain long enough for two new channels' checks on a slow machine; the stop waits it out.
    stopping = asyncio.create_task(gateway.stop(grace=1, drain=3.0))
    for address in addresses:  # draining: both still answer, both NOT_SERVING
        await wait_until(lambda a=address: _not_serving(health_of, a), timeout=5, what=f"{address} NOT_SERVING")
    await stopping
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def _not_serving(health_of, address: str) -> bool:
    return await health_of(address) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_the_key_file_stores_hashes_only(keys):
    keys_file, made = keys
    text = keys_file.read_text()
    for key in made.values():
        assert key not in text and key.split("_", 2)[2] not in text
    entries = {entry.name: entry for entry in read_key_file(keys_file)}
    assert {"searcher", "writer", "operator"} <= set(entries)
    assert all(entry.hash.startswith("sha256:") for entry in entries.values())
    assert os.stat(keys_file).st_mode & 0o777 == 0o644


def test_the_internal_port_must_be_its_own():
    with pytest.raises(ValueError, match="GATEWAY_INTERNAL_PORT must differ from GATEWAY_PORT and GATEWAY_HTTP_PORT"):
        GatewaySettings(embedder_address="e:1", search_address="s:2", port=50051, internal_port=50051)
    assert GatewaySettings(embedder_address="e:1", search_address="s:2", port=0, http_port=0, internal_port=0)


async def test_the_command_line_sends_its_key(stack, keys, ukbench_images, tmp_path):
    """`vsearch search`, `index` and `delete` against a gateway that checks keys: refused without one,
    served with `--api-key` or VSEARCH_API_KEY."""
    _, made = keys
    gateway = stack.gateway_server.address
    query = str(ukbench_images[1])
    # In a thread: the stack answers on this event loop.
    refused = await asyncio.to_thread(run_cli, "search", query, "--gateway", gateway)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert made["searcher"] not in refused.stderr
    found = await asyncio.to_thread(run_cli, "search", query, "--gateway", gateway, "--api-key", made["searcher"],
                                    "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["hits"]

    folder = tmp_path / "catalog"
    folder.mkdir()
    (folder / "one.jpg").write_bytes(ukbench_images[20].read_bytes())
    env = {**os.environ, "VSEARCH_API_KEY": made["writer"]}
    indexed = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "vsearch_cli", "index", str(folder),
                                                       "--gateway", gateway, "--json", "--collection", "cli_keys"],
                                      capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)
    assert indexed.returncode == 0, indexed.stderr
    assert json.loads(indexed.stdout)["indexed"] == 1
    no_scope = await asyncio.to_thread(run_cli, "delete", "nothing-here", "--collection", "cli_keys",
                                       "--gateway", gateway, "--api-key", made["searcher"])
    assert no_scope.returncode == 1 and "PERMISSION_DENIED" in no_scope.stderr

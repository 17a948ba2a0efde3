"""The gateway's HTTP server against clients that misbehave, over real sockets: a body at 10 B/s, a
slowloris header trickle, idle connections, too many connections, oversized and malformed heads, a
client that hangs up mid-body. Each is bounded by a `GATEWAY_HTTP__*` setting (kept small here) and
answered in the JSON error shape, or closed quietly where nobody is left to answer.

None of this reaches the embedder or search_svc, so the gateway here runs alone (a real gateway whose
downstream addresses answer nothing: it stays NOT_SERVING, which these tests do not look at).

Helpers local to this file: `RawClient` (an HTTP/1.1 client on a bare asyncio socket) and
`wait_until` (polls a condition with a deadline)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import AsyncIterator, Awaitable

import pytest

from conftest import metric_value, wait_until
from gateway.http_limits import BODY_BACKSTOP_SLACK_S
from gateway.server import GatewayServer, create_server
from gateway.settings import GatewaySettings
from vsearch_cli.local_stack.ports import free_port

HEADER_TIMEOUT_S = 0.5
BODY_TIMEOUT_S = 0.5
KEEPALIVE_TIMEOUT_S = 0.5
# What a loaded 2-core machine may add to a bound before the server acts on it.
SLACK_S = 2.0


class RawClient:
    """One TCP connection speaking HTTP/1.1 by hand, so a test can send as slowly, as much or as
    wrongly as it likes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """False once the server has closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
            return True
        except (ConnectionError, OSError):
            return False

    async def trickle(self, data: bytes, bytes_per_s: float = 10.0) -> None:
        """`data` one byte at a time, until it is all sent or the server hangs up."""
        for position in range(len(data)):
            if self.reader.at_eof() or not await self.send(data[position:position + 1]):
                return
            await asyncio.sleep(1 / bytes_per_s)

    async def read_response(self, timeout: float) -> bytes:
        """One response with a Content-Length body, leaving the connection as it is."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = parse_response(head)[1].get("content-length", "0")
            return head + await self.reader.readexactly(int(length))

    async def read_all(self, timeout: float) -> bytes:
        """Everything until the server closes the connection (fails if it does not within `timeout`)."""
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await self.reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.writer.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def assert_json_error(raw: bytes, status: int, code: str, word: str, closes: bool = True) -> None:
    got_status, headers, body = parse_response(raw)
    assert got_status == status, raw[:300]
    assert headers["content-type"] == "application/json", headers
    if closes:
        assert headers.get("connection") == "close", headers
    error = json.loads(body)["error"]
    assert error["code"] == code and word in error["message"], error


LIMITS = {"header_timeout_s": HEADER_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S,
          "keepalive_timeout_s": KEEPALIVE_TIMEOUT_S, "max_connections": 32, "max_header_bytes": 2048}


@contextlib.asynccontextmanager
async def running_gateway(**limits: object) -> AsyncIterator[GatewayServer]:
    server, _ = await create_server(GatewaySettings(
        port=0, http_port=0, log_format="text", grace_seconds=1,
        embedder_address=f"127.0.0.1:{free_port()}", search_address=f"127.0.0.1:{free_port()}",
        http_max_body_bytes=64 * 1024, http={**LIMITS, **limits},
    ))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayServer]:
    async with running_gateway() as server:
        yield server


def sample(server: GatewayServer, name: str, **labels: str) -> float:
    return metric_value(server.metrics.registry, name, labels)


def search_head(length: int) -> bytes:
    return (f"POST /v1/search HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def timed(awaitable: Awaitable[bytes]) -> tuple[bytes, float]:
    started = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - started


async def test_a_body_at_10_bytes_per_second_gets_408_within_the_body_timeout(gateway):
    client = await RawClient.connect(gateway.http_port)
    body = json.dumps({"item_id": "x" * 200}).encode()
    await client.send(search_head(len(body)))
    trickling = asyncio.create_task(client.trickle(body, bytes_per_s=10))
    raw, elapsed = await timed(client.read_all(timeout=BODY_TIMEOUT_S + SLACK_S))
    trickling.cancel()
    assert_json_error(raw, 408, "DEADLINE_EXCEEDED", "body")
    assert elapsed >= BODY_TIMEOUT_S * 0.9, elapsed  # the bound, not an early refusal
    assert sample(gateway, "vsearch_http_requests_total", method="POST", route="/v1/search", status="408") == 1
    # Half-closed, not reset: what the client still sends is dropped until it closes (or LINGER_S).
    assert sample(gateway, "vsearch_http_open_connections") == 1
    assert await client.send(b"more of the body")
    client.close()
    await wait_until(lambda: sample(gateway, "vsearch_http_open_connections") == 0, what="connection closed")


async def test_16_slowloris_connections_are_closed_within_the_header_timeout(gateway):
    clients = [await RawClient.connect(gateway.http_port) for _ in range(16)]
    heads = [f"GET /metrics HTTP/1.1\r\nHost: gateway\r\nX-Slow-{n}: {'z' * 200}\r\n\r\n".encode() for n in range(16)]
    trickles = [asyncio.create_task(client.trickle(head, bytes_per_s=20)) for client, head in zip(clients, heads)]
    results = await asyncio.gather(*(timed(client.read_all(timeout=HEADER_TIMEOUT_S + SLACK_S)) for client in clients))
    for task in trickles:
        task.cancel()
    for client in clients:
        client.close()
    for raw, elapsed in results:
        assert_json_error(raw, 408, "DEADLINE_EXCEEDED", "headers")
        assert elapsed >= HEADER_TIMEOUT_S * 0.9, elapsed
    assert sample(gateway, "vsearch_http_connections_closed_total", reason="header_timeout") == 16
    await wait_until(lambda: sample(gateway, "vsearch_http_open_connections") == 0, what="all connections closed")


async def test_idle_connections_are_closed_quietly(gateway):
    silent = await RawClient.connect(gateway.http_port)  # never sends a byte
    raw, elapsed = await timed(silent.read_all(timeout=HEADER_TIMEOUT_S + SLACK_S))
    assert raw == b"" and elapsed >= HEADER_TIMEOUT_S * 0.9

    kept_alive = await RawClient.connect(gateway.http_port)  # one request, then idle
    await kept_alive.send(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")
    raw, elapsed = await timed(kept_alive.read_all(timeout=KEEPALIVE_TIMEOUT_S + SLACK_S))
    assert parse_response(raw)[0] == 200 and elapsed >= KEEPALIVE_TIMEOUT_S * 0.9
    for client in (silent, kept_alive):
        client.close()


async def test_a_body_trickled_after_the_answer_is_cut_off(gateway):
    # The route does not exist, so the app answers 404 at once without reading the body; uvicorn alone
    # would go on reading it for as long as it trickles.
    client = await RawClient.connect(gateway.http_port)
    await client.send(b"POST /v1/nothing-here HTTP/1.1\r\nHost: gateway\r\nContent-Length: 1000\r\n\r\n")
    trickling = asyncio.create_task(client.trickle(b"x" * 1000, bytes_per_s=10))
    raw, elapsed = await timed(client.read_all(timeout=BODY_TIMEOUT_S + BODY_BACKSTOP_SLACK_S + SLACK_S))
    trickling.cancel()
    client.close()
    assert parse_response(raw)[0] == 404
    assert elapsed >= BODY_TIMEOUT_S
    assert sample(gateway, "vsearch_http_connections_closed_total", reason="body_timeout") == 1


async def test_connections_over_the_cap_get_a_json_503():
    async with running_gateway(max_connections=4, header_timeout_s=30) as gateway:
        held = [await RawClient.connect(gateway.http_port) for _ in range(4)]
        await wait_until(lambda: sample(gateway, "vsearch_http_open_connections") == 4, what="4 connections open")
        extra = await RawClient.connect(gateway.http_port)
        await extra.send(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert_json_error(await extra.read_all(timeout=SLACK_S), 503, "UNAVAILABLE", "connections")
        extra.close()
        for client in held:
            client.close()
        await wait_until(lambda: sample(gateway, "vsearch_http_open_connections") == 0, what="all connections closed")
        again = await RawClient.connect(gateway.http_port)
        await again.send(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert parse_response(await again.read_response(timeout=SLACK_S))[0] == 200
        again.close()
        assert sample(gateway, "vsearch_http_connections_closed_total", reason="too_many_connections") == 1


@pytest.mark.parametrize("request_bytes, status, code, word", [
    # Still incomplete beyond the limit: h11 refuses it (uvicorn would answer in plain text).
    (b"GET /metrics HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * 4096, 431, "RESOURCE_EXHAUSTED", "2048 bytes"),
    (b"GET /" + b"a" * 4096, 431, "RESOURCE_EXHAUSTED", "2048 bytes"),
    (b"NOT AN HTTP REQUEST\r\n\r\n", 400, "INVALID_ARGUMENT", "malformed"),
    (b"GET /metrics HTTP/1.1\r\nHost: gateway\r\nBad Header\r\n\r\n", 400, "INVALID_ARGUMENT", "malformed"),
], ids=["header too large", "request line too long", "garbage", "malformed header"])
async def test_heads_the_parser_refuses_get_the_json_error_shape(gateway, request_bytes, status, code, word):
    client = await RawClient.connect(gateway.http_port)
    await client.send(request_bytes)
    assert_json_error(await client.read_all(timeout=SLACK_S), status, code, word)
    client.close()
    assert sample(gateway, "vsearch_http_connections_closed_total", reason="malformed_request") == 1


@pytest.mark.parametrize("request_bytes", [
    b"GET /metrics HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n",
    b"GET /metrics?" + b"a" * 4096 + b" HTTP/1.1\r\nHost: gateway\r\n\r\n",
], ids=["header too large", "request line too long"])
async def test_a_head_over_the_limit_that_arrives_whole_gets_431_too(gateway, request_bytes):
    # h11 measures only a head still incomplete: a whole one is measured by the app's guard.
    client = await RawClient.connect(gateway.http_port)
    await client.send(request_bytes)
    raw = await client.read_response(timeout=SLACK_S)
    assert_json_error(raw, 431, "RESOURCE_EXHAUSTED", "2048 bytes", closes=False)
    await client.send(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")  # the connection goes on
    assert parse_response(await client.read_response(timeout=SLACK_S))[0] == 200
    client.close()


async def test_a_client_hanging_up_mid_body_is_a_quiet_499(gateway, caplog):
    caplog.set_level(logging.DEBUG)
    client = await RawClient.connect(gateway.http_port)
    await client.send(search_head(1000) + b'{"item_id": "abc", ')
    client.close()  # the head is in, so the request reaches the handler, which finds the client gone
    await wait_until(
        lambda: sample(gateway, "vsearch_http_requests_total", method="POST", route="/v1/search", status="499") == 1,
        what="499 counted",
    )
    assert sample(gateway, "vsearch_http_requests_total", method="POST", route="/v1/search", status="500") == 0
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("gateway.http", "uvicorn"))]
    assert not noisy, [r.getMessage() for r in noisy]
    disconnects = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(disconnects) == 1 and disconnects[0].exc_info is None and disconnects[0].levelno < logging.WARNING


async def test_bodies_over_the_limit_get_413_resource_exhausted(gateway):
    client = await RawClient.connect(gateway.http_port)
    await client.send(search_head(65 * 1024))  # declared over the 64 KiB limit: refused before it is read
    assert_json_error(await client.read_response(timeout=SLACK_S), 413, "RESOURCE_EXHAUSTED", "65536 bytes",
                      closes=False)
    client.close()

    chunked = await RawClient.connect(gateway.http_port)  # no Content-Length: counted as it arrives
    chunks = b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(65)) + b"0\r\n\r\n"
    await chunked.send(b"POST /v1/search HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    assert_json_error(await chunked.read_response(timeout=SLACK_S), 413, "RESOURCE_EXHAUSTED", "65536 bytes",
                      closes=False)
    chunked.close()
    # The declared one is refused before routing (route "unmatched"), the chunked one in the handler.
    assert sum(sample(gateway, "vsearch_http_requests_total", method="POST", route=route, status="413")
               for route in ("unmatched", "/v1/search")) == 2

"""Bounds on what one HTTP client can hold of the gateway, and for how long (`GatewaySettings.http`).

uvicorn itself bounds only the idle time between requests (`timeout_keep_alive`) and the size of a
request head still incomplete (h11's `max_incomplete_event_size`); it has no deadline for a request's
head or body, its connection cap (`limit_concurrency`) answers in plain text, and so does its parser
when it refuses a request (`H11Protocol.send_400_response`, with no setting to change it). So:

- `GatewayHttpProtocol`, uvicorn's h11 protocol (`uvicorn.Config(http=...)` takes a class) with a
  header deadline (408 in the JSON error shape, or a quiet close for a connection that never sent a
  byte), a connection cap (503 UNAVAILABLE in the JSON error shape) and the parser's refusals
  (malformed or oversized heads) in the JSON error shape; and a lingering close where the client may
  still be sending (`LingeringTransport`), so that it reads the answer instead of a reset. It overrides
  methods of uvicorn's `H11Protocol` (`connection_made`, `connection_lost`, `data_received`,
  `handle_events`, `shutdown`, `send_400_response`) and copies none of its code; they are uvicorn
  internals, so tests/test_gateway_http_limits.py is what says whether a new uvicorn still honours them.
- `RequestGuard`, an ASGI middleware: the head's size limit (for a head that arrived whole, which h11
  does not measure), the body's size limit and its deadline, enforced while the handler reads it, so
  the 431, 413 or 408 goes through the app like any error (counted per route).
  Behind it, the protocol closes a connection whose body is still arriving a little after that deadline
  (a client trickling a body nobody reads any more, e.g. after a 401).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from gateway.http_models import code_for_http_status, error_body
from gateway.metrics import HttpConnectionMetrics
from gateway.settings import HttpLimits

logger = logging.getLogger(__name__)

# The body guard answers 408 at the body deadline; the protocol closes what is still sending this long after.
BODY_BACKSTOP_SLACK_S = 1.0
# Closing a socket with unread input makes the kernel answer with a reset, which can destroy the answer
# (a 408, a refused head) before the client reads it. So a connection whose client may still be sending
# is half-closed instead (the answer, then FIN) and what still arrives is dropped, for at most this long.
LINGER_S = 2.0
CLOSE = {"Connection": "close"}


class RequestBodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")


class RequestBodyTimeout(Exception):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"request body not received within {timeout_s:g}s")


def head_too_large(limit: int) -> str:
    return f"request line and headers exceed {limit} bytes"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code_for_http_status(status), message), status_code=status, headers=headers)


def head_bytes(scope: Scope) -> int:
    """The size of a request's line and headers as sent (near enough: the HTTP version is not kept)."""
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 1
    return len(scope["method"]) + target + 12 + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


class RequestGuard:
    """Refuses a head over `max_head_bytes` (431 RESOURCE_EXHAUSTED: h11 refuses only a head still
    incomplete beyond that size, not one that arrives whole), a body over `max_bytes` (413
    RESOURCE_EXHAUSTED, by Content-Length up front or while a chunked one is read) and a body not all
    in within `timeout_s` of the request's start (408 DEADLINE_EXCEEDED, with `Connection: close`: such
    a client is not waited for any longer). After a 413 or 431 the connection stays open: uvicorn reads
    and drops the rest of the body (a client that sends its whole body before reading the answer would
    otherwise see a reset instead of the answer), for as long as the body deadline allows."""

    def __init__(self, app: ASGIApp, max_head_bytes: int, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_head_bytes = max_head_bytes
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if head_bytes(scope) > self.max_head_bytes:
            await error_response(431, head_too_large(self.max_head_bytes))(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            if declared.isdigit():
                response = error_response(413, f"request body exceeds {self.max_bytes} bytes")
            else:
                response = error_response(400, "Content-Length is not a number")
            await response(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        received = 0
        body_done = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls wait for a disconnect, which has no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestBodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestBodyTooLarge(self.max_bytes)
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, guarded_receive, send)


def too_many_connections(limit: int, metrics: HttpConnectionMetrics) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        metrics.count_close("too_many_connections")
        response = error_response(
            503, f"the gateway already holds {limit} HTTP connections (its limit); retry shortly",
            {**CLOSE, "Retry-After": "1"},
        )
        await response(scope, receive, send)

    return app


class LingeringTransport:
    """The connection's transport as uvicorn sees it, except that `close()` is the protocol's
    `close_connection()`: a lingering close while the client may still be sending."""

    def __init__(self, transport: asyncio.Transport, protocol: GatewayHttpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.close_connection()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GatewayHttpProtocol(H11Protocol):
    """uvicorn's h11 protocol with the header deadline, the connection cap, the body backstop and JSON
    errors from the parser. Bound to its limits by `http_protocol_class`."""

    limits: HttpLimits
    metrics: HttpConnectionMetrics

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_timer_cycle: object = None
        self._socket_transport: asyncio.Transport | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._server_shutting_down = False
        self.lingering = False

    # ----------------------------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._socket_transport = transport
        self.transport = LingeringTransport(transport, self)  # type: ignore[assignment]
        self.metrics.open.inc()
        if len(self.connections) > self.limits.max_connections:
            # Its request (once its head is in, within the header deadline) gets a 503, then it closes.
            self.app = too_many_connections(self.limits.max_connections, self.metrics)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self.metrics.open.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # after the answer: read, and dropped
            return
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        self._update_timers()

    def shutdown(self) -> None:
        self._server_shutting_down = True  # no lingering: the server is waiting for its connections to go
        super().shutdown()

    def close_connection(self) -> None:
        """What closing the transport means here: at once when the client is not sending; else the
        answer already written, then FIN, then whatever arrives dropped until the client closes or
        `LINGER_S` has passed."""
        transport = self._socket_transport
        if transport is None or transport.is_closing() or self.lingering:
            return
        their_state = self.conn.their_state
        may_be_sending = their_state is h11.SEND_BODY or their_state is h11.ERROR or (
            their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        )
        if not may_be_sending or self._server_shutting_down or not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        self._cancel_head_timer()
        self._cancel_body_timer()
        transport.write_eof()
        transport.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, transport.close)

    # --------------------------------------------------------------------------------- timers

    def _update_timers(self) -> None:
        if self.transport.is_closing():
            return
        their_state = self.conn.their_state
        if their_state is h11.IDLE:
            # Waiting for a head. Between requests uvicorn's keep-alive timer bounds the idle wait and
            # the header deadline starts with the next request's first byte; but uvicorn drops its timer
            # for good when the rest of a body arrives after the response, so then the deadline starts now.
            if self._head_timer is None and (self.conn.trailing_data[0] or self.timeout_keep_alive_task is None):
                self._arm_head_timer()
            return
        self._cancel_head_timer()
        if their_state is h11.SEND_BODY:
            if self._body_timer_cycle is not self.cycle:
                self._cancel_body_timer()
                self._body_timer_cycle = self.cycle
                self._body_timer = self.loop.call_later(
                    self.limits.body_timeout_s + BODY_BACKSTOP_SLACK_S, self._on_body_timeout
                )
        else:
            self._cancel_body_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.metrics.count_close("header_timeout")
        if not self.conn.trailing_data[0]:
            logger.debug("closing an HTTP connection from %s that sent nothing", self._peer())
            self.transport.close()
            return
        message = f"request line and headers not received within {self.limits.header_timeout_s:g}s"
        logger.info("HTTP 408 to %s: %s", self._peer(), message)
        self._send_error_and_close(408, message)

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        self.metrics.count_close("body_timeout")
        logger.info(
            "closing the HTTP connection from %s: its request body was not all in within %gs",
            self._peer(), self.limits.body_timeout_s,
        )
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        if self._socket_transport is not None:  # no lingering: this client has had its time
            self._socket_transport.close()

    # --------------------------------------------------------------------------------- errors

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this, inside its `except h11.RemoteProtocolError`, when the parser refuses
        a request (uvicorn's own answer is plain text); the JSON error shape instead, with h11's status
        hint (431 for a head over `max_header_bytes`)."""
        error = sys.exception()
        status = getattr(error, "error_status_hint", 400) if isinstance(error, h11.RemoteProtocolError) else 400
        if status == 431:
            message = head_too_large(self.limits.max_header_bytes)
        else:
            message = f"malformed HTTP request: {error or msg}"
        self.metrics.count_close("malformed_request")
        self._send_error_and_close(status, message)

    def _send_error_and_close(self, status: int, message: str) -> None:
        response = error_response(status, message, CLOSE)
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers.items()]
        try:
            output = self.conn.send(h11.Response(status_code=status, headers=headers))
            output += self.conn.send(h11.Data(data=bytes(response.body)))
            output += self.conn.send(h11.EndOfMessage())
            self.transport.write(output)
        except h11.LocalProtocolError:  # a response was already under way: closing is all that is left
            pass
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def http_protocol_class(limits: HttpLimits, metrics: HttpConnectionMetrics) -> type[GatewayHttpProtocol]:
    """`GatewayHttpProtocol` bound to these limits and metrics: what uvicorn's `Config(http=...)` takes."""
    return type("BoundGatewayHttpProtocol", (GatewayHttpProtocol,), {"limits": limits, "metrics": metrics})

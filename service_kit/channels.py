"""Outbound gRPC channels: retries on UNAVAILABLE only, with exponential backoff, done by gRPC itself.
Deadlines are per call (`timeout=`), set by the caller. A service passes its `tracing`, so its calls
carry the request's trace context (and get client spans) when tracing is on."""

from __future__ import annotations

import json

import grpc

from service_kit.tracing import ServiceTracing


def retry_service_config(attempts: int = 4, initial_backoff_s: float = 0.05, max_backoff_s: float = 1.0) -> str:
    return json.dumps({
        # Spread calls over every address the name resolves to (a headless Service lists each pod),
        # rather than pinning one connection to one pod.
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": max(2, min(attempts, 5)),
                "initialBackoff": f"{initial_backoff_s}s",
                "maxBackoff": f"{max_backoff_s}s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    })


def create_channel(
    target: str, *, max_message_bytes: int = 64 * 1024 * 1024, retry_attempts: int = 4,
    tracing: ServiceTracing | None = None,
) -> grpc.aio.Channel:
    options = [
        ("grpc.service_config", retry_service_config(retry_attempts)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        # Reconnect quickly after a restart of the peer, instead of gRPC's default of up to 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    # No interceptor at all when tracing is off: grpc.aio's intercepted calls cost an extra task each.
    interceptors = tracing.client_interceptors(target) if tracing is not None else []
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors or None)

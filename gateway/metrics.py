"""The gateway's own Prometheus metrics, registered in its server's registry (beside service_kit's
gRPC ones): the query cache's, the shared index generation's, the HTTP API's and its connections', the
downstreams' readiness, copy searches' verifications, and the refusals of API keys and rate limits."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service_kit.metrics import LATENCY_BUCKETS

CACHE_KINDS = ("embedding", "result")
# Why the gateway itself closed an HTTP connection (see gateway/http_limits.py).
CONNECTION_CLOSE_REASONS = ("header_timeout", "body_timeout", "malformed_request", "too_many_connections")


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(
            "vsearch_gateway_cache_hits", "Gateway cache hits, by cache (embedding|result).",
            ["cache"], registry=registry,
        )
        self.misses = Counter(
            "vsearch_gateway_cache_misses", "Gateway cache misses, by cache (embedding|result).",
            ["cache"], registry=registry,
        )
        self.errors = Counter(
            "vsearch_gateway_cache_errors",
            "Cache store calls that failed or timed out (each served as a miss / skipped write).",
            registry=registry,
        )
        self.writes_skipped = Counter(
            "vsearch_gateway_cache_writes_skipped",
            "Background cache writes not made because too many were still in flight (a slow cache store).",
            registry=registry,
        )
        # Exported at 0 from the start, so a hit ratio is defined before the first search.
        for kind in CACHE_KINDS:
            self.hits.labels(kind)
            self.misses.labels(kind)

    def count_lookup(self, kind: str, hit: bool) -> None:
        (self.hits if hit else self.misses).labels(kind).inc()


class GenerationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.bumps = Counter(
            "vsearch_gateway_generation_bumps",
            "Shared index generation bumps after writes, by outcome (ok|failed: retried in the background).",
            ["outcome"], registry=registry,
        )
        self.pending = Gauge(
            "vsearch_gateway_generation_bumps_pending",
            "Collections written through this gateway whose generation bump has not landed yet: their "
            "cached results are not served here, and other gateways may serve ones older than the write.",
            registry=registry,
        )
        for outcome in ("ok", "failed"):
            self.bumps.labels(outcome)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "vsearch_http_requests", "HTTP requests handled, by route and status.",
            ["method", "route", "status"], registry=registry,
        )
        self.latency = Histogram(
            "vsearch_http_latency_seconds", "HTTP request latency, by route.",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class HttpConnectionMetrics:
    """What happens below the requests: open connections, and those the gateway closed because a client
    broke a limit (these never reach a route, so `vsearch_http_requests` cannot count them)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge("vsearch_http_open_connections", "HTTP connections open now.", registry=registry)
        self.closed = Counter(
            "vsearch_http_connections_closed",
            "HTTP connections the gateway closed for a client's fault, by reason "
            "(header_timeout|body_timeout|malformed_request|too_many_connections).",
            ["reason"], registry=registry,
        )
        for reason in CONNECTION_CLOSE_REASONS:
            self.closed.labels(reason)

    def count_close(self, reason: str) -> None:
        self.closed.labels(reason).inc()


class DownstreamMetrics:
    def __init__(self, registry: CollectorRegistry, names: tuple[str, ...]) -> None:
        self.available = Gauge(
            "vsearch_gateway_downstream_available",
            "1 while a downstream service (embedder|search) has answered its health check SERVING within "
            "the grace period, else 0 (also before the gateway's startup saw it); NOT_SERVING while any is 0.",
            ["downstream"], registry=registry,
        )
        for name in names:
            self.available.labels(name)

    def set_available(self, name: str, available: bool) -> None:
        self.available.labels(name).set(1 if available else 0)


class AuthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.refused = Counter(
            "vsearch_gateway_auth_refused",
            "Requests refused for their API key, by reason (unauthenticated: none or a wrong one; "
            "permission_denied: outside its scopes).",
            ["reason"], registry=registry,
        )
        for reason in ("unauthenticated", "permission_denied"):
            self.refused.labels(reason)


class CopySearchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.candidates = Counter(
            "vsearch_gateway_copy_candidates",
            "Copy-mode shortlist hits verified by the embedder (VerifyCopies), by verdict (copy|no_copy): "
            "what copy searches cost beyond a similar search.",
            ["verdict"], registry=registry,
        )
        for verdict in ("copy", "no_copy"):
            self.candidates.labels(verdict)
        self.ingest_copies = Counter(
            "vsearch_gateway_ingest_copies",
            "New AddImages items found to be copies by the ON_COPY_FLAG / ON_COPY_SKIP check, by action "
            "(flagged|skipped).",
            ["action"], registry=registry,
        )
        for action in ("flagged", "skipped"):
            self.ingest_copies.labels(action)

    def count(self, copies: int, candidates: int) -> None:
        self.candidates.labels("copy").inc(copies)
        self.candidates.labels("no_copy").inc(candidates - copies)

    def count_ingest_copy(self, skipped: bool) -> None:
        self.ingest_copies.labels("skipped" if skipped else "flagged").inc()


class RateLimitMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.limited = Counter(
            "vsearch_gateway_rate_limited",
            "Requests refused for a rate limit, by API key name and limit (search|write).",
            ["key", "kind"], registry=registry,
        )
        self.redis_errors = Counter(
            "vsearch_gateway_rate_limit_redis_errors",
            "Rate-limit decisions Redis failed to make in time (each made in this process instead).",
            registry=registry,
        )

"""The gateway's own Prometheus metrics, registered in its server's registry (beside service_kit's
gRPC ones): the query cache's and the HTTP API's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from service_kit.metrics import LATENCY_BUCKETS

CACHE_KINDS = ("embedding", "result")


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

"""The search service's own Prometheus metrics, registered in its server's registry (beside the RPC
ones). Both backends report under the same names with a `backend` label, so dashboards and the
benchmarks read one set of names whichever backend runs."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service_kit.metrics import LATENCY_BUCKETS

INDEX_BUILD_BUCKETS = (0.1, 1, 10, 60, 300, 1800)


def store_queue_seconds(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "vsearch_store_queue_seconds", "Time requests waited for a free store worker thread.",
        buckets=LATENCY_BUCKETS, registry=registry,
    )


class StoreMetrics:
    """What one store backend (`faiss` or `milvus`) reports; every sample carries that name."""

    def __init__(self, backend: str, registry: CollectorRegistry) -> None:
        self.backend = backend
        self._call_seconds = Histogram(
            "vsearch_store_call_seconds", "Time spent in store operations, by backend and operation.",
            ["backend", "operation"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self._errors = Counter(
            "vsearch_store_errors", "Failed store operations, by backend, operation and the status code answered.",
            ["backend", "operation", "code"], registry=registry,
        )
        # FAISS only: Milvus filters and builds its indexes itself.
        self._filter_cache = Counter(
            "vsearch_store_filter_cache", "Filtered searches whose allowed items came from the cache, or not.",
            ["backend", "result"], registry=registry,
        )
        self._feature_index_items = Gauge(
            "vsearch_store_feature_index_items",
            "Items in a collection's in-memory descriptor index (copy search's feature candidates; about 16 KiB each, 19 on Milvus with ids and write times).",
            ["backend", "collection"], registry=registry,
        )
        self._index_builds = Histogram(
            "vsearch_store_index_build_seconds", "Time to build a collection's index from its stored items.",
            ["backend", "index"], buckets=INDEX_BUILD_BUCKETS, registry=registry,
        )

    def observe_call(self, operation: str, seconds: float) -> None:
        self._call_seconds.labels(self.backend, operation).observe(seconds)

    def count_error(self, operation: str, code: str) -> None:
        self._errors.labels(self.backend, operation, code).inc()

    def count_filter_cache(self, hit: bool) -> None:
        self._filter_cache.labels(self.backend, "hit" if hit else "miss").inc()

    def observe_index_build(self, index: str, seconds: float) -> None:
        self._index_builds.labels(self.backend, index).observe(seconds)

    def set_feature_index_items(self, collection: str, items: int) -> None:
        self._feature_index_items.labels(self.backend, collection).set(items)

    def forget_feature_index(self, collection: str) -> None:
        """A dropped collection's gauge goes, rather than showing its last size."""
        try:
            self._feature_index_items.remove(self.backend, collection)
        except KeyError:
            pass

"""The embedder's own Prometheus metrics, registered in its server's registry (beside the RPC ones)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class EmbedderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "vsearch_embedder_batch_size", "Images per inference run (micro-batch size).",
            buckets=BATCH_SIZE_BUCKETS, registry=registry,
        )
        self.inference_seconds = Histogram(
            "vsearch_embedder_inference_seconds", "Time of one inference run, whole batch.",
            buckets=INFERENCE_BUCKETS, registry=registry,
        )
        self.lone_runs = Counter(
            "vsearch_embedder_lone_runs", "Images run at once, as a batch of one, on the thread that decoded "
            "them (nothing else was queued or running).", registry=registry,
        )
        self.images_embedded = Counter(
            "vsearch_embedder_images_embedded", "Images turned into embeddings.", registry=registry,
        )
        self.images_failed = Counter(
            "vsearch_embedder_images_failed", "Images that got a per-item error, by status code.",
            ["code"], registry=registry,
        )

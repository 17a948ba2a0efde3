"""A typed Python client of the gateway's gRPC API (service vsearch.v1.VisualSearch), sync and asyncio.

    from vsearch.client import VisualSearchClient

    with VisualSearchClient("127.0.0.1:50051", api_key="vs_...") as client:
        for hit in client.search("shoe.jpg", k=5, where={"category": "shoes"}).hits:
            print(hit.score, hit.id, hit.metadata)

Both clients share the requests they build and the results they read (messages.py); they differ only in
how they call (sync_client.py, async_client.py). Deadlines and retries: calls.py. Errors: errors.py.
Guide: docs/client.md."""

from vsearch.client.async_client import AsyncVisualSearchClient
from vsearch.client.calls import NO_RETRIES, RetryEvent, RetryPolicy
from vsearch.client.errors import (
    DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, RateLimited, Unauthenticated,
    Unavailable, VsearchError,
)
from vsearch.client.messages import ON_COPY_POLICIES, OPERATORS, SEARCH_MODES
from vsearch.client.sync_client import VisualSearchClient
from vsearch.client.types import (
    AddItem, AddSummary, Box, CatalogImage, CollectionInfo, CollectionStats, DeleteResult, DropResult, FieldSummary,
    Hit, IngestCopy, ItemFailure, SearchQuery, SearchResult, Timing, ValueCount,
)

__all__ = [
    "AddItem", "AddSummary", "AsyncVisualSearchClient", "Box", "CatalogImage", "CollectionInfo", "CollectionStats",
    "DeadlineExceeded", "DeleteResult", "DropResult", "FailedPrecondition", "FieldSummary", "Hit", "IngestCopy",
    "InvalidArgument", "ItemFailure", "NO_RETRIES", "NotFound", "ON_COPY_POLICIES", "OPERATORS", "PermissionDenied",
    "RateLimited", "RetryEvent", "RetryPolicy", "SEARCH_MODES", "SearchQuery", "SearchResult", "Timing",
    "Unauthenticated", "Unavailable", "ValueCount", "VisualSearchClient", "VsearchError",
]

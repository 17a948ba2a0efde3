"""What the servicer needs from a backend (Milvus or in-process FAISS), and the parts both share.

Every method blocks; the servicer calls them from its bounded executor only, and a failure comes
back as a `ServiceError` with a precise status code. Rows are the item codec's (`item_codec.Row`,
ids in stored form). A search answers, per query, its hits as `StoreHit`s. Copy features are read
only when a call asks for them (`include_copy_features`): they can be as large as the rest of an item.

Regions (`columns.REGIONS`): a collection either has them or not; the first upsert that carries some
turns them on. A store keeps them as rows of their own tied to their item, searches them beside the
full views, answers one hit per item (its best vector, `StoreHit.region` saying which region when one
beat the full view), and removes them with their item (delete, or an upsert that replaces it).
Counts are of items."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import grpc
import numpy as np

from search_svc.field_summaries import FieldSummary
from search_svc.filters import FilterCondition
from search_svc.item_codec import Box, Row
from search_svc.settings import COLLECTION_NAME
from service_kit.status import ServiceError


@dataclass(slots=True)
class StoreHit:
    """One hit of a search, as a store found it."""

    id: str  # stored form (item_codec.encode_id)
    score: float  # inner product with the query
    image_uri: str
    metadata: str | dict | None  # JSON text (FAISS), or decoded by pymilvus
    copy_features: bytes = b""  # only when the search asked for them
    region: Box | None = None  # the region that matched; None: the full view
    content_sha256: str = ""  # with the copy features


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """One collection a store holds: its name, its item count and whether it has regions."""

    name: str
    count: int
    regions: bool


@dataclass(frozen=True, slots=True)
class VectorMatch:
    """One row a vector search found: the item's stored id, the score, and the region's box (None for
    the item's full view)."""

    item_id: str
    score: float
    region: Box | None


def best_per_item(matches: Sequence[VectorMatch], k: int) -> list[VectorMatch]:
    """The best match of each item, best first (ties by id), at most k: one hit per item."""
    best: dict[str, VectorMatch] = {}
    for match in matches:
        kept = best.get(match.item_id)
        if kept is None or match.score > kept.score or (match.score == kept.score and kept.region is not None
                                                          and match.region is None):
            best[match.item_id] = match
    return sorted(best.values(), key=lambda match: (-match.score, match.item_id))[:k]


def over_fetch(k: int, regions_per_item: int, limit: int) -> int:
    """Rows to ask a vector search for so that, grouped per item, they still hold k distinct items
    (each item has at most 1 + regions_per_item rows), within the backend's `limit`."""
    return min(k * (1 + regions_per_item), limit)


class VectorStore(Protocol):
    default_collection: str
    index_type: str

    def open(self) -> None:
        """Connects (or loads), creates the default collection or checks it against the settings."""

    def close(self) -> None: ...

    def require_connected(self) -> None:
        """UNAVAILABLE until `open` has succeeded."""

    def require_collection(self, name: str) -> None:
        """NOT_FOUND unless collection `name` exists."""

    def upsert(self, collection: str, rows: Sequence[Row]) -> None:
        """Creates the collection when missing; replaces items with the same ids."""

    def search(
        self, collection: str, vectors: np.ndarray, k: int, conditions: Sequence[FilterCondition],
        include_copy_features: bool = False,
    ) -> list[list[StoreHit]]: ...

    def feature_matches(
        self, collection: str, descriptors: np.ndarray, vector: np.ndarray, count: int,
        conditions: Sequence[FilterCondition], exclude_ids: set[str], include_copy_features: bool = False,
    ) -> list[StoreHit]:
        """Up to `count` items outside `exclude_ids` (stored ids) whose copy features share the most local
        descriptors ([n, 32] uint8) with a copy search's query, most first, scored by cosine with
        `vector`; [] for a store without a descriptor index."""

    def get(
        self, collection: str, stored_ids: Sequence[str], include_vectors: bool, include_copy_features: bool = False
    ) -> list[dict]:
        """Rows for those ids that exist (none when the collection does not); `columns.COPY_FEATURES` as
        raw bytes when asked."""

    def existing_ids(self, collection: str, stored_ids: Sequence[str]) -> list[str]: ...

    def list_page(
        self, collection: str, after: str, limit: int, include_vectors: bool, include_copy_features: bool
    ) -> list[dict]:
        """At most `limit` rows whose stored id is greater than `after` ("": from the start), ordered by
        stored id, with the same columns as `get`; NOT_FOUND when the collection does not exist."""

    def delete(self, collection: str, stored_ids: Sequence[str]) -> None: ...

    def drop(self, collection: str) -> bool:
        """Drops a collection other than the default; False when it did not exist."""

    def count(self, collection: str) -> int:
        """Items, not rows: an item's regions do not count."""

    def has_regions(self, collection: str) -> bool:
        """Whether the collection's items are indexed with regions; NOT_FOUND when it does not exist."""

    def regions_known(self, collection: str) -> bool:
        """`has_regions` as this process last knew it, without blocking (False when it does not know)."""

    def collections(self) -> list[CollectionInfo]:
        """Every collection of items the store holds (never one of its own helpers, such as Milvus's
        regions collections), in any order; one dropped meanwhile may be left out."""

    def field_summaries(self, collection: str) -> list[FieldSummary]:
        """What each filterable field holds across the collection's items, in the settings' order (see
        search_svc/field_summaries.py); NOT_FOUND when the collection does not exist."""


def collection_name(requested: str, default: str) -> str:
    """The collection a request names; empty means the default one."""
    if not requested:
        return default
    if not COLLECTION_NAME.match(requested):
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"collection name {requested[:80]!r} is invalid: use a letter or '_', then letters, digits or '_' "
            "(at most 255)",
        )
    return requested


def refuse_dropping_default(collection: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"collection {collection!r} is the service's default collection and is never dropped through the API",
    )

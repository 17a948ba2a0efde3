"""What the servicer needs from a backend (Milvus or in-process FAISS), and the parts both share.

Every method blocks; the servicer calls them from its bounded executor only, and a failure comes
back as a `ServiceError` with a precise status code. Rows are the item codec's (`item_codec.Row`,
ids in stored form). A search answers, per query, its hits as `StoreHit`s. Copy features are read
only when a call asks for them (`include_copy_features`): they can be as large as the rest of an item."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import grpc
import numpy as np

from search_svc.filters import FilterCondition
from search_svc.item_codec import Row
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

    def count(self, collection: str) -> int: ...


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

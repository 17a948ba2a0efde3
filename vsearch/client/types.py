"""What the client takes and gives back: plain, typed dataclasses instead of protobuf messages
(metadata as dicts, unset optional fields as None, status codes as grpc.StatusCode). Each result has
`to_dict()`: JSON-ready (status codes by name)."""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import grpc

# An image: its encoded bytes, or the path of a file holding them.
ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike]
# A filter: conditions (field, op, value), a dict of field -> value (equality; a list or tuple value
# means "in"), or a vsearch.v1.search_pb2.Filter as it is.
FilterSpec = Union[Sequence[Sequence[Any]], Mapping[str, Any], Any]


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (nested records as dicts, status codes by name)."""
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]


@dataclass(frozen=True)
class Box(_Record):
    """A rectangle in pixels: a query's crop, a copy's matched_box, a hit's matched_region."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def of(cls, value: Box | Sequence[int]) -> Box:
        """A Box as it is, or one from (x, y, width, height)."""
        if isinstance(value, Box):
            return value
        x, y, width, height = value
        return cls(int(x), int(y), int(width), int(height))


@dataclass(frozen=True)
class SearchQuery:
    """One search: exactly one of `image` (bytes or a file path), `item_id` (an indexed item's stored
    vector) or `text` (words, for models that can), and the rest as VisualSearchRequest's fields.

    `crop` goes with `image` only: (x, y, width, height) in the image's pixels. `k` unset is the gateway's
    default (10). `where` filters: [("category", "==", "shoes"), ("price", "<", 50)] (every condition
    holds), or {"category": "shoes"} for equality. `mode` is "similar" or "copy". `page_token` is a
    previous SearchResult's next_page_token, for the next page of the same query."""

    image: ImageSource | None = None
    crop: Box | Sequence[int] | None = None
    item_id: str | None = None
    text: str | None = None
    k: int | None = None
    where: FilterSpec | None = None
    min_score: float | None = None
    min_probability: float | None = None
    collection: str = ""
    mode: str = "similar"
    page_token: str = ""


@dataclass(frozen=True)
class Hit(_Record):
    id: str
    score: float
    image_uri: str
    metadata: dict[str, Any]
    # The calibrated probability that the hit is relevant; None when the model has no calibration.
    match_probability: float | None = None
    # Copy mode only (None otherwise): the query is a copy of (a part of) this image, and how surely.
    is_copy: bool | None = None
    copy_score: float | None = None
    # Copy mode, copies only: where the query lies inside this image.
    matched_box: Box | None = None
    # Collections with regions: the part of this image that matched best, when a region beat the whole.
    matched_region: Box | None = None


@dataclass(frozen=True)
class Timing(_Record):
    embed_ms: float = 0.0
    search_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class SearchResult(_Record):
    hits: list[Hit]
    # Give it as page_token (with the same query) for the next hits; "" when there are none.
    next_page_token: str = ""
    index_generation: int = 0
    from_cache: bool = False
    embedding_from_cache: bool = False
    model_version: str = ""
    no_good_match: bool = False
    no_match_reason: str = ""
    understood_as: str = ""
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True)
class AddItem:
    """One image to add: its bytes or file path, an optional id (default: the sha256 of the bytes),
    metadata, and an image URI (default for a path: its file:// URI)."""

    image: ImageSource
    id: str = ""
    metadata: Mapping[str, Any] | None = None
    image_uri: str = ""


@dataclass(frozen=True)
class ItemFailure(_Record):
    id: str
    code: grpc.StatusCode
    message: str
    # 0-based position of the item in the stream.
    index: int


@dataclass(frozen=True)
class IngestCopy(_Record):
    id: str
    index: int
    copy_of: str
    copy_score: float
    skipped: bool


@dataclass(frozen=True)
class AddSummary(_Record):
    """received = indexed + unchanged + failed + skipped_copies."""

    received: int
    indexed: int
    unchanged: int
    failed: int
    failures: list[ItemFailure]
    index_generation: int
    copies: list[IngestCopy]
    skipped_copies: int


@dataclass(frozen=True)
class DeleteResult(_Record):
    deleted: int
    index_generation: int


@dataclass(frozen=True)
class ValueCount(_Record):
    value: str
    count: int


@dataclass(frozen=True)
class FieldSummary(_Record):
    """What one filterable field holds: top values (string and bool fields) or a range (numbers)."""

    name: str
    type: str
    present: int
    top_values: list[ValueCount]
    more_values: bool
    min: float | None
    max: float | None


@dataclass(frozen=True)
class CollectionStats(_Record):
    count: int
    index_type: str
    metric: str
    index_generation: int
    dimension: int
    model_name: str
    model_version: str
    filterable_fields: list[str]
    # "" when the model cannot search by words, else how ("classifier", "dual_encoder").
    text_search: str
    calibrated: bool
    regions: bool
    # With stats(field_summaries=True) only; empty otherwise.
    field_summaries: list[FieldSummary]


@dataclass(frozen=True)
class CollectionInfo(_Record):
    name: str
    count: int
    is_default: bool
    regions: bool


@dataclass(frozen=True)
class DropResult(_Record):
    # False when no such collection existed.
    dropped: bool
    index_generation: int


@dataclass(frozen=True)
class CatalogImage(_Record):
    id: str
    content_sha256: str
    image_uri: str
    metadata: dict[str, Any]

"""Requests built from the client's arguments and typed results read from the answers: pure functions,
written once and shared by the sync and the asyncio client (which differ only in how they call).
Obviously wrong arguments (an unknown operator, mode or on_copy policy, two queries in one) raise
ValueError here; everything else is the gateway's to judge."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format, struct_pb2

from vsearch.client.errors import VsearchError, error_for, status_code
from vsearch.client.types import (
    AddItem, AddSummary, Box, CatalogImage, CollectionInfo, CollectionStats, DeleteResult, DropResult,
    FieldSummary, FilterSpec, Hit, ImageSource, IngestCopy, ItemFailure, SearchQuery, SearchResult, Timing,
    ValueCount,
)
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2

OPERATORS: dict[str, int] = {
    "==": search_pb2.EQ, "!=": search_pb2.NE, "<": search_pb2.LT, "<=": search_pb2.LE,
    ">": search_pb2.GT, ">=": search_pb2.GE, "in": search_pb2.IN, "not_in": search_pb2.NOT_IN,
}
SEARCH_MODES: dict[str, int] = {"similar": gateway_pb2.SEARCH_MODE_SIMILAR, "copy": gateway_pb2.SEARCH_MODE_COPY}
ON_COPY_POLICIES: dict[str, int] = {
    "keep": gateway_pb2.ON_COPY_KEEP, "flag": gateway_pb2.ON_COPY_FLAG, "skip": gateway_pb2.ON_COPY_SKIP,
}


# ---- images --------------------------------------------------------------------------------------

def is_path(source: ImageSource) -> bool:
    return isinstance(source, (str, os.PathLike))


def read_image(source: ImageSource) -> bytes:
    """The image's bytes: as given, or read from the file a str or path names (OSError if it cannot be)."""
    if is_path(source):
        return Path(source).read_bytes()  # type: ignore[arg-type]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    raise TypeError(f"an image is bytes or a file path, not {type(source).__name__}")


# ---- filters -------------------------------------------------------------------------------------

def struct_value(value: Any) -> struct_pb2.Value:
    """A Python value (str, number, bool, None, list, dict) as a google.protobuf.Value."""
    if isinstance(value, struct_pb2.Value):
        return value
    converted = struct_pb2.Value()
    try:
        json_format.ParseDict(list(value) if isinstance(value, tuple) else value, converted)
    except json_format.ParseError as error:
        raise ValueError(f"value {value!r} cannot be sent: {error}") from None
    return converted


def _operator(op: Any, field: str) -> int:
    if isinstance(op, str) and op in OPERATORS:
        return OPERATORS[op]
    if isinstance(op, int) and not isinstance(op, bool) and op in OPERATORS.values():
        return op
    raise ValueError(f"unknown operator {op!r} for field {field!r}; use one of {', '.join(OPERATORS)}")


def build_filter(where: FilterSpec | None) -> search_pb2.Filter | None:
    """A Filter from conditions [(field, op, value), ...], a dict {field: value} (equality; a list or
    tuple value means "in"), or a search_pb2.Filter (as it is). None for no filter."""
    if where is None:
        return None
    if isinstance(where, search_pb2.Filter):
        return where
    if isinstance(where, Mapping):
        conditions: Iterable[Any] = [
            (field, "in" if isinstance(value, (list, tuple)) else "==", value) for field, value in where.items()]
    elif isinstance(where, (str, bytes)) or not isinstance(where, Iterable):
        raise ValueError(f"a filter is conditions [(field, op, value), ...] or a dict of field -> value, "
                         f"not {type(where).__name__}")
    else:
        conditions = where
    result = search_pb2.Filter()
    for condition in conditions:
        if isinstance(condition, search_pb2.Condition):
            result.conditions.append(condition)
            continue
        if isinstance(condition, (str, bytes)) or not isinstance(condition, Sequence) or len(condition) != 3:
            raise ValueError(f"a filter condition is (field, op, value), got {condition!r}")
        field, op, value = condition
        if not isinstance(field, str):
            raise ValueError(f"a filter condition's field is a name, got {field!r}")
        result.conditions.append(search_pb2.Condition(field=field, op=_operator(op, field), value=struct_value(value)))
    return result


# ---- search --------------------------------------------------------------------------------------

def search_query(query: SearchQuery | ImageSource | None = None, **fields: Any) -> SearchQuery:
    """A SearchQuery from search()'s arguments: one with `query` as its image, or a SearchQuery as it
    is, with the fields given other than their defaults replacing its own."""
    if isinstance(query, SearchQuery):
        defaults = SearchQuery.__dataclass_fields__
        changed = {name: value for name, value in fields.items() if value is not defaults[name].default
                   and value != defaults[name].default}
        return dataclasses.replace(query, **changed) if changed else query
    return SearchQuery(image=query, **fields)


def query_kind(query: SearchQuery) -> str:
    """Which of image, item_id and text the query searches by (exactly one, else ValueError)."""
    given = [name for name in ("image", "item_id", "text") if getattr(query, name) is not None]
    if len(given) != 1:
        raise ValueError("a search needs exactly one of image, item_id or text"
                         + (f"; got {' and '.join(given)}" if given else ""))
    return given[0]


def search_request(query: SearchQuery, image: bytes | None = None) -> gateway_pb2.VisualSearchRequest:
    """The request for `query`; `image` is its image's bytes (read_image(query.image)) for an image query."""
    kind = query_kind(query)
    mode = query.mode
    if isinstance(mode, str):
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")
        mode = SEARCH_MODES[mode]
    request = gateway_pb2.VisualSearchRequest(collection=query.collection, mode=mode, page_token=query.page_token)
    if kind == "image":
        if image is None:
            raise ValueError("an image query needs the image's bytes")
        request.image = image
    elif kind == "item_id":
        request.item_id = query.item_id  # type: ignore[assignment]
    else:
        request.text = query.text  # type: ignore[assignment]
    if query.crop is not None:
        box = Box.of(query.crop)
        request.crop.CopyFrom(embedder_pb2.CropBox(x=box.x, y=box.y, width=box.width, height=box.height))
    if query.k is not None:
        request.k = query.k
    conditions = build_filter(query.where)
    if conditions is not None:
        request.filter.CopyFrom(conditions)
    if query.min_score is not None:
        request.min_score = query.min_score
    if query.min_probability is not None:
        request.min_probability = query.min_probability
    return request


def metadata_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(struct)


def _box(message: Any, present: bool) -> Box | None:
    return Box(message.x, message.y, message.width, message.height) if present else None


def hit_of(hit: gateway_pb2.SearchHit) -> Hit:
    return Hit(
        id=hit.id, score=hit.score, image_uri=hit.image_uri, metadata=metadata_dict(hit.metadata),
        match_probability=hit.match_probability if hit.HasField("match_probability") else None,
        is_copy=hit.is_copy if hit.HasField("is_copy") else None,
        copy_score=hit.copy_score if hit.HasField("copy_score") else None,
        matched_box=_box(hit.matched_box, hit.HasField("matched_box")),
        matched_region=_box(hit.matched_region, hit.HasField("matched_region")),
    )


def search_result(response: gateway_pb2.VisualSearchResponse) -> SearchResult:
    timing = response.timing
    return SearchResult(
        hits=[hit_of(hit) for hit in response.hits], next_page_token=response.next_page_token,
        index_generation=response.index_generation, from_cache=response.from_cache,
        embedding_from_cache=response.embedding_from_cache, model_version=response.model_version,
        no_good_match=response.no_good_match, no_match_reason=response.no_match_reason,
        understood_as=response.understood_as,
        timing=Timing(embed_ms=timing.embed_ms, search_ms=timing.search_ms, total_ms=timing.total_ms),
    )


def batch_results(response: gateway_pb2.VisualSearchBatchResponse) -> list[SearchResult | VsearchError]:
    """One entry per query, in order: its SearchResult, or (not raised) the error it failed with."""
    return [search_result(result.response) if result.code == 0 else error_for(status_code(result.code), result.message)
            for result in response.results]


# ---- adding and deleting -------------------------------------------------------------------------

def add_item(value: AddItem | ImageSource | Mapping[str, Any]) -> AddItem:
    """An AddItem from what add() accepts: an AddItem, image bytes or a file path, or a dict of
    AddItem's fields."""
    if isinstance(value, AddItem):
        return value
    if isinstance(value, Mapping):
        return AddItem(**value)
    return AddItem(image=value)


def add_request(item: AddItem, image: bytes, *, first: bool, collection: str, on_copy: str,
                regions: bool) -> gateway_pb2.AddImageRequest:
    """One message of an AddImages stream (`image`: read_image(item.image)). The stream's collection,
    on_copy and regions ride on its first message."""
    if on_copy not in ON_COPY_POLICIES:
        raise ValueError(f"unknown on_copy policy {on_copy!r}; use one of {', '.join(ON_COPY_POLICIES)}")
    image_uri = item.image_uri or (Path(item.image).resolve().as_uri() if is_path(item.image) else "")  # type: ignore[arg-type]
    request = gateway_pb2.AddImageRequest(id=item.id, image=image, image_uri=image_uri)
    if item.metadata:
        try:
            request.metadata.update(dict(item.metadata))
        except (ValueError, TypeError) as error:
            raise ValueError(f"item {item.id or image_uri or '(no id)'}: metadata cannot be sent: {error}") from None
    if first:
        request.collection = collection
        request.on_copy = ON_COPY_POLICIES[on_copy]
        request.regions = regions
    return request


def add_summary(reply: gateway_pb2.AddImagesSummary) -> AddSummary:
    return AddSummary(
        received=reply.received, indexed=reply.indexed, unchanged=reply.unchanged, failed=reply.failed,
        failures=[ItemFailure(failure.id, status_code(failure.code), failure.message, failure.index)
                  for failure in reply.failures],
        index_generation=reply.index_generation,
        copies=[IngestCopy(found.id, found.index, found.copy_of, found.copy_score, found.skipped)
                for found in reply.copies],
        skipped_copies=reply.skipped_copies,
    )


def delete_request(ids: Iterable[str], collection: str) -> gateway_pb2.DeleteImagesRequest:
    if isinstance(ids, str):
        raise ValueError("ids is a list of ids, not one string")
    return gateway_pb2.DeleteImagesRequest(ids=list(ids), collection=collection)


def delete_result(reply: gateway_pb2.DeleteImagesResponse) -> DeleteResult:
    return DeleteResult(deleted=reply.deleted, index_generation=reply.index_generation)


# ---- the catalog ---------------------------------------------------------------------------------

def field_summary(summary: search_pb2.FieldSummary) -> FieldSummary:
    return FieldSummary(
        name=summary.name, type=summary.type, present=summary.present,
        top_values=[ValueCount(value.value, value.count) for value in summary.top_values],
        more_values=summary.more_values,
        min=summary.min if summary.HasField("min") else None, max=summary.max if summary.HasField("max") else None,
    )


def collection_stats(reply: gateway_pb2.VisualStatsResponse) -> CollectionStats:
    return CollectionStats(
        count=reply.count, index_type=reply.index_type, metric=reply.metric, index_generation=reply.index_generation,
        dimension=reply.dimension, model_name=reply.model_name, model_version=reply.model_version,
        filterable_fields=list(reply.filterable_fields), text_search=reply.text_search, calibrated=reply.calibrated,
        regions=reply.regions, field_summaries=[field_summary(summary) for summary in reply.field_summaries],
    )


def collection_infos(reply: search_pb2.ListCollectionsResponse) -> list[CollectionInfo]:
    return [CollectionInfo(entry.name, entry.count, entry.is_default, entry.regions) for entry in reply.collections]


def drop_result(reply: search_pb2.DropCollectionResponse) -> DropResult:
    return DropResult(dropped=reply.dropped, index_generation=reply.generation)


def catalog_image(image: gateway_pb2.CatalogImage) -> CatalogImage:
    return CatalogImage(id=image.id, content_sha256=image.content_sha256, image_uri=image.image_uri,
                        metadata=metadata_dict(image.metadata))

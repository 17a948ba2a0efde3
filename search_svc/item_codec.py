"""Validation and conversion between the protobuf messages and the rows and hits of a store.

Everything a caller sends is checked here, before anything reaches a store, so that bad input is an
INVALID_ARGUMENT naming the item and field, and a rejected request writes nothing."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
from google.protobuf import json_format, struct_pb2

from search_svc import columns
from search_svc.filters import has_control_chars
from search_svc.settings import FieldType
from service_kit.copy_feature_codec import without_mirrored_set
from service_kit.status import invalid_argument
from service_kit.struct_nesting import MAX_STRUCT_DEPTH, struct_depth
from vsearch.v1 import search_pb2

if TYPE_CHECKING:
    from search_svc.vector_store import StoreHit

Row = dict[str, Any]
# x, y, width, height in pixels of the item's image.
Box = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Region:
    """A part of an item's image and its vector (a row's `columns.REGIONS` holds a list of them)."""

    box: Box
    vector: np.ndarray

# Milvus Lite 2.5.1 builds SQL from primary keys without escaping: an upsert of an id with a single
# quote fails, and ids with control characters cannot be written in a filter literal (see
# milvus_expressions.py). So ids are stored with '%', "'" and control characters percent-encoded;
# every other id is stored as is. Callers only ever see the original ids. (Ids with control
# characters are refused now; stores written before may still hold some, encoded.)
_ID_CHARS_TO_ENCODE = re.compile(r"[%'\x00-\x1f\x7f]")
_ENCODED_ID_CHAR = re.compile(r"%([0-9A-F]{2})")


def encode_id(item_id: str) -> str:
    return _ID_CHARS_TO_ENCODE.sub(lambda match: f"%{ord(match.group()):02X}", item_id)


def decode_id(stored_id: str) -> str:
    if "%" not in stored_id:
        return stored_id
    return _ENCODED_ID_CHAR.sub(lambda match: chr(int(match.group(1), 16)), stored_id)


# A stored vector's norm may differ from 1 by this much. Every model's vectors are within 1e-6
# (measured: MobileNetV2 int8, SqueezeNet fp16, PCA-reduced); rounding each value to float16
# would stay within 5e-4.
UNIT_NORM_TOLERANCE = 1e-3


def check_id(item_id: str) -> None:
    if not item_id:
        raise invalid_argument("item id must not be empty")
    if len(item_id) > columns.MAX_ID_CHARS:
        raise invalid_argument(
            f"item id {item_id[:32]!r}... is {len(item_id)} characters; at most {columns.MAX_ID_CHARS}"
        )
    if has_control_chars(item_id):  # repr() shows them escaped
        raise invalid_argument(f"item id {item_id!r} contains a control character")


def stored_ids(ids: Iterable[str]) -> list[str]:
    """Validated, de-duplicated (order kept) stored form of the ids of a Get or Delete."""
    unique: dict[str, None] = {}
    for item_id in ids:
        check_id(item_id)
        unique[encode_id(item_id)] = None
    return list(unique)


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class ItemCodec:
    def __init__(self, dimension: int, filter_fields: Mapping[str, FieldType]) -> None:
        self.dimension = dimension
        self.filter_fields = dict(filter_fields)

    # --- requests -> rows --------------------------------------------------------------------

    def vector(self, values: Sequence[float], what: str) -> np.ndarray:
        """A stored or query vector: of the collection's dimension, finite and of unit length, since
        scores are inner products read as cosines (one vector of norm 1e30 would top every search)."""
        vector = np.asarray(values, dtype=np.float32)
        if vector.shape != (self.dimension,):
            raise invalid_argument(f"{what} has {vector.size} dimensions; expected {self.dimension}")
        if not np.isfinite(vector).all():
            raise invalid_argument(f"{what} contains NaN or infinity")
        norm = float(np.linalg.norm(vector.astype(np.float64)))  # float64: no overflow at 1e30
        if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
            raise invalid_argument(
                f"{what} has norm {norm:.6g}; vectors must be L2-normalised (norm 1 +- {UNIT_NORM_TOLERANCE:g})"
            )
        return vector

    def query_matrix(self, queries: Sequence[search_pb2.Vector]) -> np.ndarray:
        return np.stack([self.vector(query.values, f"query vector {n}") for n, query in enumerate(queries)])

    def rows(self, items: Sequence[search_pb2.Item]) -> list[Row]:
        """One row per item, all validated first: INVALID_ARGUMENT for the first bad item."""
        rows: list[Row] = []
        seen: set[str] = set()
        for number, item in enumerate(items):
            check_id(item.id)
            if item.id in seen:
                raise invalid_argument(f"item id {item.id!r} appears more than once in this upsert")
            seen.add(item.id)
            rows.append(self._row(number, item))
        return rows

    def _row(self, number: int, item: search_pb2.Item) -> Row:
        if len(item.image_uri.encode()) > columns.IMAGE_URI_MAX_BYTES:
            raise invalid_argument(
                f"image_uri of item {item.id!r} is longer than {columns.IMAGE_URI_MAX_BYTES} bytes"
            )
        if item.content_sha256 and not _SHA256_HEX.match(item.content_sha256):
            raise invalid_argument(f"content_sha256 of item {item.id!r} must be 64 lowercase hex digits")
        if len(item.copy_features) > columns.COPY_FEATURES_MAX_BYTES:
            raise invalid_argument(
                f"copy_features of item {number} ({item.id!r}) are {len(item.copy_features):,} bytes; "
                f"at most {columns.COPY_FEATURES_MAX_BYTES:,}"
            )
        row: Row = {
            columns.ID: encode_id(item.id),
            columns.VECTOR: self.vector(item.vector.values, f"vector of item {item.id!r}"),
            columns.IMAGE_URI: item.image_uri,
            columns.CONTENT_SHA256: item.content_sha256,
            columns.COPY_FEATURES: item.copy_features,  # raw bytes; each store encodes them its own way
            columns.REGIONS: self._regions(number, item),
        }
        for field, field_type in self.filter_fields.items():  # before the whole metadata: precise errors
            value = self._field_value(item, field, field_type)
            row[columns.presence_column(field)] = value is not None
            row[field] = columns.ABSENT_VALUES[field_type] if value is None else value
        row[columns.METADATA] = self._metadata_json(item)
        return row

    def _regions(self, number: int, item: search_pb2.Item) -> list[Region]:
        if len(item.regions) > columns.MAX_REGIONS_PER_ITEM:
            raise invalid_argument(
                f"item {number} ({item.id!r}) has {len(item.regions)} regions; at most {columns.MAX_REGIONS_PER_ITEM}"
            )
        regions = []
        for position, region in enumerate(item.regions):
            what = f"region {position} of item {number} ({item.id!r})"
            box = region.box
            if not region.HasField("box") or box.width == 0 or box.height == 0:
                raise invalid_argument(f"{what} has no box, or a box of zero size; give its x, y, width and height")
            if max(box.x, box.y, box.width, box.height) > 2**31 - 1:
                raise invalid_argument(f"{what} has a box beyond 2**31 - 1 pixels")
            regions.append(Region(
                (box.x, box.y, box.width, box.height), self.vector(region.vector.values, f"vector of {what}")
            ))
        return regions

    @staticmethod
    def _metadata_json(item: search_pb2.Item) -> str:
        if struct_depth(item.metadata) > MAX_STRUCT_DEPTH:
            raise invalid_argument(f"metadata of item {item.id!r} nests deeper than {MAX_STRUCT_DEPTH} levels")
        try:
            metadata = json_format.MessageToDict(item.metadata)
            encoded = json.dumps(metadata, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        except ValueError:
            raise invalid_argument(f"metadata of item {item.id!r} contains NaN or infinity") from None
        size = len(encoded.encode())
        if size > columns.METADATA_MAX_BYTES:
            raise invalid_argument(
                f"metadata of item {item.id!r} is {size} bytes as JSON; at most {columns.METADATA_MAX_BYTES}"
            )
        return encoded

    @staticmethod
    def _field_value(item: search_pb2.Item, field: str, field_type: FieldType) -> Any:
        """The typed value of a filter field, None when absent or null."""
        if field not in item.metadata.fields:
            return None
        value = item.metadata.fields[field]
        kind = value.WhichOneof("kind")
        if kind in (None, "null_value"):
            return None
        where = f"metadata field {field!r} of item {item.id!r}"
        if field_type == "string":
            if kind != "string_value":
                raise invalid_argument(f"{where} must be a string")
            text = value.string_value
            if len(text.encode()) > columns.STRING_FIELD_MAX_BYTES:
                raise invalid_argument(f"{where} is longer than {columns.STRING_FIELD_MAX_BYTES} bytes")
            if has_control_chars(text):
                raise invalid_argument(f"{where} contains a control character")
            return text
        if field_type == "bool":
            if kind != "bool_value":
                raise invalid_argument(f"{where} must be a bool")
            return value.bool_value
        if kind != "number_value":  # a bool is not a number here
            raise invalid_argument(f"{where} must be a number")
        number = value.number_value
        if not math.isfinite(number):
            raise invalid_argument(f"{where} must be finite")
        if field_type == "float":
            return number
        if not number.is_integer() or abs(number) > 2**53:
            raise invalid_argument(f"{where} must be an integer within +-2**53")
        return int(number)

    # --- rows and hits -> responses ----------------------------------------------------------

    @staticmethod
    def _metadata_struct(metadata: Any) -> struct_pb2.Struct:
        struct = struct_pb2.Struct()
        if isinstance(metadata, str):  # FAISS's SQLite (and some Milvus versions) hand back JSON text
            metadata = json.loads(metadata)
        if metadata:
            struct.update(metadata)
        return struct

    def item(self, row: Mapping[str, Any], include_vector: bool) -> search_pb2.Item:
        """An item of a Get; its copy features are those of the row (a store reads them only when asked)."""
        item = search_pb2.Item(
            id=decode_id(row[columns.ID]),
            image_uri=row.get(columns.IMAGE_URI, ""),
            metadata=self._metadata_struct(row.get(columns.METADATA)),
            content_sha256=row.get(columns.CONTENT_SHA256, ""),
            copy_features=row.get(columns.COPY_FEATURES, b""),
        )
        if include_vector:
            item.vector.values.extend(row[columns.VECTOR])
        return item

    def hit(self, hit: StoreHit) -> search_pb2.Hit:
        """A search hit; its copy features (when read) without the mirrored set, since a hit's are verified
        as a candidate's, which never reads it (Get returns them whole)."""
        found = search_pb2.Hit(
            id=decode_id(hit.id), score=hit.score, image_uri=hit.image_uri, metadata=self._metadata_struct(hit.metadata),
            copy_features=without_mirrored_set(hit.copy_features), content_sha256=hit.content_sha256,
        )
        if hit.region is not None:
            x, y, width, height = hit.region
            found.region.CopyFrom(search_pb2.RegionBox(x=x, y=y, width=width, height=height))
        return found

"""Names and sizes of a collection's columns, the same on both backends (a Milvus collection, the FAISS
backend's SQLite table): shared by the item codec, the filter renderers and the stores.

Each filter field gets a typed column (`category` string, `price` float, ...) and a bool presence
column (`_has_category`): Milvus Lite 2.5 supports neither nullable columns nor default values, so an
item without the field stores a zero value plus `_has_<field> == false`, and every filter condition
requires presence. That keeps "a missing value matches no condition" identical on every backend."""

from __future__ import annotations

from search_svc.settings import FieldType

ID = "id"
VECTOR = "vector"
IMAGE_URI = "image_uri"
METADATA = "metadata"
CONTENT_SHA256 = "content_sha256"
COPY_FEATURES = "copy_features"
# Milvus only: when the row was written, in microseconds (never the same twice in one process), so that
# each replica's copy of the descriptor index can follow the other replicas' writes
# (search_svc/milvus_feature_mirror.py).
WRITTEN_US = "written_us"
# An item's regions in a row: a list of `Region`s (see item_codec); stored apart from the item's row
# (FAISS: the regions table; Milvus: the regions collection), each tied to its item.
REGIONS = "regions"
# A region row's columns besides its vector: the item it belongs to, and its box.
REGION_ITEM_ID = "item_id"
REGION_BOX = ("box_x", "box_y", "box_width", "box_height")

MAX_ID_CHARS = 256
# Limits in bytes, as Milvus VARCHAR lengths count them. Stored ids are escaped (see
# item_codec.encode_id): at most 4 bytes per character either way.
ID_MAX_BYTES = 4 * MAX_ID_CHARS
IMAGE_URI_MAX_BYTES = 2048
CONTENT_SHA256_MAX_BYTES = 64
STRING_FIELD_MAX_BYTES = 1024
# A Milvus server refuses JSON values above 64 KiB; Milvus Lite would take them, so check ourselves.
METADATA_MAX_BYTES = 65536
# Copy features are opaque bytes, but Milvus has no bytes type: it stores them as base64 in a VARCHAR, and
# a VARCHAR holds at most 65,535 bytes. 48,000 raw bytes are 64,000 base64 characters, so that fits; the
# FAISS backend (a BLOB) takes the same limit, so a catalog written to one backend fits the other.
COPY_FEATURES_MAX_BYTES = 48_000
COPY_FEATURES_BASE64_MAX_BYTES = 65_535
# Regions per item, at most: the embedder's grid makes 13; a search over-fetches by this factor at most
# to fill k distinct items.
MAX_REGIONS_PER_ITEM = 32

# What a row stores in a filter field's column when the item does not have that field.
ABSENT_VALUES: dict[FieldType, object] = {"string": "", "float": 0.0, "int": 0, "bool": False}


def presence_column(field: str) -> str:
    # Filter field names start with a letter (settings check), so this never clashes with one.
    return f"_has_{field}"

"""The Milvus backend of the search service (`vector_store.VectorStore`), through pymilvus's
`MilvusClient`.

Every Milvus call gets
the configured deadline and no hidden retries (pymilvus would otherwise retry up to 75 times, about
3.5 minutes, when the timeout is a float), and a failure comes back as a `ServiceError` with a
precise status code. Reads use Strong consistency, so a Search right after an Upsert or Delete sees
it (Milvus Lite is read-your-writes anyway; a Milvus server is not by default).

Copy features are stored as base64 in a VARCHAR (Milvus has no bytes type; see
`columns.COPY_FEATURES_MAX_BYTES`), an empty string for an item without them. A collection created
before they existed has no such column, and Milvus 2.5 cannot add one to it: it keeps serving
searches, Gets and upserts of items without copy features (which read back empty), while an upsert
carrying copy features is FAILED_PRECONDITION telling the operator to re-create the collection.

Regions live in a collection of their own beside the items' (`<name>__regions`: a row per region with
its item's id, box, vector and the item's filter columns, so a filter applies to a region as to its
item), created by the first upsert that carries regions: so a collection created before regions
existed keeps its schema and gets regions the same way. A search asks both, over-fetching regions until
k distinct items are found, and keeps each item's best vector; a write removes the item's old regions
first. Whether a collection has regions is remembered per process, and a "no" is checked again after
`REGIONS_RECHECK_S` (another replica may have turned them on).

Each row also carries `written_us`, its write's time, by which every replica's in-memory descriptor index
(`milvus_feature_mirror`) follows the other replicas' writes; a collection created before that column
existed keeps working without feature candidates."""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import (
    ConnectError,
    ConnectionConfigException,
    ConnectionNotExistException,
    DataNotMatchException,
    DataTypeNotMatchException,
    MilvusException,
    MilvusUnavailableException,
    ParamError,
    PrimaryKeyException,
)

from search_svc import columns
from search_svc.field_summaries import FieldSummary, FieldTally
from search_svc.filters import FilterCondition
from search_svc.generation import IndexGeneration
from search_svc.item_codec import Row, decode_id
from search_svc.metrics import StoreMetrics
from search_svc.milvus_expressions import filter_expression, ids_expression, item_ids_expression, string_literal
from search_svc.milvus_feature_mirror import MilvusFeatureMirror
from search_svc.settings import COLLECTION_NAME, FieldType, SearchSettings
from search_svc.vector_store import (
    CollectionInfo, StoreHit, VectorMatch, best_per_item, over_fetch, refuse_dropping_default,
)
from service_kit.status import ServiceError

logger = logging.getLogger(__name__)

# Ids per `id in [...]` expression of a Get or Delete, to keep expressions and answers small.
IDS_PER_EXPRESSION = 1000
# The regions collection of collection `name` is `name + REGIONS_SUFFIX`.
REGIONS_SUFFIX = "__regions"
# Milvus answers at most this many hits per query (its topk limit).
MAX_SEARCH_LIMIT = 16384
# Region rows asked for per item wanted, at first: the embedder's grid makes 13 per item; a query whose
# region rows hold fewer than k items is asked again for more.
REGIONS_FETCHED_PER_ITEM = 16
# How long "this collection has no regions" is trusted before Milvus is asked again.
REGIONS_RECHECK_S = 5.0
# Rows per batch of the scan that summarises the filter fields (a few small columns each).
SUMMARY_BATCH_ROWS = 5000
# The most rows one query may answer (Milvus's maxQueryResultWindow).
MAX_QUERY_ROWS = 16384
# Rows per batch of a scan that reads copy features (16 KB each typically, 64 KB at most as base64).
FEATURE_BATCH_ROWS = 250
# A feature match lookup with a filter asks its descriptor index for this many times the candidates
# it needs: the filter is applied after it, by Milvus.
FILTERED_FEATURE_OVERASK = 4
# HNSW's search breadth (ef) where search_params do not set one. Milvus's own default is the hits asked
# for, and a k-10 search at ef 10 misses true neighbours (raw FAISS HNSW at 100k: recall@10 0.918 at ef
# 32, 0.989 at 64; docs/search-backends.md).
DEFAULT_HNSW_EF = 128


def ann_search_params(index_type: str, configured: dict[str, Any], limit: int) -> dict[str, Any]:
    """The index's search params for a search asking `limit` hits: search_params, and on HNSW an ef of
    at least DEFAULT_HNSW_EF (unless set) and never below `limit`, which Milvus refuses (a region search
    asks for k x 16 rows)."""
    params = dict(configured)
    if index_type.startswith("HNSW"):
        params["ef"] = max(int(params.get("ef", DEFAULT_HNSW_EF)), limit)
    return params


def regions_collection(name: str) -> str:
    return name + REGIONS_SUFFIX


@dataclass(frozen=True)
class _OptionalColumns:
    """Which of the columns that collections created by older versions lack a collection has."""

    copy_features: bool = True
    written_us: bool = True


FIELD_DATA_TYPES: dict[FieldType, DataType] = {
    "string": DataType.VARCHAR,
    "float": DataType.DOUBLE,
    "int": DataType.INT64,
    "bool": DataType.BOOL,
}

_RETRY_PREAMBLE = re.compile(r"^\[\w+\] Retry (run out of \d+ retry times|timeout: [\d.]+s), message=")
_CLIENT_SIDE_INVALID = (ParamError, DataTypeNotMatchException, DataNotMatchException, PrimaryKeyException)
_CONNECTION_FAILURES = (ConnectError, ConnectionConfigException, ConnectionNotExistException, MilvusUnavailableException)
# Milvus server error codes (merr) worth telling apart; anything else is UNKNOWN.
_MILVUS_CODES = {
    2: grpc.StatusCode.UNAVAILABLE,  # service unavailable; also pymilvus's "connect failed"
    3: grpc.StatusCode.RESOURCE_EXHAUSTED,  # memory limit
    4: grpc.StatusCode.RESOURCE_EXHAUSTED,  # request limit
    7: grpc.StatusCode.RESOURCE_EXHAUSTED,  # disk limit
    8: grpc.StatusCode.RESOURCE_EXHAUSTED,  # rate limit
    9: grpc.StatusCode.RESOURCE_EXHAUSTED,  # quota / force deny
    100: grpc.StatusCode.FAILED_PRECONDITION,  # collection not found (dropped behind our back)
    101: grpc.StatusCode.FAILED_PRECONDITION,  # collection not loaded
    1100: grpc.StatusCode.INVALID_ARGUMENT,  # parameter invalid
    1101: grpc.StatusCode.INVALID_ARGUMENT,  # parameter missing
}
_RPC_CODES = {
    grpc.StatusCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: grpc.StatusCode.UNAVAILABLE,  # the connection broke
    grpc.StatusCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    # Milvus refusing *our* credentials is a deployment fault, not the caller's.
    grpc.StatusCode.UNAUTHENTICATED: grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED: grpc.StatusCode.FAILED_PRECONDITION,
}


def milvus_service_error(operation: str, error: BaseException, timeout_s: float) -> ServiceError:
    """The status to answer with for a failed Milvus call. pymilvus wraps gRPC errors (and its own
    retries) in MilvusException; the innermost gRPC error or MilvusException says what happened."""
    rpc_code: grpc.StatusCode | None = None
    detail = ""
    milvus_error: MilvusException | None = None
    # pymilvus re-raises with `raise e from e`, which overwrites __cause__; __context__ keeps the chain.
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, grpc.RpcError) and callable(getattr(cause, "code", None)):
            rpc_code, detail = cause.code(), cause.details() or ""
            break
        if isinstance(cause, MilvusException):
            milvus_error = milvus_error or cause
            if callable(cause.code):  # pymilvus stores the gRPC error's bound code() as the code
                rpc_code, detail = cause.code(), cause.message
                break
        cause = cause.__cause__ if cause.__cause__ is not None and cause.__cause__ is not cause else cause.__context__
    if isinstance(rpc_code, grpc.StatusCode):
        code = _RPC_CODES.get(rpc_code, grpc.StatusCode.UNKNOWN)
        if rpc_code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServiceError(code, f"milvus {operation}: no answer within {timeout_s:g}s")
        return ServiceError(code, f"milvus {operation}: {rpc_code.name} {_unwrapped(detail)}".rstrip())
    if milvus_error is None:
        return ServiceError(grpc.StatusCode.UNKNOWN, f"milvus {operation}: {error}")
    if isinstance(milvus_error, _CLIENT_SIDE_INVALID):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(milvus_error, _CONNECTION_FAILURES):
        code = grpc.StatusCode.UNAVAILABLE
    else:
        milvus_code = milvus_error.code
        code = _MILVUS_CODES.get(milvus_code, grpc.StatusCode.UNKNOWN) if isinstance(milvus_code, int) else grpc.StatusCode.UNKNOWN
    return ServiceError(code, f"milvus {operation}: {_unwrapped(milvus_error.message)}")


def _unwrapped(message: str) -> str:
    """Drops pymilvus's "[search] Retry run out of 0 retry times, message=" preamble."""
    return _RETRY_PREAMBLE.sub("", message)


class MilvusStore:
    def __init__(self, settings: SearchSettings, metrics: StoreMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.default_collection = settings.collection
        # Collections checked (or created), indexed and loaded by this process, and which optional
        # columns each has. Guarded by a lock: the executor's threads may all want a new collection at once.
        self._prepared: dict[str, _OptionalColumns] = {}
        self._prepare_lock = threading.Lock()
        # Whether each prepared collection has regions (its regions collection exists, indexed and
        # loaded), and when a "no" was last checked (time.monotonic).
        self._regions: dict[str, tuple[bool, float]] = {}
        # A float on purpose: with an int timeout pymilvus ignores retry_times=0 and retries until the
        # timeout has passed, on top of the call that used it up.
        self._timeout_s = float(settings.milvus.timeout_s)
        self._local_path = Path(settings.milvus.uri).expanduser().resolve() if settings.milvus.is_local else None
        # pymilvus keeps connections in a process-wide registry keyed by alias (by default the URI):
        # our own alias keeps close() from closing another client's connection to the same Milvus.
        self._alias = f"search_svc-{uuid.uuid4().hex}"
        self._client: MilvusClient | None = None
        self.index_type = settings.index_type
        # Each prepared collection's descriptor index (with feature_index on), followed by a thread.
        self._mirrors: dict[str, MilvusFeatureMirror] = {}
        self._write_stamps = IndexGeneration()  # a microsecond clock that never repeats: rows' written_us
        self._stop_following = threading.Event()
        self._follower: threading.Thread | None = None
        self._failing_mirrors: dict[str, str] = {}  # collection -> the last catch-up error logged
        self._oversized: dict[str, int] = {}  # collection -> its items, while beyond feature_index_max_items

    # --- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Connects, creates the collection (or checks that the existing one matches the settings),
        indexes and loads it. Raises ServiceError when Milvus is unreachable or does not match."""
        if self._client is not None:
            return
        client = self._connect()
        try:
            self._prepare_collection(client, self.default_collection, create=True)
        except BaseException:
            client.close()
            raise
        self._client = client
        if self._settings.milvus.feature_index:
            self._stop_following.clear()
            self._follower = threading.Thread(target=self._follow_writes, name="milvus-feature-mirror", daemon=True)
            self._follower.start()

    def close(self) -> None:
        self._stop_following.set()
        if self._follower is not None:
            self._follower.join(timeout=self._timeout_s * 3)  # a catch-up's calls each end within the timeout
            self._follower = None
        client, self._client = self._client, None
        self._prepared.clear()
        self._mirrors.clear()
        self._oversized.clear()
        self._regions.clear()
        if client is not None:
            client.close()
        if self._local_path is not None:
            # pymilvus starts one Milvus Lite process per file and never stops it; stop ours, so the
            # file can be opened again (also by another process). Assumes one store per file.
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(self._local_path))

    def _connect(self) -> MilvusClient:
        uri = self._settings.milvus.uri
        if self._local_path is not None:
            self._local_path.parent.mkdir(parents=True, exist_ok=True)
            uri = str(self._local_path)
        token = self._settings.milvus.token
        start = time.perf_counter()
        try:
            return MilvusClient(
                uri=uri, token=token.get_secret_value() if token else "", timeout=self._timeout_s, alias=self._alias
            )
        except (MilvusException, grpc.RpcError) as error:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, f"cannot connect to Milvus at {self._settings.milvus.display_uri}: {_unwrapped(str(error))}"
            ) from error
        finally:
            self._metrics.observe_call("connect", time.perf_counter() - start)

    def _ready_collection(self, name: str, create: bool) -> MilvusClient | None:
        """The client, once collection `name` exists, matches the settings, is indexed and loaded.
        A missing collection is created when `create`, else None is returned."""
        client = self._open_client
        if name in self._prepared:
            return client
        with self._prepare_lock:
            if name not in self._prepared and not self._prepare_collection(client, name, create):
                return None
        return client

    def require_collection(self, name: str) -> None:
        """NOT_FOUND unless collection `name` exists."""
        self._existing_collection(name)

    def _existing_collection(self, name: str) -> MilvusClient:
        client = self._ready_collection(name, create=False)
        if client is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"collection {name!r} does not exist")
        return client

    def _prepare_collection(self, client: MilvusClient, name: str, create: bool) -> bool:
        optional = _OptionalColumns()
        if self._call(client, "has_collection", client.has_collection, name):
            optional = self._check_schema(
                name, self._call(client, "describe_collection", client.describe_collection, name)
            )
        elif not create:
            return False
        else:
            logger.info("creating collection %s (dimension %d)", name, self._settings.dimension)
            self._call(
                client, "create_collection", client.create_collection, name,
                schema=self._schema(), consistency_level="Strong",
            )
        self._index_and_load(client, name)
        self._prepared[name] = optional
        self._check_regions(client, name)
        self._mirror_features(client, name, optional)
        return True

    # --- the descriptor index of each collection ---------------------------------------------------

    def _mirror_features(self, client: MilvusClient, name: str, optional: _OptionalColumns) -> None:
        """Builds the collection's descriptor index (as the FAISS backend does on opening one). One that
        cannot be built now (Milvus failing) is built by the next poll; the collection is served meanwhile,
        its copy searches without feature candidates."""
        if not self._settings.milvus.feature_index:
            return
        if not (optional.copy_features and optional.written_us):
            logger.warning(
                "collection %s was created before rows carried their write time: copy searches on it verify "
                "their similarity shortlist only (no feature candidates)", name,
            )
            return
        mirror = MilvusFeatureMirror(
            name, self._settings.milvus.feature_hash_bits, partial(self._scan, client, name),
            partial(self._query_rows, name), partial(self._count, client, name),
        )
        self._mirrors[name] = mirror
        try:
            self._build_mirror(client, name, mirror)
        except ServiceError as error:
            logger.warning("collection %s: its feature index cannot be built yet (the next poll tries again): %s",
                           name, error.message)

    def _build_mirror(self, client: MilvusClient, name: str, mirror: MilvusFeatureMirror) -> None:
        items = self._count(client, name)
        if items > self._settings.milvus.feature_index_max_items:
            self._drop_mirror(name, mirror, items)
            return
        if self._oversized.pop(name, None) is not None:
            logger.info("collection %s holds %d items, within SEARCH_MILVUS__FEATURE_INDEX_MAX_ITEMS again: "
                        "building its feature index", name, items)
        start = time.perf_counter()
        mirror.build()
        seconds = time.perf_counter() - start
        self._metrics.observe_index_build("features", seconds)
        self._metrics.set_feature_index_items(name, mirror.indexed_items)
        logger.info("collection %s: feature index of %d items built (%.1fs)", name, mirror.indexed_items, seconds)

    def _drop_mirror(self, name: str, mirror: MilvusFeatureMirror, items: int) -> None:
        """No feature index for a collection of more items than feature_index_max_items: the mirror is
        emptied, and built by the first poll that finds deletes have brought the collection within the
        limit (until then a poll costs a count)."""
        mirror.reset()
        self._metrics.forget_feature_index(name)
        if name not in self._oversized:
            logger.warning(
                "collection %s holds %d items, more than SEARCH_MILVUS__FEATURE_INDEX_MAX_ITEMS (%d): this replica "
                "keeps no feature index for it while it does, so its copy searches verify their similarity "
                "shortlist only", name, items, self._settings.milvus.feature_index_max_items,
            )
        self._oversized[name] = items

    def _follow_writes(self) -> None:
        """Every feature_sync_s, brings each collection's descriptor index up to every replica's writes
        (or builds one that could not be built before)."""
        while not self._stop_following.wait(self._settings.milvus.feature_sync_s):
            for name, mirror in list(self._mirrors.items()):
                try:
                    if not mirror.built:
                        self._build_mirror(self._open_client, name, mirror)
                        continue
                    mirror.catch_up()
                    # This replica's next write then outranks every version it has seen, whatever the
                    # other replicas' clocks say (milvus_feature_mirror: a stamp orders two versions).
                    self._write_stamps.advance_to(mirror.newest)
                    if mirror.known_items > self._settings.milvus.feature_index_max_items:
                        self._drop_mirror(name, mirror, mirror.known_items)
                        continue
                    self._metrics.set_feature_index_items(name, mirror.indexed_items)
                except Exception as error:  # noqa: BLE001 - logged; the next round tries again
                    message = error.message if isinstance(error, ServiceError) else repr(error)
                    if self._failing_mirrors.get(name) != message:
                        logger.warning("collection %s: the feature index cannot follow Milvus: %s", name, message)
                        self._failing_mirrors[name] = message
                else:
                    if self._failing_mirrors.pop(name, None) is not None:
                        logger.info("collection %s: the feature index follows Milvus again", name)

    def _index_and_load(self, client: MilvusClient, name: str) -> None:
        indexes = self._call(client, "list_indexes", client.list_indexes, name, field_name=columns.VECTOR)
        if indexes:
            self._check_index(name, self._call(client, "describe_index", client.describe_index, name, indexes[0]))
        else:
            index_params = client.prepare_index_params()
            index_params.add_index(
                columns.VECTOR, index_type=self._settings.index_type, metric_type=self._settings.metric,
                params=dict(self._settings.index_params),
            )
            self._call(client, "create_index", client.create_index, name, index_params)
        self._call(client, "load_collection", client.load_collection, name)

    def _check_regions(self, client: MilvusClient, name: str) -> bool:
        """Whether collection `name` has regions, asking Milvus (and preparing its regions collection)."""
        regions = regions_collection(name)
        found = bool(self._call(client, "has_collection", client.has_collection, regions))
        if found:
            self._check_regions_schema(regions, self._call(client, "describe_collection", client.describe_collection, regions))
            self._index_and_load(client, regions)
        self._regions[name] = (found, time.monotonic())
        return found

    def _has_regions(self, client: MilvusClient, name: str) -> bool:
        known = self._regions.get(name)
        if known is not None and (known[0] or time.monotonic() - known[1] < REGIONS_RECHECK_S):
            return known[0]
        with self._prepare_lock:
            return self._check_regions(client, name)

    def _turn_regions_on(self, client: MilvusClient, name: str) -> None:
        """Creates (or prepares) collection `name`'s regions collection."""
        with self._prepare_lock:
            if self._regions.get(name, (False, 0.0))[0] or self._check_regions(client, name):
                return
            regions = regions_collection(name)
            logger.info("collection %s: creating %s for its items' regions", name, regions)
            self._call(
                client, "create_collection", client.create_collection, regions,
                schema=self._regions_schema(), consistency_level="Strong",
            )
            self._index_and_load(client, regions)
            self._regions[name] = (True, time.monotonic())

    def has_regions(self, collection: str) -> bool:
        return self._has_regions(self._existing_collection(collection), collection)

    def regions_known(self, collection: str) -> bool:
        return self._regions.get(collection, (False, 0.0))[0]

    def _expected_columns(self) -> dict[str, DataType]:
        expected = {
            columns.ID: DataType.VARCHAR,
            columns.VECTOR: DataType.FLOAT_VECTOR,
            columns.IMAGE_URI: DataType.VARCHAR,
            columns.METADATA: DataType.JSON,
            columns.CONTENT_SHA256: DataType.VARCHAR,
            columns.COPY_FEATURES: DataType.VARCHAR,  # base64
            columns.WRITTEN_US: DataType.INT64,
        }
        return {**expected, **self._expected_filter_columns()}

    def _expected_filter_columns(self) -> dict[str, DataType]:
        """The typed filter columns and their presence flags, in items and regions alike."""
        expected: dict[str, DataType] = {}
        for field, field_type in self._settings.filter_fields.items():
            expected[field] = FIELD_DATA_TYPES[field_type]
            expected[columns.presence_column(field)] = DataType.BOOL
        return expected

    def _schema(self) -> Any:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(columns.ID, DataType.VARCHAR, max_length=columns.ID_MAX_BYTES, is_primary=True)
        schema.add_field(columns.VECTOR, DataType.FLOAT_VECTOR, dim=self._settings.dimension)
        schema.add_field(columns.IMAGE_URI, DataType.VARCHAR, max_length=columns.IMAGE_URI_MAX_BYTES)
        schema.add_field(columns.METADATA, DataType.JSON)
        schema.add_field(columns.CONTENT_SHA256, DataType.VARCHAR, max_length=columns.CONTENT_SHA256_MAX_BYTES)
        schema.add_field(columns.COPY_FEATURES, DataType.VARCHAR, max_length=columns.COPY_FEATURES_BASE64_MAX_BYTES)
        schema.add_field(columns.WRITTEN_US, DataType.INT64)
        self._add_filter_columns(schema)
        return schema

    def _add_filter_columns(self, schema: Any) -> None:
        """The typed filter columns and their presence flags, in items and regions alike."""
        for field, field_type in self._settings.filter_fields.items():
            if field_type == "string":
                schema.add_field(field, DataType.VARCHAR, max_length=columns.STRING_FIELD_MAX_BYTES)
            else:
                schema.add_field(field, FIELD_DATA_TYPES[field_type])
            schema.add_field(columns.presence_column(field), DataType.BOOL)

    def _expected_region_columns(self) -> dict[str, DataType]:
        expected = {
            columns.ID: DataType.VARCHAR,
            columns.REGION_ITEM_ID: DataType.VARCHAR,
            columns.VECTOR: DataType.FLOAT_VECTOR,
            **{name: DataType.INT64 for name in columns.REGION_BOX},
        }
        return {**expected, **self._expected_filter_columns()}

    def _regions_schema(self) -> Any:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        # "<stored item id>#<region number>"
        schema.add_field(columns.ID, DataType.VARCHAR, max_length=columns.ID_MAX_BYTES + 8, is_primary=True)
        schema.add_field(columns.REGION_ITEM_ID, DataType.VARCHAR, max_length=columns.ID_MAX_BYTES)
        schema.add_field(columns.VECTOR, DataType.FLOAT_VECTOR, dim=self._settings.dimension)
        for name in columns.REGION_BOX:
            schema.add_field(name, DataType.INT64)
        self._add_filter_columns(schema)
        return schema

    def _check_regions_schema(self, name: str, description: dict) -> None:
        actual = {field["name"]: DataType(field["type"]) for field in description.get("fields", [])}
        dimension = next((int(field.get("params", {}).get("dim", 0)) for field in description.get("fields", [])
                          if field["name"] == columns.VECTOR), 0)
        if actual != self._expected_region_columns() or dimension != self._settings.dimension:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"regions collection {name!r} does not match the settings (columns {sorted(actual)}, dimension "
                f"{dimension}). Drop it (the items' regions are lost; index them again) or use another SEARCH_COLLECTION.",
            )

    def _check_schema(self, name: str, description: dict) -> _OptionalColumns:
        """FAILED_PRECONDITION unless the collection matches the settings; whether it has the copy
        features and write time columns (a collection created before they existed has not)."""
        actual = {field["name"]: field for field in description.get("fields", [])}
        problems = []
        vector = actual.get(columns.VECTOR)
        if vector is not None:
            dimension = int(vector.get("params", {}).get("dim", 0))
            if dimension != self._settings.dimension:
                problems.append(f"its vectors have dimension {dimension}, SEARCH_DIMENSION is {self._settings.dimension}")
        optional = _OptionalColumns(columns.COPY_FEATURES in actual, columns.WRITTEN_US in actual)
        for column, data_type in self._expected_columns().items():
            if column == columns.COPY_FEATURES and not optional.copy_features:
                continue
            if column == columns.WRITTEN_US and not optional.written_us:
                continue
            if column not in actual:
                problems.append(f"it has no column {column!r}")
            elif DataType(actual[column]["type"]) != data_type:
                problems.append(f"column {column!r} is {DataType(actual[column]['type']).name}, expected {data_type.name}")
        extra = sorted(set(actual) - set(self._expected_columns()))
        if extra:
            problems.append(f"it has columns {', '.join(extra)} that SEARCH_FILTER_FIELDS does not declare")
        if problems:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collection {name!r} does not match the settings: {'; '.join(problems)}. "
                "Use another SEARCH_COLLECTION, or drop this collection to rebuild it.",
            )
        if not optional.copy_features:
            logger.warning(
                "collection %s was created before copy features were stored: items without them can still be "
                "written, items with them are refused until it is re-created", name,
            )
        return optional

    def _check_index(self, name: str, description: dict) -> None:
        index_type = str(description.get("index_type", "")).upper()
        metric = str(description.get("metric_type", "")).upper()
        if index_type != self._settings.index_type or metric != self._settings.metric:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collection {name!r} is indexed with {index_type}/{metric}, the settings ask for "
                f"{self._settings.index_type}/{self._settings.metric}. Change SEARCH_INDEX_TYPE, or drop the index "
                "or the collection to rebuild it.",
            )
        self.index_type = index_type

    # --- calls -------------------------------------------------------------------------------

    def _call(self, client: MilvusClient, operation: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._observed(operation):
            return method(*args, timeout=self._timeout_s, retry_times=0, **kwargs)

    @contextlib.contextmanager
    def _observed(self, operation: str) -> Iterator[None]:
        """Times a Milvus call, and turns its failure into a `ServiceError`."""
        start = time.perf_counter()
        try:
            yield
        except (MilvusException, grpc.RpcError) as error:
            service_error = milvus_service_error(operation, error, self._timeout_s)
            self._metrics.count_error(operation, service_error.code.name)
            raise service_error from error
        finally:
            self._metrics.observe_call(operation, time.perf_counter() - start)

    def require_connected(self) -> None:
        """Raises UNAVAILABLE until the startup hook has connected."""
        self._open_client  # noqa: B018 - the property raises when not connected

    @property
    def _open_client(self) -> MilvusClient:
        if self._client is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "not connected to Milvus yet")
        return self._client

    @staticmethod
    def _item_bytes(row: Row) -> int:
        return (row[columns.VECTOR].nbytes + len(row[columns.METADATA]) + len(row[columns.IMAGE_URI])
                + len(row[columns.COPY_FEATURES]) * 4 // 3 + 64)

    def _batches(self, rows: Sequence[Row], row_size: Callable[[Row], int]) -> Iterator[Sequence[Row]]:
        max_rows, max_bytes = self._settings.max_batch_rows, self._settings.max_batch_bytes
        start, size = 0, 0
        for end, row in enumerate(rows):
            row_bytes = row_size(row)
            if end > start and (end - start >= max_rows or size + row_bytes > max_bytes):
                yield rows[start:end]
                start, size = end, 0
            size += row_bytes
        if start < len(rows):
            yield rows[start:]

    def upsert(self, collection: str, rows: Sequence[Row]) -> None:
        client = self._ready_collection(collection, create=True)
        # Absent only after a concurrent drop, and then the upsert fails as the collection's absence.
        optional = self._prepared.get(collection, _OptionalColumns())
        if not optional.copy_features:
            self._refuse_copy_features(collection, rows)  # before any batch is written
        if any(row[columns.REGIONS] for row in rows):
            self._turn_regions_on(client, collection)
        with_regions = self._has_regions(client, collection)
        if with_regions:  # the old regions go first: an item is never searched with another version's
            self._delete_regions(client, collection, [row[columns.ID] for row in rows])
        stamp = self._write_stamps.advance() if optional.written_us else None
        for batch in self._batches(rows, self._item_bytes):
            self._call(client, "upsert", client.upsert, collection, [_milvus_row(row, optional, stamp) for row in batch])
        mirror = self._mirrors.get(collection)
        # What an upsert failing half-way wrote is caught up with later; an index not built yet (or
        # dropped beyond its limit) takes every write when it is built.
        if mirror is not None and mirror.built:
            mirror.apply_written(
                {columns.ID: row[columns.ID], columns.WRITTEN_US: stamp, columns.COPY_FEATURES: row[columns.COPY_FEATURES]}
                for row in rows
            )
            self._metrics.set_feature_index_items(collection, mirror.indexed_items)
        region_rows = [region_row for row in rows for region_row in self._region_rows(row)]
        for batch in self._batches(region_rows, lambda row: row[columns.VECTOR].nbytes + 256):
            self._call(client, "insert regions", client.insert, regions_collection(collection), list(batch))

    def _region_rows(self, row: Row) -> list[Row]:
        """An item's regions as rows of its regions collection, with the item's filter columns."""
        filter_columns = {
            name: row[name] for field in self._settings.filter_fields for name in (field, columns.presence_column(field))
        }
        return [
            {columns.ID: f"{row[columns.ID]}#{number}", columns.REGION_ITEM_ID: row[columns.ID],
             columns.VECTOR: region.vector, **dict(zip(columns.REGION_BOX, region.box)), **filter_columns}
            for number, region in enumerate(row[columns.REGIONS])
        ]

    def _delete_regions(self, client: MilvusClient, collection: str, stored_ids: Sequence[str]) -> None:
        for start in range(0, len(stored_ids), IDS_PER_EXPRESSION):
            self._call(
                client, "delete regions", client.delete, regions_collection(collection),
                filter=item_ids_expression(stored_ids[start:start + IDS_PER_EXPRESSION]),
            )

    @staticmethod
    def _refuse_copy_features(collection: str, rows: Sequence[Row]) -> None:
        for number, row in enumerate(rows):
            if row[columns.COPY_FEATURES]:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"collection {collection!r} was created before copy features were stored and Milvus cannot add "
                    f"the column to it, so item {number} ({decode_id(row[columns.ID])!r}) cannot keep its copy "
                    "features: nothing of this upsert was written. Upsert without copy features (through the gateway: "
                    "GATEWAY_COPY_SEARCH__FEATURES_AT_INGEST=false, and copy search finds nothing in this collection), "
                    "or drop the collection (or use another SEARCH_COLLECTION) and index the catalog again.",
                )

    def _copy_check_output(self, collection: str, include_copy_features: bool) -> list[str]:
        """What a copy search reads of each candidate: its copy features (where the collection has them)
        and its content hash, which makes an image with the same bytes a copy."""
        if not include_copy_features:
            return []
        return [*self._copy_features_output(collection, include_copy_features), columns.CONTENT_SHA256]

    def _copy_features_output(self, collection: str, include_copy_features: bool) -> list[str]:
        """The copy features column, when asked for and the collection has it (else they read back empty)."""
        optional = self._prepared.get(collection)
        return [columns.COPY_FEATURES] if include_copy_features and optional and optional.copy_features else []

    def feature_matches(
        self, collection: str, descriptors: np.ndarray, vector: np.ndarray, count: int,
        conditions: Sequence[FilterCondition], exclude_ids: set[str], include_copy_features: bool = False,
    ) -> list[StoreHit]:
        """Up to `count` items outside `exclude_ids` whose stored copy features share the most local
        descriptors with `descriptors` (this replica's descriptor index, milvus_feature_mirror), most
        first, each scored by its full view's cosine with `vector`; allowed by `conditions`, which Milvus
        applies as it reads them back. None without a descriptor index."""
        self._existing_collection(collection)
        mirror = self._mirrors.get(collection)
        if mirror is None or count <= 0:
            return []
        # The excluded (the similarity hits) are usually among the best, so as many more are asked.
        wanted = (count + len(exclude_ids)) * (FILTERED_FEATURE_OVERASK if conditions else 1)
        candidates = [item_id for item_id in mirror.best(descriptors, wanted) if item_id not in exclude_ids]
        if not candidates:
            return []
        rows = {
            row[columns.ID]: row for row in self._query_ids(
                collection, candidates, [columns.ID, columns.IMAGE_URI, columns.METADATA, columns.VECTOR,
                                         columns.CONTENT_SHA256],
                include_copy_features, filter_expression(conditions),
            )
        }  # an item deleted since the index last followed Milvus, or filtered out, is not there
        return [
            StoreHit(item_id, float(np.asarray(rows[item_id][columns.VECTOR], dtype=np.float32) @ vector),
                     rows[item_id].get(columns.IMAGE_URI, ""), rows[item_id].get(columns.METADATA),
                     _copy_features(rows[item_id]), None, _content_sha256(rows[item_id], include_copy_features))
            for item_id in [item_id for item_id in candidates if item_id in rows][:count]
        ]

    def search(
        self, collection: str, vectors: np.ndarray, k: int, conditions: Sequence[FilterCondition],
        include_copy_features: bool = False,
    ) -> list[list[StoreHit]]:
        client = self._existing_collection(collection)
        item_fields = [columns.IMAGE_URI, columns.METADATA, *self._copy_check_output(collection, include_copy_features)]
        results = self._vector_search(client, collection, vectors, k, conditions, item_fields)
        # pymilvus hits are dicts: {"id": ..., "distance": ..., "entity": {output fields}}.
        if not self._has_regions(client, collection):
            return [
                [
                    StoreHit(hit[columns.ID], hit["distance"], hit["entity"].get(columns.IMAGE_URI, ""),
                             hit["entity"].get(columns.METADATA), _copy_features(hit["entity"]),
                             content_sha256=_content_sha256(hit["entity"], include_copy_features))
                    for hit in hits
                ]
                for hits in results
            ]
        region_results = self._region_search(client, collection, vectors, k, conditions)
        entities = {hit[columns.ID]: hit["entity"] for hits in results for hit in hits}
        grouped = [
            best_per_item(
                [VectorMatch(hit[columns.ID], hit["distance"], None) for hit in hits]
                + [VectorMatch(hit["entity"][columns.REGION_ITEM_ID], hit["distance"],
                               tuple(hit["entity"][name] for name in columns.REGION_BOX)) for hit in region_hits],
                k,
            )
            for hits, region_hits in zip(results, region_results)
        ]
        # Items found by a region only: their columns, in one query (an item deleted meanwhile drops out).
        missing = sorted({match.item_id for matches in grouped for match in matches} - entities.keys())
        if missing:
            entities.update((row[columns.ID], row) for row in self._query_ids(
                collection, missing, [columns.ID, columns.IMAGE_URI, columns.METADATA, columns.CONTENT_SHA256],
                include_copy_features,
            ))
        return [
            [
                StoreHit(match.item_id, match.score, entities[match.item_id].get(columns.IMAGE_URI, ""),
                         entities[match.item_id].get(columns.METADATA), _copy_features(entities[match.item_id]),
                         match.region, _content_sha256(entities[match.item_id], include_copy_features))
                for match in matches if match.item_id in entities
            ]
            for matches in grouped
        ]

    def _vector_search(
        self, client: MilvusClient, collection: str, vectors: np.ndarray, limit: int,
        conditions: Sequence[FilterCondition], output_fields: list[str],
    ) -> list[list[dict]]:
        return self._call(
            client, "search", client.search, collection,
            data=vectors.tolist(), filter=filter_expression(conditions), limit=limit, anns_field=columns.VECTOR,
            output_fields=output_fields,
            search_params={"metric_type": self._settings.metric,
                           "params": ann_search_params(self.index_type, self._settings.search_params, limit)},
            consistency_level="Strong",
        )

    def _region_search(
        self, client: MilvusClient, collection: str, vectors: np.ndarray, k: int, conditions: Sequence[FilterCondition],
    ) -> list[list[dict]]:
        """Each query's best region rows, enough of them to hold k distinct items (or all there are):
        asked again, four times as many, for the queries that came back short."""
        output_fields = [columns.REGION_ITEM_ID, *columns.REGION_BOX]
        limit = over_fetch(k, REGIONS_FETCHED_PER_ITEM, MAX_SEARCH_LIMIT)
        results = [list(hits) for hits in self._vector_search(
            client, regions_collection(collection), vectors, limit, conditions, output_fields
        )]
        while limit < min(k * (1 + columns.MAX_REGIONS_PER_ITEM), MAX_SEARCH_LIMIT):
            short = [
                number for number, hits in enumerate(results)
                if len(hits) == limit and len({hit["entity"][columns.REGION_ITEM_ID] for hit in hits}) < k
            ]
            if not short:
                break
            limit = min(limit * 4, k * (1 + columns.MAX_REGIONS_PER_ITEM), MAX_SEARCH_LIMIT)
            again = self._vector_search(
                client, regions_collection(collection), vectors[short], limit, conditions, output_fields
            )
            for number, hits in zip(short, again):
                results[number] = list(hits)
        return results

    def get(
        self, collection: str, stored_ids: Sequence[str], include_vectors: bool, include_copy_features: bool = False
    ) -> list[dict]:
        output_fields = [columns.ID, columns.IMAGE_URI, columns.METADATA, columns.CONTENT_SHA256]
        if include_vectors:
            output_fields.append(columns.VECTOR)
        rows = self._query_ids(collection, stored_ids, output_fields, include_copy_features)
        return _with_raw_copy_features(rows) if include_copy_features else rows

    def list_page(
        self, collection: str, after: str, limit: int, include_vectors: bool, include_copy_features: bool
    ) -> list[dict]:
        # A query with a limit answers the rows with the smallest primary keys, in key order (what
        # pymilvus's own query_iterator relies on); sorted again here, cheaply, in case a server merges
        # segments otherwise.
        client = self._existing_collection(collection)
        output_fields = [columns.ID, columns.IMAGE_URI, columns.METADATA, columns.CONTENT_SHA256]
        if include_vectors:
            output_fields.append(columns.VECTOR)
        output_fields += self._copy_features_output(collection, include_copy_features)
        rows = self._call(
            client, "list", client.query, collection,
            filter=f"{columns.ID} > {string_literal(after)}", output_fields=output_fields, limit=limit,
            consistency_level="Strong",
        )
        rows = sorted(rows, key=lambda row: row[columns.ID].encode())
        return _with_raw_copy_features(rows) if include_copy_features else rows

    def existing_ids(self, collection: str, stored_ids: Sequence[str]) -> list[str]:
        return [row[columns.ID] for row in self._query_ids(collection, stored_ids, [columns.ID])]

    def _query_ids(
        self, collection: str, stored_ids: Sequence[str], output_fields: list[str], include_copy_features: bool = False,
        expression: str = "",
    ) -> list[dict]:
        """Rows for those ids (that also match `expression`, when given); none when the collection does
        not exist."""
        client = self._ready_collection(collection, create=False)
        if client is None:
            return []
        output_fields = output_fields + self._copy_features_output(collection, include_copy_features)
        rows: list[dict] = []
        for start in range(0, len(stored_ids), IDS_PER_EXPRESSION):
            chunk = stored_ids[start:start + IDS_PER_EXPRESSION]
            rows.extend(self._call(
                client, "query", client.query, collection,
                filter=ids_expression(chunk) + (f" and {expression}" if expression else ""),
                output_fields=output_fields, consistency_level="Strong",
            ))
        return rows

    def _query_rows(self, collection: str, stored_ids: Sequence[str], output_fields: list[str]) -> list[dict]:
        """Rows for those ids, copy features as raw bytes (for the descriptor index)."""
        return _with_raw_copy_features(self._query_ids(collection, stored_ids, output_fields))

    def delete(self, collection: str, stored_ids: Sequence[str]) -> None:
        # By expression, not `ids=`: pymilvus writes `ids=` into an expression without escaping.
        client = self._existing_collection(collection)
        for start in range(0, len(stored_ids), IDS_PER_EXPRESSION):
            chunk = stored_ids[start:start + IDS_PER_EXPRESSION]
            self._call(client, "delete", client.delete, collection, filter=ids_expression(chunk))
        mirror = self._mirrors.get(collection)
        if mirror is not None and mirror.built:  # one not built yet reads what is left when it is
            mirror.remove(stored_ids)
            self._metrics.set_feature_index_items(collection, mirror.indexed_items)
        if self._has_regions(client, collection):
            self._delete_regions(client, collection, stored_ids)

    def drop(self, collection: str) -> bool:
        """Drops a collection other than the default; False when it did not exist."""
        if collection == self.default_collection:
            raise refuse_dropping_default(collection)
        client = self._open_client
        with self._prepare_lock:
            self._regions.pop(collection, None)
            self._oversized.pop(collection, None)
            if self._mirrors.pop(collection, None) is not None:
                self._metrics.forget_feature_index(collection)
            if self._call(client, "has_collection", client.has_collection, regions_collection(collection)):
                self._call(client, "drop_collection", client.drop_collection, regions_collection(collection))
            if not self._call(client, "has_collection", client.has_collection, collection):
                self._prepared.pop(collection, None)
                return False
            self._call(client, "drop_collection", client.drop_collection, collection)
            self._prepared.pop(collection, None)
        return True

    def count(self, collection: str) -> int:
        return self._count(self._existing_collection(collection), collection)

    def _count(self, client: MilvusClient, collection: str) -> int:
        # count(*) rather than collection stats: a server's row_count includes deleted rows until
        # compaction.
        result = self._call(
            client, "count", client.query, collection,
            filter="", output_fields=["count(*)"], consistency_level="Strong",
        )
        return int(result[0]["count(*)"])

    def collections(self) -> list[CollectionInfo]:
        """The item collections in Milvus: never a regions collection (`<name>__regions`, a name the
        backend keeps for itself), nor one that is not this service's (another schema: logged)."""
        client = self._open_client
        names = sorted(
            name for name in self._call(client, "list_collections", client.list_collections)
            if COLLECTION_NAME.fullmatch(name) and not name.endswith(REGIONS_SUFFIX)
        )
        found = []
        for name in names:
            try:
                found.append(CollectionInfo(name, self.count(name), self.has_regions(name)))
            except ServiceError as error:
                if error.code == grpc.StatusCode.NOT_FOUND:  # dropped meanwhile
                    continue
                if error.code == grpc.StatusCode.FAILED_PRECONDITION and name != self.default_collection:
                    logger.warning("not listing collection %s: %s", name, error.message)
                    continue
                raise
        return found

    def field_summaries(self, collection: str) -> list[FieldSummary]:
        """Milvus has no GROUP BY: every item's filter columns are read, a batch at a time (a query
        iterator, each batch within the call deadline), and counted here."""
        client = self._existing_collection(collection)
        tally = FieldTally(self._settings.filter_fields)
        if not tally.output_columns:
            return tally.summaries()
        for rows in self._batches_of_rows(client, "field summaries", collection, SUMMARY_BATCH_ROWS, "", tally.output_columns):
            tally.add(rows)
        return tally.summaries()

    def _batches_of_rows(
        self, client: MilvusClient, operation: str, collection: str, batch_rows: int, expression: str,
        output_fields: list[str],
    ) -> Iterator[list[dict]]:
        """The rows matching `expression`, a batch at a time (a query iterator, each batch within the
        call deadline)."""
        iterator = self._call(
            client, operation, client.query_iterator, collection, batch_size=batch_rows, filter=expression,
            output_fields=output_fields, consistency_level="Strong",
        )
        try:
            while True:
                with self._observed(operation):
                    rows = iterator.next()
                if not rows:
                    break
                yield rows
        finally:
            iterator.close()

    def _scan(self, client: MilvusClient, collection: str, expression: str, output_fields: list[str]) -> Iterator[list[dict]]:
        """Batches of rows for the descriptor index, copy features as raw bytes. Small columns are asked
        for in one query first (what a catch-up with nothing new costs: a query iterator makes two
        calls, and on Milvus Lite logs a warning each time); only when that query is full, by a query
        iterator."""
        if columns.COPY_FEATURES not in output_fields:
            rows = self._call(
                client, "feature index scan", client.query, collection, filter=expression,
                output_fields=output_fields, limit=MAX_QUERY_ROWS, consistency_level="Strong",
            )
            if len(rows) < MAX_QUERY_ROWS:
                yield rows
                return
        batch_rows = FEATURE_BATCH_ROWS if columns.COPY_FEATURES in output_fields else SUMMARY_BATCH_ROWS
        for rows in self._batches_of_rows(client, "feature index scan", collection, batch_rows, expression, output_fields):
            yield _with_raw_copy_features(rows) if columns.COPY_FEATURES in output_fields else rows


def _milvus_row(row: Row, optional: _OptionalColumns, stamp: int | None) -> Row:
    """The row as Milvus stores it: copy features as base64 text, or left out for a collection without
    the column (whose rows were checked to have none); its write time where the collection has the column."""
    milvus_row = dict(row)
    milvus_row.pop(columns.REGIONS, None)  # rows of the regions collection
    features = milvus_row.pop(columns.COPY_FEATURES)
    if optional.copy_features:
        milvus_row[columns.COPY_FEATURES] = base64.b64encode(features).decode("ascii")
    if optional.written_us:
        milvus_row[columns.WRITTEN_US] = stamp
    return milvus_row


def _copy_features(fields: dict) -> bytes:
    """The raw copy features of a hit's entity or a queried row; empty when not read or not stored."""
    return base64.b64decode(fields.get(columns.COPY_FEATURES) or "")


def _content_sha256(fields: dict, include_copy_features: bool) -> str:
    """A hit's content hash, sent with its copy features only (StoreHit.content_sha256)."""
    return (fields.get(columns.CONTENT_SHA256) or "") if include_copy_features else ""


def _with_raw_copy_features(rows: list[dict]) -> list[dict]:
    """Queried rows with their copy features decoded from base64, in place."""
    for row in rows:
        row[columns.COPY_FEATURES] = _copy_features(row)
    return rows

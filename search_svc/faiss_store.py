"""The in-process FAISS backend of the search service (`vector_store.VectorStore`).

Each collection is one SQLite file, the source of truth: per item a label (an int64 that is never
reused), the stored id, the vector, image URI, metadata JSON, content hash, copy features (a BLOB,
empty when the item has none; read only for the hits or items that ask for them, never kept in
memory), and a typed column plus a presence column per filter field (the same layout as the Milvus
collection). A file created before copy features existed gets their column when it is opened.

Regions: a collection with regions (meta `regions_per_item` > 0: the most regions an item was written
with) keeps them in a `regions` table, one row per region with its own label (from the same sequence
as items'), its item's label, box and vector. They are vectors of the FAISS index like the full views;
a search over-fetches so that, grouped per item (its best vector), it still fills k items, and a filter
allows a region when it allows its item. Replacing or deleting an item removes its regions in the same
transaction. A file from before regions gets the (empty) table when it is opened.

The FAISS index in memory is derived from the file: a write commits to SQLite first, then updates
the index, so a crash loses nothing that was acknowledged, and the index is rebuilt from SQLite at
the next start unless a snapshot written at a clean shutdown matches the file's revision.

Index types: FLAT (exact inner product) and IVF_FLAT. An IVF_FLAT collection searches exactly
until it holds `ivf_train_min_items`, then trains its lists (nlist from `index_params`, else
4 * sqrt(items)) in a background thread while the old index keeps serving; writes made meanwhile
are replayed onto the new index before it is swapped in. It retrains when the collection has grown
by `ivf_retrain_growth`. A search probes `search_params`' nprobe lists, else as many as hold about
`ivf_scan_vectors` vectors.

Filters are SQL over the typed columns (`sql_where`: bound parameters); the matching labels
restrict the FAISS search through an ID selector. On IVF a query that finds fewer hits than it could (a selective
filter, or lists too short for k) is searched again over every list, which is exact over the
items the filter allows.

Concurrency: searches run in parallel under a collection's read lock; a write takes it alone."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import faiss
import grpc
import numpy as np

from search_svc import columns
from search_svc.feature_index import FeatureIndex
from search_svc.field_summaries import TOP_VALUES, FieldSummary, top_values, value_text
from search_svc.filters import FilterCondition, FilterValue
from search_svc.item_codec import Row
from search_svc.metrics import StoreMetrics
from search_svc.settings import COLLECTION_NAME, MIN_AUTO_NPROBE, FieldType, SearchSettings
from search_svc.vector_store import (
    CollectionInfo, StoreHit, VectorMatch, best_per_item, over_fetch, refuse_dropping_default,
)
from service_kit.status import ServiceError
from service_kit.tracing import span

logger = logging.getLogger(__name__)

# k-means samples per IVF list (faiss warns below 39) and iterations: enough for stable lists,
# and training time stays bounded as the catalog grows.
TRAINING_POINTS_PER_LIST = 64
KMEANS_ITERATIONS = 10
# Rows per SQLite fetch while (re)building an index, and labels per `IN (...)` of a statement.
BUILD_CHUNK_ROWS = 10_000
LABELS_PER_STATEMENT = 900
SQLITE_BUSY_TIMEOUT_S = 10.0
# Labels the per-collection filter cache holds at most (8 bytes each, plus the selector's hash set).
FILTER_CACHE_MAX_LABELS = 4_000_000
# How long shutdown waits for a background rebuild to notice it (k-means cannot be interrupted).
REBUILD_STOP_WAIT_S = 10.0

_SQL_TYPES: dict[FieldType, str] = {"string": "TEXT", "float": "REAL", "int": "INTEGER", "bool": "INTEGER"}
_FILE_SUFFIX = ".sqlite3"
# The same definition in a new table and when added to a file created before it: ALTER TABLE ADD COLUMN
# needs a default for NOT NULL, and with a constant default SQLite adds it without rewriting the table.
_COPY_FEATURES_COLUMN = f"{columns.COPY_FEATURES} BLOB NOT NULL DEFAULT x''"
_BOX_COLUMNS = ", ".join(columns.REGION_BOX)
_CREATE_REGIONS = (
    "CREATE TABLE IF NOT EXISTS regions (label INTEGER PRIMARY KEY, item_label INTEGER NOT NULL, "
    + "".join(f"{name} INTEGER NOT NULL, " for name in columns.REGION_BOX) + "vector BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS regions_by_item ON regions (item_label)",
)

T = TypeVar("T")


def sqlite_service_error(operation: str, error: sqlite3.Error) -> ServiceError:
    name = getattr(error, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        code = grpc.StatusCode.UNAVAILABLE
    elif name.startswith("SQLITE_FULL"):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    elif name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_CORRUPT", "SQLITE_NOTADB")):
        code = grpc.StatusCode.FAILED_PRECONDITION
    else:
        code = grpc.StatusCode.UNKNOWN
    return ServiceError(code, f"faiss store {operation}: {name or type(error).__name__} {error}".rstrip())


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds off new readers, so writes are not starved."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._condition:
            while self._writer or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._condition:
                self._writer = False
                self._condition.notify_all()


def _vectors(blobs: Sequence[bytes], dimension: int) -> np.ndarray:
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dimension)


# What a copy search reads of each candidate beside its vector and metadata: the copy features it is
# verified with, and the content hash that makes an image with the same bytes a copy.
_COPY_CHECK_COLUMNS = f", {columns.COPY_FEATURES}, {columns.CONTENT_SHA256}"


def _chunks(values: Sequence[T], size: int = LABELS_PER_STATEMENT) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _placeholders(count: int) -> str:
    return ", ".join("?" * count)


def _quoted(name: str) -> str:
    # Column names are ours or declared filter fields (letters, digits, underscores).
    return f'"{name}"'


def sql_where(conditions: Sequence[FilterCondition]) -> tuple[str, list[FilterValue]]:
    """An SQL boolean expression over the items table ("1" for no conditions) and its parameters.
    Nothing needs escaping: values are bound parameters, and field names are declared filter fields,
    quoted as identifiers."""
    clauses: list[str] = []
    parameters: list[FilterValue] = []
    for condition in conditions:
        column = _quoted(condition.field)
        presence = f"{_quoted(columns.presence_column(condition.field))} = 1"
        if condition.operator in ("in", "not in"):
            clauses.append(
                f"({presence} AND {column} {condition.operator.upper()} ({_placeholders(len(condition.values))}))"
            )
        else:
            clauses.append(f"({presence} AND {column} {condition.operator} ?)")
        parameters.extend(condition.values)
    return (" AND ".join(clauses) or "1"), parameters


def auto_nlist(items: int) -> int:
    """4 * sqrt(items) lists, at most one per 39 items (fewer leaves k-means without data)."""
    return max(1, min(int(4 * math.sqrt(items)), items // 39))


def apply_write(index: faiss.Index, removed: np.ndarray, vectors: np.ndarray, labels: np.ndarray) -> None:
    """Removes the replaced or deleted labels, then adds the new vectors."""
    if removed.size:
        index.remove_ids(removed)
    if labels.size:
        index.add_with_ids(vectors, labels)


@dataclass(frozen=True)
class AllowedItems:
    """The labels a filter matched at a revision, and the FAISS selector over them."""

    revision: int
    labels: np.ndarray
    selector: faiss.IDSelector


class FaissCollection:
    """One collection: its SQLite file, its FAISS index and the locks around them."""

    def __init__(self, store: FaissStore, name: str, path: Path) -> None:
        self.store = store
        self.name = name
        self.path = path
        self.lock = ReadWriteLock()
        self.index: faiss.Index | None = None
        # The items' local descriptors, for a copy search's feature candidates; None when off.
        self.features: FeatureIndex | None = None
        self.revision = 0
        self.next_label = 1
        self.ivf_trained_items = 0  # vectors the IVF lists were trained on; 0 while searching flat
        # The most regions an item of this collection was written with; 0: a collection without regions.
        self.regions_per_item = 0
        # Random, set when the file is created: a snapshot names it, so a snapshot left beside a
        # deleted and recreated file never matches the new one.
        self.file_id = ""
        self.dropped = False
        # Writes made while a background rebuild runs, replayed onto the new index before the swap.
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self.rebuild: threading.Thread | None = None
        self._connections: dict[int, sqlite3.Connection] = {}
        self._connections_lock = threading.Lock()
        self._allowed_cache: OrderedDict[tuple, AllowedItems] = OrderedDict()
        self._allowed_lock = threading.Lock()

    # --- SQLite ------------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        # WAL: readers never wait for the writer. synchronous=NORMAL is durable against a crash of
        # this process (the WAL is written before a commit returns), not against power loss.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (executor threads are few and long-lived)."""
        thread = threading.get_ident()
        connection = self._connections.get(thread)
        if connection is None:
            connection = self.connect()
            with self._connections_lock:
                self._connections[thread] = connection
        return connection

    def close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            connection.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        connection = self.connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def set_meta(self, connection: sqlite3.Connection, **values: object) -> None:
        connection.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(key, json.dumps(value)) for key, value in values.items()],
        )

    def labels_of(self, connection: sqlite3.Connection, stored_ids: Sequence[str]) -> np.ndarray:
        labels: list[int] = []
        for chunk in _chunks(stored_ids):
            labels.extend(row[0] for row in connection.execute(
                f"SELECT label FROM items WHERE id IN ({_placeholders(len(chunk))})", chunk
            ))
        return np.asarray(labels, dtype=np.int64)

    def remove_items(self, connection: sqlite3.Connection, item_labels: np.ndarray) -> np.ndarray:
        """Deletes these items and their regions; returns every label removed (the index's to remove)."""
        removed = item_labels.tolist()
        for chunk in _chunks(item_labels.tolist()):
            marks = _placeholders(len(chunk))
            if self.regions_per_item:
                removed.extend(row[0] for row in connection.execute(
                    f"SELECT label FROM regions WHERE item_label IN ({marks})", chunk
                ))
                connection.execute(f"DELETE FROM regions WHERE item_label IN ({marks})", chunk)
            connection.execute(f"DELETE FROM items WHERE label IN ({marks})", chunk)
        return np.asarray(removed, dtype=np.int64)

    # --- the index -----------------------------------------------------------------------------

    @property
    def is_ivf(self) -> bool:
        return isinstance(self.index, faiss.IndexIVF)

    def apply(self, removed: np.ndarray, vectors: np.ndarray, labels: np.ndarray) -> None:
        """Brings the index up to a committed write (under the write lock)."""
        assert self.index is not None
        apply_write(self.index, removed, vectors, labels)
        if self.pending is not None:
            self.pending.append((removed, vectors, labels))

    def build_features(self, connection: sqlite3.Connection, hash_bits: int) -> None:
        """The feature index over every item's stored copy features, as `connection` sees them."""
        features = FeatureIndex(hash_bits)
        cursor = connection.execute(
            f"SELECT label, {columns.COPY_FEATURES} FROM items WHERE length({columns.COPY_FEATURES}) > 0"
        )
        while rows := cursor.fetchmany(BUILD_CHUNK_ROWS):
            features.add(rows)
        self.features = features
        self.store.metrics.set_feature_index_items(self.name, features.items)

    def apply_features(self, removed: np.ndarray, added: list[tuple[int, bytes]]) -> None:
        """Brings the feature index up to a committed write (under the write lock); rebuilt from the file
        once most of what it holds was removed (it cannot remove entries)."""
        if self.features is None:
            return
        self.features.remove(removed.tolist())
        self.features.add(added)
        if self.features.wants_rebuild:
            self.build_features(self.connection(), self.store.feature_hash_bits)
        self.store.metrics.set_feature_index_items(self.name, self.features.items)

    def allowed(self, connection: sqlite3.Connection, conditions: Sequence[FilterCondition]) -> AllowedItems:
        """The items a filter allows, from a cache kept per filter until the next write (under the
        read lock, so the revision cannot move meanwhile): catalogs reuse a few filters (a category,
        a price band), and fetching 500k matching labels from SQLite takes ~0.4 s."""
        where, parameters = sql_where(conditions)
        key = (where, tuple(parameters))
        with self._allowed_lock:
            cached = self._allowed_cache.get(key)
            if cached is not None and cached.revision == self.revision:
                self._allowed_cache.move_to_end(key)
                self.store.metrics.count_filter_cache(hit=True)
                return cached
        self.store.metrics.count_filter_cache(hit=False)
        statement = f"SELECT label FROM items WHERE {where}"
        if self.regions_per_item:  # a region is allowed when its item is
            statement += f" UNION ALL SELECT label FROM regions WHERE item_label IN ({statement})"
            parameters = parameters * 2
        labels = np.fromiter((row[0] for row in connection.execute(statement, parameters)), dtype=np.int64)
        allowed = AllowedItems(self.revision, labels, faiss.IDSelectorBatch(labels))
        with self._allowed_lock:
            if any(entry.revision != self.revision for entry in self._allowed_cache.values()):
                self._allowed_cache.clear()  # all from before the last write
            self._allowed_cache[key] = allowed
            while sum(entry.labels.size for entry in self._allowed_cache.values()) > FILTER_CACHE_MAX_LABELS:
                self._allowed_cache.popitem(last=False)
        return allowed

    def search(self, vectors: np.ndarray, k: int, allowed: AllowedItems | None) -> tuple[np.ndarray, np.ndarray]:
        assert self.index is not None
        selector = allowed.selector if allowed is not None else None
        candidates = self.index.ntotal if allowed is None else allowed.labels.size
        if not self.is_ivf:
            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            return self.index.search(vectors, k, params=params)
        ivf = self.index
        nprobe = self.store.nprobe(ivf.nlist, ivf.ntotal)
        scores, labels = ivf.search(vectors, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=nprobe))
        short = np.flatnonzero((labels >= 0).sum(axis=1) < min(k, candidates))
        if short.size and nprobe < ivf.nlist:
            # Every list: exact over the allowed items, at the cost of a full scan for these queries.
            exact = faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nlist)
            scores[short], labels[short] = ivf.search(np.ascontiguousarray(vectors[short]), k, params=exact)
        return scores, labels


class FaissStore:
    def __init__(self, settings: SearchSettings, metrics: StoreMetrics) -> None:
        self._settings = settings
        self.metrics = metrics
        self._data_dir = settings.faiss.data_dir.expanduser().resolve()
        self.default_collection = settings.collection
        self.index_type = settings.index_type
        # Checked by the settings (SearchSettings._check_backend).
        self._nlist: int | None = settings.index_params.get("nlist")
        self._nprobe: int | None = settings.search_params.get("nprobe")
        self._collections: dict[str, FaissCollection] = {}
        self._collections_lock = threading.Lock()
        self._opened = False
        self._closing = threading.Event()
        self._use_gpu = settings.faiss.gpu == "on" or (settings.faiss.gpu == "auto" and faiss_gpus() > 0)
        self.feature_hash_bits = settings.faiss.feature_hash_bits

    def nprobe(self, nlist: int, vectors: int) -> int:
        """The IVF lists a search of an index of `nlist` lists holding `vectors` probes: search_params'
        nprobe, else as many lists as hold about faiss.ivf_scan_vectors vectors (at least
        MIN_AUTO_NPROBE), never more than there are."""
        if self._nprobe is not None:
            return min(self._nprobe, nlist)
        mean_list = max(vectors / nlist, 1.0)
        wanted = math.ceil(self._settings.faiss.ivf_scan_vectors / mean_list)
        return min(max(wanted, MIN_AUTO_NPROBE), nlist)

    # --- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        if self._opened:
            return
        self._closing.clear()
        if self._settings.faiss.gpu == "on" and faiss_gpus() == 0:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "SEARCH_FAISS__GPU=on but this faiss build sees no GPU (install faiss-gpu, or use auto/off)",
            )
        try:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot create {self._data_dir}: {error}") from error
        with self._collections_lock:
            if self.default_collection not in self._collections:
                self._collections[self.default_collection] = self._load(self.default_collection)
        self._opened = True

    def close(self) -> None:
        """Stops background rebuilds, snapshots every loaded index and closes the files. The index
        in use already holds every committed write, so a rebuild still training is given a short
        while and then abandoned (the next start trains again)."""
        self._closing.set()
        with self._collections_lock:
            loaded, self._collections = list(self._collections.values()), {}
        for collection in loaded:
            rebuild = collection.rebuild
            if rebuild is not None:
                rebuild.join(REBUILD_STOP_WAIT_S)
            with collection.lock.writing():
                if collection.index is not None and not collection.dropped:
                    self._write_snapshot(collection)
                collection.close_connections()
        self._opened = False

    def require_connected(self) -> None:
        if not self._opened:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the faiss store is not loaded yet")

    def require_collection(self, name: str) -> None:
        self._existing(name)

    # --- collections ---------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self._data_dir / f"{name}{_FILE_SUFFIX}"

    def _existing(self, name: str) -> FaissCollection:
        collection = self._collection(name, create=False)
        if collection is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"collection {name!r} does not exist")
        return collection

    def _collection(self, name: str, create: bool) -> FaissCollection | None:
        self.require_connected()
        collection = self._collections.get(name)
        if collection is not None:
            return collection
        with self._collections_lock:
            collection = self._collections.get(name)
            if collection is None:
                if not create and not self._path(name).exists():
                    return None
                collection = self._load(name)
                self._collections[name] = collection
        return collection

    def _load(self, name: str) -> FaissCollection:
        collection = FaissCollection(self, name, self._path(name))
        start = time.perf_counter()
        try:
            connection = collection.connection()
            self._create_or_check_schema(collection, connection)
            meta = {key: json.loads(value) for key, value in connection.execute("SELECT key, value FROM meta")}
            collection.revision = int(meta.get("revision", 0))
            collection.next_label = int(meta.get("next_label", 1))
            collection.ivf_trained_items = int(meta.get("ivf_trained_items", 0))
            collection.regions_per_item = int(meta.get("regions_per_item", 0))
            collection.file_id = str(meta["file_id"])
            collection.index = self._read_snapshot(collection)
            if collection.index is not None and collection.index.ntotal != self._vector_count(connection):
                logger.warning("ignoring the snapshot of collection %s: it does not match the file", name)
                collection.index = None
            if collection.index is None:
                collection.index = self._build(collection, connection)
            if self._settings.faiss.feature_index:
                collection.build_features(connection, self.feature_hash_bits)
        except sqlite3.Error as error:
            collection.close_connections()
            raise sqlite_service_error("open", error) from error
        except BaseException:
            collection.close_connections()
            raise
        logger.info(
            "collection %s ready: %d items, %s index (%.1fs)",
            name, collection.index.ntotal, "IVF" if collection.is_ivf else "flat", time.perf_counter() - start,
        )
        return collection

    def _create_or_check_schema(self, collection: FaissCollection, connection: sqlite3.Connection) -> None:
        fields = self._settings.filter_fields
        field_columns = "".join(
            f', "{field}" {_SQL_TYPES[field_type]} NOT NULL, "{columns.presence_column(field)}" INTEGER NOT NULL'
            for field, field_type in fields.items()
        )
        with collection.transaction():
            connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            stored = dict(connection.execute("SELECT key, value FROM meta WHERE key IN ('dimension', 'filter_fields')"))
            if not stored:
                connection.execute(
                    "CREATE TABLE items (label INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, vector BLOB NOT NULL, "
                    "image_uri TEXT NOT NULL, metadata TEXT NOT NULL, content_sha256 TEXT NOT NULL, "
                    f"{_COPY_FEATURES_COLUMN}{field_columns})"
                )
                for field in fields:
                    connection.execute(f'CREATE INDEX "items_by_{field}" ON items ("{field}")')
                for statement in _CREATE_REGIONS:
                    connection.execute(statement)
                collection.set_meta(
                    connection, dimension=self._settings.dimension, filter_fields=fields, file_id=uuid.uuid4().hex
                )
                logger.info("creating collection %s (dimension %d)", collection.name, self._settings.dimension)
                return
        problems = []
        dimension = json.loads(stored.get("dimension", "0"))
        if dimension != self._settings.dimension:
            problems.append(f"its vectors have dimension {dimension}, SEARCH_DIMENSION is {self._settings.dimension}")
        stored_fields = json.loads(stored.get("filter_fields", "{}"))
        if stored_fields != dict(fields):
            problems.append(f"its filter fields are {stored_fields}, SEARCH_FILTER_FIELDS declares {dict(fields)}")
        if problems:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"collection {collection.name!r} does not match the settings: {'; '.join(problems)}. "
                f"Use another SEARCH_COLLECTION, or move {collection.path} away to rebuild it.",
            )
        self._add_missing_columns(collection, connection)

    @staticmethod
    def _add_missing_columns(collection: FaissCollection, connection: sqlite3.Connection) -> None:
        """Brings a file created by an older version up to the current tables in place: every item
        it holds stays, with no copy features and no regions."""
        with collection.transaction():
            present = {row[1] for row in connection.execute("PRAGMA table_info(items)")}
            if columns.COPY_FEATURES not in present:
                connection.execute(f"ALTER TABLE items ADD COLUMN {_COPY_FEATURES_COLUMN}")
                logger.info("collection %s: added the %s column to %s", collection.name, columns.COPY_FEATURES, collection.path)
            for statement in _CREATE_REGIONS:
                connection.execute(statement)

    @staticmethod
    def _count(connection: sqlite3.Connection) -> int:
        return int(connection.execute("SELECT count(*) FROM items").fetchone()[0])

    @staticmethod
    def _vector_count(connection: sqlite3.Connection) -> int:
        """The index's vectors: the items' full views and their regions."""
        return int(connection.execute(
            "SELECT (SELECT count(*) FROM items) + (SELECT count(*) FROM regions)"
        ).fetchone()[0])

    def _snapshot_path(self, collection: FaissCollection) -> Path:
        return self._data_dir / (
            f"{collection.name}.{collection.file_id}.r{collection.revision}.{self.index_type.lower()}.faiss"
        )

    def _read_snapshot(self, collection: FaissCollection) -> faiss.Index | None:
        path = self._snapshot_path(collection)
        if not path.exists():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:  # a torn or foreign file: the SQLite file has everything
            logger.warning("ignoring snapshot %s: %s", path, error)
            return None
        logger.info("collection %s: index loaded from snapshot %s", collection.name, path.name)
        return index

    def _write_snapshot(self, collection: FaissCollection) -> None:
        path = self._snapshot_path(collection)
        temporary = path.with_suffix(".tmp")
        try:
            faiss.write_index(collection.index, str(temporary))
            os.replace(temporary, path)
        except (RuntimeError, OSError) as error:  # only costs a rebuild at the next start
            logger.warning("could not snapshot collection %s: %s", collection.name, error)
            return
        for stale in self._data_dir.glob(f"{collection.name}.*.faiss"):
            if stale != path:
                stale.unlink(missing_ok=True)

    # --- building indexes ------------------------------------------------------------------------

    def _build(self, collection: FaissCollection, connection: sqlite3.Connection) -> faiss.Index:
        """A new index over the vectors `connection` sees (in a read transaction when rebuilding)."""
        items = self._vector_count(connection)
        start = time.perf_counter()
        ivf = self.index_type == "IVF_FLAT" and items >= self._settings.faiss.ivf_train_min_items
        index = self._trained_ivf(connection, items) if ivf else faiss.IndexIDMap2(faiss.IndexFlatIP(self._settings.dimension))
        cursor = connection.execute("SELECT label, vector FROM items UNION ALL SELECT label, vector FROM regions")
        while rows := cursor.fetchmany(BUILD_CHUNK_ROWS):
            if self._closing.is_set():
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the search service is shutting down")
            labels, blobs = zip(*rows)
            index.add_with_ids(_vectors(blobs, self._settings.dimension), np.asarray(labels, dtype=np.int64))
        self.metrics.observe_index_build("ivf" if ivf else "flat", time.perf_counter() - start)
        return index

    def _trained_ivf(self, connection: sqlite3.Connection, items: int) -> faiss.IndexIVFFlat:
        dimension = self._settings.dimension
        nlist = auto_nlist(items)
        if self._nlist:
            # k-means needs data for every list; a later retrain gets the configured count.
            nlist = min(self._nlist, max(nlist, items // 39, 1))
            if nlist < self._nlist:
                logger.warning("training %d IVF lists, not %d: %d items are too few", nlist, self._nlist, items)
        # Full views and regions alike: both are searched.
        labels = np.fromiter(
            (row[0] for row in connection.execute("SELECT label FROM items UNION ALL SELECT label FROM regions")),
            dtype=np.int64,
        )
        sample = np.random.default_rng(items).choice(
            labels, size=min(labels.size, nlist * TRAINING_POINTS_PER_LIST), replace=False
        )
        blobs: list[bytes] = []
        for chunk in _chunks(np.sort(sample).tolist(), LABELS_PER_STATEMENT // 2):  # each label bound twice
            marks = _placeholders(len(chunk))
            blobs.extend(row[0] for row in connection.execute(
                f"SELECT vector FROM items WHERE label IN ({marks}) UNION ALL "
                f"SELECT vector FROM regions WHERE label IN ({marks})", chunk * 2
            ))
        started = time.perf_counter()
        kmeans = faiss.Kmeans(
            dimension, nlist, niter=KMEANS_ITERATIONS, max_points_per_centroid=TRAINING_POINTS_PER_LIST,
            seed=1234, gpu=self._use_gpu, verbose=False,
        )
        kmeans.train(_vectors(blobs, dimension))
        quantizer = faiss.IndexFlatIP(dimension)
        quantizer.add(kmeans.centroids)
        index = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        logger.info(
            "trained %d IVF lists on %d of %d items in %.1fs%s",
            nlist, len(blobs), items, time.perf_counter() - started, " on the GPU" if self._use_gpu else "",
        )
        return index

    def _maybe_rebuild(self, collection: FaissCollection) -> None:
        """Starts a background IVF (re)training when the collection crossed its threshold (under
        the write lock)."""
        if self.index_type != "IVF_FLAT" or collection.rebuild is not None or self._closing.is_set():
            return
        items = collection.index.ntotal
        trained = collection.ivf_trained_items if collection.is_ivf else 0
        if (not trained and items >= self._settings.faiss.ivf_train_min_items) or (
            trained and items >= trained * self._settings.faiss.ivf_retrain_growth
        ):
            collection.rebuild = threading.Thread(
                target=self._rebuild, args=(collection,), name=f"faiss-rebuild-{collection.name}", daemon=True
            )
            collection.rebuild.start()

    def _rebuild(self, collection: FaissCollection) -> None:
        connection = collection.connect()
        swapped = False
        try:
            with collection.lock.writing():
                # The read transaction's snapshot starts at its first SELECT, taken while no write
                # can run; every later write goes to `pending` as well.
                connection.execute("BEGIN")
                items = self._vector_count(connection)
                collection.pending = []
            index = self._build(collection, connection)
            connection.execute("COMMIT")
            with collection.lock.writing():
                if not collection.dropped and not self._closing.is_set():
                    for write in collection.pending or []:
                        apply_write(index, *write)
                    collection.index = index
                    collection.ivf_trained_items = items if isinstance(index, faiss.IndexIVF) else 0
                    with collection.transaction() as write:
                        collection.set_meta(write, ivf_trained_items=collection.ivf_trained_items)
                collection.pending = None
                collection.rebuild = None
                swapped = True
        except (ServiceError, sqlite3.Error, RuntimeError, MemoryError) as error:
            logger.error("rebuilding the index of collection %s failed: %s", collection.name, error)
        finally:
            connection.close()
            if not swapped:
                with collection.lock.writing():
                    collection.pending = None
                    collection.rebuild = None

    # --- operations ------------------------------------------------------------------------------

    def _timed(self, operation: str, function: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return function()
        except sqlite3.Error as error:
            service_error = sqlite_service_error(operation, error)
            self.metrics.count_error(operation, service_error.code.name)
            raise service_error from error
        except ServiceError as error:
            self.metrics.count_error(operation, error.code.name)
            raise
        finally:
            self.metrics.observe_call(operation, time.perf_counter() - start)

    @staticmethod
    def _check_not_dropped(collection: FaissCollection) -> None:
        if collection.dropped:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"collection {collection.name!r} does not exist")

    def upsert(self, collection_name: str, rows: Sequence[Row]) -> None:
        def run() -> None:
            collection = self._collection(collection_name, create=True)
            assert collection is not None
            ids = [row[columns.ID] for row in rows]
            fields = list(self._settings.filter_fields)
            names = ["label", columns.ID, columns.VECTOR, columns.IMAGE_URI, columns.METADATA, columns.CONTENT_SHA256,
                     columns.COPY_FEATURES]
            names += [name for field in fields for name in (field, columns.presence_column(field))]
            statement = f"INSERT INTO items ({', '.join(map(_quoted, names))}) VALUES ({_placeholders(len(names))})"
            region_statement = (
                f"INSERT INTO regions (label, item_label, {_BOX_COLUMNS}, vector) VALUES ({_placeholders(7)})"
            )
            region_count = sum(len(row[columns.REGIONS]) for row in rows)
            vectors = np.stack(
                [row[columns.VECTOR] for row in rows]
                + [region.vector for row in rows for region in row[columns.REGIONS]]
            ).astype(np.float32, copy=False)
            with collection.lock.writing():
                self._check_not_dropped(collection)
                # Items' labels first, then their regions', in row order (as `vectors`).
                labels = np.arange(collection.next_label, collection.next_label + len(rows) + region_count, dtype=np.int64)
                region_labels = iter(labels[len(rows):].tolist())
                regions_per_item = max(
                    [collection.regions_per_item, *(len(row[columns.REGIONS]) for row in rows)]
                )
                with collection.transaction() as connection:
                    replaced = collection.remove_items(connection, collection.labels_of(connection, ids))
                    connection.executemany(statement, (
                        [int(label), row[columns.ID], row[columns.VECTOR].astype("<f4").tobytes(), row[columns.IMAGE_URI],
                         row[columns.METADATA], row[columns.CONTENT_SHA256], row[columns.COPY_FEATURES]]
                        + [value for field in fields for value in (row[field], row[columns.presence_column(field)])]
                        for label, row in zip(labels, rows)
                    ))
                    if region_count:
                        connection.executemany(region_statement, (
                            [next(region_labels), int(label), *region.box, region.vector.astype("<f4").tobytes()]
                            for label, row in zip(labels, rows) for region in row[columns.REGIONS]
                        ))
                    collection.set_meta(
                        connection, revision=collection.revision + 1, next_label=int(labels[-1]) + 1,
                        regions_per_item=regions_per_item,
                    )
                collection.revision += 1
                collection.next_label = int(labels[-1]) + 1
                collection.regions_per_item = regions_per_item
                collection.apply(replaced, vectors, labels)
                collection.apply_features(
                    replaced, [(int(label), row[columns.COPY_FEATURES]) for label, row in zip(labels, rows)]
                )
                self._maybe_rebuild(collection)

        self._timed("upsert", run)

    def search(
        self, collection_name: str, vectors: np.ndarray, k: int, conditions: Sequence[FilterCondition],
        include_copy_features: bool = False,
    ) -> list[list[StoreHit]]:
        # The hits' copy features (and content hashes) come with the rest of their rows: one statement per
        # 900 hits.
        selected = "label, id, image_uri, metadata" + (_COPY_CHECK_COLUMNS if include_copy_features else "")

        def run() -> list[list[StoreHit]]:
            collection = self._existing(collection_name)
            with collection.lock.reading():
                self._check_not_dropped(collection)
                connection = collection.connection()
                allowed = None
                if conditions:  # the SQL side of a filtered search, the part that can be slow
                    with span("filter"):
                        allowed = collection.allowed(connection, conditions)
                if allowed is not None and not allowed.labels.size:
                    return [[] for _ in vectors]
                fetch = over_fetch(k, collection.regions_per_item, max(k, collection.index.ntotal))
                scores, labels = collection.search(np.ascontiguousarray(vectors, dtype=np.float32), fetch, allowed)
                found = np.unique(labels[labels >= 0]).tolist()
                # A region's label -> its item's label and box.
                regions = self._regions_of(connection, found) if collection.regions_per_item else {}
                rows: dict[int, tuple] = {}
                item_labels = sorted({*(label for label in found if label not in regions),
                                      *(item_label for item_label, _box in regions.values())})
                for chunk in _chunks(item_labels):
                    for row in connection.execute(
                        f"SELECT {selected} FROM items WHERE label IN ({_placeholders(len(chunk))})",
                        chunk,
                    ):
                        rows[row[0]] = row
            by_id = {row[1]: row for row in rows.values()}
            results = []
            for query_scores, query_labels in zip(scores, labels):
                matches = []
                for score, label in zip(query_scores.tolist(), query_labels.tolist()):
                    item_label, box = regions.get(label, (label, None))
                    row = rows.get(item_label)
                    if row is not None:
                        matches.append(VectorMatch(row[1], score, box))
                hits = []
                for match in best_per_item(matches, k):
                    row = by_id[match.item_id]
                    copy_features, content_sha256 = (row[4], row[5] or "") if include_copy_features else (b"", "")
                    hits.append(StoreHit(row[1], match.score, row[2], row[3], copy_features, match.region,
                                         content_sha256))
                results.append(hits)
            return results

        return self._timed("search", run)

    def feature_matches(
        self, collection_name: str, descriptors: np.ndarray, vector: np.ndarray, count: int,
        conditions: Sequence[FilterCondition], exclude_ids: set[str], include_copy_features: bool = False,
    ) -> list[StoreHit]:
        """Up to `count` items outside `exclude_ids` whose stored copy features share the most local
        descriptors with `descriptors` (search_svc/feature_index.py), most first, each scored by its
        full view's cosine with `vector`; allowed by `conditions`. None without a feature index."""
        selected = f"label, id, image_uri, metadata, {columns.VECTOR}" + (
            _COPY_CHECK_COLUMNS if include_copy_features else ""
        )

        def run() -> list[StoreHit]:
            collection = self._existing(collection_name)
            with collection.lock.reading():
                self._check_not_dropped(collection)
                if collection.features is None or count <= 0:
                    return []
                connection = collection.connection()
                allowed = collection.allowed(connection, conditions).labels if conditions else None
                if allowed is not None and not allowed.size:
                    return []
                # The excluded (the similarity hits) are usually among the best, so as many more are asked;
                # their ids first, so that only the kept items' vectors and features are read.
                labels = collection.features.best(descriptors, count + len(exclude_ids), allowed)
                ids: dict[int, str] = {}
                for chunk in _chunks(labels):
                    ids.update(connection.execute(
                        f"SELECT label, id FROM items WHERE label IN ({_placeholders(len(chunk))})", chunk
                    ).fetchall())
                kept = [label for label in labels if label in ids and ids[label] not in exclude_ids][:count]
                rows = {}
                for chunk in _chunks(kept):
                    for row in connection.execute(
                        f"SELECT {selected} FROM items WHERE label IN ({_placeholders(len(chunk))})", chunk
                    ):
                        rows[row[0]] = row
            hits = []
            for label in kept:
                row = rows[label]
                score = float(np.frombuffer(row[4], dtype="<f4") @ vector)
                copy_features, content_sha256 = (row[5], row[6] or "") if include_copy_features else (b"", "")
                hits.append(StoreHit(row[1], score, row[2], row[3], copy_features, None, content_sha256))
            return hits

        return self._timed("feature_matches", run)

    @staticmethod
    def _regions_of(connection: sqlite3.Connection, labels: Sequence[int]) -> dict[int, tuple[int, tuple]]:
        """Which of these labels are regions: label -> (its item's label, its box)."""
        regions: dict[int, tuple[int, tuple]] = {}
        for chunk in _chunks(labels):
            for label, item_label, *box in connection.execute(
                f"SELECT label, item_label, {_BOX_COLUMNS} FROM regions WHERE label IN ({_placeholders(len(chunk))})",
                chunk,
            ):
                regions[label] = (item_label, tuple(box))
        return regions

    def get(
        self, collection_name: str, stored_ids: Sequence[str], include_vectors: bool, include_copy_features: bool = False
    ) -> list[dict]:
        names = _item_columns(include_vectors, include_copy_features)
        rows = self._timed("get", lambda: self._rows(collection_name, stored_ids, names))
        if include_vectors:
            for row in rows:
                row[columns.VECTOR] = np.frombuffer(row[columns.VECTOR], dtype="<f4").tolist()
        return rows

    def list_page(
        self, collection_name: str, after: str, limit: int, include_vectors: bool, include_copy_features: bool
    ) -> list[dict]:
        names = _item_columns(include_vectors, include_copy_features)

        def run() -> list[dict]:
            collection = self._existing(collection_name)
            with collection.lock.reading():
                self._check_not_dropped(collection)
                # Keyset pagination over the UNIQUE index on id: as cheap on the last page as on the first.
                return [dict(zip(names, row)) for row in collection.connection().execute(
                    f"SELECT {', '.join(names)} FROM items WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
                )]

        rows = self._timed("list", run)
        if include_vectors:
            for row in rows:
                row[columns.VECTOR] = np.frombuffer(row[columns.VECTOR], dtype="<f4").tolist()
        return rows

    def existing_ids(self, collection_name: str, stored_ids: Sequence[str]) -> list[str]:
        rows = self._timed("existing_ids", lambda: self._rows(collection_name, stored_ids, [columns.ID]))
        return [row[columns.ID] for row in rows]

    def _rows(self, collection_name: str, stored_ids: Sequence[str], names: list[str]) -> list[dict]:
        """Those columns of the items with these ids that exist (none when the collection does not)."""
        collection = self._collection(collection_name, create=False)
        if collection is None:
            return []
        found: list[dict] = []
        with collection.lock.reading():
            if collection.dropped:
                return []
            connection = collection.connection()
            for chunk in _chunks(stored_ids):
                found.extend(dict(zip(names, row)) for row in connection.execute(
                    f"SELECT {', '.join(names)} FROM items WHERE id IN ({_placeholders(len(chunk))})", chunk
                ))
        return found

    def delete(self, collection_name: str, stored_ids: Sequence[str]) -> None:
        def run() -> None:
            collection = self._existing(collection_name)
            with collection.lock.writing():
                self._check_not_dropped(collection)
                with collection.transaction() as connection:
                    item_labels = collection.labels_of(connection, stored_ids)
                    if not item_labels.size:
                        return
                    removed = collection.remove_items(connection, item_labels)
                    collection.set_meta(connection, revision=collection.revision + 1)
                collection.revision += 1
                empty = np.empty((0, self._settings.dimension), dtype=np.float32)
                collection.apply(removed, empty, np.empty(0, dtype=np.int64))
                collection.apply_features(removed, [])

        self._timed("delete", run)

    def drop(self, collection_name: str) -> bool:
        if collection_name == self.default_collection:
            raise refuse_dropping_default(collection_name)

        def run() -> bool:
            with self._collections_lock:
                collection = self._collections.pop(collection_name, None)
                if collection is not None:
                    with collection.lock.writing():
                        collection.dropped = True
                        collection.close_connections()
                    self.metrics.forget_feature_index(collection_name)
                path = self._path(collection_name)
                existed = path.exists()
                for leftover in [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"),
                                 *self._data_dir.glob(f"{collection_name}.*.faiss")]:
                    leftover.unlink(missing_ok=True)
            return existed

        return self._timed("drop", run)

    def count(self, collection_name: str) -> int:
        def run() -> int:
            collection = self._existing(collection_name)
            with collection.lock.reading():
                self._check_not_dropped(collection)
                return self._count(collection.connection())

        return self._timed("count", run)

    def has_regions(self, collection_name: str) -> bool:
        collection = self._existing(collection_name)
        self._check_not_dropped(collection)
        return collection.regions_per_item > 0

    def regions_known(self, collection_name: str) -> bool:
        collection = self._collections.get(collection_name)
        return collection is not None and collection.regions_per_item > 0

    def collections(self) -> list[CollectionInfo]:
        def run() -> list[CollectionInfo]:
            self.require_connected()
            names = sorted(
                path.name[:-len(_FILE_SUFFIX)] for path in self._data_dir.glob(f"*{_FILE_SUFFIX}")
                if COLLECTION_NAME.fullmatch(path.name[:-len(_FILE_SUFFIX)])
            )
            return [info for name in names if (info := self._collection_info(name)) is not None]

        return self._timed("collections", run)

    def _collection_info(self, name: str) -> CollectionInfo | None:
        """A collection's count and regions; None when it went away meanwhile. One not loaded is read
        from its file, without building its index (a listing need not load every collection)."""
        collection = self._collections.get(name)
        if collection is not None:
            with collection.lock.reading():
                if collection.dropped:
                    return None
                return CollectionInfo(name, self._count(collection.connection()), collection.regions_per_item > 0)
        try:
            # mode=rw: never creates the file, which a concurrent drop may just have removed.
            with contextlib.closing(sqlite3.connect(
                f"{self._path(name).as_uri()}?mode=rw", uri=True, timeout=SQLITE_BUSY_TIMEOUT_S
            )) as connection:
                count = self._count(connection)
                stored = connection.execute("SELECT value FROM meta WHERE key = 'regions_per_item'").fetchone()
        except sqlite3.Error as error:
            if self._path(name).exists():
                logger.warning("not listing collection %s: its file %s does not read (%s)",
                               name, self._path(name), error)
            return None
        return CollectionInfo(name, count, stored is not None and int(json.loads(stored[0])) > 0)

    def field_summaries(self, collection_name: str) -> list[FieldSummary]:
        def run() -> list[FieldSummary]:
            collection = self._existing(collection_name)
            with collection.lock.reading():
                self._check_not_dropped(collection)
                connection = collection.connection()
                return [
                    self._field_summary(connection, field, field_type)
                    for field, field_type in self._settings.filter_fields.items()
                ]

        return self._timed("field_summaries", run)

    @staticmethod
    def _field_summary(connection: sqlite3.Connection, field: str, field_type: FieldType) -> FieldSummary:
        column = _quoted(field)
        present = f"{_quoted(columns.presence_column(field))} = 1"
        if field_type in ("float", "int"):
            count, minimum, maximum = connection.execute(
                f"SELECT count(*), min({column}), max({column}) FROM items WHERE {present}"
            ).fetchone()
            return FieldSummary(field, field_type, int(count),
                                minimum=None if minimum is None else float(minimum),
                                maximum=None if maximum is None else float(maximum))
        count = int(connection.execute(f"SELECT count(*) FROM items WHERE {present}").fetchone()[0])
        # One row past the listed ones says whether there are more. Ties by value: SQLite's BINARY
        # collation orders text by code point, as Python does, and bools 0 before 1 ("false", "true").
        counted = connection.execute(
            f"SELECT {column}, count(*) AS n FROM items WHERE {present} GROUP BY {column} ORDER BY n DESC, {column} "
            "LIMIT ?", (TOP_VALUES + 1,),
        ).fetchall()
        listed, more = top_values((value_text(value, field_type), int(n)) for value, n in counted)
        return FieldSummary(field, field_type, count, listed, more)


def faiss_gpus() -> int:
    """GPUs this faiss build can use (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0


def _item_columns(include_vectors: bool, include_copy_features: bool) -> list[str]:
    """The columns Get and List read: the item's fields, with its vector and copy features when asked."""
    names = [columns.ID, columns.IMAGE_URI, columns.METADATA, columns.CONTENT_SHA256]
    if include_vectors:
        names.append(columns.VECTOR)
    if include_copy_features:
        names.append(columns.COPY_FEATURES)
    return names

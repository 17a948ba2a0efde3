"""The FAISS backend's own promises, on the store itself: IVF training in the background without
losing the writes made meanwhile, snapshots that only count when they match the SQLite file, and
exact filtered search on IVF, copy features read from SQLite for the hits only, and a file created
before copy features existed migrated in place. (The gRPC behaviour both backends share is in
test_search_service.)"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from search_svc import columns
from search_svc.faiss_store import FaissStore, auto_nlist
from search_svc.filters import FilterCondition
from search_svc.item_codec import ItemCodec
from search_svc.metrics import StoreMetrics
from search_svc.settings import FaissSettings, SearchSettings
from vsearch.v1 import search_pb2

DIM = 8
FIELDS = {"category": "string", "price": "float"}


def settings(data_dir: Path, **overrides: object) -> SearchSettings:
    return SearchSettings(
        backend=overrides.pop("backend", "faiss"), dimension=DIM, filter_fields=FIELDS,
        faiss=FaissSettings(data_dir=data_dir, **overrides.pop("faiss", {})), **overrides,
    )


def open_store(data_dir: Path, **overrides: object) -> tuple[FaissStore, CollectorRegistry]:
    registry = CollectorRegistry()
    store = FaissStore(settings(data_dir, **overrides), StoreMetrics("faiss", registry))
    store.open()
    return store, registry


def builds(registry: CollectorRegistry, index: str) -> float:
    labels = {"backend": "faiss", "index": index}
    return registry.get_sample_value("vsearch_store_index_build_seconds_count", labels) or 0.0


def clustered(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, DIM))
    vectors = centres[rng.integers(0, 10, count)] + 0.3 * rng.normal(size=(count, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def rows(ids: list[str], vectors: np.ndarray, first: int = 0, copy_features: Sequence[bytes] = ()) -> list[dict]:
    """Rows for the items; item `first + n` has category c{(first + n) % 3} and price first + n, and the
    n-th of `copy_features` when given."""
    codec = ItemCodec(DIM, FIELDS)
    items = []
    for n, (item_id, vector) in enumerate(zip(ids, vectors), start=first):
        message = search_pb2.Item(id=item_id, copy_features=copy_features[n - first] if copy_features else b"")
        message.vector.values.extend(vector.tolist())
        message.metadata.update({"category": f"c{n % 3}", "price": float(n)})
        items.append(message)
    return codec.rows(items)


def top_ids(store: FaissStore, query: np.ndarray, k: int, *conditions: FilterCondition) -> list[str]:
    [hits] = store.search(store.default_collection, query[None, :], k, list(conditions))
    return [hit.id for hit in hits]


def exact_ids(ids: list[str], vectors: np.ndarray, query: np.ndarray, k: int) -> list[str]:
    return [ids[n] for n in np.argsort(-(vectors @ query), kind="stable")[:k]]


@pytest.fixture
def closing() -> Iterator[list[FaissStore]]:
    stores: list[FaissStore] = []
    yield stores
    for store in stores:
        store.close()


def test_ivf_trains_in_the_background_and_keeps_writes_made_meanwhile(tmp_path: Path, closing: list[FaissStore],
                                                                       monkeypatch: pytest.MonkeyPatch):
    store, registry = open_store(tmp_path, index_type="IVF_FLAT", faiss={"ivf_train_min_items": 200})
    closing.append(store)
    collection = store._collections[store.default_collection]
    # Hold the background build after it has read its snapshot, to write while it is in flight.
    built, release = threading.Event(), threading.Event()
    original_build = store._build

    def held_build(*args: object) -> faiss.Index:
        index = original_build(*args)
        if threading.current_thread() is collection.rebuild:
            built.set()
            assert release.wait(30)
        return index

    monkeypatch.setattr(store, "_build", held_build)
    vectors = clustered(400, seed=1)
    ids = [f"v{n}" for n in range(400)]
    store.upsert(store.default_collection, rows(ids[:250], vectors[:250]))  # crosses 200: training starts
    assert built.wait(60), "no background build started"
    assert not collection.is_ivf  # still the flat index, serving exactly
    store.upsert(store.default_collection, rows(ids[250:], vectors[250:]))  # new items
    replaced = clustered(5, seed=2)
    store.upsert(store.default_collection, rows(ids[:5], replaced))  # items of the snapshot, changed
    store.delete(store.default_collection, ids[5:10])
    release.set()
    collection.rebuild.join(60)
    assert collection.is_ivf and builds(registry, "ivf") == 1
    assert collection.index.nlist == auto_nlist(250) and collection.ivf_trained_items == 250

    current = vectors.copy()
    current[:5] = replaced
    keep = [n for n in range(400) if not 5 <= n < 10]
    assert collection.index.ntotal == store.count(store.default_collection) == len(keep)
    kept_ids, kept_vectors = [ids[n] for n in keep], current[keep]
    for query in clustered(5, seed=3):
        # nprobe covers every list here (nlist 8 < 16): exact.
        assert top_ids(store, query, 10) == exact_ids(kept_ids, kept_vectors, query, 10)
    assert store.get(store.default_collection, ["v0"], include_vectors=True)[0]["vector"] == pytest.approx(replaced[0])


def test_filtered_ivf_search_is_exact_over_the_allowed_items(tmp_path: Path, closing: list[FaissStore]):
    store, _ = open_store(
        tmp_path, index_type="IVF_FLAT", index_params={"nlist": 20}, search_params={"nprobe": 1},
        faiss={"ivf_train_min_items": 1000},
    )
    closing.append(store)
    vectors = clustered(1000, seed=4)
    ids = [f"i{n}" for n in range(1000)]
    store.upsert(store.default_collection, rows(ids, vectors))
    collection = store._collections[store.default_collection]
    collection.rebuild.join(60)
    assert collection.is_ivf and collection.index.nlist == 20
    rare = FilterCondition("price", "<", (30.0,))  # items 0..29, spread over many lists
    allowed = list(range(30))
    for query in clustered(5, seed=5):
        expected = exact_ids([ids[n] for n in allowed], vectors[allowed], query, 10)
        assert top_ids(store, query, 10, rare) == expected
        # Unfiltered, one probed list may hold fewer than k items; the answer still has k.
        assert len(top_ids(store, query, 200)) == 200
    assert top_ids(store, vectors[0], 10, FilterCondition("category", "==", ('c0" OR 1=1 --',))) == []


def test_ivf_probes_as_many_lists_as_its_scan_budget_covers(tmp_path: Path, closing: list[FaissStore]):
    """Without search_params' nprobe, an IVF search probes the lists that hold about
    faiss.ivf_scan_vectors vectors: a budget as large as the index is exact, one below 16 lists' worth
    still probes 16 and misses neighbours; search_params' nprobe wins over the budget."""
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(4000, DIM)).astype(np.float32)  # no clusters: IVF lists cut neighbourhoods
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"u{n}" for n in range(4000)]
    queries = rng.normal(size=(20, DIM)).astype(np.float32)
    exact = [exact_ids(ids, vectors, query, 10) for query in queries]

    def answers(name: str, scan_vectors: int, **overrides: object) -> list[list[str]]:
        store, _ = open_store(
            tmp_path / name, index_type="IVF_FLAT", index_params={"nlist": 100},
            faiss={"ivf_train_min_items": 4000, "ivf_scan_vectors": scan_vectors}, **overrides,
        )
        closing.append(store)
        store.upsert(store.default_collection, rows(ids, vectors))
        collection = store._collections[store.default_collection]
        collection.rebuild.join(60)
        assert collection.is_ivf and collection.index.nlist == 100
        return [top_ids(store, query, 10) for query in queries]

    assert answers("whole", scan_vectors=4000) == exact  # 100 lists of 40: every list
    assert answers("least", scan_vectors=1) != exact  # 16 lists of 100
    assert answers("pinned", scan_vectors=4000, search_params={"nprobe": 1}) != exact

    store = FaissStore(settings(tmp_path / "arithmetic"), StoreMetrics("faiss", CollectorRegistry()))
    assert store.nprobe(800, 137_160) == 96  # 9,144 images with regions: lists of 171 vectors
    assert store.nprobe(4_000, 1_000_000) == 66
    assert store.nprobe(40_000, 100_000_000) == 16  # lists of 2,500: the floor
    assert store.nprobe(234, 9_144) == 234  # a small index is searched whole


def test_filter_results_are_cached_until_the_next_write(tmp_path: Path, closing: list[FaissStore]):
    store, registry = open_store(tmp_path, index_type="FLAT")
    closing.append(store)
    vectors = clustered(30, seed=10)
    ids = [f"f{n}" for n in range(30)]
    store.upsert(store.default_collection, rows(ids[:20], vectors[:20]))  # categories c0, c1, c2 by n % 3
    c1 = FilterCondition("category", "==", ("c1",))

    def cache(result: str) -> float:
        labels = {"backend": "faiss", "result": result}
        return registry.get_sample_value("vsearch_store_filter_cache_total", labels) or 0.0

    first = top_ids(store, vectors[1], 30, c1)
    assert set(first) == {ids[n] for n in range(20) if n % 3 == 1} and cache("miss") == 1
    assert top_ids(store, vectors[4], 30, c1) == top_ids(store, vectors[4], 30, c1)
    assert cache("hit") == 2 and cache("miss") == 1
    store.upsert(store.default_collection, rows(ids[20:], vectors[20:], first=20))  # adds c1 items: a new revision
    after = top_ids(store, vectors[1], 30, c1)
    assert set(after) == {ids[n] for n in range(30) if n % 3 == 1} and cache("miss") == 2
    store.delete(store.default_collection, [ids[1]])
    assert ids[1] not in top_ids(store, vectors[1], 30, c1) and cache("miss") == 3


def test_snapshot_is_used_only_when_it_matches_the_file(tmp_path: Path, closing: list[FaissStore]):
    vectors = clustered(50, seed=6)
    ids = [f"s{n}" for n in range(50)]
    first, registry = open_store(tmp_path, index_type="FLAT")
    first.upsert(first.default_collection, rows(ids[:40], vectors[:40]))
    first.close()  # a clean shutdown writes a snapshot
    assert len(list(tmp_path.glob("vsearch_images.*.r*.flat.faiss"))) == 1

    second, registry = open_store(tmp_path, index_type="FLAT")
    assert builds(registry, "flat") == 0  # loaded, not rebuilt
    assert second.count(second.default_collection) == 40
    second.upsert(second.default_collection, rows(ids[40:], vectors[40:]))
    second.delete(second.default_collection, ids[:2])
    # A crash: no close(), so the snapshot on disk is older than the SQLite file.
    for collection in second._collections.values():
        collection.close_connections()

    third, registry = open_store(tmp_path, index_type="FLAT")
    closing.append(third)
    assert builds(registry, "flat") == 1  # the stale snapshot was ignored
    assert third.count(third.default_collection) == 48
    assert top_ids(third, vectors[45], 1) == ["s45"]
    assert top_ids(third, vectors[0], 1) != ["s0"]


def test_a_snapshot_never_matches_a_recreated_file(tmp_path: Path, closing: list[FaissStore]):
    old, new = clustered(5, seed=8), clustered(5, seed=9)
    first, _ = open_store(tmp_path, index_type="FLAT")
    first.upsert(first.default_collection, rows([f"old{n}" for n in range(5)], old))
    first.close()  # snapshot at revision 1
    for path in tmp_path.glob("vsearch_images.sqlite3*"):
        path.unlink()  # the file is deleted by hand; the snapshot stays
    second, _ = open_store(tmp_path, index_type="FLAT")
    second.upsert(second.default_collection, rows([f"new{n}" for n in range(5)], new))  # revision 1 again
    for collection in second._collections.values():
        collection.close_connections()  # a crash: no snapshot of its own
    third, registry = open_store(tmp_path, index_type="FLAT")
    closing.append(third)
    assert builds(registry, "flat") == 1
    assert top_ids(third, new[2], 1) == ["new2"]


def test_writes_survive_a_crash_without_any_snapshot(tmp_path: Path, closing: list[FaissStore]):
    vectors = clustered(20, seed=7)
    ids = [f"c{n}" for n in range(20)]
    crashed, _ = open_store(tmp_path)
    crashed.upsert(crashed.default_collection, rows(ids, vectors))
    crashed.upsert("other", rows(ids[:3], vectors[:3]))
    for collection in crashed._collections.values():
        collection.close_connections()
    reopened, _ = open_store(tmp_path)
    closing.append(reopened)
    assert reopened.count(reopened.default_collection) == 20 and reopened.count("other") == 3
    assert top_ids(reopened, vectors[7], 1) == ["c7"]


def test_search_reads_the_copy_features_of_all_hits_in_one_statement(tmp_path: Path, closing: list[FaissStore]):
    """Copy features stay in SQLite (never in the index or a cache): a search asking for them reads
    them with the hits' other columns, one statement for all the hits of all its queries."""
    store, _ = open_store(tmp_path, index_type="FLAT")
    closing.append(store)
    vectors = clustered(200, seed=12)
    ids = [f"cf{n}" for n in range(200)]
    features = [f"features of {item_id}".encode() * 100 for item_id in ids]
    store.upsert(store.default_collection, rows(ids, vectors, copy_features=features))
    statements: list[str] = []
    store._collections[store.default_collection].connection().set_trace_callback(statements.append)

    results = store.search(store.default_collection, vectors[:10], 30, [], include_copy_features=True)
    assert [len(hits) for hits in results] == [30] * 10
    assert all(hit.copy_features == features[ids.index(hit.id)] for hits in results for hit in hits)
    [select] = statements
    assert select.startswith("SELECT") and columns.COPY_FEATURES in select

    statements.clear()
    [hits] = store.search(store.default_collection, vectors[:1], 30, [])
    assert all(hit.copy_features == b"" for hit in hits)
    assert statements and not any(columns.COPY_FEATURES in statement for statement in statements)


# The items table and meta rows as search_svc wrote them before copy features existed (commit d620986).
TABLE_BEFORE_COPY_FEATURES = (
    "CREATE TABLE items (label INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, vector BLOB NOT NULL, "
    "image_uri TEXT NOT NULL, metadata TEXT NOT NULL, content_sha256 TEXT NOT NULL, "
    '"category" TEXT NOT NULL, "_has_category" INTEGER NOT NULL, "price" REAL NOT NULL, "_has_price" INTEGER NOT NULL)'
)


def write_file_before_copy_features(path: Path, items: list[dict]) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    connection.execute(TABLE_BEFORE_COPY_FEATURES)
    for field in FIELDS:
        connection.execute(f'CREATE INDEX "items_by_{field}" ON items ("{field}")')
    meta = {"dimension": DIM, "filter_fields": FIELDS, "file_id": "0123456789abcdef", "revision": 1,
            "next_label": len(items) + 1}
    connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
    connection.executemany(
        "INSERT INTO items (label, id, vector, image_uri, metadata, content_sha256, category, _has_category, price, "
        "_has_price) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(label, row["id"], row["vector"].astype("<f4").tobytes(), row["image_uri"], row["metadata"],
          row["content_sha256"], row["category"], row["_has_category"], row["price"], row["_has_price"])
         for label, row in enumerate(items, start=1)],
    )
    connection.close()


def test_a_file_created_before_copy_features_is_migrated_in_place_losing_nothing(tmp_path: Path,
                                                                                 closing: list[FaissStore]):
    vectors = clustered(40, seed=13)
    ids = [f"old{n}" for n in range(40)]
    old_rows = rows(ids, vectors)
    for n, row in enumerate(old_rows):
        row["image_uri"], row["content_sha256"] = f"file:///old/{n}.jpg", f"{n:064x}"
    path = tmp_path / "vsearch_images.sqlite3"
    write_file_before_copy_features(path, old_rows)

    store, _ = open_store(tmp_path, index_type="FLAT")
    assert columns.COPY_FEATURES in {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(items)")}
    collection = store.default_collection
    assert store.count(collection) == 40
    got = {row["id"]: row for row in store.get(collection, ids, include_vectors=True, include_copy_features=True)}
    for n, item_id in enumerate(ids):
        row = got[item_id]
        assert (row["image_uri"], row["content_sha256"], row[columns.COPY_FEATURES]) == (
            f"file:///old/{n}.jpg", f"{n:064x}", b"")
        assert json.loads(row["metadata"]) == {"category": f"c{n % 3}", "price": float(n)}
        assert row["vector"] == pytest.approx(vectors[n])
    assert top_ids(store, vectors[7], 3) == exact_ids(ids, vectors, vectors[7], 3)
    assert set(top_ids(store, vectors[0], 40, FilterCondition("category", "==", ("c1",)))) == {
        ids[n] for n in range(40) if n % 3 == 1}

    # New writes keep their copy features, and labels go on from where the old file left them.
    store.upsert(collection, rows(["old3", "new0"], clustered(2, seed=14), copy_features=[b"three", b"new"]))
    store.close()
    reopened, _ = open_store(tmp_path, index_type="FLAT")  # migrated already: opens as any current file
    closing.append(reopened)
    assert reopened.count(collection) == 41
    features = {row["id"]: row[columns.COPY_FEATURES]
                for row in reopened.get(collection, ["old2", "old3", "new0"], False, include_copy_features=True)}
    assert features == {"old2": b"", "old3": b"three", "new0": b"new"}
    [hits] = reopened.search(collection, vectors[2][None, :], 1, [], include_copy_features=True)
    assert (hits[0].id, hits[0].copy_features) == ("old2", b"")

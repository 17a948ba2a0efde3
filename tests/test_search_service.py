"""search_svc over gRPC, in process on port 0, on both backends: a real embedded Milvus Lite file and
the in-process FAISS store on its SQLite files. Every test runs on each (the `backend` fixture)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import math
import random
from pathlib import Path
from typing import AsyncIterator, Callable

import grpc
import numpy as np
import pytest
import pytest_asyncio
from google.protobuf import json_format, struct_pb2

from conftest import CROPPED, FEATURE_CATALOG, copy_search_request, metric_value, wait_until
from search_svc.columns import COPY_FEATURES_MAX_BYTES
from search_svc.filters import MAX_CONDITIONS, MAX_LIST_VALUES
from search_svc.server import create_server
from search_svc.settings import FaissSettings, MilvusSettings, SearchSettings
from service_kit.copy_feature_codec import without_mirrored_set
from service_kit.server import ManagedServer
from service_kit.struct_nesting import MAX_STRUCT_DEPTH
from vsearch.v1 import search_pb2, search_pb2_grpc

DIM = 16
FIELDS = {"category": "string", "price": "float", "stock": "int", "in_stock": "bool"}


class Service:
    def __init__(self, server: ManagedServer, stub: search_pb2_grpc.VectorSearchStub) -> None:
        self.server = server
        self.stub = stub

    async def upsert(self, items: list[search_pb2.Item]) -> search_pb2.UpsertResponse:
        return await self.stub.Upsert(search_pb2.UpsertRequest(items=items))

    async def search(self, queries: np.ndarray, k: int, *conditions: search_pb2.Condition,
                     min_score: float | None = None, include_copy_features: bool = False) -> search_pb2.SearchResponse:
        request = search_pb2.SearchRequest(
            queries=[search_pb2.Vector(values=q.tolist()) for q in np.atleast_2d(queries)], k=k,
            filter=search_pb2.Filter(conditions=list(conditions)), include_copy_features=include_copy_features,
        )
        if min_score is not None:
            request.min_score = min_score
        return await self.stub.Search(request)

    async def ids(self, *conditions: search_pb2.Condition, k: int = 1000) -> set[str]:
        response = await self.search(unit(np.ones(DIM)), k, *conditions)
        return {hit.id for hit in response.results[0].hits}

    async def count(self) -> int:
        return (await self.stub.Stats(search_pb2.StatsRequest())).count


BACKENDS = ["faiss", "milvus"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def search_settings(location: Path, backend: str, **overrides: object) -> SearchSettings:
    """Settings storing under `location` (a Milvus Lite file next to it, or the FAISS data dir)."""
    return SearchSettings(
        port=0, dimension=overrides.pop("dimension", DIM), log_format="text", backend=backend,
        milvus=MilvusSettings(uri=str(location.with_suffix(".db")), timeout_s=20),
        faiss=FaissSettings(data_dir=location, **overrides.pop("faiss", {})),
        filter_fields=overrides.pop("filter_fields", FIELDS), **overrides,
    )


def wipe(location: Path) -> None:
    location.with_suffix(".db").unlink(missing_ok=True)
    shutil.rmtree(location, ignore_errors=True)


@contextlib.asynccontextmanager
async def running(location: Path, backend: str, **overrides: object) -> AsyncIterator[Service]:
    settings = search_settings(location, backend, **overrides)
    server, port = await create_server(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await server.wait_ready(timeout=60)
        yield Service(server, search_pb2_grpc.VectorSearchStub(channel))
    finally:
        await channel.close()
        await server.stop(grace=1)


@pytest_asyncio.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory, backend: str) -> AsyncIterator[Service]:
    """One service for the tests that only add uniquely named items and look at those."""
    async with running(tmp_path_factory.mktemp("search") / "shared", backend) as service:
        yield service


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def random_unit_vectors(count: int, seed: int, dim: int = DIM) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def item(item_id: str, vector: np.ndarray | list[float], copy_features: bytes = b"", **metadata: object) -> search_pb2.Item:
    message = search_pb2.Item(id=item_id, image_uri=f"file:///images/{item_id}.jpg", copy_features=copy_features)
    message.vector.values.extend(np.asarray(vector, dtype=np.float32).tolist())
    message.metadata.update(metadata)
    return message


def nested_metadata(depth: int) -> object:
    """A value `depth` levels deep (objects and lists in turn) under a metadata key, which makes the
    metadata itself one level deeper."""
    value: object = "leaf"
    for level in range(depth):
        value = {"next": value} if level % 2 else [value]
    return value


def condition(field: str, op: int, python_value: object) -> search_pb2.Condition:
    wrapper = struct_pb2.Struct()
    wrapper.update({"v": python_value})
    return search_pb2.Condition(field=field, op=op, value=wrapper.fields["v"])


async def expect_invalid(call, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()
    return caught.value.details()


# --- round trip, ranking, indexes, batches ------------------------------------------------------


async def test_round_trip(tmp_path: Path, backend: str):
    async with running(tmp_path / "store", backend) as service:
        stats = await service.stub.Stats(search_pb2.StatsRequest())
        # Each backend's default index type (exact at this size either way).
        expected_index = "IVF_FLAT" if backend == "faiss" else "FLAT"
        assert (stats.count, stats.index_type, stats.metric, stats.dimension) == (0, expected_index, "IP", DIM)
        assert stats.collection == "vsearch_images"
        assert list(stats.filterable_fields) == ["category", "price", "stock", "in_stock"]

        vectors = np.eye(DIM, dtype=np.float32)
        upserted = await service.upsert([
            item("shoe-1", vectors[0], category="shoes", price=59.5, stock=3, in_stock=True, tags=["red", "leather"]),
            item("hat-1", vectors[1], category="hats", price=20),
            item("bare", unit(vectors[0] + vectors[1])),
        ])
        assert upserted.upserted == 3 and upserted.generation > stats.generation
        assert await service.count() == 3

        response = await service.search(vectors[0], 10)
        assert response.generation == upserted.generation
        [hits] = response.results
        assert [hit.id for hit in hits.hits] == ["shoe-1", "bare", "hat-1"]
        assert [round(hit.score, 5) for hit in hits.hits] == [1.0, round(1 / math.sqrt(2), 5), 0.0]
        first = hits.hits[0]
        assert first.image_uri == "file:///images/shoe-1.jpg"
        assert json_format.MessageToDict(first.metadata) == {
            "category": "shoes", "price": 59.5, "stock": 3, "in_stock": True, "tags": ["red", "leather"],
        }

        got = await service.stub.Get(search_pb2.GetRequest(ids=["hat-1", "missing", "shoe-1"]))
        assert [found.id for found in got.items] == ["hat-1", "shoe-1"]
        assert not got.items[0].vector.values
        assert json_format.MessageToDict(got.items[0].metadata) == {"category": "hats", "price": 20}
        with_vectors = await service.stub.Get(search_pb2.GetRequest(ids=["hat-1"], include_vectors=True))
        assert np.allclose(with_vectors.items[0].vector.values, vectors[1])

        deleted = await service.stub.Delete(search_pb2.DeleteRequest(ids=["hat-1", "missing", "hat-1"]))
        assert deleted.deleted == 1 and deleted.generation > upserted.generation
        assert await service.count() == 2
        assert [hit.id for hit in (await service.search(vectors[1], 10)).results[0].hits] == ["bare", "shoe-1"]
        assert not (await service.stub.Get(search_pb2.GetRequest(ids=["hat-1"]))).items

        nothing = await service.stub.Delete(search_pb2.DeleteRequest(ids=["hat-1"]))
        assert nothing.deleted == 0 and nothing.generation == deleted.generation  # nothing changed

        empty = await service.upsert([])
        assert empty.upserted == 0 and empty.generation == deleted.generation


async def test_ranking_matches_brute_force_and_min_score(shared: Service):
    vectors = random_unit_vectors(300, seed=1)
    ids = [f"rank-{n:03d}" for n in range(len(vectors))]
    await shared.upsert([item(item_id, vector, category="ranking") for item_id, vector in zip(ids, vectors)])
    queries = random_unit_vectors(4, seed=2)
    only_these = condition("category", search_pb2.EQ, "ranking")

    response = await shared.search(queries, 25, only_these)
    assert len(response.results) == len(queries)
    for query, hits in zip(queries, response.results):
        scores = vectors @ query
        expected = np.argsort(-scores, kind="stable")[:25]
        assert [hit.id for hit in hits.hits] == [ids[n] for n in expected]
        assert np.allclose([hit.score for hit in hits.hits], scores[expected], atol=1e-5)
        got = [hit.score for hit in hits.hits]
        assert got == sorted(got, reverse=True)

    threshold = 0.3
    response = await shared.search(queries, 300, only_these, min_score=threshold)
    for query, hits in zip(queries, response.results):
        scores = dict(zip(ids, vectors @ query))
        got = {hit.id for hit in hits.hits}
        assert all(hit.score >= threshold for hit in hits.hits)
        assert {item_id for item_id, score in scores.items() if score >= threshold + 1e-5} <= got
        assert all(scores[item_id] >= threshold - 1e-5 for item_id in got)


async def test_ivf_flat_index(tmp_path: Path, backend: str):
    async with running(
        tmp_path / "ivf", backend, faiss={"ivf_train_min_items": 100}, index_type="IVF_FLAT", index_params={"nlist": 8}, search_params={"nprobe": 8}
    ) as service:
        vectors = random_unit_vectors(400, seed=3)
        await service.upsert([item(f"v{n}", vector) for n, vector in enumerate(vectors)])
        stats = await service.stub.Stats(search_pb2.StatsRequest())
        assert (stats.index_type, stats.count) == ("IVF_FLAT", 400)
        query = random_unit_vectors(1, seed=4)[0]
        hits = (await service.search(query, 10)).results[0].hits
        # nprobe == nlist searches every list: exact.
        assert [hit.id for hit in hits] == [f"v{n}" for n in np.argsort(-(vectors @ query))[:10]]


async def test_upsert_larger_than_one_batch(tmp_path: Path, backend: str):
    async with running(tmp_path / "bulk", backend) as service:
        vectors = random_unit_vectors(7000, seed=5)
        response = await service.upsert(
            [item(f"bulk-{n}", vector, category=f"c{n % 7}", price=float(n)) for n, vector in enumerate(vectors)]
        )
        assert response.upserted == 7000
        assert await service.count() == 7000
        batches = service.server.metrics.registry.get_sample_value(
            "vsearch_store_call_seconds_count", {"backend": backend, "operation": "upsert"}
        )
        # Milvus gets batches of 3000 + 3000 + 1000; SQLite takes one transaction.
        assert batches == (3 if backend == "milvus" else 1)
        sample = [f"bulk-{n}" for n in (0, 2999, 3000, 5999, 6000, 6999)]
        got = await service.stub.Get(search_pb2.GetRequest(ids=sample))
        assert [found.id for found in got.items] == sample
        assert got.items[-1].metadata["price"] == 6999
        hits = (await service.search(vectors[6500], 1)).results[0].hits
        assert hits[0].id == "bulk-6500"


async def test_reupsert_replaces_the_item(shared: Service):
    vectors = random_unit_vectors(2, seed=6)
    await shared.upsert([item("replace-me", vectors[0], category="old", price=1)])
    before = await shared.count()
    await shared.upsert([item("replace-me", vectors[1], category="new", note="second")])
    assert await shared.count() == before
    [found] = (await shared.stub.Get(search_pb2.GetRequest(ids=["replace-me"], include_vectors=True))).items
    assert json_format.MessageToDict(found.metadata) == {"category": "new", "note": "second"}
    assert np.allclose(found.vector.values, vectors[1])
    assert await shared.ids(condition("category", search_pb2.EQ, "old")) == set()
    assert await shared.ids(condition("category", search_pb2.EQ, "new")) == {"replace-me"}
    assert await shared.ids(condition("price", search_pb2.GE, 0), condition("category", search_pb2.EQ, "new")) == set()


async def test_ids_with_quotes_percent_and_unicode(shared: Service):
    odd_ids = ["it's", "100%", "%27", 'dq"\\', "%0A", "x') OR ('1'='1", "é✓😀", "trailing space "]
    vectors = random_unit_vectors(len(odd_ids), seed=7)
    before = await shared.count()
    await shared.upsert([item(item_id, vector, category="odd-ids") for item_id, vector in zip(odd_ids, vectors)])
    assert await shared.count() == before + len(odd_ids)
    got = await shared.stub.Get(search_pb2.GetRequest(ids=odd_ids))
    assert [found.id for found in got.items] == odd_ids
    assert await shared.ids(condition("category", search_pb2.EQ, "odd-ids")) == set(odd_ids)
    deleted = await shared.stub.Delete(search_pb2.DeleteRequest(ids=odd_ids[:4]))
    assert deleted.deleted == 4
    assert await shared.ids(condition("category", search_pb2.EQ, "odd-ids")) == set(odd_ids[4:])
    assert await shared.count() == before + len(odd_ids) - 4


async def test_ids_with_control_characters_are_refused_everywhere_naming_the_id(shared: Service):
    vector = random_unit_vectors(1, seed=12)[0]
    before = await shared.count()
    for bad_id, shown in [("line\nbreak", r"'line\nbreak'"), ("nul\x00", r"'nul\x00'"), ("del\x7f", r"'del\x7f'")]:
        # The whole upsert is refused, the good item beside the bad one included.
        await expect_invalid(shared.upsert([item("ctl-fine", vector), item(bad_id, vector)]), shown, "control character")
        await expect_invalid(shared.stub.Get(search_pb2.GetRequest(ids=["ctl-fine", bad_id])), shown, "control character")
        await expect_invalid(shared.stub.Delete(search_pb2.DeleteRequest(ids=[bad_id])), shown, "control character")
    assert await shared.count() == before
    assert not (await shared.stub.Get(search_pb2.GetRequest(ids=["ctl-fine"]))).items


async def test_generation_increases_on_every_write_and_across_restarts(tmp_path: Path, backend: str):
    location = tmp_path / "generation"
    vectors = random_unit_vectors(3, seed=8)
    async with running(location, backend) as service:
        seen = [(await service.stub.Stats(search_pb2.StatsRequest())).generation]
        seen.append((await service.upsert([item("a", vectors[0])])).generation)
        seen.append((await service.upsert([item("b", vectors[1])])).generation)
        seen.append((await service.upsert([item("a", vectors[2])])).generation)
        seen.append((await service.stub.Delete(search_pb2.DeleteRequest(ids=["b"]))).generation)
        assert seen == sorted(set(seen)), seen
        assert (await service.search(vectors[0], 1)).generation == seen[-1]
        assert (await service.stub.Stats(search_pb2.StatsRequest())).generation == seen[-1]
        # The cheap form the gateway polls: same generation, no count.
        cheap = await service.stub.Stats(search_pb2.StatsRequest(skip_count=True))
        assert (cheap.generation, cheap.count, cheap.dimension) == (seen[-1], 0, DIM)
    async with running(location, backend) as restarted:
        stats = await restarted.stub.Stats(search_pb2.StatsRequest())
        assert stats.count == 1  # the data survived the restart
        assert stats.generation > seen[-1]
        assert (await restarted.upsert([item("c", vectors[0])])).generation > stats.generation
    wipe(location)
    async with running(location, backend) as wiped:
        stats = await wiped.stub.Stats(search_pb2.StatsRequest())
        assert stats.count == 0 and stats.generation > seen[-1]


async def test_refuses_a_collection_of_another_dimension(tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture):
    location = tmp_path / "dimension"
    async with running(location, backend):
        pass
    settings = search_settings(location, backend, dimension=DIM * 2)
    server, _port = await create_server(settings)
    refusal = f"its vectors have dimension {DIM}, SEARCH_DIMENSION is {DIM * 2}"
    with caplog.at_level(logging.WARNING, logger="service_kit.server"):
        await server.start()
        try:
            # Opening the store may take seconds (Milvus Lite restarts): wait for startup's verdict.
            await wait_until(lambda: refusal in caplog.text, 30, "the startup refusal logged")
            assert not server.ready
        finally:
            await server.stop(grace=0)


# --- filters against the real Milvus -----------------------------------------------------------

TRICKY = [
    'shoes" or category != "',
    "x' or 1==1 or '",
    "x') || (1==1",
    'back\\slash',
    '\\"',
    "\\",
    "''",
    "x'); DELETE FROM t; --",
    'a"b\'c\\d',
    "{c}",
    "é ✓ 😀",
    "",
]


@pytest_asyncio.fixture(scope="module")
async def catalog(shared: Service) -> dict[str, dict]:
    """200 items with random category/price/stock/in_stock (some missing), plus one per tricky value."""
    rng = random.Random(9)
    vectors = random_unit_vectors(200 + len(TRICKY), seed=10)
    metadata: dict[str, dict] = {}
    for n in range(200):
        fields: dict[str, object] = {"kind": "catalog"}
        if rng.random() < 0.9:
            fields["category"] = rng.choice(["shoes", "hats", "bags", "Shoes", "shoes "])
        if rng.random() < 0.9:
            fields["price"] = round(rng.uniform(0, 100), 2)
        if rng.random() < 0.8:
            fields["stock"] = rng.randint(-5, 20)
        if rng.random() < 0.8:
            fields["in_stock"] = rng.random() < 0.5
        metadata[f"cat-{n}"] = fields
    for n, value in enumerate(TRICKY):
        metadata[f"tricky-{n}"] = {"kind": "catalog", "category": value, "price": 1.0}
    await shared.upsert([item(item_id, vector, **fields) for (item_id, fields), vector in zip(metadata.items(), vectors)])
    return metadata


def matching(catalog: dict[str, dict], predicate: Callable[[dict], bool]) -> set[str]:
    return {item_id for item_id, fields in catalog.items() if predicate(fields)}


def has(fields: dict, *names: str) -> bool:
    return all(name in fields for name in names)


async def test_filters_match_a_python_filter(shared: Service, catalog: dict[str, dict]):
    cases = [
        ([condition("category", search_pb2.EQ, "shoes"), condition("price", search_pb2.LT, 50)],
         lambda f: has(f, "category", "price") and f["category"] == "shoes" and f["price"] < 50),
        ([condition("category", search_pb2.NE, "shoes")],
         lambda f: has(f, "category") and f["category"] != "shoes"),
        ([condition("category", search_pb2.IN, ["hats", "bags", "nope"])],
         lambda f: has(f, "category") and f["category"] in ("hats", "bags")),
        ([condition("category", search_pb2.NOT_IN, ["hats", "bags"])],
         lambda f: has(f, "category") and f["category"] not in ("hats", "bags")),
        ([condition("category", search_pb2.LT, "shoes")],
         lambda f: has(f, "category") and f["category"] < "shoes"),
        ([condition("price", search_pb2.GE, 25.5), condition("price", search_pb2.LE, 75)],
         lambda f: has(f, "price") and 25.5 <= f["price"] <= 75),
        ([condition("price", search_pb2.IN, [1, 2.5])],
         lambda f: has(f, "price") and f["price"] in (1.0, 2.5)),
        ([condition("stock", search_pb2.GT, 0), condition("in_stock", search_pb2.EQ, True)],
         lambda f: has(f, "stock", "in_stock") and f["stock"] > 0 and f["in_stock"]),
        ([condition("stock", search_pb2.NOT_IN, [0, 1, 2])],
         lambda f: has(f, "stock") and f["stock"] not in (0, 1, 2)),
        ([condition("in_stock", search_pb2.NE, True)],
         lambda f: has(f, "in_stock") and not f["in_stock"]),
    ]
    for conditions, predicate in cases:
        expected = matching(catalog, predicate)
        assert expected, conditions  # each case selects something
        got = await shared.ids(*conditions)
        assert got & set(catalog) == expected, conditions


async def test_tricky_strings_match_only_themselves(shared: Service, catalog: dict[str, dict]):
    for n, value in enumerate(TRICKY):
        assert await shared.ids(condition("category", search_pb2.EQ, value)) == {f"tricky-{n}"}, value
        assert await shared.ids(condition("category", search_pb2.IN, [value, "no such category"])) == {f"tricky-{n}"}
        others = await shared.ids(condition("category", search_pb2.NE, value))
        assert f"tricky-{n}" not in others
        assert others & set(catalog) == matching(catalog, lambda f: has(f, "category") and f["category"] != value)
    # Injection attempts that are not stored values match nothing at all, whatever they try to say.
    for attack in ['nothing" or category != "', "nothing' or 1==1 or '", 'x" || true || "', '") or (id != "',
                   "nothing\\", 'nothing\\" or category != \\"']:
        assert await shared.ids(condition("category", search_pb2.EQ, attack)) == set(), attack
        assert await shared.ids(condition("category", search_pb2.IN, [attack])) == set(), attack


async def test_invalid_filters(shared: Service, catalog: dict[str, dict]):
    query = unit(np.ones(DIM))
    await expect_invalid(
        shared.search(query, 5, condition("colour", search_pb2.EQ, "red")),
        "unknown filter field 'colour'; filterable fields: category, price, stock, in_stock",
    )
    await expect_invalid(shared.search(query, 5, condition("in_stock", search_pb2.GT, True)), "GT", "'in_stock'")
    await expect_invalid(
        shared.search(query, 5, search_pb2.Condition(field="price", value=struct_pb2.Value(number_value=1))),
        "'price'", "OPERATOR_UNSPECIFIED",
    )
    await expect_invalid(shared.search(query, 5, condition("price", search_pb2.LT, "cheap")), "'price'", "number")
    await expect_invalid(shared.search(query, 5, condition("category", search_pb2.EQ, 7)), "'category'", "string")
    await expect_invalid(shared.search(query, 5, condition("price", search_pb2.LT, math.nan)), "'price'", "finite")
    await expect_invalid(shared.search(query, 5, condition("price", search_pb2.LT, math.inf)), "'price'", "finite")
    await expect_invalid(shared.search(query, 5, condition("price", search_pb2.IN, [1.0, -math.inf])), "'price'", "finite")
    await expect_invalid(shared.search(query, 5, condition("category", search_pb2.IN, "shoes")), "list")
    await expect_invalid(shared.search(query, 5, condition("category", search_pb2.IN, [])), "non-empty")
    await expect_invalid(shared.search(query, 5, condition("stock", search_pb2.EQ, 1.5)), "'stock'", "integer")


async def test_filters_up_to_the_caps_work_and_beyond_them_are_refused(shared: Service, catalog: dict[str, dict]):
    """MAX_CONDITIONS conditions with MAX_LIST_VALUES values each is the worst filter the caps let
    through (NOT_IN is the operator the Milvus plan takes fewest of); both backends must run it. One
    more condition, or one more value, is INVALID_ARGUMENT naming the limit (on FAISS, 999 conditions
    used to fail as "Expression tree is too large"; on Milvus, 49)."""
    query = unit(np.ones(DIM))
    nowhere = [f"no-such-category-{n}" for n in range(MAX_LIST_VALUES)]
    widest = [condition("category", search_pb2.NOT_IN, nowhere) for _ in range(MAX_CONDITIONS)]
    assert await shared.ids(*widest) & set(catalog) == matching(catalog, lambda f: has(f, "category"))
    prices = [float(n) for n in range(MAX_LIST_VALUES)]
    assert await shared.ids(*[condition("price", search_pb2.IN, prices) for _ in range(MAX_CONDITIONS)]) & set(
        catalog
    ) == matching(catalog, lambda f: has(f, "price") and f["price"] in prices)

    for count in (MAX_CONDITIONS + 1, 1000):
        await expect_invalid(
            shared.search(query, 5, *[condition("price", search_pb2.LT, 100.0 + n) for n in range(count)]),
            f"at most {MAX_CONDITIONS} conditions, got {count}",
        )
    await expect_invalid(
        shared.search(query, 5, condition("price", search_pb2.IN, [*prices, -1.0])),
        "'price'", f"at most {MAX_LIST_VALUES} values, got {MAX_LIST_VALUES + 1}",
    )


# --- bad input ----------------------------------------------------------------------------------


async def test_bad_input_is_refused_and_changes_nothing(shared: Service):
    good = random_unit_vectors(1, seed=11)[0]
    await shared.upsert([item("keeper", good, category="kept", price=5)])
    before = await shared.count()
    generation = (await shared.stub.Stats(search_pb2.StatsRequest())).generation

    bad_searches = [
        (search_pb2.SearchRequest(queries=[search_pb2.Vector(values=good.tolist())], k=0), "k must be between 1 and 1000"),
        (search_pb2.SearchRequest(queries=[search_pb2.Vector(values=good.tolist())], k=100000), "got 100000"),
        (search_pb2.SearchRequest(k=5), "at least one query vector"),
        (search_pb2.SearchRequest(queries=[search_pb2.Vector(values=good.tolist()[:-1])], k=5), "query vector 0 has 15 dimensions"),
        (search_pb2.SearchRequest(queries=[search_pb2.Vector(values=good.tolist()), search_pb2.Vector(values=[math.nan] * DIM)], k=5),
         "query vector 1 contains NaN"),
        (search_pb2.SearchRequest(queries=[search_pb2.Vector(values=good.tolist())], k=5, min_score=math.nan), "min_score"),
        (search_pb2.SearchRequest(queries=[search_pb2.Vector(values=good.tolist()), search_pb2.Vector(values=(good * 2).tolist())], k=5),
         "query vector 1 has norm 2"),
        (search_pb2.SearchRequest(queries=[search_pb2.Vector(values=[0.0] * DIM)], k=5),
         "query vector 0 has norm 0; vectors must be L2-normalised (norm 1 +- 0.001)"),
    ]
    for request, fragment in bad_searches:
        await expect_invalid(shared.stub.Search(request), fragment)

    nan_vector = good.copy()
    nan_vector[3] = math.inf
    bad_upserts = [
        ([item("", good)], "must not be empty"),
        ([item("x" * 300, good)], "300 characters; at most 256"),
        ([item("dup", good), item("dup", good)], "'dup' appears more than once"),
        ([item("short", good[:-1])], "vector of item 'short' has 15 dimensions; expected 16"),
        ([item("inf", nan_vector)], "vector of item 'inf' contains NaN or infinity"),
        # Not unit length: such a vector's inner products are no cosines (1e30 would top every search).
        ([item("zero", np.zeros(DIM))], "vector of item 'zero' has norm 0; vectors must be L2-normalised"),
        ([item("huge", good * 1e30)], "vector of item 'huge' has norm 1e+30"),
        ([item("half", good * 0.5)], "vector of item 'half' has norm 0.5"),
        ([item("nearly", good * 1.002)], "vector of item 'nearly' has norm 1.00"),
        ([item("deep", good, tree=nested_metadata(MAX_STRUCT_DEPTH))], "metadata of item 'deep' nests deeper than 20 levels"),
        ([item("keeper", good, category=3)], "'category' of item 'keeper' must be a string"),
        ([item("keeper", good, price=True)], "'price' of item 'keeper' must be a number"),
        # A bad item late in the request: nothing of it is written, the good items before included.
        ([item("fine-1", good), item("fine-2", good), item("keeper", good, stock="many")], "'stock' of item 'keeper'"),
    ]
    for items, fragment in bad_upserts:
        await expect_invalid(shared.upsert(items), fragment)
    await expect_invalid(shared.stub.Get(search_pb2.GetRequest(ids=["ok", ""])), "must not be empty")
    await expect_invalid(shared.stub.Delete(search_pb2.DeleteRequest(ids=["y" * 257])), "257 characters")

    assert await shared.count() == before
    assert (await shared.stub.Stats(search_pb2.StatsRequest())).generation == generation
    [kept] = (await shared.stub.Get(search_pb2.GetRequest(ids=["keeper", "fine-1"]))).items
    assert json_format.MessageToDict(kept.metadata) == {"category": "kept", "price": 5}

    # Within the tolerance (|norm - 1| <= 1e-3) and at the depth limit: accepted.
    await shared.upsert([item("nearly-unit", good * 1.0005, tree=nested_metadata(MAX_STRUCT_DEPTH - 1))])
    [accepted] = (await shared.stub.Get(search_pb2.GetRequest(ids=["nearly-unit"]))).items
    assert json_format.MessageToDict(accepted.metadata)["tree"] == nested_metadata(MAX_STRUCT_DEPTH - 1)


# --- collections and content hashes -----------------------------------------------------------

async def test_named_collections_are_separate_catalogs(tmp_path: Path, backend: str):
    vectors = random_unit_vectors(4, seed=21)
    async with running(tmp_path / "collections", backend) as service:
        stub = service.stub
        await service.upsert([item("in-default", vectors[0], category="a")])
        # The first write to a named collection creates it; the default one is untouched.
        reply = await stub.Upsert(search_pb2.UpsertRequest(
            collection="eval_1", items=[item("x", vectors[1]), item("y", vectors[2])]))
        assert reply.upserted == 2
        assert (await stub.Stats(search_pb2.StatsRequest(collection="eval_1"))).count == 2
        assert (await stub.Stats(search_pb2.StatsRequest())).count == 1
        hits = await stub.Search(search_pb2.SearchRequest(
            collection="eval_1", queries=[search_pb2.Vector(values=vectors[0].tolist())], k=10))
        assert {hit.id for hit in hits.results[0].hits} == {"x", "y"}
        got = await stub.Get(search_pb2.GetRequest(collection="eval_1", ids=["x", "in-default"]))
        assert [i.id for i in got.items] == ["x"]

        # Reading a collection that does not exist is NOT_FOUND; Get and Delete find nothing.
        for call in (
            stub.Search(search_pb2.SearchRequest(
                collection="nope", queries=[search_pb2.Vector(values=vectors[0].tolist())], k=1)),
            stub.Stats(search_pb2.StatsRequest(collection="nope")),
            stub.Stats(search_pb2.StatsRequest(collection="nope", skip_count=True)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in caught.value.details()
        assert not (await stub.Get(search_pb2.GetRequest(collection="nope", ids=["x"]))).items
        assert (await stub.Delete(search_pb2.DeleteRequest(collection="nope", ids=["x"]))).deleted == 0

        await expect_invalid(stub.Upsert(search_pb2.UpsertRequest(
            collection='x"; drop', items=[item("z", vectors[3])])), "collection name")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.DropCollection(search_pb2.DropCollectionRequest(collection=service.server.settings.collection))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        dropped = await stub.DropCollection(search_pb2.DropCollectionRequest(collection="eval_1"))
        assert dropped.dropped
        assert not (await stub.DropCollection(search_pb2.DropCollectionRequest(collection="eval_1"))).dropped
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Stats(search_pb2.StatsRequest(collection="eval_1"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert await service.count() == 1


async def test_content_sha256_round_trips_and_is_checked(shared: Service):
    digest = "ab" * 32
    stored = item("hashed-item", random_unit_vectors(1, seed=22)[0])
    stored.content_sha256 = digest
    await shared.upsert([stored])
    got = await shared.stub.Get(search_pb2.GetRequest(ids=["hashed-item"]))
    assert got.items[0].content_sha256 == digest
    bad = item("bad-hash", random_unit_vectors(1, seed=23)[0])
    bad.content_sha256 = "not-a-sha"
    await expect_invalid(shared.upsert([bad]), "content_sha256", "bad-hash")


# --- copy features ------------------------------------------------------------------------------


async def copy_features_by_id(shared: Service, ids: list[str], include: bool = True) -> dict[str, bytes]:
    got = await shared.stub.Get(search_pb2.GetRequest(ids=ids, include_copy_features=include))
    return {found.id: found.copy_features for found in got.items}


async def test_copy_features_are_stored_and_returned_only_when_asked(shared: Service):
    vectors = random_unit_vectors(4, seed=31)
    rng = np.random.default_rng(32)
    # Opaque bytes: NULs, every byte value, and the largest size allowed.
    features = {
        "copy-small": b"\x00\x01\xff\x00" + bytes(range(256)),
        "copy-largest": rng.bytes(COPY_FEATURES_MAX_BYTES),
        "copy-odd-id'%": rng.bytes(4097),
    }
    await shared.upsert([item(item_id, vector, copy_features=features.get(item_id, b""), category="copy")
                         for item_id, vector in zip([*features, "copy-none"], vectors)])
    only_these = condition("category", search_pb2.EQ, "copy")

    asked = await shared.search(vectors, 30, only_these, include_copy_features=True)
    for hits in asked.results:
        assert len(hits.hits) == 4
        assert {hit.id: hit.copy_features for hit in hits.hits} == {**features, "copy-none": b""}
    not_asked = await shared.search(vectors, 30, only_these)
    assert all(not hit.copy_features for hits in not_asked.results for hit in hits.hits)
    assert [hit.id for hit in not_asked.results[0].hits] == [hit.id for hit in asked.results[0].hits]

    ids = [*features, "copy-none"]
    assert await copy_features_by_id(shared, ids) == {**features, "copy-none": b""}
    assert await copy_features_by_id(shared, ids, include=False) == dict.fromkeys(ids, b"")
    [with_everything] = (await shared.stub.Get(search_pb2.GetRequest(
        ids=["copy-small"], include_vectors=True, include_copy_features=True))).items
    assert with_everything.copy_features == features["copy-small"] and np.allclose(with_everything.vector.values, vectors[0])


async def test_copy_features_are_replaced_by_a_reupsert_and_gone_after_delete(shared: Service):
    vectors = random_unit_vectors(2, seed=33)
    await shared.upsert([item("copy-replaced", vectors[0], copy_features=b"first"),
                         item("copy-dropped", vectors[1], copy_features=b"kept until replaced")])
    await shared.upsert([item("copy-replaced", vectors[0], copy_features=b"second"),
                         item("copy-dropped", vectors[1])])  # re-upserted without: none any more
    assert await copy_features_by_id(shared, ["copy-replaced", "copy-dropped"]) == {
        "copy-replaced": b"second", "copy-dropped": b""}
    [hit, *_] = (await shared.search(vectors[0], 1, include_copy_features=True)).results[0].hits
    assert (hit.id, hit.copy_features) == ("copy-replaced", b"second")

    assert (await shared.stub.Delete(search_pb2.DeleteRequest(ids=["copy-replaced"]))).deleted == 1
    assert await copy_features_by_id(shared, ["copy-replaced"]) == {}
    hits = (await shared.search(vectors[0], 1000, include_copy_features=True)).results[0].hits
    assert "copy-replaced" not in {hit.id for hit in hits} and b"second" not in {hit.copy_features for hit in hits}


async def test_copy_features_over_the_limit_are_refused_and_nothing_is_written(shared: Service):
    vectors = random_unit_vectors(3, seed=34)
    before = await shared.count()
    generation = (await shared.stub.Stats(search_pb2.StatsRequest())).generation
    too_large = b"\x01" * (COPY_FEATURES_MAX_BYTES + 1)
    await expect_invalid(
        shared.upsert([item("copy-fine-1", vectors[0], copy_features=b"ok"), item("copy-fine-2", vectors[1]),
                       item("copy-too-large", vectors[2], copy_features=too_large)]),
        f"copy_features of item 2 ('copy-too-large') are {COPY_FEATURES_MAX_BYTES + 1:,} bytes; "
        f"at most {COPY_FEATURES_MAX_BYTES:,}",
    )
    assert await shared.count() == before
    assert (await shared.stub.Stats(search_pb2.StatsRequest())).generation == generation
    assert await copy_features_by_id(shared, ["copy-fine-1", "copy-fine-2", "copy-too-large"]) == {}


# --- List: pages in id order ----------------------------------------------------------------------


async def list_all(shared: Service, collection: str, page_size: int, **fields: object) -> tuple[list[search_pb2.Item], int]:
    """Every item of the collection, page by page, and how many pages it took."""
    items: list[search_pb2.Item] = []
    token, pages = "", 0
    while True:
        page = await shared.stub.List(search_pb2.ListRequest(
            collection=collection, page_size=page_size, page_token=token, **fields))
        items.extend(page.items)
        pages += 1
        assert len(page.items) <= page_size
        if not page.next_page_token:
            return items, pages
        assert len(page.items) == page_size  # only the last page may be short
        token = page.next_page_token


async def test_list_pages_through_every_item_in_id_order(shared: Service):
    collection = "listing"
    ids = [f"item-{n:03d}" for n in range(20)] + ["it's", "100%", "é✓", "Zed", "a b"]
    vectors = random_unit_vectors(len(ids), seed=41)
    shuffled = list(zip(ids, vectors))
    random.Random(5).shuffle(shuffled)
    for start in range(0, len(shuffled), 8):  # several writes, in no particular order
        await shared.stub.Upsert(search_pb2.UpsertRequest(collection=collection, items=[
            item(item_id, vector, copy_features=item_id.encode(), category="listed") for item_id, vector in shuffled[start:start + 8]
        ]))
    listed, pages = await list_all(shared, collection, page_size=7)
    assert pages == 4
    assert sorted(found.id for found in listed) == sorted(ids)  # each exactly once
    # Ordered by the stored id: the id itself, except ids with '%' or "'" (stored percent-encoded).
    plain = [found.id for found in listed if "%" not in found.id and "'" not in found.id]
    assert plain == sorted(plain, key=str.encode)
    first = next(found for found in listed if found.id == "item-000")
    assert first.image_uri == "file:///images/item-000.jpg" and first.metadata["category"] == "listed"
    assert not first.vector.values and not first.copy_features  # only when asked
    one_page, pages = await list_all(shared, collection, page_size=1000, include_vectors=True, include_copy_features=True)
    assert pages == 1 and [found.id for found in one_page] == [found.id for found in listed]
    by_id = dict(zip(ids, vectors))
    for found in one_page:
        assert np.allclose(found.vector.values, by_id[found.id]) and found.copy_features == found.id.encode()
    # 0 asks for the default page size (100): one page here.
    default = await shared.stub.List(search_pb2.ListRequest(collection=collection))
    assert len(default.items) == len(ids) and not default.next_page_token
    # A deleted item is gone from the pages; the others keep their order.
    await shared.stub.Delete(search_pb2.DeleteRequest(collection=collection, ids=["item-005"]))
    after_delete, _ = await list_all(shared, collection, page_size=6)
    assert [found.id for found in after_delete] == [found.id for found in listed if found.id != "item-005"]


async def test_list_refuses_bad_page_tokens_and_sizes_naming_the_field(shared: Service):
    await shared.stub.Upsert(search_pb2.UpsertRequest(collection="listing_bad", items=[
        item(f"b{n}", vector) for n, vector in enumerate(random_unit_vectors(3, seed=43))]))
    page = await shared.stub.List(search_pb2.ListRequest(collection="listing_bad", page_size=2))
    assert page.next_page_token
    for token in ["not base64 at all!", page.next_page_token[:-4] + "eHl6", "djE6Yg==", "djE6fA=="]:
        await expect_invalid(shared.stub.List(search_pb2.ListRequest(collection="listing_bad", page_token=token)),
                             "page_token")
    await expect_invalid(shared.stub.List(search_pb2.ListRequest(collection="listing_bad", page_size=1001)),
                         "page_size", "1000")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await shared.stub.List(search_pb2.ListRequest(collection="no_such_listing"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# --- feature matches: a copy search's candidates by shared local descriptors ----------------------

async def test_feature_matches_are_the_items_sharing_the_query_crops_descriptors(
    tmp_path: Path, backend: str, feature_blobs: tuple[list[bytes], bytes, bytes]
):
    """The crop's view is found by its descriptors though its vector is far from the query's; the hits
    are never repeated, chance votes (an unrelated photo's) find nothing, a filter and deletes apply, a
    re-upsert's new features replace the old ones' votes, and a restart builds the index again from the
    stored features."""
    stored, query, outsider = feature_blobs
    vectors = random_unit_vectors(FEATURE_CATALOG, seed=51)
    ids = [f"view-{position}" for position in range(FEATURE_CATALOG)]
    items = [item(ids[p], vectors[p], copy_features=stored[p], category=f"o{p // 4}", stock=p) for p in range(FEATURE_CATALOG)]
    # The query vector is another object's: the cropped view is no similarity hit.
    query_vector = vectors[0]
    def indexed(service: Service) -> float:
        return metric_value(service.server.metrics.registry, "vsearch_store_feature_index_items",
                            backend=backend, collection="vsearch_images")

    async with running(tmp_path / "features", backend) as service:
        await service.upsert(items)
        assert indexed(service) == FEATURE_CATALOG
        response = await service.stub.Search(copy_search_request(query_vector, query, 3))
        [result] = response.results
        assert [hit.id for hit in result.hits] == ["view-0"]
        matches = list(result.feature_matches)
        assert matches[0].id == ids[CROPPED], [hit.id for hit in matches]
        assert len(matches) == 3 and "view-0" not in {hit.id for hit in matches}
        assert matches[0].score == pytest.approx(float(vectors[CROPPED] @ query_vector), abs=1e-5)
        assert matches[0].metadata["category"] == "o1"
        # A search hit's features come without the mirrored set (candidates' are never checked mirrored);
        # Get returns them as stored, since stored features are also a query's (a copy search by id).
        assert matches[0].copy_features == without_mirrored_set(stored[CROPPED]) != stored[CROPPED]
        assert await copy_features_by_id(service, [ids[CROPPED]]) == {ids[CROPPED]: stored[CROPPED]}
        # Another object's photo shares descriptors with nothing here beyond chance (fewer than MIN_VOTES).
        unrelated = (await service.stub.Search(copy_search_request(query_vector, outsider, 3))).results[0]
        assert list(unrelated.feature_matches) == []
        # Asked for by the cropped view's own vector, it is a hit, so not a feature match as well.
        by_own = (await service.stub.Search(copy_search_request(vectors[CROPPED], query, 3))).results[0]
        assert ids[CROPPED] in {hit.id for hit in by_own.hits}
        assert ids[CROPPED] not in {hit.id for hit in by_own.feature_matches}
        # A filter applies to them as to the hits.
        not_cropped = condition("stock", search_pb2.NE, CROPPED)
        filtered = (await service.stub.Search(copy_search_request(query_vector, query, 3, 1, not_cropped))).results[0]
        assert filtered.feature_matches and ids[CROPPED] not in {hit.id for hit in filtered.feature_matches}
        # Re-upserted with another view's features: the crop's view no longer shares its descriptors.
        await service.upsert([item(ids[CROPPED], vectors[CROPPED], copy_features=stored[0], category="o1", stock=CROPPED)])
        replaced = (await service.stub.Search(copy_search_request(query_vector, query, 3))).results[0]
        assert replaced.feature_matches[0].id != ids[CROPPED]
        await service.upsert([items[CROPPED]])
        restored = (await service.stub.Search(copy_search_request(query_vector, query, 3))).results[0]
        assert restored.feature_matches[0].id == ids[CROPPED]
    async with running(tmp_path / "features", backend) as service:  # built again from the file
        after_restart = (await service.stub.Search(copy_search_request(query_vector, query, 3))).results[0]
        assert after_restart.feature_matches[0].id == ids[CROPPED]
        # Deleting most of the catalog (the index is then rebuilt, it cannot remove entries) leaves
        # only what remains.
        gone = [ids[p] for p in range(FEATURE_CATALOG) if p not in (0, 1, 2)]
        assert (await service.stub.Delete(search_pb2.DeleteRequest(ids=gone))).deleted == len(gone)
        assert indexed(service) == 3
        remaining = (await service.stub.Search(copy_search_request(query_vector, query, 10))).results[0]
        assert {hit.id for hit in remaining.feature_matches} <= {"view-1", "view-2"}
        await service.upsert([items[CROPPED]])
        back = (await service.stub.Search(copy_search_request(query_vector, query, 3))).results[0]
        assert back.feature_matches[0].id == ids[CROPPED]


async def test_feature_matches_off_returns_none(tmp_path: Path, feature_blobs: tuple[list[bytes], bytes, bytes]):
    stored, query, _outsider = feature_blobs
    vectors = random_unit_vectors(2, seed=52)
    async with running(tmp_path / "off", "faiss", faiss={"feature_index": False}) as service:
        await service.upsert([item("a", vectors[0], copy_features=stored[0]), item("b", vectors[1], copy_features=stored[CROPPED])])
        result = (await service.stub.Search(copy_search_request(vectors[0], query, 3))).results[0]
        assert [hit.id for hit in result.hits] == ["a"] and not result.feature_matches


async def test_bad_feature_match_requests_are_refused_naming_the_field(
    shared: Service, feature_blobs: tuple[list[bytes], bytes, bytes]
):
    _stored, query, _outsider = feature_blobs
    vector = random_unit_vectors(1, seed=53)[0]
    await expect_invalid(shared.stub.Search(copy_search_request(vector, b"", 3)), "copy_query_features")
    await expect_invalid(shared.stub.Search(copy_search_request(vector, b"not features, though long enough", 3)),
                         "copy_query_features", "not copy features")
    await expect_invalid(shared.stub.Search(copy_search_request(vector, query[:-7], 3)), "copy_query_features")
    two = copy_search_request(vector, query, 3)
    two.queries.append(search_pb2.Vector(values=vector.tolist()))
    await expect_invalid(shared.stub.Search(two), "exactly one query vector")
    await expect_invalid(shared.stub.Search(copy_search_request(vector, query, 1001)), "feature_candidates", "1000")

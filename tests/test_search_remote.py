"""search_svc against a Milvus server (Milvus Lite in server mode on a loopback port), readiness
while Milvus is down, collections created before copy features and write times existed, two replicas'
descriptor indexes following each other's writes, and `python -m search_svc` as a process (both
backends; FAISS through kill -9)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from milvus_lite.server import Server
from prometheus_client import CollectorRegistry
from pymilvus import DataType, MilvusClient

from conftest import CROPPED, FEATURE_CATALOG, REPO_ROOT, copy_search_request, metric_value, service_env, wait_until
from search_svc.server import SERVICE_NAME, create_server
from search_svc.settings import MilvusSettings, SearchSettings
from vsearch.v1 import search_pb2, search_pb2_grpc
from vsearch_cli.local_stack.ports import free_port


class MilvusLiteServer:
    """Milvus Lite serving gRPC on 127.0.0.1:port, as a Milvus standalone would."""

    def __init__(self, db_file: Path, port: int) -> None:
        self.port = port
        self._server = Server(str(db_file), address=f"127.0.0.1:{port}")

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self._server.start(), "milvus-lite did not start"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"milvus-lite not listening on {self.port}")

    @property
    def pid(self) -> int:
        return self._server._p.pid  # the milvus process we started

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture
def milvus_server(tmp_path: Path) -> Iterator[MilvusLiteServer]:
    server = MilvusLiteServer(tmp_path / "remote.db", free_port())
    server.start()
    yield server
    server.stop()


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def item(item_id: str, vector: np.ndarray, copy_features: bytes = b"", **metadata: object) -> search_pb2.Item:
    message = search_pb2.Item(id=item_id, image_uri=f"s3://catalog/{item_id}.jpg", copy_features=copy_features)
    message.vector.values.extend(vector.tolist())
    message.metadata.update(metadata)
    return message


async def health_status(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    return response.status


async def test_round_trip_through_a_milvus_server(milvus_server: MilvusLiteServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SEARCH_BACKEND", "milvus")
    monkeypatch.setenv("SEARCH_MILVUS__URI", milvus_server.uri)
    monkeypatch.setenv("SEARCH_MILVUS__TIMEOUT_S", "2")
    monkeypatch.setenv("SEARCH_PORT", "0")
    monkeypatch.setenv("SEARCH_LOG_FORMAT", "text")
    settings = SearchSettings()  # everything else at its default: dimension 1280, FLAT, category + price
    assert settings.dimension == 1280
    server, port = await create_server(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = search_pb2_grpc.VectorSearchStub(channel)
    try:
        await server.wait_ready(timeout=30)
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        vectors = unit_vectors(60, 1280, seed=1)
        features = {f"r{n}": np.random.default_rng(n).bytes(3000 + n) for n in range(0, 60, 3)}
        upserted = await stub.Upsert(search_pb2.UpsertRequest(
            items=[item(f"r{n}", vector, features.get(f"r{n}", b""), category="even" if n % 2 == 0 else "odd", price=n)
                   for n, vector in enumerate(vectors)]
        ))
        assert upserted.upserted == 60
        with_features = await stub.Search(search_pb2.SearchRequest(
            queries=[search_pb2.Vector(values=vectors[n].tolist()) for n in (3, 4)], k=30, include_copy_features=True))
        for hits in with_features.results:
            assert len(hits.hits) == 30
            assert all(hit.copy_features == features.get(hit.id, b"") for hit in hits.hits)
        got = await stub.Get(search_pb2.GetRequest(ids=["r3", "r4"], include_copy_features=True))
        assert [(found.id, found.copy_features) for found in got.items] == [("r3", features["r3"]), ("r4", b"")]

        price_below = struct_pb2.Value(number_value=30)
        request = search_pb2.SearchRequest(
            queries=[search_pb2.Vector(values=vectors[4].tolist())], k=5,
            filter=search_pb2.Filter(conditions=[
                search_pb2.Condition(field="category", op=search_pb2.EQ, value=struct_pb2.Value(string_value="even")),
                search_pb2.Condition(field="price", op=search_pb2.LT, value=price_below),
            ]),
        )
        hits = (await stub.Search(request)).results[0].hits
        candidates = [n for n in range(60) if n % 2 == 0 and n < 30]
        expected = sorted(candidates, key=lambda n: -float(vectors[n] @ vectors[4]))[:5]
        assert [hit.id for hit in hits] == [f"r{n}" for n in expected]
        assert hits[0].image_uri == "s3://catalog/r4.jpg"
        assert json_format.MessageToDict(hits[0].metadata) == {"category": "even", "price": 4}

        deleted = await stub.Delete(search_pb2.DeleteRequest(ids=["r4", "r5", "nope"]))
        assert deleted.deleted == 2 and deleted.generation > upserted.generation
        stats = await stub.Stats(search_pb2.StatsRequest())
        assert (stats.count, stats.dimension, stats.index_type, stats.generation) == (58, 1280, "FLAT", deleted.generation)
        assert (await stub.Search(request)).results[0].hits[0].id != "r4"

        # Milvus hangs: the call gives up at the Milvus deadline, and says so.
        os.kill(milvus_server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Search(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value.details()
            assert caught.value.details() == "milvus search: no answer within 2s"
            assert time.monotonic() - started < 10
        finally:
            os.kill(milvus_server.pid, signal.SIGCONT)
        assert len((await stub.Search(request)).results[0].hits) == 5

        # Milvus goes away: calls fail fast and say so, rather than INTERNAL or hanging.
        milvus_server.stop()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Search(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert caught.value.details().startswith("milvus search: UNAVAILABLE"), caught.value.details()
    finally:
        await channel.close()
        await server.stop(grace=1)


def create_collection_before_copy_features(uri: str, vectors: np.ndarray, with_copy_features: bool = False) -> None:
    """The default collection as search_svc created it before copy features existed (commit d620986:
    no copy_features column), or with them but before rows carried their write time (no written_us),
    holding items r0, r1, ... with these vectors."""
    client = MilvusClient(uri=uri)
    try:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, max_length=1024, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
        schema.add_field("image_uri", DataType.VARCHAR, max_length=2048)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("content_sha256", DataType.VARCHAR, max_length=64)
        if with_copy_features:
            schema.add_field("copy_features", DataType.VARCHAR, max_length=65_535)
        schema.add_field("category", DataType.VARCHAR, max_length=1024)
        schema.add_field("_has_category", DataType.BOOL)
        schema.add_field("price", DataType.DOUBLE)
        schema.add_field("_has_price", DataType.BOOL)
        client.create_collection("vsearch_images", schema=schema, consistency_level="Strong")
        index_params = client.prepare_index_params()
        index_params.add_index("vector", index_type="FLAT", metric_type="IP")
        client.create_index("vsearch_images", index_params)
        client.insert("vsearch_images", [
            {"id": f"r{n}", "vector": vector.tolist(), "image_uri": f"s3://catalog/r{n}.jpg",
             "metadata": {"category": "old", "price": n}, "content_sha256": f"{n:064x}", "category": "old",
             "_has_category": True, "price": float(n), "_has_price": True, **({"copy_features": ""} if with_copy_features else {})}
            for n, vector in enumerate(vectors)
        ])
    finally:
        client.close()


async def test_a_collection_created_before_copy_features_keeps_working(milvus_server: MilvusLiteServer):
    """Milvus 2.5 cannot add a column to a collection: an old one serves as before, its items read
    back without copy features, and an upsert carrying some is refused as a whole, saying how to get
    a collection that stores them."""
    vectors = unit_vectors(12, 8, seed=3)
    create_collection_before_copy_features(milvus_server.uri, vectors[:10])
    settings = SearchSettings(port=0, dimension=8, log_format="text", backend="milvus",
                              milvus=MilvusSettings(uri=milvus_server.uri, timeout_s=10))
    server, port = await create_server(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = search_pb2_grpc.VectorSearchStub(channel)
    try:
        await server.wait_ready(timeout=30)
        assert (await stub.Stats(search_pb2.StatsRequest())).count == 10
        got = await stub.Get(search_pb2.GetRequest(ids=["r4"], include_vectors=True, include_copy_features=True))
        [old] = got.items
        assert (old.image_uri, old.content_sha256, old.copy_features) == ("s3://catalog/r4.jpg", f"{4:064x}", b"")
        assert json_format.MessageToDict(old.metadata) == {"category": "old", "price": 4}
        assert np.allclose(old.vector.values, vectors[4])
        hits = (await stub.Search(search_pb2.SearchRequest(
            queries=[search_pb2.Vector(values=vectors[4].tolist())], k=3, include_copy_features=True))).results[0].hits
        assert hits[0].id == "r4" and all(hit.copy_features == b"" for hit in hits)

        # Items without copy features: written as ever.
        await stub.Upsert(search_pb2.UpsertRequest(items=[item("r4", vectors[4], category="new"), item("r10", vectors[10])]))
        assert (await stub.Stats(search_pb2.StatsRequest())).count == 11
        # With copy features: refused, and nothing of the request is written.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Upsert(search_pb2.UpsertRequest(
                items=[item("r11", vectors[11]), item("r5", vectors[5], copy_features=b"features")]))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = caught.value.details()
        assert "collection 'vsearch_images' was created before copy features were stored" in details
        assert "item 1 ('r5')" in details and "drop the collection" in details and "index the catalog again" in details
        assert (await stub.Stats(search_pb2.StatsRequest())).count == 11
        assert not (await stub.Get(search_pb2.GetRequest(ids=["r11"]))).items

        # A collection created now stores them.
        await stub.Upsert(search_pb2.UpsertRequest(collection="recreated", items=[item("r5", vectors[5], b"features")]))
        got = await stub.Get(search_pb2.GetRequest(collection="recreated", ids=["r5"], include_copy_features=True))
        assert got.items[0].copy_features == b"features"
    finally:
        await channel.close()
        await server.stop(grace=1)


async def test_not_serving_until_milvus_is_reachable(tmp_path: Path):
    milvus = MilvusLiteServer(tmp_path / "late.db", free_port())
    settings = SearchSettings(
        port=0, dimension=8, log_format="text", backend="milvus", milvus=MilvusSettings(uri=milvus.uri, timeout_s=1)
    )
    server, port = await create_server(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = search_pb2_grpc.VectorSearchStub(channel)
    try:
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.sleep(1.5)  # at least one failed attempt to connect
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Stats(search_pb2.StatsRequest())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        milvus.start()
        await server.wait_ready(timeout=30)  # the startup hook retried and got through
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        vector = unit_vectors(1, 8, seed=2)[0]
        await stub.Upsert(search_pb2.UpsertRequest(items=[item("late", vector, category="x")]))
        hits = (await stub.Search(search_pb2.SearchRequest(queries=[search_pb2.Vector(values=vector.tolist())], k=1))).results[0].hits
        assert [hit.id for hit in hits] == ["late"]
    finally:
        await channel.close()
        await server.stop(grace=1)
        milvus.stop()


@pytest.mark.parametrize("backend", ["faiss", "milvus"])
async def test_runs_as_a_process_and_stops_on_sigterm(tmp_path: Path, backend: str):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "search_svc"], cwd=REPO_ROOT,
        env=service_env("SEARCH_", SEARCH_PORT=str(port), SEARCH_BACKEND=backend, SEARCH_MILVUS__URI=str(tmp_path / "data" / "proc.db"),
                        SEARCH_FAISS__DATA_DIR=str(tmp_path / "data" / "faiss"), SEARCH_DIMENSION="8",
                        SEARCH_DRAIN_SECONDS="0"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(channel, process)
            stats = await search_pb2_grpc.VectorSearchStub(channel).Stats(search_pb2.StatsRequest())
            assert (stats.count, stats.dimension) == (0, 8)
        # The folder was created, and the store's file in it.
        assert (tmp_path / "data" / ("proc.db" if backend == "milvus" else "faiss/vsearch_images.sqlite3")).exists()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert '"msg": "search_svc stopped"' in stderr
        if backend == "faiss":  # a clean stop snapshots the index, so the next start need not rebuild it
            assert list((tmp_path / "data" / "faiss").glob("vsearch_images.*.r*.ivf_flat.faiss"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def wait_serving(channel: grpc.aio.Channel, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if await health_status(channel) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, "search_svc did not become SERVING"
        await asyncio.sleep(0.1)


async def test_faiss_backend_keeps_acknowledged_writes_through_sigkill(tmp_path: Path):
    """Every acknowledged Upsert and Delete is there after `kill -9` and a restart (the index is
    rebuilt from SQLite: no snapshot was written)."""
    data_dir = tmp_path / "faiss"
    vectors = np.random.default_rng(11).normal(size=(300, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def start() -> tuple[subprocess.Popen, int]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "search_svc"], cwd=REPO_ROOT,
            env=service_env("SEARCH_", SEARCH_PORT=str(port), SEARCH_FAISS__DATA_DIR=str(data_dir), SEARCH_DIMENSION="8",
                            SEARCH_FAISS__IVF_TRAIN_MIN_ITEMS="100"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return process, port

    process, port = start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(channel, process)
            stub = search_pb2_grpc.VectorSearchStub(channel)
            for start_row in range(0, 300, 50):
                await stub.Upsert(search_pb2.UpsertRequest(items=[
                    search_pb2.Item(id=f"k{n}", vector=search_pb2.Vector(values=vectors[n].tolist()))
                    for n in range(start_row, start_row + 50)
                ]), timeout=30)
            deleted = await stub.Delete(search_pb2.DeleteRequest(ids=[f"k{n}" for n in range(10)]), timeout=30)
            assert deleted.deleted == 10
        process.kill()
        process.wait(timeout=30)
        assert not list(data_dir.glob("*.faiss"))  # no snapshot: the restart must rebuild from SQLite
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    process, port = start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_serving(channel, process)
            stub = search_pb2_grpc.VectorSearchStub(channel)
            assert (await stub.Stats(search_pb2.StatsRequest())).count == 290
            for n in (10, 150, 299):
                reply = await stub.Search(search_pb2.SearchRequest(
                    queries=[search_pb2.Vector(values=vectors[n].tolist())], k=1), timeout=30)
                assert reply.results[0].hits[0].id == f"k{n}"
            got = await stub.Get(search_pb2.GetRequest(ids=["k0", "k9", "k10"]), timeout=30)
            assert [item.id for item in got.items] == ["k10"]
    finally:
        process.kill()
        process.wait()


@contextlib.asynccontextmanager
async def search_replica(
    uri: str, dimension: int, **milvus: object
) -> AsyncIterator[tuple[search_pb2_grpc.VectorSearchStub, CollectorRegistry]]:
    """A search_svc over the Milvus at `uri`, SERVING, and its metrics registry."""
    settings = SearchSettings(port=0, dimension=dimension, log_format="text", backend="milvus",
                              milvus=MilvusSettings(uri=uri, timeout_s=10, **milvus))
    server, port = await create_server(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await server.wait_ready(timeout=30)
        yield search_pb2_grpc.VectorSearchStub(channel), server.metrics.registry
    finally:
        await channel.close()
        await server.stop(grace=1)


async def test_a_collection_without_write_times_serves_copy_searches_from_the_shortlist(
    milvus_server: MilvusLiteServer, feature_blobs: tuple[list[bytes], bytes, bytes], caplog: pytest.LogCaptureFixture,
):
    """A collection created with copy features but before rows carried their write time cannot have a
    descriptor index that follows other replicas: it keeps storing and returning copy features, and its
    copy searches get no feature candidates, as the log says."""
    stored, query, _outsider = feature_blobs
    vectors = unit_vectors(12, 8, seed=4)
    create_collection_before_copy_features(milvus_server.uri, vectors[:10], with_copy_features=True)
    with caplog.at_level(logging.WARNING, logger="search_svc.milvus_store"):
        async with search_replica(milvus_server.uri, 8) as (stub, _registry):
            await stub.Upsert(search_pb2.UpsertRequest(items=[item("r5", vectors[5], stored[CROPPED])]))
            got = await stub.Get(search_pb2.GetRequest(ids=["r5"], include_copy_features=True))
            assert got.items[0].copy_features == stored[CROPPED]
            result = (await stub.Search(copy_search_request(vectors[0], query, 3))).results[0]
            assert [hit.id for hit in result.hits] == ["r0"] and not result.feature_matches
    assert "created before rows carried their write time" in caplog.text


async def test_replicas_feature_indexes_follow_each_others_writes(
    milvus_server: MilvusLiteServer, feature_blobs: tuple[list[bytes], bytes, bytes],
):
    """Two search_svc replicas over one Milvus, each with its descriptor index in memory: items written
    through one become feature matches through the other once it has followed Milvus (a poll every
    0.1 s here), as do their re-writes; an item deleted through one is never a match through the other,
    and one written through the second is found through the first."""
    stored, query, _outsider = feature_blobs
    vectors = unit_vectors(FEATURE_CATALOG, 8, seed=5)
    ids = [f"view-{position}" for position in range(FEATURE_CATALOG)]
    items = [item(ids[p], vectors[p], stored[p]) for p in range(FEATURE_CATALOG)]
    crop_search = copy_search_request(vectors[0], query, 3)

    async def finds_the_view(stub: search_pb2_grpc.VectorSearchStub) -> bool:
        matches = (await stub.Search(crop_search)).results[0].feature_matches
        return bool(matches) and matches[0].id == ids[CROPPED]

    async def misses_the_view(stub: search_pb2_grpc.VectorSearchStub) -> bool:
        return not await finds_the_view(stub)

    async with search_replica(milvus_server.uri, 8, feature_sync_s=0.1) as (one, one_metrics), \
            search_replica(milvus_server.uri, 8, feature_sync_s=0.1) as (two, two_metrics):

        def indexed(registry: CollectorRegistry) -> float:
            return metric_value(registry, "vsearch_store_feature_index_items", backend="milvus", collection="vsearch_images")

        await one.Upsert(search_pb2.UpsertRequest(items=items))
        assert await finds_the_view(one)  # its own write: at once
        assert indexed(one_metrics) == FEATURE_CATALOG
        await wait_until(lambda: finds_the_view(two), what="replica two finding the crop's view")
        # Its poll thread sets the gauge just after the index answers: wait for that too.
        await wait_until(lambda: indexed(two_metrics) == FEATURE_CATALOG, what="replica two's gauge")
        # Re-written through one with another view's features: two follows.
        await one.Upsert(search_pb2.UpsertRequest(items=[item(ids[CROPPED], vectors[CROPPED], stored[0])]))
        await wait_until(lambda: misses_the_view(two), what="replica two dropping the old features")
        await one.Upsert(search_pb2.UpsertRequest(items=[items[CROPPED]]))
        await wait_until(lambda: finds_the_view(two), what="replica two taking the new features")
        # Deleted through one: two never offers it, not even before it has followed (which it does by
        # counting the items in Milvus).
        await one.Delete(search_pb2.DeleteRequest(ids=[ids[CROPPED]]))
        assert await misses_the_view(two)
        assert indexed(one_metrics) == FEATURE_CATALOG - 1
        await wait_until(lambda: indexed(two_metrics) == FEATURE_CATALOG - 1, what="replica two removing the deleted item")
        # Written through two: one follows.
        await two.Upsert(search_pb2.UpsertRequest(items=[items[CROPPED]]))
        await wait_until(lambda: finds_the_view(one), what="replica one finding the view written through two")


async def test_a_collection_beyond_the_feature_index_limit_gets_none(
    milvus_server: MilvusLiteServer, feature_blobs: tuple[list[bytes], bytes, bytes], caplog: pytest.LogCaptureFixture,
):
    """Every replica holds a collection's whole descriptor index, so one that outgrows
    feature_index_max_items loses it at the next catch-up (and one that is larger from the start gets
    none): copy searches then verify their shortlist only, and the log says why, once. Deletes that bring
    the collection back within the limit bring the index back at the next poll."""
    stored, query, _outsider = feature_blobs
    vectors = unit_vectors(FEATURE_CATALOG, 8, seed=6)
    items = [item(f"view-{p}", vectors[p], stored[p]) for p in range(FEATURE_CATALOG)]
    crop_search = copy_search_request(vectors[0], query, 3)
    limited = {"feature_sync_s": 0.1, "feature_index_max_items": FEATURE_CATALOG - 1}
    gauge = {"backend": "milvus", "collection": "vsearch_images"}
    too_many = "holds 12 items, more than SEARCH_MILVUS__FEATURE_INDEX_MAX_ITEMS (11)"

    async def feature_matches(stub: search_pb2_grpc.VectorSearchStub) -> list[str]:
        return [hit.id for hit in (await stub.Search(crop_search)).results[0].feature_matches]

    async def has_no_matches(stub: search_pb2_grpc.VectorSearchStub) -> bool:
        return not await feature_matches(stub)

    async def finds_the_view(stub: search_pb2_grpc.VectorSearchStub) -> bool:
        return (await feature_matches(stub))[:1] == [f"view-{CROPPED}"]

    def indexed(registry: CollectorRegistry) -> float | None:
        return registry.get_sample_value("vsearch_store_feature_index_items", gauge)

    def counts(registry: CollectorRegistry) -> float:
        calls = {"backend": "milvus", "operation": "count"}
        return registry.get_sample_value("vsearch_store_call_seconds_count", calls) or 0

    with caplog.at_level(logging.INFO, logger="search_svc.milvus_store"):
        async with search_replica(milvus_server.uri, 8, **limited) as (stub, registry):
            await stub.Upsert(search_pb2.UpsertRequest(items=items[:-1]))  # at the limit: kept
            assert await finds_the_view(stub)
            await stub.Upsert(search_pb2.UpsertRequest(items=items[-1:]))
            await wait_until(lambda: has_no_matches(stub), what="the index dropped beyond the limit")
            # The poll thread updates the gauge just after the index it describes: wait for both.
            await wait_until(lambda: indexed(registry) is None, what="the gauge gone with the index")
            # Polls go on counting the items; still too many: no index, and no second warning.
            polled = counts(registry)
            await wait_until(lambda: counts(registry) >= polled + 3, what="three more polls")
            assert await has_no_matches(stub)
            assert caplog.text.count(too_many) == 1
            await stub.Delete(search_pb2.DeleteRequest(ids=["view-0"]))
            await wait_until(lambda: finds_the_view(stub), what="the index back within the limit")
            await wait_until(lambda: indexed(registry) == FEATURE_CATALOG - 1, what="the gauge back with the index")
            assert "within SEARCH_MILVUS__FEATURE_INDEX_MAX_ITEMS again" in caplog.text
            await stub.Upsert(search_pb2.UpsertRequest(items=items[:1]))
        caplog.clear()
        async with search_replica(milvus_server.uri, 8, **limited) as (stub, _registry):
            assert await feature_matches(stub) == []
        assert too_many in caplog.text

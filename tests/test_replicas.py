"""`vsearch up --replicas 2` as real processes: two gateways and two search_svc replicas over one Milvus
server (Milvus Lite in server mode), one Redis, one embedder. Gateway i talks to search replica i, so a
write through one gateway and a search through the other always go through different replicas: what
they share (the index in Milvus, the cache and its index generation in Redis) is what these tests test.
Caches are on throughout; every search made twice before a write is served from the cache, and the
first search after the write, through the *other* gateway, must not be."""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import VsearchUp, run_cli, vsearch_up, wait_for
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2

REPLICAS = 2


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VsearchUp]:
    with vsearch_up(tmp_path_factory.mktemp("replicas"), "--replicas", str(REPLICAS)) as stack:
        yield stack


@pytest.fixture(scope="module")
def gateways(up: VsearchUp) -> Iterator[list[gateway_pb2_grpc.VisualSearchStub]]:
    channels = [grpc.insecure_channel(address) for address, _http in up.gateways]
    yield [gateway_pb2_grpc.VisualSearchStub(channel) for channel in channels]
    for channel in channels:
        channel.close()


def add(stub: gateway_pb2_grpc.VisualSearchStub, collection: str, item_id: str, image: bytes,
        **metadata: object) -> gateway_pb2.AddImagesSummary:
    struct = struct_pb2.Struct()
    struct.update(metadata)
    request = gateway_pb2.AddImageRequest(id=item_id, image=image, metadata=struct, collection=collection)
    return stub.AddImages(iter([request]), timeout=60)


def search(stub: gateway_pb2_grpc.VisualSearchStub, collection: str, image: bytes) -> gateway_pb2.VisualSearchResponse:
    return stub.Search(gateway_pb2.VisualSearchRequest(image=image, k=4, collection=collection), timeout=30)


def cached_search(
    stub: gateway_pb2_grpc.VisualSearchStub, collection: str, image: bytes
) -> gateway_pb2.VisualSearchResponse:
    """The search, repeated until it is served from the cache (its cache write happens after its reply)."""
    first = search(stub, collection, image)
    again = wait_for(lambda: (reply := search(stub, collection, image)).from_cache and reply, 10,
                     "the repeated search served from the cache")
    assert [hit.id for hit in again.hits] == [hit.id for hit in first.hits]
    return again


def test_every_gateway_and_replica_is_started_and_announced(up: VsearchUp, gateways) -> None:
    assert up.gateways == [(f"127.0.0.1:{up.grpc_port + i}", f"http://127.0.0.1:{up.http_port + i}")
                           for i in range(REPLICAS)]
    assert len(set(up.searches)) == REPLICAS
    assert re.search(r"\| milvus http://127\.0\.0\.1:\d+ ", up.banner) and "redis://127.0.0.1:" in up.banner
    for name in ("redis", "milvus", "embedder", "search-0", "search-1", "gateway-0", "gateway-1"):
        assert up.child_pid(name) is not None, name
    for address in [address for address, _http in up.gateways] + up.searches:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, address


@pytest.mark.parametrize("writer, reader", [(0, 1), (1, 0)], ids=["write-0-read-1", "write-1-read-0"])
def test_writes_through_one_gateway_are_seen_at_once_by_cached_searches_through_the_other(
    gateways, ukbench_bytes: list[bytes], writer: int, reader: int
) -> None:
    write, read = gateways[writer], gateways[reader]
    collection = f"replicas_{uuid.uuid4().hex[:8]}"
    query = ukbench_bytes[8]  # object 2, view 0
    try:
        for n in range(8):  # objects 0 and 1
            assert add(write, collection, f"item-{n}", ukbench_bytes[n], version=1).indexed == 1
        before = cached_search(read, collection, query)
        assert "new" not in [hit.id for hit in before.hits]

        # An add: another view of the query's object, which ranks first from now on.
        added = add(write, collection, "new", ukbench_bytes[9], version=1)
        assert added.indexed == 1 and added.index_generation != before.index_generation
        after_add = search(read, collection, query)
        assert not after_add.from_cache and after_add.embedding_from_cache
        assert after_add.hits[0].id == "new" and after_add.hits[0].metadata["version"] == 1
        assert after_add.index_generation == added.index_generation

        # Re-indexing the same image with new metadata.
        cached_search(read, collection, query)
        reindexed = add(write, collection, "new", ukbench_bytes[9], version=2)
        assert reindexed.indexed == 1
        after_reindex = search(read, collection, query)
        assert not after_reindex.from_cache
        assert after_reindex.hits[0].id == "new" and after_reindex.hits[0].metadata["version"] == 2

        # A delete.
        cached_search(read, collection, query)
        deleted = write.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=["new"], collection=collection), timeout=30)
        assert deleted.deleted == 1
        after_delete = search(read, collection, query)
        assert not after_delete.from_cache and "new" not in [hit.id for hit in after_delete.hits]
        assert [hit.id for hit in after_delete.hits] == [hit.id for hit in before.hits]
    finally:
        read.DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=60)


def test_the_milvus_server_is_supervised_and_keeps_what_was_acknowledged(
    up: VsearchUp, gateways, ukbench_bytes: list[bytes]
) -> None:
    collection = f"replicas_{uuid.uuid4().hex[:8]}"
    for n in range(4):
        assert add(gateways[0], collection, f"kept-{n}", ukbench_bytes[n]).indexed == 1
    pid = up.child_pid("milvus")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (new := up.child_pid("milvus")) not in (None, pid) and new, 30, "milvus restarted by vsearch up")

    def searchable_through_both() -> bool:
        try:
            # A query no cache holds: each gateway's replica must reach Milvus.
            return all(search(stub, collection, ukbench_bytes[2 + n]).hits[0].id == f"kept-{2 + n}"
                       for n, stub in enumerate(gateways))
        except grpc.RpcError:
            return False

    wait_for(searchable_through_both, 30, "both gateways searching the restarted Milvus server")
    stats = gateways[1].Stats(gateway_pb2.VisualStatsRequest(collection=collection), timeout=30)
    assert stats.count == 4
    gateways[1].DropCollection(search_pb2.DropCollectionRequest(collection=collection), timeout=60)


def test_replicas_refuse_what_they_cannot_share(tmp_path: Path) -> None:
    result = run_cli("up", "--replicas", "2", "--search-backend", "faiss", "--data-dir", str(tmp_path), timeout=60)
    assert result.returncode == 1 and "Milvus" in result.stderr
    result = run_cli("up", "--replicas", "2", "--no-redis", "--data-dir", str(tmp_path), timeout=60)
    assert result.returncode == 1 and "redis-server" in result.stderr

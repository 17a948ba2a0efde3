"""`vsearch backup`: a copy of the FAISS backend's collections taken while a real search_svc writes to them,
restored by starting another search_svc on the copies."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np

from conftest import run_cli, run_cli_async, wait_until
from search_svc.server import create_server
from search_svc.settings import FaissSettings, SearchSettings
from vsearch.v1 import search_pb2, search_pb2_grpc

DIM = 16
BATCH = 40  # items per Upsert: one SQLite transaction each
COLLECTIONS = ("", "other")


@contextlib.asynccontextmanager
async def search_service(data_dir: Path) -> AsyncIterator[search_pb2_grpc.VectorSearchStub]:
    server, port = await create_server(SearchSettings(port=0, dimension=DIM, log_format="text", backend="faiss",
                                                      faiss=FaissSettings(data_dir=data_dir)))
    await server.start()
    try:
        await server.wait_ready(timeout=60)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield search_pb2_grpc.VectorSearchStub(channel)
    finally:
        await server.stop(grace=1)


def vector_of(collection: str, batch: int, position: int) -> np.ndarray:
    seed = (COLLECTIONS.index(collection), batch, position)
    vector = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def batch_request(collection: str, batch: int) -> search_pb2.UpsertRequest:
    return search_pb2.UpsertRequest(collection=collection, items=[
        search_pb2.Item(id=f"b{batch:05d}-{position:02d}",
                        vector=search_pb2.Vector(values=vector_of(collection, batch, position).tolist()))
        for position in range(BATCH)])


async def count(stub: search_pb2_grpc.VectorSearchStub, collection: str) -> int:
    return (await stub.Stats(search_pb2.StatsRequest(collection=collection), timeout=30)).count


async def test_a_backup_taken_while_writes_land_restores_whole_writes(tmp_path: Path) -> None:
    live, copies = tmp_path / "live", tmp_path / "backup"
    written = {collection: 0 for collection in COLLECTIONS}  # batches acknowledged
    stop = asyncio.Event()
    async with search_service(live) as stub:
        async def write(collection: str) -> None:
            while not stop.is_set():
                await stub.Upsert(batch_request(collection, written[collection]), timeout=30)
                written[collection] += 1

        writers = [asyncio.create_task(write(collection)) for collection in COLLECTIONS]
        try:
            await wait_until(lambda: min(written.values()) >= 5, timeout=60, what="five batches in each collection")
            before = dict(written)
            code, out, err = await run_cli_async("backup", str(live), str(copies))
            after = dict(written)
        finally:
            stop.set()
            await asyncio.gather(*writers)
    assert code == 0, err
    assert "2 collection file(s) copied" in out, out
    assert after != before, "the writes went on during the backup"  # the case this test is about
    assert sorted(path.name for path in copies.iterdir()) == ["other.sqlite3", "vsearch_images.sqlite3"]

    async with search_service(copies) as restored:
        for collection in COLLECTIONS:
            held = await count(restored, collection)
            # Whole batches only, and every batch acknowledged before the backup began.
            assert held % BATCH == 0 and before[collection] * BATCH <= held <= (after[collection] + 1) * BATCH, (
                collection, held, before, after)
            batches = held // BATCH
            ids = [f"b{batch:05d}-{position:02d}" for batch in range(batches) for position in range(BATCH)]
            found = await restored.Get(search_pb2.GetRequest(ids=ids, include_vectors=True, collection=collection),
                                       timeout=30)
            assert len(found.items) == held
            for item in found.items[::97]:
                batch, position = (int(part) for part in item.id[1:].split("-"))
                np.testing.assert_allclose(item.vector.values, vector_of(collection, batch, position), rtol=1e-6)
            # The index was built from the copy: an item's own vector finds it first.
            probe = vector_of(collection, batches - 1, 7)
            hits = await restored.Search(search_pb2.SearchRequest(
                queries=[search_pb2.Vector(values=probe.tolist())], k=1, collection=collection), timeout=30)
            assert hits.results[0].hits[0].id == f"b{batches - 1:05d}-07"


def test_backup_refuses_a_destination_in_use_and_a_directory_without_collections(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("kept")
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "vsearch_images.sqlite3").write_bytes(b"")
    for args, message in (
        ([str(tmp_path / "live"), str(tmp_path / "full")], "exists and is not an empty directory"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "new")], "not a directory"),
        ([str(tmp_path / "full"), str(tmp_path / "new")], "no collection files"),
    ):
        refused = run_cli("backup", *args)
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)
    assert (tmp_path / "full" / "something").read_text() == "kept" and not (tmp_path / "new").exists()
    (tmp_path / "live" / "vsearch_images.sqlite3").write_bytes(b"not a database, " * 512)
    refused = run_cli("backup", str(tmp_path / "live"), str(tmp_path / "new"))
    assert refused.returncode == 2 and "vsearch_images.sqlite3: file is not a database" in refused.stderr, refused.stderr

"""Regions (several vectors per image): search_svc stores an item's region vectors beside its full view
on both backends, answers one hit per item with the region that matched, removes regions with their
item, keeps collections without regions working; the embedder makes the grid; the gateway indexes
them per collection and a 30 % crop finds its image with regions where it does not without."""

from __future__ import annotations

import contextlib
import io
import sqlite3
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from PIL import Image

from conftest import SEARCH_BACKENDS, caltech_sample_rows, embed_results, image_input, in_process_stack, run_cli_async
from embedder_svc.regions import REGION_GRID, region_boxes
from search_svc.columns import MAX_REGIONS_PER_ITEM
from search_svc.server import create_server
from search_svc.settings import FaissSettings, MilvusSettings, SearchSettings
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2, search_pb2_grpc

DIM = 16


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def region(box: tuple[int, int, int, int], vector: np.ndarray) -> search_pb2.Region:
    x, y, width, height = box
    return search_pb2.Region(box=search_pb2.RegionBox(x=x, y=y, width=width, height=height),
                             vector=search_pb2.Vector(values=vector.tolist()))


def item(item_id: str, vector: np.ndarray, regions: list[search_pb2.Region] = (), **metadata: object) -> search_pb2.Item:
    message = search_pb2.Item(id=item_id, image_uri=f"file:///images/{item_id}.jpg", regions=list(regions))
    message.vector.values.extend(vector.tolist())
    message.metadata.update(metadata)
    return message


def box_of(hit: search_pb2.Hit) -> tuple[int, int, int, int] | None:
    return (hit.region.x, hit.region.y, hit.region.width, hit.region.height) if hit.HasField("region") else None


class Service:
    def __init__(self, stub: search_pb2_grpc.VectorSearchStub) -> None:
        self.stub = stub

    async def upsert(self, items: list[search_pb2.Item], collection: str = "") -> search_pb2.UpsertResponse:
        return await self.stub.Upsert(search_pb2.UpsertRequest(items=items, collection=collection))

    async def hits(self, query: np.ndarray, k: int, collection: str = "", **fields: object) -> list[search_pb2.Hit]:
        response = await self.stub.Search(search_pb2.SearchRequest(
            queries=[search_pb2.Vector(values=query.tolist())], k=k, collection=collection, **fields))
        return list(response.results[0].hits)

    async def stats(self, collection: str = "") -> search_pb2.StatsResponse:
        return await self.stub.Stats(search_pb2.StatsRequest(collection=collection))


@contextlib.asynccontextmanager
async def running(location: Path, backend: str) -> AsyncIterator[Service]:
    settings = SearchSettings(
        port=0, dimension=DIM, log_format="text", backend=backend, filter_fields={"category": "string"},
        milvus=MilvusSettings(uri=str(location.with_suffix(".db")), timeout_s=20), faiss=FaissSettings(data_dir=location),
    )
    server, port = await create_server(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await server.wait_ready(timeout=60)
        yield Service(search_pb2_grpc.VectorSearchStub(channel))
    finally:
        await channel.close()
        await server.stop(grace=1)


@pytest.fixture(params=SEARCH_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


# --- search_svc --------------------------------------------------------------------------------


async def test_regions_are_searched_grouped_per_item_and_removed_with_their_item(tmp_path: Path, backend: str):
    vectors = unit_vectors(40, seed=1)
    async with running(tmp_path / "store", backend) as service:
        assert not (await service.stats()).regions
        # "a" has 12 regions near vectors[10] (the best one is vectors[10] itself), "b" its full view only.
        near = [vectors[10] + 0.05 * offset for offset in unit_vectors(11, seed=2)]
        regions_a = [region((n, 2 * n, 10 + n, 20), vector / np.linalg.norm(vector)) for n, vector in enumerate(near)]
        regions_a.append(region((5, 6, 7, 8), vectors[10]))
        others = [item(f"o{n}", vectors[20 + n], [region((0, 0, 4, 4), vectors[30 + n])], category="other")
                  for n in range(5)]
        await service.upsert([item("a", vectors[0], regions_a, category="shoes"), item("b", vectors[1]), *others])
        stats = await service.stats()
        assert stats.regions and stats.count == 7  # items, not rows

        # The region that matched, one hit per item, k distinct items although "a" has 12 rows near the query.
        hits = await service.hits(vectors[10], 3)
        assert hits[0].id == "a" and box_of(hits[0]) == (5, 6, 7, 8) and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert len({hit.id for hit in hits}) == 3
        assert hits[0].image_uri == "file:///images/a.jpg" and hits[0].metadata["category"] == "shoes"
        # The full view matched: no region.
        [full] = await service.hits(vectors[0], 1)
        assert full.id == "a" and not full.HasField("region")
        # Every item once, even with k above the items.
        assert sorted(hit.id for hit in await service.hits(vectors[10], 50)) == sorted(["a", "b", *[f"o{n}" for n in range(5)]])
        # A filter applies to the item's metadata, for a region as for a full view.
        only_other = search_pb2.Filter(conditions=[search_pb2.Condition(
            field="category", op=search_pb2.EQ, value=struct_value("other"))])
        filtered = await service.hits(vectors[30], 2, filter=only_other)
        assert filtered[0].id == "o0" and box_of(filtered[0]) == (0, 0, 4, 4)
        assert "a" not in {hit.id for hit in await service.hits(vectors[10], 7, filter=only_other)}

        # Re-indexing "a" with other regions removes the old ones: vectors[10] no longer finds its region.
        await service.upsert([item("a", vectors[0], [region((1, 1, 2, 2), vectors[11])], category="shoes")])
        top = (await service.hits(vectors[10], 1))[0]
        assert not (top.id == "a" and top.score > 0.99)
        assert box_of((await service.hits(vectors[11], 1))[0]) == (1, 1, 2, 2)
        # Re-indexing without regions leaves the item none.
        await service.upsert([item("a", vectors[0])])
        assert all(box_of(hit) is None for hit in await service.hits(vectors[11], 7) if hit.id == "a")
        # Deleting an item removes its regions.
        await service.stub.Delete(search_pb2.DeleteRequest(ids=["o0"]))
        assert "o0" not in {hit.id for hit in await service.hits(vectors[30], 7)}
        assert (await service.stats()).count == 6
        if backend == "faiss":
            assert region_rows(tmp_path / "store" / "vsearch_images.sqlite3") == 4  # o1..o4, one each


def struct_value(text: str) -> struct_pb2.Value:
    return struct_pb2.Value(string_value=text)


def region_rows(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("SELECT count(*) FROM regions").fetchone()[0]


async def test_bad_regions_are_refused_naming_the_item(tmp_path: Path, backend: str):
    vectors = unit_vectors(3, seed=3)
    async with running(tmp_path / "store", backend) as service:
        cases = [
            ([region((0, 0, 0, 5), vectors[1])], "region 0 of item 1 ('bad')", "box of zero size"),
            ([search_pb2.Region(vector=search_pb2.Vector(values=vectors[1].tolist()))], "region 0 of item 1 ('bad')", "no box"),
            ([region((0, 0, 5, 5), vectors[1]), region((0, 0, 5, 5), vectors[1][:8])],
             "vector of region 1 of item 1 ('bad')", "8 dimensions"),
            ([region((0, 0, 5, 5), 2 * vectors[1])], "vector of region 0 of item 1 ('bad')", "L2-normalised"),
            ([region((0, 0, 5, 5), vectors[1])] * (MAX_REGIONS_PER_ITEM + 1), "item 1 ('bad')",
             f"at most {MAX_REGIONS_PER_ITEM}"),
        ]
        for regions, *fragments in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await service.upsert([item("good", vectors[0]), item("bad", vectors[1], regions)])
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for fragment in fragments:
                assert fragment in caught.value.details()
        stats = await service.stats()  # nothing was written
        assert (stats.count, stats.regions) == (0, False)


async def test_a_collection_without_regions_keeps_working_and_can_get_them(tmp_path: Path, backend: str):
    """A collection written before regions existed: FAISS, a file without the regions table (as the
    previous version wrote it); Milvus, a collection without its regions collection (the same schema
    as before). It serves as ever, and the first upsert with regions turns them on."""
    vectors = unit_vectors(6, seed=4)
    location = tmp_path / "store"
    async with running(location, backend) as service:
        await service.upsert([item(f"old{n}", vectors[n]) for n in range(4)])
    if backend == "faiss":
        with contextlib.closing(sqlite3.connect(location / "vsearch_images.sqlite3")) as connection:
            connection.execute("DROP TABLE regions")
            connection.execute("DELETE FROM meta WHERE key = 'regions_per_item'")
            connection.commit()
        for snapshot in location.glob("*.faiss"):
            snapshot.unlink()
    async with running(location, backend) as service:
        stats = await service.stats()
        assert (stats.count, stats.regions) == (4, False)
        hits = await service.hits(vectors[2], 2)
        assert hits[0].id == "old2" and not hits[0].HasField("region")
        await service.upsert([item("old1", vectors[1], [region((3, 3, 9, 9), vectors[5])])])
        assert (await service.stats()).regions
        top = (await service.hits(vectors[5], 1))[0]
        assert top.id == "old1" and box_of(top) == (3, 3, 9, 9)
        assert (await service.stats()).count == 4
        # Dropping a collection with regions drops them too; a new one of the same name has none.
        await service.upsert([item("x", vectors[0], [region((0, 0, 1, 1), vectors[1])])], collection="scratch")
        assert (await service.stats("scratch")).regions
        await service.stub.DropCollection(search_pb2.DropCollectionRequest(collection="scratch"))
        await service.upsert([item("x", vectors[0])], collection="scratch")
        assert not (await service.stats("scratch")).regions
        assert [box_of(hit) for hit in await service.hits(vectors[1], 1, collection="scratch")] == [None]


# --- the embedder's grid -----------------------------------------------------------------------


def test_region_boxes_cover_the_grid_inside_the_image():
    assert region_boxes(200, 100)[0].width >= 1
    for width, height in [(640, 480), (37, 501), (1, 1), (2, 3)]:
        boxes = region_boxes(width, height)
        assert len(boxes) == len(REGION_GRID)
        for box in boxes:
            assert box.width >= 1 and box.height >= 1
            assert box.x + box.width <= width and box.y + box.height <= height


async def test_the_embedder_embeds_each_region_as_its_crop(mobilenet_embedder, ukbench_bytes: list[bytes]):
    stub = mobilenet_embedder.stub
    data = ukbench_bytes[0]
    width, height = Image.open(io.BytesIO(data)).size
    crop = (10, 20, width - 30, height - 60)
    response = await stub.EmbedImages(embedder_pb2.EmbedImagesRequest(
        images=[image_input(data), image_input(data, crop), image_input(b"not an image")], with_regions=True), timeout=60)
    whole, cropped, bad = response.results
    assert bad.WhichOneof("result") == "error" and not bad.regions
    expected = region_boxes(width, height)
    assert [(r.box.x, r.box.y, r.box.width, r.box.height) for r in whole.regions] == [
        (box.x, box.y, box.width, box.height) for box in expected]
    # In the crop's pixels, when a crop was given.
    assert [(r.box.width, r.box.height) for r in cropped.regions] == [
        (box.width, box.height) for box in region_boxes(crop[2], crop[3])]
    # A region's vector is the embedding of that part of the image, as a crop query would get it.
    picked = [0, len(expected) // 2, len(expected) - 1]
    as_crops = await embed_results(stub, [image_input(data, (expected[n].x, expected[n].y, expected[n].width,
                                                             expected[n].height)) for n in picked])
    for n, result in zip(picked, as_crops):
        assert np.dot(whole.regions[n].embedding.values, result.embedding.values) > 0.999
    plain = (await stub.EmbedImages(embedder_pb2.EmbedImagesRequest(images=[image_input(data)]), timeout=60)).results[0]
    assert not plain.regions and np.dot(plain.embedding.values, whole.embedding.values) > 0.999


# --- through the gateway -----------------------------------------------------------------------

# A 30 % crop (of the width and of the height) of one catalog image that the full views alone do not
# find (another chair image ranks first) and its regions do, by a margin of 0.29 in cosine: found by
# scanning 9 crop positions of each of the 24 images with the grid (tests cannot pick by luck).
CROP_IMAGE = "101_ObjectCategories/windsor_chair/image_0001.jpg"
CROP = (67, 195, 57, 90)
WITH_REGIONS = "with_regions"
PLAIN = "plain"


def catalog_requests(paths: list[Path], collection: str, regions: bool = False):
    for number, path in enumerate(paths):
        yield gateway_pb2.AddImageRequest(
            id=path.relative_to(path.parents[2]).as_posix(), image=path.read_bytes(),
            image_uri=path.resolve().as_uri(), collection=collection, regions=regions and number == 0,
        )


@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
async def regions_stack(request, tmp_path_factory, mobilenet_dir, shared_dir):
    root = shared_dir / "datasets/caltech101"
    paths = [root / path for path, _label, _split in caltech_sample_rows(shared_dir, train=2, test=0)]
    async with in_process_stack(tmp_path_factory.mktemp(f"regions-{request.param}"), mobilenet_dir,
                                backend=request.param) as stack:
        for collection, regions in ((PLAIN, False), (WITH_REGIONS, True)):
            summary = await stack.stub.AddImages(catalog_requests(paths, collection, regions), timeout=300)
            assert (summary.indexed, summary.failed) == (len(paths), 0), summary
        stack.catalog = paths
        yield stack


async def crop_search(stack, collection: str, crop: tuple[int, int, int, int], k: int = 5, image: str = CROP_IMAGE,
                      **fields) -> gateway_pb2.VisualSearchResponse:
    x, y, width, height = crop
    data = (stack.catalog[0].parents[2] / image).read_bytes()
    return await stack.stub.Search(gateway_pb2.VisualSearchRequest(
        image=data, crop=embedder_pb2.CropBox(x=x, y=y, width=width, height=height), k=k, collection=collection,
        **fields), timeout=60)


async def test_a_small_crop_finds_its_image_by_a_region(regions_stack):
    stack = regions_stack
    plain_stats, region_stats = [await stack.stub.Stats(gateway_pb2.VisualStatsRequest(collection=name))
                                 for name in (PLAIN, WITH_REGIONS)]
    assert (plain_stats.regions, region_stats.regions) == (False, True)
    assert plain_stats.count == region_stats.count == len(stack.catalog)  # items, not vectors

    plain = await crop_search(stack, PLAIN, CROP)
    assert plain.hits[0].id != CROP_IMAGE
    assert not any(hit.HasField("matched_region") for hit in plain.hits)
    found = await crop_search(stack, WITH_REGIONS, CROP, k=len(stack.catalog))
    first = found.hits[0]
    assert first.id == CROP_IMAGE and first.HasField("matched_region")
    width, height = Image.open(stack.catalog[0].parents[2] / CROP_IMAGE).size
    box = first.matched_region
    assert box.width > 0 and box.height > 0 and box.x + box.width <= width and box.y + box.height <= height
    # The crop lies in the region that matched (more than half of it).
    x, y, crop_width, crop_height = CROP
    inside = (max(0, min(x + crop_width, box.x + box.width) - max(x, box.x))
              * max(0, min(y + crop_height, box.y + box.height) - max(y, box.y)))
    assert inside > 0.5 * crop_width * crop_height
    # One hit per item: every item once.
    assert sorted(hit.id for hit in found.hits) == sorted(
        path.relative_to(path.parents[2]).as_posix() for path in stack.catalog)

    # Over HTTP: matched_region in pixels, null for the plain collection.
    data = (stack.catalog[0].parents[2] / CROP_IMAGE).read_bytes()
    replies = [await stack.search_file(data, crop=",".join(map(str, CROP)), k="1", collection=name)
               for name in (WITH_REGIONS, PLAIN)]
    assert [reply.status_code for reply in replies] == [200, 200]
    with_regions, plain_reply = (reply.json()["hits"][0] for reply in replies)
    assert with_regions["matched_region"] == {"x": box.x, "y": box.y, "width": box.width, "height": box.height}
    assert plain_reply["matched_region"] is None
    assert (await stack.http.get("/v1/stats", params={"collection": WITH_REGIONS})).json()["regions"] is True

    # Copy mode over a collection with regions: its shortlist is per item, and the crop's image is a copy.
    copies = await crop_search(stack, WITH_REGIONS, CROP, mode=gateway_pb2.SEARCH_MODE_COPY)
    assert len({hit.id for hit in copies.hits}) == len(copies.hits)
    assert CROP_IMAGE in {hit.id for hit in copies.hits}


async def test_a_stream_without_the_flag_makes_regions_and_deleting_removes_them(regions_stack, shared_dir):
    stack = regions_stack
    root = shared_dir / "datasets/caltech101"
    newcomer = root / "101_ObjectCategories/chair/image_0010.jpg"
    summary = await stack.stub.AddImages(iter([gateway_pb2.AddImageRequest(
        id="newcomer", image=newcomer.read_bytes(), collection=WITH_REGIONS)]), timeout=60)
    assert summary.indexed == 1
    # Its regions were made: a search for exactly one of them finds that region.
    width, height = Image.open(newcomer).size
    box = region_boxes(width, height)[7]
    reply = await stack.stub.Search(gateway_pb2.VisualSearchRequest(
        image=newcomer.read_bytes(), crop=embedder_pb2.CropBox(x=box.x, y=box.y, width=box.width, height=box.height),
        k=1, collection=WITH_REGIONS), timeout=60)
    [hit] = reply.hits
    assert hit.id == "newcomer" and hit.score > 0.999
    assert (hit.matched_region.x, hit.matched_region.y, hit.matched_region.width, hit.matched_region.height) == (
        box.x, box.y, box.width, box.height)

    # Deleting an item removes its regions: the crop no longer finds it at all.
    deleted = await stack.stub.DeleteImages(gateway_pb2.DeleteImagesRequest(ids=[CROP_IMAGE], collection=WITH_REGIONS))
    assert deleted.deleted == 1
    after = await crop_search(stack, WITH_REGIONS, CROP, k=50)
    assert CROP_IMAGE not in {hit.id for hit in after.hits}
    # Indexed again (without the flag: the collection has regions), it is found by its region again.
    path = stack.catalog[0].parents[2] / CROP_IMAGE
    await stack.stub.AddImages(iter([gateway_pb2.AddImageRequest(
        id=CROP_IMAGE, image=path.read_bytes(), collection=WITH_REGIONS)]), timeout=60)
    again = await crop_search(stack, WITH_REGIONS, CROP)
    assert again.hits[0].id == CROP_IMAGE and again.hits[0].HasField("matched_region")


async def test_turning_regions_on_embeds_stored_items_again(regions_stack):
    stack = regions_stack
    paths = stack.catalog[:3]
    first = await stack.stub.AddImages(catalog_requests(paths, "turned_on"), timeout=60)
    assert first.indexed == 3
    # Stored without regions, unchanged: a stream that turns regions on embeds them again all the same.
    turned_on = await stack.stub.AddImages(catalog_requests(paths, "turned_on", regions=True), timeout=60)
    assert (turned_on.indexed, turned_on.unchanged) == (3, 0)
    assert (await stack.stub.Stats(gateway_pb2.VisualStatsRequest(collection="turned_on"))).regions
    # From then on, unchanged items are left alone, with the flag or without.
    again = await stack.stub.AddImages(catalog_requests(paths, "turned_on", regions=True), timeout=60)
    assert (again.indexed, again.unchanged) == (0, 3)


async def test_vsearch_index_regions(regions_stack):
    stack = regions_stack
    code, out, err = await run_cli_async(
        "index", str(stack.catalog[0]), "--collection", "cli_regions", "--regions", "--json",
        "--gateway", stack.gateway_server.address,
    )
    assert code == 0, err
    stats = await stack.stub.Stats(gateway_pb2.VisualStatsRequest(collection="cli_regions"))
    assert (stats.count, stats.regions) == (1, True)
    # `vsearch search` says which region matched: here exactly one of the grid's.
    width, height = Image.open(stack.catalog[0]).size
    box = region_boxes(width, height)[4]
    code, out, err = await run_cli_async(
        "search", str(stack.catalog[0]), "--crop", f"{box.x},{box.y},{box.width},{box.height}", "-k", "1",
        "--collection", "cli_regions", "--gateway", stack.gateway_server.address,
    )
    assert code == 0, err
    assert f"region {box.x},{box.y},{box.width}x{box.height}" in out

"""Paging a search (VisualSearchRequest.page_token, next_page_token) through the real stack, on both search
backends: pages join up to exactly the unpaged ranking (no hit repeated or skipped), also across ties, with
regions, with min_score and in copy mode; a write in between is FAILED_PRECONDITION, a token altered or sent
with another query INVALID_ARGUMENT; pages stop at GATEWAY_MAX_PAGING_DEPTH; each page is cached under its
own offset; with a calibrated model, a page's match_probability is that of its hits' ranks in the whole
ranking, and min_probability ends the pages where it cuts. Over gRPC and HTTP (JSON and multipart)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageOps
from google.protobuf import struct_pb2

from conftest import SEARCH_BACKENDS, encode, in_process_stack, repeat_until_cached, second_gateway
from embedder_svc.model_card import Calibration, ModelCard, read_model_card, write_model_card
from gateway.match_probability import MatchCalibration
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2

CATALOG = 16  # ukbench objects 0..3, four views each, in the default collection
SHORTLIST = 8  # GATEWAY_COPY_SEARCH__SHORTLIST of the stack
TIES = 4  # the same picture under four ids, in collection "ties"
COPY_MODE = gateway_pb2.SEARCH_MODE_COPY


def add_requests(images: list[bytes], ids: list[str], collection: str = "", regions: bool = False):
    for position, (image, item_id) in enumerate(zip(images, ids)):
        metadata = struct_pb2.Struct()
        metadata.update({"category": f"object-{position // 4}", "price": float(position)})
        yield gateway_pb2.AddImageRequest(id=item_id, image=image, metadata=metadata, collection=collection,
                                          regions=regions)


async def add(stack, images: list[bytes], ids: list[str], collection: str = "", regions: bool = False) -> None:
    summary = await stack.stub.AddImages(add_requests(images, ids, collection, regions), timeout=300)
    assert (summary.indexed, summary.failed) == (len(ids), 0), summary


@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
async def stack(request, tmp_path_factory, mobilenet_dir, ukbench_bytes):
    async with in_process_stack(tmp_path_factory.mktemp(f"paging-{request.param}"), mobilenet_dir,
                                backend=request.param, copy_search={"shortlist": SHORTLIST}) as stack:
        await add(stack, ukbench_bytes[:CATALOG], [f"p-{n:02d}" for n in range(CATALOG)])
        # Four identical pictures (equal scores: ordered by id), and four others.
        tie_ids = ["tie-d", "tie-b", "tie-a", "tie-c"]
        await add(stack, [ukbench_bytes[40]] * TIES + ukbench_bytes[41:45], tie_ids + [f"other-{n}" for n in range(4)],
                  collection="ties")
        await add(stack, ukbench_bytes[20:28], [f"r-{n}" for n in range(8)], collection="with_regions", regions=True)
        yield stack


async def walk(stub, request: gateway_pb2.VisualSearchRequest, page_sizes: list[int]) -> list[gateway_pb2.VisualSearchResponse]:
    """The pages of `request`, each k the next of `page_sizes` (the last repeated), until no token."""
    pages = []
    token = ""
    while True:
        page = gateway_pb2.VisualSearchRequest()
        page.CopyFrom(request)
        page.k = page_sizes[min(len(pages), len(page_sizes) - 1)]
        page.page_token = token
        reply = await stub.Search(page, timeout=60)
        pages.append(reply)
        token = reply.next_page_token
        if not token:
            return pages
        assert len(pages) < 50, "pages that never end"


def ranking(replies) -> list[tuple[str, float]]:
    return [(hit.id, hit.score) for reply in replies for hit in reply.hits]


async def test_grpc_pages_join_up_to_the_unpaged_ranking(stack, ukbench_bytes):
    query = gateway_pb2.VisualSearchRequest(image=ukbench_bytes[5])
    unpaged = await stack.stub.Search(gateway_pb2.VisualSearchRequest(image=ukbench_bytes[5], k=CATALOG), timeout=60)
    assert len(unpaged.hits) == CATALOG and not unpaged.next_page_token  # all there is: no next page
    pages = await walk(stack.stub, query, [5, 3, 6])
    assert [len(page.hits) for page in pages] == [5, 3, 6, 2]
    assert ranking(pages) == ranking([unpaged])
    assert len({page.index_generation for page in pages}) == 1
    # A page that ends exactly with the last hit says so: no empty page after it.
    assert [len(page.hits) for page in await walk(stack.stub, query, [8])] == [8, 8]

    # With a filter and min_score, by an item's stored vector: the unpaged answer, split.
    search_filter = search_pb2.Filter()
    condition = search_filter.conditions.add(field="category", op=search_pb2.IN)
    condition.value.list_value.values.add().string_value = "object-1"
    condition.value.list_value.values.add().string_value = "object-2"
    everything = await stack.stub.Search(gateway_pb2.VisualSearchRequest(item_id="p-05", k=CATALOG, filter=search_filter),
                                         timeout=60)
    assert len(everything.hits) == 8
    threshold = everything.hits[5].score
    unpaged = await stack.stub.Search(gateway_pb2.VisualSearchRequest(
        item_id="p-05", k=CATALOG, filter=search_filter, min_score=threshold), timeout=60)
    assert len(unpaged.hits) == 6
    pages = await walk(stack.stub, gateway_pb2.VisualSearchRequest(item_id="p-05", filter=search_filter,
                                                                    min_score=threshold), [4])
    assert [len(page.hits) for page in pages] == [4, 2]
    assert ranking(pages) == ranking([unpaged])


async def test_http_pages_json_and_multipart(stack, ukbench_bytes):
    image = ukbench_bytes[9]
    unpaged = (await stack.http.post("/v1/search", json={"image_base64": base64.b64encode(image).decode(), "k": 16})).json()
    assert unpaged["next_page_token"] == "" and len(unpaged["hits"]) == CATALOG
    hits, token = [], ""
    for k in (6, 6, 6):
        body = {"image_base64": base64.b64encode(image).decode(), "k": k, "page_token": token}
        reply = await stack.http.post("/v1/search", json=body)
        assert reply.status_code == 200, reply.text
        hits += reply.json()["hits"]
        token = reply.json()["next_page_token"]
    assert token == "" and [hit["id"] for hit in hits] == [hit["id"] for hit in unpaged["hits"]]

    hits, token = [], ""
    for _ in range(4):
        reply = await stack.search_file(image, k="5", page_token=token)
        assert reply.status_code == 200, reply.text
        hits += reply.json()["hits"]
        token = reply.json()["next_page_token"]
        if not token:
            break
    assert [hit["id"] for hit in hits] == [hit["id"] for hit in unpaged["hits"]]


async def test_ties_are_paged_by_id_without_repeating_or_skipping(stack, ukbench_bytes):
    query = gateway_pb2.VisualSearchRequest(image=ukbench_bytes[40], collection="ties")
    unpaged = await stack.stub.Search(gateway_pb2.VisualSearchRequest(image=ukbench_bytes[40], collection="ties", k=8),
                                      timeout=60)
    assert [hit.id for hit in unpaged.hits[:TIES]] == ["tie-a", "tie-b", "tie-c", "tie-d"]
    assert len({hit.score for hit in unpaged.hits[:TIES]}) == 1
    for sizes in ([1], [2], [3], [1, 2, 5]):  # pages that end inside the tie
        assert ranking(await walk(stack.stub, query, sizes)) == ranking([unpaged]), sizes


async def test_pages_of_a_collection_with_regions_hold_each_image_once(stack, ukbench_bytes):
    query = gateway_pb2.VisualSearchRequest(image=ukbench_bytes[21], collection="with_regions")
    unpaged = await stack.stub.Search(
        gateway_pb2.VisualSearchRequest(image=ukbench_bytes[21], collection="with_regions", k=8), timeout=60)
    assert len(unpaged.hits) == 8
    pages = await walk(stack.stub, query, [3])
    assert ranking(pages) == ranking([unpaged])
    assert [hit.matched_region for page in pages for hit in page.hits] == [hit.matched_region for hit in unpaged.hits]


async def test_copy_mode_pages_walk_the_shortlist(stack, ukbench_bytes):
    mirrored = encode(ImageOps.mirror(Image.open(io.BytesIO(ukbench_bytes[5])).convert("RGB")), "JPEG")
    unpaged = await stack.stub.Search(gateway_pb2.VisualSearchRequest(image=mirrored, mode=COPY_MODE, k=SHORTLIST),
                                      timeout=60)
    assert len(unpaged.hits) == SHORTLIST and unpaged.hits[0].id == "p-05" and unpaged.hits[0].is_copy
    query = gateway_pb2.VisualSearchRequest(image=mirrored, mode=COPY_MODE)
    pages = await walk(stack.stub, query, [3])
    assert [len(page.hits) for page in pages] == [3, 3, 2]  # no deeper than the shortlist
    assert [(hit.id, hit.is_copy) for page in pages for hit in page.hits] == [(hit.id, hit.is_copy) for hit in unpaged.hits]
    # k may change between pages; the first page's shortlist is walked.
    pages = await walk(stack.stub, query, [2, 10])
    assert [len(page.hits) for page in pages] == [2, 6]


async def test_each_page_is_cached_under_its_offset(stack):
    query = gateway_pb2.VisualSearchRequest(item_id="p-12", k=4)
    first = await stack.stub.Search(query, timeout=60)
    second_request = gateway_pb2.VisualSearchRequest(item_id="p-12", k=4, page_token=first.next_page_token)
    second = await stack.stub.Search(second_request, timeout=60)
    again = await repeat_until_cached(lambda: stack.stub.Search(second_request, timeout=60))
    assert [hit.id for hit in again.hits] == [hit.id for hit in second.hits]
    assert not {hit.id for hit in second.hits} & {hit.id for hit in first.hits}
    first_again = await repeat_until_cached(lambda: stack.stub.Search(query, timeout=60))
    assert [hit.id for hit in first_again.hits] == [hit.id for hit in first.hits]
    # A cached page's token leads on as a fresh one's does.
    third = await stack.stub.Search(gateway_pb2.VisualSearchRequest(item_id="p-12", k=4, page_token=again.next_page_token),
                                    timeout=60)
    assert ranking([first, second, third]) == ranking([await stack.stub.Search(
        gateway_pb2.VisualSearchRequest(item_id="p-12", k=12), timeout=60)])


async def expect_error(call, code: grpc.StatusCode, *words: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    for word in words:
        assert word in caught.value.details()
    return caught.value.details()


async def test_a_write_to_the_collection_ends_its_pages(stack, ukbench_bytes):
    await add(stack, ukbench_bytes[48:54], [f"w-{n}" for n in range(6)], collection="writes")
    query = dict(item_id="w-0", collection="writes", k=2)
    first = await stack.stub.Search(gateway_pb2.VisualSearchRequest(**query), timeout=60)
    # A write to another collection leaves this one's generation, and its pages, as they were.
    await add(stack, [ukbench_bytes[54]], ["elsewhere"], collection="ties")
    second = await stack.stub.Search(gateway_pb2.VisualSearchRequest(**query, page_token=first.next_page_token), timeout=60)
    assert len(second.hits) == 2 and second.index_generation == first.index_generation
    await add(stack, [ukbench_bytes[55]], ["w-new"], collection="writes")
    message = await expect_error(
        stack.stub.Search(gateway_pb2.VisualSearchRequest(**query, page_token=second.next_page_token), timeout=60),
        grpc.StatusCode.FAILED_PRECONDITION, "page_token", "search again from the first page")
    assert str(second.index_generation) in message

    reply = (await stack.http.post("/v1/search", json={**query, "k": 2})).json()
    deleted = await stack.http.delete("/v1/images/w-new", params={"collection": "writes"})
    assert deleted.status_code == 200, deleted.text
    refused = await stack.http.post("/v1/search", json={**query, "page_token": reply["next_page_token"]})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "FAILED_PRECONDITION" and "page_token" in refused.json()["error"]["message"]


async def test_altered_tokens_and_tokens_of_another_query_are_invalid(stack, ukbench_bytes):
    request = gateway_pb2.VisualSearchRequest(image=ukbench_bytes[2], k=3)
    token = (await stack.stub.Search(request, timeout=60)).next_page_token
    assert token
    altered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    for bad in (altered, token[:-2], "not-a-token", token + "AAAA"):
        await expect_error(stack.stub.Search(gateway_pb2.VisualSearchRequest(image=ukbench_bytes[2], page_token=bad),
                                             timeout=60), grpc.StatusCode.INVALID_ARGUMENT, "page_token", "not a token")
    others = [
        gateway_pb2.VisualSearchRequest(image=ukbench_bytes[3]),
        gateway_pb2.VisualSearchRequest(image=ukbench_bytes[2], collection="ties"),
        gateway_pb2.VisualSearchRequest(image=ukbench_bytes[2], min_score=0.1),
        gateway_pb2.VisualSearchRequest(image=ukbench_bytes[2], mode=COPY_MODE),
        gateway_pb2.VisualSearchRequest(image=ukbench_bytes[2], crop=embedder_pb2.CropBox(x=0, y=0, width=50, height=50)),
        gateway_pb2.VisualSearchRequest(item_id="p-02"),
    ]
    for other in others:
        other.page_token = token
        await expect_error(stack.stub.Search(other, timeout=60), grpc.StatusCode.INVALID_ARGUMENT, "page_token",
                           "another query")
    # k may change; an unspecified mode is similar mode.
    same = gateway_pb2.VisualSearchRequest(image=ukbench_bytes[2], k=7, mode=gateway_pb2.SEARCH_MODE_SIMILAR,
                                           page_token=token)
    assert len((await stack.stub.Search(same, timeout=60)).hits) == 7

    refused = await stack.http.post("/v1/search", json={"item_id": "p-02", "page_token": token})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_ARGUMENT"
    assert "page_token" in refused.json()["error"]["message"]


async def test_pages_stop_at_the_paging_depth(stack):
    async with second_gateway(stack, max_paging_depth=6) as stub:
        pages = await walk(stub, gateway_pb2.VisualSearchRequest(item_id="p-00"), [4])
        assert [len(page.hits) for page in pages] == [4, 2]
        assert not (await stub.Search(gateway_pb2.VisualSearchRequest(item_id="p-00", k=6), timeout=60)).next_page_token
        # A first page may be deeper than that: it simply has no next one.
        assert len((await stub.Search(gateway_pb2.VisualSearchRequest(item_id="p-00", k=9), timeout=60)).hits) == 9
        # A token from a gateway that pages deeper, past this one's depth.
        deep = (await walk(stack.stub, gateway_pb2.VisualSearchRequest(item_id="p-00"), [7]))[0].next_page_token
        await expect_error(stub.Search(gateway_pb2.VisualSearchRequest(item_id="p-00", page_token=deep), timeout=60),
                           grpc.StatusCode.INVALID_ARGUMENT, "page_token", "GATEWAY_MAX_PAGING_DEPTH")


async def test_without_redis_pages_follow_search_svcs_generation(stack, ukbench_bytes):
    """A gateway with the in-process cache checks tokens against search_svc's own generation, which any
    write moves, whatever its collection."""
    async with second_gateway(stack) as stub:
        query = gateway_pb2.VisualSearchRequest(item_id="p-03")
        unpaged = await stub.Search(gateway_pb2.VisualSearchRequest(item_id="p-03", k=CATALOG), timeout=60)
        assert ranking(await walk(stub, query, [6])) == ranking([unpaged])
        first = await stub.Search(gateway_pb2.VisualSearchRequest(item_id="p-03", k=6), timeout=60)
        summary = await stub.AddImages(iter([gateway_pb2.AddImageRequest(
            id="moves-it", image=ukbench_bytes[30], collection="elsewhere")]), timeout=60)
        assert summary.indexed == 1
        await expect_error(stub.Search(gateway_pb2.VisualSearchRequest(item_id="p-03", k=6,
                                                                       page_token=first.next_page_token), timeout=60),
                           grpc.StatusCode.FAILED_PRECONDITION, "page_token")


def test_probabilities_of_a_page_are_those_of_its_ranks():
    calibration = MatchCalibration(np.array([0.2, 0.9]), np.array([0.0, 1.0]), rank_scale=0.05, description="")
    scores = np.linspace(0.95, 0.4, 12)
    whole = calibration.probabilities(scores)
    paged = np.concatenate([calibration.probabilities(scores[start:start + 5], first_rank=start + 1)
                            for start in range(0, 12, 5)])
    assert paged.tolist() == pytest.approx(whole.tolist())


# ---- a calibrated model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated_dir(mobilenet_dir, tmp_path_factory) -> Path:
    """The default model with a calibration written into its card by hand: the probability is the cosine
    less 0.05 ln(rank)."""
    model_dir = tmp_path_factory.mktemp("calibrated-by-hand") / "model"
    shutil.copytree(mobilenet_dir, model_dir)
    card = read_model_card(model_dir)
    calibration = Calibration(
        score_knots=[0.0, 1.0], probability_knots=[0.0, 1.0], rank_scale=0.05, description="by hand, for a test",
        uncalibrated_version=card.version, labels_sha256="0" * 64, pairs=1, k=1,
    )
    write_model_card(model_dir, card.model_copy(update={
        "calibration": calibration, "version": ModelCard.derive_calibrated_version(card.version, calibration)}))
    return model_dir


async def test_min_probability_ends_the_pages_where_it_cuts(tmp_path, calibrated_dir, ukbench_bytes):
    async with in_process_stack(tmp_path, calibrated_dir) as stack:
        await add(stack, ukbench_bytes[:CATALOG], [f"p-{n:02d}" for n in range(CATALOG)])
        everything = await stack.stub.Search(gateway_pb2.VisualSearchRequest(item_id="p-05", k=CATALOG), timeout=60)
        probabilities = [hit.match_probability for hit in everything.hits]
        assert all(later <= earlier for earlier, later in zip(probabilities, probabilities[1:]))
        threshold = probabilities[6]
        assert threshold > probabilities[7]
        pages = await walk(stack.stub, gateway_pb2.VisualSearchRequest(item_id="p-05"), [5])
        assert [hit.match_probability for page in pages for hit in page.hits] == pytest.approx(probabilities)
        # Probabilities fall down the ranking, so min_probability keeps a head of it: pages end with it.
        pages = await walk(stack.stub, gateway_pb2.VisualSearchRequest(item_id="p-05", min_probability=threshold), [3])
        assert [len(page.hits) for page in pages] == [3, 3, 1]
        assert [hit.id for page in pages for hit in page.hits] == [hit.id for hit in everything.hits[:7]]

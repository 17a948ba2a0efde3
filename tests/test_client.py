"""vsearch.client, sync and asyncio, against the real stack in process (embedder with MobileNetV2-int8,
search_svc on FAISS, gateway checking API keys, Redis): every method, the typed results, paging,
batches, the errors raised (class and code), deadlines, and retries of UNAVAILABLE only, watched
through `on_retry` and `attempts`, with a real gateway started on the port once the first attempt
has failed. The sync client runs in a thread: the stack answers on this event loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest

from conftest import in_process_stack, repeat_until_cached, run_cli, wait_until
from gateway.server import create_server as create_gateway
from gateway.settings import GatewaySettings
from vsearch.client import (
    AddItem, AsyncVisualSearchClient, Box, InvalidArgument, NotFound, PermissionDenied, RateLimited, RetryEvent,
    RetryPolicy, SearchQuery, SearchResult, Unauthenticated, Unavailable, VisualSearchClient,
)
from vsearch_cli.local_stack.ports import free_port

CALTECH = "datasets/caltech101/101_ObjectCategories"
KINDS = ["sync", "async"]
# Retries fast enough for a test, many enough to outlast a gateway starting up.
PATIENT = RetryPolicy(max_attempts=40, initial_backoff_s=0.05, max_backoff_s=0.5)


def create_key(keys_file: Path, name: str, scopes: str) -> str:
    """`vsearch keys create --json`: the key it returns once."""
    result = run_cli("keys", "create", name, "--scopes", scopes, "--keys-file", str(keys_file), "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    made = json.loads(result.stdout)
    assert made["name"] == name and made["scopes"] == scopes.split(",") and "hash" not in made
    return made["key"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("client-keys") / "api-keys.jsonl"
    return path, {name: create_key(path, name, scopes) for name, scopes in
                  [("searcher", "search"), ("operator", "admin")]}


@pytest.fixture(scope="module")
async def stack(tmp_path_factory, mobilenet_dir, keys):
    keys_file, _ = keys
    async with in_process_stack(tmp_path_factory.mktemp("client"), mobilenet_dir,
                                auth={"keys_file": keys_file, "reload_interval_s": 0.05}) as stack:
        yield stack


class Client:
    """One client, sync or asyncio, called the same way: `await client.call("search", ...)` runs the sync
    client's method in a thread; `await client.each("list_images", ...)` collects an iterator's items."""

    def __init__(self, kind: str, address: str, **settings: Any) -> None:
        self.kind = kind
        self.client = (VisualSearchClient if kind == "sync" else AsyncVisualSearchClient)(address, **settings)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        function = getattr(self.client, method)
        if self.kind == "sync":
            return await asyncio.to_thread(function, *args, **kwargs)
        return await function(*args, **kwargs)

    async def each(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        function = getattr(self.client, method)
        if self.kind == "sync":
            return await asyncio.to_thread(lambda: list(function(*args, **kwargs)))
        return [item async for item in function(*args, **kwargs)]

    async def close(self) -> None:
        if self.kind == "sync":
            self.client.close()
        else:
            await self.client.close()


@pytest.fixture(params=KINDS)
async def client(request, stack, keys) -> AsyncIterator[Client]:
    _, made = keys
    connected = Client(request.param, stack.gateway_server.address, api_key=made["operator"])
    yield connected
    await connected.close()


def catalog(ukbench_images: list[Path], count: int = 8) -> list[AddItem]:
    """ukbench00000..3 are four views of one object, 4..7 of another; category by parity, price = n."""
    return [AddItem(image=path, id=f"img-{n}", metadata={"category": "even" if n % 2 == 0 else "odd", "price": n})
            for n, path in enumerate(ukbench_images[:count])]


async def indexed(client: Client, collection: str, ukbench_images: list[Path]) -> None:
    summary = await client.call("add", catalog(ukbench_images), collection=collection)
    assert summary.indexed + summary.unchanged == 8 and summary.failed == 0, summary


# ---- searching and adding ---------------------------------------------------------------------------


async def test_add_reports_progress_and_search_takes_bytes_paths_crops_ids_and_filters(client, ukbench_images):
    collection = f"client_search_{client.kind}"
    sent: list[int] = []
    items = catalog(ukbench_images)
    summary = await client.call("add", iter(items), collection=collection, progress=sent.append)
    assert (summary.received, summary.indexed, summary.failed, summary.unchanged) == (8, 8, 0, 0)
    assert sent == list(range(1, 9))

    query = ukbench_images[1]
    by_path = await client.call("search", query, k=4, collection=collection)
    by_bytes = await client.call("search", query.read_bytes(), k=4, collection=collection)
    assert isinstance(by_path, SearchResult)
    assert {hit.id for hit in by_path.hits} == {f"img-{n}" for n in range(4)}
    assert [hit.id for hit in by_bytes.hits] == [hit.id for hit in by_path.hits]
    first = by_path.hits[0]
    assert first.id == "img-1" and first.score > 0.99
    assert first.metadata == {"category": "odd", "price": 1.0}
    assert first.image_uri == query.resolve().as_uri()  # a path's default image URI
    assert (first.match_probability, first.is_copy, first.matched_box, first.matched_region) == (None, None, None, None)
    assert by_path.index_generation > 0 and by_path.model_version and by_path.timing.total_ms > 0

    cropped = await client.call("search", query, crop=(0, 0, 320, 240), k=4, collection=collection)
    same = await client.call("search", query, crop=Box(0, 0, 320, 240), k=4, collection=collection)
    assert [hit.id for hit in cropped.hits] == [hit.id for hit in same.hits]
    assert [hit.score for hit in cropped.hits] != [hit.score for hit in by_path.hits]

    by_id = await client.call("search", item_id="img-0", k=4, collection=collection)
    assert {hit.id for hit in by_id.hits} == {f"img-{n}" for n in range(4)} and by_id.embedding_from_cache
    as_query = await client.call("search", SearchQuery(item_id="img-0", k=4, collection=collection))
    assert [hit.id for hit in as_query.hits] == [hit.id for hit in by_id.hits]

    odd = await client.call("search", query, k=8, where={"category": "odd"}, collection=collection)
    assert odd.hits and all(hit.metadata["category"] == "odd" for hit in odd.hits)
    cheap = await client.call("search", query, k=8, where=[("price", "<", 3), ("category", "in", ["even", "odd"])],
                              collection=collection)
    assert {hit.id for hit in cheap.hits} == {"img-0", "img-1", "img-2"}
    # Copy mode by an item's stored copy features: the item itself is a verified copy.
    copies = await client.call("search", item_id="img-2", k=4, mode="copy", collection=collection)
    assert copies.hits[0].id == "img-2" and copies.hits[0].is_copy is True and copies.hits[0].matched_box is not None


async def test_search_by_words(stack, keys, shared_dir):
    """MobileNetV2-int8 searches by words through its ImageNet classifier."""
    _, made = keys
    paths = {category: sorted((shared_dir / CALTECH / category).glob("*.jpg"))[:4] for category in ("pizza", "dalmatian")}
    async with AsyncVisualSearchClient(stack.gateway_server.address, api_key=made["operator"]) as client:
        summary = await client.add(
            (AddItem(path, id=f"{category}/{path.name}") for category, found in paths.items() for path in found),
            collection="client_words")
        assert summary.indexed == 8, summary
        result = await client.search(text="a photo of a pizza", k=4, collection="client_words")
        # Its cache write comes after the reply: wait for it with this client, so the sync client's
        # one search below finds it.
        await repeat_until_cached(lambda: client.search(text="a photo of a pizza", k=4, collection="client_words"))
    assert result.understood_as
    assert [hit.id.split("/")[0] for hit in result.hits].count("pizza") >= 3, result
    with VisualSearchClient(stack.gateway_server.address, api_key=made["searcher"]) as sync_client:
        again = await asyncio.to_thread(sync_client.search, text="a photo of a pizza", k=4, collection="client_words")
    assert [hit.id for hit in again.hits] == [hit.id for hit in result.hits] and again.from_cache


async def test_add_takes_async_iterables_and_a_bad_item_fails_alone(stack, keys, ukbench_images, tmp_path):
    _, made = keys

    async def items() -> AsyncIterator[Any]:
        yield {"image": ukbench_images[10], "id": "good"}
        yield AddItem(b"not an image", id="bad")
        yield ukbench_images[11].read_bytes()  # id: its sha256

    async with AsyncVisualSearchClient(stack.gateway_server.address, api_key=made["operator"]) as client:
        summary = await client.add(items(), collection="client_async_items")
        assert (summary.received, summary.indexed, summary.failed) == (3, 2, 1)
        [failure] = summary.failures
        assert (failure.id, failure.index, failure.code) == ("bad", 1, grpc.StatusCode.INVALID_ARGUMENT)
        # A file that cannot be read is the caller's problem: raised as it is, not as a gateway status.
        with pytest.raises(FileNotFoundError):
            await client.add([tmp_path / "missing.jpg"], collection="client_async_items")
    with VisualSearchClient(stack.gateway_server.address, api_key=made["operator"]) as sync_client:
        with pytest.raises(FileNotFoundError):
            await asyncio.to_thread(sync_client.add, [ukbench_images[12], tmp_path / "missing.jpg"],
                                    collection="client_async_items")


# ---- the catalog ---------------------------------------------------------------------------------------


async def test_delete_stats_collections_and_drop(client, ukbench_images):
    collection = f"client_catalog_{client.kind}"
    await indexed(client, collection, ukbench_images)
    stats = await client.call("stats", collection=collection)
    assert (stats.count, stats.dimension, stats.text_search) == (8, 1280, "classifier")
    assert stats.filterable_fields == ["category", "price"] and stats.field_summaries == []
    listed = {entry.name: entry for entry in await client.call("collections")}
    assert listed[collection].count == 8 and not listed[collection].is_default
    assert any(entry.is_default for entry in listed.values())

    deleted = await client.call("delete", ["img-0", "img-1", "no-such-id"], collection=collection)
    assert deleted.deleted == 2 and deleted.index_generation > 0
    assert (await client.call("stats", collection=collection)).count == 6
    images = await client.each("list_images", collection=collection, page_size=4)  # two pages and a half
    assert [image.id for image in images] == [f"img-{n}" for n in range(2, 8)]
    assert images[0].metadata == {"category": "even", "price": 2.0} and len(images[0].content_sha256) == 64

    dropped = await client.call("drop_collection", collection)
    assert dropped.dropped is True
    with pytest.raises(NotFound) as missing:
        await client.call("stats", collection=collection)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and collection in missing.value.message
    assert (await client.call("drop_collection", collection)).dropped is False
    assert collection not in {entry.name for entry in await client.call("collections")}


async def test_stats_summarises_the_filterable_fields(client, ukbench_images):
    collection = f"client_fields_{client.kind}"
    await indexed(client, collection, ukbench_images)
    stats = await client.call("stats", collection=collection, field_summaries=True)
    summaries = {summary.name: summary for summary in stats.field_summaries}
    assert set(summaries) == {"category", "price"}
    category, price = summaries["category"], summaries["price"]
    assert category.present == 8 and {(value.value, value.count) for value in category.top_values} == {
        ("even", 4), ("odd", 4)} and not category.more_values
    assert (price.present, price.min, price.max) == (8, 0.0, 7.0)
    assert json.loads(json.dumps(stats.to_dict()))["field_summaries"][0]["name"] == "category"


async def test_paging_walks_every_hit_once(client, ukbench_images):
    collection = f"client_pages_{client.kind}"
    await indexed(client, collection, ukbench_images)
    query = ukbench_images[5]
    whole = await client.call("search", query, k=8, collection=collection)
    assert len(whole.hits) == 8
    first = await client.call("search", query, k=3, collection=collection)
    assert [hit.id for hit in first.hits] == [hit.id for hit in whole.hits[:3]] and first.next_page_token
    second = await client.call("search", query, k=3, collection=collection, page_token=first.next_page_token)
    assert [hit.id for hit in second.hits] == [hit.id for hit in whole.hits[3:6]]

    pages = await client.each("search_pages", query, k=3, collection=collection)
    assert [len(page.hits) for page in pages][:3] == [3, 3, 2]
    assert [hit.id for page in pages for hit in page.hits] == [hit.id for hit in whole.hits]
    assert not pages[-1].next_page_token
    hits = await client.each("iter_hits", query, k=3, limit=5, collection=collection)
    assert [hit.id for hit in hits] == [hit.id for hit in whole.hits[:5]]
    # A token from another query is refused, naming it.
    with pytest.raises(InvalidArgument) as refused:
        await client.call("search", ukbench_images[0], k=3, collection=collection, page_token=first.next_page_token)
    assert "page_token" in refused.value.message


async def test_a_batch_answers_each_query_and_a_failing_one_alone(client, ukbench_images):
    collection = f"client_batch_{client.kind}"
    await indexed(client, collection, ukbench_images)
    results = await client.call("search_batch", [
        SearchQuery(image=ukbench_images[1], k=2, collection=collection),
        {"item_id": "no-such-item", "collection": collection},
        {"image": ukbench_images[4].read_bytes(), "where": [("colour", "==", "red")], "collection": collection},
        SearchQuery(item_id="img-6", k=4, where={"category": "even"}, collection=collection),
    ])
    assert len(results) == 4
    found, missing, refused, filtered = results
    assert isinstance(found, SearchResult) and found.hits[0].id == "img-1"
    assert isinstance(missing, NotFound) and missing.code == grpc.StatusCode.NOT_FOUND
    assert isinstance(refused, InvalidArgument) and "colour" in refused.message
    assert isinstance(filtered, SearchResult) and filtered.hits[0].id == "img-6"
    assert {hit.id for hit in filtered.hits} == {"img-0", "img-2", "img-4", "img-6"}


# ---- errors --------------------------------------------------------------------------------------------


async def test_errors_are_raised_with_their_class_code_and_message(stack, keys, ukbench_images):
    _, made = keys
    address = stack.gateway_server.address
    for kind in KINDS:
        operator = Client(kind, address, api_key=made["operator"])
        with pytest.raises(InvalidArgument) as bad_filter:
            await operator.call("search", ukbench_images[0], where=[("colour", "==", "red")])
        assert bad_filter.value.code == grpc.StatusCode.INVALID_ARGUMENT and "colour" in bad_filter.value.message
        assert str(bad_filter.value).startswith("INVALID_ARGUMENT: ")
        # Obviously wrong arguments never reach the gateway.
        with pytest.raises(ValueError, match="unknown operator 'like'"):
            await operator.call("search", ukbench_images[0], where=[("category", "like", "s%")])
        with pytest.raises(ValueError, match="exactly one of image, item_id or text"):
            await operator.call("search", ukbench_images[0], text="a shoe")
        await operator.close()

        anonymous = Client(kind, address)
        with pytest.raises(Unauthenticated) as no_key:
            await anonymous.call("stats")
        assert no_key.value.code == grpc.StatusCode.UNAUTHENTICATED
        await anonymous.close()

        searcher = Client(kind, address, api_key=made["searcher"])
        assert (await searcher.call("stats")).count >= 0
        with pytest.raises(PermissionDenied) as no_scope:
            await searcher.call("delete", ["img-0"], collection="client_nothing")
        assert no_scope.value.code == grpc.StatusCode.PERMISSION_DENIED and "write" in no_scope.value.message
        with pytest.raises(PermissionDenied):
            await searcher.call("add", [ukbench_images[0]], collection="client_nothing")
        await searcher.close()


async def test_a_stream_refused_for_its_scope_says_so_every_time(stack, keys, ukbench_images):
    """The gateway refuses an AddImages stream the key may not write as soon as it starts; a client that
    wrote meanwhile would see its own write fail (grpc's INTERNAL "Internal error from Core") instead of the
    refusal, so the clients wait for the gateway to accept the stream first. Many tries, to meet the race."""
    _, made = keys
    searcher = AsyncVisualSearchClient(stack.gateway_server.address, api_key=made["searcher"])
    try:
        for _ in range(40):
            with pytest.raises(PermissionDenied):
                await searcher.add([ukbench_images[0], ukbench_images[1]], collection="client_nothing")
    finally:
        await searcher.close()


async def test_a_rate_limit_says_how_long_to_wait(stack, keys, ukbench_images):
    keys_file, made = keys
    gateway, _ = await create_gateway(GatewaySettings(
        port=0, http_port=0, embedder_address=stack.embedder_server.address,
        search_address=stack.search_server.address, auth={"keys_file": keys_file},
        rate_limit={"search_per_s": 0.01, "burst": 1},
    ))
    await gateway.start()
    try:
        await gateway.wait_ready(30)
        seen: list[RetryEvent] = []
        for kind in KINDS:
            # Its own key per client: the first search spends the burst, the second is refused.
            key = await asyncio.to_thread(create_key, keys_file, f"limited-{kind}", "search")
            limited = Client(kind, gateway.address, api_key=key, on_retry=seen.append)
            await wait_until(lambda: _accepts(limited), timeout=10, what="the new key is read")
            with pytest.raises(RateLimited) as refused:
                await limited.call("search", ukbench_images[0], k=1)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.attempts == 1
            assert refused.value.retry_after_s is not None and 1.0 < refused.value.retry_after_s <= 100.0
            await limited.close()
        assert seen == []  # RESOURCE_EXHAUSTED is the caller's to wait out, never retried
    finally:
        await gateway.stop(grace=1)


async def _accepts(client: Client) -> bool:
    """Whether the gateway takes the client's key: the one search the burst allows."""
    try:
        await client.call("search", item_id="img-0", k=1, collection="client_nothing")
    except Unauthenticated:
        return False
    except NotFound:
        return True
    return True


# ---- deadlines and retries -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_gateway_not_up_yet_is_retried_until_it_answers(stack, keys, kind):
    """Nothing listens on the port at the first attempt; after it fails, a real gateway starts there,
    and the same call succeeds on a later attempt."""
    _, made = keys
    port = free_port()
    events: list[RetryEvent] = []
    started: list[Any] = []
    loop = asyncio.get_running_loop()

    async def start_gateway() -> None:
        gateway, _ = await create_gateway(GatewaySettings(
            port=port, http_port=0, embedder_address=stack.embedder_server.address,
            search_address=stack.search_server.address))
        await gateway.start()
        started.append(gateway)

    def on_retry(event: RetryEvent) -> None:
        events.append(event)
        if len(events) == 1:  # on the sync client's thread: start it on the stack's loop
            asyncio.run_coroutine_threadsafe(start_gateway(), loop).result(60)

    async def on_retry_async(event: RetryEvent) -> None:
        events.append(event)
        if len(events) == 1:
            await start_gateway()

    client = Client(kind, f"127.0.0.1:{port}", api_key=made["operator"], retries=PATIENT, timeout=60,
                    on_retry=on_retry if kind == "sync" else on_retry_async)
    try:
        stats = await client.call("stats")
        assert stats.dimension == 1280
        assert started and len(events) >= 1
        assert all(event.method == "Stats" and isinstance(event.error, Unavailable) for event in events)
        assert [event.attempt for event in events] == list(range(1, len(events) + 1))
    finally:
        await client.close()
        for gateway in started:
            await gateway.stop(grace=1)


async def test_nothing_listening_is_unavailable_after_the_configured_attempts_and_add_too(ukbench_images):
    address = f"127.0.0.1:{free_port()}"
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    for kind in KINDS:
        events: list[RetryEvent] = []
        client = Client(kind, address, retries=policy, on_retry=events.append)
        for method, args in (("stats", ()), ("add", ([ukbench_images[0]],))):
            events.clear()
            with pytest.raises(Unavailable) as unavailable:
                await client.call(method, *args)
            assert unavailable.value.code == grpc.StatusCode.UNAVAILABLE and unavailable.value.attempts == 3
            assert [event.attempt for event in events] == [1, 2]
            assert "(after 3 attempts)" in str(unavailable.value)
        await client.close()


async def test_invalid_argument_is_never_retried_and_a_deadline_bounds_every_call(stack, keys, ukbench_images):
    _, made = keys
    for kind in KINDS:
        events: list[RetryEvent] = []
        client = Client(kind, stack.gateway_server.address, api_key=made["operator"], retries=PATIENT,
                        on_retry=events.append)
        with pytest.raises(InvalidArgument) as refused:
            await client.call("search", ukbench_images[0], k=1, where=[("colour", "==", "red")])
        assert refused.value.attempts == 1 and events == []
        with pytest.raises(NotFound):
            await client.call("search", item_id="no-such-item", k=1, collection="client_nothing")
        assert events == []
        await client.close()
    # Retries fit in the call's one deadline: a gateway that never comes is given up within it.
    unreachable = Client("async", f"127.0.0.1:{free_port()}", retries=PATIENT, timeout=1.0)
    started = asyncio.get_running_loop().time()
    with pytest.raises(Unavailable) as gave_up:
        await unreachable.call("stats")
    assert asyncio.get_running_loop().time() - started < 1.5 and 1 < gave_up.value.attempts < PATIENT.max_attempts
    await unreachable.close()


async def test_a_stream_whose_write_failed_in_grpc_core_is_unavailable_only_when_the_gateway_is_gone(stack, keys):
    """grpc.aio ends a stream whose write failed in its core with INTERNAL ("Internal error from Core"),
    losing the status it had not yet received: a gateway killed mid-stream (the ingest retries that as
    UNAVAILABLE) or the gateway's own. Which one is told by whether the gateway still answers."""
    lost = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details="Internal error from Core", debug_error_string="Failed \"execute_batch\"")
    _, made = keys
    async with AsyncVisualSearchClient(stack.gateway_server.address, api_key=made["operator"]) as alive:
        error = await alive._broken_stream_error(lost, 1)
    assert error.code == grpc.StatusCode.INTERNAL and "lost the status" in error.message
    async with AsyncVisualSearchClient(f"127.0.0.1:{free_port()}") as gone:
        error = await gone._broken_stream_error(lost, 2)
    assert isinstance(error, Unavailable) and error.attempts == 2
    assert "the connection to the gateway broke while the stream was being sent" in error.message

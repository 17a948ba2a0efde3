"""VisualSearchClient: the gateway's VisualSearch service over a blocking gRPC channel."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vsearch.client import messages
from vsearch.client.calls import CallSettings, RetryEvent
from vsearch.client.errors import NO_ANSWER, VsearchError, error_from_rpc
from vsearch.client.types import (
    AddItem, AddSummary, CatalogImage, CollectionInfo, CollectionStats, DeleteResult, DropResult, Hit,
    ImageSource, SearchQuery, SearchResult,
)
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2

# The least time wait_ready(0) gives the gateway to answer.
MIN_PROBE_TIMEOUT_S = 0.05


class VisualSearchClient(CallSettings):
    """A client of the gateway's gRPC API (`vsearch up` serves it on 127.0.0.1:50051).

        with VisualSearchClient("127.0.0.1:50051", api_key=KEY) as client:
            result = client.search("query.jpg", k=10, where=[("price", "<", 50)])

    Every call has a deadline: `timeout` seconds (10 by default, or the call's own `timeout=`), which
    covers its retries too; add() has `add_timeout` (300 s by default). UNAVAILABLE is retried as
    `retries` (a RetryPolicy) says; `on_retry(RetryEvent)` is called before each retry. A non-OK status
    is raised as a VsearchError subclass (vsearch.client.errors) with its code and message. The API key
    goes in every call's metadata as `authorization: Bearer KEY`. `credentials` makes a TLS channel;
    `options` are gRPC channel options. Thread-safe, as a gRPC channel is."""

    def __init__(self, address: str, **settings: Any) -> None:
        super().__init__(address, **settings)
        self._channel = (grpc.secure_channel(address, self.credentials, options=self.channel_options)
                         if self.credentials is not None else
                         grpc.insecure_channel(address, options=self.channel_options))
        self._stub = gateway_pb2_grpc.VisualSearchStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> VisualSearchClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the gateway is, or becomes within `timeout` seconds, reachable (calls themselves never
        wait for that: they fail, and are retried, as UNAVAILABLE)."""
        return self._unreachable(max(timeout, MIN_PROBE_TIMEOUT_S), wait=timeout > 0) is None

    def _unreachable(self, timeout: float, wait: bool) -> VsearchError | None:
        """Why the gateway cannot be reached (UNAVAILABLE, or DEADLINE_EXCEEDED while waiting), or None
        when it answers at all. Asks its gRPC health service: any answer, a refusal included, means the
        channel is connected. (The channel's connectivity callbacks would do, but their polling thread
        outlives them and fails on a closed channel.)"""
        try:
            self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=wait,
                               metadata=self.metadata)
        except grpc.RpcError as rpc_error:
            if rpc_error.code() in NO_ANSWER:  # type: ignore[attr-defined]
                return error_from_rpc(rpc_error)
        return None

    # ---- calls --------------------------------------------------------------------------------

    def _notify(self, event: RetryEvent) -> None:
        if self.on_retry is not None:
            self.on_retry(event)

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        """A unary call with its deadline and retries."""
        deadline = self.deadline(timeout)
        rpc = getattr(self._stub, method)
        attempt = 0
        while True:
            attempt += 1
            try:
                return rpc(request, timeout=self.remaining(deadline), metadata=self.metadata)
            except grpc.RpcError as rpc_error:
                error = error_from_rpc(rpc_error, attempt)
            delay = self.retry_delay(error, attempt, deadline)
            if delay is None:
                raise error
            self._notify(RetryEvent(method, attempt, error, delay))
            time.sleep(delay)

    # ---- search -------------------------------------------------------------------------------

    def _request(self, query: SearchQuery) -> gateway_pb2.VisualSearchRequest:
        image = messages.read_image(query.image) if query.image is not None else None
        return messages.search_request(query, image)

    def search(
        self, image: ImageSource | SearchQuery | None = None, *, crop: Any = None, item_id: str | None = None,
        text: str | None = None, k: int | None = None, where: Any = None, min_score: float | None = None,
        min_probability: float | None = None, collection: str = "", mode: str = "similar", page_token: str = "",
        timeout: float | None = None,
    ) -> SearchResult:
        """The catalog's images most like `image` (bytes, or a file path; `crop`=(x, y, w, h) of it), or like
        the indexed item `item_id`, or matching `text`: exactly one of the three. See SearchQuery for the
        other arguments. One page of `k` hits; result.next_page_token asks for the next (search_pages,
        iter_hits). Raises InvalidArgument for a bad filter or image, NotFound for an unknown collection
        or item, FailedPrecondition for a page token outlived by a write."""
        query = messages.search_query(
            image, crop=crop, item_id=item_id, text=text, k=k, where=where, min_score=min_score,
            min_probability=min_probability, collection=collection, mode=mode, page_token=page_token)
        return messages.search_result(self._call("Search", self._request(query), timeout))

    def search_pages(self, image: ImageSource | SearchQuery | None = None, *, max_pages: int | None = None,
                     timeout: float | None = None, **fields: Any) -> Iterator[SearchResult]:
        """search()'s pages one after the other (same arguments as search, each page its own call and
        deadline), until the gateway has no more (next_page_token empty) or `max_pages`. The image is
        read once."""
        query = messages.search_query(image, **fields)
        if query.image is not None and messages.is_path(query.image):
            query = dataclasses.replace(query, image=messages.read_image(query.image))
        pages = 0
        while max_pages is None or pages < max_pages:
            result = messages.search_result(self._call("Search", self._request(query), timeout))
            pages += 1
            yield result
            if not result.next_page_token:
                return
            query = dataclasses.replace(query, page_token=result.next_page_token)

    def iter_hits(self, image: ImageSource | SearchQuery | None = None, *, limit: int | None = None,
                  timeout: float | None = None, **fields: Any) -> Iterator[Hit]:
        """The hits of search_pages(), one by one, at most `limit` of them (`k` is the page size)."""
        if limit is not None and limit <= 0:
            return
        found = 0
        for page in self.search_pages(image, timeout=timeout, **fields):
            for hit in page.hits:
                yield hit
                found += 1
                if limit is not None and found >= limit:
                    return

    def search_batch(self, queries: Iterable[SearchQuery | Mapping[str, Any]], *,
                     timeout: float | None = None) -> list[SearchResult | VsearchError]:
        """Several searches in one call (SearchBatch; the gateway takes up to GATEWAY_MAX_BATCH_QUERIES):
        one entry per query, in order, its SearchResult or the VsearchError it failed with (returned, not
        raised: one query's failure does not fail the others). A failure of the call itself is raised."""
        request = gateway_pb2.VisualSearchBatchRequest(queries=[
            self._request(query if isinstance(query, SearchQuery) else SearchQuery(**query)) for query in queries])
        return messages.batch_results(self._call("SearchBatch", request, timeout))

    # ---- writing ------------------------------------------------------------------------------

    def add(
        self, items: Iterable[AddItem | ImageSource | Mapping[str, Any]], *, collection: str = "",
        on_copy: str = "keep", regions: bool = False, progress: Callable[[int], Any] | None = None,
        timeout: float | None = None,
    ) -> AddSummary:
        """Adds (or replaces, by id) the items in one AddImages stream and returns the gateway's summary.
        Items are AddItems, image bytes or file paths, or dicts of AddItem's fields; read lazily, so an
        iterable of any length streams in flat memory. A bad item (undecodable, too large...) is reported
        in summary.failures and does not stop the stream. `on_copy`: "keep", "flag" or "skip" new items
        that copy indexed ones; `regions`: index regions too (docs/regions.md). `progress(n)` is called
        with the number of items sent so far, as they are sent (on gRPC's sending thread).

        Deadline: `timeout`, else the client's add_timeout (300 s), for the whole stream. Retries: only
        while the gateway cannot be reached, before anything is sent (gRPC reads the first item as soon
        as a stream starts, even one that cannot connect, so the client first checks that the gateway
        answers); once the stream has started it is never retried (the gateway may have written part of
        it): a failed stream raises, and the caller, who knows what it sent, may send it again (ids make
        that harmless: an item stored as it is comes back `unchanged`)."""
        deadline = self.deadline(timeout, self.add_timeout)
        feed = _ItemFeed(items, collection, on_copy, regions, progress)
        attempt = 0
        while True:
            attempt += 1
            error = self._unreachable(self.remaining(deadline), wait=False)
            if error is None:
                break
            error.attempts = attempt
            delay = self.retry_delay(error, attempt, deadline)
            if delay is None:
                raise error
            self._notify(RetryEvent("AddImages", attempt, error, delay))
            time.sleep(delay)
        try:
            reply = self._stub.AddImages(feed.requests(), timeout=self.remaining(deadline), metadata=self.metadata)
        except grpc.RpcError as rpc_error:
            if feed.error is not None:  # the items' own problem (a file that cannot be read...), not the call's
                raise feed.error from None
            raise error_from_rpc(rpc_error, attempt)
        return messages.add_summary(reply)

    def delete(self, ids: Iterable[str], *, collection: str = "", timeout: float | None = None) -> DeleteResult:
        """Removes the items with these ids; `deleted` counts those that existed."""
        return messages.delete_result(self._call("DeleteImages", messages.delete_request(ids, collection), timeout))

    # ---- the catalog --------------------------------------------------------------------------

    def stats(self, *, collection: str = "", field_summaries: bool = False,
              timeout: float | None = None) -> CollectionStats:
        """The collection's size, index, model and filterable fields; with `field_summaries`, what each
        filterable field holds (values and counts, or a range). NotFound for a collection not created yet."""
        request = gateway_pb2.VisualStatsRequest(collection=collection, with_field_summaries=field_summaries)
        return messages.collection_stats(self._call("Stats", request, timeout))

    def collections(self, *, timeout: float | None = None) -> list[CollectionInfo]:
        """Every collection, by name, the default one included."""
        return messages.collection_infos(self._call("ListCollections", search_pb2.ListCollectionsRequest(), timeout))

    def drop_collection(self, name: str, *, timeout: float | None = None) -> DropResult:
        """Removes a whole collection (not the default one); `dropped` is False when there was none."""
        reply = self._call("DropCollection", search_pb2.DropCollectionRequest(collection=name), timeout)
        return messages.drop_result(reply)

    def list_images(self, *, collection: str = "", page_size: int = 0,
                    timeout: float | None = None) -> Iterator[CatalogImage]:
        """Every image of the collection, ordered by id, fetched `page_size` at a time (0: the gateway's
        100; at most 1000), each page its own call and deadline."""
        token = ""
        while True:
            request = gateway_pb2.ListImagesRequest(collection=collection, page_size=page_size, page_token=token)
            page = self._call("ListImages", request, timeout)
            for image in page.images:
                yield messages.catalog_image(image)
            token = page.next_page_token
            if not token:
                return


class _ItemFeed:
    """add()'s items as AddImageRequests, read on gRPC's sending thread as it asks for them. An exception
    from the items (a file that cannot be read, metadata that cannot be sent) is kept for add() to raise:
    gRPC would only say the stream was cancelled."""

    def __init__(self, items: Iterable[Any], collection: str, on_copy: str, regions: bool,
                 progress: Callable[[int], Any] | None) -> None:
        if on_copy not in messages.ON_COPY_POLICIES:
            raise ValueError(f"unknown on_copy policy {on_copy!r}; use one of {', '.join(messages.ON_COPY_POLICIES)}")
        self._items = items
        self._stream = dict(collection=collection, on_copy=on_copy, regions=regions)
        self._progress = progress
        self.error: BaseException | None = None

    def requests(self) -> Iterator[gateway_pb2.AddImageRequest]:
        sent = 0
        try:
            for value in self._items:
                item = messages.add_item(value)
                yield messages.add_request(item, messages.read_image(item.image), first=sent == 0, **self._stream)
                sent += 1  # gRPC asks for the next item once this one is sent
                if self._progress is not None:
                    self._progress(sent)
        except Exception as error:
            self.error = error
            raise

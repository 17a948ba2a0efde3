"""AsyncVisualSearchClient: the gateway's VisualSearch service over a grpc.aio channel, for asyncio."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vsearch.client import messages
from vsearch.client.calls import CallSettings, RetryEvent
from vsearch.client.errors import NO_ANSWER, VsearchError, error_for, error_from_rpc
from vsearch.client.types import (
    AddItem, AddSummary, CatalogImage, CollectionInfo, CollectionStats, DeleteResult, DropResult, Hit,
    ImageSource, SearchQuery, SearchResult,
)
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2


async def _image_bytes(source: ImageSource) -> bytes:
    """read_image, with files read off the event loop."""
    if messages.is_path(source):
        return await asyncio.to_thread(messages.read_image, source)
    return messages.read_image(source)


class AsyncVisualSearchClient(CallSettings):
    """VisualSearchClient's asyncio twin: the same arguments, methods and errors, as coroutines (and
    async iterators for search_pages, iter_hits and list_images); add() also takes an async iterable.

        async with AsyncVisualSearchClient("127.0.0.1:50051") as client:
            result = await client.search(item_id="sku-1", k=5)

    Files are read off the event loop. `on_retry` may be a coroutine function. Create it inside the
    event loop that uses it."""

    def __init__(self, address: str, **settings: Any) -> None:
        super().__init__(address, **settings)
        self._channel = (grpc.aio.secure_channel(address, self.credentials, options=self.channel_options)
                         if self.credentials is not None else
                         grpc.aio.insecure_channel(address, options=self.channel_options))
        self._stub = gateway_pb2_grpc.VisualSearchStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncVisualSearchClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float) -> bool:
        """Whether the channel is, or connects to the gateway within `timeout` seconds, connected."""
        if self._channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    # ---- calls --------------------------------------------------------------------------------

    async def _retry_or_raise(self, method: str, error: VsearchError, attempt: int, deadline: float) -> None:
        """Waits before the next attempt, or raises `error` when there is none."""
        delay = self.retry_delay(error, attempt, deadline)
        if delay is None:
            raise error
        if self.on_retry is not None:
            outcome = self.on_retry(RetryEvent(method, attempt, error, delay))
            if inspect.isawaitable(outcome):
                await outcome
        await asyncio.sleep(delay)

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        deadline = self.deadline(timeout)
        rpc = getattr(self._stub, method)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await rpc(request, timeout=self.remaining(deadline), metadata=self.metadata)
            except grpc.aio.AioRpcError as rpc_error:
                error = error_from_rpc(rpc_error, attempt)
            await self._retry_or_raise(method, error, attempt, deadline)

    # ---- search -------------------------------------------------------------------------------

    async def _request(self, query: SearchQuery) -> gateway_pb2.VisualSearchRequest:
        image = await _image_bytes(query.image) if query.image is not None else None
        return messages.search_request(query, image)

    async def search(
        self, image: ImageSource | SearchQuery | None = None, *, crop: Any = None, item_id: str | None = None,
        text: str | None = None, k: int | None = None, where: Any = None, min_score: float | None = None,
        min_probability: float | None = None, collection: str = "", mode: str = "similar", page_token: str = "",
        timeout: float | None = None,
    ) -> SearchResult:
        """As VisualSearchClient.search."""
        query = messages.search_query(
            image, crop=crop, item_id=item_id, text=text, k=k, where=where, min_score=min_score,
            min_probability=min_probability, collection=collection, mode=mode, page_token=page_token)
        return messages.search_result(await self._call("Search", await self._request(query), timeout))

    async def search_pages(self, image: ImageSource | SearchQuery | None = None, *, max_pages: int | None = None,
                           timeout: float | None = None, **fields: Any) -> AsyncIterator[SearchResult]:
        """As VisualSearchClient.search_pages."""
        query = messages.search_query(image, **fields)
        if query.image is not None and messages.is_path(query.image):
            query = dataclasses.replace(query, image=await _image_bytes(query.image))
        pages = 0
        while max_pages is None or pages < max_pages:
            result = messages.search_result(await self._call("Search", await self._request(query), timeout))
            pages += 1
            yield result
            if not result.next_page_token:
                return
            query = dataclasses.replace(query, page_token=result.next_page_token)

    async def iter_hits(self, image: ImageSource | SearchQuery | None = None, *, limit: int | None = None,
                        timeout: float | None = None, **fields: Any) -> AsyncIterator[Hit]:
        """As VisualSearchClient.iter_hits."""
        if limit is not None and limit <= 0:
            return
        found = 0
        async for page in self.search_pages(image, timeout=timeout, **fields):
            for hit in page.hits:
                yield hit
                found += 1
                if limit is not None and found >= limit:
                    return

    async def search_batch(self, queries: Iterable[SearchQuery | Mapping[str, Any]], *,
                           timeout: float | None = None) -> list[SearchResult | VsearchError]:
        """As VisualSearchClient.search_batch."""
        request = gateway_pb2.VisualSearchBatchRequest(queries=[
            await self._request(query if isinstance(query, SearchQuery) else SearchQuery(**query))
            for query in queries])
        return messages.batch_results(await self._call("SearchBatch", request, timeout))

    # ---- writing ------------------------------------------------------------------------------

    async def add(
        self, items: Iterable[AddItem | ImageSource | Mapping[str, Any]] | AsyncIterable[Any], *,
        collection: str = "", on_copy: str = "keep", regions: bool = False,
        progress: Callable[[int], Any] | None = None, timeout: float | None = None,
    ) -> AddSummary:
        """As VisualSearchClient.add; `items` may also be an async iterable. The stream is retried only
        when it could not start (the call failed before the first item was written)."""
        if on_copy not in messages.ON_COPY_POLICIES:
            raise ValueError(f"unknown on_copy policy {on_copy!r}; use one of {', '.join(messages.ON_COPY_POLICIES)}")
        deadline = self.deadline(timeout, self.add_timeout)
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.AddImages(timeout=self.remaining(deadline), metadata=self.metadata)
            try:
                await call.wait_for_connection()
                break
            except grpc.aio.AioRpcError as rpc_error:
                error = error_from_rpc(rpc_error, attempt)
            await self._retry_or_raise("AddImages", error, attempt, deadline)
        sent = 0
        write_failed = False
        try:
            if not await _stream_admitted(call):
                return messages.add_summary(await call)  # refused: raises the gateway's status
            async for value in _each(items):
                item = messages.add_item(value)
                request = messages.add_request(item, await _image_bytes(item.image), first=sent == 0,
                                               collection=collection, on_copy=on_copy, regions=regions)
                try:
                    await call.write(request)
                except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
                    # The call has ended (the gateway went away, say); awaiting it below gives its status.
                    write_failed = True
                    break
                sent += 1
                if progress is not None:
                    progress(sent)
            else:
                await call.done_writing()
            reply = await call
        except grpc.aio.AioRpcError as rpc_error:
            if write_failed and (rpc_error.code(), rpc_error.details()) == _WRITE_FAILED_IN_CORE:
                raise await self._broken_stream_error(rpc_error, attempt)
            raise error_from_rpc(rpc_error, attempt)
        except BaseException:
            call.cancel()  # the items' own problem (or our cancellation): end the stream, keep the cause
            raise
        return messages.add_summary(reply)

    async def _broken_stream_error(self, rpc_error: grpc.aio.AioRpcError, attempt: int) -> VsearchError:
        """The error of a stream whose write failed in grpc's core, which then replaced the call's status
        with INTERNAL: UNAVAILABLE when the gateway no longer answers (it went away mid-stream: the
        connection, not the gateway, ended the stream), else that INTERNAL, saying what happened."""
        if not await self._answers(_BROKEN_STREAM_PROBE_S):
            error = error_for(grpc.StatusCode.UNAVAILABLE, "the connection to the gateway broke while the stream "
                              "was being sent, and the gateway does not answer", attempts=attempt)
        else:
            error = error_for(grpc.StatusCode.INTERNAL, "the gateway ended the stream while an item was being sent, "
                              "and gRPC lost the status it ended it with", attempts=attempt)
        error.__cause__ = rpc_error
        return error

    async def _answers(self, timeout: float) -> bool:
        """Whether the gateway answers a health check within `timeout` seconds (any answer, a refusal
        included, means it is there)."""
        try:
            await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as rpc_error:
            return rpc_error.code() not in NO_ANSWER
        return True

    async def delete(self, ids: Iterable[str], *, collection: str = "", timeout: float | None = None) -> DeleteResult:
        """As VisualSearchClient.delete."""
        reply = await self._call("DeleteImages", messages.delete_request(ids, collection), timeout)
        return messages.delete_result(reply)

    # ---- the catalog --------------------------------------------------------------------------

    async def stats(self, *, collection: str = "", field_summaries: bool = False,
                    timeout: float | None = None) -> CollectionStats:
        """As VisualSearchClient.stats."""
        request = gateway_pb2.VisualStatsRequest(collection=collection, with_field_summaries=field_summaries)
        return messages.collection_stats(await self._call("Stats", request, timeout))

    async def collections(self, *, timeout: float | None = None) -> list[CollectionInfo]:
        """As VisualSearchClient.collections."""
        reply = await self._call("ListCollections", search_pb2.ListCollectionsRequest(), timeout)
        return messages.collection_infos(reply)

    async def drop_collection(self, name: str, *, timeout: float | None = None) -> DropResult:
        """As VisualSearchClient.drop_collection."""
        reply = await self._call("DropCollection", search_pb2.DropCollectionRequest(collection=name), timeout)
        return messages.drop_result(reply)

    async def list_images(self, *, collection: str = "", page_size: int = 0,
                          timeout: float | None = None) -> AsyncIterator[CatalogImage]:
        """As VisualSearchClient.list_images."""
        token = ""
        while True:
            request = gateway_pb2.ListImagesRequest(collection=collection, page_size=page_size, page_token=token)
            page = await self._call("ListImages", request, timeout)
            for image in page.images:
                yield messages.catalog_image(image)
            token = page.next_page_token
            if not token:
                return


# The gateway's initial metadata on an AddImages stream it admitted (gateway.proto). Writing before it
# comes races a refusal: the write fails in grpc's core and the call then ends as INTERNAL ("Internal error
# from Core"), not with the refusal's status.
_STREAM_ACCEPTED = ("vsearch-stream", "accepted")
# A gateway older than this marker never sends it: after this long, write anyway.
_ADMISSION_WAIT_S = 5.0
# The status grpc.aio gives a call whose write failed in grpc's core (grpc/aio/_call.py, _write), in place
# of the one it had not yet received: the gateway's, or the broken connection's UNAVAILABLE. A gateway
# killed mid-stream ends it either way, depending on which grpc sees first.
_WRITE_FAILED_IN_CORE = (grpc.StatusCode.INTERNAL, "Internal error from Core")
# How long the gateway has to answer a health check before such a stream counts as broken by its going away.
_BROKEN_STREAM_PROBE_S = 2.0


async def _stream_admitted(call: grpc.aio.StreamUnaryCall) -> bool:
    """Whether the gateway admitted the AddImages stream (False: the call ended first, refused)."""
    try:
        # Shielded: on timeout only the wait ends, not the call's own futures.
        metadata = await asyncio.wait_for(asyncio.shield(call.initial_metadata()), _ADMISSION_WAIT_S)
        if _STREAM_ACCEPTED in tuple(metadata):
            return True
        # Metadata without the marker: a refusal, whose status comes with it (or just after).
        await asyncio.wait_for(asyncio.shield(call.code()), _ADMISSION_WAIT_S)
    except asyncio.TimeoutError:
        return True
    return False


async def _each(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item

"""vsearch.v1.VisualSearch over gRPC: an adapter onto `VisualSearchCore`, passing the caller's deadline
down so no outbound call outlives it. `ServiceError`s become statuses in service_kit's interceptor.

The servicer on the main port checks the API key a call carries (`authorization: Bearer KEY`, or
`x-api-key: KEY`) and the key's rate limits; the one on the internal listener is built without either.
Over a rate limit the call ends RESOURCE_EXHAUSTED with a google.rpc.RetryInfo in its rich status
(`grpc-status-details-bin`, which `grpc_status.rpc_status.from_call` reads) and the same delay in the
trailing metadata `retry-after-ms`, for clients without the google.rpc protos."""

from __future__ import annotations

import math
from typing import AsyncIterator

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway.api_keys import UNCHECKED, Authenticator, Caller, token_from_metadata
from gateway.core import VisualSearchCore
from gateway.downstream import deadline_after
from gateway.rate_limit import RateLimited, RateLimiter
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2

RETRY_AFTER_MS = "retry-after-ms"
# Initial metadata on an admitted AddImages stream (gateway.proto): clients wait for it before writing.
STREAM_ACCEPTED = (("vsearch-stream", "accepted"),)
STATUS_DETAILS = "grpc-status-details-bin"


async def abort_rate_limited(context: grpc.aio.ServicerContext, error: RateLimited) -> None:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(1, math.ceil(error.retry_after_s * 1e9)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    await context.abort(error.code, error.message, trailing_metadata=(
        (STATUS_DETAILS, status.SerializeToString()),
        (RETRY_AFTER_MS, str(max(1, math.ceil(error.retry_after_s * 1000)))),
    ))


class VisualSearchServicer(gateway_pb2_grpc.VisualSearchServicer):
    def __init__(
        self, core: VisualSearchCore, authenticator: Authenticator | None = None, limiter: RateLimiter | None = None
    ) -> None:
        """Without an authenticator every call is admitted; without a limiter none is limited."""
        self.core = core
        self.authenticator = authenticator
        self.limiter = limiter

    def _admit(self, context: grpc.aio.ServicerContext, operation: str) -> Caller:
        if self.authenticator is None:
            return UNCHECKED
        return self.authenticator.admit(token_from_metadata(context.invocation_metadata()), operation)

    async def Search(
        self, request: gateway_pb2.VisualSearchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.VisualSearchResponse:
        caller = self._admit(context, "Search")
        try:
            if self.limiter is not None:
                await self.limiter.limit_search(caller)
        except RateLimited as error:
            await abort_rate_limited(context, error)
        return await self.core.search(request, deadline_after(context.time_remaining()))

    async def SearchBatch(
        self, request: gateway_pb2.VisualSearchBatchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.VisualSearchBatchResponse:
        caller = self._admit(context, "SearchBatch")
        limiter = self.limiter
        charge = None if limiter is None else (lambda: limiter.limit_search(caller))  # once per query
        try:
            results = await self.core.search_batch(request.queries, deadline_after(context.time_remaining()), charge)
        except RateLimited as error:
            await abort_rate_limited(context, error)
            raise  # not reached: abort raises
        return gateway_pb2.VisualSearchBatchResponse(results=results)

    async def AddImages(
        self, request_iterator: AsyncIterator[gateway_pb2.AddImageRequest], context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AddImagesSummary:
        caller = self._admit(context, "AddImages")
        await context.send_initial_metadata(STREAM_ACCEPTED)
        requests = request_iterator if self.limiter is None else self.limiter.charging_writes(caller, request_iterator)
        try:
            return await self.core.add_images(requests, deadline_after(context.time_remaining()))
        except RateLimited as error:
            await abort_rate_limited(context, error)
            raise  # not reached: abort raises

    async def DeleteImages(
        self, request: gateway_pb2.DeleteImagesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.DeleteImagesResponse:
        self._admit(context, "DeleteImages")
        return await self.core.delete_images(request, deadline_after(context.time_remaining()))

    async def Stats(
        self, request: gateway_pb2.VisualStatsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.VisualStatsResponse:
        self._admit(context, "Stats")
        return await self.core.stats(request, deadline_after(context.time_remaining()))

    async def ListImages(
        self, request: gateway_pb2.ListImagesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListImagesResponse:
        self._admit(context, "ListImages")
        return await self.core.list_images(request, deadline_after(context.time_remaining()))

    async def DropCollection(
        self, request: search_pb2.DropCollectionRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.DropCollectionResponse:
        self._admit(context, "DropCollection")
        return await self.core.drop_collection(request, deadline_after(context.time_remaining()))

    async def ListCollections(
        self, request: search_pb2.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.ListCollectionsResponse:
        self._admit(context, "ListCollections")
        return await self.core.list_collections(deadline_after(context.time_remaining()))

"""vsearch.v1.VisualSearch over gRPC: an adapter onto `VisualSearchCore`, passing the caller's deadline
down so no outbound call outlives it. `ServiceError`s become statuses in service_kit's interceptor."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from gateway.core import VisualSearchCore
from gateway.downstream import deadline_after
from vsearch.v1 import gateway_pb2, gateway_pb2_grpc, search_pb2


class VisualSearchServicer(gateway_pb2_grpc.VisualSearchServicer):
    def __init__(self, core: VisualSearchCore) -> None:
        self.core = core

    async def Search(
        self, request: gateway_pb2.VisualSearchRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.VisualSearchResponse:
        return await self.core.search(request, deadline_after(context.time_remaining()))

    async def AddImages(
        self, request_iterator: AsyncIterator[gateway_pb2.AddImageRequest], context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AddImagesSummary:
        return await self.core.add_images(request_iterator, deadline_after(context.time_remaining()))

    async def DeleteImages(
        self, request: gateway_pb2.DeleteImagesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.DeleteImagesResponse:
        return await self.core.delete_images(request, deadline_after(context.time_remaining()))

    async def Stats(
        self, request: gateway_pb2.VisualStatsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.VisualStatsResponse:
        return await self.core.stats(request, deadline_after(context.time_remaining()))

    async def DropCollection(
        self, request: search_pb2.DropCollectionRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.DropCollectionResponse:
        return await self.core.drop_collection(request, deadline_after(context.time_remaining()))

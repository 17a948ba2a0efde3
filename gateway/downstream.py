"""The gateway's calls to the embedder and search_svc, one small method per call. Each is bounded by
its own default deadline, capped by the caller's (`deadline`, absolute, time.monotonic), and a failed
call becomes a `ServiceError` naming the service (`service_kit.status.downstream_error`). What to call
when, and what to make of the answers, is `VisualSearchCore`'s business."""

from __future__ import annotations

import re
import time
from typing import Awaitable, Callable, Iterable, TypeVar

import grpc
import numpy as np

from gateway.settings import GatewaySettings
from service_kit.status import ServiceError, code_from_int, downstream_error
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc, search_pb2, search_pb2_grpc

EMBEDDER = "embedder"
SEARCH = "search"

ResponseT = TypeVar("ResponseT")

# The embedder names an item by its position in *its* request ("image 3: ..."), which means nothing to
# our caller (their position is reported separately, in ItemFailure.index).
EMBEDDER_ITEM_PREFIX = re.compile(r"^image \d+: ")


def deadline_after(seconds: float | None) -> float | None:
    """An absolute deadline (time.monotonic) from a caller's remaining time, if it has one."""
    return None if seconds is None else time.monotonic() + seconds


def remaining_s(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def item_error(error: embedder_pb2.ItemError) -> ServiceError:
    """The embedder's per-image error, as our caller should see it."""
    code = code_from_int(error.code)
    if code == grpc.StatusCode.OK:  # an error without a code is the embedder's bug, not the caller's
        code = grpc.StatusCode.INTERNAL
    return ServiceError(code, EMBEDDER_ITEM_PREFIX.sub("", error.message) or "the embedder refused the image")


class Refused(ServiceError):
    """A downstream answered INVALID_ARGUMENT. Raised as is, it is the same status and message as
    `downstream_error` gives; for a batch it means one of its items may be bad, and the caller can
    retry them one by one and report the culprit with `item_message`."""

    def __init__(self, service: str, error: grpc.aio.AioRpcError) -> None:
        mapped = downstream_error(service, error)
        super().__init__(mapped.code, mapped.message)
        self.item_message = f"{service}: {error.details()}"


class Downstream:
    def __init__(
        self,
        settings: GatewaySettings,
        embedder: embedder_pb2_grpc.EmbedderStub,
        index: search_pb2_grpc.VectorSearchStub,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.index = index

    # ---------------------------------------------------------------------------------- embedder

    async def model_info(self, deadline: float | None = None) -> embedder_pb2.InfoResponse:
        return await _call(
            EMBEDDER, self.embedder.Info, embedder_pb2.InfoRequest(), _timeout(self.settings.search_timeout_s, deadline)
        )

    async def embed_query(
        self, image: bytes, crop: embedder_pb2.CropBox | None, deadline: float | None
    ) -> tuple[np.ndarray, str]:
        """One query image's embedding and the version of the model that made it."""
        image_input = embedder_pb2.ImageInput(data=image)
        if crop is not None:
            image_input.crop.CopyFrom(crop)
        response = await _call(
            EMBEDDER, self.embedder.EmbedImages, embedder_pb2.EmbedImagesRequest(images=[image_input]),
            _timeout(self.settings.embed_timeout_s, deadline),
        )
        if len(response.results) != 1:
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"embedder answered {len(response.results)} results for 1 image"
            )
        result = response.results[0]
        if result.WhichOneof("result") != "embedding":
            raise item_error(result.error)
        return np.asarray(result.embedding.values, dtype=np.float32), response.model_version

    async def embed_images(self, images: list[bytes], deadline: float | None) -> list[embedder_pb2.EmbedResult]:
        """One result per image, in order: an embedding or that image's error. Raises `Refused` when
        the embedder refuses the request as a whole."""
        request = embedder_pb2.EmbedImagesRequest(images=[embedder_pb2.ImageInput(data=image) for image in images])
        response = await _call(
            EMBEDDER, self.embedder.EmbedImages, request, _timeout(self.settings.embed_timeout_s, deadline)
        )
        if len(response.results) != len(images):
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"embedder answered {len(response.results)} results for {len(images)} images"
            )
        return list(response.results)

    # ------------------------------------------------------------------------------- search_svc

    async def index_stats(self, collection: str = "", deadline: float | None = None) -> search_pb2.StatsResponse:
        return await _call(
            SEARCH, self.index.Stats, search_pb2.StatsRequest(collection=collection),
            _timeout(self.settings.search_timeout_s, deadline),
        )

    async def index_generation(self) -> int:
        """The index's current generation (a Stats call that skips counting the items)."""
        stats = await _call(
            SEARCH, self.index.Stats, search_pb2.StatsRequest(skip_count=True), self.settings.search_timeout_s
        )
        return stats.generation

    async def search(self, request: search_pb2.SearchRequest, deadline: float | None) -> search_pb2.SearchResponse:
        return await _call(SEARCH, self.index.Search, request, _timeout(self.settings.search_timeout_s, deadline))

    async def stored_items(
        self, ids: Iterable[str], collection: str, deadline: float | None
    ) -> list[search_pb2.Item]:
        """The items stored under these ids (those that exist), without their vectors."""
        response = await _call(
            SEARCH, self.index.Get, search_pb2.GetRequest(ids=ids, collection=collection),
            _timeout(self.settings.search_timeout_s, deadline),
        )
        return list(response.items)

    async def stored_vector(self, collection: str, item_id: str, deadline: float | None) -> np.ndarray:
        """The vector stored for `item_id`; NOT_FOUND when there is no such item."""
        response = await _call(
            SEARCH, self.index.Get,
            search_pb2.GetRequest(ids=[item_id], include_vectors=True, collection=collection),
            _timeout(self.settings.search_timeout_s, deadline),
        )
        for item in response.items:
            if item.id == item_id:
                if not item.vector.values:
                    raise ServiceError(
                        grpc.StatusCode.INTERNAL, f"search: item {item_id!r} came back without its vector"
                    )
                return np.asarray(item.vector.values, dtype=np.float32)
        where = f" in collection {collection!r}" if collection else ""  # Get finds nothing in a missing one
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no item with id {item_id!r}{where}")

    async def upsert(
        self, items: list[search_pb2.Item], collection: str, deadline: float | None
    ) -> search_pb2.UpsertResponse:
        """Raises `Refused` when search_svc refuses the items (one bad one spoils the request)."""
        return await _call(
            SEARCH, self.index.Upsert, search_pb2.UpsertRequest(items=items, collection=collection),
            _timeout(self.settings.write_timeout_s, deadline),
        )

    async def delete(self, ids: Iterable[str], collection: str, deadline: float | None) -> search_pb2.DeleteResponse:
        return await _call(
            SEARCH, self.index.Delete, search_pb2.DeleteRequest(ids=ids, collection=collection),
            _timeout(self.settings.write_timeout_s, deadline),
        )

    async def drop_collection(
        self, request: search_pb2.DropCollectionRequest, deadline: float | None
    ) -> search_pb2.DropCollectionResponse:
        return await _call(
            SEARCH, self.index.DropCollection, request, _timeout(self.settings.write_timeout_s, deadline)
        )


def _timeout(default_s: float, deadline: float | None) -> float:
    left = remaining_s(deadline)
    if left is None:
        return default_s
    if left <= 0:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call downstream")
    return min(default_s, left)


async def _call(service: str, rpc: Callable[..., Awaitable[ResponseT]], request: object, timeout: float) -> ResponseT:
    try:
        return await rpc(request, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise Refused(service, error) from None
        raise downstream_error(service, error) from None

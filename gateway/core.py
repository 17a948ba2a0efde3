"""What the gateway does, once: search, ingest, delete, stats. The gRPC servicer and the HTTP API are
thin adapters over `VisualSearchCore`, which speaks protobuf messages and raises `ServiceError`."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import AsyncIterable, Awaitable, Callable, TypeVar

import grpc
import numpy as np

from gateway.cache import QueryCache, embedding_cache_key, item_query_key, result_cache_key
from gateway.index_generation import IndexGenerationTracker
from gateway.settings import GatewaySettings
from service_kit.status import ServiceError, code_from_int, downstream_error, invalid_argument
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc, gateway_pb2, search_pb2, search_pb2_grpc

logger = logging.getLogger(__name__)

EMBEDDER = "embedder"
SEARCH = "search"
MAX_ID_CHARS = 256
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
# Room for the request's framing and metadata when packing images into one EmbedImages message.
MESSAGE_HEADROOM_BYTES = 1024 * 1024

ResponseT = TypeVar("ResponseT")

# The embedder names an item by its position in *its* request ("image 3: ..."), which means nothing to
# our caller (their position is reported separately, in ItemFailure.index).
EMBEDDER_ITEM_PREFIX = re.compile(r"^image \d+: ")


def item_error(error: embedder_pb2.ItemError) -> ServiceError:
    code = code_from_int(error.code)
    if code == grpc.StatusCode.OK:  # an error without a code is the embedder's bug, not the caller's
        code = grpc.StatusCode.INTERNAL
    return ServiceError(code, EMBEDDER_ITEM_PREFIX.sub("", error.message) or "the embedder refused the image")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    dimension: int
    max_batch_size: int


@dataclass
class PendingItem:
    """An AddImages item that passed the cheap checks, waiting for its batch."""

    index: int
    id: str
    content_sha256: str
    request: gateway_pb2.AddImageRequest


def remaining_s(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def deadline_after(seconds: float | None) -> float | None:
    """An absolute deadline (time.monotonic) from a caller's remaining time, if it has one."""
    return None if seconds is None else time.monotonic() + seconds


def elapsed_ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def abandon(task: asyncio.Future) -> None:
    """Cancels a helper task nobody will await any more, and retrieves its outcome if it already has
    one, so that its failure is not reported as never retrieved."""
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()


class VisualSearchCore:
    def __init__(
        self,
        settings: GatewaySettings,
        embedder: embedder_pb2_grpc.EmbedderStub,
        index: search_pb2_grpc.VectorSearchStub,
        cache: QueryCache,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.index = index
        self.cache = cache
        self.generations = IndexGenerationTracker(self._fetch_generation, settings.generation_refresh_ms / 1000.0)
        self.model: ModelInfo | None = None

    # ------------------------------------------------------------------------------------ plumbing

    @staticmethod
    def _timeout(default_s: float, deadline: float | None) -> float:
        left = remaining_s(deadline)
        if left is None:
            return default_s
        if left <= 0:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call downstream")
        return min(default_s, left)

    @staticmethod
    async def _call(
        service: str, rpc: Callable[..., Awaitable[ResponseT]], request: object, timeout: float
    ) -> ResponseT:
        try:
            return await rpc(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise downstream_error(service, error) from None

    def _require_model(self) -> ModelInfo:
        if self.model is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "gateway is starting: waiting for the embedder and the search service"
            )
        return self.model

    def _remember_model(self, info: embedder_pb2.InfoResponse) -> ModelInfo:
        model = ModelInfo(info.model_name, info.model_version, info.dimension, info.max_batch_size)
        if self.model is not None and self.model.version != model.version:
            logger.warning("embedder model changed from %s to %s", self.model.version, model.version)
        self.model = model
        return model

    async def _fetch_generation(self) -> int:
        stats = await self._call(
            SEARCH, self.index.Stats, search_pb2.StatsRequest(skip_count=True), self.settings.search_timeout_s
        )
        return stats.generation

    async def connect(self) -> None:
        """Startup hook: both downstreams must answer, and agree on the vector dimension."""
        info, stats = await asyncio.gather(
            self._call(EMBEDDER, self.embedder.Info, embedder_pb2.InfoRequest(), self.settings.search_timeout_s),
            self._call(SEARCH, self.index.Stats, search_pb2.StatsRequest(), self.settings.search_timeout_s),
        )
        if info.dimension and stats.dimension and info.dimension != stats.dimension:
            raise RuntimeError(
                f"embedder model {info.model_version} gives {info.dimension}-d vectors but the index holds "
                f"{stats.dimension}-d vectors"
            )
        model = self._remember_model(info)
        logger.info(
            "downstreams ready: model %s (%d-d), index of %d items at generation %d",
            model.version, model.dimension, stats.count, stats.generation,
        )

    # -------------------------------------------------------------------------------------- search

    async def search(
        self, request: gateway_pb2.VisualSearchRequest, deadline: float | None = None
    ) -> gateway_pb2.VisualSearchResponse:
        started = time.perf_counter()
        model = self._require_model()
        query = request.WhichOneof("query")
        crop = request.crop if request.HasField("crop") else None
        if query is None:
            raise invalid_argument("give an image or an item_id to search with")
        if query == "image":
            if not request.image:
                raise invalid_argument("image is empty")
            if len(request.image) > self.settings.max_image_bytes:
                raise invalid_argument(
                    f"image is {len(request.image)} bytes; the limit is {self.settings.max_image_bytes}"
                )
            if crop is not None and (crop.width == 0 or crop.height == 0):
                raise invalid_argument("crop width and height must be positive")
            image_sha256 = hashlib.sha256(request.image).hexdigest()
            query_key = embedding_cache_key(image_sha256, crop, model.version)
        else:
            if not request.item_id:
                raise invalid_argument("item_id is empty")
            if crop is not None:
                raise invalid_argument("crop applies only to image queries")
            query_key = item_query_key(request.collection, request.item_id)
        k = request.k if request.HasField("k") else self.settings.default_k
        if not 1 <= k <= self.settings.max_k:
            raise invalid_argument(f"k must be 1..{self.settings.max_k}, not {k}")
        min_score = request.min_score if request.HasField("min_score") else None
        if min_score is not None and not math.isfinite(min_score):
            raise invalid_argument("min_score must be a finite number")

        # Everything a cache hit needs, at once: the current generation (Stats) and, in one cache
        # round trip, the embedding and the result under the last generation seen, which is almost
        # always still current (checked against the Stats answer before it is used).
        lookups_started = time.perf_counter()
        generation_lookup = asyncio.ensure_future(self.generations.current())
        guessed_generation = self.generations.known
        embed: asyncio.Task[tuple[np.ndarray, str]] | None = None
        try:
            keys = [query_key] if query == "image" else []
            if guessed_generation is not None:
                keys.append(result_cache_key(
                    query_key, k, request.filter, min_score, guessed_generation, request.collection
                ))
            raw = await self.cache.get_raw(keys)
            cached_embedding = self.cache.embedding_from(raw[0]) if query == "image" else None
            if cached_embedding is not None and cached_embedding.size != model.dimension:
                cached_embedding = None
            if query == "image" and cached_embedding is None:
                # Without the embedding the result cannot be cached either (they are written together):
                # start the embedder now rather than after the generation comes back.
                embed = asyncio.create_task(self._embed_query(request.image, crop, deadline))
            generation = await generation_lookup
            result_key = result_cache_key(query_key, k, request.filter, min_score, generation, request.collection)
            if generation == guessed_generation:
                cached = self.cache.result_from(raw[-1], result_key)
            else:
                cached = await self.cache.get_result(result_key)
            if cached is not None:
                cached.from_cache = True
                cached.embedding_from_cache = True
                cached.timing.total_ms = elapsed_ms(started)
                return cached

            new_embedding: tuple[str, np.ndarray] | None = None
            if embed is not None:
                vector, version = await embed
                embedding_from_cache = False
                if version and version != model.version:  # the embedder was redeployed with another model
                    model = ModelInfo(model.name, version, vector.size, model.max_batch_size)
                    self.model = model
                    query_key = embedding_cache_key(image_sha256, crop, version)
                new_embedding = (query_key, vector)
            elif cached_embedding is not None:
                vector, embedding_from_cache = cached_embedding, True
            else:
                vector = await self._stored_vector(request.collection, request.item_id, deadline)
                embedding_from_cache = True
        finally:
            abandon(generation_lookup)
            if embed is not None:
                abandon(embed)
        embed_ms = elapsed_ms(lookups_started)

        search_started = time.perf_counter()
        search_request = search_pb2.SearchRequest(
            queries=[search_pb2.Vector(values=vector.tolist())], k=k, filter=request.filter,
            collection=request.collection,
        )
        if min_score is not None:
            search_request.min_score = min_score
        found = await self._call(
            SEARCH, self.index.Search, search_request, self._timeout(self.settings.search_timeout_s, deadline)
        )
        search_ms = elapsed_ms(search_started)

        response = gateway_pb2.VisualSearchResponse(index_generation=found.generation, model_version=model.version)
        for hit in found.results[0].hits if found.results else ():
            response.hits.add(id=hit.id, score=hit.score, image_uri=hit.image_uri, metadata=hit.metadata)
        # Written after we reply (serialised now, before the per-request fields below are set), under
        # the generation the search actually ran on, which may be newer than `generation`.
        self.cache.save_in_background(
            result=(
                result_cache_key(query_key, k, request.filter, min_score, found.generation, request.collection),
                response,
            ),
            embedding=new_embedding,
        )

        response.embedding_from_cache = embedding_from_cache
        response.timing.embed_ms = embed_ms
        response.timing.search_ms = search_ms
        response.timing.total_ms = elapsed_ms(started)
        return response

    async def _embed_query(
        self, image: bytes, crop: embedder_pb2.CropBox | None, deadline: float | None
    ) -> tuple[np.ndarray, str]:
        image_input = embedder_pb2.ImageInput(data=image)
        if crop is not None:
            image_input.crop.CopyFrom(crop)
        response = await self._call(
            EMBEDDER, self.embedder.EmbedImages, embedder_pb2.EmbedImagesRequest(images=[image_input]),
            self._timeout(self.settings.embed_timeout_s, deadline),
        )
        if len(response.results) != 1:
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"embedder answered {len(response.results)} results for 1 image"
            )
        result = response.results[0]
        if result.WhichOneof("result") != "embedding":
            raise item_error(result.error)
        return np.asarray(result.embedding.values, dtype=np.float32), response.model_version

    async def _stored_vector(self, collection: str, item_id: str, deadline: float | None) -> np.ndarray:
        response = await self._call(
            SEARCH, self.index.Get,
            search_pb2.GetRequest(ids=[item_id], include_vectors=True, collection=collection),
            self._timeout(self.settings.search_timeout_s, deadline),
        )
        for item in response.items:
            if item.id == item_id:
                if not item.vector.values:
                    raise ServiceError(
                        grpc.StatusCode.INTERNAL, f"search: item {item_id!r} came back without its vector"
                    )
                return np.asarray(item.vector.values, dtype=np.float32)
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no item with id {item_id!r}")

    # ---------------------------------------------------------------------------------------- ingest

    def _check_item(self, request: gateway_pb2.AddImageRequest) -> str | None:
        if not request.image:
            return "image is empty"
        if len(request.image) > self.settings.max_image_bytes:
            return f"image is {len(request.image)} bytes; the limit is {self.settings.max_image_bytes}"
        if len(request.id) > MAX_ID_CHARS:
            return f"id is {len(request.id)} characters; the limit is {MAX_ID_CHARS}"
        return None

    async def add_images(
        self, requests: AsyncIterable[gateway_pb2.AddImageRequest], deadline: float | None = None
    ) -> gateway_pb2.AddImagesSummary:
        """Bad items are reported and skipped; only a downstream outage (or deadline) ends the call.
        Upserts are by id, so a client may safely resend a stream that failed part-way: items already
        stored with the same content, metadata and URI are counted as unchanged and not embedded again.

        Batches are pipelined: while one batch is being upserted the next is embedded, at most
        `add_pipeline_depth` batches in flight."""
        model = self._require_model()
        batch_size = min(self.settings.add_batch_size, model.max_batch_size or self.settings.add_batch_size)
        byte_budget = max(self.settings.max_message_bytes - MESSAGE_HEADROOM_BYTES, self.settings.max_image_bytes)
        summary = gateway_pb2.AddImagesSummary()
        generations: list[int] = []
        batch: list[PendingItem] = []
        batch_bytes = 0
        collection: str | None = None
        in_flight: list[tuple[asyncio.Task[int | None], set[str]]] = []

        async def wait_oldest() -> None:
            task, _ids = in_flight.pop(0)
            if (generation := await task) is not None:
                generations.append(generation)

        async def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                task = asyncio.create_task(self._index_batch(batch, collection or "", summary, deadline))
                in_flight.append((task, {pending.id for pending in batch}))
                while len(in_flight) > self.settings.add_pipeline_depth:
                    await wait_oldest()
            batch, batch_bytes = [], 0

        try:
            async for request in requests:
                position = summary.received
                summary.received += 1
                content_sha256 = hashlib.sha256(request.image).hexdigest() if request.image else ""
                item_id = request.id or content_sha256
                if collection is None:
                    collection = request.collection
                problem = self._check_item(request)
                if problem is None and request.collection and request.collection != collection:
                    problem = f"collection {request.collection!r} differs from the stream's {collection!r}"
                if problem is not None:
                    summary.failures.add(id=item_id, code=INVALID_ARGUMENT, message=problem, index=position)
                    continue
                repeated = any(pending.id == item_id for pending in batch)
                if len(batch) >= batch_size or batch_bytes + len(request.image) > byte_budget or repeated:
                    await flush()
                if repeated or any(item_id in ids for _task, ids in in_flight):
                    # A repeated id must be written after the earlier one, so the later item wins:
                    # let every batch in flight finish first (rare: only for repeated ids).
                    while in_flight:
                        await wait_oldest()
                batch.append(PendingItem(position, item_id, content_sha256, request))
                batch_bytes += len(request.image)
            await flush()
            while in_flight:
                await wait_oldest()
        finally:
            for task, _ids in in_flight:  # the stream broke or a downstream failed: stop the rest
                task.cancel()

        summary.failures.sort(key=lambda failure: failure.index)
        summary.failed = len(summary.failures)
        summary.index_generation = max(generations) if generations else await self.generations.current()
        return summary

    async def _embed_items(
        self, batch: list[PendingItem], deadline: float | None
    ) -> list[embedder_pb2.EmbedResult]:
        request = embedder_pb2.EmbedImagesRequest(
            images=[embedder_pb2.ImageInput(data=item.request.image) for item in batch]
        )
        try:
            response = await self.embedder.EmbedImages(
                request, timeout=self._timeout(self.settings.embed_timeout_s, deadline)
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(batch) > 1:
                # The batch as a whole was refused: embed one by one so only the culprit fails.
                results: list[embedder_pb2.EmbedResult] = []
                for item in batch:
                    results.extend(await self._embed_items([item], deadline))
                return results
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                failed = embedder_pb2.EmbedResult()
                failed.error.code = INVALID_ARGUMENT
                failed.error.message = f"{EMBEDDER}: {error.details()}"
                return [failed]
            raise downstream_error(EMBEDDER, error) from None
        if len(response.results) != len(batch):
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"embedder answered {len(response.results)} results for {len(batch)} images",
            )
        return list(response.results)

    async def _upsert(
        self, items: list[tuple[PendingItem, search_pb2.Item]], collection: str,
        summary: gateway_pb2.AddImagesSummary, deadline: float | None,
    ) -> int | None:
        """Upserts the items; returns the generation of the last successful write, if any."""
        request = search_pb2.UpsertRequest(items=[item for _, item in items], collection=collection)
        try:
            response = await self.index.Upsert(request, timeout=self._timeout(self.settings.write_timeout_s, deadline))
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise downstream_error(SEARCH, error) from None
            if len(items) == 1:
                pending, _ = items[0]
                summary.failures.add(
                    id=pending.id, code=INVALID_ARGUMENT, message=f"{SEARCH}: {error.details()}", index=pending.index
                )
                return None
            # One bad item (e.g. metadata of the wrong type) spoils the batch: isolate it.
            generation = None
            for one in items:
                generation = await self._upsert([one], collection, summary, deadline) or generation
            return generation
        self.generations.observe_write(response.generation)
        summary.indexed += len(items)
        return response.generation

    async def _unchanged_ids(self, batch: list[PendingItem], collection: str, deadline: float | None) -> set[str]:
        """Ids in the batch already stored with the same content, metadata and image URI."""
        response = await self._call(
            SEARCH, self.index.Get, search_pb2.GetRequest(ids=[pending.id for pending in batch], collection=collection),
            self._timeout(self.settings.search_timeout_s, deadline),
        )
        stored = {item.id: item for item in response.items}
        unchanged = set()
        for pending in batch:
            item = stored.get(pending.id)
            if (
                item is not None
                and item.content_sha256 == pending.content_sha256
                and item.image_uri == pending.request.image_uri
                and item.metadata == pending.request.metadata
            ):
                unchanged.add(pending.id)
        return unchanged

    async def _index_batch(
        self, batch: list[PendingItem], collection: str, summary: gateway_pb2.AddImagesSummary,
        deadline: float | None,
    ) -> int | None:
        unchanged = await self._unchanged_ids(batch, collection, deadline)
        summary.unchanged += len(unchanged)
        batch = [pending for pending in batch if pending.id not in unchanged]
        if not batch:
            return None
        results = await self._embed_items(batch, deadline)
        items: list[tuple[PendingItem, search_pb2.Item]] = []
        for pending, result in zip(batch, results, strict=True):
            if result.WhichOneof("result") != "embedding":
                failure = item_error(result.error)
                summary.failures.add(
                    id=pending.id, code=failure.code.value[0], message=failure.message, index=pending.index
                )
                continue
            items.append((pending, search_pb2.Item(
                id=pending.id,
                vector=search_pb2.Vector(values=result.embedding.values),
                image_uri=pending.request.image_uri,
                metadata=pending.request.metadata,
                content_sha256=pending.content_sha256,
            )))
        return await self._upsert(items, collection, summary, deadline) if items else None

    # ------------------------------------------------------------------------------ delete, stats

    async def delete_images(
        self, request: gateway_pb2.DeleteImagesRequest, deadline: float | None = None
    ) -> gateway_pb2.DeleteImagesResponse:
        self._require_model()
        if not request.ids:
            return gateway_pb2.DeleteImagesResponse(deleted=0, index_generation=await self.generations.current())
        response = await self._call(
            SEARCH, self.index.Delete, search_pb2.DeleteRequest(ids=request.ids, collection=request.collection),
            self._timeout(self.settings.write_timeout_s, deadline),
        )
        self.generations.observe_write(response.generation)
        return gateway_pb2.DeleteImagesResponse(deleted=response.deleted, index_generation=response.generation)

    async def stats(
        self, request: gateway_pb2.VisualStatsRequest, deadline: float | None = None
    ) -> gateway_pb2.VisualStatsResponse:
        self._require_model()
        timeout = self._timeout(self.settings.search_timeout_s, deadline)
        stats, info = await asyncio.gather(
            self._call(SEARCH, self.index.Stats, search_pb2.StatsRequest(collection=request.collection), timeout),
            self._call(EMBEDDER, self.embedder.Info, embedder_pb2.InfoRequest(), timeout),
        )
        self._remember_model(info)
        return gateway_pb2.VisualStatsResponse(
            count=stats.count,
            index_type=stats.index_type,
            metric=stats.metric,
            index_generation=stats.generation,
            dimension=info.dimension or stats.dimension,
            model_name=info.model_name,
            model_version=info.model_version,
            filterable_fields=stats.filterable_fields,
        )

    async def drop_collection(
        self, request: search_pb2.DropCollectionRequest, deadline: float | None = None
    ) -> search_pb2.DropCollectionResponse:
        self._require_model()
        response = await self._call(
            SEARCH, self.index.DropCollection, request, self._timeout(self.settings.write_timeout_s, deadline)
        )
        self.generations.observe_write(response.generation)
        return response

"""The gateway's calls to the embedder and search_svc, one small method per call. Each is bounded by
its own default deadline, capped by the caller's (`deadline`, absolute, time.monotonic), and a failed
call becomes a `ServiceError` naming the service (`service_kit.status.downstream_error`). What to call
when, and what to make of the answers, is `VisualSearchCore`'s business."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable, Iterable, Sequence, TypeVar

import grpc
import numpy as np

from gateway.call_batching import CallBatcher
from gateway.settings import GatewaySettings
from service_kit.status import ServiceError, code_from_int, downstream_error
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc, search_pb2, search_pb2_grpc

EMBEDDER = "embedder"
SEARCH = "search"
# Room for a request's framing and metadata when packing images into one EmbedImages message.
MESSAGE_HEADROOM_BYTES = 1024 * 1024
# Query vectors in one shared Search call, at most, and hits asked for in it (the sum of their k): a
# search with a large k goes alone rather than make one answer too large.
MAX_QUERIES_PER_SEARCH_CALL = 64
MAX_HITS_PER_SEARCH_CALL = 2000
# A hit with its copy features (up to 48,000 bytes stored) counts as this many without, so that one
# shared Search call of copy searches stays a few MB (at most 100 such hits).
COPY_FEATURES_HIT_WEIGHT = 20

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


class NoTextMatch(ServiceError):
    """The embedder found nothing a text query names (a NOT_FOUND item): the search answers no hits, with
    this reason, rather than an error."""

    def __init__(self, reason: str, understood_as: str = "") -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, reason)
        self.reason = reason
        self.understood_as = understood_as


@dataclass(frozen=True)
class QueryEmbedding:
    """A query image's embedding, the version of the model that made it, and, when asked for, its copy
    features (EmbedResult.copy_features; empty otherwise, or when the embedder found none)."""

    values: np.ndarray
    model_version: str
    copy_features: bytes = b""


@dataclass(frozen=True)
class StoredCopyQuery:
    """What an item_id copy search starts from: the item's stored vector and copy features."""

    values: np.ndarray
    copy_features: bytes
    content_sha256: str


@dataclass(frozen=True)
class TextEmbedding:
    values: np.ndarray
    model_version: str
    # What the embedder understood the text as, for people.
    understood_as: str


@dataclass(frozen=True)
class QueryHits:
    """One query's answer from search_svc: its hits, best first, and the generation they were found at."""

    # search_svc's repeated field, or the first k of it.
    hits: Sequence[search_pb2.SearchHit]
    generation: int
    # A copy search's items outside `hits` sharing the most local features with its query
    # (SearchRequest.feature_candidates); empty otherwise.
    feature_matches: Sequence[search_pb2.Hit] = ()


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
        # Searches' calls, shared by the searches running at once (see gateway/call_batching.py). Query
        # images are batched by whether they need copy features (the key: with_copy_features), so a
        # similar-mode search never waits for, nor pays, another's feature extraction.
        self.query_embeddings: CallBatcher[embedder_pb2.ImageInput, QueryEmbedding] = CallBatcher(
            self._embed_queries, EMBEDDER, settings.query_calls_in_flight, max_items=settings.add_batch_size,
            max_weight=max(settings.max_message_bytes - MESSAGE_HEADROOM_BYTES, settings.max_image_bytes),
        )
        self.query_texts: CallBatcher[str, TextEmbedding] = CallBatcher(
            self._embed_texts, EMBEDDER, settings.query_calls_in_flight, max_items=settings.add_batch_size,
        )
        self.query_searches: CallBatcher[search_pb2.SearchRequest, QueryHits] = CallBatcher(
            self._search_queries, SEARCH, settings.query_calls_in_flight, max_items=MAX_QUERIES_PER_SEARCH_CALL,
            max_weight=MAX_HITS_PER_SEARCH_CALL,
        )

    # ---------------------------------------------------------------------------------- embedder

    async def model_info(self, deadline: float | None = None) -> embedder_pb2.InfoResponse:
        return await _call(
            EMBEDDER, self.embedder.Info, embedder_pb2.InfoRequest(), _timeout(self.settings.search_timeout_s, deadline)
        )

    async def embed_query(
        self, image: bytes, crop: embedder_pb2.CropBox | None, deadline: float | None
    ) -> QueryEmbedding:
        """One query image's embedding and the version of the model that made it (in one EmbedImages
        call with the other searches' images of the moment)."""
        _timeout(self.settings.embed_timeout_s, deadline)  # no time left: fail before queueing
        return await self.query_embeddings.submit(False, _image_input(image, crop), deadline, weight=len(image))

    async def embed_copy_query(
        self, image: bytes, crop: embedder_pb2.CropBox | None, deadline: float | None
    ) -> QueryEmbedding:
        """A copy search's query image: its embedding and its copy features (in one EmbedImages call
        with `with_copy_features`, shared with the other copy searches of the moment)."""
        _timeout(self.settings.embed_timeout_s, deadline)  # no time left: fail before queueing
        return await self.query_embeddings.submit(True, _image_input(image, crop), deadline, weight=len(image))

    async def _embed_queries(
        self, with_copy_features: Hashable, images: list[embedder_pb2.ImageInput], timeout_s: float | None
    ) -> list[QueryEmbedding | ServiceError]:
        # A query's copy features include the mirror image's, so that mirrored copies are found.
        request = embedder_pb2.EmbedImagesRequest(
            images=images, with_copy_features=bool(with_copy_features), copy_features_for_query=bool(with_copy_features)
        )
        try:
            response = await _call(
                EMBEDDER, self.embedder.EmbedImages, request, _within(self.settings.embed_timeout_s, timeout_s)
            )
        except Refused:
            if len(images) == 1:
                raise
            return await _one_by_one(self._embed_queries, with_copy_features, images, timeout_s)
        if len(response.results) != len(images):
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"embedder answered {len(response.results)} results for {len(images)} images",
            )
        return [
            QueryEmbedding(
                np.asarray(result.embedding.values, dtype=np.float32), response.model_version, result.copy_features
            )
            if result.WhichOneof("result") == "embedding" else item_error(result.error)
            for result in response.results
        ]

    async def embed_text(self, text: str, deadline: float | None) -> TextEmbedding:
        """A text query's vector (in one EmbedTexts call with the other searches' texts of the moment);
        raises `NoTextMatch` when the text names nothing the model knows, FAILED_PRECONDITION when the
        model cannot search by words."""
        _timeout(self.settings.embed_timeout_s, deadline)  # no time left: fail before queueing
        return await self.query_texts.submit(None, text, deadline)

    async def _embed_texts(
        self, _key: Hashable, texts: list[str], timeout_s: float | None
    ) -> list[TextEmbedding | ServiceError]:
        try:
            response = await _call(
                EMBEDDER, self.embedder.EmbedTexts, embedder_pb2.EmbedTextsRequest(texts=texts),
                _within(self.settings.embed_timeout_s, timeout_s),
            )
        except Refused:
            if len(texts) == 1:
                raise
            return await _one_by_one(self._embed_texts, _key, texts, timeout_s)
        if len(response.results) != len(texts):
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"embedder answered {len(response.results)} results for {len(texts)} texts"
            )
        outcomes: list[TextEmbedding | ServiceError] = []
        for result in response.results:
            if result.WhichOneof("result") == "embedding":
                outcomes.append(TextEmbedding(
                    np.asarray(result.embedding.values, dtype=np.float32), response.model_version, result.understood_as
                ))
            elif code_from_int(result.error.code) == grpc.StatusCode.NOT_FOUND:
                outcomes.append(NoTextMatch(result.error.message, result.understood_as))
            else:
                outcomes.append(ServiceError(
                    code_from_int(result.error.code) if result.error.code else grpc.StatusCode.INTERNAL,
                    re.sub(r"^text \d+ ", "text ", result.error.message) or "the embedder refused the text",
                ))
        return outcomes

    async def embed_images(
        self, images: list[bytes], deadline: float | None, with_copy_features: bool = False,
        copy_features_for_query: bool = False, with_regions: bool = False,
    ) -> list[embedder_pb2.EmbedResult]:
        """One result per image, in order: an embedding (with its copy features, when asked for: fit to
        query with too, the mirror image's included, with `copy_features_for_query`; with its regions'
        embeddings, with `with_regions`) or that image's error. Raises `Refused` when the embedder
        refuses the request as a whole."""
        request = embedder_pb2.EmbedImagesRequest(
            images=[embedder_pb2.ImageInput(data=image) for image in images], with_copy_features=with_copy_features,
            copy_features_for_query=copy_features_for_query, with_regions=with_regions,
        )
        response = await _call(
            EMBEDDER, self.embedder.EmbedImages, request, _timeout(self.settings.embed_timeout_s, deadline)
        )
        if len(response.results) != len(images):
            raise ServiceError(
                grpc.StatusCode.INTERNAL, f"embedder answered {len(response.results)} results for {len(images)} images"
            )
        return list(response.results)

    async def verify_copies(
        self, query: bytes, candidates: Sequence[bytes], deadline: float | None, first_rank: int = 0,
        min_inliers: int = 0, mirror_depth: int | None = None,
    ) -> list[embedder_pb2.CopyVerdict]:
        """Whether the query (its copy features) is a copy of each candidate (theirs, as stored; an empty
        one gets a verdict of no copy): one verdict per candidate, in order (one VerifyCopies call). The
        candidates are ranked from `first_rank` in their shortlist; those ranked below `mirror_depth`
        (None: the copy_search setting; 0: all) are checked against the query's mirror image too; a copy
        needs `min_inliers` agreeing features (0: the embedder's copy_min_inliers)."""
        if mirror_depth is None:
            mirror_depth = self.settings.copy_search.mirror_depth
        response = await _call(
            EMBEDDER, self.embedder.VerifyCopies,
            embedder_pb2.VerifyCopiesRequest(
                query=query, candidates=candidates, mirror_depth=mirror_depth,
                first_rank=first_rank, min_inliers=min_inliers,
            ),
            _timeout(self.settings.embed_timeout_s, deadline),
        )
        if len(response.verdicts) != len(candidates):
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"embedder answered {len(response.verdicts)} verdicts for {len(candidates)} copy candidates",
            )
        return list(response.verdicts)

    # ------------------------------------------------------------------------------- search_svc

    async def index_stats(
        self, collection: str = "", deadline: float | None = None, with_field_summaries: bool = False
    ) -> search_pb2.StatsResponse:
        """With field summaries, search_svc scans the collection's filter columns: that call gets as long as
        a write (write_timeout_s)."""
        default_s = self.settings.write_timeout_s if with_field_summaries else self.settings.search_timeout_s
        return await _call(
            SEARCH, self.index.Stats,
            search_pb2.StatsRequest(collection=collection, with_field_summaries=with_field_summaries),
            _timeout(default_s, deadline),
        )

    async def collections(self, deadline: float | None = None) -> search_pb2.ListCollectionsResponse:
        """The collections search_svc holds, by name (one ListCollections call: it counts each)."""
        return await _call(
            SEARCH, self.index.ListCollections, search_pb2.ListCollectionsRequest(),
            _timeout(self.settings.write_timeout_s, deadline),
        )

    async def collection_has_regions(self, collection: str, deadline: float | None) -> bool:
        """Whether the collection's items are indexed with regions (False when it does not exist yet): a
        Stats call that counts, since only then does search_svc ask its store rather than answer what it
        last knew (once per AddImages stream)."""
        try:
            stats = await _call(
                SEARCH, self.index.Stats, search_pb2.StatsRequest(collection=collection),
                _timeout(self.settings.search_timeout_s, deadline),
            )
        except ServiceError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return stats.regions

    async def index_generation(self) -> int:
        """The index's current generation (a Stats call that skips counting the items)."""
        stats = await _call(
            SEARCH, self.index.Stats, search_pb2.StatsRequest(skip_count=True), self.settings.search_timeout_s
        )
        return stats.generation

    async def search_query(self, request: search_pb2.SearchRequest, deadline: float | None) -> QueryHits:
        """The answer to a search of one query vector (in one Search call with the other searches of
        the moment that ask the same collection, k, filter and min_score, and for copy features or not)."""
        timeout_s = _timeout(self.settings.search_timeout_s, deadline)  # no time left: fail before queueing
        if request.feature_candidates:
            # Feature matches are looked up for one query vector: a copy search is sent on its own.
            (found,) = await self._search_queries(None, [request], timeout_s)
            assert isinstance(found, QueryHits)
            return found
        shared = search_pb2.SearchRequest()
        shared.CopyFrom(request)
        shared.ClearField("queries")
        weight = request.k * (COPY_FEATURES_HIT_WEIGHT if request.include_copy_features else 1)
        return await self.query_searches.submit(shared.SerializeToString(deterministic=True), request, deadline, weight)

    async def _search_queries(
        self, _key: Hashable, requests: list[search_pb2.SearchRequest], timeout_s: float | None
    ) -> list[QueryHits | ServiceError]:
        request = requests[0]
        if len(requests) > 1:
            request = search_pb2.SearchRequest()
            request.CopyFrom(requests[0])
            for other in requests[1:]:
                request.queries.extend(other.queries)
        try:
            response = await _call(
                SEARCH, self.index.Search, request, _within(self.settings.search_timeout_s, timeout_s)
            )
        except Refused:
            if len(requests) == 1:
                raise
            return await _one_by_one(self._search_queries, _key, requests, timeout_s)
        if len(response.results) != len(request.queries):
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"search answered {len(response.results)} results for {len(request.queries)} queries",
            )
        return [QueryHits(result.hits, response.generation, result.feature_matches) for result in response.results]

    async def stored_items(
        self, ids: Iterable[str], collection: str, deadline: float | None, include_copy_features: bool = False
    ) -> list[search_pb2.Item]:
        """The items stored under these ids (those that exist), without their vectors; with their copy
        features when asked for."""
        response = await _call(
            SEARCH, self.index.Get,
            search_pb2.GetRequest(ids=ids, collection=collection, include_copy_features=include_copy_features),
            _timeout(self.settings.search_timeout_s, deadline),
        )
        return list(response.items)

    async def listed_items(
        self, collection: str, page_size: int, page_token: str, deadline: float | None
    ) -> search_pb2.ListResponse:
        """One page of the collection's items, without vectors or copy features (one List call)."""
        return await _call(
            SEARCH, self.index.List,
            search_pb2.ListRequest(collection=collection, page_size=page_size, page_token=page_token),
            _timeout(self.settings.search_timeout_s, deadline),
        )

    async def stored_copy_query(self, collection: str, item_id: str, deadline: float | None) -> StoredCopyQuery:
        """The vector and copy features stored for `item_id` (one Get call); NOT_FOUND when there is no
        such item, FAILED_PRECONDITION when it was stored without copy features."""
        response = await _call(
            SEARCH, self.index.Get,
            search_pb2.GetRequest(ids=[item_id], include_vectors=True, include_copy_features=True,
                                  collection=collection),
            _timeout(self.settings.search_timeout_s, deadline),
        )
        where = f" in collection {collection!r}" if collection else ""
        item = next((item for item in response.items if item.id == item_id), None)
        if item is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no item with id {item_id!r}{where}")
        if not item.vector.values:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"search: item {item_id!r} came back without its vector")
        if not item.copy_features:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"item {item_id!r}{where} has no copy features (it was indexed without them): add it again "
                "with GATEWAY_COPY_SEARCH__FEATURES_AT_INGEST on, or search with its image",
            )
        return StoredCopyQuery(np.asarray(item.vector.values, dtype=np.float32), item.copy_features, item.content_sha256)

    async def stored_vector(self, collection: str, item_id: str, deadline: float | None) -> np.ndarray:
        """The vector stored for `item_id`; NOT_FOUND when there is no such item."""
        for vector in await self.stored_vectors(collection, [item_id], deadline):
            return vector
        where = f" in collection {collection!r}" if collection else ""  # Get finds nothing in a missing one
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no item with id {item_id!r}{where}")

    async def stored_vectors(
        self, collection: str, item_ids: Sequence[str], deadline: float | None
    ) -> list[np.ndarray]:
        """The vectors stored for those of `item_ids` that exist (one Get call), in their order; an id
        deleted since it was found is left out."""
        response = await _call(
            SEARCH, self.index.Get,
            search_pb2.GetRequest(ids=item_ids, include_vectors=True, collection=collection),
            _timeout(self.settings.search_timeout_s, deadline),
        )
        by_id = {item.id: item for item in response.items}
        vectors = []
        for item_id in item_ids:
            if (item := by_id.get(item_id)) is None:
                continue
            if not item.vector.values:
                raise ServiceError(grpc.StatusCode.INTERNAL, f"search: item {item_id!r} came back without its vector")
            vectors.append(np.asarray(item.vector.values, dtype=np.float32))
        return vectors

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


def _image_input(image: bytes, crop: embedder_pb2.CropBox | None) -> embedder_pb2.ImageInput:
    image_input = embedder_pb2.ImageInput(data=image)
    if crop is not None:
        image_input.crop.CopyFrom(crop)
    return image_input


def _within(default_s: float, timeout_s: float | None) -> float:
    if timeout_s is None:
        return default_s
    if timeout_s <= 0:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call downstream")
    return min(default_s, timeout_s)


async def _one_by_one(
    send: Callable[[Hashable, list, float | None], Awaitable[Sequence]], key: Hashable, items: list,
    timeout_s: float | None,
) -> list:
    """A shared call was refused as a whole: each item alone, so that only the culprit fails (rare:
    what one search sends is checked before it is queued)."""
    outcomes: list = []
    for item in items:
        try:
            outcomes.extend(await send(key, [item], timeout_s))
        except ServiceError as error:
            outcomes.append(error)
    return outcomes


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

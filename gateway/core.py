"""What the gateway does, once: search, ingest, delete, stats. The gRPC servicer and the HTTP API are
thin adapters over `VisualSearchCore`, which speaks protobuf messages and raises `ServiceError`; the
calls it makes downstream are `Downstream`'s methods."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence

import grpc
import numpy as np
from google.protobuf import struct_pb2

from gateway.cache import CacheLookup, QueryCache
from gateway.copy_ranking import rank_copies
from gateway.downstream import (
    MESSAGE_HEADROOM_BYTES, Downstream, NoTextMatch, QueryEmbedding, QueryHits, Refused, TextEmbedding, item_error,
)
from gateway.identical_copies import with_identical_copies
from gateway.index_generation import IndexGenerationTracker, SharedGenerations
from gateway.match_probability import MatchCalibration, annotate
from gateway.metrics import CopySearchMetrics
from gateway.search_paging import Page, PageToken
from gateway.search_query import SearchQuery, copy_candidates_search, id_problem, pack_text_entry, unpack_text_entry
from gateway.settings import GatewaySettings
from service_kit.request_parsing import UnparsableMessage
from service_kit.status import ServiceError, invalid_argument
from service_kit.struct_nesting import MAX_STRUCT_DEPTH, struct_depth
from service_kit.tracing import span
from vsearch.v1 import embedder_pb2, embedder_pb2_grpc, gateway_pb2, search_pb2, search_pb2_grpc

logger = logging.getLogger(__name__)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
OK = grpc.StatusCode.OK.value[0]
# The queries of one SearchBatch searched at once, at most: together they share the embedder's and
# search_svc's calls (gateway/call_batching.py) without one batch filling every call.
BATCH_SEARCHES_IN_FLIGHT = 8
# The metadata key ON_COPY_FLAG writes: the id of the item a new one copies.
COPY_OF_KEY = "copy_of"


def _same_metadata(stored: struct_pb2.Struct, requested: struct_pb2.Struct, flagging: bool) -> bool:
    """Whether the stored metadata is the requested one; with `flagging`, also when it differs only by a
    `copy_of` the request does not give (the flag an earlier run wrote)."""
    if stored == requested:
        return True
    if not flagging or COPY_OF_KEY not in stored.fields or COPY_OF_KEY in requested.fields:
        return False
    unflagged = struct_pb2.Struct()
    unflagged.CopyFrom(stored)
    del unflagged.fields[COPY_OF_KEY]
    return unflagged == requested


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    dimension: int
    max_batch_size: int
    # InfoResponse.text_search: "" when the model cannot search by words.
    text_search: str = ""
    # InfoResponse.calibration: None when hits get no match_probability.
    calibration: MatchCalibration | None = None
    # InfoResponse.copy_min_inliers: 0 when the embedder makes no copy features and verifies no copies.
    copy_min_inliers: int = 0
    # InfoResponse.regions_per_image: what an image indexed with regions costs, in inferences, besides one.
    regions_per_image: int = 0


@dataclass
class SearchLookups:
    """What a search starts before it knows whether its result is cached: one cache round trip (with
    Redis, it reads the collection's shared generation too), the generation when that round trip could
    not give it (search_svc's, by a Stats call, without Redis; the shared counter's creation, when it was
    missing), and, when the query image's embedding was not cached, the embedder call."""

    cache: CacheLookup
    # The index generation, once known: cached results are taken only if computed at it, and a new one
    # is stored under it. None: unknown (the cache is down), so nothing cached is trusted.
    generation: int | None
    # Until then, what gives it.
    generation_pending: asyncio.Future[int | None] | None
    # A cached embedding of the current model's dimension, if there was one.
    cached_embedding: np.ndarray | None
    embedding: asyncio.Task[QueryEmbedding] | asyncio.Task[TextEmbedding] | None
    # A text query's cached embedding: what the text was understood as.
    cached_understood_as: str = ""

    async def current_generation(self) -> int | None:
        if self.generation_pending is not None:
            self.generation = await self.generation_pending
            self.generation_pending = None
        return self.generation


@dataclass(frozen=True)
class QueryVector:
    values: np.ndarray
    # The stored vector of an item_id query counts as cached: neither is computed for this search.
    from_cache: bool
    model_version: str
    # A text query's: what the text was understood as (EmbedTextResult.understood_as).
    understood_as: str = ""
    # A copy search's: the query image's copy features (made with its embedding, or stored for its item).
    copy_features: bytes = b""
    # The sha256 of the query's bytes, where the whole image is the query (not a crop of it): an item
    # stored from the same bytes is a copy (gateway/identical_copies.py).
    content_sha256: str = ""


@dataclass
class PendingItem:
    """An AddImages item that passed the cheap checks, waiting for its batch."""

    index: int
    id: str
    content_sha256: str
    request: gateway_pb2.AddImageRequest
    # Set once search_svc has stored it.
    written: bool = False


@dataclass(frozen=True)
class StreamRegions:
    """Whether an AddImages stream indexes regions, and whether it turns them on for its collection (which
    then re-embeds items stored unchanged, so that they get regions too)."""

    made: bool = False
    turned_on: bool = False


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


@dataclass(frozen=True)
class RankedCopies:
    """A copy search's whole shortlist, ranked (gateway/copy_ranking.py), and the generation it was found at."""

    hits: list[gateway_pb2.SearchHit]
    generation: int


def search_response(
    found: QueryHits | RankedCopies, page: Page, model_version: str, generation: int
) -> gateway_pb2.VisualSearchResponse:
    """The page of `found` (the query's ranking, `page.fetch` deep) as the response to cache: hits
    [page.offset, page.end), and, when hits follow them and a next page may be asked for, the next page's
    offset in next_page_token (its token is made for each reply, see `VisualSearchCore._page_reply`)."""
    response = gateway_pb2.VisualSearchResponse(index_generation=generation, model_version=model_version)
    if len(found.hits) > page.end and page.may_continue:
        response.next_page_token = str(page.end)
    if isinstance(found, RankedCopies):
        response.hits.extend(found.hits[page.offset:page.end])
        return response
    for hit in found.hits[page.offset:page.end]:
        added = response.hits.add(id=hit.id, score=hit.score, image_uri=hit.image_uri, metadata=hit.metadata)
        if hit.HasField("region"):
            added.matched_region.CopyFrom(matched_region(hit.region))
    return response


def search_result_error(error: ServiceError) -> gateway_pb2.VisualSearchResult:
    """A batch query's failure, as Search would have answered it."""
    return gateway_pb2.VisualSearchResult(code=error.code.value[0], message=error.message)


def matched_region(box: search_pb2.RegionBox) -> embedder_pb2.CropBox:
    """A hit's region (search_svc's box), as the gateway's hits say it."""
    return embedder_pb2.CropBox(x=box.x, y=box.y, width=box.width, height=box.height)


def item_regions(result: embedder_pb2.EmbedResult) -> list[search_pb2.Region]:
    """The embedder's region embeddings of an image, as the item's regions to store."""
    return [
        search_pb2.Region(
            box=search_pb2.RegionBox(x=region.box.x, y=region.box.y, width=region.box.width, height=region.box.height),
            vector=search_pb2.Vector(values=region.embedding.values),
        )
        for region in result.regions
    ]


def expanded_query(text_vector: np.ndarray, hit_vectors: list[np.ndarray], weight: float) -> np.ndarray:
    """Average query expansion: unit(unit(text_vector) + weight * mean(hit_vectors))."""
    text_unit = text_vector / max(float(np.linalg.norm(text_vector)), 1e-12)
    expanded = text_unit + weight * np.mean(hit_vectors, axis=0)
    return (expanded / max(float(np.linalg.norm(expanded)), 1e-12)).astype(np.float32)


def _served_from_cache(
    cached: gateway_pb2.VisualSearchResponse, started: float
) -> gateway_pb2.VisualSearchResponse:
    cached.from_cache = True
    cached.embedding_from_cache = True
    cached.timing.total_ms = elapsed_ms(started)
    return cached


@dataclass(frozen=True)
class ModelAbility:
    """Something a query needs of the model (searching by words, a calibration, copy verification), and
    the refusal when the model has not got it."""

    has: Callable[[ModelInfo], bool]
    refusal: Callable[[ModelInfo], str]


_searches_by_words = ModelAbility(
    lambda model: bool(model.text_search), lambda model: f"model {model.name} cannot search by words"
)
_calibrated = ModelAbility(
    lambda model: model.calibration is not None,
    lambda model: f"model {model.name} ({model.version}) has no calibration, so hits have no match_probability to "
                  "filter by min_probability (calibrate it with `vsearch model calibrate`)",
)
_verifies_copies = ModelAbility(
    lambda model: bool(model.copy_min_inliers),
    lambda model: f"the embedder serving {model.name} ({model.version}) does not verify copies (it reports no "
                  "copy_min_inliers), so copy mode cannot be searched",
)


class VisualSearchCore:
    def __init__(
        self,
        settings: GatewaySettings,
        embedder: embedder_pb2_grpc.EmbedderStub,
        index: search_pb2_grpc.VectorSearchStub,
        cache: QueryCache,
    ) -> None:
        self.settings = settings
        self.downstream = Downstream(settings, embedder, index)
        self.cache = cache
        # The index generation that cached results are checked against: shared by every gateway through
        # Redis, or, with the in-process cache, search_svc's own (see gateway/index_generation.py).
        self.shared: SharedGenerations | None = (
            SharedGenerations(cache, cache.registry) if cache.shares_generations else None
        )
        self.generations = IndexGenerationTracker(
            self.downstream.index_generation, settings.generation_refresh_ms / 1000.0
        )
        self.model: ModelInfo | None = None
        self.copy_metrics = CopySearchMetrics(cache.registry)

    # ---------------------------------------------------------------------------------------- model

    def _require_model(self) -> ModelInfo:
        if self.model is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "gateway is starting: waiting for the embedder and the search service"
            )
        return self.model

    def _remember_model(self, info: embedder_pb2.InfoResponse) -> ModelInfo:
        model = ModelInfo(info.model_name, info.model_version, info.dimension, info.max_batch_size, info.text_search,
                          MatchCalibration.from_info(info), info.copy_min_inliers, info.regions_per_image)
        if self.model is not None and self.model.version != model.version:
            logger.warning("embedder model changed from %s to %s", self.model.version, model.version)
        self.model = model
        # Searches' shared EmbedImages calls carry at most one of the embedder's batches.
        self.downstream.query_embeddings.max_items = min(
            self.settings.add_batch_size, model.max_batch_size or self.settings.add_batch_size
        )
        return model

    async def connect(self) -> None:
        """Startup hook: both downstreams must answer, and agree on the vector dimension."""
        info, stats = await asyncio.gather(self.downstream.model_info(), self.downstream.index_stats())
        if info.dimension and stats.dimension and info.dimension != stats.dimension:
            raise RuntimeError(
                f"embedder model {info.model_version} gives {info.dimension}-d vectors but the index holds "
                f"{stats.dimension}-d vectors"
            )
        model = self._remember_model(info)
        if self.shared is not None:
            # Requests that name no collection mean search_svc's default one: one generation for both.
            self.shared.default_collection = stats.collection
        logger.info(
            "downstreams ready: model %s (%d-d), index of %d items at generation %d%s",
            model.version, model.dimension, stats.count, stats.generation,
            "; cached results follow the generation shared in Redis" if self.shared is not None else "",
        )

    async def close(self) -> None:
        """Shutdown hook: pending generation bumps get a last try, then the cache closes."""
        if self.shared is not None:
            await self.shared.close()
        await self.cache.close()

    # --------------------------------------------------------------------------------------- search

    async def search(
        self, request: gateway_pb2.VisualSearchRequest, deadline: float | None = None
    ) -> gateway_pb2.VisualSearchResponse:
        """Validate; look up the caches (the embedder is called at once on an embedding miss); unless
        the result was cached at the current generation, take the query vector, search, and store the
        result (and a new embedding) after replying."""
        started = time.perf_counter()
        model = self._require_model()
        query = SearchQuery.parse(request, self.settings, model.version)
        if query.by_text:
            model = await self._model_able(model, _searches_by_words, deadline)
        if query.min_probability is not None:
            model = await self._model_able(model, _calibrated, deadline)
        if query.copy_mode:
            model = await self._model_able(model, _verifies_copies, deadline)

        lookups_started = time.perf_counter()
        async with self._start_lookups(query, model, deadline) as lookups:
            if query.page_token is not None:
                query.page_token.check_generation(await self._lookup_generation(query, lookups))
            cached = await self._cached_result(lookups)
            if cached is not None:
                return self._page_reply(_served_from_cache(cached, started), query)
            try:
                vector = await self._query_vector(query, lookups, deadline)
            except NoTextMatch as no_match:
                return await self._no_text_match(query, lookups, no_match, started)
        embed_ms = elapsed_ms(lookups_started)
        if vector.model_version != query.model_version:  # the embedder was redeployed with another model
            self.model = ModelInfo(model.name, vector.model_version, vector.values.size, model.max_batch_size,
                                   model.text_search, copy_min_inliers=model.copy_min_inliers,
                                   regions_per_image=model.regions_per_image)
            query = query.by_model(vector.model_version)
            # The new model's calibration: another model's never applies to these hits.
            self._remember_model(await self.downstream.model_info(deadline))

        search_started = time.perf_counter()
        if query.copy_mode:
            found: QueryHits | RankedCopies = await self._find_copies(query, vector, deadline, model.copy_min_inliers)
        else:
            found = await self._find(query, vector.values, deadline)
        search_ms = elapsed_ms(search_started)

        if self.shared is None:
            # search_svc's generation, as the search it answered saw it.
            generation: int | None = found.generation
        else:
            # The shared generation as read before the search ran: if a write is acknowledged since,
            # the counter has moved past it, so this result is never served after that write. (None:
            # Redis could not say; the result is not cached, and the reply reports search_svc's.)
            generation = lookups.generation
        reported = found.generation if generation is None else generation
        if query.page_token is not None:
            # Where the reply reports search_svc's generation, the one this page was actually found at: a
            # write that landed since the check above ends the pages here too.
            query.page_token.check_generation(reported)
        response = search_response(found, query.page, query.model_version, reported)
        response.understood_as = vector.understood_as
        self._store(query, vector, response, generation)
        self._page_reply(response, query)
        response.embedding_from_cache = vector.from_cache
        response.timing.embed_ms = embed_ms
        response.timing.search_ms = search_ms
        response.timing.total_ms = elapsed_ms(started)
        return response

    async def search_batch(
        self, queries: Sequence[gateway_pb2.VisualSearchRequest | ServiceError], deadline: float | None = None,
        charge: Callable[[], Awaitable[None]] | None = None,
    ) -> list[gateway_pb2.VisualSearchResult]:
        """Each query answered as `search` answers it, in order, at most BATCH_SEARCHES_IN_FLIGHT at once;
        a query that fails gets its status in its result (a `ServiceError` among `queries`: one the caller
        could not make a request of). INVALID_ARGUMENT for no query, or more than max_batch_queries.
        `charge` is called once per query, in order, before any runs (the caller's search rate limit):
        its refusal of the first query fails the call; of a later one, that query and the rest get it as
        their result."""
        limit = self.settings.max_batch_queries
        if not queries:
            raise invalid_argument(f"queries is empty: a batch takes 1 to {limit} queries")
        if len(queries) > limit:
            raise invalid_argument(
                f"queries holds {len(queries)} queries; a batch takes at most {limit} (GATEWAY_MAX_BATCH_QUERIES)"
            )
        paid, refusal = len(queries), None
        if charge is not None:
            for position in range(len(queries)):
                try:
                    await charge()
                except ServiceError as error:
                    if position == 0:
                        raise
                    paid, refusal = position, error
                    break
        in_flight = asyncio.Semaphore(BATCH_SEARCHES_IN_FLIGHT)

        async def answer(query: gateway_pb2.VisualSearchRequest | ServiceError) -> gateway_pb2.VisualSearchResult:
            try:
                if isinstance(query, ServiceError):
                    raise query
                async with in_flight:
                    return gateway_pb2.VisualSearchResult(code=OK, response=await self.search(query, deadline))
            except ServiceError as error:
                return search_result_error(error)
            except Exception:  # a bug: this query's INTERNAL, as Search would answer it, not the batch's
                logger.exception("unhandled error in a SearchBatch query")
                return search_result_error(ServiceError(grpc.StatusCode.INTERNAL, "internal error in this query"))

        results = list(await asyncio.gather(*(answer(query) for query in queries[:paid])))
        if refusal is not None:
            results += [search_result_error(refusal) for _ in queries[paid:]]
        return results

    async def _find(self, query: SearchQuery, vector: np.ndarray, deadline: float | None) -> QueryHits:
        """The query's ranking, as deep as its page needs. A text query with expansion is searched twice:
        its first hits' stored vectors (one Get call) move the text vector into the region of the image
        vectors, and the expanded vector is searched with the same collection, filter and min_score."""
        expansion = query.expansion
        if expansion is None:
            return await self._ranked(query, vector, deadline)
        # As many hits as are fed back, whatever the page: every page expands the text alike.
        first = await self.downstream.search_query(query.index_request(vector, k=expansion.hits), deadline)
        top_ids = [hit.id for hit in first.hits]
        stored: list[np.ndarray] = []
        if len(top_ids) >= 2:
            stored = await self.downstream.stored_vectors(query.request.collection, top_ids, deadline)
        # One hit (or none, or ids deleted since) says too little about where the text's images lie: the
        # text's own search is the answer (the first one, when it found all there is).
        if len(stored) < 2:
            return first if len(first.hits) < expansion.hits else await self._ranked(query, vector, deadline)
        return await self._ranked(query, expanded_query(vector, stored, expansion.weight), deadline)

    async def _ranked(self, query: SearchQuery, vector: np.ndarray, deadline: float | None) -> QueryHits:
        """The search of `vector`, `query.page.fetch` hits deep. search_svc orders hits by score, then id;
        but which of several hits with one score make the cut at the depth asked is the engine's choice.
        So when the last hit fetched ties with the page's last, the search goes deeper (up to the paging
        limit) until the tie ends within it: each page is then cut from the same order, and pages never
        repeat or skip a hit while the index holds."""
        page = query.page
        fetch = page.fetch
        while True:
            found = await self.downstream.search_query(query.index_request(vector, k=fetch), deadline)
            hits = found.hits
            if not (page.may_continue and len(hits) == fetch and fetch < page.limit
                    and hits[page.end - 1].score == hits[-1].score):
                return found
            fetch = min(fetch * 2, page.limit)

    async def _find_copies(
        self, query: SearchQuery, vector: QueryVector, deadline: float | None, copy_min_inliers: int
    ) -> RankedCopies:
        """Copy mode: a similar-mode shortlist `copy_shortlist` deep, with its hits' stored copy features
        and the `copy_feature_candidates` other items sharing the most local features with the query (one
        Search call), each verified against the query's copy features (one VerifyCopies call for both),
        then ranked: copies first (gateway/copy_ranking.py), the feature candidates only when verified.
        Pages are cut from this ranking. When neither holds a copy, a second look: the `copy_second_look`
        hits after it, verified with a stricter count of agreeing features, never below the embedder's own
        `copy_min_inliers` (a Search and a VerifyCopies call more)."""
        shortlist = await self.downstream.search_query(
            query.copy_candidates_request(vector.values, vector.copy_features), deadline
        )
        candidates = list(shortlist.hits)
        # Items outside the shortlist that share the most local features with the query: only those
        # verified copies join the ranking (the others are not among the most similar).
        suspects = list(shortlist.feature_matches)
        # Both in one call, the suspects first: they and the shortlist's first mirror_depth are checked
        # against the query's mirror image, as when each had a call of its own (one call fewer: the
        # embedder splits all of them over its workers at once).
        verified = await self._verify_candidates(
            vector, suspects + candidates, deadline,
            mirror_depth=self.settings.copy_search.mirror_depth_after(len(suspects)),
        )
        suspect_verdicts, verdicts = verified[:len(suspects)], verified[len(suspects):]
        checked = len(verified)
        found = [(hit, verdict) for hit, verdict in zip(suspects, suspect_verdicts) if verdict.is_copy]
        if (query.copy_second_look and not found and not any(verdict.is_copy for verdict in verdicts)
                and len(candidates) == query.copy_shortlist):
            deeper = await self.downstream.search_query(
                query.copy_candidates_request(vector.values, second_look=True), deadline
            )
            # By id, not by rank: the two searches may order equal scores differently.
            seen = {hit.id for hit in candidates}
            more = [hit for hit in deeper.hits if hit.id not in seen]
            verdicts += await self._verify_candidates(
                vector, more, deadline, first_rank=len(candidates),
                min_inliers=max(query.copy_second_look_min_inliers, copy_min_inliers),
            )
            checked += len(more)
            candidates += more
        candidates += [hit for hit, _verdict in found]
        verdicts += [verdict for _hit, verdict in found]
        self.copy_metrics.count(sum(verdict.is_copy for verdict in verdicts), checked)
        return RankedCopies(rank_copies(candidates, verdicts, len(candidates), query.min_score), shortlist.generation)

    async def _verify_candidates(
        self, vector: QueryVector, candidates: list[search_pb2.Hit], deadline: float | None, first_rank: int = 0,
        min_inliers: int = 0, mirror_depth: int | None = None,
    ) -> list[embedder_pb2.CopyVerdict]:
        if vector.copy_features and any(hit.copy_features for hit in candidates):
            verdicts = await self.downstream.verify_copies(
                vector.copy_features, [hit.copy_features for hit in candidates], deadline, first_rank, min_inliers,
                mirror_depth,
            )
        else:
            # No features in the query image (the embedder found none), or none stored for any candidate
            # (indexed without them): nothing can be verified a copy, and the call is spared.
            verdicts = [embedder_pb2.CopyVerdict() for _ in candidates]
        return with_identical_copies(
            [hit.content_sha256 for hit in candidates], verdicts, vector.content_sha256, vector.copy_features
        )

    @contextlib.asynccontextmanager
    async def _start_lookups(
        self, query: SearchQuery, model: ModelInfo, deadline: float | None
    ) -> AsyncIterator[SearchLookups]:
        """Everything a cache hit needs, at once. With Redis: one round trip (MGET) for the embedding,
        the result and the collection's shared generation. Without: the same round trip for the first
        two, beside a Stats call for search_svc's generation. What the search did not wait for is
        cancelled when it leaves the block."""
        shared = self.shared
        collection = query.request.collection
        pending: asyncio.Future[int | None] | None = None
        embedding: asyncio.Task[QueryEmbedding] | None = None
        generation_key = None
        trusted = True
        if shared is not None:
            # Read before the round trip: a bump that lands after the read must not make it trusted.
            trusted = shared.trusted(collection)
            generation_key = shared.key(collection)
        else:
            pending = asyncio.ensure_future(self.generations.current())
        # The embedding cache holds vectors only, and a copy search needs the query image's copy features
        # too, which only the embedder makes, from the image: a cached vector would not spare the call,
        # so copy mode does not look it up (a repeated copy search is served by the result cache; the
        # vector it gets is still cached, for similar searches of the same image).
        embedding_key = None if query.copy_mode else query.embedding_key
        try:
            with span("cache lookup"):
                found = await self.cache.lookup(embedding_key, query.result_key, generation_key)
            cached_embedding = found.embedding
            cached_understood_as = ""
            if cached_embedding is not None and query.by_text:
                unpacked = unpack_text_entry(cached_embedding, model.dimension)
                cached_embedding, cached_understood_as = unpacked if unpacked is not None else (None, "")
            if cached_embedding is not None and cached_embedding.size != model.dimension:
                cached_embedding = None
            if query.by_text and cached_embedding is None:
                embedding = asyncio.create_task(self.downstream.embed_text(query.text, deadline))
            if query.by_image and cached_embedding is None:
                # Without the embedding the result cannot be cached either (they are written together):
                # start the embedder now rather than after the generation is known.
                embed = self.downstream.embed_copy_query if query.copy_mode else self.downstream.embed_query
                embedding = asyncio.create_task(embed(query.request.image, query.crop, deadline))
            generation = found.generation if trusted else None
            if shared is not None and trusted and generation is None and found.answered:
                # No counter yet (a new collection, or it was evicted or lost with a Redis restart):
                # create it and read it before this search runs, beside the embedder call.
                pending = asyncio.ensure_future(shared.read(collection))
            yield SearchLookups(found, generation, pending, cached_embedding, embedding, cached_understood_as)
        finally:
            if pending is not None:
                abandon(pending)
            if embedding is not None:
                abandon(embedding)

    async def _cached_result(self, lookups: SearchLookups) -> gateway_pb2.VisualSearchResponse | None:
        """The result cached for the index as it is now, if any."""
        return self.cache.result_at(lookups.cache, await lookups.current_generation())

    async def _query_vector(self, query: SearchQuery, lookups: SearchLookups, deadline: float | None) -> QueryVector:
        if lookups.embedding is not None:
            made = await lookups.embedding
            if isinstance(made, TextEmbedding):
                return QueryVector(made.values, from_cache=False, model_version=made.model_version or query.model_version,
                                   understood_as=made.understood_as)
            return QueryVector(made.values, from_cache=False, model_version=made.model_version or query.model_version,
                               copy_features=made.copy_features,
                               content_sha256=query.image_sha256 if query.crop is None else "")
        if lookups.cached_embedding is not None:
            return QueryVector(lookups.cached_embedding, from_cache=True, model_version=query.model_version,
                               understood_as=lookups.cached_understood_as)
        if query.copy_mode:
            stored = await self.downstream.stored_copy_query(query.request.collection, query.request.item_id, deadline)
            return QueryVector(stored.values, from_cache=True, model_version=query.model_version,
                               copy_features=stored.copy_features, content_sha256=stored.content_sha256)
        values = await self.downstream.stored_vector(query.request.collection, query.request.item_id, deadline)
        return QueryVector(values, from_cache=True, model_version=query.model_version)

    async def _model_able(self, model: ModelInfo, ability: ModelAbility, deadline: float | None) -> ModelInfo:
        """`model` when it has the ability; otherwise the model asked again (it may have been redeployed
        since we last heard), FAILED_PRECONDITION saying what it lacks when it still has not."""
        if ability.has(model):
            return model
        model = self._remember_model(await self.downstream.model_info(deadline))
        if not ability.has(model):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, ability.refusal(model))
        return model

    def _page_reply(
        self, response: gateway_pb2.VisualSearchResponse, query: SearchQuery
    ) -> gateway_pb2.VisualSearchResponse:
        """The fields computed as a result is sent, fresh or cached: match_probability from the calibration
        of the model that made the hits' vectors (none for text queries, whose scores are on another
        scale), at the hits' ranks in the whole ranking; the min_probability filter; no_good_match; and the
        next page's token, for this requester's query. min_probability removes a tail of the ranking
        (a hit's probability falls with its rank; verified copies, kept, rank first): a page it cut is
        the last."""
        model = self.model
        calibration = None
        if model is not None and not query.by_text and model.version == response.model_version:
            calibration = model.calibration
        removed = annotate(response, calibration, min_probability=query.min_probability,
                           no_good_match_below=self.settings.no_good_match_below, first_rank=query.page.offset + 1)
        next_offset = response.next_page_token  # as search_response left it (and the cache kept it)
        response.next_page_token = ""
        if next_offset.isdigit() and not removed and int(next_offset) < query.page.limit:
            response.next_page_token = PageToken(
                int(next_offset), response.index_generation, query.copy_shortlist, query.fingerprint
            ).encode()
        return response

    async def _lookup_generation(self, query: SearchQuery, lookups: SearchLookups) -> int:
        """The collection's generation as this search's cache lookup knows it, which a page token must
        have been made at; when the lookup could not say (Redis down), the generation replies report
        then (search_svc's)."""
        generation = await lookups.current_generation()
        if generation is None:
            generation = await self._current_generation(query.request.collection)
        return generation

    async def _no_text_match(
        self, query: SearchQuery, lookups: SearchLookups, no_match: NoTextMatch, started: float
    ) -> gateway_pb2.VisualSearchResponse:
        """A text that names nothing the model knows: no hits, and why (not cached: the embedder answers
        it in a few milliseconds, and the generation may be unknown)."""
        generation = await lookups.current_generation()
        if generation is None:
            generation = await self._current_generation(query.request.collection)
        response = gateway_pb2.VisualSearchResponse(
            index_generation=generation, model_version=query.model_version, no_good_match=True,
            no_match_reason=no_match.reason, understood_as=no_match.understood_as,
        )
        response.timing.embed_ms = response.timing.total_ms = elapsed_ms(started)
        return response

    def _store(
        self, query: SearchQuery, vector: QueryVector, response: gateway_pb2.VisualSearchResponse,
        generation: int | None,
    ) -> None:
        """Caches the result (computed at `generation`; None: unknown, so not cached) and the query
        embedding if the embedder just made it. Written after we reply (serialised now, before the
        per-request fields are set)."""
        new_embedding = None
        if not vector.from_cache and query.embedding_key is not None:
            values = pack_text_entry(vector.values, vector.understood_as) if query.by_text else vector.values
            new_embedding = (query.embedding_key, values)
        result = None if generation is None else (query.result_key, generation, response)
        self.cache.save_in_background(result=result, embedding=new_embedding)

    # ------------------------------------------------------------------------- index generation

    async def _current_generation(self, collection: str, search_generation: int | None = None) -> int:
        """The collection's generation now, as a reply reports it: the shared one (with Redis), else
        search_svc's (`search_generation` when the caller has it, else asked)."""
        if self.shared is not None and (shared := await self.shared.read(collection)) is not None:
            return shared
        return search_generation if search_generation is not None else await self.generations.current()

    async def _written(self, collection: str, search_generation: int, dropped: bool = False) -> int:
        """After search_svc acknowledged a write to `collection`, before our caller hears of it: with
        Redis, the shared generation is bumped (no gateway serves a result cached before the write from
        now on); without, search_svc's answer is remembered. Returns the generation to report."""
        if self.shared is None:
            self.generations.observe_write(search_generation)
            return search_generation
        bumped = await self.shared.bump(collection, dropped)
        return search_generation if bumped is None else bumped

    @contextlib.asynccontextmanager
    async def _writing(self, collection: str, dropped: bool = False) -> AsyncIterator[None]:
        """Around a write call to search_svc: if it fails other than by a refusal (which writes nothing)
        or is abandoned, it may have been made, in part; with Redis, the shared generation is bumped
        anyway, in the background."""
        try:
            yield
        except Refused:
            raise
        except BaseException:
            if self.shared is not None:
                self.shared.bump_soon(collection, dropped)
            raise

    # ---------------------------------------------------------------------------------------- ingest

    def _check_item(self, request: gateway_pb2.AddImageRequest) -> str | None:
        if not request.image:
            return "image is empty"
        if len(request.image) > self.settings.max_image_bytes:
            return f"image is {len(request.image)} bytes; the limit is {self.settings.max_image_bytes}"
        if (problem := id_problem(request.id)) is not None:
            return problem
        if struct_depth(request.metadata) > MAX_STRUCT_DEPTH:
            return f"metadata nests deeper than {MAX_STRUCT_DEPTH} levels"
        return None

    @staticmethod
    def _unparsable_item(message: UnparsableMessage) -> tuple[gateway_pb2.AddImageRequest, str]:
        """What could be read of a stream message that could not be parsed (its id, when only its
        metadata was at fault), and what to report for it."""
        problem = message.problem
        if problem is not None and problem.top_field == "metadata" and problem.too_deep:
            reason = f"metadata nests deeper than {MAX_STRUCT_DEPTH} levels"
        else:
            reason = message.describe()
        salvaged = message.salvaged
        if not isinstance(salvaged, gateway_pb2.AddImageRequest):
            salvaged = gateway_pb2.AddImageRequest()
        return salvaged, reason

    async def add_images(
        self, requests: AsyncIterable[gateway_pb2.AddImageRequest | UnparsableMessage],
        deadline: float | None = None,
    ) -> gateway_pb2.AddImagesSummary:
        """Bad items are reported and skipped; only a downstream outage (or deadline) ends the call.
        Upserts are by id, so a client may safely resend a stream that failed part-way: items already
        stored with the same content, metadata and URI are counted as unchanged and not embedded again.
        An id that comes again later in the stream is written again, after the earlier item, so the
        later one wins; the earlier one, overwritten, counts as unchanged, so that `indexed` counts
        distinct ids and received = indexed + unchanged + failed + skipped_copies.

        Batches are pipelined: while one batch is being upserted the next is embedded, at most
        `add_pipeline_depth` batches in flight. Except with ON_COPY_FLAG or ON_COPY_SKIP (the first
        message's `on_copy`): then each batch waits for the one before to be written, so that its copy
        check sees every earlier item of the stream (see `_screen_copies`)."""
        model = self._require_model()
        batch_size = min(self.settings.add_batch_size, model.max_batch_size or self.settings.add_batch_size)
        byte_budget = max(self.settings.max_message_bytes - MESSAGE_HEADROOM_BYTES, self.settings.max_image_bytes)
        summary = gateway_pb2.AddImagesSummary()
        generations: list[int] = []
        batch: list[PendingItem] = []
        batch_bytes = 0
        collection: str | None = None
        on_copy: int = gateway_pb2.ON_COPY_KEEP
        regions = StreamRegions()
        in_flight: list[tuple[asyncio.Task[int | None], list[PendingItem]]] = []
        writes_by_id: Counter[str] = Counter()

        async def wait_oldest() -> None:
            task, done = in_flight.pop(0)
            if (generation := await task) is not None:
                generations.append(generation)
            writes_by_id.update(pending.id for pending in done if pending.written)

        async def flush() -> None:
            nonlocal batch, batch_bytes
            if batch:
                if on_copy != gateway_pb2.ON_COPY_KEEP:
                    while in_flight:  # the copy check must see the stream's earlier items stored
                        await wait_oldest()
                task = asyncio.create_task(
                    self._index_batch(batch, collection or "", summary, deadline, on_copy, regions)
                )
                in_flight.append((task, batch))
                while len(in_flight) > self.settings.add_pipeline_depth:
                    await wait_oldest()
            batch, batch_bytes = [], 0

        try:
            async for message in requests:
                position = summary.received
                summary.received += 1
                problem = None
                if isinstance(message, UnparsableMessage):  # see service_kit.request_parsing
                    if message.salvaged is None and collection is None:
                        # The first message names the stream's collection; later ones may leave it out.
                        raise invalid_argument(
                            f"the stream's first message is not a valid {message.type_name} ({message.reason}), "
                            "so the stream's collection is unknown"
                        )
                    request, problem = self._unparsable_item(message)
                else:
                    request = message
                content_sha256 = hashlib.sha256(request.image).hexdigest() if request.image else ""
                item_id = request.id or content_sha256
                if collection is None:
                    collection = request.collection
                    on_copy = await self._stream_copy_policy(request.on_copy, deadline)
                    regions = await self._stream_regions(collection, request.regions, deadline)
                    if regions.made:
                        # Each image is 1 + regions_per_image inferences: a batch of as many inferences as
                        # without regions keeps each EmbedImages call within its deadline.
                        batch_size = max(1, batch_size // (1 + model.regions_per_image))
                problem = problem or self._check_item(request)
                if problem is None and request.collection and request.collection != collection:
                    problem = f"collection {request.collection!r} differs from the stream's {collection!r}"
                if problem is not None:
                    summary.failures.add(id=item_id, code=INVALID_ARGUMENT, message=problem, index=position)
                    continue
                repeated = any(pending.id == item_id for pending in batch)
                if len(batch) >= batch_size or batch_bytes + len(request.image) > byte_budget or repeated:
                    await flush()
                if repeated or any(pending.id == item_id for _task, queued in in_flight for pending in queued):
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
            for task, _batch in in_flight:  # the stream broke or a downstream failed: stop the rest
                task.cancel()

        overwritten = sum(writes - 1 for writes in writes_by_id.values())
        summary.indexed -= overwritten
        summary.unchanged += overwritten
        summary.failures.sort(key=lambda failure: failure.index)
        summary.failed = len(summary.failures)
        summary.copies.sort(key=lambda found: found.index)
        summary.index_generation = (
            max(generations) if generations else await self._current_generation(collection or "")
        )
        return summary

    async def _stream_copy_policy(self, requested: int, deadline: float | None) -> int:
        """The stream's on_copy (its first message's): INVALID_ARGUMENT for a value that is none, and
        FAILED_PRECONDITION for a check the embedder cannot make."""
        if requested not in gateway_pb2.OnCopy.values():
            raise invalid_argument(
                f"on_copy {requested} is not a copy policy: give ON_COPY_KEEP ({gateway_pb2.ON_COPY_KEEP}), "
                f"ON_COPY_FLAG ({gateway_pb2.ON_COPY_FLAG}) or ON_COPY_SKIP ({gateway_pb2.ON_COPY_SKIP})"
            )
        if requested in (gateway_pb2.ON_COPY_UNSPECIFIED, gateway_pb2.ON_COPY_KEEP):
            return gateway_pb2.ON_COPY_KEEP
        await self._model_able(self._require_model(), _verifies_copies, deadline)
        return requested

    async def _stream_regions(self, collection: str, requested: bool, deadline: float | None) -> StreamRegions:
        """A stream makes regions when its first message asks for them or its collection has them already
        (a collection either indexes its items with regions or not)."""
        has_regions = await self.downstream.collection_has_regions(collection, deadline)
        return StreamRegions(made=requested or has_regions, turned_on=requested and not has_regions)

    async def _embed_items(
        self, batch: list[PendingItem], deadline: float | None, checks_copies: bool = False, with_regions: bool = False,
    ) -> list[embedder_pb2.EmbedResult]:
        """With `checks_copies`: copy features fit to query with (the mirror image's too, so a mirrored
        copy is caught), which are also the ones stored."""
        try:
            return await self.downstream.embed_images(
                [pending.request.image for pending in batch], deadline,
                with_copy_features=self.settings.copy_search.features_at_ingest or checks_copies,
                copy_features_for_query=checks_copies, with_regions=with_regions,
            )
        except Refused as refused:
            if len(batch) == 1:
                failed = embedder_pb2.EmbedResult()
                failed.error.code = INVALID_ARGUMENT
                failed.error.message = refused.item_message
                return [failed]
            # The batch as a whole was refused: embed one by one so only the culprit fails.
            results: list[embedder_pb2.EmbedResult] = []
            for pending in batch:
                results.extend(await self._embed_items([pending], deadline, checks_copies, with_regions))
            return results

    async def _upsert(
        self, items: list[tuple[PendingItem, search_pb2.Item]], collection: str,
        summary: gateway_pb2.AddImagesSummary, deadline: float | None,
    ) -> int | None:
        """Upserts the items; returns the generation of the last successful write, if any."""
        try:
            async with self._writing(collection):
                response = await self.downstream.upsert([item for _, item in items], collection, deadline)
        except Refused as refused:
            if len(items) == 1:
                pending, _ = items[0]
                summary.failures.add(
                    id=pending.id, code=INVALID_ARGUMENT, message=refused.item_message, index=pending.index
                )
                return None
            # One bad item (e.g. metadata of the wrong type) spoils the batch: isolate it.
            generation = None
            for one in items:
                generation = await self._upsert([one], collection, summary, deadline) or generation
            return generation
        generation = await self._written(collection, response.generation)
        summary.indexed += len(items)
        for pending, _item in items:
            pending.written = True
        return generation

    async def _unchanged_ids(
        self, batch: list[PendingItem], collection: str, deadline: float | None,
        on_copy: int = gateway_pb2.ON_COPY_KEEP,
    ) -> set[str]:
        """Ids in the batch already stored with the same content, metadata and image URI, and with copy
        features while they are made at ingest (an item stored without them is embedded again, so that
        copy searches can find it; only when the embedder makes them, else it would be every time).
        With ON_COPY_FLAG, the `copy_of` a flag added is not a change (else a flagged item would be
        embedded, checked and flagged again by every run)."""
        model = self.model
        needs_features = (
            self.settings.copy_search.features_at_ingest and model is not None and model.copy_min_inliers > 0
        )
        stored_items = await self.downstream.stored_items(
            [pending.id for pending in batch], collection, deadline, include_copy_features=needs_features
        )
        stored = {item.id: item for item in stored_items}
        unchanged = set()
        for pending in batch:
            item = stored.get(pending.id)
            if (
                item is not None
                and item.content_sha256 == pending.content_sha256
                and item.image_uri == pending.request.image_uri
                and _same_metadata(item.metadata, pending.request.metadata, on_copy == gateway_pb2.ON_COPY_FLAG)
                and (item.copy_features or not needs_features)
            ):
                unchanged.add(pending.id)
        return unchanged

    async def _index_batch(
        self, batch: list[PendingItem], collection: str, summary: gateway_pb2.AddImagesSummary,
        deadline: float | None, on_copy: int = gateway_pb2.ON_COPY_KEEP, regions: StreamRegions = StreamRegions(),
    ) -> int | None:
        # A stream that turns regions on embeds every item again: one stored before has no regions.
        unchanged = set() if regions.turned_on else await self._unchanged_ids(batch, collection, deadline, on_copy)
        summary.unchanged += len(unchanged)
        batch = [pending for pending in batch if pending.id not in unchanged]
        if not batch:
            return None
        checks_copies = on_copy != gateway_pb2.ON_COPY_KEEP
        results = await self._embed_items(batch, deadline, checks_copies, regions.made)
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
                copy_features=result.copy_features,
                regions=item_regions(result),
            )))
        if checks_copies and items:
            items = await self._screen_copies(items, collection, on_copy, summary, deadline)
        return await self._upsert(items, collection, summary, deadline) if items else None

    async def _screen_copies(
        self, items: list[tuple[PendingItem, search_pb2.Item]], collection: str, on_copy: int,
        summary: gateway_pb2.AddImagesSummary, deadline: float | None,
    ) -> list[tuple[PendingItem, search_pb2.Item]]:
        """The items to write, after the copy check: each new item is verified (one VerifyCopies call)
        against a copy-mode shortlist of the collection and its feature candidates (one Search call per
        item, or shared by the batch's items when there are none to ask for) and against the batch's
        earlier items; earlier batches of the stream are stored by then. A copy
        is reported in the summary and, by `on_copy`, flagged (metadata `copy_of`) or left out. An item
        never counts as a copy of its own id (an update of it), nor of an item this check left out."""
        async def copies_of(position: int) -> list[tuple[str, float]]:
            pending, item = items[position]
            if not item.copy_features:  # the embedder found no features in it: nothing can be verified
                return []
            request = copy_candidates_search(
                item.vector, self.settings.copy_search.shortlist, collection,
                copy_features=item.copy_features, feature_candidates=self.settings.copy_search.feature_candidates,
            )
            try:
                searched = await self.downstream.search_query(request, deadline)
                similar, suspects = list(searched.hits), list(searched.feature_matches)
            except ServiceError as error:
                if error.code != grpc.StatusCode.NOT_FOUND:
                    raise
                # The stream's first write creates the collection: nothing stored to copy.
                similar, suspects = [], []
            # The feature candidates and the batch's earlier items first, all checked against the new
            # item's mirror image too; then the similar ones, as a copy search checks them (the first
            # mirror_depth). Behind a full shortlist, the batch's mirror images of each other went unseen.
            unranked = [(hit.id, hit.copy_features, hit.content_sha256) for hit in suspects]
            unranked += [(earlier.id, stored.copy_features, stored.content_sha256) for earlier, stored in items[:position]]
            unranked = [candidate for candidate in unranked if candidate[1] and candidate[0] != pending.id]
            ranked = [(hit.id, hit.copy_features, hit.content_sha256) for hit in similar
                      if hit.id != pending.id and hit.copy_features]
            candidates = [*unranked, *ranked]
            if not candidates:
                return []
            verdicts = await self.downstream.verify_copies(
                item.copy_features, [features for _, features, _ in candidates], deadline,
                mirror_depth=self.settings.copy_search.mirror_depth_after(len(unranked)),
            )
            # The same bytes under another id are a copy, features or none (a plain image has none).
            verdicts = with_identical_copies([content for _, _, content in candidates], verdicts,
                                             item.content_sha256, item.copy_features)
            checked = list(zip(candidates, verdicts))
            # In shortlist order again (similar, feature candidates, the batch's): the first of equal copies wins.
            checked = checked[len(unranked):] + checked[:len(unranked)]
            return [(candidate[0], verdict.copy_score) for candidate, verdict in checked if verdict.is_copy]

        found = await asyncio.gather(*(copies_of(position) for position in range(len(items))))
        kept: list[tuple[PendingItem, search_pb2.Item]] = []
        left_out: set[str] = set()
        for (pending, item), copies in zip(items, found):
            copies = [copy for copy in copies if copy[0] not in left_out]
            if not copies:
                kept.append((pending, item))
                continue
            copy_of, copy_score = max(copies, key=lambda copy: copy[1])
            skipped = on_copy == gateway_pb2.ON_COPY_SKIP
            summary.copies.add(id=pending.id, index=pending.index, copy_of=copy_of, copy_score=copy_score,
                               skipped=skipped)
            self.copy_metrics.count_ingest_copy(skipped)
            if skipped:
                summary.skipped_copies += 1
                left_out.add(pending.id)
                continue
            item.metadata[COPY_OF_KEY] = copy_of
            kept.append((pending, item))
        return kept

    # ------------------------------------------------------------------------------ delete, stats

    async def delete_images(
        self, request: gateway_pb2.DeleteImagesRequest, deadline: float | None = None
    ) -> gateway_pb2.DeleteImagesResponse:
        self._require_model()
        if not request.ids:
            return gateway_pb2.DeleteImagesResponse(
                deleted=0, index_generation=await self._current_generation(request.collection)
            )
        async with self._writing(request.collection):
            response = await self.downstream.delete(request.ids, request.collection, deadline)
        if response.deleted:
            generation = await self._written(request.collection, response.generation)
        else:  # none of the ids was there: nothing was written
            generation = await self._current_generation(request.collection, response.generation)
        return gateway_pb2.DeleteImagesResponse(deleted=response.deleted, index_generation=generation)

    async def stats(
        self, request: gateway_pb2.VisualStatsRequest, deadline: float | None = None
    ) -> gateway_pb2.VisualStatsResponse:
        self._require_model()
        stats, info = await asyncio.gather(
            self.downstream.index_stats(request.collection, deadline, request.with_field_summaries),
            self.downstream.model_info(deadline),
        )
        model = self._remember_model(info)
        return gateway_pb2.VisualStatsResponse(
            count=stats.count,
            index_type=stats.index_type,
            metric=stats.metric,
            index_generation=await self._current_generation(request.collection, stats.generation),
            dimension=info.dimension or stats.dimension,
            model_name=info.model_name,
            model_version=info.model_version,
            filterable_fields=stats.filterable_fields,
            text_search=info.text_search,
            calibrated=model.calibration is not None,
            regions=stats.regions,
            field_summaries=stats.field_summaries,
        )

    async def list_collections(self, deadline: float | None = None) -> search_pb2.ListCollectionsResponse:
        self._require_model()
        return await self.downstream.collections(deadline)

    async def list_images(
        self, request: gateway_pb2.ListImagesRequest, deadline: float | None = None
    ) -> gateway_pb2.ListImagesResponse:
        """One page of the collection's images; search_svc checks the page size and token (INVALID_ARGUMENT
        naming the field)."""
        self._require_model()
        page = await self.downstream.listed_items(request.collection, request.page_size, request.page_token, deadline)
        return gateway_pb2.ListImagesResponse(
            images=[
                gateway_pb2.CatalogImage(
                    id=item.id, content_sha256=item.content_sha256, image_uri=item.image_uri, metadata=item.metadata
                )
                for item in page.items
            ],
            next_page_token=page.next_page_token,
        )

    async def drop_collection(
        self, request: search_pb2.DropCollectionRequest, deadline: float | None = None
    ) -> search_pb2.DropCollectionResponse:
        self._require_model()
        async with self._writing(request.collection, dropped=True):
            response = await self.downstream.drop_collection(request, deadline)
        response.generation = await self._written(request.collection, response.generation, dropped=True)
        return response

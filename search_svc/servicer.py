"""The `vsearch.v1.VectorSearch` servicer: validates each request, calls the store from a bounded
executor and builds the answer with its index generation. When the request is traced, the executor
runs in its context: spans for the wait for a worker (`queue wait`) and the store search."""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import grpc
import numpy as np
from prometheus_client import Histogram

from search_svc import columns, paging
from search_svc.field_summaries import FieldSummary, FieldSummaryCache
from search_svc.filters import parse_filter
from search_svc.generation import IndexGeneration
from search_svc.item_codec import ItemCodec, stored_ids
from search_svc.settings import SearchSettings
from search_svc.vector_store import CollectionInfo, VectorStore, collection_name
from service_kit.copy_feature_codec import CopyFeaturesInvalid, decode_copy_features
from service_kit.status import invalid_argument
from service_kit.tracing import carried, record_span, span
from vsearch.v1 import search_pb2, search_pb2_grpc

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["VectorSearch"].full_name
# Query vectors per Search (Milvus itself takes up to 16384).
MAX_QUERIES = 1024

ResultT = TypeVar("ResultT")


class VectorSearchServicer(search_pb2_grpc.VectorSearchServicer):
    """Each RPC hands its whole blocking part (validation, store calls, building the answer) to the
    bounded executor in one hop; the event loop only reads the generation and awaits."""

    def __init__(
        self,
        settings: SearchSettings,
        store: VectorStore,
        codec: ItemCodec,
        generation: IndexGeneration,
        executor: ThreadPoolExecutor,
        queue_seconds: Histogram,
    ) -> None:
        self._settings = settings
        self._store = store
        self._codec = codec
        self._generation = generation
        self._executor = executor
        self._queue_seconds = queue_seconds
        self._field_summaries = FieldSummaryCache(settings.field_summaries_max_age_s)

    def _collection(self, requested: str) -> str:
        return collection_name(requested, self._store.default_collection)

    async def _offload(self, function: Callable[..., ResultT], *args: object) -> ResultT:
        submitted = time.perf_counter()
        submitted_ns = time.time_ns()

        def run() -> ResultT:
            self._queue_seconds.observe(time.perf_counter() - submitted)
            record_span("queue wait", submitted_ns)
            return function(*args)

        return await asyncio.get_running_loop().run_in_executor(self._executor, carried(run))

    # --- writes: the generation advances after any write that reached the store, even a failed one,
    # since a failed multi-batch upsert may have been partly applied.

    async def Upsert(self, request: search_pb2.UpsertRequest, context: grpc.aio.ServicerContext) -> search_pb2.UpsertResponse:
        return await self._offload(self._upsert, request)

    def _upsert(self, request: search_pb2.UpsertRequest) -> search_pb2.UpsertResponse:
        collection = self._collection(request.collection)
        rows = self._codec.rows(request.items)  # everything validated before anything is written
        if not rows:
            return search_pb2.UpsertResponse(upserted=0, generation=self._generation.current)
        try:
            self._store.upsert(collection, rows)
        finally:
            generation = self._generation.advance()
        return search_pb2.UpsertResponse(upserted=len(rows), generation=generation)

    async def Delete(self, request: search_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> search_pb2.DeleteResponse:
        return await self._offload(self._delete, request)

    def _delete(self, request: search_pb2.DeleteRequest) -> search_pb2.DeleteResponse:
        collection = self._collection(request.collection)
        ids = stored_ids(request.ids)
        # Milvus does not say how many of the ids existed, so look first; a concurrent write to the
        # same ids between the two calls can make the count off by those.
        existing = self._store.existing_ids(collection, ids) if ids else []
        if not existing:  # nothing changes, so cached results stay valid
            return search_pb2.DeleteResponse(deleted=0, generation=self._generation.current)
        try:
            self._store.delete(collection, existing)
        finally:
            generation = self._generation.advance()
        return search_pb2.DeleteResponse(deleted=len(existing), generation=generation)

    # --- reads: the generation is read before the read itself, so an answer is never labelled
    # newer than the data it saw (at worst it is older, and a cache drops it sooner).

    async def Search(self, request: search_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        return await self._offload(self._search, request, self._generation.current)

    def _search(self, request: search_pb2.SearchRequest, generation: int) -> search_pb2.SearchResponse:
        collection = self._collection(request.collection)
        if not request.queries:
            raise invalid_argument("a search needs at least one query vector")
        if len(request.queries) > MAX_QUERIES:
            raise invalid_argument(f"a search takes at most {MAX_QUERIES} query vectors, got {len(request.queries)}")
        if not 1 <= request.k <= self._settings.max_k:
            raise invalid_argument(f"k must be between 1 and {self._settings.max_k}, got {request.k}")
        min_score = request.min_score if request.HasField("min_score") else None
        if min_score is not None and not math.isfinite(min_score):
            raise invalid_argument(f"min_score must be finite, got {min_score}")
        descriptors = self._copy_query_descriptors(request)
        vectors = self._codec.query_matrix(request.queries)
        conditions = parse_filter(request.filter, self._settings.filter_fields)
        with span("store search", {
            "vsearch.store.backend": self._settings.backend, "vsearch.search.queries": len(vectors),
            "vsearch.search.k": request.k, "vsearch.search.conditions": len(conditions),
        }):
            results = self._store.search(
                collection, vectors, request.k, conditions, include_copy_features=request.include_copy_features
            )
        response = search_pb2.SearchResponse(generation=generation)
        for hits in results:
            # Best first, ties by id, so equal requests give equal answers.
            hits.sort(key=lambda hit: (-hit.score, hit.id))
            if min_score is not None:  # compared as float32, the precision of Hit.score
                hits = [hit for hit in hits if np.float32(hit.score) >= np.float32(min_score)]
            response.results.add().hits.extend(self._codec.hit(hit) for hit in hits)
        if descriptors is not None:
            with span("feature matches", {"vsearch.search.feature_candidates": request.feature_candidates}):
                matches = self._store.feature_matches(
                    collection, descriptors, vectors[0], request.feature_candidates, conditions,
                    {hit.id for hit in results[0]}, include_copy_features=request.include_copy_features,
                )
            response.results[0].feature_matches.extend(self._codec.hit(hit) for hit in matches)
        return response

    def _copy_query_descriptors(self, request: search_pb2.SearchRequest) -> np.ndarray | None:
        """The local descriptors of a copy search's query (its own and its mirror image's) that
        feature matches are looked up with; None when none are asked for."""
        if request.feature_candidates > self._settings.max_k:
            raise invalid_argument(
                f"feature_candidates must be at most {self._settings.max_k}, got {request.feature_candidates}"
            )
        if not request.feature_candidates:
            return None
        if not request.copy_query_features:
            raise invalid_argument("feature_candidates needs copy_query_features (the query image's copy features)")
        if len(request.queries) != 1:
            raise invalid_argument(
                f"feature_candidates needs exactly one query vector, got {len(request.queries)}"
            )
        try:
            features = decode_copy_features(request.copy_query_features)
        except CopyFeaturesInvalid as error:
            raise invalid_argument(f"copy_query_features: {error}") from error
        return np.concatenate([features.plain.descriptors, features.mirrored.descriptors])

    async def Get(self, request: search_pb2.GetRequest, context: grpc.aio.ServicerContext) -> search_pb2.GetResponse:
        return await self._offload(self._get, request)

    def _get(self, request: search_pb2.GetRequest) -> search_pb2.GetResponse:
        collection = self._collection(request.collection)
        ids = stored_ids(request.ids)
        rows = {
            row[columns.ID]: row
            for row in self._store.get(
                collection, ids, request.include_vectors, include_copy_features=request.include_copy_features
            )
        } if ids else {}
        return search_pb2.GetResponse(
            items=[self._codec.item(rows[item_id], request.include_vectors) for item_id in ids if item_id in rows]
        )

    async def List(self, request: search_pb2.ListRequest, context: grpc.aio.ServicerContext) -> search_pb2.ListResponse:
        return await self._offload(self._list, request)

    def _list(self, request: search_pb2.ListRequest) -> search_pb2.ListResponse:
        collection = self._collection(request.collection)
        limit = paging.page_size(request.page_size)
        after = paging.after_stored_id(request.page_token)
        # One row more than the page: whether another page follows, without an empty last page.
        rows = self._store.list_page(
            collection, after, limit + 1, request.include_vectors, request.include_copy_features
        )
        response = search_pb2.ListResponse(
            items=[self._codec.item(row, request.include_vectors) for row in rows[:limit]]
        )
        if len(rows) > limit:
            response.next_page_token = paging.page_token(rows[limit - 1][columns.ID])
        return response

    async def Stats(self, request: search_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> search_pb2.StatsResponse:
        # Read before counting, so the answer is never labelled newer than the data it saw.
        generation = self._generation.current
        self._store.require_connected()
        collection = self._collection(request.collection)
        summaries: list[FieldSummary] = []
        if request.skip_count and collection == self._store.default_collection and not request.with_field_summaries:
            # The default collection always exists: no store call at all, and whether it has regions as this
            # process last knew it (exact on FAISS; a Milvus replica may not have seen another turn them on yet).
            count, regions = 0, self._store.regions_known(collection)
        else:
            count, regions, summaries = await self._offload(
                self._collection_stats, collection, request.skip_count, request.with_field_summaries
            )
        return search_pb2.StatsResponse(
            count=count,
            index_type=self._store.index_type,
            metric=self._settings.metric,
            generation=generation,
            dimension=self._settings.dimension,
            collection=collection,
            filterable_fields=list(self._settings.filter_fields),
            regions=regions,
            field_summaries=[summary.message() for summary in summaries],
        )

    def _collection_stats(
        self, collection: str, skip_count: bool, with_field_summaries: bool
    ) -> tuple[int, bool, list[FieldSummary]]:
        """The collection's item count (0 when skipped), whether it has regions, and its field summaries
        when asked; NOT_FOUND when it does not exist."""
        if skip_count:
            self._store.require_collection(collection)
            count = 0
        else:
            count = self._store.count(collection)
        summaries = []
        if with_field_summaries:
            summaries = self._field_summaries.get(
                collection, self._generation.current, lambda: self._store.field_summaries(collection)
            )
        return count, self._store.has_regions(collection), summaries

    async def ListCollections(
        self, request: search_pb2.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.ListCollectionsResponse:
        self._store.require_connected()
        return await self._offload(self._list_collections)

    def _list_collections(self) -> search_pb2.ListCollectionsResponse:
        found = {info.name: info for info in self._store.collections()}
        default = self._store.default_collection
        if default not in found:  # always listed, even if a store's listing has not caught up with it
            found[default] = CollectionInfo(default, self._store.count(default), self._store.has_regions(default))
        return search_pb2.ListCollectionsResponse(collections=[
            search_pb2.CollectionSummary(
                name=name, count=found[name].count, is_default=name == default, regions=found[name].regions
            )
            for name in sorted(found)
        ])

    async def DropCollection(
        self, request: search_pb2.DropCollectionRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.DropCollectionResponse:
        return await self._offload(self._drop_collection, request)

    def _drop_collection(self, request: search_pb2.DropCollectionRequest) -> search_pb2.DropCollectionResponse:
        if not request.collection:
            raise invalid_argument("name the collection to drop")
        collection = self._collection(request.collection)
        try:
            dropped = self._store.drop(collection)
        finally:
            generation = self._generation.advance()
        return search_pb2.DropCollectionResponse(dropped=dropped, generation=generation)

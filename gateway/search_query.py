"""A Search request, validated once, with the cache keys it reads and writes and the request it
sends to search_svc."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from gateway.cache import KEY_PREFIX, embedding_cache_key, item_query_key, result_cache_key
from gateway.search_paging import Page, PageToken, query_fingerprint
from gateway.settings import MAX_COPY_CANDIDATES, GatewaySettings, TextExpansionSettings
from service_kit.float_vectors import float_message
from service_kit.status import invalid_argument
from vsearch.v1 import embedder_pb2, gateway_pb2, search_pb2

SEARCH_MODES = frozenset(gateway_pb2.SearchMode.values())

# search_svc's rules for ids, checked here too so that a bad id is refused before anything is embedded.
MAX_ID_CHARS = 256
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


# A text query: at most this many characters (after normalisation), and no control characters other than
# whitespace (tabs and line breaks read as spaces).
MAX_TEXT_CHARS = 500
_TEXT_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Unicode NFKC, runs of whitespace as one space, trimmed: the embedder's own normalisation, so that
    texts it embeds alike share one cache entry."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def text_problem(text: str) -> str | None:
    """What is wrong with a text query, or None."""
    if _TEXT_CONTROL_CHARS.search(text):
        return "text contains a control character"
    normalised = normalise_text(text)
    if not normalised:
        return "text is empty"
    if len(normalised) > MAX_TEXT_CHARS:
        return f"text is {len(normalised)} characters; the limit is {MAX_TEXT_CHARS}"
    return None


def text_embedding_cache_key(text_sha256: str, model_version: str) -> str:
    """The query vector of this (normalised) text, by this model."""
    return f"{KEY_PREFIX}:txt:{model_version}:{text_sha256}"


def pack_text_entry(vector: np.ndarray, understood_as: str) -> np.ndarray:
    """A text query's cache entry: its vector, then what it was understood as (UTF-8, zero-padded to a
    multiple of 4 bytes), as one float32 buffer, so that the one lookup of a search gives both."""
    extra = understood_as.encode()
    extra += b"\0" * (-len(extra) % 4)
    return np.concatenate([np.asarray(vector, dtype=np.float32), np.frombuffer(extra, dtype=np.float32)])


def unpack_text_entry(entry: np.ndarray, dimension: int) -> tuple[np.ndarray, str] | None:
    """(vector, understood_as) of a cache entry made by `pack_text_entry`; None when it does not hold a
    vector of `dimension` values."""
    if entry.size < dimension:
        return None
    try:
        understood_as = entry[dimension:].tobytes().rstrip(b"\0").decode()
    except UnicodeDecodeError:
        return None
    return entry[:dimension], understood_as


def id_problem(item_id: str, what: str = "id") -> str | None:
    """What is wrong with an item id, or None. The id is quoted by repr(), control characters escaped."""
    if len(item_id) > MAX_ID_CHARS:
        return f"{what} is {len(item_id)} characters; the limit is {MAX_ID_CHARS}"
    if _CONTROL_CHARS.search(item_id):
        return f"{what} {item_id!r} contains a control character"
    return None


def copy_candidates_search(
    vector: search_pb2.Vector, k: int, collection: str, search_filter: search_pb2.Filter | None = None,
    copy_features: bytes = b"", feature_candidates: int = 0,
) -> search_pb2.SearchRequest:
    """The search whose hits a copy check verifies: `vector`'s k most similar items with their stored copy
    features and, given the query image's `copy_features`, the `feature_candidates` items sharing the
    most local features with it. Without min_score: a verified copy is kept whatever its cosine."""
    request = search_pb2.SearchRequest(
        queries=[vector], k=k, filter=search_filter, collection=collection, include_copy_features=True,
    )
    if copy_features and feature_candidates:
        request.copy_query_features = copy_features
        request.feature_candidates = feature_candidates
    return request


def check_filter_numbers(search_filter: search_pb2.Filter) -> None:
    """INVALID_ARGUMENT for a NaN or an infinity among the filter's values: no filter can match one,
    and checking here spares the query's embedding (search_svc checks everything else)."""
    for condition in search_filter.conditions:
        value = condition.value
        values = value.list_value.values if value.WhichOneof("kind") == "list_value" else (value,)
        for one in values:
            if one.WhichOneof("kind") == "number_value" and not math.isfinite(one.number_value):
                raise invalid_argument(f"filter value for {condition.field!r} must be finite, got {one.number_value}")


@dataclass(frozen=True)
class SearchQuery:
    request: gateway_pb2.VisualSearchRequest
    k: int
    min_score: float | None
    crop: embedder_pb2.CropBox | None
    # Of the query image; "" for an item_id or text query.
    image_sha256: str
    # The model the query embedding is (to be) made by: part of the embedding's cache key.
    model_version: str
    # A text query's text, normalised, and its sha256; "" otherwise.
    text: str = ""
    text_sha256: str = ""
    # A text query's expansion by its first hits (GATEWAY_TEXT_EXPANSION__*); None: searched once.
    expansion: TextExpansionSettings | None = None
    # Copy mode (SEARCH_MODE_COPY): how many similar-mode hits are verified as copies; 0 in similar mode.
    copy_shortlist: int = 0
    # Copy mode: hits after the shortlist verified when it holds no copy, and the agreeing features
    # each of them needs to be one (GATEWAY_COPY_SEARCH__SECOND_LOOK*).
    copy_second_look: int = 0
    copy_second_look_min_inliers: int = 0
    # Copy mode: items outside the shortlist sharing the most local features with the query, verified
    # too (GATEWAY_COPY_SEARCH__FEATURE_CANDIDATES).
    copy_feature_candidates: int = 0
    # The ranked hits this request asks for (its page), and what makes it the same query as another.
    page: Page = Page(0, 10, 10)
    fingerprint: bytes = b""
    # The page_token it came with; None for a first page.
    page_token: PageToken | None = None

    @classmethod
    def parse(
        cls, request: gateway_pb2.VisualSearchRequest, settings: GatewaySettings, model_version: str
    ) -> SearchQuery:
        """Raises INVALID_ARGUMENT for a request that cannot be searched with."""
        query = request.WhichOneof("query")
        crop = request.crop if request.HasField("crop") else None
        image_sha256 = text = text_sha256 = ""
        # First: a token that is not one is refused whatever else the request says.
        page_token = PageToken.decode(request.page_token) if request.page_token else None
        if page_token is not None and page_token.offset >= settings.max_paging_depth:
            raise invalid_argument(
                f"page_token asks for hits {page_token.offset} deep, beyond GATEWAY_MAX_PAGING_DEPTH "
                f"({settings.max_paging_depth}): search again from the first page"
            )
        if request.mode not in SEARCH_MODES:
            raise invalid_argument(
                f"mode {request.mode} is not a search mode: give SEARCH_MODE_SIMILAR ({gateway_pb2.SEARCH_MODE_SIMILAR}) "
                f"or SEARCH_MODE_COPY ({gateway_pb2.SEARCH_MODE_COPY})"
            )
        copy_mode = request.mode == gateway_pb2.SEARCH_MODE_COPY
        if query is None:
            raise invalid_argument("give an image, an item_id or a text to search with")
        if copy_mode and query == "text":
            raise invalid_argument("copy mode searches with an image or an item_id, not a text: a copy is of an image")
        if query == "text":
            if (problem := text_problem(request.text)) is not None:
                raise invalid_argument(problem)
            if crop is not None:
                raise invalid_argument("crop applies only to image queries")
            text = normalise_text(request.text)
            text_sha256 = hashlib.sha256(text.encode()).hexdigest()
        elif query == "image":
            if not request.image:
                raise invalid_argument("image is empty")
            if len(request.image) > settings.max_image_bytes:
                raise invalid_argument(f"image is {len(request.image)} bytes; the limit is {settings.max_image_bytes}")
            if crop is not None and (crop.width == 0 or crop.height == 0):
                raise invalid_argument("crop width and height must be positive")
            image_sha256 = hashlib.sha256(request.image).hexdigest()
        else:
            if not request.item_id:
                raise invalid_argument("item_id is empty")
            if (problem := id_problem(request.item_id, "item_id")) is not None:
                raise invalid_argument(problem)
            if crop is not None:
                raise invalid_argument("crop applies only to image queries")
        k = request.k if request.HasField("k") else settings.default_k
        if not 1 <= k <= settings.max_k:
            raise invalid_argument(f"k must be 1..{settings.max_k}, not {k}")
        if copy_mode and k > MAX_COPY_CANDIDATES:
            raise invalid_argument(
                f"k must be 1..{MAX_COPY_CANDIDATES} in copy mode (at most that many hits are verified), not {k}"
            )
        min_score = request.min_score if request.HasField("min_score") else None
        if min_score is not None and not math.isfinite(min_score):
            raise invalid_argument("min_score must be a finite number")
        if request.HasField("min_probability"):
            if query == "text":
                raise invalid_argument("min_probability applies only to image and item_id queries: text scores are "
                                       "not calibrated")
            if not 0.0 <= request.min_probability <= 1.0:  # NaN fails too
                raise invalid_argument(f"min_probability must be within [0, 1], not {request.min_probability}")
        check_filter_numbers(request.filter)
        expansion = settings.text_expansion if query == "text" and settings.text_expansion.hits else None
        fingerprint = query_fingerprint(request, text, image_sha256)
        limit = settings.max_paging_depth
        copy_shortlist = 0
        if page_token is not None:
            page_token.check_query(fingerprint)
        if copy_mode:
            # Every page ranks the first page's shortlist: a deeper one could verify other copies, which
            # rank first.
            copy_shortlist = (
                page_token.copy_shortlist if page_token is not None else max(settings.copy_search.shortlist, k)
            )
            if not 1 <= copy_shortlist <= MAX_COPY_CANDIDATES:
                raise invalid_argument("page_token was made for another query: search again from the first page")
            limit = min(limit, copy_shortlist)
        page = Page.of(page_token.offset if page_token is not None else 0, k, limit)
        # Within what one search returns, however deep the page's shortlist.
        second_look = min(settings.copy_search.second_look, MAX_COPY_CANDIDATES - copy_shortlist) if copy_mode else 0
        second_look_min_inliers = settings.copy_search.second_look_min_inliers if second_look else 0
        feature_candidates = settings.copy_search.feature_candidates if copy_mode else 0
        return cls(request, k, min_score, crop, image_sha256, model_version, text, text_sha256, expansion,
                   copy_shortlist, second_look, second_look_min_inliers, feature_candidates, page, fingerprint,
                   page_token)

    @property
    def min_probability(self) -> float | None:
        """Hits below this match_probability are left out (applied by the gateway, after the cache)."""
        return self.request.min_probability if self.request.HasField("min_probability") else None

    @property
    def by_image(self) -> bool:
        return bool(self.image_sha256)

    @property
    def by_text(self) -> bool:
        return bool(self.text_sha256)

    @property
    def copy_mode(self) -> bool:
        return self.copy_shortlist > 0

    @functools.cached_property
    def embedding_key(self) -> str | None:
        """Where the query image's (or text's) embedding is cached; None for an item_id query (its
        vector is in the index)."""
        if self.by_text:
            return text_embedding_cache_key(self.text_sha256, self.model_version)
        return embedding_cache_key(self.image_sha256, self.crop, self.model_version) if self.by_image else None

    @functools.cached_property
    def result_key(self) -> str:
        """Where this query's latest result is cached (with the generation it was computed at)."""
        query_key = self.embedding_key or item_query_key(self.request.collection, self.request.item_id)
        if self.expansion is not None:
            # Another expansion gives another result: gateways sharing Redis with other settings must
            # not serve each other's.
            query_key += f":expanded:{self.expansion.hits}:{self.expansion.weight!r}"
        if self.copy_mode:
            # Another mode gives other hits (and fields); another shortlist depth, other copies.
            query_key += f":copy:{self.copy_shortlist}"
            if self.copy_second_look:
                query_key += f":then:{self.copy_second_look}:{self.copy_second_look_min_inliers}"
            if self.copy_feature_candidates:
                query_key += f":features:{self.copy_feature_candidates}"
        return result_cache_key(query_key, self.page.end - self.page.offset, self.request.filter, self.min_score,
                                self.request.collection, offset=self.page.offset)

    def by_model(self, model_version: str) -> SearchQuery:
        """The same query, its embedding made by another model (the embedder was redeployed)."""
        return dataclasses.replace(self, model_version=model_version)

    def index_request(self, vector: np.ndarray, k: int | None = None) -> search_pb2.SearchRequest:
        """The search of `vector`'s k best hits with this query's collection, filter and min_score; by
        default as deep as the query's page needs (`Page.fetch`)."""
        request = search_pb2.SearchRequest(
            queries=[float_message(search_pb2.Vector, vector)], k=self.page.fetch if k is None else k,
            filter=self.request.filter,
            collection=self.request.collection,
        )
        if self.min_score is not None:
            request.min_score = self.min_score
        return request

    def copy_candidates_request(
        self, vector: np.ndarray, copy_features: bytes = b"", second_look: bool = False
    ) -> search_pb2.SearchRequest:
        """The similar-mode search of `vector` whose hits are verified as copies: `copy_shortlist` deep
        (with `second_look`, `copy_second_look` deeper), with the query's collection and filter, with the
        hits' copy features. Without min_score: a verified copy is kept whatever its cosine (min_score is
        applied after verification, to the other hits only). With the query's `copy_features` (not on a
        second look), also the `copy_feature_candidates` items sharing the most local features with it."""
        k = self.copy_shortlist + (self.copy_second_look if second_look else 0)
        return copy_candidates_search(
            float_message(search_pb2.Vector, vector), k, self.request.collection, self.request.filter,
            copy_features, 0 if second_look else self.copy_feature_candidates,
        )

"""Gateway settings, from ``GATEWAY_*`` environment variables (nested: ``GATEWAY_CACHE__RESULT_TTL_S``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.api_keys import read_key_file
from service_kit.settings import ServiceSettings


class CacheSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Query embeddings depend only on the image bytes, the crop and the model version: keep them long.
    embedding_ttl_s: float = Field(86400.0, gt=0)
    # A result entry is served only while the index is at the generation it was computed at, so it
    # never goes stale; the TTL only bounds memory.
    result_ttl_s: float = Field(600.0, gt=0)
    # Only for the in-process store (no `redis_url`).
    lru_max_entries: int = Field(10_000, ge=1)
    # Upper bound on every Redis call; a slower answer counts as a miss, never a failed search.
    redis_timeout_s: float = Field(0.05, gt=0)
    # After a Redis failure, skip Redis for this long rather than pay the timeout on every call.
    redis_cooldown_s: float = Field(1.0, ge=0)
    # Timeouts alone start that cool-down only once calls have kept timing out, with no answer in
    # between, for this long: a burst of late answers on a loaded machine costs only those calls.
    redis_timeouts_for_s: float = Field(0.5, ge=0)
    # Bound on the shared generation bump (Redis) that acknowledges a write; past it, the write is
    # acknowledged anyway and the bump retried in the background (see gateway/index_generation.py).
    generation_bump_timeout_s: float = Field(1.0, gt=0)
    # Searches reply before their cache writes finish; a store slower than the searches would pile
    # writes up, so beyond this many in flight new ones are skipped (a later miss, never an error).
    max_writes_in_flight: int = Field(256, ge=1)


class HttpLimits(BaseModel):
    """What one HTTP client may hold of the gateway, and for how long (``GATEWAY_HTTP__HEADER_TIMEOUT_S``).
    uvicorn offers only the keep-alive timeout and the head size; the rest is `gateway/http_limits.py`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Until a request's line and headers are all in: from the connection's opening for its first
    # request, from the first byte of each later one. Then 408 (or a quiet close for a connection that
    # never sent a byte).
    header_timeout_s: float = Field(10.0, gt=0)
    # From the end of the headers until the whole body is in, however it trickles; later: 408.
    # At the largest body (http_max_body_bytes, 64 MiB) the default asks for ~0.55 MB/s.
    body_timeout_s: float = Field(120.0, gt=0)
    # How long a connection may sit idle between two requests. Longer than the idle timeout of what
    # reuses connections in front (ingress-nginx's upstream keep-alive and AWS ALB: 60 s; httpx: 5 s):
    # a request sent on a connection the gateway is closing fails, and a proxy answers it 502.
    keepalive_timeout_s: float = Field(75.0, gt=0)
    # Open connections; a request on one beyond this is answered 503 UNAVAILABLE and its connection closed.
    max_connections: int = Field(1000, ge=1)
    # Request line plus headers; a longer head is answered 431 RESOURCE_EXHAUSTED.
    max_header_bytes: int = Field(16 * 1024, ge=1024)


class AuthSettings(BaseModel):
    """API keys with scopes (``GATEWAY_AUTH__KEYS_FILE``); see gateway/api_keys.py."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The keys file `vsearch keys create` writes (JSON lines of name, key id, hash, scopes, created).
    # Unset, and no GATEWAY_API_KEY: no key is checked. A file that does not read refuses the start.
    keys_file: Path | None = None
    # How often the file is checked for changes (one stat; reread only when it changed).
    reload_interval_s: float = Field(2.0, gt=0)

    @field_validator("keys_file")
    @classmethod
    def _keys_file_reads(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_key_file(value)
        return value


class RateLimitSettings(BaseModel):
    """Token buckets per API key, shared through Redis when GATEWAY_REDIS_URL is set (see
    gateway/rate_limit.py). None: that limit is off. Requests without a key are never limited."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Searches per second per key, and how many may come at once (default: one second's worth).
    search_per_s: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    # Image bytes per second per key through AddImages (HTTP POST /v1/images too), and the burst
    # (default: a second's worth, at least GATEWAY_MAX_IMAGE_BYTES).
    write_bytes_per_s: float | None = Field(None, gt=0)
    write_burst_bytes: int | None = Field(None, ge=1)
    # Like the cache's: a slower Redis answer is decided in process, and Redis is skipped for a while.
    redis_timeout_s: float = Field(0.05, gt=0)
    redis_cooldown_s: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _bursts_have_rates(self) -> RateLimitSettings:
        if self.burst is not None and self.search_per_s is None:
            raise ValueError("GATEWAY_RATE_LIMIT__BURST needs GATEWAY_RATE_LIMIT__SEARCH_PER_S")
        if self.write_burst_bytes is not None and self.write_bytes_per_s is None:
            raise ValueError("GATEWAY_RATE_LIMIT__WRITE_BURST_BYTES needs GATEWAY_RATE_LIMIT__WRITE_BYTES_PER_S")
        return self


class CorsSettings(BaseModel):
    """Cross-origin access to the HTTP API for a web page served elsewhere. Off unless origins are given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # JSON list: GATEWAY_CORS__ALLOW_ORIGINS='["https://shop.example"]' ("*" for any origin).
    allow_origins: list[str] = []
    # How long a browser may reuse a preflight's answer.
    max_age_s: int = Field(600, ge=0)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        for origin in values:
            scheme, _, rest = origin.partition("://")
            if origin != "*" and (scheme not in ("http", "https") or not rest or "/" in rest):
                raise ValueError(f"an origin is scheme://host[:port] (no path) or *; got {origin!r}")
        return values


class TextExpansionSettings(BaseModel):
    """Query expansion for text queries (``GATEWAY_TEXT_EXPANSION__HITS``): after the first search, the
    text's unit vector plus `weight` times the mean stored vector of its top `hits` hits is searched
    again, and that answer is the result. A text vector lies away from where the image vectors are; the
    images it finds first pull it into their region (see docs/models.md, "Search by words")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Hits of the first search fed back (m); 0 turns expansion off. A first search with fewer than 2
    # hits is answered as it is.
    hits: int = Field(10, ge=0, le=100)
    # How much the hits' mean vector counts against the text's unit vector.
    weight: float = Field(1.0, gt=0)

    @field_validator("hits")
    @classmethod
    def _hits_to_average(cls, value: int) -> int:
        if value == 1:
            raise ValueError("expansion averages at least 2 hits: give 0 (off) or 2..100")
        return value


# VerifyCopies takes at most this many candidates (embedder.proto), so a copy search verifies at most
# this many hits.
MAX_COPY_CANDIDATES = 1000


class CopySearchSettings(BaseModel):
    """Copy search (``GATEWAY_COPY_SEARCH__SHORTLIST``): SEARCH_MODE_COPY verifies a deeper similar-mode
    shortlist pairwise with the embedder (VerifyCopies), comparing copy features stored at ingest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Ask the embedder for each added image's copy features and store them with the item (a few KiB
    # each, and the embedder's feature extraction). Off: items are stored without them, and copy
    # searches find no copy of them.
    features_at_ingest: bool = True
    # Hits of the similar-mode search that are verified (at least the query's k): a copy that is
    # cropped, mirrored or greyed may rank below the most similar images, so the shortlist is deeper
    # than k. Each candidate costs one pairwise verification in the embedder.
    shortlist: int = Field(30, ge=1, le=MAX_COPY_CANDIDATES)
    # Candidates (the shortlist's first) that the query's mirror image is also checked against; 0: all.
    # A mirrored copy keeps its global look, so its original ranks near the top (on transformed Caltech
    # copies: every mirrored copy's original within the first 10), and the mirror check is a third of
    # the verification's cost.
    mirror_depth: int = Field(10, ge=0, le=MAX_COPY_CANDIDATES)
    # When the shortlist holds no copy: this many more hits (ranked after it) are verified, each a copy
    # with at least `second_look_min_inliers` agreeing features; 0 (the default): no second look. An
    # original cropped to half its side or less can rank far down a large catalog's similarity order
    # (on Caltech-101 copies: 8 % of half-side crops beyond 30, 4 % beyond 100). Off by default: every
    # search whose shortlist holds no copy pays for each candidate (70: copy-mode p50 2.3-2.6x the
    # similar mode's -> 4.5x in `vsearch bench search`, whose copy queries have no copy; see
    # docs/copy-search.md for what it finds).
    second_look: int = Field(0, ge=0, le=MAX_COPY_CANDIDATES)
    # A candidate that far down a similarity order is a copy less often to begin with, so it needs more
    # agreeing features than the embedder's copy_min_inliers (12): at 12, a second look 120 deep took
    # false copies on no-copy queries from 0.8 % to 2.0 %; at 15, 0.9 % (docs/copy-search.md). Below
    # the embedder's copy_min_inliers, that count applies.
    second_look_min_inliers: int = Field(15, ge=1, le=1000)
    # Items outside the shortlist that share the most local features with the query (search_svc's
    # feature index, on either backend) verified as well; only those verified copies are kept. A crop's
    # original can rank far down a similarity order: on 5,425 Caltech-101 photos, 5 of them took
    # half-side crops found from 0.847 to 0.893, with no more false copies (docs/copy-search.md).
    # 0: the shortlist only.
    feature_candidates: int = Field(5, ge=0, le=MAX_COPY_CANDIDATES)

    @model_validator(mode="after")
    def _searchable_depth(self) -> CopySearchSettings:
        if self.shortlist + self.second_look > MAX_COPY_CANDIDATES:
            raise ValueError(f"shortlist + second_look is {self.shortlist + self.second_look}, over the "
                             f"{MAX_COPY_CANDIDATES} hits a search returns")
        return self

    def mirror_depth_after(self, unranked: int) -> int:
        """The mirror depth of a VerifyCopies call whose first `unranked` candidates (feature candidates, a
        batch's earlier items) come before the shortlist: they, and the shortlist's first `mirror_depth`,
        are checked against the query's mirror image (0 stays 0: every candidate)."""
        return self.mirror_depth and unranked + self.mirror_depth


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    port: int = 50051
    # A second gRPC port serving the same API without key checks or rate limits, for callers inside
    # the cluster (the NetworkPolicy keeps the ingress off it); None: not opened.
    internal_port: int | None = None
    embedder_address: str
    search_address: str

    # HTTP/JSON API and web page, served in the same process; port 0 picks a free port.
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Requests with a larger body are refused with 413 before they are read.
    http_max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    http: HttpLimits = HttpLimits()
    # Directories whose images `GET /v1/files?uri=file://...` may serve (the web page's thumbnails).
    # Empty: serve none. JSON list in the environment: GATEWAY_IMAGE_ROOTS='["/data/catalog"]'.
    image_roots: list[Path] = []
    # One key with every scope, beside the keys file (X-API-Key or Authorization: Bearer, on HTTP
    # and on the gRPC port).
    api_key: SecretStr | None = None
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    cors: CorsSettings = CorsSettings()

    # None: an in-process LRU cache (per replica); set it to share the cache between replicas.
    redis_url: str | None = None
    cache: CacheSettings = CacheSettings()

    # Only without Redis (the in-process cache; with Redis the generation is shared through it): how
    # old the index generation used for result-cache lookups may be. 0 asks search_svc on every search
    # (one cheap Stats call), so a write by anyone is seen at once. N > 0 saves that call but a write
    # made straight to search_svc may be missed for up to N ms (writes through this gateway are always
    # seen at once).
    generation_refresh_ms: int = Field(0, ge=0)

    # Readiness: the gateway reports NOT_SERVING (gRPC health, /healthz 503) while the embedder or
    # search_svc has not answered its own health check for longer than `downstream_grace_s`; searches
    # are still served (cached answers need neither). Each is checked every `downstream_check_interval_s`
    # with a deadline of `downstream_check_timeout_s`.
    downstream_grace_s: float = Field(5.0, ge=0)
    downstream_check_interval_s: float = Field(1.0, gt=0)
    downstream_check_timeout_s: float = Field(1.0, gt=0)

    # Deadlines of outbound calls (capped by the caller's own deadline).
    embed_timeout_s: float = Field(10.0, gt=0)
    search_timeout_s: float = Field(5.0, gt=0)
    write_timeout_s: float = Field(30.0, gt=0)

    text_expansion: TextExpansionSettings = TextExpansionSettings()
    copy_search: CopySearchSettings = CopySearchSettings()

    default_k: int = Field(10, ge=1)
    max_k: int = Field(1000, ge=1)
    # How deep the pages of a search reach (VisualSearchRequest.page_token): a page ends at this many
    # hits at most. Each page is searched that deep in search_svc, so keep it at most SEARCH_MAX_K.
    max_paging_depth: int = Field(1000, ge=1)
    # Queries in one SearchBatch call (HTTP POST /v1/search/batch), at most.
    max_batch_queries: int = Field(32, ge=1, le=1000)
    # A response says no_good_match when its best hit's match_probability (calibrated models only) is below this.
    no_good_match_below: float = Field(0.5, ge=0, le=1)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # AddImages sends streamed images downstream in groups of this many (fewer when they are large).
    add_batch_size: int = Field(32, ge=1)
    # AddImages batches in flight at once: the next batch is embedded while the last is upserted.
    add_pipeline_depth: int = Field(2, ge=1, le=16)
    # Searches' calls to the embedder (and to search_svc, per collection, k, filter and min_score) in
    # flight at once. A search that finds them all busy waits, and goes with the others waiting in
    # the next call: one EmbedImages of many images (at most add_batch_size), one Search of many
    # vectors. A lone search never waits. 1 (measured best at 8 and 32 concurrent misses on 2 cores)
    # batches the most; more lets one call's decoding overlap another's inference, in smaller calls.
    query_calls_in_flight: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _internal_port_is_its_own(self) -> GatewaySettings:
        if self.internal_port and self.internal_port in (self.port, self.http_port):
            raise ValueError("GATEWAY_INTERNAL_PORT must differ from GATEWAY_PORT and GATEWAY_HTTP_PORT")
        return self

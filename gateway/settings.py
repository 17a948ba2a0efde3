"""Gateway settings, from ``GATEWAY_*`` environment variables (nested: ``GATEWAY_CACHE__RESULT_TTL_S``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from service_kit.settings import ServiceSettings


class CacheSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Query embeddings depend only on the image bytes, the crop and the model version: keep them long.
    embedding_ttl_s: float = Field(86400.0, gt=0)
    # Result entries are keyed by index generation, so they never go stale; the TTL only bounds memory.
    result_ttl_s: float = Field(600.0, gt=0)
    # Only for the in-process store (no `redis_url`).
    lru_max_entries: int = Field(10_000, ge=1)
    # Upper bound on every Redis call; a slower answer counts as a miss, never a failed search.
    redis_timeout_s: float = Field(0.05, gt=0)
    # After a Redis failure, skip Redis for this long rather than pay the timeout on every call.
    redis_cooldown_s: float = Field(1.0, ge=0)
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
    # How long a connection may sit idle between two requests.
    keepalive_timeout_s: float = Field(5.0, gt=0)
    # Open connections; a request on one beyond this is answered 503 UNAVAILABLE and its connection closed.
    max_connections: int = Field(1000, ge=1)
    # Request line plus headers; a longer head is answered 431 RESOURCE_EXHAUSTED.
    max_header_bytes: int = Field(16 * 1024, ge=1024)


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    port: int = 50051
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
    # When set, HTTP /v1/ calls must carry it (X-API-Key or Authorization: Bearer). gRPC is for
    # internal services and is not checked here.
    api_key: SecretStr | None = None

    # None: an in-process LRU cache (per replica); set it to share the cache between replicas.
    redis_url: str | None = None
    cache: CacheSettings = CacheSettings()

    # How old the index generation used for result-cache lookups may be. 0 asks search_svc on every
    # search (one cheap Stats call), so a write by anyone is seen at once. N > 0 saves that call but a
    # write made through another replica or straight to search_svc may be missed for up to N ms (writes
    # through this gateway are always seen at once).
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

    default_k: int = Field(10, ge=1)
    max_k: int = Field(1000, ge=1)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    # AddImages sends streamed images downstream in groups of this many (fewer when they are large).
    add_batch_size: int = Field(32, ge=1)
    # AddImages batches in flight at once: the next batch is embedded while the last is upserted.
    add_pipeline_depth: int = Field(2, ge=1, le=16)

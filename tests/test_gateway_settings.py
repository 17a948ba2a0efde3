"""The gateway's settings, from GATEWAY_* environment variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("GATEWAY_EMBEDDER_ADDRESS", "embedder:50052")
    monkeypatch.setenv("GATEWAY_SEARCH_ADDRESS", "search:50053")
    monkeypatch.setenv("GATEWAY_HTTP_PORT", "0")
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("GATEWAY_CACHE__RESULT_TTL_S", "30")
    monkeypatch.setenv("GATEWAY_CACHE__REDIS_TIMEOUT_S", "0.2")
    monkeypatch.setenv("GATEWAY_GENERATION_REFRESH_MS", "250")
    settings = GatewaySettings()
    assert (settings.embedder_address, settings.search_address) == ("embedder:50052", "search:50053")
    assert settings.port == 50051 and settings.http_port == 0 and settings.http_host == "127.0.0.1"
    assert settings.redis_url == "redis://cache:6379/0"
    assert settings.cache.result_ttl_s == 30 and settings.cache.redis_timeout_s == 0.2
    assert settings.cache.embedding_ttl_s == 86400 and settings.cache.lru_max_entries == 10000
    assert settings.generation_refresh_ms == 250
    assert (settings.default_k, settings.max_k, settings.add_batch_size) == (10, 1000, 32)
    assert settings.max_image_bytes == 20 * 1024 * 1024
    assert (settings.text_expansion.hits, settings.text_expansion.weight) == (10, 1.0)
    monkeypatch.setenv("GATEWAY_TEXT_EXPANSION__HITS", "0")
    monkeypatch.setenv("GATEWAY_TEXT_EXPANSION__WEIGHT", "0.5")
    assert GatewaySettings().text_expansion.model_dump() == {"hits": 0, "weight": 0.5}
    assert settings.copy_search.model_dump() == {
        "features_at_ingest": True, "shortlist": 30, "mirror_depth": 10, "second_look": 0,
        "second_look_min_inliers": 15, "feature_candidates": 5,
    }
    monkeypatch.setenv("GATEWAY_COPY_SEARCH__FEATURES_AT_INGEST", "false")
    monkeypatch.setenv("GATEWAY_COPY_SEARCH__SHORTLIST", "100")
    monkeypatch.setenv("GATEWAY_COPY_SEARCH__MIRROR_DEPTH", "0")
    monkeypatch.setenv("GATEWAY_COPY_SEARCH__SECOND_LOOK", "900")
    monkeypatch.setenv("GATEWAY_COPY_SEARCH__SECOND_LOOK_MIN_INLIERS", "20")
    monkeypatch.setenv("GATEWAY_COPY_SEARCH__FEATURE_CANDIDATES", "0")
    assert GatewaySettings().copy_search.model_dump() == {
        "features_at_ingest": False, "shortlist": 100, "mirror_depth": 0, "second_look": 900,
        "second_look_min_inliers": 20, "feature_candidates": 0,
    }
    monkeypatch.setenv("GATEWAY_COPY_SEARCH__SECOND_LOOK", "901")
    with pytest.raises(ValidationError, match="shortlist \\+ second_look is 1001, over the 1000 hits a search returns"):
        GatewaySettings()


def test_downstream_addresses_are_required(monkeypatch):
    monkeypatch.delenv("GATEWAY_EMBEDDER_ADDRESS", raising=False)
    monkeypatch.delenv("GATEWAY_SEARCH_ADDRESS", raising=False)
    with pytest.raises(ValidationError) as caught:
        GatewaySettings()
    assert {error["loc"][0] for error in caught.value.errors()} == {"embedder_address", "search_address"}


def test_http_limits_and_readiness_settings(monkeypatch):
    monkeypatch.setenv("GATEWAY_EMBEDDER_ADDRESS", "embedder:50052")
    monkeypatch.setenv("GATEWAY_SEARCH_ADDRESS", "search:50053")
    defaults = GatewaySettings()
    assert (defaults.http.header_timeout_s, defaults.http.body_timeout_s, defaults.http.keepalive_timeout_s) == (
        10.0, 120.0, 75.0)
    assert (defaults.http.max_connections, defaults.http.max_header_bytes) == (1000, 16384)
    assert (defaults.downstream_grace_s, defaults.downstream_check_interval_s,
            defaults.downstream_check_timeout_s) == (5.0, 1.0, 1.0)

    monkeypatch.setenv("GATEWAY_HTTP__HEADER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("GATEWAY_HTTP__BODY_TIMEOUT_S", "30")
    monkeypatch.setenv("GATEWAY_HTTP__KEEPALIVE_TIMEOUT_S", "1")
    monkeypatch.setenv("GATEWAY_HTTP__MAX_CONNECTIONS", "50")
    monkeypatch.setenv("GATEWAY_HTTP__MAX_HEADER_BYTES", "8192")
    monkeypatch.setenv("GATEWAY_DOWNSTREAM_GRACE_S", "3")
    monkeypatch.setenv("GATEWAY_DOWNSTREAM_CHECK_INTERVAL_S", "0.5")
    monkeypatch.setenv("GATEWAY_DOWNSTREAM_CHECK_TIMEOUT_S", "0.25")
    monkeypatch.setenv("GATEWAY_HTTP_PORT", "9000")  # a flat setting beside the nested ones
    settings = GatewaySettings()
    assert (settings.http.header_timeout_s, settings.http.body_timeout_s, settings.http.keepalive_timeout_s) == (
        2.5, 30.0, 1.0)
    assert (settings.http.max_connections, settings.http.max_header_bytes, settings.http_port) == (50, 8192, 9000)
    assert (settings.downstream_grace_s, settings.downstream_check_interval_s,
            settings.downstream_check_timeout_s) == (3.0, 0.5, 0.25)


@pytest.mark.parametrize("name, value", [
    ("GATEWAY_HTTP__HEADER_TIMEOUT_S", "0"), ("GATEWAY_HTTP__BODY_TIMEOUT_S", "-1"),
    ("GATEWAY_HTTP__MAX_CONNECTIONS", "0"), ("GATEWAY_HTTP__MAX_HEADER_BYTES", "100"),
    ("GATEWAY_HTTP__NO_SUCH_LIMIT", "1"), ("GATEWAY_DOWNSTREAM_GRACE_S", "-1"),
    ("GATEWAY_DOWNSTREAM_CHECK_INTERVAL_S", "0"),
    ("GATEWAY_TEXT_EXPANSION__HITS", "1"), ("GATEWAY_TEXT_EXPANSION__HITS", "101"),
    ("GATEWAY_TEXT_EXPANSION__WEIGHT", "0"),
    ("GATEWAY_COPY_SEARCH__SHORTLIST", "0"), ("GATEWAY_COPY_SEARCH__SHORTLIST", "1001"),
    ("GATEWAY_COPY_SEARCH__FEATURES_AT_INGEST", "sometimes"),
])
def test_bad_limits_are_refused(monkeypatch, name, value):
    monkeypatch.setenv("GATEWAY_EMBEDDER_ADDRESS", "embedder:50052")
    monkeypatch.setenv("GATEWAY_SEARCH_ADDRESS", "search:50053")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        GatewaySettings()

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


def test_downstream_addresses_are_required(monkeypatch):
    monkeypatch.delenv("GATEWAY_EMBEDDER_ADDRESS", raising=False)
    monkeypatch.delenv("GATEWAY_SEARCH_ADDRESS", raising=False)
    with pytest.raises(ValidationError) as caught:
        GatewaySettings()
    assert {error["loc"][0] for error in caught.value.errors()} == {"embedder_address", "search_address"}

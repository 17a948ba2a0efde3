"""The settings base class and the one-line refusal to start when a required setting is missing."""

from __future__ import annotations

import sys
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class TracingSettings(BaseModel):
    """Where this service's spans go (``GATEWAY_TRACING__EXPORTER=otlp``); see service_kit/tracing.py.
    "none" (the default) installs nothing: no span is made and requests carry no trace context."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    exporter: Literal["none", "otlp", "console"] = "none"
    # An OpenTelemetry collector's OTLP/gRPC endpoint: http:// is plaintext, https:// TLS.
    otlp_endpoint: str = "http://127.0.0.1:4317"
    # The share of traces this service starts that are recorded; a trace continued from a caller
    # keeps the caller's decision. Unrecorded requests still get trace ids (logs, propagation).
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has. Subclasses set `env_prefix` (e.g. ``EMBEDDER_``); nested
    settings use ``__`` (``SEARCH_MILVUS__URI``)."""

    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = 0
    # After SIGTERM: how long to keep answering while reporting NOT_SERVING (load balancers notice),
    # then how long in-flight calls get to finish.
    drain_seconds: float = 2.0
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Prometheus exposition on this HTTP port; None turns it off (the gateway serves /metrics itself).
    metrics_port: int | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    tracing: TracingSettings = TracingSettings()


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def describe_validation_error(settings_cls: type[BaseSettings], error: ValidationError) -> str:
    """One line naming each bad or missing setting by its environment variable."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    delimiter = settings_cls.model_config.get("env_nested_delimiter") or "__"
    missing, invalid = [], []
    for item in error.errors():
        name = (prefix + delimiter.join(str(part) for part in item["loc"])).upper()
        if item["type"] == "missing":
            missing.append(name)
        elif not item["loc"]:  # a check across settings names them in its message
            invalid.append(item["msg"].removeprefix("Value error, "))
        else:
            invalid.append(f"{name} ({item['msg']})")
    parts = []
    if missing:
        parts.append("missing required setting " + ", ".join(missing))
    if invalid:
        parts.append("invalid setting " + "; ".join(invalid))
    return "; ".join(parts)


def load_settings(settings_cls: type[SettingsT], service: str) -> SettingsT:
    """Reads settings from the environment, or exits with one line saying which ones are wrong."""
    try:
        return settings_cls()
    except ValidationError as error:
        print(f"{service}: refusing to start: {describe_validation_error(settings_cls, error)}", file=sys.stderr)
        raise SystemExit(2) from None

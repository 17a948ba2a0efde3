"""JSON (or plain text) logs on stderr, one line each. A line logged while a traced request runs carries its
`trace_id` and `span_id` (service_kit/tracing.py), the ids to find its trace by, in either format."""

from __future__ import annotations

import json
import logging
import sys
import time

from opentelemetry import trace


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_trace_ids())
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL service logger: message`, then the request's `trace_id=... span_id=...` when it has them."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = _trace_ids()
        if not ids:
            return line
        # After the first line: a traceback's lines stay below the message they belong to.
        first, newline, rest = line.partition("\n")
        return f"{first} " + " ".join(f"{key}={value}" for key, value in ids.items()) + newline + rest


def _trace_ids() -> dict[str, str]:
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {"trace_id": format(span_context.trace_id, "032x"), "span_id": format(span_context.span_id, "016x")}


def configure_logging(service: str, level: str = "INFO", log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_fields(**fields: object) -> dict:
    """`logger.info("msg", extra=log_fields(k=v))` puts k=v into the JSON entry."""
    return {"fields": fields}

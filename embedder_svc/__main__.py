"""`python -m embedder_svc`: the embedder service, configured from EMBEDDER_* environment variables."""

from __future__ import annotations

from embedder_svc.server import create_server
from embedder_svc.settings import EmbedderSettings
from service_kit.server import run_service
from service_kit.settings import load_settings
from service_kit.structured_logging import configure_logging


def main() -> None:
    settings = load_settings(EmbedderSettings, "embedder")
    configure_logging("embedder", settings.log_level, settings.log_format)
    run_service(lambda: create_server(settings))


if __name__ == "__main__":
    main()

"""`python -m embedder_svc`: the embedder service, configured from EMBEDDER_* environment variables."""

from __future__ import annotations

from embedder_svc.server import create_server
from embedder_svc.settings import EmbedderSettings
from service_kit.server import run_service


def main() -> None:
    run_service("embedder", EmbedderSettings, create_server)


if __name__ == "__main__":
    main()

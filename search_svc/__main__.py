"""`python -m search_svc`: the vector search service, configured by `SEARCH_*` environment variables."""

from __future__ import annotations

from search_svc.server import create_server
from search_svc.settings import SearchSettings
from service_kit.server import run_service
from service_kit.settings import load_settings
from service_kit.structured_logging import configure_logging


def main() -> None:
    settings = load_settings(SearchSettings, "search_svc")
    configure_logging("search_svc", settings.log_level, settings.log_format)
    run_service(lambda: create_server(settings))


if __name__ == "__main__":
    main()

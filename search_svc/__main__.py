"""`python -m search_svc`: the vector search service, configured by `SEARCH_*` environment variables."""

from __future__ import annotations

from search_svc.server import create_server
from search_svc.settings import SearchSettings
from service_kit.server import run_service


def main() -> None:
    run_service("search_svc", SearchSettings, create_server)


if __name__ == "__main__":
    main()

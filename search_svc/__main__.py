"""`python -m search_svc`: the vector search service, configured by `SEARCH_*` environment variables."""

from __future__ import annotations

import os

# Before faiss loads OpenMP: idle OpenMP threads sleep instead of spinning after every search.
# Spinning took 0.3 of the 2 cores at 45 searches/s (`vsearch bench search`: search_svc 0.59 -> 0.25
# cores, cache-miss p50 20.8 -> 14.2 ms) and starved the embedder beside it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from search_svc.server import create_server  # noqa: E402
from search_svc.settings import SearchSettings  # noqa: E402
from service_kit.server import run_service  # noqa: E402


def main() -> None:
    run_service("search_svc", SearchSettings, create_server)


if __name__ == "__main__":
    main()

"""The gateway: the front door of vsearch, serving vsearch.v1.VisualSearch over gRPC and the same
operations over HTTP/JSON (plus a small web page) from one process and one asyncio loop.

- `core.VisualSearchCore`: the one implementation (search, ingest, delete, stats); `servicer` (gRPC)
  and `http_api` (FastAPI, with `http_models` for its JSON) are thin adapters over it.
- `search_query.SearchQuery`: a validated Search request and the cache keys it reads and writes.
- `downstream.Downstream`: the calls to the embedder and search_svc, one method each, with deadlines.
- `cache`: query embeddings and whole results, in Redis or an in-process LRU; never a reason to fail.
- `index_generation`: result-cache entries are keyed by search_svc's index generation, which changes
  on every write, so a cached result is never served for an index that has changed since.
- `metrics`: the gateway's own Prometheus metrics (cache, HTTP).
- `local_files`: the catalog's `file://` images that the web page may show.
- `server.create_server(settings)`: the ManagedServer (gRPC port) with `.http_port`; `settings`: GATEWAY_*.
"""

"""The gateway: the front door of vsearch, serving vsearch.v1.VisualSearch over gRPC and the same
operations over HTTP/JSON (plus a small web page) from one process and one asyncio loop.

- `core.VisualSearchCore`: the one implementation (validation, caching, calls to the embedder and
  search_svc with deadlines); `servicer` (gRPC) and `http_api` (FastAPI) are thin adapters over it.
- `cache`: query embeddings and whole results, in Redis or an in-process LRU; never a reason to fail.
- `index_generation`: result-cache entries are keyed by search_svc's index generation, which changes
  on every write, so a cached result is never served for an index that has changed since.
- `server.create_server(settings)`: the ManagedServer (gRPC port) with `.http_port`.
"""

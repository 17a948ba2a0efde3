"""`vsearch bench`: ingest, search, ANN and embedder benchmarks that print tables and write JSON."""

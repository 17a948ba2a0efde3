"""The embedder service: encoded images in, L2-normalised embeddings out (vsearch.v1.Embedder)."""

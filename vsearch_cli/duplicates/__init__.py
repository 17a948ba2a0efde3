"""`vsearch duplicates`: near-duplicate groups of a catalog, in three tiers (exact bytes, verified copies,
similar above a threshold), found through the gateway."""

"""Loading a catalog: `vsearch index` (folders or manifests) and `vsearch delete`."""

"""Generated gRPC contracts (vsearch.v1); produced by scripts/gen-protos, never edited by hand."""

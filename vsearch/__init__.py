"""vsearch's client-facing package: the generated gRPC contracts (`vsearch.v1`, from protos/). The
command line and its tooling live in `vsearch_cli`."""

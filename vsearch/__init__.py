"""vsearch's client-facing package: the generated gRPC contracts (`vsearch.v1`, from protos/) and the
typed Python client of the gateway (`vsearch.client`, docs/client.md). The command line and its tooling
live in `vsearch_cli`."""

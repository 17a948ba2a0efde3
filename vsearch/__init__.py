"""vsearch: visual search over gRPC microservices. This package holds the command line and the
generated contracts (`vsearch.v1`)."""

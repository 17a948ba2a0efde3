"""Plumbing every vsearch service shares: settings, logging, gRPC server lifecycle (health, reflection,
drain on SIGTERM), metrics, traces, status-code mapping, lenient request parsing (a request that cannot be
parsed is INVALID_ARGUMENT), the metadata nesting cap and outbound channels."""

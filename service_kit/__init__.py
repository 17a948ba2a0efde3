"""Plumbing every vsearch service shares: settings, logging, gRPC server lifecycle (health, reflection,
drain on SIGTERM), metrics, status-code mapping and outbound channels."""

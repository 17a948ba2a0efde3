"""How the command line reaches the gateway: its address and API key (`--gateway` / `--api-key`, or
VSEARCH_GATEWAY / VSEARCH_API_KEY), a client of it (vsearch.client, which sends the key with every
call), and the one line a gateway error is reported as."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from vsearch.client import AsyncVisualSearchClient, VisualSearchClient, VsearchError

DEFAULT_GATEWAY = "127.0.0.1:50051"


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", default=os.environ.get("VSEARCH_GATEWAY") or DEFAULT_GATEWAY,
                        help=f"the gateway's gRPC address (default $VSEARCH_GATEWAY or {DEFAULT_GATEWAY})")
    parser.add_argument("--api-key", default=os.environ.get("VSEARCH_API_KEY") or None,
                        help="the API key for a gateway that checks keys (default $VSEARCH_API_KEY)")


def gateway_client(args: argparse.Namespace, **settings: Any) -> VisualSearchClient:
    """A blocking client of the gateway `args` name (a command's --gateway and --api-key)."""
    return VisualSearchClient(args.gateway, api_key=args.api_key, **settings)


def async_gateway_client(gateway: str, api_key: str | None, **settings: Any) -> AsyncVisualSearchClient:
    """An asyncio client of `gateway` (commands that keep many calls in flight)."""
    return AsyncVisualSearchClient(gateway, api_key=api_key, **settings)


def gateway_failure(gateway: str, error: VsearchError) -> str:
    """A gateway call's failure as every command words it, on one line: "gateway ADDRESS: CODE: message"."""
    return " ".join(f"gateway {gateway}: {error}".split("\n"))


def report_gateway_failure(command: str, gateway: str, error: VsearchError) -> int:
    """Prints the failure as one line on stderr, "vsearch COMMAND: gateway ADDRESS: CODE: message", and
    returns the exit status of a command the gateway failed (1)."""
    print(f"vsearch {command}: {gateway_failure(gateway, error)}", file=sys.stderr)
    return 1

"""`python -m gateway`: settings from GATEWAY_* environment variables; drains on SIGTERM."""

from __future__ import annotations

from gateway.server import create_server
from gateway.settings import GatewaySettings
from service_kit.server import run_service


def main() -> None:
    run_service("gateway", GatewaySettings, create_server)


if __name__ == "__main__":
    main()

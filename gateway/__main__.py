"""`python -m gateway`: settings from GATEWAY_* environment variables; drains on SIGTERM."""

from __future__ import annotations

from gateway.server import create_server
from gateway.settings import GatewaySettings
from service_kit.server import run_service
from service_kit.settings import load_settings
from service_kit.structured_logging import configure_logging


def main() -> None:
    settings = load_settings(GatewaySettings, "gateway")
    configure_logging("gateway", settings.log_level, settings.log_format)
    run_service(lambda: create_server(settings))


if __name__ == "__main__":
    main()

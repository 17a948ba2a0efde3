"""Container health check over the gRPC health protocol (grpc.health.v1), using what every service
image already has (grpcio-health-checking), so the images need neither curl nor grpc_health_probe.

    python healthcheck.py PORT_VARIABLE DEFAULT_PORT

asks 127.0.0.1 on the port named by the environment variable (the service's own setting, e.g.
GATEWAY_PORT) for the overall status, and exits 0 only when it is SERVING. The services report
NOT_SERVING until their model or index is ready and again while draining, so this is a readiness
check: Docker marks the container unhealthy during a drain, which is what `depends_on` should see."""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 2.0


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: healthcheck.py PORT_VARIABLE DEFAULT_PORT", file=sys.stderr)
        return 2
    port = os.environ.get(argv[1]) or argv[2]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            print(f"health check on port {port} failed: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"port {port}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

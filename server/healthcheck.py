"""A health probe for containers: asks a Ferry's grpc.health.v1 service whether it is
SERVING, and exits 0 if so, 1 if not. The Dockerfile's HEALTHCHECK runs it, since no
grpc_health_probe binary can be installed from a package registry.

    python -m ferry.server.healthcheck [ADDRESS] [--service NAME] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """The status name the health service reports, or the gRPC error's code name."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
            return str(code.name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "address", nargs="?", default="127.0.0.1:8001", help="host:port (default: %(default)s)"
    )
    parser.add_argument("--service", default="", help='service name (default: "", the server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout)
    if status != "SERVING":
        print(f"ferry health: {args.address} is {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A health probe for containers: asks a Ferry's grpc.health.v1 service whether it is
SERVING, and exits 0 if so, 1 if not. The Dockerfile's HEALTHCHECK runs it, since no
grpc_health_probe binary can be installed from a package registry.

    python -m ferry.server.healthcheck [ADDRESS] [--service NAME] [--timeout SECONDS]

Also the service itself (`HealthService`, registered by `add_health_service`), in place of
grpcio-health-checking's asyncio servicer. That one shares one `asyncio.Condition` among
the watchers of a service and deletes it when any one of them leaves, so the others never
hear of a change again (NOT_SERVING at drain included), and writes to a watcher while
holding it, so a watcher that stops reading holds up every status change. Here a change
wakes every watcher through a fresh event, and a watcher holds nothing while it writes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .errors import cut
from .wire import MalformedMessage, tolerant

SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# An unknown service's name is quoted in the NOT_FOUND message up to this many characters.
MAX_QUOTED_NAME_CHARS = 200


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped base
    """Check and Watch over a table of service statuses that the app keeps up to date.
    The same `set` and `enter_graceful_shutdown` as grpcio-health-checking's servicer."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        # Set, then replaced, at every change: a watcher waits on the one current when it
        # last read the table, so no change between its read and its wait is missed.
        self._changed = asyncio.Event()
        self._shutting_down = False
        self._reported: set[str] = set()

    async def Check(self, request: Any, context: Any) -> health_pb2.HealthCheckResponse:
        if isinstance(request, MalformedMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, _unknown(request.service))
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Any) -> None:
        """The service's status now, then at every change, until the client leaves.
        An unknown service is SERVICE_UNKNOWN (and may become known later), as the
        health protocol asks."""
        if isinstance(request, MalformedMessage):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        service = request.service
        sent: int | None = None
        while True:
            changed = self._changed
            status = self._status.get(service, SERVICE_UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            await changed.wait()

    async def set(self, service: str, status: int) -> None:
        """Report `service` as `status`; ignored once the server drains."""
        if not self._shutting_down:
            self._set(service, status)

    async def report(self, statuses: Mapping[str, int]) -> None:
        """Set every service's status at once. A service reported before and left out now
        (a model removed from the repository, which no `set` would name again) becomes
        NOT_SERVING rather than keep saying SERVING. Ignored once the server drains."""
        if self._shutting_down:
            return
        for service in self._reported - statuses.keys():
            self._set(service, NOT_SERVING)
        for service, status in statuses.items():
            self._set(service, status)
        self._reported |= statuses.keys()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good: later `set` calls are ignored."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in list(self._status):
            self._set(service, NOT_SERVING)

    def _set(self, service: str, status: int) -> None:
        if self._status.get(service) == status:
            return
        self._status[service] = status
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


def _unknown(service: str) -> str:
    quoted = cut(service, MAX_QUOTED_NAME_CHARS - 3)
    return (
        f"unknown service {quoted!r}: this server reports '' (the server), "
        "'inference.GRPCInferenceService' and each model's name"
    )


def add_health_service(service: HealthService, server: grpc.aio.Server) -> None:
    """Register `service` as grpc.health.v1.Health on `server`; a request that is not a
    valid HealthCheckRequest gets INVALID_ARGUMENT instead of gRPC's UNKNOWN."""
    parse = tolerant(health_pb2.HealthCheckRequest.FromString, "HealthCheckRequest")
    serialize = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            service.Check, request_deserializer=parse, response_serializer=serialize
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            service.Watch, request_deserializer=parse, response_serializer=serialize
        ),
    }
    name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


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

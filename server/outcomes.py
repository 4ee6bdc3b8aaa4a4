"""A finished inference request, reported once to everyone who counts it.

The data plane builds one `RequestOutcome` per request, whatever the protocol and however
it ended, and hands it to one list of observers: the model's statistics, the metrics, the
rejection log and the access log.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from .errors import Status


class RequestOutcome(NamedTuple):  # one per request: a tuple is the cheapest record to build
    model: str  # "" when the request named no model that is loaded
    version: str
    status: Status
    duration_ns: int
    message: str = ""  # what the caller was told, when it failed
    protocol: str = "grpc"

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


class OutcomeObserver(Protocol):
    def request_finished(self, outcome: RequestOutcome) -> None: ...


class RefusalHook(Protocol):
    """Told of a call refused before it reached the data plane: a missing API key, a
    message that is not valid protobuf, the server's RPC limit. `method` is gRPC's full
    method name; the hook decides which calls count as inference requests."""

    def __call__(self, method: str, status: Status, message: str) -> None: ...

"""The one exception the client raises: a gRPC status code and the server's message."""

from __future__ import annotations

import grpc


class FerryClientError(Exception):
    """A call that did not succeed; `code` is the gRPC status, `message` the reason.

    Calls that never reached a server (refused connection, unknown host) raise it too,
    with code UNAVAILABLE; a call past its timeout has code DEADLINE_EXCEEDED.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"FerryClientError({self.code.name}, {self.message!r})"


def from_rpc_error(error: grpc.RpcError) -> FerryClientError:
    """Translate grpc's exception (sync or asyncio flavour) into FerryClientError."""
    # Every RpcError raised by a call has code() and details(); the bare base class does not.
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else None
    return FerryClientError(code, details or str(error))

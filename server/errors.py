"""Ferry's errors: one exception type with a transport-neutral kind.

The protocol layer owns the one table that turns a kind into a gRPC status; everything
below it raises FerryError and never imports grpc.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_INPUT = "invalid input"
    NOT_FOUND = "not found"
    QUEUE_FULL = "queue full"
    RESOURCE_EXHAUSTED = "resource exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline exceeded"
    CANCELLED = "cancelled"
    PERMISSION_DENIED = "permission denied"
    UNAUTHENTICATED = "unauthenticated"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"


class FerryError(Exception):
    """An error whose message is safe to show the caller."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"FerryError({self.kind.name}, {self.message!r})"


def invalid_input(message: str) -> FerryError:
    return FerryError(ErrorKind.INVALID_INPUT, message)


def not_found(message: str) -> FerryError:
    return FerryError(ErrorKind.NOT_FOUND, message)


def unavailable(message: str) -> FerryError:
    return FerryError(ErrorKind.UNAVAILABLE, message)

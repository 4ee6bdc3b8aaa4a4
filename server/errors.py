"""Ferry's errors: one exception type with a transport-neutral kind, the status each kind
ends a request with, and the scrubbing of file-system paths from what a caller reads.

The protocol layer turns a Status into its wire form (a gRPC status code); everything
below it raises FerryError and never imports grpc.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path


def cut(text: str, limit: int) -> str:
    """`text` as a message quotes it: past `limit` characters, its first `limit` and
    "...". What a caller (or a config) sends may be megabytes long."""
    return text if len(text) <= limit else text[:limit] + "..."


class Status(enum.Enum):
    """How a request ended, named as the Open Inference Protocol's gRPC binding names it."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class ErrorKind(enum.Enum):
    INVALID_INPUT = "invalid input"
    NOT_FOUND = "not found"
    QUEUE_FULL = "queue full"
    TOO_LARGE = "too large"  # an answer over the message size limit
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline exceeded"
    PERMISSION_DENIED = "permission denied"
    INTERNAL = "internal"

    @property
    def status(self) -> Status:
        return _STATUS_OF_KIND[self]


# The kinds of a failed run that its request caused (values the model refuses, a run past
# --max-run-memory): the caller's errors, not the server's.
CALLERS_RUN_ERRORS = frozenset({ErrorKind.INVALID_INPUT, ErrorKind.TOO_LARGE})

_STATUS_OF_KIND = {
    ErrorKind.INVALID_INPUT: Status.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: Status.NOT_FOUND,
    ErrorKind.QUEUE_FULL: Status.RESOURCE_EXHAUSTED,
    ErrorKind.TOO_LARGE: Status.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: Status.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: Status.DEADLINE_EXCEEDED,
    ErrorKind.PERMISSION_DENIED: Status.PERMISSION_DENIED,
    ErrorKind.INTERNAL: Status.INTERNAL,
}


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


_ABSOLUTE_PATH = re.compile(r"(?:^|(?<=[\s'\"(\[=:,]))/[^\s'\"()\[\],;:]*")


def public_message(text: str, repository: Path) -> str:
    """A message fit for a caller: paths inside the model repository become relative to it,
    any other absolute path becomes `<path>`. Logs keep the original."""
    root = str(repository)
    text = text.replace(root + "/", "").replace(root, "<model repository>")
    return _ABSOLUTE_PATH.sub("<path>", text)

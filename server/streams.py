"""Backpressure for `ModelStreamInfer`: the answers of one stream that are not yet sent.

A client may write requests and never read the answers. The stream then stops reading
its requests while too many are unanswered or unsent (`StreamLimits`), so that gRPC's
flow control pushes back on the client, instead of the server queueing without end.
Event-loop code only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_MAX_STREAM_PENDING = 128
DEFAULT_MAX_STREAM_PENDING_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per stream: how many requests may be running or answered but unsent, and how many
    bytes of unsent answers may wait, before the stream stops reading requests."""

    max_pending: int = DEFAULT_MAX_STREAM_PENDING
    max_pending_bytes: int = DEFAULT_MAX_STREAM_PENDING_BYTES

    def __post_init__(self) -> None:
        if self.max_pending < 1 or self.max_pending_bytes < 1:
            raise ValueError(f"stream limits must be >= 1, got {self}")


class ReplyQueue(Generic[T]):
    """Replies of one stream in the order they are ready, and the gate on reading more.

    One reader and one writer: the reader awaits `room()` before it takes a request and
    calls `started()` once it has; `put()` queues a request's reply; the writer `get()`s
    replies (None once `finish()` was called and all are sent) and calls `sent()` after
    each has gone out."""

    def __init__(self, limits: StreamLimits) -> None:
        self._limits = limits
        self._replies: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._pending = 0  # taken, not yet sent
        self._finished = False
        self._reader: asyncio.Future[None] | None = None  # waits in room()
        self._writer: asyncio.Future[None] | None = None  # waits in get()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def unsent_bytes(self) -> int:
        return self._bytes

    def _has_room(self) -> bool:
        limits = self._limits
        return self._pending < limits.max_pending and self._bytes < limits.max_pending_bytes

    async def room(self) -> None:
        while not self._has_room():
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None

    def started(self) -> None:
        self._pending += 1

    def put(self, reply: T, size: int) -> None:
        self._replies.append((reply, size))
        self._bytes += size
        _wake(self._writer)

    def finish(self) -> None:
        self._finished = True
        _wake(self._writer)

    async def get(self) -> T | None:
        while not self._replies:
            if self._finished:
                return None
            self._writer = asyncio.get_running_loop().create_future()
            try:
                await self._writer
            finally:
                self._writer = None
        reply, size = self._replies.popleft()
        self._bytes -= size
        return reply

    def sent(self) -> None:
        self._pending -= 1
        _wake(self._reader)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)

"""`--max-concurrent-rpcs` and the REST port's `--max-connections` for the whole of
`ferry serve --workers N`.

The kernel spreads connections over the frontends at random, so a limit kept by each
frontend alone would let N times the calls in. Instead the supervisor creates one small
shared page per limit (a memfd: nothing is left in /dev/shm, whatever way the processes
end) with one 8-byte count per frontend, and every frontend maps it. A frontend writes
only its own count, on its event loop's thread; it admits a call (or a connection) when
the sum of all counts, its new one included, is within the limit.

Two frontends that admit a call at the same instant may each miss the other's new call,
so the limit can be passed by at most one call per other frontend, for that instant.
A frontend that dies with calls in flight leaves its count behind: the supervisor sets
it back to zero before it starts the frontend again.
"""

from __future__ import annotations

import mmap
import os

_COUNT_BYTES = 8


def create_call_counts(frontends: int, name: str = "ferry-call-counts") -> int:
    """A memfd holding one zeroed count per frontend; the caller owns the descriptor
    and hands it to each frontend (`pass_fds`)."""
    if frontends < 1:
        raise ValueError(f"frontends must be >= 1, got {frontends}")
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, frontends * _COUNT_BYTES)
    return fd


class CallCounts:
    """The counts of every frontend, mapped from the supervisor's memfd."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size < _COUNT_BYTES or size % _COUNT_BYTES:
            raise ValueError(f"descriptor {fd} is not a table of call counts ({size} bytes)")
        self._map = mmap.mmap(fd, size)
        self._counts = memoryview(self._map).cast("q")

    @property
    def frontends(self) -> int:
        return len(self._counts)

    def total(self) -> int:
        return sum(self._counts)

    def of(self, index: int) -> int:
        return self._counts[index]

    def add(self, index: int, delta: int) -> None:
        """Only frontend `index` calls this while it runs (the supervisor, once it died)."""
        self._counts[index] += delta

    def reset(self, index: int) -> None:
        self._counts[index] = 0


class SharedCallSlots:
    """`security.CallSlots` for one frontend of several: the same `take`/`give_back`,
    counted in the shared table. Used on the frontend's event loop only."""

    def __init__(self, limit: int, counts: CallCounts, index: int) -> None:
        if limit < 1:
            raise ValueError(f"max concurrent RPCs must be >= 1, got {limit}")
        if not 0 <= index < counts.frontends:
            raise ValueError(f"frontend {index} has no count (the table holds {counts.frontends})")
        self.limit = limit
        self._counts = counts
        self._index = index

    @property
    def in_use(self) -> int:
        """Calls in flight in the whole server, every frontend's."""
        return self._counts.total()

    def take(self) -> bool:
        """Take a place; False when the server has none. Counted first and checked after,
        so that two frontends admitting at once see each other more often than not."""
        counts, index = self._counts, self._index
        counts.add(index, 1)
        if counts.total() > self.limit:
            counts.add(index, -1)
            return False
        return True

    def give_back(self) -> None:
        self._counts.add(self._index, -1)

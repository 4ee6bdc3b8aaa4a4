"""The hand-off between a frontend process and the executor process: tensors in shared
memory, small descriptors on a Unix socket.

Each frontend creates two anonymous shared-memory regions (memfd, so no name ever
appears in /dev/shm and the kernel frees them when the last process holding them exits,
`kill -9` included) and passes their file descriptors to the executor over the socket
(SCM_RIGHTS). The frontend writes requests' inputs into the request region; the executor
writes each request's output rows into the response region. Each region has one writer,
which allocates from it (`BlockAllocator`), and one reader, which reads the tensors in
place and tells the writer to release a block when its last view of it dies.

So a request costs one copy into shared memory each way (inputs after decoding, outputs
after the batch ran); the batch gather and the protobuf encode copy exactly as in one
process. A tensor that does not fit (or holds Python objects: BYTES) travels inside the
descriptor message instead.

Messages are plain tuples, pickled a list at a time: everything queued during one turn of
the event loop goes out as one frame (an 8-byte length, then the pickle). Releases and
outcome reports wait for the next frame (at most LAZY_FLUSH_S).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import mmap
import os
import pickle
import socket
import struct
import threading
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from math import prod
from typing import Any, cast

import numpy as np

from .rows import Array, Tensors

ALIGN = 64  # bytes: every block and tensor starts on a cache line
DEFAULT_REGION_BYTES = 32 * 1024 * 1024

# Frontend -> executor
SUBMIT = 1  # (SUBMIT, id, model, version, inputs, outputs, rows, shape_key, deadline, prio)
CANCEL = 2  # (CANCEL, id)
RELEASE = 3  # (RELEASE, block offsets of the response region the frontend is done with)
OUTCOMES = 4  # (OUTCOMES, [(model, version, status, duration_ns, message, protocol)])
STATISTICS = 5  # (STATISTICS, query id)
FLUSHED = 6  # (FLUSHED, token): everything before this was sent
# Executor -> frontend
CATALOG = 10  # (CATALOG, [(name, version, settings)], known names, index entries)
RESULT = 11  # (RESULT, id, outputs, response block or -1)
ERROR = 12  # (ERROR, id, ErrorKind value, message)
RELEASED = 13  # (RELEASED, block offsets of the request region the executor is done with)
STATISTICS_REPLY = 14  # (STATISTICS_REPLY, query id, [serialized ModelStatistics])
FLUSH = 15  # (FLUSH, token): send what waits now, then FLUSHED

# Releases and outcomes are not urgent: they ride along with the next message, or go
# after this long when there is none, so an idle request costs no extra wake-ups.
LAZY_FLUSH_S = 0.005

# A tensor as it travels: (name, dtype, shape, offset within the block) in shared
# memory, or (name, None, None, array) inline.
Descriptor = tuple[str, str | None, tuple[int, ...] | None, Any]

# 8 bytes: a frame of large inline tensors may pass 4 GiB.
_LENGTH = struct.Struct("<Q")


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def peer_is_related(sock: socket.socket) -> bool:
    """Whether the process at the other end of a Unix socket is one of ours: same user,
    and our parent, our child or a sibling. The socket's name is no secret (it is on the
    command line), and the messages are pickles: nobody else may talk on it."""
    pid, uid, _ = _PEER_CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    )
    if uid != os.getuid():
        return False
    return pid == os.getppid() or _parent_of(pid) in (os.getppid(), os.getpid())


class Region:
    """A shared-memory region mapped into this process."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size)

    @classmethod
    def create(cls, name: str, size: int) -> Region:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size)

    def close(self) -> None:
        """Close the descriptor; the mapping stays (and so does its memory)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def unmap(self) -> None:
        """The peer is gone: close the descriptor and let the mapping go, at once or when
        the last view of it dies, not whenever the garbage collector next finds this
        object in a cycle. Nothing may use the region after this."""
        self.close()
        mapping = self.__dict__.pop("map", None)
        if mapping is not None:
            with contextlib.suppress(BufferError):  # views still show it: theirs now
                mapping.close()


class BlockAllocator:
    """Blocks of one region, first fit; a block may be freed in any order, and its space is
    free again at once, whatever is still live around it (a request held for seconds in a
    queue must not keep everyone else's tensors out of the region). Not thread-safe: the
    event loop's."""

    def __init__(self, size: int) -> None:
        self.size = size
        # The free gaps, sorted and never adjacent: [_starts[i], _ends[i]).
        self._starts: list[int] = [0]
        self._ends: list[int] = [size]
        self._live: dict[int, int] = {}  # block offset -> its aligned length

    @property
    def live_blocks(self) -> int:
        return len(self._live)

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a free block of `nbytes`, or None when there is no room now."""
        n = _aligned(max(nbytes, 1))
        starts, ends = self._starts, self._ends
        for index, start in enumerate(starts):
            room = ends[index] - start
            if room < n:
                continue
            if room == n:
                del starts[index], ends[index]
            else:
                starts[index] = start + n
            self._live[start] = n
            return start
        return None

    def free(self, offset: int) -> None:
        n = self._live.pop(offset, None)
        if n is None:
            return  # not a live block: a release told twice changes nothing
        end = offset + n
        starts, ends = self._starts, self._ends
        index = bisect.bisect_left(starts, offset)
        joins_before = index > 0 and ends[index - 1] == offset
        joins_after = index < len(starts) and starts[index] == end
        if joins_before and joins_after:
            ends[index - 1] = ends[index]
            del starts[index], ends[index]
        elif joins_before:
            ends[index - 1] = end
        elif joins_after:
            starts[index] = offset
        else:
            starts.insert(index, offset)
            ends.insert(index, end)


def write_tensors(
    region: Region, allocator: BlockAllocator, tensors: Mapping[str, Array]
) -> tuple[tuple[Descriptor, ...], int]:
    """Copy tensors into one block of the region; returns their descriptors and the
    block (-1 when nothing went to shared memory: no room, or Python objects)."""
    total = 0
    for array in tensors.values():
        if array.dtype.hasobject:
            return tuple((name, None, None, array) for name, array in tensors.items()), -1
        total += _aligned(array.nbytes)
    block = allocator.allocate(total) if total else None
    if block is None:
        return tuple((name, None, None, array) for name, array in tensors.items()), -1
    descriptors: list[Descriptor] = []
    position = 0
    memory = region.map
    for name, array in tensors.items():
        target: Array = np.ndarray(array.shape, array.dtype, buffer=memory, offset=block + position)
        target[...] = array
        descriptors.append((name, array.dtype.str, array.shape, position))
        position += _aligned(array.nbytes)
    return tuple(descriptors), block


def read_tensors(
    region: Region,
    descriptors: tuple[Descriptor, ...],
    block: int,
    release: Callable[[int], None],
) -> Tensors:
    """Views of tensors in a block, read in place; `release(block)` is called once the
    last of them is gone (from whichever thread drops it)."""
    if block < 0:
        return {name: value for name, _, _, value in descriptors}
    layout = []
    end = 0
    for name, dtype, shape, position in descriptors:
        kind = np.dtype(dtype)
        nbytes = prod(shape) * kind.itemsize  # type: ignore[arg-type]
        layout.append((name, kind, shape, position, nbytes))
        end = max(end, position + nbytes)
    # Every view below keeps this array (their base) alive, and nothing else does.
    whole: Array = np.frombuffer(region.map, np.uint8, count=end, offset=block)
    weakref.finalize(whole, release, block)
    return {
        name: whole[position : position + nbytes].view(kind).reshape(shape)
        for name, kind, shape, position, nbytes in layout
    }


class Channel(asyncio.Protocol):
    """Framed messages over a stream socket. `send` goes out at the end of this turn of
    the loop; `send_lazy` and `release_later` (which any thread may call: a view may die
    on an executor thread) ride along with the next frame, or go after LAZY_FLUSH_S."""

    def __init__(
        self,
        on_messages: Callable[[list[Any]], None],
        on_lost: Callable[[], None],
        release_tag: int,
    ) -> None:
        self._on_messages = on_messages
        self._on_lost = on_lost
        self._release_tag = release_tag
        self._buffer = bytearray()
        self._outgoing: list[Any] = []
        self._lazy: list[Any] = []
        self._releases: deque[int] = deque()
        self._flush_scheduled = False
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._arm_requested = False  # a thread asked the loop to arm the lazy timer
        self._lock = threading.Lock()
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.closed = False
        self.flushes = 0  # frames sent so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, whatever its class: uvloop's are not asyncio.Transport's.
        self._transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        self._on_lost()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        frames: list[Any] = []
        header = _LENGTH.size
        while len(buffer) - start >= header:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if len(buffer) - start - header < length:
                break
            body = start + header
            frames.extend(pickle.loads(memoryview(buffer)[body : body + length]))
            start = body + length
        if start:
            del buffer[:start]
        if frames:
            self._on_messages(frames)

    def send(self, message: Any) -> None:
        self._outgoing.append(message)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_lazy(self, message: Any) -> None:
        self._lazy.append(message)
        self._arm()

    def release_later(self, block: int) -> None:
        """Thread-safe: tell the peer a block of its region may be reused."""
        self._releases.append(block)
        loop = self._loop
        if self.closed or loop is None or loop.is_closed():
            return  # a view dying at exit: the peer is gone or going, nobody to tell
        if threading.get_ident() == self._loop_thread:
            self._arm()
            return
        with self._lock:
            if self._arm_requested or self._loop is None or self.closed:
                return
            self._arm_requested = True
        try:
            self._loop.call_soon_threadsafe(self._arm)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    def _arm(self) -> None:
        with self._lock:
            self._arm_requested = False
        if self._flush_scheduled or self._lazy_timer is not None or self._loop is None:
            return
        self._lazy_timer = self._loop.call_later(LAZY_FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        self.flushes += 1
        # What waited goes first: an outcome reported before a statistics query is
        # counted by it.
        messages, self._lazy = self._lazy, []
        messages += self._outgoing
        self._outgoing = []
        if self._releases:
            blocks = []
            while self._releases:
                blocks.append(self._releases.popleft())
            messages.append((self._release_tag, tuple(blocks)))
        if not messages or self._transport is None:
            return
        payload = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
        # Two pieces, not their concatenation: a copy less of a large frame.
        self._transport.writelines((_LENGTH.pack(len(payload)), payload))

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()

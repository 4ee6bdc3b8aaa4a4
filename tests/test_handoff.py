"""The shared-memory hand-off between frontends and the executor: the blocks of a region,
tensors written and read in place, blocks released when their last view dies, and the
inline fallback."""

from __future__ import annotations

import asyncio
import gc
import socket

import numpy as np
import pytest

from ferry.server.errors import ErrorKind, FerryError
from ferry.server.handoff import (
    ALIGN,
    BlockAllocator,
    Channel,
    Region,
    read_tensors,
    write_tensors,
)
from ferry.server.remote import ExecutorLink, RemoteModels


def test_blocks_are_reused_as_soon_as_freed_in_any_order() -> None:
    """First fit over the free gaps, neighbours joined when freed: one block held for a
    long time (a request waiting in a queue) does not keep the space after it from being
    reused, as a ring that reclaims only from its oldest block did."""
    blocks = BlockAllocator(1024)
    a, b, c = (blocks.allocate(300) for _ in range(3))  # 320 bytes each after alignment
    assert (a, b, c) == (0, 320, 640)
    assert blocks.allocate(300) is None  # only [960, 1024) is free
    blocks.free(b)  # out of order: free at once, though a is still live
    assert blocks.allocate(300) == 320
    blocks.free(a)
    blocks.free(320)
    assert blocks.allocate(600) == 0  # a's and b's space, joined
    assert blocks.allocate(64) == 960
    assert blocks.allocate(64) is None
    blocks.free(c)
    blocks.free(0)
    blocks.free(960)
    assert blocks.live_blocks == 0 and blocks.allocate(1024) == 0


def test_a_block_larger_than_the_region_is_refused() -> None:
    assert BlockAllocator(256).allocate(257) is None


def test_tensors_round_trip_through_a_region_and_release_with_their_last_view() -> None:
    region = Region.create("test", 1 << 16)
    blocks = BlockAllocator(region.size)
    inputs = {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ids": np.array([[1], [2], [3]], dtype=np.int64),
        "empty": np.zeros((3, 0), dtype=np.float16),
    }
    descriptors, block = write_tensors(region, blocks, inputs)
    assert block >= 0 and all(d[1] is not None for d in descriptors)
    assert all(d[3] % ALIGN == 0 for d in descriptors)
    # The reader maps the same memory through its own descriptor, as another process does.
    reader = Region(region.fd, region.size)
    released: list[int] = []
    views = read_tensors(reader, descriptors, block, released.append)
    for name, array in inputs.items():
        assert views[name].dtype == array.dtype and views[name].shape == array.shape
        np.testing.assert_array_equal(views[name], array)
    row = views["x"][1]  # a view of a view keeps the block
    del views
    gc.collect()
    assert released == []
    assert float(row.sum()) == 4 + 5 + 6 + 7
    del row
    assert released == [block]
    blocks.free(block)
    assert blocks.live_blocks == 0


def test_python_objects_and_tensors_that_do_not_fit_travel_inline() -> None:
    region = Region.create("test", 4096)
    blocks = BlockAllocator(region.size)
    text = {"s": np.array(["a", "bc"], dtype=object)}
    descriptors, block = write_tensors(region, blocks, text)
    assert block == -1 and descriptors[0][1] is None
    assert list(read_tensors(region, descriptors, block, lambda b: None)["s"]) == ["a", "bc"]
    big = {"x": np.ones((2, 1024), dtype=np.float32)}  # 8 KiB > 4 KiB
    descriptors, block = write_tensors(region, blocks, big)
    assert block == -1
    np.testing.assert_array_equal(read_tensors(region, descriptors, block, lambda b: None)["x"],
                                  big["x"])
    assert blocks.live_blocks == 0


@pytest.mark.asyncio
async def test_channel_frames_messages_and_carries_releases_from_other_threads() -> None:
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    received: list[object] = []
    arrived = asyncio.Event()

    def on_messages(messages: list[object]) -> None:
        received.extend(messages)
        if len(received) >= 3:
            arrived.set()

    sender = Channel(lambda m: None, lambda: None, release_tag=99)
    receiver = Channel(on_messages, lambda: None, release_tag=98)
    await loop.create_unix_connection(lambda: sender, sock=left)
    await loop.create_unix_connection(lambda: receiver, sock=right)
    sender.send((1, "a" * 100_000))  # larger than one read: reassembled from pieces
    sender.send((2, np.arange(3)))
    await loop.run_in_executor(None, sender.release_later, 7)
    await asyncio.wait_for(arrived.wait(), 5)
    assert received[0] == (1, "a" * 100_000)
    assert received[1][0] == 2  # type: ignore[index]
    assert (99, (7,)) in received
    sender.close()
    receiver.close()


def test_a_frontend_not_yet_connected_says_so_rather_than_that_the_executor_stopped() -> None:
    link = ExecutorLink("\0ferry-test-no-executor", 0)
    models = RemoteModels([link], ())
    with pytest.raises(FerryError) as starting:
        models.get("m")
    assert starting.value.kind is ErrorKind.UNAVAILABLE
    assert "still connecting" in starting.value.message
    models._catalog(link, [], ["m"], [])  # the executor announced its models once ...
    models._lost()  # ... then went away
    with pytest.raises(FerryError) as lost:
        models.get("m")
    assert "executor process stopped" in lost.value.message

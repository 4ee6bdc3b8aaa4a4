"""The executors' metrics socket (`--workers` with several devices) speaks pickle, so both
ends must refuse a process that is not one of the server's own: a socket name is no
secret. Here the stranger is a grandchild of the test (not its parent, child or sibling)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from ferry.server import metrics_merge
from ferry.server.metrics_merge import MergedRegistry, PeerFamiliesServer, fetch_families

# Run by a child of the test, so that the process doing the work is a grandchild.
VIA_A_CHILD = (
    "import subprocess, sys; "
    "sys.exit(subprocess.call([sys.executable, '-c', sys.argv[1], *sys.argv[2:]]))"
)

# A stranger serving a pickle that creates a file if anyone unpickles it.
HOSTILE_PEER = """
import pickle, socket, sys
class Planted:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind("\\0" + sys.argv[1])  # abstract: argv cannot hold its NUL
listener.listen()
print("listening", flush=True)
while True:
    connection, _ = listener.accept()
    connection.sendall(pickle.dumps(Planted()))
    connection.close()
"""

# A stranger asking a PeerFamiliesServer for its families: prints how many bytes came.
CURIOUS_CLIENT = """
import socket, sys
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect("\\0" + sys.argv[1])
received = b""
while chunk := client.recv(65536):
    received += chunk
print(len(received), flush=True)
"""


def abstract_address() -> str:
    """A Unix socket address in the abstract namespace (a leading NUL): no file."""
    return f"\0ferry-test-gaps-{uuid.uuid4().hex}"


@pytest.fixture
def hostile_peer(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(address, planted file) of a grandchild serving a planted pickle on `address`."""
    address, planted = abstract_address(), tmp_path / "planted"
    process = subprocess.Popen(
        [sys.executable, "-c", VIA_A_CHILD, HOSTILE_PEER, address[1:], str(planted)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "listening"
        yield address, planted
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the child and its grandchild
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def own_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("ferry_test_requests", "requests", registry=registry).inc(3)
    return registry


def test_a_scrape_never_unpickles_what_a_stranger_serves(
    hostile_peer: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """fetch_families refuses a peer that is not parent, child or sibling before it
    reads a byte; MergedRegistry then logs the peer as not answering and serves its own
    figures alone. The planted pickle never runs."""
    address, planted = hostile_peer
    with pytest.raises(OSError) as caught:
        fetch_families(address)
    assert str(caught.value) == f"{address!r} is not one of this server's executors"
    with caplog.at_level(logging.WARNING, logger=metrics_merge.__name__):
        merged = {m.name: m for m in MergedRegistry(own_registry(), [address]).collect()}
    assert [s.value for s in merged["ferry_test_requests"].samples
            if s.name == "ferry_test_requests_total"] == [3.0]
    assert any("did not answer" in r.getMessage() and "is not one of this server's executors"
               in r.getMessage() for r in caplog.records)
    assert not planted.exists()


@pytest.mark.asyncio
async def test_the_families_server_tells_a_stranger_nothing() -> None:
    """PeerFamiliesServer closes a connection from an unrelated process without writing
    its families; a connection from this process (a sibling's place) gets them."""
    address = abstract_address()
    server = PeerFamiliesServer(own_registry(), address)
    await server.start()
    try:
        stranger = await asyncio.create_subprocess_exec(
            sys.executable, "-c", VIA_A_CHILD, CURIOUS_CLIENT, address[1:],
            stdout=asyncio.subprocess.PIPE,
        )
        output, _ = await asyncio.wait_for(stranger.communicate(), 30)
        assert stranger.returncode == 0
        assert output.decode().strip() == "0"
        families = await asyncio.to_thread(fetch_families, address)
        assert ("ferry_test_requests", "requests", "counter",
                [("ferry_test_requests_total", {}, 3.0)]) in [
            (name, doc, kind, [s for s in samples if s[0].endswith("_total")])
            for name, doc, kind, samples in families
        ]
    finally:
        server.close()

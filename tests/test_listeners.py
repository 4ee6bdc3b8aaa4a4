"""Several grpc.aio listeners share the gRPC port in one process (--grpc-listeners).

Each listener accepts one call at a time, so Ferry runs several on the same event loop.
Connections are spread over them by the kernel; these tests check what must not change for
a caller: every connection gets its own correct answer, calls on different connections
still merge into one batch, the concurrent-RPC limit is one limit for the whole server,
and a port that something else listens on still fails the start.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.app import FerryServer, ServerOptions
from ferry.server.security import SecurityOptions
from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model
from tests.test_batching_e2e import queue_depth, wait_until
from tests.test_soak import logits_of as logits
from tests.test_soak import request_for

FEATURES = 16
CONNECTIONS = 12  # spread over 4 listeners by the kernel's hash of each connection

StartServer = Callable[..., RunningServer]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    model = mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    (model.parents[1] / "config.pbtxt").write_text(
        'name: "m"\nmax_batch_size: 32\ndynamic_batching { max_queue_delay_microseconds: 0 }\n'
    )
    return tmp_path / "repo"


def rows_of(seed: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def request(x: np.ndarray) -> pb.ModelInferRequest:
    return request_for(x, FEATURES)


@pytest.fixture
def channels(request: pytest.FixtureRequest) -> Iterator[Callable[[str], list[grpc.Channel]]]:
    """Factory: CONNECTIONS channels to one address, each on its own TCP connection."""
    opened: list[grpc.Channel] = []

    def open_all(address: str) -> list[grpc.Channel]:
        for index in range(CONNECTIONS):
            # A channel argument of its own keeps gRPC from sharing one connection.
            options = [("grpc.use_local_subchannel_pool", 1), ("ferry.test.connection", index)]
            opened.append(grpc.insecure_channel(address, options=options))
        return opened[-CONNECTIONS:]

    yield open_all
    for channel in opened:
        channel.close()


def peer_ports(server: RunningServer) -> set[int]:
    """The local ports of the server's established connections (one per client
    connection), from /proc/net/tcp{,6}: proof that the clients did not share one."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == server.port:
                ports.add(int(remote.rsplit(":", 1)[1], 16))
    return ports


def test_every_connection_gets_its_own_rows(
    repo: Path, start_server: StartServer, channels: Callable[[str], list[grpc.Channel]]
) -> None:
    server = start_server(repo, grpc_listeners=4)
    reference = ort.InferenceSession(
        str(repo / "m" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels(server.address)]

    def call(index: int) -> None:
        stub = stubs[index % len(stubs)]
        x = rows_of(index, rows=1 + index % 3)
        got = logits(stub.ModelInfer(request(x), timeout=30))
        expected = reference.run(["logits"], {"x": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(call, range(240)))
    assert len(peer_ports(server)) == CONNECTIONS


def test_calls_on_different_connections_merge_into_one_batch(
    repo: Path,
    start_server: StartServer,
    gated: Callable[..., GatedInstance],
    channels: Callable[[str], list[grpc.Channel]],
) -> None:
    server = start_server(repo, grpc_listeners=4, wrap_instance=gated)
    gate: GatedInstance = gated.instances[0]  # type: ignore[attr-defined]
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels(server.address)]
    gate.hold()
    blocker = stubs[0].ModelInfer.future(request(rows_of(100)), timeout=30)
    assert gate.entered.acquire(timeout=30)
    queued = [
        stub.ModelInfer.future(request(rows_of(index)), timeout=30)
        for index, stub in enumerate(stubs)
    ]
    wait_until(lambda: queue_depth(server, "m") == CONNECTIONS, "every connection's call queues")
    gate.release()
    blocker.result()
    answers = [future.result() for future in queued]
    assert gate.batch_rows == [1, CONNECTIONS]
    for index, answer in enumerate(answers):
        np.testing.assert_allclose(
            logits(answer), logits(stubs[0].ModelInfer(request(rows_of(index)), timeout=30)),
            rtol=1e-5, atol=1e-6,
        )


def test_the_concurrent_rpc_limit_is_one_limit_for_all_listeners(
    repo: Path,
    start_server: StartServer,
    gated: Callable[..., GatedInstance],
    channels: Callable[[str], list[grpc.Channel]],
) -> None:
    server = start_server(
        repo, grpc_listeners=4, wrap_instance=gated,
        security=SecurityOptions(max_concurrent_rpcs=1),
    )
    gate: GatedInstance = gated.instances[0]  # type: ignore[attr-defined]
    stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels(server.address)]
    gate.hold()
    held = stubs[0].ModelInfer.future(request(rows_of(0)), timeout=30)
    assert gate.entered.acquire(timeout=30)
    for stub in stubs[1:]:  # spread over the listeners: a limit of each would let some in
        with pytest.raises(grpc.RpcError) as refused:
            stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        error: Any = refused.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    gate.release()
    held.result()
    assert all(stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live for stub in stubs)


@pytest.mark.parametrize("listeners", [1, 4])
def test_a_port_something_else_listens_on_fails_the_start(repo: Path, listeners: int) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # would let a sharer in
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def start() -> None:
            server = FerryServer(
                ServerOptions(
                    model_path=repo, host="127.0.0.1", grpc_port=port, http_port=None,
                    metrics_port=None, grpc_listeners=listeners, exit_on_error=False,
                )
            )
            await server.start()

        with pytest.raises(OSError, match=f"127.0.0.1:{port} for gRPC"):
            asyncio.run(start())


@pytest.mark.parametrize("listeners", [-1, 65])
def test_listeners_outside_the_range_are_refused(repo: Path, listeners: int) -> None:
    with pytest.raises(ValueError, match=r"grpc listeners must be within 0\.\.64"):
        ServerOptions(model_path=repo, grpc_listeners=listeners)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_serves_grpc_rest_and_metrics(
    repo: Path, start_server: StartServer, host: str
) -> None:
    """`--host ::1` (or `[::1]`): every port listens there (gRPC once read ':::1:port')."""
    server = start_server(repo, host=host)
    x = rows_of(7)
    with grpc.insecure_channel(f"[::1]:{server.port}") as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request(x), timeout=30)
    reference = ort.InferenceSession(
        str(repo / "m" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(
        logits(answer), reference.run(["logits"], {"x": x})[0], rtol=1e-5, atol=1e-6
    )
    ready = urllib.request.urlopen(f"http://[::1]:{server.server.http_port}/v2/health/ready")
    assert ready.status == 200
    scraped = urllib.request.urlopen(f"http://[::1]:{server.server.metrics_port}/metrics")
    assert b"ferry_" in scraped.read()

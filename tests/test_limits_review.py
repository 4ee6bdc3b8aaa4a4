"""Hostile review of the connection, answer-size and call-count limits, the re-run of a
failing batch in halves and the typed varint decoder: each test failed against the code
before its fix. Through the real ports with real models and independent clients."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.server.errors import ErrorKind, FerryError
from ferry.server.executor import BatchItem, InstanceExecutor, RunOnly
from ferry.server.rows import Array, Tensors
from ferry.server.security import SecurityOptions, TlsFiles
from tests.certificates import Pki
from tests.conftest import RunningServer
from tests.models import identity_model
from tests.waiting import wait_until

StartServer = Callable[..., RunningServer]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    identity_model(tmp_path / "repo" / "m" / "1" / "model.onnx", "FP32")
    return tmp_path / "repo"


def https_live(address: str, ca: Path) -> bytes:
    host, port = address.split(":")
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return answer


# REST connections ---------------------------------------------------------------------


def test_tls_connections_that_never_finish_the_handshake_give_back_their_place(
    repo: Path, start_server: StartServer, pki: Pki
) -> None:
    """A TLS connection that leaves before its handshake ends never reaches aiohttp's
    protocol: its place must still come back, or a few port scans fill the port."""
    server = start_server(
        repo,
        security=SecurityOptions(
            tls=TlsFiles(pki.server.cert, pki.server.key), max_connections=2
        ),
    )
    host, port = server.http_address.split(":")
    for garbage in (b"", b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
        for _ in range(3):
            with socket.create_connection((host, int(port)), timeout=10) as raw:
                if garbage:
                    raw.sendall(garbage)
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(65536):
                    pass
    wait_until(lambda: server.server.rest.open_connections == 0, what="places given back")
    assert https_live(server.http_address, pki.ca.cert_path).startswith(b"HTTP/1.1 200")


def test_a_refused_client_that_already_sent_its_request_reads_the_503(
    repo: Path, start_server: StartServer
) -> None:
    """A client sends its request as soon as it connects: the 503 of a connection over the
    cap must not be lost to a reset (a socket closed with unread input sends RST)."""
    server = start_server(repo, security=SecurityOptions(max_connections=1))
    host, port = server.http_address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as held:
        held.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.recv(65536).startswith(b"HTTP/1.1 200")
        for _ in range(20):
            with socket.create_connection((host, int(port)), timeout=10) as late:
                late.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 100000\r\n\r\n" + bytes(100000))
                answer = b""
                while chunk := late.recv(65536):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 503"), answer


# A failing batch run again in halves ----------------------------------------------------


class Broken:
    """A model instance that cannot run at all (its device out of memory, say): every run
    fails with the server's own error, whatever the rows."""

    def __init__(self, kind: ErrorKind) -> None:
        self.kind = kind
        self.runs = 0

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> Tensors:
        self.runs += 1
        raise FerryError(self.kind, "onnxruntime: CUDA failure 2: out of memory")


def batch_of(requests: int) -> list[BatchItem]:
    return [BatchItem({"x": np.array([[float(i)]], np.float32)}, 1, ("y",))
            for i in range(requests)]


def test_a_batch_that_fails_with_the_servers_own_error_runs_once() -> None:
    """64 requests of a model that cannot run: the batch and its two halves fail with the
    server's own error, which is reported to all of them as the batch's, not 127 runs of
    every half and quarter that fail the same way."""
    runner = Broken(ErrorKind.INTERNAL)
    with pytest.raises(FerryError, match="out of memory"):
        InstanceExecutor(RunOnly(runner)).execute(batch_of(64), ("y",))
    assert runner.runs == 3


def test_invalid_input_is_still_looked_for_in_halves() -> None:
    runner = Broken(ErrorKind.INVALID_INPUT)
    outcome = InstanceExecutor(RunOnly(runner)).execute(batch_of(4), ("y",))
    assert all(isinstance(result, FerryError) for result in outcome.outputs)
    assert runner.runs == 7  # the whole tree: each request failed on its own


# gRPC connection options ------------------------------------------------------------------


def test_a_health_watch_with_nothing_to_say_outlives_the_idle_timeout(
    repo: Path, start_server: StartServer, pki: Pki
) -> None:
    """A server-streaming Watch that writes nothing after its first answer is a call in
    flight: its connection is not idle, over TLS too."""
    server = start_server(
        repo,
        security=SecurityOptions(
            tls=TlsFiles(pki.server.cert, pki.server.key), connection_idle_timeout_s=1.0
        ),
    )
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_path.read_bytes())
    with grpc.secure_channel(server.address, credentials) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append)
        assert not threading.Event().wait(3.0)  # three idle timeouts, the watch open
        assert grpc.ChannelConnectivity.IDLE not in states, states
        watch.cancel()
        channel.unsubscribe(states.append)


def test_large_https_uploads_and_keep_alive_through_the_counted_tls_connection(
    tmp_path: Path, start_server: StartServer, pki: Pki
) -> None:
    """An 8 MiB binary upload over TLS (reading pauses and resumes under it), twice on one
    kept-alive connection; then the connection is counted until it closes, and a TLS
    client over the cap reads its 503."""
    identity_model(tmp_path / "repo" / "big" / "1" / "model.onnx", "FP32", ("batch", 1 << 21))
    server = start_server(
        tmp_path / "repo",
        security=SecurityOptions(tls=TlsFiles(pki.server.cert, pki.server.key), max_connections=1),
    )
    host, port = server.http_address.split(":")
    x = np.arange(1 << 21, dtype=np.float32).reshape(1, -1)
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 1 << 21],
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        for _ in range(2):
            connection.request(
                "POST", "/v2/models/big/infer", body=header + x.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(header)),
                         "Content-Type": "application/octet-stream"},
            )
            answer = connection.getresponse()
            body = answer.read()
            assert answer.status == 200, body[:200]
            length = int(answer.getheader("Inference-Header-Content-Length"))
            assert body[length:] == x.tobytes()
        assert server.server.rest.open_connections == 1
        assert https_live(server.http_address, pki.ca.cert_path).startswith(b"HTTP/1.1 503")
    finally:
        connection.close()
    wait_until(lambda: server.server.rest.open_connections == 0, what="the place given back")
    assert https_live(server.http_address, pki.ca.cert_path).startswith(b"HTTP/1.1 200")

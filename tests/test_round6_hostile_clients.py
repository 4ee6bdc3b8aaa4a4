"""The sixth hostile-client pass, through real ports: compressed REST bodies that inflate
far past what their client sent, bodies in codings the server does not decode, answers
that are never read, gRPC TLS handshakes that never end, and REST load parameters that are
not scalars."""

from __future__ import annotations

import gzip
import json
import socket
import tracemalloc
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as tc_http

from ferry.server.repository import ModelControl, ModelControlMode
from ferry.server.security import SecurityOptions, TlsFiles
from tests.certificates import Pki
from tests.conftest import RunningServer
from tests.models import identity_model, mlp_model
from tests.raw_http import connect, read_answer
from tests.waiting import wait_until

INFER = "/v2/models/m/infer"
LIMIT = 4 * 1024 * 1024  # the server's --max-message-size


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root: Path = tmp_path_factory.mktemp("round6") / "repo"
    mlp_model(root / "m" / "1" / "model.onnx")
    running = RunningServer(root, max_message_bytes=LIMIT)
    yield running
    running.close()


def post(address: str, headers: bytes, body: bytes, path: str = INFER) -> tuple[bytes, bytes]:
    with connect(address) as connection:
        connection.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: ferry\r\n"
                           + headers + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return read_answer(connection)


# Compressed bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [(b"gzip", gzip.compress), (b"deflate", zlib.compress)],
    ids=["gzip", "deflate"],
)
def test_a_compressed_body_is_refused_holding_no_more_than_the_limit(
    server: RunningServer, encoding: bytes, compress: object
) -> None:
    """A body of 64 MiB of spaces compresses to 64 KB. aiohttp's `read()` raises its
    buffer to --max-message-size before reading, so it inflated the limit per step and
    buffered twice that before the size was checked: 33 MiB of Python allocations for
    64 KB sent against a 4 MiB limit (7 MiB now); under the default limit, a 260 KB body
    raised peak RSS by 264 MiB (67 MiB now), and 8 at once by 2 GiB (527 MiB now). Now
    it is read a piece at a time and refused as it passes the limit."""
    bomb = compress(b" " * (64 << 20))  # type: ignore[operator]
    assert len(bomb) < 128 * 1024
    tracemalloc.start()
    try:
        status, answer = post(server.http_address, b"Content-Encoding: " + encoding + b"\r\n",
                              bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status.startswith(b"HTTP/1.1 413"), (status, answer)
    assert "--max-message-size" in json.loads(answer)["error"]
    assert peak < 2 * LIMIT, f"peak {peak / 2**20:.1f} MiB for a {len(bomb)}-byte body"


def test_compressed_bodies_within_the_limit_are_still_answered(server: RunningServer) -> None:
    """The body read a piece at a time is kept for the handler, which asks for it after
    the concurrency check: an inference and a repository index, each compressed."""
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    with tc_http.InferenceServerClient(server.http_address) as client:
        tensor = tc_http.InferInput("x", [2, 16], "FP32")
        tensor.set_data_from_numpy(x)
        for algorithm in ("gzip", "deflate"):
            result = client.infer("m", [tensor], request_compression_algorithm=algorithm)
            assert result.as_numpy("probs").shape == (2, 4)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 16],
                                   "data": x.ravel().tolist()}]}).encode()
    status, answer = post(server.http_address, b"Content-Encoding: gzip\r\n", gzip.compress(body))
    assert status.startswith(b"HTTP/1.1 200"), (status, answer)
    assert json.loads(answer)["outputs"][0]["shape"] == [2, 4]
    status, answer = post(server.http_address, b"Content-Encoding: gzip\r\n",
                          gzip.compress(b"{}"), "/v2/repository/index")
    assert status.startswith(b"HTTP/1.1 200"), (status, answer)
    assert json.loads(answer)[0]["name"] == "m"


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        (b"x-gzip", gzip.compress(b'{"inputs": []}')),
        (b"gzip, gzip", gzip.compress(gzip.compress(b'{"inputs": []}'))),
        (b"compress", json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                              "shape": [1, 16], "data": [0] * 16}]}).encode()),
    ],
    ids=["x-gzip", "gzip-twice", "compress"],
)
def test_a_body_in_a_coding_the_server_does_not_decode_is_a_415_naming_it(
    server: RunningServer, coding: bytes, body: bytes
) -> None:
    """aiohttp decodes gzip and deflate and hands a body of any other coding on as it
    came: "x-gzip" and "gzip, gzip" were read as JSON (400, "str is not valid UTF-8"),
    and a body said to be "compress"ed was served as if it were plain (200). Now a 415
    naming the coding and the ones the server takes, and the connection closes, since
    the body is not read."""
    with connect(server.http_address) as connection:
        connection.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: ferry\r\n"
                           b"Content-Encoding: " + coding + b"\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status, answer = read_answer(connection)
        assert status.startswith(b"HTTP/1.1 415"), (status, answer)
        error = json.loads(answer)["error"]
        assert repr(coding.decode()) in error and "gzip or deflate" in error, error
        assert b"\r\nconnection: close" in status.lower(), status


@pytest.mark.parametrize("coding", [b"", b"identity", b"Identity"])
def test_a_plain_body_with_an_empty_or_identity_coding_is_served(
    server: RunningServer, coding: bytes
) -> None:
    """The codings that mean "as it is" are still read as plain bodies."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                   "data": [0] * 16}]}).encode()
    status, answer = post(server.http_address, b"Content-Encoding: " + coding + b"\r\n", body)
    assert status.startswith(b"HTTP/1.1 200"), (status, answer)


# Answers that are never read -------------------------------------------------------------


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP_USER_TIMEOUT")
def test_a_rest_answer_the_client_never_reads_does_not_hold_its_connection_for_good(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    """aiohttp has no write timeout: a client that sent a request for a large answer and
    then read nothing kept its connection, and the answer and request with it, for as
    long as it liked (4 such clients of 16 MiB answers: +250 MiB RSS 40 s later, under
    an idle timeout of 3 s), and the idle timeout never applied, since a request was in
    progress. Now the kernel closes a connection whose client acknowledges nothing of
    what it is sent for --connection-idle-timeout (a client reading slowly stays)."""
    identity_model(tmp_path / "ident" / "1" / "model.onnx", "FP32", ("batch", "n"))
    server = start_server(tmp_path, security=SecurityOptions(connection_idle_timeout_s=1.0))
    count = 4 * 1024 * 1024  # 16 MiB each way, past what the sockets' buffers hold
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, count],
                    "parameters": {"binary_data_size": count * 4}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }).encode()
    host, port = server.http_address.rsplit(":", 1)
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.connect((host, int(port)))
        connection.sendall(
            b"POST /v2/models/ident/infer HTTP/1.1\r\nHost: ferry\r\n"
            b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
            % (len(header), len(header) + count * 4) + header + bytes(count * 4)
        )
        wait_until(lambda: server.server.rest.open_connections == 1, what="the connection")
        wait_until(lambda: server.server.rest.open_connections == 0, timeout=15.0,
                   what="the connection of a client that reads nothing closed")
    with tc_http.InferenceServerClient(server.http_address) as client:  # and others served
        tensor = tc_http.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        assert client.infer("ident", [tensor]).as_numpy("OUTPUT0").tolist() == [[1.0] * 4]


# TLS handshakes that never end -------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00"], ids=["silent", "half-hello"])
def test_a_grpc_tls_handshake_that_never_ends_is_held_no_longer_than_the_idle_timeout(
    tmp_path: Path, start_server: Callable[..., RunningServer], pki: Pki, sent: bytes
) -> None:
    """gRPC counts a connection against --max-connections from its accept, and its idle
    timeout starts after the TLS handshake: a connection that sent nothing, or half a
    ClientHello, was held for gRPC's own handshake timeout, 120 s, whatever
    --connection-idle-timeout said (the REST port holds one for min(idle timeout,
    60 s)). Now the same bound as REST."""
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    tls = TlsFiles(pki.server.cert, pki.server.key)
    server = start_server(
        tmp_path, security=SecurityOptions(tls=tls, connection_idle_timeout_s=1.0)
    )
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as connection:
        connection.sendall(sent)
        try:
            while connection.recv(100):  # an alert, maybe, then the end: closed
                pass
        except TimeoutError:
            pytest.fail("the server still holds a handshake that began 15 s ago")
        except ConnectionResetError:
            pass  # closed too


# Load parameters that are not scalars ------------------------------------------------------


def rest_load(server: RunningServer, body: dict[str, object]) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{server.http_address}/v2/repository/models/m/load",
        data=json.dumps(body).encode(), method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def max_batch_size(server: RunningServer) -> int:
    url = f"http://{server.http_address}/v2/models/m/config"
    with urllib.request.urlopen(url, timeout=30) as response:
        return int(json.loads(response.read())["max_batch_size"])


@pytest.mark.parametrize(
    ("overrides", "parameters", "status", "says"),
    [
        (True, {"config": {"max_batch_size": 4}}, 400, "'config' must be a JSON string"),
        (True, {"config": None}, 400, "'config' must be a JSON string"),
        (True, {"file:1/model.onnx": ["AAAA"]}, 403, "'file:1/model.onnx'"),
        (False, {"config": {"max_batch_size": 4}}, 403, "--allow-load-overrides"),
    ],
    ids=["config-object", "config-null", "file-list", "config-object-no-overrides"],
)
def test_a_load_parameter_that_is_not_a_scalar_is_refused_by_name(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    overrides: bool,
    parameters: dict[str, object],
    status: int,
    says: str,
) -> None:
    """Triton's load takes `config` as a JSON string. Sent as a JSON object (or a list, or
    null), the REST door dropped it as it drops unknown inference parameters, and the load
    answered 200 having loaded the repository's config, not the one asked for (with
    --allow-load-overrides off, the 403 the same config as a string gets was skipped)."""
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    control = ModelControl(ModelControlMode.EXPLICIT, ("*",), allow_load_overrides=overrides)
    server = start_server(tmp_path, security=SecurityOptions(model_control=control))
    code, answer = rest_load(server, {"parameters": parameters})
    assert code == status and says in json.loads(answer)["error"], (code, answer)
    assert max_batch_size(server) == 32  # the model as it was
    if overrides:  # the same config as a string is taken
        code, answer = rest_load(server, {"parameters": {"config": '{"max_batch_size": 4}'}})
        assert code == 200, answer
        assert max_batch_size(server) == 4

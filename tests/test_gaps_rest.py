"""REST requests refused before any model sees them, through the real port with a raw
socket (the header combinations no client library sends): what status and body each
gets, and whether the connection stays usable."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.conftest import EXPLICIT_MODEL_CONTROL, RunningServer
from tests.models import mlp_model

StartServer = Callable[..., RunningServer]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    return tmp_path / "repo"


class Answer:
    """One parsed HTTP answer: the status line, headers (lower-case names) and body."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split()[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        self.raw = raw


def exchange(server: RunningServer, request: bytes, timeout_s: float = 10.0) -> Answer:
    """Send `request` as it is and read one answer (to its Content-Length, or to EOF)."""
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout_s) as sock:
        sock.sendall(request)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            head, found, body = received.partition(b"\r\n\r\n")
            if not found or head.startswith(b"HTTP/1.1 100"):
                continue
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length and len(body) >= int(length.group(1)):
                break
    return Answer(received)


def infer_body() -> bytes:
    return json.dumps({
        "inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]
    }).encode()


def test_an_unknown_expectation_is_refused_417_before_the_body(
    repo: Path, start_server: StartServer
) -> None:
    """`Expect:` with anything but 100-continue is refused 417 naming the expectation,
    without waiting for the body (none is sent here)."""
    server = start_server(repo)
    answer = exchange(server, (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: ferry\r\nContent-Length: 400\r\n"
        b"Expect: something-else\r\n\r\n"
    ))
    assert answer.status == 417, answer.raw
    assert b"unknown Expect: something-else" in answer.body


def test_an_unknown_expectation_is_refused_with_a_json_error_body(
    repo: Path, start_server: StartServer
) -> None:
    """The Open Inference Protocol's REST errors are JSON objects with an "error"
    string; the 417 should be one too."""
    server = start_server(repo)
    answer = exchange(server, (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: ferry\r\nContent-Length: 400\r\n"
        b"Expect: something-else\r\n\r\n"
    ))
    assert answer.status == 417
    assert answer.headers["content-type"].startswith("application/json")
    assert json.loads(answer.body) == {"error": "unknown Expect: something-else"}


def test_an_http_1_0_request_with_expect_is_answered_without_an_interim_100(
    repo: Path, start_server: StartServer
) -> None:
    """HTTP/1.0 has no 100 Continue: the expectation is ignored, the body read, and the
    request answered at once with its real answer."""
    server = start_server(repo)
    body = infer_body()
    answer = exchange(server, (
        b"POST /v2/models/m/infer HTTP/1.0\r\nHost: ferry\r\nContent-Type: application/json"
        b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body)
    assert answer.status_line.startswith("HTTP/1.0 200"), answer.raw
    assert b"100 Continue" not in answer.raw
    outputs = {o["name"]: o for o in json.loads(answer.body)["outputs"]}
    assert outputs["probs"]["shape"] == [1, 4]
    assert sum(outputs["probs"]["data"]) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_does_not_decode_as_its_content_encoding_is_refused_400(
    repo: Path, start_server: StartServer, encoding: str
) -> None:
    """A body that is not what its Content-Encoding says gets a JSON 400 naming the
    encoding (not quoting the body) and the connection is closed, since where the next
    request would start is unknown; the server goes on serving."""
    server = start_server(repo)
    junk = b"this is not compressed at all"
    answer = exchange(server, (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json"
        b"\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n" % (encoding.encode(), len(junk))
    ) + junk)
    assert answer.status == 400, answer.raw
    assert json.loads(answer.body) == {
        "error": f"the request body does not decode as its Content-Encoding '{encoding}'"
    }
    assert answer.headers.get("connection", "").lower() == "close"
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("m")


@pytest.mark.parametrize("parameters", [[1], "config", 3])
def test_a_rest_load_whose_parameters_are_not_an_object_is_refused_400(
    repo: Path, start_server: StartServer, parameters: object
) -> None:
    """POST /v2/repository/models/m/load with a "parameters" that is not a JSON object
    is refused 400 by name, and the loaded model is left as it was."""
    server = start_server(repo, security=EXPLICIT_MODEL_CONTROL)
    body = json.dumps({"parameters": parameters}).encode()
    answer = exchange(server, (
        b"POST /v2/repository/models/m/load HTTP/1.1\r\nHost: ferry\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body)
    assert answer.status == 400, answer.raw
    assert json.loads(answer.body) == {"error": "'parameters' must be a JSON object"}
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("m")
        tensor = triton.InferInput("x", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
        assert client.infer("m", [tensor]).as_numpy("probs").shape == (1, 4)

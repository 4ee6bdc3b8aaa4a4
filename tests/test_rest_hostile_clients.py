"""The REST front door under hostile clients: raw sockets for malformed or stalled HTTP,
urllib for bodies that lie, through real servers (in-process, and `ferry serve` for its
log): lying header lengths, JSON nesting bombs, stalled uploads, malformed HTTP, methods
a path does not take, numbers a datatype cannot hold."""

from __future__ import annotations

import json
import re
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ferry.server import rest
from ferry.server.rest_codec import parse_infer
from ferry.server.security import SecurityOptions
from tests.conftest import RunningServer
from tests.models import identity_model, mlp_model
from tests.process import FerryProcess
from tests.test_rest import http

StartServer = Callable[..., RunningServer]
INFER = "/v2/models/m/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"


def valid_body() -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                   "data": [0.5] * 16}]}).encode()


def error_of(answer: bytes) -> str:
    return str(json.loads(answer)["error"])


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    return tmp_path / "repo"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("hostile_rest") / "repo"
    mlp_model(root / "m" / "1" / "model.onnx")
    identity_model(root / "half" / "1" / "model.onnx", "FP16")
    identity_model(root / "single" / "1" / "model.onnx", "FP32")
    running = RunningServer(root)
    yield running
    running.close()


def stalled_upload(address: str, path: str = INFER) -> socket.socket:
    """A POST whose headers promise 100,000 bytes, of which it sends 5 and then nothing;
    returns once the server has asked for the body (100 Continue), so its handler runs."""
    host, port = address.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=10)
    connection.sendall(
        f"POST {path} HTTP/1.1\r\nHost: ferry\r\nContent-Length: 100000\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    assert connection.recv(100).startswith(b"HTTP/1.1 100")
    connection.sendall(b'{"inp')
    return connection


def test_a_header_length_of_non_ascii_digits_is_a_400_naming_the_header(
    server: RunningServer,
) -> None:
    """'²' passes str.isdigit() but not int(): a client's malformed header is a 400, not
    a 500 with a traceback in the log."""
    status, _, answer = http(server, "POST", INFER, valid_body(),
                             {HEADER_LENGTH: "²".encode().decode("latin-1")})
    assert status == 400, answer
    assert HEADER_LENGTH in error_of(answer)


def test_uploads_still_arriving_do_not_take_the_places_of_the_concurrency_limit(
    repo: Path, start_server: StartServer
) -> None:
    """A request counts in --max-concurrent-rpcs once its body has arrived, as a gRPC call
    does: two clients that send headers and a few bytes must not hold both places of a
    limit of 2 while every other REST caller gets 503."""
    server = start_server(repo, security=SecurityOptions(max_concurrent_rpcs=2))
    held = [stalled_upload(server.http_address) for _ in range(2)]
    try:
        time.sleep(0.2)  # the stalled handlers have run up to their body read
        deadline = time.monotonic() + 3
        while True:
            status, _, answer = http(server, "POST", INFER, valid_body())
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200, answer
    finally:
        for connection in held:
            connection.close()


def rest_port(process: FerryProcess) -> int:
    found = re.search(r"REST binding on https?://[^\s]+:(\d+)", process.log)
    assert found is not None, process.log
    return int(found.group(1))


def wait_for_the_log_so_far(process: FerryProcess, port: int) -> None:
    """Send a request whose outcome Ferry logs, and wait for its line: then the lines of
    everything sent before it are in the log too."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        body = valid_body()
        connection.sendall(b"POST /v2/models/no_such_model/infer HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert connection.recv(100).startswith(b"HTTP/1.1 404")
    process.wait_for("unknown model 'no_such_model'")


def test_malformed_http_does_not_flood_the_log(tmp_path: Path) -> None:
    """aiohttp logs each malformed request line or body (a bad chunk size, a 9 KB request
    line) at ERROR with a 10-line traceback: 40 such requests, under 3 KB sent, wrote
    about 400 lines. Like other failed requests, each kind is reported on one line at
    most once a minute."""
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    with FerryProcess(tmp_path, "--http-port", "0") as process:
        port = rest_port(process)
        before = len(process.log.splitlines())
        bad = [b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
               b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"]
        for data in bad * 20:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                connection.sendall(data)
                assert connection.recv(100).startswith(b"HTTP/1.")  # a 400 came back
        wait_for_the_log_so_far(process, port)
        added = process.log.splitlines()[before:]
        assert len(added) <= 5, f"{len(added)} log lines for 40 malformed requests:\n" + (
            "\n".join(added[:15])
        )


def nested_bomb(item: bytes, json_bytes: int = 4 * 1024 * 1024) -> bytes:
    """An inference body of about `json_bytes` whose 'data' is `item` repeated."""
    head = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,16],"data":['
    count = (json_bytes - len(head) - 4) // len(item)
    return head + item * (count - 1) + item[:-1] + b"]}]}"


@pytest.mark.parametrize("item", [b"[[]],", b"[0],", b"[" * 1000 + b"]" * 1000 + b","])
def test_nested_json_data_stays_within_the_documented_decoding_cost(
    server: RunningServer, item: bytes
) -> None:
    """The README: JSON costs up to about 45 times its size to decode when its data is
    nested as small or as deep as JSON allows (16-20 for flat numbers), which is why JSON
    gets 1/16 of --max-message-size. Data that is neither flat nor nested as the shape is
    refused by its length before numpy walks it."""
    body = nested_bomb(item)
    status, _, answer = http(server, "POST", INFER, body)
    assert status == 400 and "input 'x'" in error_of(answer), answer
    tracemalloc.start()
    try:
        with pytest.raises(Exception, match="input 'x'"):
            parse_infer(body, None, "m", "")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 45 * len(body), f"{peak / len(body):.1f}x the JSON's {len(body)} bytes"


def test_an_upload_that_stalls_is_answered_408_and_gives_back_its_place(
    repo: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rest, "BODY_GRACE_S", 0.3)
    server = start_server(repo, security=SecurityOptions(max_concurrent_rpcs=1))
    connection = stalled_upload(server.http_address)
    try:
        connection.settimeout(10)
        answer = connection.recv(4096)  # 0.3 s + 100,000 bytes at 1 MiB/s
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not arrive within" in answer
    finally:
        connection.close()
    status, _, answer = http(server, "POST", INFER, valid_body())
    assert status == 200, answer


def test_a_method_the_path_does_not_take_is_405_naming_the_one_it_takes(
    server: RunningServer,
) -> None:
    """GET or PUT on .../infer (a path that exists, for POST): 405 with an Allow header,
    not the catch-all route's 404."""
    for method in ("GET", "PUT"):
        status, headers, answer = http(server, method, INFER,
                                       valid_body() if method == "PUT" else None)
        assert status == 405, (method, status, answer)
        assert headers.get("Allow") == "POST" and "POST" in error_of(answer)


@pytest.mark.parametrize(
    ("model", "datatype", "value"), [("half", "FP16", 70000.0), ("single", "FP32", 1e39)]
)
def test_json_numbers_out_of_range_for_a_float_datatype_are_refused(
    server: RunningServer, model: str, datatype: str, value: float
) -> None:
    """Nothing is wrapped or truncated silently: FP16 70000 and FP32 1e39 would become
    infinity (a 200 whose JSON answer says null), so they are refused as INT8 300 is."""
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": datatype, "shape": [1, 4],
                                   "data": [value, 1, 2, 3]}]}).encode()
    status, _, answer = http(server, "POST", f"/v2/models/{model}/infer", body)
    assert status == 400, answer
    assert "INPUT0" in error_of(answer) and datatype in error_of(answer)


def test_header_lengths_and_binary_sizes_that_lie_are_400_and_others_are_served(
    server: RunningServer,
) -> None:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                     "parameters": {"binary_data_size": 64}}]}).encode()
    body = header + bytes(64)
    cases = [
        (str(len(body) + 10), body, "expected the byte length of the JSON header"),
        ("0", body, "expected the byte length of the JSON header"),
        ("-5", body, "expected the byte length of the JSON header"),
        ("abc", body, "expected the byte length of the JSON header"),
        (str(len(header) - 3), body, "not valid JSON"),
        (str(len(header)), body + b"xx", "2 bytes after the last input's binary data"),
        (str(len(header)), body[:-1], "binary_data_size 64 does not fit"),
    ]
    for length, data, fragment in cases:
        status, _, answer = http(server, "POST", INFER, data, {HEADER_LENGTH: length})
        assert status == 400 and fragment in error_of(answer), (length, answer)
    deep = (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,16],"data":'
            + b"[" * 5000 + b"]" * 5000 + b"}]}")
    status, _, answer = http(server, "POST", INFER, deep)
    assert status == 400 and "depth limit" in error_of(answer)
    status, _, answer = http(server, "POST", INFER, valid_body())
    assert status == 200, answer


def test_a_stalled_upload_does_not_hold_up_other_callers(server: RunningServer) -> None:
    held = [stalled_upload(server.http_address) for _ in range(4)]
    try:
        started = time.monotonic()
        status, _, answer = http(server, "POST", INFER, valid_body())
        assert status == 200, answer
        assert time.monotonic() - started < 5
    finally:
        for connection in held:
            connection.close()


def test_the_malformed_http_log_does_not_quote_the_request(tmp_path: Path) -> None:
    """aiohttp's message for a bad header quotes the raw header line: a key header with a
    NUL in it put the key in the server's log. The log names the kind of error only."""
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    with FerryProcess(tmp_path, "--http-port", "0") as process:
        port = rest_port(process)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Key: s3cret-value\x00\r\n\r\n")
            assert connection.recv(100).startswith(b"HTTP/1.0 400")
        wait_for_the_log_so_far(process, port)
        assert "malformed HTTP request answered 400" in process.log
        assert "s3cret" not in process.log, process.log

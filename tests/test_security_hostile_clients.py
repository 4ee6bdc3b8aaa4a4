"""Security and admission limits under hostile clients, through real ports: API keys tried
with path tricks and duplicate headers or metadata entries; `--max-concurrent-rpcs`
against streams that write with `context.write`, clients that leave or time out mid-call,
probes, and both protocols at once."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.security import ApiGroup, RestrictedApi, SecurityOptions
from tests.conftest import GatedInstance, RunningServer, one_place_server
from tests.models import mlp_model
from tests.test_rest import http
from tests.waiting import wait_until

StartServer = Callable[..., RunningServer]
KEY_HEADER = "x-key"
KEY = "s3cret-k3y"


def infer_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    return request


def infer_body() -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]}
    ).encode()


def raw_http(address: str, request: bytes) -> bytes:
    """The status line of one request sent as given on a fresh connection."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = connection.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    return tmp_path / "repo"


@pytest.fixture
def held(
    repo: Path, start_server: StartServer, gated: Callable[..., GatedInstance]
) -> Iterator[tuple[RunningServer, grpc.Channel]]:
    """A server with --max-concurrent-rpcs 1 whose one place is taken by a gRPC inference
    held in the model; the place is given back when the test ends."""
    server, gate = one_place_server(repo, start_server, gated)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelInfer.future(infer_request(), timeout=30)
        assert gate.entered.acquire(timeout=30)
        try:
            yield server, channel
        finally:
            gate.release()
            assert len(call.result().outputs) == 2


# Restricted APIs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Every group but health needs the key."""
    root = tmp_path_factory.mktemp("restricted") / "repo"
    mlp_model(root / "m" / "1" / "model.onnx")
    groups = frozenset(g for g in ApiGroup if g is not ApiGroup.HEALTH)
    running = RunningServer(
        root, security=SecurityOptions(restricted_apis=(RestrictedApi(groups, KEY_HEADER, KEY),))
    )
    yield running
    running.close()


REST_PATHS = [
    "//v2/models/m/config",
    "/v2/models/m/../../v2/repository/index",
    "/v2/./models/m/config",
    "/v2//models/m/config",
    "/v2/models/m//config",
    "/v2/models/m/config/",
    "/v2/models%2Fm/config",
    "/v2/models/m%2Fconfig",
    "/v2/models/m/%63onfig",
    "/v2/models/m/config?x-key=s3cret-k3y",
    "/v2/models/m/versions/1/config",
    "/v2/models/stats",
    "/v2/models/m",
    "/v2",
    "http://ferry/v2/models/m/config",
    "/v2/repository/models/m/unload",
]


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "OPTIONS"])
def test_no_rest_path_trick_reaches_a_restricted_api_without_its_key(
    restricted: RunningServer, method: str
) -> None:
    """Whatever the path's spelling, a request either reaches a handler of the path's own
    group (and needs its key) or no handler at all."""
    for path in REST_PATHS:
        line = raw_http(
            restricted.http_address,
            (
                f"{method} {path} HTTP/1.1\r\nHost: ferry\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n"
            ).encode(),
        )
        assert line.split(b" ")[1] in (b"401", b"404", b"405"), (method, path, line)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (f"X-Key: {KEY}\r\nX-Key: wrong\r\n", b"401"),
        (f"X-Key: wrong\r\nX-Key: {KEY}\r\n", b"401"),
        (f"X-Key: {KEY}, wrong\r\n", b"401"),
        (f"X-Key: {KEY}x\r\n", b"401"),
        ("X-Key:\r\n", b"401"),
        (f"X-KEY: {KEY}\r\n", b"200"),
        (f"x-key: \t{KEY} \r\n", b"200"),  # HTTP's optional whitespace is not the value's
    ],
)
def test_a_rest_key_must_be_the_one_value_of_its_header(
    restricted: RunningServer, headers: str, status: bytes
) -> None:
    line = raw_http(
        restricted.http_address,
        (
            f"GET /v2/models/m/config HTTP/1.1\r\nHost: ferry\r\n{headers}Connection: close\r\n\r\n"
        ).encode(),
    )
    assert line.split(b" ")[1] == status, (headers, line)


@pytest.mark.parametrize(("key", "status"), [(None, b"401"), ("wrong", b"401"), (KEY, b"100")])
def test_a_body_is_invited_only_from_a_client_with_the_key(
    restricted: RunningServer, key: str | None, status: bytes
) -> None:
    """`Expect: 100-continue` (curl sends it for large bodies): aiohttp answered
    "100 Continue" to every request, so a client without the key was invited to upload its
    64 MiB, which the server then read and threw away after its 401."""
    key_header = f"X-Key: {key}\r\n" if key is not None else ""
    line = raw_http(
        restricted.http_address,
        (
            f"POST /v2/models/m/infer HTTP/1.1\r\nHost: ferry\r\n{key_header}"
            "Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
        ).encode(),
    )
    assert line.split(b" ")[1] == status, line


def test_a_grpc_key_must_be_the_one_value_of_its_metadata_entry(
    restricted: RunningServer,
) -> None:
    with grpc.insecure_channel(restricted.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for metadata in (
            ((KEY_HEADER, KEY), (KEY_HEADER, "wrong")),
            ((KEY_HEADER, "wrong"), (KEY_HEADER, KEY)),
            ((KEY_HEADER, f" {KEY}"),),
            ((f"{KEY_HEADER}-bin", KEY.encode()),),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=10)
            error: Any = refused.value
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert KEY not in error.details()
        assert (
            stub.ServerMetadata(
                pb.ServerMetadataRequest(), metadata=((KEY_HEADER, KEY),), timeout=10
            ).name
            == "ferry"
        )


@pytest.mark.parametrize("value", [" s3cret", "s3cret ", "s3 cret"])
def test_a_key_with_spaces_around_it_is_refused_at_start(
    repo: Path, start_server: StartServer, value: str
) -> None:
    """HTTP drops the spaces around a header value, so a key that starts or ends with one
    (`--restricted-api 'inference:x-key=s3cret '`) locked every REST client out while gRPC
    clients got in. It is refused when the flag is read, without showing the key."""
    text = f"inference:{KEY_HEADER}={value}"
    if value.strip() != value:
        with pytest.raises(ValueError, match="starts or ends with a space") as refused:
            RestrictedApi.parse(text)
        assert "s3" not in str(refused.value)
        return
    server = start_server(
        repo, security=SecurityOptions(restricted_apis=(RestrictedApi.parse(text),))
    )  # a space inside the key is the key's: REST and gRPC clients both get in
    status, _, answer = http(server, "POST", "/v2/models/m/infer", infer_body(), {"X-Key": value})
    assert status == 200, answer
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(infer_request(), metadata=((KEY_HEADER, value),), timeout=10).outputs


# --max-concurrent-rpcs -----------------------------------------------------------------


def test_health_watch_streams_work_under_the_concurrent_rpc_limit(
    repo: Path, start_server: StartServer
) -> None:
    """grpc.health.v1.Health/Watch writes with `context.write` instead of yielding: under
    the limit it failed with UNKNOWN ("'async for' requires an object with __aiter__
    method, got coroutine") and a "never awaited" warning; it holds a place while open."""
    server = start_server(repo, security=SecurityOptions(max_concurrent_rpcs=1))
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        error: Any = refused.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        watch.cancel()

        def answered() -> bool:
            try:
                return bool(stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name)
            except grpc.RpcError as again:
                if again.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
                    raise
                return False

        wait_until(answered, what="the cancelled watch to give its place back")


def test_probes_are_answered_when_the_limit_is_reached(
    held: tuple[RunningServer, grpc.Channel], gated: Callable[..., GatedInstance]
) -> None:
    """Kubernetes' probes (grpc.health.v1.Health/Check, as deploy/ configures them, and
    REST's /v2/health/*) must not fail because inference is busy: a liveness probe refused
    six times in a row restarts a pod that is only working. Triton has no such limit and
    answers health whatever inference is doing; here the probes are neither counted nor
    refused, while other calls still are."""
    server, channel = held
    health = health_pb2_grpc.HealthStub(channel)
    check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="m"), timeout=10).ready
    with pytest.raises(grpc.RpcError) as refused:
        stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
    error: Any = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A REST inference fills the REST port too (it is refused at once where one limit
    # counts both protocols, and waits behind the held one where each has its own).
    rest_call = threading.Thread(
        target=http, args=(server, "POST", "/v2/models/m/infer", infer_body())
    )
    rest_call.start()
    try:
        wait_until(lambda: http(server, "GET", "/v2")[0] == 503, what="the REST port full")
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/m/ready"):
            status, _, answer = http(server, "GET", path)
            assert status == 200, (path, answer)
    finally:
        gated.instances[0].release()  # type: ignore[attr-defined]
        rest_call.join(30)


def test_one_limit_counts_grpc_and_rest_calls_together(
    held: tuple[RunningServer, grpc.Channel], gated: Callable[..., GatedInstance]
) -> None:
    """`--max-concurrent-rpcs 1` is 'calls in flight in the whole server': with a gRPC
    inference running, a REST inference is refused with 503 (it was served: two calls in
    flight, one per protocol)."""
    server, _ = held
    answers: list[tuple[int, dict[str, str], bytes]] = []
    rest_call = threading.Thread(
        target=lambda: answers.append(http(server, "POST", "/v2/models/m/infer", infer_body()))
    )
    rest_call.start()
    rest_call.join(2)  # a refusal comes at once; a call let in waits for the held one
    gated.instances[0].release()  # type: ignore[attr-defined]
    rest_call.join(30)
    status, _, answer = answers[0]
    assert status == 503, answer
    assert b"--max-concurrent-rpcs" in answer


def requests_then_wait(stream_open: threading.Event) -> Iterator[pb.ModelInferRequest]:
    """One request, then a stream that stays open until `stream_open` is set."""
    yield infer_request()
    stream_open.wait(30)


@pytest.mark.parametrize("leaves", ["cancelled", "deadline", "stream cancelled"])
def test_a_call_that_ends_mid_run_gives_back_its_place(
    repo: Path, start_server: StartServer, gated: Callable[..., GatedInstance], leaves: str
) -> None:
    """Calls whose client cancels or whose deadline passes while the model holds them, three
    times over a limit of 1: each gives its place back, or the server would end by
    refusing everyone."""
    server, gate = one_place_server(repo, start_server, gated)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def answered() -> bool:
            try:
                return bool(stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10).name)
            except grpc.RpcError as refused:
                if refused.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
                    raise
                return False

        for _ in range(3):
            stream_open = threading.Event()
            call: Any
            if leaves == "stream cancelled":
                call = stub.ModelStreamInfer(requests_then_wait(stream_open), timeout=30)
            else:
                timeout = 0.5 if leaves == "deadline" else 30
                call = stub.ModelInfer.future(infer_request(), timeout=timeout)
            assert gate.entered.acquire(timeout=30)
            assert not answered()  # the call holds the one place
            if leaves == "deadline":
                assert call.exception(10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                call.cancel()
            stream_open.set()
            wait_until(answered, what="the place of the call that ended to come back")
            gate.release()  # the batch the model held runs, for nobody
            gate.hold()
    gate.release()

"""Hostile clients through the real port: requests that cost the server far more than
they cost the client, malformed messages, refusals that must be counted, and answers
too large to send. Each test failed on the server before its fix."""

from __future__ import annotations

import logging
import os
import re
import struct
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.security import RestrictedApi, SecurityOptions
from tests.conftest import GatedInstance, RunningServer
from tests.models import identity_model
from tests.process import FerryProcess
from tests.waiting import wait_until

StartServer = Callable[..., RunningServer]
MIB = 1024 * 1024
EMPTY_ELEMENTS = 4_000_000


@pytest.fixture
def text_model(tmp_path: Path) -> Path:
    return identity_model(tmp_path / "repo" / "t" / "1" / "model.onnx", "BYTES", ("batch", "n"))


@pytest.fixture
def text_server(text_model: Path) -> Iterator[FerryProcess]:
    server = FerryProcess(text_model.parents[2], "--metrics-port", "0")
    yield server
    server.close()


def empty_strings_typed(count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="t")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, count])
    tensor.contents.bytes_contents.extend([b""] * count)
    return request


def empty_strings_raw(count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="t")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, count])
    request.raw_input_contents.append(struct.pack("<I", 0) * count)
    return request


def metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            total += float(match.group(2))
    return total


# Peak RSS rise per byte of request, at most. Raw contents (measured: about 4): the message
# in gRPC's buffer, as Python bytes, and parsed. Typed contents (measured: about 18):
# protobuf's parser alone spends about 16 bytes per element (two on the wire) before Ferry
# sees the request; Ferry adds nothing per element. Before this fix: about 160.
@pytest.mark.parametrize(
    ("build", "multiple"),
    [(empty_strings_typed, 24), (empty_strings_raw, 6)],
    ids=["typed", "raw"],
)
def test_millions_of_empty_bytes_elements_are_refused_before_decoding(
    text_server: FerryProcess, build: object, multiple: int
) -> None:
    request = build(EMPTY_ELEMENTS)  # type: ignore[operator]
    size = request.ByteSize()
    with grpc.insecure_channel(
        text_server.address, options=[("grpc.max_send_message_length", 64 * MIB)]
    ) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
        rss_before = text_server.status_value("VmRSS")
        text_server.reset_peak()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=60)
        peak = text_server.status_value("VmHWM")
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in error.details() and "--max-tensor-bytes" in error.details()
    # The request is held once as bytes and once parsed; nothing per element beyond that.
    assert (peak - rss_before) * 1024 < multiple * size, (peak - rss_before, size)


# Counted refusals, malformed messages, answers too large ---------------------------


def tile_model(path: Path, repeats: int) -> Path:
    """y = x tiled `repeats` times along its second axis: small requests, large answers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"])],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "m"])],
        [numpy_helper.from_array(np.array([1, repeats], np.int64), "repeats")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tile_request(values: int, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tile", id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, values])
    request.raw_input_contents.append(np.arange(values, dtype=np.float32).tobytes())
    return request


@pytest.fixture
def tile_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "tiles"
    tile_model(repo / "tile" / "1" / "model.onnx", repeats=65536)  # 4 bytes in, 256 KiB out
    return repo


def samples_of(server: RunningServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def count(server: RunningServer, model: str, code: str) -> float:
    labels = {("model", model), ("code", code), ("protocol", "grpc")}
    key = ("ferry_requests_total", frozenset(labels))
    return samples_of(server).get(key, 0.0)


def test_an_answer_too_large_fails_only_its_own_stream_request(
    tile_repo: Path, start_server: StartServer
) -> None:
    server = start_server(tile_repo, max_message_bytes=MIB)
    requests = [tile_request(1, "a"), tile_request(2, "b"), tile_request(7, "big"),
                tile_request(1, "c"), tile_request(3, "d")]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    by_id = {reply.infer_response.id: reply for reply in replies}
    assert sorted(by_id) == ["a", "b", "big", "c", "d"]
    big = by_id.pop("big")
    assert "--max-message-size" in big.error_message and str(MIB) in big.error_message
    for request_id, reply in by_id.items():
        assert reply.error_message == "", request_id
        values = int(reply.infer_response.outputs[0].shape[1]) // 65536
        out = np.frombuffer(reply.infer_response.raw_output_contents[0], np.float32)
        np.testing.assert_array_equal(out, np.tile(np.arange(values, dtype=np.float32), 65536))
    assert count(server, "tile", "RESOURCE_EXHAUSTED") == 1
    assert count(server, "tile", "OK") == 4


def test_an_answer_too_large_is_a_counted_unary_error(
    tile_repo: Path, start_server: StartServer
) -> None:
    server = start_server(tile_repo, max_message_bytes=MIB)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(tile_request(7), timeout=30)
        assert len(stub.ModelInfer(tile_request(1), timeout=30).raw_output_contents[0]) == 4 * 65536
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"more than {MIB}" in caught.value.details()
    assert "--max-message-size" in caught.value.details()
    assert count(server, "tile", "RESOURCE_EXHAUSTED") == 1


def test_malformed_protobuf_is_invalid_argument_counted_and_logged_once(
    tile_repo: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = start_server(tile_repo)
    caplog.clear()
    with grpc.insecure_channel(server.address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as caught:
                infer(b"\xff" * 8, timeout=10)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == "request is not a valid ModelInferRequest"
        # In a stream, the bad message gets its own error and the stream goes on.
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                       response_deserializer=pb.ModelStreamInferResponse.FromString)
        replies = list(stream(iter([b"\xff" * 8, tile_request(1, "ok").SerializeToString()]),
                              timeout=30))
    assert sorted(reply.error_message for reply in replies) == [
        "", "request is not a valid ModelInferRequest"
    ]
    assert count(server, "_unknown", "INVALID_ARGUMENT") == 201
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "DecodeError" not in records[0].getMessage() and not records[0].exc_info


def test_refusals_before_the_handler_are_counted(
    tile_repo: Path, start_server: StartServer, gated: Callable[..., GatedInstance]
) -> None:
    key = RestrictedApi.parse("inference:infer-key=secret")
    server = start_server(
        tile_repo, wrap_instance=gated,
        security=SecurityOptions(restricted_apis=(key,), max_concurrent_rpcs=1),
    )
    gate: GatedInstance = gated.instances[0]  # type: ignore[attr-defined]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(tile_request(1), timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ModelStreamInfer(iter([tile_request(1)]), timeout=10))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        gate.hold()
        metadata = (("infer-key", "secret"),)
        held = stub.ModelInfer.future(tile_request(1), timeout=30, metadata=metadata)
        assert gate.entered.acquire(timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(tile_request(1), timeout=10, metadata=metadata)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent-rpcs" in caught.value.details()
        gate.release()
        assert held.result().id == ""
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(pb.ModelInferRequest(model_name="nope"), timeout=10, metadata=metadata)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert count(server, "_unknown", "UNAUTHENTICATED") == 4
    assert count(server, "_unknown", "RESOURCE_EXHAUSTED") == 1
    assert count(server, "_unknown", "NOT_FOUND") == 1
    assert count(server, "tile", "OK") == 1
    durations = samples_of(server)
    assert durations["ferry_request_duration_seconds_count",
                     frozenset({("model", "_unknown")})] == 6


# The metrics endpoint ---------------------------------------------------------------


def test_metrics_endpoint_serves_metrics_only_and_bounds_its_connections(
    text_server: FerryProcess,
) -> None:
    import socket
    import urllib.error

    base = f"http://127.0.0.1:{text_server.metrics_port}"
    assert b"ferry_requests_total" in urllib.request.urlopen(f"{base}/metrics", timeout=10).read()
    for path in ("/", "/favicon.ico", "/metricsx", "/../metrics"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{base}{path}", timeout=10)
        assert caught.value.code == 404, path
        caught.value.close()
    threads_before = text_server.status_value("Threads")
    half_open = [
        socket.create_connection(("127.0.0.1", text_server.metrics_port), timeout=10)
        for _ in range(300)
    ]
    try:
        for sock in half_open[-5:]:  # the server has accepted them all by now
            sock.sendall(b"GET /metr")
        assert text_server.status_value("Threads") <= threads_before + 16
    finally:
        for sock in half_open:
            sock.close()
    wait_until(lambda: _scrapes(base), 30, "a scrape once the idle connections left")


def _scrapes(base: str) -> bool:
    try:
        return b"ferry_" in urllib.request.urlopen(f"{base}/metrics", timeout=5).read()
    except OSError:
        return False


# Ports that are taken ---------------------------------------------------------------


def test_a_taken_grpc_port_fails_the_start_naming_it(
    text_server: FerryProcess, text_model: Path
) -> None:
    second = FerryProcess(
        text_model.parents[2], "--metrics-port", "-1", "--grpc-port", str(text_server.port),
        wait_ready=False,
    )
    try:
        assert second.wait(60) != 0
        assert f"127.0.0.1:{text_server.port}" in second.log
        assert "--grpc-port" in second.log
    finally:
        second.close()


def test_a_taken_metrics_port_fails_the_start_naming_it(
    text_server: FerryProcess, text_model: Path
) -> None:
    second = FerryProcess(
        text_model.parents[2], "--metrics-port", str(text_server.metrics_port), wait_ready=False
    )
    try:
        assert second.wait(60) != 0
        assert f"127.0.0.1:{text_server.metrics_port} for metrics" in second.log
    finally:
        second.close()


# Stopping in the middle of a batch -----------------------------------------------------


def slow_model(path: Path, size: int = 512, layers: int = 96) -> Path:
    """x [batch, size, size] multiplied by a matrix `layers` times: a batch that takes
    a good fraction of a second."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.eye(size, dtype=np.float32)
    nodes = []
    previous = "x"
    for index in range(layers):
        out = "y" if index == layers - 1 else f"h{index}"
        nodes.append(helper.make_node("MatMul", [previous, "w"], [out]))
        previous = out
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size, size])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_grace_ending_mid_batch_never_aborts_the_process(tmp_path: Path) -> None:
    import concurrent.futures
    import signal

    repo = tmp_path / "repo"
    slow_model(repo / "slow" / "1" / "model.onnx")
    (repo / "slow" / "config.pbtxt").write_text("max_batch_size: 1\n")
    x = np.ones((1, 512, 512), np.float32)
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    for attempt in range(10):
        server = FerryProcess(repo, "--metrics-port", "-1", "--shutdown-grace", "0.3",
                              "--session-threads", "1")
        try:
            with grpc.insecure_channel(server.address) as channel, \
                    concurrent.futures.ThreadPoolExecutor(4) as pool:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                stub.ServerReady(pb.ServerReadyRequest(), timeout=30)
                busy_from = cpu_seconds(server.pid)
                calls = [pool.submit(stub.ModelInfer, request, timeout=60) for _ in range(4)]
                wait_until(
                    lambda pid=server.pid, since=busy_from: cpu_seconds(pid) > since + 0.1,
                    30, "a batch",
                )
                server.process.send_signal(signal.SIGTERM)
                assert server.wait(60) == 0, (attempt, server.log)
                told = []
                for call in calls:
                    try:
                        told.append("OK" if call.result().outputs else "empty")
                    except grpc.RpcError as error:
                        assert error.code() is grpc.StatusCode.UNAVAILABLE, error
                        told.append(error.details())
            assert "terminate called" not in server.log
            # The queued requests never ran; the running one is told what happened.
            assert all(
                t == "OK" or "before the request ran" in t or "batch was running" in t
                or "shutting down" in t  # reached the server only after the signal
                for t in told
            ), told
        finally:
            server.close()


# Start-up: readiness, failed loads ---------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_accepts(port: int, server: FerryProcess) -> bool:
    """Whether 127.0.0.1:`port` takes a connection now (the server must still run)."""
    import socket

    assert server.process.poll() is None, server.log
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_not_ready_until_every_start_up_model_is_loaded(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repo = tmp_path / "repo"
    tile_model(repo / "a" / "1" / "model.onnx", repeats=2)
    slow_model(repo / "b" / "1" / "model.onnx")
    (repo / "b" / "config.pbtxt").write_text(
        'max_batch_size: 1\nmodel_warmup [ { name: "w" batch_size: 1 count: 4 inputs { '
        'key: "x" value { data_type: TYPE_FP32 dims: [ 512, 512 ] zero_data: true } } } ]\n'
    )
    port = free_port()
    server = FerryProcess(repo, "--metrics-port", "-1", "--grpc-port", str(port), wait_ready=False)
    seen_not_ready = 0
    # The port opens while 'b' warms up (seconds). A channel that tried before the port
    # opened retries only after its reconnect backoff (1 s and more by default), which can
    # outlast the warm-up: poll the port itself, and keep the channel's backoff short.
    fast_reconnect = [("grpc.initial_reconnect_backoff_ms", 20),
                      ("grpc.min_reconnect_backoff_ms", 20),
                      ("grpc.max_reconnect_backoff_ms", 50)]
    try:
        wait_until(lambda: port_accepts(port, server), timeout=60, what=f"port {port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=fast_reconnect) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            stub.ServerLive(pb.ServerLiveRequest(), timeout=60, wait_for_ready=True)
            while True:
                ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
                serving = health.Check(health_pb2.HealthCheckRequest(service=""),
                                       timeout=10).status
                b_ready = stub.ModelReady(pb.ModelReadyRequest(name="b"), timeout=10).ready
                # Asked in this order: whenever the server said ready, b was already.
                assert not (ready and not b_ready), "ready while model 'b' was still loading"
                assert not (serving == health_pb2.HealthCheckResponse.SERVING and not b_ready)
                if b_ready:
                    break
                seen_not_ready += 1
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert seen_not_ready > 0  # the port was open while 'b' loaded
    finally:
        server.close()


def test_explicit_mode_with_nothing_to_load_is_ready(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tile_model(repo / "a" / "1" / "model.onnx", repeats=2)
    server = FerryProcess(repo, "--metrics-port", "-1", "--model-control-mode", "explicit")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            assert not stub.ModelReady(pb.ModelReadyRequest(name="a"), timeout=10).ready
    finally:
        server.close()


def test_a_file_that_is_not_onnx_fails_the_start_naming_it(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\xff" * 50)
    server = FerryProcess(corrupt, "--metrics-port", "-1", wait_ready=False)
    try:
        assert server.wait(60) != 0
        stderr = server.log
        assert f"({corrupt})" in stderr and "not an ONNX model" in stderr, stderr
        assert "corrupt.onnx/corrupt" not in stderr
        assert "Open Inference Protocol on" not in stderr
    finally:
        server.close()
    # Opting out serves what did load: here nothing, but the server runs.
    server = FerryProcess(corrupt, "--metrics-port", "-1", "--exit-on-error=false")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    finally:
        server.close()


@pytest.mark.parametrize("layout", ["only_model_fails", "empty"])
def test_a_repository_with_nothing_to_serve_fails_the_start(tmp_path: Path, layout: str) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    if layout == "only_model_fails":
        (repo / "m" / "1").mkdir(parents=True)
        (repo / "m" / "1" / "model.onnx").write_bytes(b"not a model")
    server = FerryProcess(repo, "--metrics-port", "-1", wait_ready=False)
    try:
        assert server.wait(60) != 0
        assert "cannot start" in server.log
        assert ("model.onnx" if layout == "only_model_fails" else "no model") in server.log
    finally:
        server.close()


# Logs and files a client may point at ------------------------------------------------


def test_client_strings_are_escaped_in_every_log_line(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tile_model(repo / "a" / "1" / "model.onnx", repeats=2)
    server = FerryProcess(repo, "--metrics-port", "-1", "--model-control-mode", "explicit")
    forged = "mm\n2026-01-01 00:00:00,000 ERROR ferry: FORGED\x00"
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for call in (stub.RepositoryModelLoad, stub.RepositoryModelUnload):
                request_type = (pb.RepositoryModelLoadRequest if call is stub.RepositoryModelLoad
                                else pb.RepositoryModelUnloadRequest)
                with pytest.raises(grpc.RpcError):
                    call(request_type(model_name=forged), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(pb.ModelInferRequest(model_name=forged), timeout=10)
        server.process.terminate()
        server.wait(60)
    finally:
        server.close()
    lines = server.log.splitlines()
    assert "\x00" not in server.log
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert any("FORGED" in line for line in lines)


def test_a_warmup_file_linked_out_of_the_model_folder_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 12345)
    repo = tmp_path / "repo"
    tile_model(repo / "m" / "1" / "model.onnx", repeats=2)
    (repo / "m" / "warmup").mkdir()
    (repo / "m" / "warmup" / "x.bin").symlink_to(secret)
    (repo / "m" / "config.pbtxt").write_text(
        'max_batch_size: 1\nmodel_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value '
        '{ data_type: TYPE_FP32 dims: [ 4096 ] input_data_file: "x.bin" } } } ]\n'
    )
    server = FerryProcess(repo, "--metrics-port", "-1", "--exit-on-error=false")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    finally:
        server.close()
    (entry,) = index.models
    assert entry.state == "UNAVAILABLE"
    assert "warmup/x.bin resolves outside the model's folder" in entry.reason
    assert "12345" not in entry.reason and "12345" not in server.log


def test_metrics_connections_that_stay_silent_are_dropped() -> None:
    import socket

    from prometheus_client import CollectorRegistry

    from ferry.server.metrics_http import MetricsHttpServer

    httpd = MetricsHttpServer(("127.0.0.1", 0), CollectorRegistry(), idle_timeout_s=0.2)
    import threading

    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", httpd.server_port), timeout=10) as sock:
            sock.sendall(b"GET /metr")  # and then nothing more
            assert sock.recv(1024) == b""  # closed by the server, long before 10 s
    finally:
        httpd.shutdown()
        httpd.server_close()

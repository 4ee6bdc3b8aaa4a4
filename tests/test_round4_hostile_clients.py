"""Round 4 hostile-client pass over --max-run-memory, REST answers rendered in slices,
--workers' shared REST port and connection count, padded buckets tried again, and the
typed INT64/UINT64 decode path chosen by sampling. Each test is what a malicious or
careless client (or operator) does, through a real port where the feature lives there."""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.rest import MAX_LINGERING_REFUSALS
from ferry.server.runtime import _may_fit_after_freeing
from ferry.server.security import SecurityOptions, TlsFiles
from ferry.server.tensors import VARINT_DECODE_MIN_VALUES, WIDE_VARINT_DECODE_MIN_VALUES
from tests.certificates import Pki
from tests.conftest import RunningServer
from tests.models import identity_model, mlp_model, write_config
from tests.process import FerryProcess
from tests.test_limits_review import https_live
from tests.test_run_memory import ramp_repository, ramp_request
from tests.test_workers_connections import answers, rest_port
from tests.waiting import wait_until
from tests.workers import Workers

StartServer = Callable[..., RunningServer]
MIB = 1024 * 1024
BIG_ANSWERS = [("grpc.max_receive_message_length", 64 * MIB)]


def test_growing_runs_of_one_client_do_not_shrink_the_largest_run_for_good(
    tmp_path: Path,
) -> None:
    """onnxruntime's capped arena keeps every region it took and cannot join free regions:
    one client's runs of 1, 1.5, 3, 6, 12 and 24 MiB (each answered) left regions of
    1 + 2 + ... + 32 MiB, so with the server idle a 40 MiB run, well within the 64 MiB
    --max-run-memory, was refused RESOURCE_EXHAUSTED ("1048320 left") until restart.
    A run refused so is tried once more after the arena gives its free regions back."""
    repo = ramp_repository(tmp_path / "repo")
    with FerryProcess(repo, "--max-run-memory", str(64 * MIB), "--shutdown-grace", "0") as server:
        with grpc.insecure_channel(server.address, options=BIG_ANSWERS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for mib in (0.9, 1.5, 3, 6, 12, 24):
                stub.ModelInfer(ramp_request(int(mib * MIB / 4)), timeout=30)
            answer = stub.ModelInfer(ramp_request(10 * MIB), timeout=30)  # 40 MiB of FP32
            ramp = np.frombuffer(answer.raw_output_contents[0], np.float32)
            assert len(ramp) == 10 * MIB and ramp[-1] == 10 * MIB - 1
            # A run past the cap itself is still refused, and the server still answers.
            try:
                stub.ModelInfer(ramp_request(32 * MIB), timeout=30)  # 128 MiB
                raise AssertionError("a 128 MiB run passed a 64 MiB cap")
            except grpc.RpcError as caught:
                assert caught.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.details()
            again = stub.ModelInfer(ramp_request(10 * MIB), timeout=30)
            assert len(again.raw_output_contents[0]) == 40 * MIB
        assert server.process.poll() is None
    # A run asking for more than the cap is not tried again: no freeing would make it fit.
    def arena_full(requested: int) -> Exception:
        return RuntimeError(
            f"Available memory of 1048320 is smaller than requested bytes of {requested}"
        )

    assert _may_fit_after_freeing(arena_full(40 * MIB), 64 * MIB)
    assert not _may_fit_after_freeing(arena_full(128 * MIB), 64 * MIB)
    assert not _may_fit_after_freeing(arena_full(40 * MIB), 0)  # no cap: not this error


def test_the_run_memory_cap_reaches_the_executor_of_workers_and_rest(tmp_path: Path) -> None:
    """With --workers 2 the runs happen in the executor process: an 8 GiB run against a
    64 MiB cap is refused there, by name, on gRPC and on REST (503), and the server keeps
    answering (before the flag reached it, the executor would have grown to 8 GiB)."""
    repo = ramp_repository(tmp_path / "repo")
    server = Workers(repo, 2, "--max-run-memory", str(64 * MIB))
    try:
        port = rest_port(server)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                stub.ModelInfer(ramp_request(2**31), timeout=60)
                raise AssertionError("an 8 GiB run passed a 64 MiB cap")
            except grpc.RpcError as caught:
                assert caught.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.details()
                assert "--max-run-memory" in (caught.details() or "")
        body = json.dumps({"inputs": [
            {"name": "length", "datatype": "INT64", "shape": [1], "data": [2**31]}
        ]})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v2/models/ramp/infer", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
        assert response.status == 503, (response.status, text)
        assert "--max-run-memory" in json.loads(text)["error"], text
        connection.request("POST", "/v2/models/ramp/infer", body.replace(str(2**31), "3"),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["outputs"][0]["data"] == [0, 1, 2]
        connection.close()
        assert server.stop() == 0
    finally:
        server.close()


def tls_server(
    tmp_path: Path, start_server: StartServer, pki: Pki, max_connections: int
) -> RunningServer:
    """A server with TLS on both ports and `max_connections`, serving one identity model."""
    identity_model(tmp_path / "repo" / "m" / "1" / "model.onnx", "FP32")
    return start_server(
        tmp_path / "repo",
        security=SecurityOptions(
            tls=TlsFiles(pki.server.cert, pki.server.key), max_connections=max_connections
        ),
    )


def test_silent_tls_connections_past_the_limit_are_not_held_without_bound(
    tmp_path: Path, start_server: StartServer, pki: Pki
) -> None:
    """A refused plain connection lingers only while fewer than MAX_LINGERING_REFUSALS do;
    a refused TLS connection was not counted until its handshake ended, so connections
    that never send a ClientHello were each held for the 60 s handshake timeout however
    many came: a client opening them as fast as it could held a socket (and a TLS object)
    of the server per connection. Past the bound they are closed at once."""
    server = tls_server(tmp_path, start_server, pki, max_connections=2)
    host, port = server.http_address.split(":")
    opened: list[socket.socket] = []
    try:
        for _ in range(2 + MAX_LINGERING_REFUSALS + 20):
            opened.append(socket.create_connection((host, int(port)), timeout=10))
        rest = server.server.rest
        wait_until(lambda: rest.open_connections == 2, what="the two places taken")
        for late in opened[-20:]:
            late.settimeout(5)
            try:
                assert late.recv(65536) == b""
            except ConnectionResetError:
                pass
            except TimeoutError:
                raise AssertionError(
                    f"a silent TLS connection past {MAX_LINGERING_REFUSALS} lingering "
                    "refusals was still held"
                ) from None
    finally:
        for connection in opened:
            connection.close()
    wait_until(lambda: server.server.rest.open_connections == 0, what="places given back")
    wait_until(lambda: server.server.rest._connections.lingering == 0, what="no lingering")
    assert https_live(server.http_address, pki.ca.cert_path).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("datatype", ["INT64", "UINT64"])
def test_a_sample_that_misleads_the_decode_path_still_decodes_exactly(
    tmp_path: Path, start_server: StartServer, datatype: str
) -> None:
    """The typed INT64/UINT64 decoder samples 16 values to choose its path: values wide
    only at the sampled positions (or everywhere else), counts either side of the
    thresholds, and the extremes of each range come back exactly, whichever path ran."""
    identity_model(tmp_path / "repo" / "m" / "1" / "model.onnx", datatype, ("batch", -1))
    server = start_server(tmp_path / "repo")
    dtype = np.dtype(np.int64 if datatype == "INT64" else np.uint64)
    info = np.iinfo(dtype)
    wide = np.array([info.min if datatype == "INT64" else info.max, info.max, 1 << 62,
                     (1 << 56), (1 << 56) - 1], dtype=dtype)
    field = "int64_contents" if datatype == "INT64" else "uint64_contents"
    rng = np.random.default_rng(7)
    cases: list[np.ndarray] = []
    for count in (VARINT_DECODE_MIN_VALUES - 1, VARINT_DECODE_MIN_VALUES,
                  VARINT_DECODE_MIN_VALUES + 17, 3 * VARINT_DECODE_MIN_VALUES + 5,
                  WIDE_VARINT_DECODE_MIN_VALUES - 1, WIDE_VARINT_DECODE_MIN_VALUES):
        step = count // 16
        sampled = np.zeros(count, bool)
        sampled[0 : step * 16 : step] = True
        narrow = rng.integers(0, 128, count).astype(dtype)
        only_sampled = narrow.copy()
        only_sampled[sampled] = rng.choice(wide, int(sampled.sum()))
        all_but_sampled = rng.choice(wide, count).astype(dtype)
        all_but_sampled[sampled] = narrow[sampled]
        cases += [only_sampled, all_but_sampled]
    with grpc.insecure_channel(server.address, options=BIG_ANSWERS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for values in cases:
            request = pb.ModelInferRequest(model_name="m")
            tensor = request.inputs.add(name="INPUT0", datatype=datatype,
                                        shape=[1, len(values)])
            getattr(tensor.contents, field).extend(values.tolist())
            answer = stub.ModelInfer(request, timeout=30)
            if answer.raw_output_contents:
                back = np.frombuffer(answer.raw_output_contents[0], dtype)
            else:
                back = np.array(getattr(answer.outputs[0].contents, field), dtype)
            np.testing.assert_array_equal(back, values)
        # Past the range: refused by name, not wrapped.
        if datatype == "INT64":
            return
        request = pb.ModelInferRequest(model_name="m")
        tensor = request.inputs.add(name="INPUT0", datatype="INT64",
                                    shape=[1, VARINT_DECODE_MIN_VALUES])
        tensor.contents.uint64_contents.extend([1 << 63] * VARINT_DECODE_MIN_VALUES)
        try:
            stub.ModelInfer(request, timeout=30)
            raise AssertionError("uint64_contents accepted for an INT64 input")
        except grpc.RpcError as caught:
            assert caught.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.details()


def test_a_full_rest_port_of_workers_warns_once_while_a_client_churns_at_the_limit(
    tmp_path: Path,
) -> None:
    """The 'REST port holds N connections' warning is logged once each time the port fills,
    and again only after it has fallen below three quarters of the limit. With --workers
    each frontend compared its own connections with the server's limit, always below
    three quarters of it, so a client keeping the server full and closing and opening one
    connection at a time got a warning logged for (about) every refusal."""
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    write_config(tmp_path / "m", "max_batch_size: 4\n")
    server = Workers(tmp_path, 2, "--max-connections", "8")
    try:
        port = rest_port(server)
        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(8)]
        for connection in held:
            assert answers(connection)
        refusals = 0
        for _ in range(12):
            held.pop(0).close()
            replacement = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            # The closed place may come back a moment after the close: until it is
            # back, the replacement is refused like the extra one below.
            while not answers(replacement):
                refusals += 1
                replacement = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            held.append(replacement)
            extra = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            assert not answers(extra)
            refusals += 1
        warnings = server.log.count("the REST port holds 8 connections")
        assert warnings <= 2, f"{warnings} warnings for {refusals} refusals"
        for connection in held:
            connection.close()
        assert server.stop() == 0
    finally:
        server.close()


def test_many_callers_past_the_run_memory_cap_at_once_leave_the_server_as_it_was(
    tmp_path: Path,
) -> None:
    """32 runs of 8 GiB and 32 of 1 MiB at once against a 64 MiB cap: every 8 GiB run is
    refused by name (at once: no freeing of the arena could make it fit), every 1 MiB run
    is answered, the server's RSS rises by no more than the cap and the answers, and it
    answers after."""
    repo = ramp_repository(tmp_path / "repo")
    limit = 64 * MIB
    with FerryProcess(repo, "--max-run-memory", str(limit), "--shutdown-grace", "0") as server:
        with grpc.insecure_channel(server.address, options=BIG_ANSWERS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(ramp_request(1000), timeout=30)
            rss_before = server.status_value("VmRSS")
            server.reset_peak()
            lengths = [2**31, MIB // 4] * 32
            calls = [stub.ModelInfer.future(ramp_request(n), timeout=120) for n in lengths]
            for length, call in zip(lengths, calls, strict=True):
                if length == MIB // 4:
                    assert len(call.result().raw_output_contents[0]) == MIB
                    continue
                try:
                    call.result()
                    raise AssertionError("an 8 GiB run passed a 64 MiB cap")
                except grpc.RpcError as caught:
                    assert caught.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.details()
                    assert "--max-run-memory" in (caught.details() or "")
            peak = server.status_value("VmHWM")
            again = stub.ModelInfer(ramp_request(5), timeout=30)
            assert len(again.raw_output_contents[0]) == 20
        assert server.process.poll() is None
    assert server.log.count("RESOURCE_EXHAUSTED") >= 1  # Ferry's own, rate-limited log
    rise_mib = (peak - rss_before) / 1024
    print(f"peak rise {rise_mib:.0f} MiB")
    assert rise_mib < 64 + 32 * 3, rise_mib


def test_a_cap_smaller_than_a_warm_up_fails_the_load_by_name(tmp_path: Path) -> None:
    """An operator's cap below what the model's warm-up needs (4 rows of 4 MiB against
    1 MiB): the thread calibration's failing runs are passed over, the warm-up fails the
    load with the flag and the figures named, and the server exits 1 instead of hanging."""
    root = tmp_path / "repo"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 1 << 20])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 1 << 20])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (root / "wide" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "wide" / "1" / "model.onnx"))
    write_config(root / "wide", """
        max_batch_size: 4
        model_warmup [ { name: "w" batch_size: 4 inputs { key: "x" value {
            data_type: TYPE_FP32 dims: [ 1048576 ] zero_data: true } } } ]
    """)
    server = FerryProcess(root, "--max-run-memory", str(MIB), wait_ready=False)
    try:
        assert server.wait(timeout=60) == 1
        assert re.search(
            r"model 'wide' failed to load: warm-up 'w' failed: the run needs 16777216 "
            r"bytes at once, more than the \d+ left of --max-run-memory \(1048576 bytes",
            server.log,
        ), server.log
    finally:
        server.close()


def test_a_refused_tls_client_that_finishes_its_handshake_reads_the_503(
    tmp_path: Path, start_server: StartServer, pki: Pki
) -> None:
    """Over the limit, a TLS client that finishes its handshake (within the linger time)
    reads the 503 naming --max-connections inside TLS; the places and lingering
    refusals all come back."""
    server = tls_server(tmp_path, start_server, pki, max_connections=1)
    host, port = server.http_address.split(":")
    context = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as held,
    ):
        held.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.recv(65536).startswith(b"HTTP/1.1 200")
        for _ in range(5):
            with (
                socket.create_connection((host, int(port)), timeout=10) as raw_late,
                context.wrap_socket(raw_late, server_hostname="127.0.0.1") as late,
            ):
                late.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while b"retry later" not in answer and (chunk := late.recv(65536)):
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 503"), answer
                assert b"--max-connections" in answer, answer
    rest = server.server.rest
    wait_until(lambda: rest.open_connections == 0, what="places given back")
    wait_until(lambda: rest._connections.lingering == 0, what="no refusal lingering")
    assert https_live(server.http_address, pki.ca.cert_path).startswith(b"HTTP/1.1 200")

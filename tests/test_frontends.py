"""`ferry serve --workers N`: N frontend processes on one port, one executor process that
owns the models. Driven through the real port with tritonclient and grpc, with the
processes started by the real command line."""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from .models import identity_model, mlp_model, write_config
from .waiting import wait_until
from .workers import (
    NOT_SERVING,
    SERVING,
    HealthWatch,
    Workers,
    channels_by_frontend,
    infer_logits,
    infer_request,
    own_connection,
    shm_names,
)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "mlp" / "1" / "model.onnx")
    return tmp_path


def _queued_config(repository: Path, delay_s: float = 30, max_queue_size: int = 0) -> None:
    """Batches of 4 that wait up to `delay_s`: requests stay queued until four have come."""
    delay_us = round(delay_s * 1e6)
    text = f"max_batch_size: 4\ndynamic_batching {{ max_queue_delay_microseconds: {delay_us}"
    if max_queue_size:
        text += f" default_queue_policy {{ max_queue_size: {max_queue_size} }}"
    write_config(repository / "mlp", text + " }\n")


def _stub(channel: grpc.Channel) -> object:
    from ferry.proto import grpc_service_pb2_grpc as pb_grpc

    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def test_requests_from_every_frontend_merge_into_one_batch_with_each_callers_rows(
    repository: Path, workers: list[Workers]
) -> None:
    _queued_config(repository)
    server = Workers(repository, 2)
    workers.append(server)
    roles = server.children()
    assert len(roles["executor"]) == 1 and len(roles["frontend"]) == 2
    # Every frontend answers: two connections on each.
    by_frontend = channels_by_frontend(server, 2)
    channels = [c for held in by_frontend.values() for c in held]
    reference = ort.InferenceSession(str(repository / "mlp" / "1" / "model.onnx"))
    # Rows 1, 2 through the first frontend, then 1, 2 through the second, then 2 through
    # the first: batches of 4 rows form from 1 + 2 + 1 and from 2 + 2, each across both
    # frontends. Each request is queued before the next is sent.
    sends = [(channels[0], 1), (channels[1], 2), (channels[2], 1), (channels[3], 2),
             (channels[0], 2)]
    settled: list[tuple[str, float]] = [
        ("ferry_queue_depth", 1), ("ferry_queue_depth", 2), ("ferry_inferences_total", 4),
        ("ferry_queue_depth", 1), ("ferry_inferences_total", 8),
    ]
    inputs, calls = [], []
    for i, ((channel, rows), (metric, value)) in enumerate(zip(sends, settled, strict=True)):
        x = np.random.default_rng(i).standard_normal((rows, 16)).astype(np.float32)
        inputs.append(x)
        calls.append(_stub(channel).ModelInfer.future(infer_request("mlp", x)))  # type: ignore[attr-defined]
        wait_until(lambda m=metric, v=value: server.metric(m) == v,  # type: ignore[misc]
                   what=f"{metric} == {value}")
    for call, x in zip(calls, inputs, strict=True):
        response = call.result(30)
        index = [o.name for o in response.outputs].index("logits")
        logits = np.frombuffer(response.raw_output_contents[index], np.float32).reshape(-1, 4)
        np.testing.assert_allclose(logits, reference.run(["logits"], {"x": x})[0], rtol=1e-5)

    # One statistics view, whichever frontend is asked: every frontend's requests.
    stats = triton.InferenceServerClient(server.address).get_inference_statistics("mlp")
    model = stats.model_stats[0]
    assert model.inference_count == 8
    assert model.execution_count == 2
    assert [b.batch_size for b in model.batch_stats] == [4]
    assert model.inference_stats.success.count == 5
    assert server.metric("ferry_requests_total") == 5
    assert server.metric("ferry_batches_total") == 2
    for channel in channels:
        channel.close()
    assert server.stop() == 0


def test_cancelled_expired_and_refused_requests_never_run(
    repository: Path, workers: list[Workers]
) -> None:
    # The three requests that fill the queue run together once they have waited 5 s.
    _queued_config(repository, delay_s=5, max_queue_size=3)
    server = Workers(repository, 2)
    workers.append(server)
    x = np.ones((1, 16), np.float32)
    # Expires in the queue: its deadline crossed the process boundary.
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as expired:
        infer_logits(server.address, "mlp", x, timeout=0.5)
    assert "Deadline" in str(expired.value) or "DEADLINE" in str(expired.value)
    assert time.monotonic() - started < 5
    # Cancelled by its caller while queued.
    with grpc.insecure_channel(server.address) as channel:
        call = _stub(channel).ModelInfer.future(infer_request("mlp", x))  # type: ignore[attr-defined]
        wait_until(lambda: server.metric("ferry_queue_depth") == 1, what="queued")
        call.cancel()
        wait_until(lambda: server.metric("ferry_queue_depth") == 0, what="withdrawn")
    # A full queue refuses at once.
    with ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(infer_logits, server.address, "mlp", x * i) for i in range(3)]
        wait_until(lambda: server.metric("ferry_queue_depth") == 3, what="3 queued")
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as full:
            infer_logits(server.address, "mlp", x)
        assert "StatusCode.RESOURCE_EXHAUSTED" in str(full.value.status())
        assert time.monotonic() - started < 2
        for future in waiting:
            assert future.result(30).shape == (1, 4)
    # Only the three that were accepted ran, in one batch.
    model = triton.InferenceServerClient(server.address).get_inference_statistics(
        "mlp").model_stats[0]
    assert (model.execution_count, model.inference_count) == (1, 3)
    assert server.stop() == 0


def test_executor_crash_answers_waiting_callers_unavailable_then_restarts(
    repository: Path, workers: list[Workers]
) -> None:
    _queued_config(repository)
    shm_before = shm_names()
    server = Workers(repository, 2)
    workers.append(server)
    executor = server.children()["executor"][0]
    health = HealthWatch(server.address)
    health.wait_for([SERVING], 10)
    x = np.ones((1, 16), np.float32)
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(infer_logits, server.address, "mlp", x)
        wait_until(lambda: server.metric("ferry_queue_depth") == 1, what="queued")
        os.kill(executor, signal.SIGKILL)
        with pytest.raises(InferenceServerException) as lost:
            waiting.result(10)
    assert "StatusCode.UNAVAILABLE" in str(lost.value.status())
    # NOT_SERVING while the executor is away, then SERVING once it has reloaded.
    health.wait_for([NOT_SERVING, SERVING], 60)
    assert server.children()["executor"] != [executor]
    _queued_config(repository)  # unchanged; the restarted executor read it again
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: infer_logits(server.address, "mlp", x * i), range(4)))
    assert all(a.shape == (1, 4) for a in answers)
    health.close()
    # kill -9 everything: the supervisor first, its children follow it.
    children = [pid for pids in server.children().values() for pid in pids]
    server.process.kill()
    server.process.wait(10)
    for pid in children:
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists()  # type: ignore[misc]
                   or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                   what=f"process {pid} gone")
    assert shm_names() == shm_before


def test_a_frontend_killed_loses_only_its_calls_and_sigterm_drains_the_rest(
    repository: Path, workers: list[Workers]
) -> None:
    # Queued requests run after 5 s: while the drain is under way.
    _queued_config(repository, delay_s=5)
    server = Workers(repository, 2)
    workers.append(server)
    x = np.ones((1, 16), np.float32)
    # One caller through the frontend about to die, two through the other; all queued.
    (victim, doomed), (_, kept) = channels_by_frontend(server, 1).items()
    calls = [_stub(c).ModelInfer.future(infer_request("mlp", x * i))  # type: ignore[attr-defined]
             for i, c in enumerate([doomed[0], kept[0], kept[0]])]
    wait_until(lambda: server.metric("ferry_queue_depth") == 3, what="3 queued")
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(grpc.RpcError):
        calls[0].result(10)
    assert not calls[1].done() and not calls[2].done()
    # The executor withdraws the dead frontend's request; the others stay queued.
    wait_until(lambda: server.metric("ferry_queue_depth") == 2,
               what="the dead frontend's request withdrawn")
    # SIGTERM: every frontend drains, then the executor; what was accepted still runs.
    server.process.send_signal(signal.SIGTERM)
    for call in calls[1:]:
        assert call.result(30).outputs[0].name == "logits"
    assert server.process.wait(30) == 0
    log = server.log
    assert f"frontend process {victim} exited with -9; restarting it" in log
    assert "executor stopped" in log
    for channel in [*doomed, *kept]:
        channel.close()


def test_priorities_hold_across_processes(repository: Path, workers: list[Workers]) -> None:
    write_config(
        repository / "mlp",
        "max_batch_size: 2\ndynamic_batching { max_queue_delay_microseconds: 30000000 "
        "priority_levels: 2 default_priority_level: 2 }\n",
    )
    server = Workers(repository, 2)
    workers.append(server)
    (_, first), (_, second) = channels_by_frontend(server, 1).items()
    low = infer_request("mlp", np.ones((1, 16), np.float32))
    high = infer_request("mlp", np.ones((2, 16), np.float32))
    high.parameters["priority"].int64_param = 1  # type: ignore[attr-defined]
    # A low-priority row waits for company; then two high-priority rows arrive through
    # the other frontend: they fill a batch of their own and run first, ahead of it.
    low_call = _stub(first[0]).ModelInfer.future(low)  # type: ignore[attr-defined]
    wait_until(lambda: server.metric("ferry_queue_depth") == 1, what="low queued")
    high_call = _stub(second[0]).ModelInfer.future(high)  # type: ignore[attr-defined]
    assert len(high_call.result(30).outputs) == 2
    assert not low_call.done()
    low_call.cancel()
    for channel in (*first, *second):
        channel.close()


def test_text_half_precision_large_tensors_and_streams_cross_intact(
    repository: Path, workers: list[Workers]
) -> None:
    identity_model(repository / "text" / "1" / "model.onnx", "BYTES")
    identity_model(repository / "half" / "1" / "model.onnx", "FP16")
    identity_model(repository / "wide" / "1" / "model.onnx", "FP32", ("batch", 5_000_000))
    server = Workers(repository, 2)
    workers.append(server)
    client = triton.InferenceServerClient(server.address)

    def echo(model: str, datatype: str, array: np.ndarray) -> np.ndarray:
        data = triton.InferInput("INPUT0", list(array.shape), datatype)
        data.set_data_from_numpy(array)
        result = client.infer(model, [data]).as_numpy("OUTPUT0")
        assert result is not None
        return result

    # BYTES are Python objects: they travel inside the message, not in shared memory.
    text = np.array([["a", "", "ünï", "x" * 1000]], dtype=object)
    assert [v.decode() for v in echo("text", "BYTES", text).ravel()] == list(text.ravel())
    half = np.arange(8, dtype=np.float16).reshape(2, 4)
    np.testing.assert_array_equal(echo("half", "FP16", half), half)
    # 2 x 20 MB: more than a 32 MiB region holds; the tensor goes inline, intact.
    wide = np.random.default_rng(0).standard_normal((2, 5_000_000)).astype(np.float32)
    np.testing.assert_array_equal(echo("wide", "FP32", wide), wide)
    # A stream's requests go through the same hand-off; each answer matches its request.
    from ferry.proto import grpc_service_pb2 as pb

    requests = []
    for i in range(8):
        request = pb.ModelInferRequest(model_name="half", id=f"r{i}")
        request.inputs.add(name="INPUT0", datatype="FP16", shape=[1, 4])
        request.raw_input_contents.append(np.full((1, 4), i, np.float16).tobytes())
        requests.append(request)
    with own_connection(server.address) as channel:
        replies = list(_stub(channel).ModelStreamInfer(iter(requests), timeout=30))  # type: ignore[attr-defined]
    for reply in replies:
        index = int(reply.infer_response.id[1:])
        values = np.frombuffer(reply.infer_response.raw_output_contents[0], np.float16)
        assert reply.error_message == "" and (values == index).all()
    assert sorted(r.infer_response.id for r in replies) == sorted(r.id for r in requests)
    client.close()

    # The executor's socket name is on every command line; a process that is not one of
    # the server's own is turned away before anything is read from it.
    executor = server.children()["executor"][0]
    command = Path(f"/proc/{executor}/cmdline").read_bytes().split(b"\0")
    name = command[command.index(b"--executor-socket") + 1].decode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
        stranger.connect("\0" + name)
        stranger.settimeout(10)
        assert stranger.recv(1) == b""  # closed, with no catalog sent
    server.wait_for("handshake failed: the peer is not a process of this server")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_an_executor_that_cannot_come_back_stops_the_server_with_exit_code_1(
    repository: Path, workers: list[Workers]
) -> None:
    server = Workers(repository, 2)
    workers.append(server)
    roles = server.children()
    os.kill(roles["executor"][0], signal.SIGKILL)
    # Reaped by the supervisor: every thread of it is gone, its sockets closed.
    server.wait_for(f"executor process {roles['executor'][0]} exited with -9")
    # Its replacement needs the metrics port, which is now taken: it cannot start.
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", server.metrics_port))
        blocker.listen()
        assert server.process.wait(60) == 1
    assert all(_gone(pid) for pid in roles["frontend"])
    server.wait_for("the executor cannot start")

"""The lifecycle of a `ferry serve` process, seen from outside: readiness while models
load and warm up, with nothing to serve, with a model that fails, and while draining;
and the exit codes (0 after a drain, 1 when the port is taken, 2 for bad arguments)."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.server.workers import free_port
from tests.models import mlp_model, spin_model, write_config
from tests.process import FerryProcess, infer, metric, serve_command
from tests.waiting import wait_until

StartProcess = Callable[..., FerryProcess]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str, service: str = "") -> int | None:
    """The health service's answer, or None while nothing answers."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError:
            return None
        return int(reply.status)


def ready(address: str) -> bool:
    with triton.InferenceServerClient(address) as client:
        return bool(client.is_server_ready())


def test_not_ready_until_every_model_has_warmed_up(
    tmp_path: Path, ferry_process: StartProcess
) -> None:
    repo = tmp_path / "repo"
    spin_model(repo / "m" / "1" / "model.onnx")
    (repo / "m" / "warmup").mkdir()
    # The warm-up sample spins about a second: the port is open, the model is not ready.
    np.full(4, 1e6, np.float32).tofile(repo / "m" / "warmup" / "spin.bin")
    write_config(repo / "m", """
        max_batch_size: 1
        model_warmup [ { name: "slow" batch_size: 1 inputs { key: "x" value {
          data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "spin.bin" } } } ]
        """)
    port = free_port("127.0.0.1")
    address = f"127.0.0.1:{port}"
    server = ferry_process(repo, "--grpc-port", str(port), wait_ready=False)
    wait_until(lambda: health(address) is not None, timeout=30, what="the port to open")
    assert "serving the Open Inference Protocol on " not in server.log
    assert health(address) == NOT_SERVING
    assert health(address, "m") == NOT_SERVING
    assert not ready(address)
    server.wait_for("serving the Open Inference Protocol on ", timeout=60)
    assert health(address) == SERVING and health(address, "m") == SERVING
    assert ready(address)
    assert server.stop() == 0


def test_an_explicit_server_with_an_empty_start_up_set_is_ready_and_loads_on_request(
    tmp_path: Path, ferry_process: StartProcess
) -> None:
    """As Triton's: behind a readiness probe, a load call must be able to reach it."""
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx")
    server = ferry_process(repo, "--model-control-mode", "explicit")
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert not client.is_model_ready("m")
        assert health(server.address) == SERVING
        client.load_model("m")
        assert client.is_server_ready() and client.is_model_ready("m")
        assert health(server.address) == SERVING
    assert server.stop() == 0


def test_a_model_that_fails_to_load_keeps_the_server_unready_and_the_others_serving(
    tmp_path: Path, ferry_process: StartProcess
) -> None:
    repo = tmp_path / "repo"
    mlp_model(repo / "good" / "1" / "model.onnx")
    (repo / "bad" / "1").mkdir(parents=True)
    (repo / "bad" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    # The default is to exit (tests/test_hardening.py); this is the opt-out.
    server = ferry_process(repo, "--exit-on-error=false")
    assert "model 'bad'" in server.log and "failed to load" in server.log
    assert health(server.address) == NOT_SERVING
    assert health(server.address, "good") == SERVING
    assert health(server.address, "bad") == NOT_SERVING
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_server_live() and not client.is_server_ready()
        assert client.is_model_ready("good") and not client.is_model_ready("bad")
    x = np.ones((1, 16), np.float32)
    assert infer(server.address, x, model="good", output_name="probs")[0] == "OK"
    assert infer(server.address, x, model="bad", output_name="probs")[0] == "UNAVAILABLE"
    assert server.stop() == 0


def test_draining_reports_not_serving_refuses_new_work_and_finishes_the_old(
    tmp_path: Path, ferry_process: StartProcess
) -> None:
    repo = tmp_path / "repo"
    spin_model(repo / "m" / "1" / "model.onnx")
    write_config(repo / "m", "max_batch_size: 1\n")
    server = ferry_process(repo, "--shutdown-grace", "30", "--metrics-port", "0")
    spins = (5e5, 5e5 + 1)  # about half a second each, one after the other
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        accepted = [pool.submit(infer, server.address, np.full((1, 4), n, np.float32))
                    for n in spins]
        # One runs and one waits: both were accepted before the signal.
        wait_until(lambda: metric(server.scrape(), "ferry_queue_depth", model="m") == 1,
                   timeout=30, what="one request queued behind the other")
        server.send_signal(signal.SIGTERM)
        server.wait_for("SIGTERM received: draining", timeout=10)
        assert health(server.address) == NOT_SERVING
        assert not ready(server.address)
        assert infer(server.address, np.zeros((1, 4), np.float32))[0] == "UNAVAILABLE"
        outcomes = [future.result(timeout=60) for future in accepted]
    for n, (status, y) in zip(spins, outcomes, strict=True):
        assert status == "OK" and y is not None and y[0, 0] == n
    assert server.wait(timeout=30) == 0


def test_a_port_in_use_exits_1(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "m.onnx")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(serve_command(model, "--grpc-port", str(port)),
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "cannot start" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}"], "does not exist"),
        (["{model}", "--grpc-port", "70000"], "70000"),
        (["{model}", "--shutdown-grace", "-1"], "shutdown grace"),
        (["{model}", "--workers", "0"], "--workers must be at least 1"),
        (["{model}", "--poll-repository", "0"], "poll"),
        (["{model}", "--no-such-flag"], "--no-such-flag"),
    ],
    ids=["missing-path", "port", "grace", "workers", "poll", "unknown-flag"],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    model = mlp_model(tmp_path / "m.onnx")
    given = [a.format(missing=tmp_path / "nowhere", model=model) for a in args]
    done = subprocess.run(serve_command(given[0], *given[1:]), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr

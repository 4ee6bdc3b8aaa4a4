"""Overload, deadlines, cancellation, priorities and reloads through the real gRPC port.

Execution is held still with the `gated` fixture, so every scenario is deterministic:
nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, write_config
from tests.waiting import wait_until

FEATURES = 16


def make_repo(root: Path, config: str) -> Path:
    repo = root / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES)
    write_config(repo / "m", config)
    return repo


def rows(marker: float, count: int = 1) -> np.ndarray:
    """Input rows that identify their request: every element is `marker`."""
    return np.full((count, FEATURES), marker, dtype=np.float32)


def expected_logits(repo: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo / "m" / "1" / "model.onnx"))
    return session.run(["logits"], {"x": x})[0]


def infer(address: str, x: np.ndarray, **kwargs: object) -> np.ndarray:
    with triton.InferenceServerClient(address) as client:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("m", [tensor], **kwargs)  # type: ignore[arg-type]
        return result.as_numpy("logits")


def markers_seen(gate: GatedInstance) -> set[float]:
    return {float(v) for batch in gate.batches for v in np.unique(batch["x"])}


def queue_depth(server: RunningServer) -> int:
    return server.server.manager.get("m").scheduler.queue_depth


@pytest.fixture
def pool() -> concurrent.futures.ThreadPoolExecutor:
    with concurrent.futures.ThreadPoolExecutor(16) as executor:
        yield executor


def start_held(
    start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance], repo: Path
) -> tuple[RunningServer, GatedInstance]:
    server = start_server(repo, wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    gate.hold()
    return server, gate


def test_full_queue_rejects_at_once_and_loses_nothing(
    tmp_path: Path, start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    repo = make_repo(
        tmp_path,
        "max_batch_size: 8\ndynamic_batching { default_queue_policy { max_queue_size: 4 } }\n",
    )
    server, gate = start_held(start_server, gated, repo)
    running = pool.submit(infer, server.address, rows(100.0))
    assert gate.entered.acquire(timeout=10)  # the first batch is inside the model
    queued = [pool.submit(infer, server.address, rows(float(i))) for i in range(4)]
    wait_until(lambda: queue_depth(server) == 4, what="four queued requests")

    for marker in (50.0, 51.0):
        with pytest.raises(InferenceServerException) as rejected:
            infer(server.address, rows(marker))
        assert rejected.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue is full" in rejected.value.message()
    assert queue_depth(server) == 4  # the queued requests are untouched

    gate.release()
    np.testing.assert_allclose(running.result(30), expected_logits(repo, rows(100.0)), rtol=1e-6)
    for i, future in enumerate(queued):
        np.testing.assert_allclose(future.result(30), expected_logits(repo, rows(float(i))),
                                   rtol=1e-6)
    assert {50.0, 51.0}.isdisjoint(markers_seen(gate))


def test_client_deadline_expires_in_queue_and_is_never_computed(
    tmp_path: Path, start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    repo = make_repo(tmp_path, "max_batch_size: 8\n")
    server, gate = start_held(start_server, gated, repo)
    running = pool.submit(infer, server.address, rows(1.0))
    assert gate.entered.acquire(timeout=10)

    with pytest.raises(InferenceServerException) as expired:
        infer(server.address, rows(2.0), client_timeout=0.2)
    assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    wait_until(lambda: queue_depth(server) == 0, what="the expired request to leave the queue")

    gate.release()
    running.result(30)
    infer(server.address, rows(3.0))  # the model keeps serving
    assert 2.0 not in markers_seen(gate)
    assert markers_seen(gate) == {1.0, 3.0}


def test_a_deadline_the_client_and_the_queue_share_logs_no_error(
    tmp_path: Path, start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance],
    pool: concurrent.futures.ThreadPoolExecutor, caplog: pytest.LogCaptureFixture,
) -> None:
    """The queue answers a request at the caller's own deadline, the moment gRPC's core
    ends the call: answering it then fails ("execute_batch"), which is no error of the
    server's. It was logged as an unexpected error with a traceback, about 20 lines per
    request that timed out: a client could fill the log by sending short deadlines."""
    repo = make_repo(tmp_path, "max_batch_size: 8\n")
    server, gate = start_held(start_server, gated, repo)
    running = pool.submit(infer, server.address, rows(1.0))
    assert gate.entered.acquire(timeout=10)
    caplog.set_level(logging.INFO)
    expiring = [pool.submit(infer, server.address, rows(2.0), client_timeout=0.2)
                for _ in range(12)]
    for future in expiring:
        with pytest.raises(InferenceServerException) as expired:
            future.result(30)
        assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    wait_until(lambda: queue_depth(server) == 0, what="the expired requests to leave the queue")
    gate.release()
    running.result(30)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_model_queue_timeout_answers_deadline_exceeded_from_the_server(
    tmp_path: Path, start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    repo = make_repo(
        tmp_path,
        "max_batch_size: 8\n"
        "dynamic_batching { default_queue_policy { default_timeout_microseconds: 50000 } }\n",
    )
    server, gate = start_held(start_server, gated, repo)
    running = pool.submit(infer, server.address, rows(1.0))
    assert gate.entered.acquire(timeout=10)

    # No client deadline at all: the server's queue policy is what answers.
    with pytest.raises(InferenceServerException) as expired:
        infer(server.address, rows(2.0))
    assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "timed out" in expired.value.message()

    gate.release()
    running.result(30)
    assert 2.0 not in markers_seen(gate)


def test_timeout_parameter_overrides_when_allowed(
    tmp_path: Path, start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    repo = make_repo(
        tmp_path,
        "max_batch_size: 8\n"
        "dynamic_batching { default_queue_policy { allow_timeout_override: true } }\n",
    )
    server, gate = start_held(start_server, gated, repo)
    running = pool.submit(infer, server.address, rows(1.0))
    assert gate.entered.acquire(timeout=10)
    with pytest.raises(InferenceServerException) as expired:
        infer(server.address, rows(2.0), timeout=30_000)  # microseconds, Triton's parameter
    assert expired.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    gate.release()
    running.result(30)
    assert 2.0 not in markers_seen(gate)


def test_cancelled_request_leaves_the_queue_and_is_never_computed(
    tmp_path: Path, start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    repo = make_repo(tmp_path, "max_batch_size: 8\n")
    server, gate = start_held(start_server, gated, repo)
    running = pool.submit(infer, server.address, rows(1.0))
    assert gate.entered.acquire(timeout=10)

    results: list[object] = []
    with triton.InferenceServerClient(server.address) as client:
        tensor = triton.InferInput("x", [1, FEATURES], "FP32")
        tensor.set_data_from_numpy(rows(2.0))
        call = client.async_infer("m", [tensor], callback=lambda r, e: results.append(e or r))
        wait_until(lambda: queue_depth(server) == 1, what="the request to be queued")
        call.cancel()
        wait_until(lambda: queue_depth(server) == 0, what="the cancelled request to leave")

    gate.release()
    running.result(30)
    infer(server.address, rows(3.0))
    assert markers_seen(gate) == {1.0, 3.0}


def test_higher_priority_runs_first_and_old_requests_age_forward(
    tmp_path: Path, start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    # Batches of one row make the execution order visible.
    repo = make_repo(
        tmp_path,
        "max_batch_size: 1\n"
        "dynamic_batching { priority_levels: 2 default_priority_level: 2 }\n"
        'parameters { key: "priority_aging_microseconds" value { string_value: "600000000" } }\n',
    )
    server, gate = start_held(start_server, gated, repo)
    first = pool.submit(infer, server.address, rows(0.0))
    assert gate.entered.acquire(timeout=10)
    low = []
    for i in range(2):  # one at a time, so that their order in the queue is known
        low.append(pool.submit(infer, server.address, rows(float(10 + i))))
        wait_until(lambda n=i + 1: queue_depth(server) == n, what="a low-priority request")
    high = pool.submit(infer, server.address, rows(1.0), priority=1)
    wait_until(lambda: queue_depth(server) == 3, what="the high-priority request")

    gate.release()
    for future in (first, high, *low):
        future.result(30)
    order = [float(batch["x"][0, 0]) for batch in gate.batches]
    assert order == [0.0, 1.0, 10.0, 11.0]


def test_priority_aging_serves_a_waiting_low_priority_request(
    tmp_path: Path, start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    repo = make_repo(
        tmp_path,
        "max_batch_size: 1\n"
        "dynamic_batching { priority_levels: 2 default_priority_level: 2 }\n"
        'parameters { key: "priority_aging_microseconds" value { string_value: "0" } }\n',
    )
    server, gate = start_held(start_server, gated, repo)
    first = pool.submit(infer, server.address, rows(0.0))
    assert gate.entered.acquire(timeout=10)
    low = pool.submit(infer, server.address, rows(10.0))
    wait_until(lambda: queue_depth(server) == 1, what="the low-priority request")
    high = pool.submit(infer, server.address, rows(1.0), priority=1)
    wait_until(lambda: queue_depth(server) == 2, what="the high-priority request")
    gate.release()
    for future in (first, low, high):
        future.result(30)
    # With aging at 0 every waiting request has aged: plain arrival order.
    assert [float(batch["x"][0, 0]) for batch in gate.batches] == [0.0, 10.0, 1.0]


def test_priority_outside_the_levels_is_invalid(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    repo = make_repo(tmp_path, "max_batch_size: 4\ndynamic_batching { priority_levels: 2 }\n")
    server = start_server(repo)
    with pytest.raises(InferenceServerException) as invalid:
        infer(server.address, rows(1.0), priority=3)
    assert invalid.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "priority 3" in invalid.value.message()


def test_reload_under_load_loses_no_request(
    tmp_path: Path, start_server: Callable[..., RunningServer],
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    repo = make_repo(tmp_path, "max_batch_size: 8\n")
    server = start_server(repo, poll_repository_s=3600.0)  # polled by hand below
    poller = server.server._poller
    assert poller is not None
    old = expected_logits(repo, rows(1.0))

    stop = False
    outcomes: list[np.ndarray] = []

    def client_loop() -> None:
        with triton.InferenceServerClient(server.address) as client:
            tensor = triton.InferInput("x", [1, FEATURES], "FP32")
            tensor.set_data_from_numpy(rows(1.0))
            while not stop:
                outcomes.append(client.infer("m", [tensor]).as_numpy("logits"))

    loops = [pool.submit(client_loop) for _ in range(4)]
    wait_until(lambda: len(outcomes) > 20, what="traffic before the reload")
    # A new model file with other weights: the poller sees the change and reloads.
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES, seed=1)
    new = expected_logits(repo, rows(1.0))
    server.call(poller.poll_once())
    count = len(outcomes)
    wait_until(lambda: len(outcomes) > count + 20, what="traffic after the reload")
    stop = True
    for loop in loops:
        loop.result(30)  # raises if any request failed

    assert not np.allclose(old, new)
    assert all(np.allclose(o, old, rtol=1e-5) or np.allclose(o, new, rtol=1e-5)
               for o in outcomes)
    assert np.allclose(outcomes[-1], new, rtol=1e-5)


def test_poller_loads_new_and_unloads_removed_models(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    repo = make_repo(tmp_path, "max_batch_size: 8\n")
    server = start_server(repo, poll_repository_s=3600.0)
    poller = server.server._poller
    assert poller is not None
    with triton.InferenceServerClient(server.address) as client:
        mlp_model(repo / "extra" / "1" / "model.onnx", features=FEATURES)
        server.call(poller.poll_once())
        assert client.is_model_ready("extra")

        # A broken replacement fails to load and leaves the running version serving.
        (repo / "extra" / "1" / "model.onnx").write_bytes(b"not an onnx model")
        server.call(poller.poll_once())
        assert client.is_model_ready("extra")

        import shutil

        shutil.rmtree(repo / "extra")
        server.call(poller.poll_once())
        assert not client.is_model_ready("extra")
        assert client.is_model_ready("m")

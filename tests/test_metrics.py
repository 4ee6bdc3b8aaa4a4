"""Prometheus metrics, Triton statistics and logs after a known amount of traffic.

Execution is held with the `gated` fixture so that the batches are known in advance:
the first request runs alone while the other 49 queue up, then they run in batches of
max_batch_size.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from ferry.server.errors import Status
from ferry.server.logs import AccessLog, JsonFormatter, MalformedHttpLog, RejectionLog
from ferry.server.metrics import LATENCY_BUCKETS_S, ServerMetrics, batch_size_bounds
from ferry.server.outcomes import RequestOutcome
from ferry.server.scheduler import BatchTimings
from ferry.server.workers import free_port
from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, write_config
from tests.process import FerryProcess, listening_ports
from tests.waiting import wait_until

FEATURES = 16
MAX_BATCH = 8

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def outcome(model: str, code: str, duration_ns: int, message: str = "") -> RequestOutcome:
    return RequestOutcome(model, "1" if model else "", Status[code], duration_ns, message)


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES)
    write_config(repo / "m", f"max_batch_size: {MAX_BATCH}\ndynamic_batching {{ }}\n")
    return repo


def scrape_text(server: RunningServer) -> str:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return str(response.read().decode())


def scrape(server: RunningServer) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(scrape_text(server)):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def infer_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), "FP32" if x.dtype == np.float32 else "FP64")
    tensor.set_data_from_numpy(x)
    return tensor


@pytest.fixture
def client_of() -> Iterator[Callable[[RunningServer], triton.InferenceServerClient]]:
    clients: list[triton.InferenceServerClient] = []

    def connect(server: RunningServer) -> triton.InferenceServerClient:
        client = triton.InferenceServerClient(server.address)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def send_known_traffic(
    server: RunningServer, gate: GatedInstance, client: triton.InferenceServerClient
) -> None:
    """50 one-row requests in batches [1, 8, 8, 8, 8, 8, 8, 1], then 3 invalid ones."""
    done = threading.Semaphore(0)
    errors: list[object] = []

    def finished(result: object, error: object) -> None:
        if error is not None:
            errors.append(error)
        done.release()

    scheduler = server.server.manager.get("m").scheduler
    gate.hold()
    client.async_infer("m", [infer_input(np.zeros((1, FEATURES), np.float32))], finished)
    assert gate.entered.acquire(timeout=10)
    for i in range(49):
        x = np.full((1, FEATURES), i, np.float32)
        client.async_infer("m", [infer_input(x)], finished)
    wait_until(lambda: scheduler.queue_depth == 49, what="49 queued requests")
    assert value(scrape(server), "ferry_queue_depth", model="m") == 49
    gate.release()
    for _ in range(50):
        assert done.acquire(timeout=30)
    assert errors == []
    assert gate.batch_rows == [1, 8, 8, 8, 8, 8, 8, 1]
    for _ in range(3):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("m", [infer_input(np.zeros((1, FEATURES), np.float64))])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_scraped_metrics_match_known_traffic_exactly(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    gated: Callable[..., GatedInstance],
    client_of: Callable[[RunningServer], triton.InferenceServerClient],
) -> None:
    server = start_server(make_repo(tmp_path), wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    client = client_of(server)
    send_known_traffic(server, gate, client)
    for _ in range(2):
        with pytest.raises(InferenceServerException):
            client.infer("no-such-model", [infer_input(np.zeros((1, FEATURES), np.float32))])

    s = scrape(server)
    batches = gate.batch_rows
    assert value(s, "ferry_requests_total", model="m", code="OK", protocol="grpc") == 50
    requests = "ferry_requests_total"
    assert value(s, requests, model="m", code="INVALID_ARGUMENT", protocol="grpc") == 3
    assert value(s, requests, model="_unknown", code="NOT_FOUND", protocol="grpc") == 2
    assert {labels for name, labels in s if name == "ferry_requests_total"} == {
        frozenset({("model", "m"), ("code", "OK"), ("protocol", "grpc")}),
        frozenset({("model", "m"), ("code", "INVALID_ARGUMENT"), ("protocol", "grpc")}),
        frozenset({("model", "_unknown"), ("code", "NOT_FOUND"), ("protocol", "grpc")}),
    }
    assert value(s, "ferry_request_duration_seconds_count", model="m") == 53
    assert value(s, "ferry_queue_duration_seconds_count", model="m") == 50
    assert value(s, "ferry_compute_duration_seconds_count", model="m") == len(batches)
    assert value(s, "ferry_inferences_total", model="m") == 50
    assert value(s, "ferry_batches_total", model="m") == len(batches) == 8
    assert value(s, "ferry_queue_depth", model="m") == 0
    assert value(s, "ferry_model_ready", model="m") == 1

    # Batch sizes: buckets at powers of two up to max_batch_size, exact counts.
    buckets = {
        dict(labels)["le"]: v
        for (name, labels), v in s.items()
        if name == "ferry_batch_size_bucket" and ("model", "m") in labels
    }
    assert buckets == {"1.0": 2, "2.0": 2, "4.0": 2, "8.0": 8, "+Inf": 8}
    assert value(s, "ferry_batch_size_count", model="m") == 8
    assert value(s, "ferry_batch_size_sum", model="m") == 50

    # Latency histograms resolve sub-millisecond times, and each request is in +Inf.
    queue_buckets = sorted(
        float(dict(labels)["le"])
        for (name, labels), _ in s.items()
        if name == "ferry_queue_duration_seconds_bucket"
    )
    assert queue_buckets[0] <= 50e-6
    assert value(s, "ferry_queue_duration_seconds_bucket", model="m", le="+Inf") == 50

    # The sums agree with the Triton statistics, which count in integer nanoseconds.
    stats = client.get_inference_statistics("m").model_stats[0]
    inference = stats.inference_stats
    assert value(s, "ferry_request_duration_seconds_sum", model="m") == pytest.approx(
        (inference.success.ns + inference.fail.ns) / 1e9, abs=1e-6
    )
    assert value(s, "ferry_queue_duration_seconds_sum", model="m") == pytest.approx(
        inference.queue.ns / 1e9, abs=1e-6
    )
    compute_ns = sum(b.compute_infer.ns for b in stats.batch_stats)
    assert value(s, "ferry_compute_duration_seconds_sum", model="m") == pytest.approx(
        compute_ns / 1e9, abs=1e-6
    )


def test_model_statistics_are_exact_after_known_traffic(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    gated: Callable[..., GatedInstance],
    client_of: Callable[[RunningServer], triton.InferenceServerClient],
) -> None:
    server = start_server(make_repo(tmp_path), wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    client = client_of(server)
    send_known_traffic(server, gate, client)

    response = client.get_inference_statistics("m")
    assert [(m.name, m.version) for m in response.model_stats] == [("m", "1")]
    stats = response.model_stats[0]
    assert stats.inference_count == 50  # rows
    assert stats.execution_count == 8  # batches
    assert stats.last_inference > 0
    inference = stats.inference_stats
    assert inference.success.count == 50
    assert inference.fail.count == 3
    assert inference.success.ns > 0 and inference.fail.ns > 0
    # queue and compute are counted per successful request, as Triton does
    for duration in (
        inference.queue,
        inference.compute_input,
        inference.compute_infer,
        inference.compute_output,
    ):
        assert duration.count == 50
    by_size = {b.batch_size: b for b in stats.batch_stats}
    assert sorted(by_size) == [1, 8]
    assert by_size[1].compute_infer.count == 2
    assert by_size[8].compute_infer.count == 6
    for entry in by_size.values():
        assert entry.compute_input.count == entry.compute_infer.count
        assert entry.compute_output.count == entry.compute_infer.count
    # Each request is charged the compute time of its batch.
    charged = sum(b.compute_infer.ns * b.batch_size for b in stats.batch_stats)
    assert inference.compute_infer.ns == charged
    # The JSON form that perf_analyzer and tritonclient users read has the same figures.
    as_json = client.get_inference_statistics("m", as_json=True)
    assert int(as_json["model_stats"][0]["inference_count"]) == 50
    assert int(as_json["model_stats"][0]["inference_stats"]["fail"]["count"]) == 3


def test_each_server_has_its_own_registry(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    client_of: Callable[[RunningServer], triton.InferenceServerClient],
) -> None:
    repo = make_repo(tmp_path)
    first, second = start_server(repo), start_server(repo)
    assert first.server.metrics_port != second.server.metrics_port
    client_of(first).infer("m", [infer_input(np.zeros((2, FEATURES), np.float32))])
    assert value(scrape(first), "ferry_inferences_total", model="m") == 2
    untouched = scrape(second)
    # a loaded model's series start at 0, so that rate() sees the first increase
    assert value(untouched, "ferry_inferences_total", model="m") == 0
    assert value(untouched, "ferry_batch_size_count", model="m") == 0
    assert value(untouched, "ferry_model_ready", model="m") == 1
    # the standard process and Python collectors are there too
    names = {name for name, _ in untouched}
    assert {"process_cpu_seconds_total", "python_info", "python_gc_collections_total"} <= names


def test_no_metrics_endpoint_when_turned_off(
    tmp_path: Path, ferry_process: Callable[..., FerryProcess]
) -> None:
    """`--metrics-port -1` (the last value wins) leaves the port of an earlier
    `--metrics-port P` closed: connecting to it is refused, and the process listens on
    its gRPC port only. The same P with metrics on answers, so the probe can see one."""
    repo = make_repo(tmp_path)
    port = free_port("127.0.0.1")
    on = ferry_process(repo, "--metrics-port", str(port))
    assert on.metrics_port == port
    assert listening_ports(on.pid) == {on.port, port}
    assert "ferry_requests_total" in on.scrape()
    assert on.stop() == 0

    off = ferry_process(repo, "--metrics-port", str(port), "--metrics-port", "-1")
    assert off.metrics_port == 0
    assert listening_ports(off.pid) == {off.port}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "Prometheus" not in off.log
    assert off.stop() == 0


def test_batch_size_buckets_follow_the_largest_max_batch_size() -> None:
    assert batch_size_bounds(1) == [1]
    assert batch_size_bounds(8) == [1, 2, 4, 8]
    assert batch_size_bounds(48) == [1, 2, 4, 8, 16, 32, 64]
    assert LATENCY_BUCKETS_S[0] < 1e-4


def test_failed_batches_count_only_as_failed_requests() -> None:
    metrics = ServerMetrics()
    (observer,) = metrics.observers_for("m", "1")
    observer.batch_executed(BatchTimings(4, 2, (10, 20), 1, 1000, 1, failed=True))
    observer.batch_executed(BatchTimings(3, 2, (1000, 3000), 1, 2000, 1, failed=False))
    metrics.request_finished(outcome("m", "INTERNAL", 5000, "boom"))
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    assert value(samples, "ferry_batches_total", model="m") == 1
    assert value(samples, "ferry_inferences_total", model="m") == 3
    assert value(samples, "ferry_queue_duration_seconds_sum", model="m") == pytest.approx(4e-6)
    assert value(samples, "ferry_compute_duration_seconds_sum", model="m") == pytest.approx(2e-6)
    assert value(samples, "ferry_requests_total", model="m", code="INTERNAL", protocol="grpc") == 1


# Logs --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rejections_are_logged_once_per_class_and_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    rejections = RejectionLog(interval_s=60.0, clock=clock)
    caplog.set_level(logging.INFO, logger="ferry")
    for _ in range(5):
        rejections.request_finished(outcome("m", "INVALID_ARGUMENT", 1000, 'input "x": wrong'))
    rejections.request_finished(outcome("m", "RESOURCE_EXHAUSTED", 1000, "queue full"))
    rejections.request_finished(outcome("m", "OK", 1000))
    rejections.request_finished(outcome("m", "CANCELLED", 1000))
    lines = [r.getMessage() for r in caplog.records if r.name == "ferry.rejections"]
    assert len(lines) == 2
    assert "INVALID_ARGUMENT" in lines[0] and 'input "x": wrong' in lines[0]
    assert "RESOURCE_EXHAUSTED" in lines[1]
    clock.now += 61
    rejections.request_finished(outcome("m", "INVALID_ARGUMENT", 1000, "again"))
    lines = [r.getMessage() for r in caplog.records if r.name == "ferry.rejections"]
    assert len(lines) == 3
    assert "4 more" in lines[2]


def test_a_rejection_before_any_model_names_no_model_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request refused before it reached a loaded model (not loaded, shutting down) is
    counted under no model: its line said "requests to model '(unknown)'" though the
    request named one (the message quotes it)."""
    caplog.set_level(logging.INFO, logger="ferry")
    message = "model 'double' is in the model repository but not loaded"
    RejectionLog().request_finished(outcome("", "NOT_FOUND", 1, message))
    RejectionLog().request_finished(outcome("m", "NOT_FOUND", 1, "unknown version 9"))
    lines = [r.getMessage() for r in caplog.records if r.name == "ferry.rejections"]
    assert lines == [
        f"requests that reached no model fail with NOT_FOUND: {message}",
        "requests to model 'm' fail with NOT_FOUND: unknown version 9",
    ]


def malformed_http_record(error: BaseException) -> logging.LogRecord:
    """A record as aiohttp's server logs a request it could not parse."""
    return logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
        ("127.0.0.1",), (type(error), error, None),
    )


def test_malformed_http_is_reported_once_per_kind_and_interval_on_one_line() -> None:
    clock = FakeClock()
    quiet = MalformedHttpLog(interval_s=60.0, clock=clock)
    kept = [
        record
        for record in (
            malformed_http_record(BadHttpMessage("bad chunk size")) for _ in range(5)
        )
        if quiet.filter(record)
    ]
    line_too_long = malformed_http_record(LineTooLong("request line", "8190", "9000"))
    assert quiet.filter(line_too_long)
    assert len(kept) == 1
    record = kept[0]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == (
        "malformed HTTP request answered 400 (BadHttpMessage): bad chunk size"
    )
    clock.now += 61
    again = malformed_http_record(BadHttpMessage("bad chunk size"))
    assert quiet.filter(again)
    assert "4 more since the last report 61 s ago" in again.getMessage()
    # A failure of the server's own keeps its traceback.
    bug = malformed_http_record(ZeroDivisionError("oops"))
    assert quiet.filter(bug) and bug.exc_info is not None and bug.levelno == logging.ERROR


def test_logged_error_messages_cannot_forge_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ferry")
    RejectionLog().request_finished(outcome("", "NOT_FOUND", 1, "unknown model 'x\nINFO forged'"))
    forged = "unknown model 'y\r\nforged'" + "z" * 900
    AccessLog().request_finished(outcome("", "NOT_FOUND", 1, forged))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("ferry")]
    assert len(messages) == 2
    assert all("\n" not in m and "\r" not in m for m in messages)
    assert "x\\nINFO forged" in messages[0]
    assert len(messages[1]) < 700


def test_no_log_line_per_request_by_default_and_one_with_access_log(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    client_of: Callable[[RunningServer], triton.InferenceServerClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ferry")

    def ferry_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.startswith("ferry")]

    repo = make_repo(tmp_path)
    quiet = start_server(repo)
    loud = start_server(repo, access_log=True)
    start_lines = len(ferry_records())
    x = np.zeros((1, FEATURES), np.float32)
    for _ in range(5):
        client_of(quiet).infer("m", [infer_input(x)])
    assert len(ferry_records()) == start_lines
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            client_of(quiet).infer("m", [infer_input(x.astype(np.float64))])
    rejected = ferry_records()[start_lines:]
    assert [r.name for r in rejected] == ["ferry.rejections"]
    assert "INVALID_ARGUMENT" in rejected[0].getMessage()

    mark = len(ferry_records())
    for _ in range(4):
        client_of(loud).infer("m", [infer_input(x)])
    access = [r for r in ferry_records()[mark:] if r.name == "ferry.access"]
    assert len(access) == 4
    assert "model=m code=OK" in access[0].getMessage()


def test_json_formatter_writes_one_object_per_line() -> None:
    record = logging.LogRecord(
        "ferry.access", logging.INFO, __file__, 1, "ModelInfer model=%s", ("m",), None
    )
    record.fields = {"model": "m", "code": "OK"}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "ModelInfer model=m"
    assert entry["level"] == "INFO" and entry["logger"] == "ferry.access"
    assert entry["code"] == "OK"
    AccessLog().request_finished(outcome("m", "OK", 1_500_000))  # does not raise without handlers


def test_serve_with_json_logs(tmp_path: Path) -> None:
    """`ferry serve --log-format json` writes only JSON objects, one per line."""
    repo = make_repo(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ferry.server.cli", "serve", str(repo), "--host", "127.0.0.1",
         "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "0", "--log-format", "json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    lines: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "serving the Open Inference Protocol on " in line:
                break
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
        lines.extend(rest.splitlines(keepends=True))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, "".join(lines)
    entries = [json.loads(line) for line in lines if line.strip()]
    messages = [e["message"] for e in entries]
    assert any("model 'm' version 1 ready" in m for m in messages), messages
    assert any("Prometheus metrics on http://127.0.0.1:" in m for m in messages), messages
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)

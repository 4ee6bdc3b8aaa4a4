"""`ferry serve --workers N` with models on several devices: one executor process per
device, fed by every frontend.

On this CPU-only machine a KIND_GPU model falls back to the CPU (--gpu-fallback cpu, the
default), and its executors are still planned per GPU: a repository with a CPU model and
a model on GPUs 0 and 1 starts three executors (cpu, gpu0, gpu1), which is what these
tests drive through the real port. The plan, the routing, and the merging of statistics
and metrics are also tested on their own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from prometheus_client import CollectorRegistry, Counter

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server import metrics_merge
from ferry.server.device_plan import executor_devices, model_devices, models_on
from ferry.server.devices import DeviceSettings, InstanceGroup, device_keys, on_device
from ferry.server.metrics_merge import Family, MergedRegistry, merge
from ferry.server.remote import RemoteScheduler, merged_index
from ferry.server.repository import IndexEntry, ModelRepository, ModelState
from ferry.server.stats import add_statistics

from .models import mlp_model, write_config
from .waiting import wait_until
from .workers import (
    NOT_SERVING,
    SERVING,
    HealthWatch,
    Workers,
    infer_logits,
    infer_request,
    shm_names,
)

GPU_GROUPS = "instance_group [{ kind: KIND_GPU gpus: [0, 1] count: 1 }]\n"


# The plan ---------------------------------------------------------------------------


def test_each_instance_group_names_its_devices_and_an_executor_keeps_its_own() -> None:
    groups = (
        InstanceGroup("KIND_CPU", 2),
        InstanceGroup("KIND_GPU", 1, (1, 0)),
        InstanceGroup("KIND_GPU", 3, ()),  # no GPU listed: GPU 0, as the runtime places it
    )
    assert device_keys(groups) == ("cpu", "gpu1", "gpu0")
    settings = DeviceSettings(groups)
    assert on_device(settings, "cpu").instance_groups == (InstanceGroup("KIND_CPU", 2),)
    assert on_device(settings, "gpu0").instance_groups == (
        InstanceGroup("KIND_GPU", 1, (0,)), InstanceGroup("KIND_GPU", 3, (0,)),
    )
    assert on_device(settings, "gpu1").instance_groups == (InstanceGroup("KIND_GPU", 1, (1,)),)
    assert on_device(settings, "gpu2").instance_groups == ()


def test_the_plan_starts_one_executor_per_device_cpu_first(tmp_path: Path) -> None:
    for name in ("plain", "gpus", "broken", "on_gpu1"):
        mlp_model(tmp_path / name / "1" / "model.onnx")
    write_config(tmp_path / "gpus", GPU_GROUPS)
    write_config(tmp_path / "on_gpu1", "instance_group [{ kind: KIND_GPU gpus: [1] }]\n")
    write_config(tmp_path / "broken", "instance_group [{ kind: KIND_MODEL }]\n")
    repository = ModelRepository(tmp_path)
    plan = model_devices(repository, repository.model_names())
    assert plan == {"broken": (), "gpus": ("gpu0", "gpu1"), "on_gpu1": ("gpu1",),
                    "plain": ("cpu",)}
    assert executor_devices(plan) == ["cpu", "gpu0", "gpu1"]
    # The first executor also takes the model it cannot place, and reports its failure.
    assert models_on(plan, "cpu") == ["broken", "plain"]
    assert models_on(plan, "gpu0") == ["gpus"]
    assert models_on(plan, "gpu1") == ["gpus", "on_gpu1"]
    # Only GPU models: GPU 0's executor comes first.
    only_gpu = {"gpus": ("gpu0", "gpu1")}
    assert executor_devices(only_gpu) == ["gpu0", "gpu1"]
    assert executor_devices({}) == ["cpu"]


# Routing between the executors of one model ------------------------------------------


class FakeLink:
    """An executor link that counts what it was given."""

    def __init__(self) -> None:
        self.serving = True  # connected, and its models announced
        self.in_flight = 0

    def submit(self, *args: Any) -> None:
        self.in_flight += 1


def test_requests_go_to_the_executor_up_with_the_fewest_in_flight() -> None:
    first, second = FakeLink(), FakeLink()
    scheduler = RemoteScheduler([first, second], "m", "1")  # type: ignore[list-item]

    def send(count: int) -> None:
        for _ in range(count):
            scheduler.submit({}, ("y",), rows=1, shape_key=None)

    send(4)  # equal loads take turns
    assert (first.in_flight, second.in_flight) == (2, 2)
    first.in_flight = 5  # the first is busy: the next three go to the second
    send(3)
    assert (first.in_flight, second.in_flight) == (5, 5)
    second.serving = False  # away: everything goes to the first
    send(2)
    assert (first.in_flight, second.in_flight) == (7, 5)
    assert scheduler.reachable
    first.serving = False
    assert not scheduler.reachable


# Merging what the executors count ------------------------------------------------------


def _statistics(successes: int, sizes: dict[int, int]) -> pb.ModelStatistics:
    message = pb.ModelStatistics(name="m", version="1", last_inference=successes,
                                 inference_count=sum(s * n for s, n in sizes.items()),
                                 execution_count=sum(sizes.values()))
    message.inference_stats.success.count = successes
    message.inference_stats.success.ns = successes * 1000
    for size, count in sizes.items():
        batch = message.batch_stats.add(batch_size=size)
        batch.compute_infer.count = count
        batch.compute_infer.ns = count * 10
    return message


def test_statistics_of_one_version_on_two_executors_add_up() -> None:
    total = _statistics(3, {1: 1, 4: 2})
    add_statistics(total, _statistics(5, {2: 1, 4: 1}))
    assert (total.inference_count, total.execution_count) == (9 + 6, 3 + 2)
    assert (total.inference_stats.success.count, total.inference_stats.success.ns) == (8, 8000)
    assert total.last_inference == 5
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns)
            for b in total.batch_stats] == [(1, 1, 10), (2, 1, 10), (4, 3, 30)]


def _histogram(name: str, model: str, buckets: dict[str, float], total: float) -> Family:
    samples = [(name + "_bucket", {"model": model, "le": le}, v) for le, v in buckets.items()]
    samples += [(name + "_count", {"model": model}, buckets["+Inf"]),
                (name + "_sum", {"model": model}, total)]
    return (name, "", "histogram", samples)


def test_metrics_of_several_executors_merge_series_by_series() -> None:
    first: list[Family] = [
        ("process_cpu_seconds", "", "counter", [("process_cpu_seconds_total", {}, 3.0)]),
        ("ferry_batches", "", "counter", [("ferry_batches_total", {"model": "g"}, 2.0),
                                          ("ferry_batches_total", {"model": "c"}, 7.0)]),
        ("ferry_model_ready", "", "gauge", [("ferry_model_ready", {"model": "g"}, 1.0),
                                            ("ferry_model_ready", {"model": "c"}, 1.0)]),
        ("ferry_queue_depth", "", "gauge", [("ferry_queue_depth", {"model": "g"}, 1.0)]),
        # Bounds up to 4 here (largest max_batch_size 4) ...
        _histogram("ferry_batch_size", "g", {"1.0": 1, "2.0": 1, "4.0": 2, "+Inf": 2}, 5),
    ]
    second: list[Family] = [
        ("process_cpu_seconds", "", "counter", [("process_cpu_seconds_total", {}, 100.0)]),
        ("ferry_batches", "", "counter", [("ferry_batches_total", {"model": "g"}, 3.0)]),
        ("ferry_model_ready", "", "gauge", [("ferry_model_ready", {"model": "g"}, 1.0),
                                            ("ferry_model_ready", {"model": "c"}, 0.0)]),
        ("ferry_queue_depth", "", "gauge", [("ferry_queue_depth", {"model": "g"}, 2.0)]),
        # ... and up to 8 there.
        _histogram("ferry_batch_size", "g",
                   {"1.0": 0, "2.0": 1, "4.0": 1, "8.0": 3, "+Inf": 3}, 14),
    ]
    merged = {name: (kind, samples) for name, _, kind, samples in merge([first, second])}

    def values(name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(n, tuple(sorted(labels.items()))): v for n, labels, v in merged[name][1]}

    assert values("process_cpu_seconds") == {("process_cpu_seconds_total", ()): 3.0}
    assert values("ferry_batches") == {
        ("ferry_batches_total", (("model", "g"),)): 5.0,
        ("ferry_batches_total", (("model", "c"),)): 7.0,
    }
    ready = values("ferry_model_ready")  # ready where any executor serves it
    assert ready[("ferry_model_ready", (("model", "g"),))] == 1.0
    assert ready[("ferry_model_ready", (("model", "c"),))] == 1.0
    assert values("ferry_queue_depth") == {("ferry_queue_depth", (("model", "g"),)): 3.0}
    sizes = values("ferry_batch_size")
    buckets = {dict(labels)["le"]: v for (n, labels), v in sizes.items()
               if n.endswith("_bucket")}
    # The first executor's 2 batches are all at or below 4, so at or below 8 too.
    assert buckets == {"1.0": 1, "2.0": 2, "4.0": 3, "8.0": 5, "+Inf": 5}
    assert sizes[("ferry_batch_size_count", (("model", "g"),))] == 5
    assert sizes[("ferry_batch_size_sum", (("model", "g"),))] == 19


def test_a_scrape_counts_an_executor_that_never_answered_as_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    own = CollectorRegistry()
    Counter("ferry_batches", "", ["model"], registry=own).labels("g").inc(3)
    merged = MergedRegistry(own, ["\0ferry-test-no-such-executor-metrics"])
    families = {m.name: m for m in merged.collect()}
    assert [s.value for s in families["ferry_batches"].samples if s.name.endswith("_total")] == [3]
    assert "did not answer" in caplog.text


def test_an_executor_that_misses_a_scrape_keeps_its_last_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: list[list[Family] | None] = [
        [("ferry_batches", "", "counter", [("ferry_batches_total", {"model": "g"}, 4.0)])],
        None,  # restarting
        [("ferry_batches", "", "counter", [("ferry_batches_total", {"model": "g"}, 1.0)])],
    ]

    def fetch(address: str) -> list[Family]:
        answer = answers.pop(0)
        if answer is None:
            raise ConnectionRefusedError("no executor there")
        return answer

    monkeypatch.setattr(metrics_merge, "fetch_families", fetch)
    own = CollectorRegistry()
    Counter("ferry_batches", "", ["model"], registry=own).labels("g").inc(3)
    merged = MergedRegistry(own, ["\0peer"])

    def total() -> float:
        (family,) = [m for m in merged.collect() if m.name == "ferry_batches"]
        return sum(s.value for s in family.samples if s.name.endswith("_total"))

    assert total() == 7
    assert total() == 7  # the sum does not drop while the peer is away
    assert total() == 4  # back, counting from zero: a reset, as for any restart


def test_the_repository_index_shows_a_model_ready_wherever_it_is_loaded() -> None:
    not_loaded = ModelState.UNAVAILABLE
    cpu = ([], [], [IndexEntry("c", "1", ModelState.READY), IndexEntry("g", "", not_loaded,
                                                                      "not loaded"),
                    IndexEntry("bad", "", not_loaded, "config.pbtxt: no such kind")])
    gpu = ([], [], [IndexEntry("c", "", not_loaded, "not loaded"),
                    IndexEntry("g", "1", ModelState.READY),
                    IndexEntry("bad", "", not_loaded, "not loaded")])
    assert merged_index([cpu, gpu]) == [
        IndexEntry("bad", "", not_loaded, "config.pbtxt: no such kind"),
        IndexEntry("c", "1", ModelState.READY),
        IndexEntry("g", "1", ModelState.READY),
    ]


# Through the real port -------------------------------------------------------------------


def start(tmp_path: Path, workers: list[Workers], delay_s: float) -> Workers:
    """Two frontends over a CPU model and a model on GPUs 0 and 1 whose batches of 4
    wait up to `delay_s`."""
    mlp_model(tmp_path / "cpu_m" / "1" / "model.onnx")
    write_config(tmp_path / "cpu_m", "max_batch_size: 8\n")
    mlp_model(tmp_path / "gpu_m" / "1" / "model.onnx")
    write_config(tmp_path / "gpu_m", "max_batch_size: 4\ndynamic_batching { "
                 f"max_queue_delay_microseconds: {round(delay_s * 1e6)} }}\n" + GPU_GROUPS)
    server = Workers(tmp_path, 2)
    workers.append(server)
    return server


def executors(server: Workers) -> dict[str, int]:
    """The executor processes by device."""
    found = {}
    for pid in server.children()["executor"]:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        found[command[command.index(b"--executor-device") + 1].decode()] = pid
    return found


def _logits(response: pb.ModelInferResponse) -> np.ndarray:
    index = [o.name for o in response.outputs].index("logits")
    return np.frombuffer(response.raw_output_contents[index], np.float32).reshape(-1, 4)


def test_one_executor_per_device_serves_every_frontend_with_each_callers_rows(
    tmp_path: Path, workers: list[Workers]
) -> None:
    server = start(tmp_path, workers, delay_s=5)
    repository = tmp_path
    assert sorted(executors(server)) == ["cpu", "gpu0", "gpu1"]
    server.wait_for(r"2 frontends and 3 executors \(cpu, gpu0, gpu1\)")
    reference = ort.InferenceSession(str(repository / "gpu_m" / "1" / "model.onnx"))
    # On one connection (one frontend), four requests for the GPU model, each queued
    # before the next: they take turns between the two GPU executors, so neither has the
    # four rows a batch needs, and none runs (all on one executor would have run at once).
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    inputs = [np.random.default_rng(i).standard_normal((1, 16)).astype(np.float32)
              for i in range(8)]
    calls = []
    for i, x in enumerate(inputs[:4]):
        calls.append(stub.ModelInfer.future(infer_request("gpu_m", x)))
        wait_until(lambda i=i: server.metric("ferry_queue_depth") == i + 1,  # type: ignore[misc]
                   what=f"{i + 1} queued")
    assert server.metric("ferry_batches_total") == 0
    # Four more: each executor runs what it holds, once full or after 5 s.
    calls += [stub.ModelInfer.future(infer_request("gpu_m", x)) for x in inputs[4:]]
    for call, x in zip(calls, inputs, strict=True):
        np.testing.assert_allclose(_logits(call.result(30)), reference.run(["logits"], {"x": x})[0],
                                   rtol=1e-5)
    channel.close()
    # Both models, from many connections (both frontends), concurrently: every caller
    # gets its own rows.
    def call(i: int) -> None:
        rows = 1 + i % 3
        x = np.random.default_rng(100 + i).standard_normal((rows, 16)).astype(np.float32)
        model = "cpu_m" if i % 2 else "gpu_m"
        if model == "gpu_m":
            x = np.concatenate([x] * 4)[:4]  # whole batches: no waiting for the 5 s
        np.testing.assert_allclose(infer_logits(server.address, model, x),
                                   reference.run(["logits"], {"x": x})[0], rtol=1e-5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(40)))
    # One statistics view and one /metrics, counting every executor and frontend.
    with triton.InferenceServerClient(server.address) as client:
        stats = {s.name: s for s in client.get_inference_statistics().model_stats}
        index = client.get_model_repository_index()
    assert stats["gpu_m"].inference_count == 8 + 20 * 4
    assert stats["gpu_m"].execution_count >= 2 + 20
    assert stats["gpu_m"].inference_stats.success.count == 8 + 20
    assert stats["cpu_m"].inference_stats.success.count == 20
    assert [(m.name, m.state) for m in index.models] == [("cpu_m", "READY"), ("gpu_m", "READY")]
    wait_until(lambda: server.metric("ferry_requests_total") == 48, what="48 requests counted")
    assert server.metric("ferry_inferences_total") == stats["gpu_m"].inference_count + sum(
        1 + i % 3 for i in range(1, 40, 2))
    assert server.metric("ferry_model_ready") == 2
    # The executors' own metrics sockets answer the server's processes only: this test
    # is the supervisor's parent, not one of them.
    gpu1 = Path(f"/proc/{executors(server)['gpu1']}/cmdline").read_bytes().split(b"\0")
    name = gpu1[gpu1.index(b"--executor-socket") + 1].decode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
        stranger.settimeout(10)
        stranger.connect("\0" + name + "-metrics")
        assert stranger.recv(1024) == b""
    assert server.stop() == 0
    assert server.log.count("executor stopped") == 3


def test_an_executor_killed_fails_only_its_callers_and_comes_back(
    tmp_path: Path, workers: list[Workers]
) -> None:
    shm_before = shm_names()
    server = start(tmp_path, workers, delay_s=3)
    reference = ort.InferenceSession(str(tmp_path / "gpu_m" / "1" / "model.onnx"))
    devices = executors(server)
    health = HealthWatch(server.address)
    health.wait_for([SERVING], 10)
    # Two requests queued through one frontend: the first on GPU 1's executor, the
    # second on GPU 0's (they take turns). Each waits up to 3 s for a full batch.
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    inputs = [np.full((1, 16), i + 1, np.float32) for i in range(2)]
    calls = []
    for i, x in enumerate(inputs):
        calls.append(stub.ModelInfer.future(infer_request("gpu_m", x)))
        wait_until(lambda i=i: server.metric("ferry_queue_depth") == i + 1,  # type: ignore[misc]
                   what=f"{i + 1} queued")
    os.kill(devices["gpu1"], signal.SIGKILL)
    assert server.metric("ferry_model_ready") == 2  # /metrics answers meanwhile
    # Its caller is answered UNAVAILABLE at once; GPU 0's runs when its wait is over.
    wait_until(calls[0].done, timeout=2, what="the killed executor's caller answered")
    assert calls[0].exception().code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
    np.testing.assert_allclose(_logits(calls[1].result(30)),
                               reference.run(["logits"], {"x": inputs[1]})[0], rtol=1e-5)
    # The other executors never noticed, and the GPU model is served through GPU 0.
    assert infer_logits(server.address, "cpu_m", inputs[0]).shape == (1, 4)
    assert infer_logits(server.address, "gpu_m", np.concatenate([inputs[0]] * 4)).shape == (4, 4)
    server.wait_for(rf"executor process {devices['gpu1']} exited with -9; restarting it")
    # Back: both frontends send to the new GPU 1 executor again.
    server.wait_for(r"frontend \d: executor \S+-gpu1 serves 1 models", count=4)
    assert executors(server)["gpu0"] == devices["gpu0"]
    assert executors(server)["gpu1"] != devices["gpu1"]
    # Four requests through one frontend, each queued before the next, take turns
    # between both GPUs again: none has a full batch (on one alone it would run at once).
    before = server.metric("ferry_batches_total")
    more = []
    for i in range(4):
        more.append(stub.ModelInfer.future(infer_request("gpu_m", inputs[0])))
        wait_until(lambda i=i: server.metric("ferry_queue_depth") == i + 1,  # type: ignore[misc]
                   what=f"{i + 1} queued again")
    assert server.metric("ferry_batches_total") == before
    for call in more:
        assert _logits(call.result(30)).shape == (1, 4)
    # Every model kept an executor up: the server stayed ready throughout.
    assert health.statuses == [SERVING]

    # The CPU's executor is the only one of cpu_m: NOT_SERVING until it is back, and
    # /metrics, which it serves, is back with it.
    os.kill(devices["cpu"], signal.SIGKILL)
    health.wait_for([SERVING, NOT_SERVING, SERVING], 60)
    def served_again() -> bool:
        try:
            return server.metric("ferry_model_ready") == 2
        except OSError:  # the port is closed until the new executor has loaded
            return False

    wait_until(served_again, timeout=30, what="/metrics served again")
    assert infer_logits(server.address, "cpu_m", inputs[0]).shape == (1, 4)
    channel.close()
    health.close()
    assert server.stop() == 0
    assert shm_names() == shm_before


def test_an_executor_that_cannot_start_stops_the_others_and_exits_1(tmp_path: Path) -> None:
    mlp_model(tmp_path / "cpu_m" / "1" / "model.onnx")
    mlp_model(tmp_path / "gpu_m" / "1" / "model.onnx")
    write_config(tmp_path / "gpu_m", GPU_GROUPS)
    # No CUDA here, and no falling back to the CPU: the GPU executors fail their load.
    finished = subprocess.run(
        [sys.executable, "-m", "ferry.server.cli", "serve", str(tmp_path), "--host",
         "127.0.0.1", "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1",
         "--workers", "2", "--gpu-fallback", "fail"],
        capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 1, finished.stderr
    assert "an executor process failed to start" in finished.stderr
    assert "--gpu-fallback fail" in finished.stderr  # the executor said why
    assert "Traceback" not in finished.stderr
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit()
                and str(tmp_path).encode() in _cmdline(pid)], "a process was left running"


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""

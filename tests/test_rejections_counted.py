"""Every rejection is counted in `ferry_requests_total{code=...}`: each status code of the
README's error table that Ferry's own ModelInfer handler produces, driven for real and
read back from the /metrics endpoint. (Refusals that happen before the handler, in gRPC
or an interceptor, are not among them: UNAUTHENTICATED, `--max-concurrent-rpcs`, and
messages over `--max-message-size`.)"""

from __future__ import annotations

import concurrent.futures
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.executor import Runner
from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, save_graph, write_config
from tests.process import metric
from tests.waiting import wait_until

FEATURES = 16
QUEUE = 2


def gather_model(path: Path) -> Path:
    """i INT64 [batch, 1] -> Gather from four numbers: an index out of range makes
    onnxruntime fail at run time (the zeros of the warm-up do not)."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["data", "i"], ["y"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("i", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.arange(4, dtype=np.float32), "data")],
    )
    return save_graph(graph, path)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES)
    write_config(repo / "m", f"""
        max_batch_size: 1
        dynamic_batching {{ default_queue_policy {{
          max_queue_size: {QUEUE} allow_timeout_override: true }} }}
        """)
    gather_model(repo / "g" / "1" / "model.onnx")
    write_config(repo / "g", "max_batch_size: 4\n")
    (repo / "bad" / "1").mkdir(parents=True)
    (repo / "bad" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    return repo


@pytest.fixture
def server(
    repo: Path, start_server: Callable[..., RunningServer]
) -> Iterator[tuple[RunningServer, GatedInstance]]:
    gates: list[GatedInstance] = []

    def gate_m(model: str, inner: Runner) -> Runner:
        if model != "m":
            return inner
        gate = GatedInstance(inner)
        gates.append(gate)
        return gate

    running = start_server(repo, wrap_instance=gate_m)
    (gate,) = gates
    yield running, gate
    gate.release()


def counted(server: RunningServer, model: str, code: str) -> float:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return metric(text, "ferry_requests_total", model=model, code=code) or 0.0


def call(address: str, model: str = "m", **options: object) -> str:
    try:
        with triton.InferenceServerClient(address) as client:
            if model == "g":
                tensor = triton.InferInput("i", [1, 1], "INT64")
                tensor.set_data_from_numpy(np.array([[99]], np.int64))
            else:
                tensor = triton.InferInput("x", [1, FEATURES], "FP32")
                tensor.set_data_from_numpy(np.ones((1, FEATURES), np.float32))
            client.infer(model, [tensor], **options)  # type: ignore[arg-type]
    except InferenceServerException as error:
        return str(error.status()).removeprefix("StatusCode.")
    return "OK"


def test_full_queue_deadline_cancelled_and_ok_are_each_counted(
    server: tuple[RunningServer, GatedInstance],
) -> None:
    running, gate = server
    address = running.address
    scheduler = running.server.manager.get("m").scheduler
    gate.hold()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(call, address)  # runs, held at the gate
        assert gate.entered.acquire(timeout=10)

        # The model's queue timeout (request parameter, microseconds) passes in the queue.
        assert call(address, timeout=50_000, client_timeout=30) == "DEADLINE_EXCEEDED"

        # The client leaves while queued: the handler is cancelled.
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="m")
            request.inputs.add(name="x", datatype="FP32", shape=[1, FEATURES])
            request.raw_input_contents.append(np.ones((1, FEATURES), np.float32).tobytes())
            leaving = stub.ModelInfer.future(request, timeout=30)
            wait_until(lambda: scheduler.queue_depth == 1, what="the request to queue")
            leaving.cancel()
            wait_until(lambda: counted(running, "m", "CANCELLED") == 1, what="CANCELLED")

        # Fill the queue; the next one is refused at once.
        queued = [pool.submit(call, address) for _ in range(QUEUE)]
        wait_until(lambda: scheduler.queue_depth == QUEUE, what="a full queue")
        assert call(address) == "RESOURCE_EXHAUSTED"
        gate.release()
        assert [f.result(timeout=30) for f in (first, *queued)] == ["OK"] * (1 + QUEUE)

    assert counted(running, "m", "OK") == 1 + QUEUE
    assert counted(running, "m", "DEADLINE_EXCEEDED") == 1
    assert counted(running, "m", "CANCELLED") == 1
    assert counted(running, "m", "RESOURCE_EXHAUSTED") == 1


def test_a_run_that_fails_on_the_callers_values_is_counted_invalid_argument(
    server: tuple[RunningServer, GatedInstance],
) -> None:
    """An index past the model's table fails in onnxruntime (its InvalidArgument): the
    caller's values, so INVALID_ARGUMENT, not a server error, and counted as such."""
    running, _ = server
    assert call(running.address, model="g") == "INVALID_ARGUMENT"
    assert call(running.address, model="g") == "INVALID_ARGUMENT"
    assert counted(running, "g", "INVALID_ARGUMENT") == 2


def test_unavailable_models_and_a_draining_server_are_counted(
    server: tuple[RunningServer, GatedInstance],
) -> None:
    running, gate = server
    # A model that failed to load: UNAVAILABLE, under _unknown (no model was loaded).
    assert call(running.address, model="bad") == "UNAVAILABLE"
    assert counted(running, "_unknown", "UNAVAILABLE") == 1

    gate.hold()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(call, running.address)
        assert gate.entered.acquire(timeout=10)
        stopping = threading.Thread(
            target=lambda: running.call(running.server.stop(grace_s=30)), daemon=True
        )
        stopping.start()
        wait_until(lambda: not running.server.is_ready(), what="the drain to start")
        assert call(running.address) == "UNAVAILABLE"
        # Scraped while draining: the endpoint closes only at the end.
        assert counted(running, "_unknown", "UNAVAILABLE") == 2
        gate.release()
        assert held.result(timeout=30) == "OK"
        stopping.join(30)

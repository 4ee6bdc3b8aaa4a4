"""The books: what the clients saw, against what /metrics and the statistics extension say.

Mixed workloads go through the real ports with real clients; every outcome the clients
see is counted here, then checked against `ferry_requests_total` (per code and protocol),
the batch-level metrics and Triton's ModelStatistics. Time is held still with gated
instances and by waiting on the server's own state, never by sleeping.

What the statistics count (README, "Metrics"): `success` the requests answered OK,
`fail` every other request that named a loaded model, `inference_count` the rows answered,
`execution_count` the batches run (whether or not their callers were still there), with
queue and compute times charged per answered request.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.http as tc_http
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.executor import Runner
from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, save_graph, write_config
from tests.waiting import wait_until
from tests.workers import Workers

FEATURES = 4
VOCAB = 4

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def lookup_model(path: Path) -> Path:
    """ids INT64 [batch, 1] -> Gather over a [VOCAB, 2] table: an id past the table fails
    its run in onnxruntime, so a batch with one bad request fails and is split."""
    table = np.arange(VOCAB * 2, dtype=np.float32).reshape(VOCAB, 2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["vectors"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["batch", 1, 2])],
        [numpy_helper.from_array(table, "table")],
    )
    return save_graph(graph, path)


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES)
    write_config(
        repo / "m",
        "max_batch_size: 8\n"
        "instance_group [{ count: 2 kind: KIND_CPU }]\n"
        "dynamic_batching { default_queue_policy { max_queue_size: 4 } }\n",
    )
    lookup_model(repo / "lookup" / "1" / "model.onnx")
    write_config(
        repo / "lookup",
        "max_batch_size: 8\n"
        "dynamic_batching { preferred_batch_size: [4] max_queue_delay_microseconds: 30000000 }\n",
    )
    return repo


def x_request(model: str, rows: int = 1, features: int = FEATURES) -> pb.ModelInferRequest:
    x = np.ones((rows, features), np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def ids_request(ids: list[int]) -> pb.ModelInferRequest:
    array = np.array(ids, np.int64).reshape(-1, 1)
    request = pb.ModelInferRequest(model_name="lookup")
    request.inputs.add(name="ids", datatype="INT64", shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return request


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def scrape(server: RunningServer) -> Samples:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse(response.read().decode())


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_by_code(samples: Samples, model: str) -> Counter[tuple[str, str]]:
    """(protocol, code) -> ferry_requests_total of one model label."""
    counts: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples.items():
        found = dict(labels)
        if name == "ferry_requests_total" and found["model"] == model and value:
            counts[found["protocol"], found["code"]] += int(value)
    return counts


def check_books(
    samples: Samples,
    stats: pb.ModelStatistics,
    model: str,
    seen: Counter[tuple[str, str]],
    *,
    rows_answered: int,
    batch_sizes: Counter[int],
) -> None:
    """Every figure of one model against what its clients saw and the batches it ran."""
    assert requests_by_code(samples, model) == seen
    ok = sum(n for (_, code), n in seen.items() if code == "OK")
    failed = sum(n for (_, code), n in seen.items() if code != "OK")
    inference = stats.inference_stats
    assert (inference.success.count, inference.fail.count) == (ok, failed)
    assert stats.inference_count == rows_answered
    assert stats.execution_count == sum(batch_sizes.values())
    for duration in (
        inference.queue, inference.compute_input, inference.compute_infer,
        inference.compute_output,
    ):
        assert duration.count == ok
    by_size = Counter({b.batch_size: b.compute_infer.count for b in stats.batch_stats})
    assert by_size == batch_sizes
    for entry in stats.batch_stats:
        assert entry.compute_input.count == entry.compute_output.count == entry.compute_infer.count

    # /metrics says the same.
    assert sample(samples, "ferry_request_duration_seconds_count", model=model) == ok + failed
    assert sample(samples, "ferry_queue_duration_seconds_count", model=model) == ok
    assert sample(samples, "ferry_inferences_total", model=model) == rows_answered
    assert sample(samples, "ferry_batches_total", model=model) == stats.execution_count
    assert sample(samples, "ferry_compute_duration_seconds_count", model=model) == (
        stats.execution_count
    )
    assert sample(samples, "ferry_batch_size_count", model=model) == stats.execution_count
    assert sample(samples, "ferry_batch_size_sum", model=model) == sum(
        size * n for size, n in batch_sizes.items()
    )
    assert sample(samples, "ferry_queue_depth", model=model) == 0


def code_of(call: grpc.Future) -> str:
    error = call.exception(timeout=30)
    return "OK" if error is None else error.code().name


@pytest.fixture
def stub_of() -> Iterator[Callable[[str], pb_grpc.GRPCInferenceServiceStub]]:
    channels: list[grpc.Channel] = []

    def connect(address: str) -> pb_grpc.GRPCInferenceServiceStub:
        channel = grpc.insecure_channel(address)
        channels.append(channel)
        return pb_grpc.GRPCInferenceServiceStub(channel)

    yield connect
    for channel in channels:
        channel.close()


def statistics(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> pb.ModelStatistics:
    reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    (stats,) = reply.model_stats
    return stats


def finished(server: RunningServer, model: str, count: int) -> Samples:
    """The scrape once the server has counted `count` finished requests of `model`
    (a caller that left is counted when its handler ends, not when the client returns)."""
    result: list[Samples] = []

    def counted() -> bool:
        result[:] = [scrape(server)]
        return sum(requests_by_code(result[0], model).values()) >= count

    wait_until(counted, what=f"{count} requests of {model} counted")
    return result[0]


def test_every_grpc_outcome_is_counted_once_under_its_own_code(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    gated: Callable[..., GatedInstance],
    stub_of: Callable[[str], pb_grpc.GRPCInferenceServiceStub],
) -> None:
    """Both instances of "m" held, each with a one-row batch whose caller leaves (one
    cancels, one's gRPC deadline passes); then, queued behind them: three requests that
    run, one cancelled in the queue, one refused by the full queue, one whose gRPC
    deadline passes in the queue, one whose `timeout` parameter does, one with a bad
    shape, and one for a model that does not exist."""
    gates: list[GatedInstance] = []

    def gate_m(model: str, inner: Runner) -> Runner:
        if model != "m":
            return inner
        gates.append(gated(model, inner))
        return gates[-1]

    server = start_server(make_repo(tmp_path), wrap_instance=gate_m)
    first, second = gates
    scheduler = server.server.manager.get("m").scheduler
    stub = stub_of(server.address)
    seen: Counter[tuple[str, str]] = Counter()
    first.hold()
    second.hold()

    cancelled_running = stub.ModelInfer.future(x_request("m"), timeout=30)
    expired_running = stub.ModelInfer.future(x_request("m"), timeout=0.5)
    assert first.entered.acquire(timeout=10) and second.entered.acquire(timeout=10)
    seen["grpc", code_of(expired_running)] += 1  # the instance still holds its batch
    cancelled_running.cancel()
    seen["grpc", "CANCELLED"] += 1

    answered = [stub.ModelInfer.future(x_request("m", rows=2), timeout=30)]
    left_in_queue = stub.ModelInfer.future(x_request("m"), timeout=30)
    answered += [stub.ModelInfer.future(x_request("m"), timeout=30) for _ in range(2)]
    wait_until(lambda: scheduler.queue_depth == 4, what="a full queue")
    with pytest.raises(grpc.RpcError) as full:
        stub.ModelInfer(x_request("m"), timeout=30)
    seen["grpc", full.value.code().name] += 1
    left_in_queue.cancel()
    seen["grpc", "CANCELLED"] += 1
    wait_until(lambda: scheduler.queue_depth == 3, what="the cancelled request gone")
    with pytest.raises(grpc.RpcError) as expired:
        stub.ModelInfer(x_request("m"), timeout=0.2)
    seen["grpc", expired.value.code().name] += 1
    timed = x_request("m")
    timed.parameters["timeout"].int64_param = 1000  # microseconds, in the queue
    with pytest.raises(grpc.RpcError) as expired:
        stub.ModelInfer(timed, timeout=30)
    seen["grpc", expired.value.code().name] += 1
    with pytest.raises(grpc.RpcError) as bad:
        stub.ModelInfer(x_request("m", features=FEATURES + 1), timeout=30)
    seen["grpc", bad.value.code().name] += 1
    with pytest.raises(grpc.RpcError) as missing:
        stub.ModelInfer(x_request("nothing-here"), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert scheduler.queue_depth == 3

    first.release()
    second.release()
    for call in answered:
        seen["grpc", code_of(call)] += 1
    assert seen == {
        ("grpc", "OK"): 3, ("grpc", "CANCELLED"): 2, ("grpc", "DEADLINE_EXCEEDED"): 3,
        ("grpc", "RESOURCE_EXHAUSTED"): 1, ("grpc", "INVALID_ARGUMENT"): 1,
    }
    finished(server, "m", sum(seen.values()))
    wait_until(lambda: not scheduler.busy, what="every batch back")
    samples = scrape(server)
    assert requests_by_code(samples, "_unknown") == {("grpc", "NOT_FOUND"): 1}
    ran = sorted(first.batch_rows + second.batch_rows)
    assert ran == [1, 1, 4]
    check_books(samples, statistics(stub, "m"), "m", seen, rows_answered=4,
                batch_sizes=Counter({1: 2, 4: 1}))


def test_a_split_batch_counts_one_execution_and_one_failure(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    stub_of: Callable[[str], pb_grpc.GRPCInferenceServiceStub],
) -> None:
    """Four requests in one batch of "lookup", one with an id past the table: onnxruntime
    fails the batch, it runs again in halves, and only that request fails."""
    server = start_server(make_repo(tmp_path))
    stub = stub_of(server.address)
    calls = [stub.ModelInfer.future(ids_request([i]), timeout=30) for i in range(3)]
    calls.append(stub.ModelInfer.future(ids_request([VOCAB + 5]), timeout=30))
    codes = [code_of(call) for call in calls]
    assert codes == ["OK", "OK", "OK", "INVALID_ARGUMENT"]
    seen = Counter(("grpc", code) for code in codes)
    samples = finished(server, "lookup", 4)
    check_books(samples, statistics(stub, "lookup"), "lookup", seen, rows_answered=3,
                batch_sizes=Counter({3: 1}))


def test_rest_and_stream_requests_are_counted_under_their_protocols(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    stub_of: Callable[[str], pb_grpc.GRPCInferenceServiceStub],
) -> None:
    server = start_server(make_repo(tmp_path))
    stub = stub_of(server.address)
    seen: Counter[tuple[str, str]] = Counter()
    stream_requests = [x_request("m") for _ in range(3)]
    stream_requests.append(x_request("m", features=FEATURES + 1))
    for index, request in enumerate(stream_requests):
        request.id = str(index)
    replies = list(stub.ModelStreamInfer(iter(stream_requests), timeout=30))
    assert len(replies) == 4
    for reply in replies:
        seen["grpc", "INVALID_ARGUMENT" if reply.error_message else "OK"] += 1
    assert seen == {("grpc", "OK"): 3, ("grpc", "INVALID_ARGUMENT"): 1}

    http_codes = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}
    with tc_http.InferenceServerClient(server.http_address) as client:
        for features in (FEATURES, FEATURES, FEATURES + 1):
            data = tc_http.InferInput("x", [1, features], "FP32")
            data.set_data_from_numpy(np.ones((1, features), np.float32))
            try:
                client.infer("m", [data])
                seen["http", "OK"] += 1
            except InferenceServerException as error:
                seen["http", http_codes[int(str(error.status()))]] += 1
        with pytest.raises(InferenceServerException):
            client.infer("nowhere", [data])
    assert seen["http", "OK"] == 2 and seen["http", "INVALID_ARGUMENT"] == 1

    samples = finished(server, "m", sum(seen.values()))
    assert requests_by_code(samples, "_unknown") == {("http", "NOT_FOUND"): 1}
    stats = statistics(stub, "m")
    assert stats.inference_count == 5
    check_books(samples, stats, "m", seen, rows_answered=5,
                batch_sizes=Counter({b.batch_size: b.compute_infer.count
                                     for b in stats.batch_stats}))
    # REST's JSON statistics are the same figures.
    with tc_http.InferenceServerClient(server.http_address) as client:
        as_json = client.get_inference_statistics("m")["model_stats"][0]
    assert int(as_json["inference_stats"]["success"]["count"]) == 5
    assert int(as_json["inference_stats"]["fail"]["count"]) == 2
    assert int(as_json["execution_count"]) == stats.execution_count


def test_two_workers_report_one_set_of_books(
    tmp_path: Path, workers: list[Workers],
    stub_of: Callable[[str], pb_grpc.GRPCInferenceServiceStub],
) -> None:
    """`--workers 2`: requests over several connections (so over both frontends), REST
    too; /metrics and ModelStatistics of either frontend count each request once."""
    server = Workers(make_repo(tmp_path), 2)
    workers.append(server)
    seen: Counter[tuple[str, str]] = Counter()
    stubs = []
    for _ in range(4):
        channel = grpc.insecure_channel(
            server.address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        stubs.append(pb_grpc.GRPCInferenceServiceStub(channel))
    for stub in stubs:
        stub.ModelInfer(x_request("m"), timeout=30)
        seen["grpc", "OK"] += 1
        with pytest.raises(grpc.RpcError) as bad:
            stub.ModelInfer(x_request("m", features=FEATURES + 1), timeout=30)
        seen["grpc", bad.value.code().name] += 1
    with pytest.raises(grpc.RpcError):
        stubs[0].ModelInfer(x_request("nothing-here"), timeout=30)
    http_port = int(server.wait_for(r"REST on port (\d+)")[0].group(1))
    with tc_http.InferenceServerClient(f"127.0.0.1:{http_port}") as client:
        data = tc_http.InferInput("x", [2, FEATURES], "FP32")
        data.set_data_from_numpy(np.ones((2, FEATURES), np.float32))
        client.infer("m", [data])
        seen["http", "OK"] += 1

    def counted() -> bool:
        return sum(requests_by_code(parse(server.scrape()), "m").values()) == 9

    wait_until(counted, what="9 requests counted")
    samples = parse(server.scrape())
    assert requests_by_code(samples, "_unknown") == {("grpc", "NOT_FOUND"): 1}
    for stub in stubs:  # whichever frontend answers, the same books
        stats = statistics(stub, "m")
        batch_sizes = Counter({b.batch_size: b.compute_infer.count for b in stats.batch_stats})
        check_books(samples, stats, "m", seen, rows_answered=6, batch_sizes=batch_sizes)

"""Every RPC of the service, through a real port, with Triton's own client library.

`tritonclient.grpc` is code we did not write: if it works against Ferry unchanged, the
wire contract holds. Where tritonclient hides something (the id of a failed stream
request), the test talks gRPC directly through Ferry's generated stubs.
"""

from __future__ import annotations

import base64
import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server import __version__
from tests.conftest import EXPLICIT_MODEL_CONTROL, RunningServer
from tests.models import fixed_shape_model, mlp_model, write_config

FEATURES = 16
CLASSES = 4

CONFIGURED = """
max_batch_size: 8
dynamic_batching {
  max_queue_delay_microseconds: 500
  preferred_batch_size: [ 4 ]
}
instance_group [ { count: 2, kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repository")
    # "mlp" serves the inference tests; "counted", "scratch" and "streamed" are each
    # used by one test only, so that statistics and load state do not leak between tests.
    for name in ("mlp", "counted", "scratch"):
        mlp_model(repo / name / "1" / "model.onnx")
    mlp_model(repo / "configured" / "1" / "model.onnx")
    write_config(repo / "configured", CONFIGURED)
    mlp_model(repo / "versioned" / "1" / "model.onnx", seed=1)
    mlp_model(repo / "versioned" / "2" / "model.onnx", seed=2)
    write_config(repo / "versioned", "version_policy: { all: {} }\n")
    fixed_shape_model(repo / "fixed" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(repository, security=EXPLICIT_MODEL_CONTROL)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[tc.InferenceServerClient]:
    triton = tc.InferenceServerClient(server.address)
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(repository: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The mlp run by onnxruntime directly: what Ferry's answers must equal."""
    session = ort.InferenceSession(
        str(repository / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        logits, probs = session.run(["logits", "probs"], {"x": x})
        return {"logits": logits, "probs": probs}

    return run


def features(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def infer_input(x: np.ndarray, name: str = "x") -> tc.InferInput:
    tensor = tc.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def assert_matches(result: tc.InferResult, expected: dict[str, np.ndarray]) -> None:
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got is not None, f"output {name} missing"
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def status_of(error: InferenceServerException) -> str:
    return str(error.status())


# Health ---------------------------------------------------------------------------


def test_server_live_and_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_model_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_model_ready("mlp") is True
    assert client.is_model_ready("mlp", model_version="1") is True
    assert client.is_model_ready("versioned", model_version="2") is True
    assert client.is_model_ready("no-such-model") is False
    assert client.is_model_ready("mlp", model_version="7") is False


# Metadata -------------------------------------------------------------------------


def test_server_metadata(client: tc.InferenceServerClient) -> None:
    metadata = client.get_server_metadata()
    assert metadata.name == "ferry"
    assert metadata.version == __version__
    assert {"classification", "model_configuration", "statistics", "model_repository"} <= set(
        metadata.extensions
    )
    as_json = client.get_server_metadata(as_json=True)
    assert as_json["name"] == "ferry"


def test_model_metadata_of_a_batching_model(client: tc.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("mlp")
    assert metadata.name == "mlp"
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("x", "FP32", [-1, FEATURES])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("logits", "FP32", [-1, CLASSES]),
        ("probs", "FP32", [-1, CLASSES]),
    ]


def test_model_metadata_of_a_fixed_shape_model_has_no_batch_dimension(
    client: tc.InferenceServerClient,
) -> None:
    metadata = client.get_model_metadata("fixed")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [2, 3])]
    assert [(t.name, list(t.shape)) for t in metadata.outputs] == [("y", [2, 3])]


def test_model_metadata_lists_every_served_version(client: tc.InferenceServerClient) -> None:
    assert list(client.get_model_metadata("versioned").versions) == ["1", "2"]
    assert client.get_model_metadata("versioned", model_version="1").name == "versioned"


def test_model_metadata_of_an_unknown_model_is_not_found(
    client: tc.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("no-such-model")
    assert "NOT_FOUND" in status_of(caught.value)
    assert "no-such-model" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("mlp", model_version="9")
    assert "NOT_FOUND" in status_of(caught.value)


def test_model_config_from_config_pbtxt(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("configured").config
    assert config.name == "configured"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [
        (t.name, tc.model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in config.input
    ] == [("x", "TYPE_FP32", [FEATURES])]
    assert [
        (t.name, tc.model_config_pb2.DataType.Name(t.data_type), list(t.dims))
        for t in config.output
    ] == [
        ("logits", "TYPE_FP32", [CLASSES]),
        ("probs", "TYPE_FP32", [CLASSES]),
    ]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert len(config.instance_group) == 1
    assert config.instance_group[0].count == 2
    assert config.instance_group[0].kind == tc.model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_model_config_without_config_pbtxt_uses_documented_defaults(
    client: tc.InferenceServerClient,
) -> None:
    config = client.get_model_config("mlp").config
    assert config.max_batch_size == 32  # the documented default for a dynamic first dim
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert [g.count for g in config.instance_group] == [1]
    as_json = client.get_model_config("mlp", as_json=True)
    assert as_json["config"]["max_batch_size"] == 32


def test_model_config_of_a_model_that_does_not_batch(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("fixed").config
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert [list(t.dims) for t in config.input] == [[2, 3]]


def test_model_config_of_an_unknown_model_is_not_found(
    client: tc.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_config("no-such-model")
    assert "NOT_FOUND" in status_of(caught.value)


# Statistics and repository --------------------------------------------------------


def test_inference_statistics_count_rows_batches_and_outcomes(
    client: tc.InferenceServerClient,
) -> None:
    before = client.get_inference_statistics("counted").model_stats[0]
    assert (before.inference_count, before.execution_count) == (0, 0)
    for rows in (1, 2, 3):
        client.infer("counted", [infer_input(features(rows, seed=rows))])
    with pytest.raises(InferenceServerException):
        client.infer("counted", [infer_input(features(1, 0)[:, :5])])  # wrong width

    stats = client.get_inference_statistics("counted", model_version="1").model_stats
    assert [(s.name, s.version) for s in stats] == [("counted", "1")]
    counted = stats[0]
    assert counted.inference_count == 6  # rows
    assert counted.execution_count == 3  # one at a time: one batch each
    assert counted.inference_stats.success.count == 3
    assert counted.inference_stats.success.ns > 0
    assert counted.inference_stats.fail.count == 1
    assert counted.inference_stats.queue.count == 3
    assert counted.inference_stats.compute_infer.count == 3
    assert counted.last_inference > 0
    assert {b.batch_size: b.compute_infer.count for b in counted.batch_stats} == {1: 1, 2: 1, 3: 1}


def test_inference_statistics_of_all_models(client: tc.InferenceServerClient) -> None:
    stats = client.get_inference_statistics().model_stats
    names = {(s.name, s.version) for s in stats}
    assert {("mlp", "1"), ("versioned", "1"), ("versioned", "2"), ("fixed", "1")} <= names
    with pytest.raises(InferenceServerException) as caught:
        client.get_inference_statistics("no-such-model")
    assert "NOT_FOUND" in status_of(caught.value)


def test_inference_statistics_of_a_model_cover_every_version(
    client: tc.InferenceServerClient,
) -> None:
    """As in Triton: a model named without a version gives the statistics of each of its
    versions, not only the newest."""
    stats = client.get_inference_statistics("versioned").model_stats
    assert sorted((s.name, s.version) for s in stats) == [("versioned", "1"), ("versioned", "2")]
    stats = client.get_inference_statistics("versioned", model_version="1").model_stats
    assert [(s.name, s.version) for s in stats] == [("versioned", "1")]


def test_repository_index(client: tc.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    entries = {(m.name, m.version): m.state for m in index.models if m.name != "scratch"}
    assert entries == {
        ("configured", "1"): "READY",
        ("counted", "1"): "READY",
        ("fixed", "1"): "READY",
        ("mlp", "1"): "READY",
        ("versioned", "1"): "READY",
        ("versioned", "2"): "READY",
    }


def test_unload_then_load(
    client: tc.InferenceServerClient,
    stub: pb_grpc.GRPCInferenceServiceStub,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> None:
    x = features(2, seed=5)
    assert_matches(client.infer("scratch", [infer_input(x)]), reference(x))

    client.unload_model("scratch")
    assert client.is_model_ready("scratch") is False
    with pytest.raises(InferenceServerException) as caught:
        client.infer("scratch", [infer_input(x)])
    assert "scratch" in caught.value.message()
    assert any(
        m.name == "scratch" and m.state != "READY"
        for m in client.get_model_repository_index().models
    )
    ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
    assert all(m.name != "scratch" for m in ready_only.models)
    assert client.is_model_ready("mlp") is True  # the others are untouched

    client.load_model("scratch")
    assert client.is_model_ready("scratch") is True
    assert_matches(client.infer("scratch", [infer_input(x)]), reference(x))


def test_load_of_a_model_not_in_the_repository_fails(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("no-such-model")
    assert "NOT_FOUND" in status_of(caught.value)
    assert "no-such-model" in caught.value.message()


def test_unload_of_a_model_that_is_not_loaded_fails(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.unload_model("no-such-model")
    assert "NOT_FOUND" in status_of(caught.value)


# Inference ------------------------------------------------------------------------


def test_infer(
    client: tc.InferenceServerClient,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> None:
    x = features(3, seed=1)
    result = client.infer("mlp", [infer_input(x)], request_id="req-1")
    assert_matches(result, reference(x))
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("mlp", "1", "req-1")
    assert [o.datatype for o in response.outputs] == ["FP32", "FP32"]


def test_infer_of_a_subset_of_outputs(
    client: tc.InferenceServerClient,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> None:
    x = features(2, seed=2)
    result = client.infer("mlp", [infer_input(x)], outputs=[tc.InferRequestedOutput("probs")])
    assert result.as_numpy("logits") is None
    assert_matches(result, {"probs": reference(x)["probs"]})


def test_infer_of_a_named_version(client: tc.InferenceServerClient) -> None:
    x = features(1, seed=3)
    one = client.infer("versioned", [infer_input(x)], model_version="1")
    two = client.infer("versioned", [infer_input(x)], model_version="2")
    latest = client.infer("versioned", [infer_input(x)])
    assert one.get_response().model_version == "1"
    assert latest.get_response().model_version == "2"
    assert not np.allclose(one.as_numpy("logits"), two.as_numpy("logits"))
    np.testing.assert_array_equal(latest.as_numpy("logits"), two.as_numpy("logits"))


def test_a_version_is_a_whole_number(client: tc.InferenceServerClient) -> None:
    """As in Triton: a version that is not a whole number is INVALID_ARGUMENT (not a
    version that happens to be missing), and "02" names version 2."""
    x = features(1, seed=3)
    padded = client.infer("versioned", [infer_input(x)], model_version="02")
    assert padded.get_response().model_version == "2"
    for version in ("abc", "1.0", "-1", "²", "1" * 40):
        with pytest.raises(InferenceServerException) as caught:
            client.infer("versioned", [infer_input(x)], model_version=version)
        assert "INVALID_ARGUMENT" in status_of(caught.value), (version, caught.value)
        assert f"version '{version[:20]}" in str(caught.value.message()), caught.value
    with pytest.raises(InferenceServerException) as caught:
        client.infer("versioned", [infer_input(x)], model_version="3")
    assert "NOT_FOUND" in status_of(caught.value)
    assert client.is_model_ready("versioned", model_version="abc") is False


def test_async_infer(
    client: tc.InferenceServerClient,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    sent = {f"async-{i}": features(1 + i % 3, seed=100 + i) for i in range(8)}
    for request_id, x in sent.items():
        client.async_infer(
            "mlp",
            [infer_input(x)],
            callback=lambda result, error: answers.put((result, error)),
            request_id=request_id,
        )
    seen = set()
    for _ in sent:
        result, error = answers.get(timeout=30)
        assert error is None
        request_id = result.get_response().id
        assert_matches(result, reference(sent[request_id]))
        seen.add(request_id)
    assert seen == set(sent)


def test_stream_infer_matches_each_response_to_its_request(
    client: tc.InferenceServerClient,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    sent = {f"stream-{i}": features(1 + i % 4, seed=200 + i) for i in range(12)}
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for index, (request_id, x) in enumerate(sent.items()):
            client.async_stream_infer("mlp", [infer_input(x)], request_id=request_id)
            if index == 5:  # an invalid request in the middle of the stream
                bad = features(1, seed=0)[:, :7]
                client.async_stream_infer("mlp", [infer_input(bad)], request_id="stream-bad")
        results = {}
        errors = []
        for _ in range(len(sent) + 1):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result
    finally:
        client.stop_stream()

    assert len(errors) == 1
    assert "'x'" in errors[0].message() and "7" in errors[0].message()
    assert set(results) == set(sent)
    for request_id, result in results.items():
        assert_matches(result, reference(sent[request_id]))


def test_stream_error_carries_the_request_id(
    stub: pb_grpc.GRPCInferenceServiceStub,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
) -> None:
    """tritonclient drops the id of a failed stream request; on the wire it is there."""
    good = features(2, seed=9)
    requests = [
        _request("mlp", "good-1", good),
        _request("no-such-model", "unknown", good),
        _request("mlp", "narrow", good[:, :3]),
        _request("mlp", "good-2", good),
    ]
    replies = {r.infer_response.id: r for r in stub.ModelStreamInfer(iter(requests), timeout=30)}
    assert set(replies) == {"good-1", "unknown", "narrow", "good-2"}
    assert "no-such-model" in replies["unknown"].error_message
    assert replies["unknown"].infer_response.model_name == "no-such-model"
    assert "'x'" in replies["narrow"].error_message
    for request_id in ("good-1", "good-2"):
        reply = replies[request_id]
        assert reply.error_message == ""
        logits = np.frombuffer(reply.infer_response.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(
            logits.reshape(2, CLASSES), reference(good)["logits"], rtol=1e-6, atol=1e-6
        )


def _request(model: str, request_id: str, x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


# Extensions Ferry does not implement ----------------------------------------------

UNIMPLEMENTED_CALLS: dict[str, Callable[[tc.InferenceServerClient], object]] = {
    "system shared memory status": lambda c: c.get_system_shared_memory_status(),
    "system shared memory register": lambda c: c.register_system_shared_memory(
        "region", "/key", 64
    ),
    "system shared memory unregister": lambda c: c.unregister_system_shared_memory("region"),
    "CUDA shared memory status": lambda c: c.get_cuda_shared_memory_status(),
    "CUDA shared memory register": lambda c: c.register_cuda_shared_memory(
        "region", base64.b64encode(b"handle"), 0, 64
    ),
    "CUDA shared memory unregister": lambda c: c.unregister_cuda_shared_memory("region"),
    "trace get": lambda c: c.get_trace_settings(),
    "trace update": lambda c: c.update_trace_settings(settings={"trace_rate": "1"}),
    "log get": lambda c: c.get_log_settings(),
    "log update": lambda c: c.update_log_settings({"log_verbose_level": 1}),
}


@pytest.mark.parametrize("call", UNIMPLEMENTED_CALLS.values(), ids=UNIMPLEMENTED_CALLS.keys())
def test_unimplemented_extensions_say_so(
    client: tc.InferenceServerClient, call: Callable[[tc.InferenceServerClient], object]
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call(client)
    assert "UNIMPLEMENTED" in status_of(caught.value)
    assert "Ferry does not implement" in caught.value.message()


@pytest.mark.parametrize(
    ("method", "request_type"),
    [
        ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest),
        ("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest),
        ("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest),
        ("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest),
        ("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest),
        ("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest),
        ("TraceSetting", pb.TraceSettingRequest),
        ("LogSettings", pb.LogSettingsRequest),
    ],
)
def test_unimplemented_extensions_through_ferry_stubs(
    stub: pb_grpc.GRPCInferenceServiceStub, method: str, request_type: Any
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(request_type(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Ferry does not implement" in caught.value.details()

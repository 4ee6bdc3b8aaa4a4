"""Inputs whose rank the graph does not give (a value_info with no shape at all, as
hand-built graphs and some converters write): onnxruntime runs them at any shape, so
Ferry serves them at any shape too, shown as `[-1]` in metadata, instead of refusing
everything but a scalar. A config.pbtxt that gives their dims holds requests to those."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from ferry.server.tensors import MAX_ANY_RANK
from tests.conftest import RunningServer, serving
from tests.models import save_graph, write_config


def any_rank_model(path: Path) -> Path:
    """y = relu(x) * 2, with neither x nor y given a shape."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Add", ["r", "r"], ["y"])],
        "any_rank",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return save_graph(graph, path, check=False)  # onnx's checker wants inputs shaped


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("any_rank") / "models"
    any_rank_model(root / "plain" / "1" / "model.onnx")
    any_rank_model(root / "configured" / "1" / "model.onnx")
    write_config(
        root / "configured",
        'input [{ name: "x" data_type: TYPE_FP32 dims: [2, -1] }]\n'
        'output [{ name: "y" data_type: TYPE_FP32 dims: [2, -1] }]\n',
    )
    any_rank_model(root / "batched" / "1" / "model.onnx")
    write_config(root / "batched", "max_batch_size: 8\n"
                 "dynamic_batching { max_queue_delay_microseconds: 100000 }\n")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    yield from serving(repo, exit_on_error=True)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.address)


def infer(client: triton.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    answer = client.infer(model, [tensor]).as_numpy("y")
    assert answer is not None
    return answer


def rest(server: RunningServer, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"http://{server.http_address}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def onnxruntime_answer(repo: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(repo / "plain" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(["y"], {"x": x})[0]  # type: ignore[no-any-return]


SHAPES = [(), (1,), (5,), (2, 3), (3, 0), (1, 2, 3, 2), (2,) * 8]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_an_input_of_unknown_rank_is_served_at_any_shape(
    client: triton.InferenceServerClient, repo: Path, shape: tuple[int, ...]
) -> None:
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    got = infer(client, "plain", x)
    want = onnxruntime_answer(repo, x)
    assert got.shape == want.shape and np.array_equal(got, want)


def test_rest_serves_it_at_any_shape_and_metadata_shows_one_variable_dimension(
    server: RunningServer, repo: Path
) -> None:
    metadata = rest(server, "/v2/models/plain")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1]}]
    x = np.arange(-6, 6, dtype=np.float32).reshape(2, 3, 2)
    answer = rest(server, "/v2/models/plain/infer", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3, 2],
                    "data": x.ravel().tolist()}],
    })
    (y,) = answer["outputs"]
    assert y["shape"] == [2, 3, 2]
    assert y["data"] == onnxruntime_answer(repo, x).ravel().tolist()


def test_a_rank_past_what_numpy_holds_is_refused_naming_the_input(
    server: RunningServer, client: triton.InferenceServerClient
) -> None:
    shape = [1] * (MAX_ANY_RANK + 1)
    tensor = triton.InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.zeros(1, np.float32))  # numpy holds no more dimensions
    tensor.set_shape(shape)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("plain", [tensor])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x'" in refused.value.message()
    assert f"at most {MAX_ANY_RANK} dimensions" in refused.value.message()
    with pytest.raises(urllib.error.HTTPError) as rest_refused:
        rest(server, "/v2/models/plain/infer", {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [0.0]}],
        })
    assert rest_refused.value.code == 400
    assert f"at most {MAX_ANY_RANK} dimensions" in json.loads(rest_refused.value.read())["error"]


def test_configured_dims_hold_requests_to_them(
    client: triton.InferenceServerClient, repo: Path
) -> None:
    config = client.get_model_config("configured").config
    assert list(config.input[0].dims) == [2, -1]
    x = np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)
    assert np.array_equal(infer(client, "configured", x), onnxruntime_answer(repo, x))
    for wrong in [(3,), (3, 5), (2, 5, 1)]:
        with pytest.raises(InferenceServerException) as refused:
            infer(client, "configured", np.zeros(wrong, np.float32))
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "input 'x': expected shape [2, -1]" in refused.value.message()


def test_a_batching_model_merges_callers_of_one_shape_and_needs_the_batch_dimension(
    client: triton.InferenceServerClient, repo: Path
) -> None:
    metadata = client.get_model_metadata("batched")
    assert list(metadata.inputs[0].shape) == [-1, -1]
    scalar = triton.InferInput("x", [1], "FP32")
    scalar.set_data_from_numpy(np.ones(1, np.float32))
    scalar.set_shape([])  # tritonclient takes no 0-d array from numpy
    with pytest.raises(InferenceServerException) as refused:
        client.infer("batched", [scalar])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'x'" in refused.value.message()
    rng = np.random.default_rng(7)
    requests = [
        rng.standard_normal((1 + i % 2, 3, 4) if i % 3 else (1, 6)).astype(np.float32)
        for i in range(12)
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda x: infer(client, "batched", x), requests))
    for x, got in zip(requests, answers, strict=True):
        assert np.array_equal(got, onnxruntime_answer(repo, x))
    stats = client.get_inference_statistics("batched").model_stats[0]
    assert stats.inference_count == sum(x.shape[0] for x in requests)
    assert stats.execution_count < len(requests)  # some callers shared a run

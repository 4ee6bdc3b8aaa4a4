"""Triton's `reshape` in config.pbtxt: clients send and receive `dims`, the model runs
`reshape.shape`. Driven through the real port with tritonclient against onnxruntime run
in-process on the model's own shapes; bad settings fail the load saying why."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper, numpy_helper

from ferry.server.config import ConfigError, read_config_file, settings_from
from ferry.server.signatures import read_signature
from tests.conftest import RunningServer, serving
from tests.models import save_graph, write_config

Value = helper.make_tensor_value_info


def classifier(path: Path) -> Path:
    """float_input [batch, 4] -> label INT64 [batch] and probabilities [batch, 3]."""
    weights = numpy_helper.from_array(
        np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5, "W"
    )
    return save_graph(helper.make_graph(
        [helper.make_node("MatMul", ["float_input", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
         helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)],
        "classifier",
        [Value("float_input", TensorProto.FLOAT, ["batch", 4])],
        [Value("label", TensorProto.INT64, ["batch"]),
         Value("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [weights],
    ), path)


def image_sum(path: Path) -> Path:
    """pixels [batch, 3, 4] -> per-channel sums [batch, 3] and the pixels doubled."""
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes")
    return save_graph(helper.make_graph(
        [helper.make_node("ReduceSum", ["pixels", "axes"], ["sums"], keepdims=0),
         helper.make_node("Add", ["pixels", "pixels"], ["doubled"])],
        "image_sum",
        [Value("pixels", TensorProto.FLOAT, ["batch", 3, 4])],
        [Value("sums", TensorProto.FLOAT, ["batch", 3]),
         Value("doubled", TensorProto.FLOAT, ["batch", 3, 4])],
        [axes],
    ), path)


def column(path: Path) -> Path:
    """x [batch, n, 1] -> y = x * 3, same shape: a variable dimension on both sides."""
    three = numpy_helper.from_array(np.array(3, np.float32), "three")
    return save_graph(helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["y"])],
        "column",
        [Value("x", TensorProto.FLOAT, ["batch", "n", 1])],
        [Value("y", TensorProto.FLOAT, ["batch", "n", 1])],
        [three],
    ), path)


TRITON_LABEL_CONFIG = (
    "max_batch_size: 8\n"
    'input [ { name: "float_input" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    "output [\n"
    '  { name: "label" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } },\n'
    '  { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] }\n'
    "]\n"
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reshape") / "models"
    classifier(root / "iris" / "1" / "model.onnx")
    write_config(root / "iris", TRITON_LABEL_CONFIG)
    image_sum(root / "flat_image" / "1" / "model.onnx")
    write_config(
        root / "flat_image",
        "max_batch_size: 16\n"
        "dynamic_batching { max_queue_delay_microseconds: 100000 }\n"
        'input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 12 ] '
        "reshape: { shape: [ 3, 4 ] } } ]\n"
        'output [ { name: "sums" data_type: TYPE_FP32 dims: [ 3 ] },\n'
        '  { name: "doubled" data_type: TYPE_FP32 dims: [ 12 ] reshape: { shape: [ 3, 4 ] } } ]\n'
        "model_warmup [{ name: \"w\" batch_size: 2 inputs { key: \"pixels\" value: "
        "{ data_type: TYPE_FP32 dims: [ 12 ] random_data: true } } }]\n",
    )
    column(root / "column" / "1" / "model.onnx")
    write_config(
        root / "column",
        "max_batch_size: 4\n"
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] reshape: { shape: [ -1, 1 ] } } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] '
        "reshape: { shape: [ -1, 1 ] } } ]\n",
    )
    image_sum(root / "unbatched" / "1" / "model.onnx")
    write_config(
        root / "unbatched",
        "max_batch_size: 0\n"
        'input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 2, 12 ] '
        "reshape: { shape: [ 2, 3, 4 ] } } ]\n",
    )
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    yield from serving(repo, exit_on_error=True)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.address) as connected:
        yield connected


def infer(
    client: triton.InferenceServerClient, model: str, name: str, x: np.ndarray, outputs: list[str]
) -> list[np.ndarray]:
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor])
    return [result.as_numpy(output) for output in outputs]  # type: ignore[misc]


def in_process(repo: Path, model: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(
        str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)  # type: ignore[no-any-return]


def test_tritons_label_idiom_answers_batch_by_one(
    server: RunningServer, client: triton.InferenceServerClient, repo: Path
) -> None:
    x = np.array([[1, 0, 0, 0], [0, 0, 0, 4], [0.5, 0.5, 0, 1]], np.float32)
    label, probabilities = infer(client, "iris", "float_input", x, ["label", "probabilities"])
    want_label, want_probabilities = in_process(repo, "iris", {"float_input": x})
    assert label.shape == (3, 1) and np.array_equal(label[:, 0], want_label)
    assert np.array_equal(probabilities, want_probabilities)
    metadata = client.get_model_metadata("iris")
    assert [list(t.shape) for t in metadata.outputs] == [[-1, 1], [-1, 3]]
    config = client.get_model_config("iris").config
    assert list(config.output[0].dims) == [1]
    assert config.output[0].HasField("reshape") and list(config.output[0].reshape.shape) == []
    assert not config.output[1].HasField("reshape")
    with urllib.request.urlopen(urllib.request.Request(
        f"http://{server.http_address}/v2/models/iris/infer",
        data=json.dumps({"inputs": [{"name": "float_input", "datatype": "FP32",
                                     "shape": [1, 4], "data": [1, 0, 0, 0]}]}).encode(),
    )) as answer:
        outputs = {o["name"]: o for o in json.loads(answer.read())["outputs"]}
    assert outputs["label"]["shape"] == [1, 1]
    assert outputs["label"]["data"] == [int(want_label[0])]


def test_callers_batched_together_each_get_their_rows_in_their_dims(
    client: triton.InferenceServerClient, repo: Path
) -> None:
    rng = np.random.default_rng(3)
    requests = [rng.standard_normal((1 + i % 3, 12)).astype(np.float32) for i in range(10)]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(
            lambda x: infer(client, "flat_image", "pixels", x, ["sums", "doubled"]), requests
        ))
    for x, (sums, doubled) in zip(requests, answers, strict=True):
        want_sums, want_doubled = in_process(
            repo, "flat_image", {"pixels": x.reshape(-1, 3, 4)}
        )
        assert sums.shape == (len(x), 3) and np.allclose(sums, want_sums, rtol=1e-6)
        assert doubled.shape == (len(x), 12)
        assert np.array_equal(doubled, want_doubled.reshape(-1, 12))
    stats = client.get_inference_statistics("flat_image").model_stats[0]
    assert stats.execution_count < stats.inference_stats.success.count  # shared runs


def test_a_variable_dimension_on_both_sides(
    client: triton.InferenceServerClient, repo: Path
) -> None:
    for length in (1, 5, 0):
        x = np.arange(2 * length, dtype=np.float32).reshape(2, length)
        (y,) = infer(client, "column", "x", x, ["y"])
        assert y.shape == (2, length) and np.array_equal(y, x * 3)


def test_an_unbatched_model_reshapes_the_whole_tensor(
    client: triton.InferenceServerClient, repo: Path
) -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 12)
    sums, doubled = infer(client, "unbatched", "pixels", x, ["sums", "doubled"])
    want_sums, want_doubled = in_process(repo, "unbatched", {"pixels": x.reshape(2, 3, 4)})
    assert np.array_equal(sums, want_sums) and np.array_equal(doubled, want_doubled)


def load_settings(model_file: Path, config_file: Path) -> object:
    config, set_fields, warnings = read_config_file(config_file)
    return settings_from("m", read_signature(model_file), config, set_fields, warnings)


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        ('input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 10 ] '
         "reshape: { shape: [ 3, 4 ] } } ]",
         "config input 'pixels' has dims [10] and reshape [3, 4], which do not hold the "
         "same elements"),
        ('input [ { name: "pixels" data_type: TYPE_FP32 dims: [ -1 ] '
         "reshape: { shape: [ 3, 4 ] } } ]",
         "config input 'pixels' has dims [-1] and reshape [3, 4]"),
        ('input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 12 ] '
         "reshape: { shape: [ 4, 3 ] } } ]",
         "config input 'pixels' has reshape [4, 3], which do not fit the graph's [3, 4]"),
        ('output [ { name: "sums" data_type: TYPE_FP32 dims: [ 3 ] '
         "reshape: { shape: [ -2 ] } } ]",
         "config output 'sums' has reshape [-2]: each is -1"),
    ],
    ids=["elements", "variable-against-fixed", "graph", "negative"],
)
def test_a_reshape_that_cannot_hold_fails_the_load_saying_why(
    tmp_path: Path, tensor: str, words: str
) -> None:
    model_file = image_sum(tmp_path / "m" / "1" / "model.onnx")
    config = write_config(tmp_path / "m", f"max_batch_size: 4\n{tensor}\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(model_file, config)
    assert words in str(refused.value)


def test_reshape_with_padding_is_refused(tmp_path: Path) -> None:
    model_file = column(tmp_path / "m" / "1" / "model.onnx")
    config = write_config(
        tmp_path / "m",
        "max_batch_size: 4\n"
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] reshape: { shape: [ -1, 1 ] } } ]\n'
        'parameters { key: "padding_inputs" value { string_value: "x=0" } }\n',
    )
    with pytest.raises(ConfigError) as refused:
        load_settings(model_file, config)
    assert "reshape ('x') cannot be combined with parameter padding_inputs" in str(refused.value)

"""Models as real teams export them, dropped into a repository with or without a
config.pbtxt: weights in external data files, sklearn classifiers, string encoders,
defaults that are also inputs, scalars, fixed and symbolic dims, FP16/BOOL, pass-through
outputs, and files that are not models at all. Each one loads and answers exactly what
onnxruntime answers in-process (through the real port, several callers at once where it
batches), or is refused at load with a message that says what to do."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from ferry.server import runtime
from ferry.server.runtime import SessionSettings, calibrated_intra_op_threads
from tests.conftest import RunningServer
from tests.models import write_config

Value = helper.make_tensor_value_info
ML = ("ai.onnx.ml", 3)


def save(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    path: Path,
    initializers: list[onnx.TensorProto] | None = None,
    opsets: tuple[tuple[str, int], ...] = (("", 17),),
    **save_options: Any,
) -> Path:
    graph = helper.make_graph(nodes, path.parent.parent.name, inputs, outputs, initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(domain, v) for domain, v in opsets]
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), **save_options)
    return path


def weights_model(path: Path, **save_options: Any) -> Path:
    """x [batch, 16] @ w [16, 8] + b: weights that torch.onnx.export would write to
    external data for a large model."""
    rng = np.random.default_rng(0)
    return save(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        [Value("x", TensorProto.FLOAT, ["batch", 16])],
        [Value("y", TensorProto.FLOAT, ["batch", 8])],
        path,
        [
            numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        ],
        **save_options,
    )


def external(location: str) -> dict[str, Any]:
    return {"save_as_external_data": True, "all_tensors_to_one_file": True,
            "location": location, "size_threshold": 0}


def expected(model_file: Path, feeds: Mapping[str, np.ndarray],
             outputs: list[str]) -> list[np.ndarray]:
    """What onnxruntime answers in-process (BYTES inputs as str, as onnxruntime takes)."""
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    given = {
        name: value.astype(str) if value.dtype == object else value
        for name, value in feeds.items()
    }
    return session.run(outputs, given)


def infer_input(name: str, value: np.ndarray, module: Any = triton) -> Any:
    datatype = "BYTES" if value.dtype == object else np_to_triton_dtype(value.dtype)
    tensor = module.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    return tensor


def same(got: np.ndarray, want: np.ndarray, exact: bool = True) -> bool:
    """Equal values of the same dtype; with `exact` False, floats to a few ulps: a row
    run in a batch of other rows may round differently (onnxruntime's kernels pick their
    blocking by the batch's size)."""
    if want.dtype.kind in "OUS":
        return got.shape == want.shape and [
            v.decode() if isinstance(v, bytes) else v for v in got.ravel()
        ] == [str(v) for v in want.ravel()]
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if want.dtype.kind != "f":
        return np.array_equal(got, want)
    if exact:
        return np.array_equal(got, want, equal_nan=True)
    return np.allclose(got, want, rtol=1e-6, atol=1e-7, equal_nan=True)


# One repository of models that load, one server for the module ------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wild") / "models"
    weights_model(root / "external" / "1" / "model.onnx", **external("model.onnx.data"))
    # A model_warmup runs on the session that reads the external data; the thread
    # calibration (automatic threads, more than one core) opens the file a second time.
    write_config(
        root / "external",
        'model_warmup [{ name: "w" batch_size: 4 inputs { key: "x" value: '
        '{ data_type: TYPE_FP32 dims: [16] random_data: true } } }]\n',
    )
    (root / "external_subfolder" / "1" / "weights").mkdir(parents=True)
    weights_model(
        root / "external_subfolder" / "1" / "model.onnx", **external("weights/w.bin")
    )
    _sklearn_classifier(root / "classifier" / "1" / "model.onnx")
    save(
        [helper.make_node("LabelEncoder", ["word"], ["id"], domain="ai.onnx.ml",
                          keys_strings=["cat", "dog", "emu"], values_int64s=[1, 2, 3],
                          default_int64=-1)],
        [Value("word", TensorProto.STRING, ["batch"])],
        [Value("id", TensorProto.INT64, ["batch"])],
        root / "label_encoder" / "1" / "model.onnx",
        opsets=(("", 17), ML),
    )
    save(
        [helper.make_node("CategoryMapper", ["code"], ["word"], domain="ai.onnx.ml",
                          cats_int64s=[1, 2, 3], cats_strings=["cat", "dog", "emu"],
                          default_string="?")],
        [Value("code", TensorProto.INT64, ["batch", 2])],
        [Value("word", TensorProto.STRING, ["batch", 2])],
        root / "category_mapper" / "1" / "model.onnx",
        opsets=(("", 17), ML),
    )
    # 'scale' is a graph input and an initializer: a default the graph may be given.
    save(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        [Value("x", TensorProto.FLOAT, ["batch", 4]), Value("scale", TensorProto.FLOAT, [4])],
        [Value("y", TensorProto.FLOAT, ["batch", 4])],
        root / "default_scale" / "1" / "model.onnx",
        [numpy_helper.from_array(np.array([1, 2, 3, 4], np.float32), "scale")],
    )
    save(
        [helper.make_node("Mul", ["a", "b"], ["product"])],
        [Value("a", TensorProto.FLOAT, []), Value("b", TensorProto.FLOAT, [])],
        [Value("product", TensorProto.FLOAT, [])],
        root / "scalars" / "1" / "model.onnx",
    )
    save(
        [helper.make_node("Neg", ["x"], ["y"])],
        [Value("x", TensorProto.FLOAT, [1, 4])],
        [Value("y", TensorProto.FLOAT, [1, 4])],
        root / "fixed_one" / "1" / "model.onnx",
    )
    save(
        [helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
         helper.make_node("Cast", ["masked"], ["scores"], to=TensorProto.FLOAT)],
        [Value("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         Value("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [Value("scores", TensorProto.FLOAT, ["batch", "sequence"])],
        root / "sequences" / "1" / "model.onnx",
    )
    # The exporter named the output's batch dim by another symbol: rows still follow.
    save(
        [helper.make_node("Relu", ["x"], ["y"])],
        [Value("x", TensorProto.FLOAT, ["batch", 4])],
        [Value("y", TensorProto.FLOAT, ["N", 4])],
        root / "other_symbol" / "1" / "model.onnx",
    )
    save(
        [helper.make_node("Cast", ["x"], ["half"], to=TensorProto.FLOAT16),
         helper.make_node("Not", ["flag"], ["not_flag"])],
        [Value("x", TensorProto.FLOAT, ["batch", 3]),
         Value("flag", TensorProto.BOOL, ["batch", 3])],
        [Value("half", TensorProto.FLOAT16, ["batch", 3]),
         Value("not_flag", TensorProto.BOOL, ["batch", 3])],
        root / "half_and_bool" / "1" / "model.onnx",
    )
    # An output that is a graph input too (pass-through), and one listed twice.
    save(
        [helper.make_node("Neg", ["x"], ["y"])],
        [Value("x", TensorProto.FLOAT, ["batch", 3])],
        [Value("y", TensorProto.FLOAT, ["batch", 3]), Value("x", TensorProto.FLOAT, ["batch", 3])],
        root / "pass_through" / "1" / "model.onnx",
    )
    save(
        [helper.make_node("Neg", ["x"], ["y"])],
        [Value("x", TensorProto.FLOAT, ["batch", 3])],
        [Value("y", TensorProto.FLOAT, ["batch", 3]), Value("y", TensorProto.FLOAT, ["batch", 3])],
        root / "output_twice" / "1" / "model.onnx",
    )
    return root


def _sklearn_classifier(path: Path, zipmap: bool = False) -> Path:
    """A LogisticRegression over string labels, as skl2onnx exports it."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    labels = np.array(["cat", "dog", "emu"])[(x[:, 0] > 0).astype(int) + (x[:, 1] > 0)]
    model = to_onnx(LogisticRegression().fit(x, labels), x[:1],
                    options={"zipmap": zipmap}, target_opset={"": 17, "ai.onnx.ml": 3})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    running = RunningServer(repo, exit_on_error=True)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.address)


def rest_metadata(server: RunningServer, model: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{server.http_address}/v2/models/{model}") as answer:
        return json.loads(answer.read())  # type: ignore[no-any-return]


def check_concurrent(
    client: triton.InferenceServerClient, repo: Path, model: str,
    requests: list[dict[str, np.ndarray]], outputs: list[str],
) -> None:
    """Each request from its own caller at once answers what onnxruntime answers (the
    first one also alone: exactly)."""
    lone = client.infer(model, [infer_input(k, v) for k, v in requests[0].items()])
    model_file = repo / model / "1" / "model.onnx"
    for name, want in zip(outputs, expected(model_file, requests[0], outputs), strict=True):
        assert same(lone.as_numpy(name), want), (model, name, lone.as_numpy(name), want)

    def call(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = client.infer(model, [infer_input(k, v) for k, v in feeds.items()])
        return [result.as_numpy(name) for name in outputs]

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(call, requests))
    for feeds, got in zip(requests, answers, strict=True):
        for name, g, want in zip(outputs, got, expected(model_file, feeds, outputs), strict=True):
            assert same(g, want, exact=False), (model, name, g, want)


def rows(
    count: int, make: Callable[[int, int], dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """`count` requests of 1 to 3 rows."""
    return [make(i, 1 + i % 3) for i in range(count)]


# 1. External data -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["external", "external_subfolder"])
def test_weights_in_external_data_load_and_answer_as_onnxruntime(
    server: RunningServer, client: triton.InferenceServerClient, repo: Path, model: str
) -> None:
    assert client.get_model_config(model).config.max_batch_size == 32
    assert rest_metadata(server, model)["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 16]}
    ]
    rng = np.random.default_rng(1)
    check_concurrent(client, repo, model, rows(
        12, lambda i, n: {"x": rng.standard_normal((n, 16)).astype(np.float32)}), ["y"])


def test_a_single_file_with_external_data_is_served(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    model_file = weights_model(tmp_path / "net.onnx", **external("net.onnx.data"))
    server = start_server(model_file, exit_on_error=True)
    x = np.ones((2, 16), np.float32)
    result = triton.InferenceServerClient(server.address).infer("net", [infer_input("x", x)])
    assert same(result.as_numpy("y"), expected(model_file, {"x": x}, ["y"])[0])


def test_calibration_counts_the_external_data_as_the_model_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the bound on the models worth a second session read model.onnx's own size
    # (a few hundred bytes here, as for a 7 GB torch export), so a model whose weights
    # are in external data was opened twice at load whatever its size.
    model_file = weights_model(tmp_path / "m" / "model.onnx", **external("model.onnx.data"))
    weights = (tmp_path / "m" / "model.onnx.data").stat().st_size
    assert model_file.stat().st_size < weights
    monkeypatch.setattr(runtime, "CALIBRATION_MAX_FILE_BYTES", weights)
    opened: list[Path] = []
    monkeypatch.setattr(runtime, "OnnxInstance", lambda path, settings: opened.append(path))
    samples = [{"x": np.zeros((1, 16), np.float32)}]
    assert calibrated_intra_op_threads(
        model_file, SessionSettings(intra_op_threads=2), samples, ["y"]
    ) == 2
    assert opened == []


def test_external_data_out_of_the_version_folder_is_refused(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    outside = tmp_path / "outside"
    weights_model(outside / "model.onnx", **external("secret.bin"))
    repo = tmp_path / "models"
    (repo / "linked" / "1").mkdir(parents=True)
    (repo / "linked" / "1" / "model.onnx").write_bytes((outside / "model.onnx").read_bytes())
    (repo / "linked" / "1" / "secret.bin").symlink_to(outside / "secret.bin")
    escaping = onnx.load(str(outside / "model.onnx"), load_external_data=False)
    for tensor in escaping.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../outside/secret.bin"
    (repo / "escaping" / "1").mkdir(parents=True)
    onnx.save(escaping, str(repo / "escaping" / "1" / "model.onnx"))
    server = start_server(repo)
    index = {
        entry.name: entry
        for entry in triton.InferenceServerClient(server.address)
        .get_model_repository_index().models
    }
    for name in ("linked", "escaping"):
        assert index[name].state == "UNAVAILABLE"
        assert "escapes model directory" in index[name].reason, index[name].reason
        assert str(outside) not in index[name].reason  # no path of the host is told


# 2. sklearn classifiers and string encoders -------------------------------------------


def test_a_classifier_with_string_labels_answers_labels_and_probabilities(
    server: RunningServer, client: triton.InferenceServerClient, repo: Path
) -> None:
    assert rest_metadata(server, "classifier")["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
    ]
    rng = np.random.default_rng(2)
    check_concurrent(client, repo, "classifier", rows(
        12, lambda i, n: {"X": rng.standard_normal((n, 4)).astype(np.float32)}),
        ["label", "probabilities"])
    # and over REST, through tritonclient's own HTTP client
    x = rng.standard_normal((3, 4)).astype(np.float32)
    http = triton_http.InferenceServerClient(server.http_address)
    result = http.infer("classifier", [infer_input("X", x, triton_http)])
    want = expected(repo / "classifier" / "1" / "model.onnx", {"X": x}, ["label", "probabilities"])
    assert same(result.as_numpy("label"), want[0])
    assert same(result.as_numpy("probabilities"), want[1])


def test_string_inputs_and_string_outputs_of_ml_encoders(
    client: triton.InferenceServerClient, repo: Path
) -> None:
    words = ["cat", "emu", "yak", "dog", ""]
    check_concurrent(client, repo, "label_encoder", rows(
        9, lambda i, n: {"word": np.array(words[i % 3: i % 3 + n], dtype=object)}), ["id"])
    check_concurrent(client, repo, "category_mapper", rows(
        9, lambda i, n: {"code": np.arange(2 * n, dtype=np.int64).reshape(n, 2) + i % 3}),
        ["word"])


def load_failure(tmp_path: Path, start_server: Callable[..., RunningServer],
                 build: Callable[[Path], object], config: str | None = None) -> str:
    """The reason the index gives for a model 'm' that fails to load."""
    repo = tmp_path / "models"
    build(repo / "m" / "1" / "model.onnx")
    if config is not None:
        write_config(repo / "m", config)
    server = start_server(repo)
    (entry,) = triton.InferenceServerClient(server.address).get_model_repository_index().models
    assert entry.state == "UNAVAILABLE", entry
    return str(entry.reason)


def test_a_zipmap_output_is_refused_saying_how_to_export_without_it(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    # Before: "model.onnx: tensor 'output_probability' has type sequence_type, which
    # Ferry cannot serve", and nothing about what to do.
    reason = load_failure(tmp_path, start_server,
                          lambda path: _sklearn_classifier(path, zipmap=True))
    assert "'output_probability'" in reason and "ZipMap" in reason, reason
    assert "'zipmap': False" in reason, reason


def test_a_bf16_tensor_is_refused_saying_what_to_do(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    reason = load_failure(tmp_path, start_server, lambda path: save(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)],
        [Value("x", TensorProto.FLOAT, ["batch", 3])],
        [Value("y", TensorProto.BFLOAT16, ["batch", 3])], path))
    assert "'y'" in reason and "BFLOAT16" in reason and "Cast" in reason, reason


# 3. Defaults and optional inputs -----------------------------------------------------


def test_an_input_that_is_also_an_initializer_keeps_its_default(
    server: RunningServer, client: triton.InferenceServerClient, repo: Path
) -> None:
    # As Triton's and onnxruntime's own get_inputs(): a graph input with a default (an
    # initializer) is a weight of the model, not one of its inputs.
    assert [i["name"] for i in rest_metadata(server, "default_scale")["inputs"]] == ["x"]
    check_concurrent(client, repo, "default_scale", rows(
        8, lambda i, n: {"x": np.full((n, 4), i, np.float32)}), ["y"])
    x = np.ones((1, 4), np.float32)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("default_scale", [infer_input("x", x),
                                       infer_input("scale", np.ones(4, np.float32))])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown input 'scale'" in str(refused.value)


def test_an_optional_input_the_graph_needs_is_the_callers_error(
    tmp_path: Path, start_server: Callable[..., RunningServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: the load took `optional: true` silently, and a request that left the input
    # out failed INTERNAL ("Required inputs (['b']) are missing from input feed"): an
    # error of the server, for a request that the config said was fine.
    repo = tmp_path / "models"
    save([helper.make_node("Add", ["a", "b"], ["sum"])],
         [Value("a", TensorProto.FLOAT, ["batch", 4]), Value("b", TensorProto.FLOAT, ["batch", 4])],
         [Value("sum", TensorProto.FLOAT, ["batch", 4])], repo / "pair" / "1" / "model.onnx")
    write_config(repo / "pair", 'max_batch_size: 8\ninput [{ name: "a" }, '
                 '{ name: "b" data_type: TYPE_FP32 dims: [4] optional: true }]\n')
    server = start_server(repo, exit_on_error=True)
    assert any("'b'" in r.getMessage() and "optional" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING"), caplog.text
    client = triton.InferenceServerClient(server.address)
    assert client.get_model_config("pair").config.input[1].optional
    x = np.ones((2, 4), np.float32)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("pair", [infer_input("a", x)])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT", refused.value
    assert "'b'" in str(refused.value)
    both = client.infer("pair", [infer_input("a", x), infer_input("b", x)])
    assert np.array_equal(both.as_numpy("sum"), x + x)


# 4. Scalars, fixed and symbolic dims ---------------------------------------------------


def test_scalar_inputs_and_outputs(
    server: RunningServer, client: triton.InferenceServerClient, repo: Path
) -> None:
    assert client.get_model_config("scalars").config.max_batch_size == 0
    assert rest_metadata(server, "scalars")["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": []},
        {"name": "b", "datatype": "FP32", "shape": []},
    ]
    check_concurrent(client, repo, "scalars", [
        {"a": np.array(i + 0.5, np.float32), "b": np.array(-3, np.float32)} for i in range(6)
    ], ["product"])


def test_a_first_dimension_fixed_at_one_is_served_unbatched(
    server: RunningServer, client: triton.InferenceServerClient, repo: Path
) -> None:
    assert client.get_model_config("fixed_one").config.max_batch_size == 0
    assert rest_metadata(server, "fixed_one")["inputs"][0]["shape"] == [1, 4]
    check_concurrent(client, repo, "fixed_one", [
        {"x": np.full((1, 4), i, np.float32)} for i in range(6)
    ], ["y"])


def test_inputs_sharing_batch_and_sequence_symbols(
    server: RunningServer, client: triton.InferenceServerClient, repo: Path
) -> None:
    assert rest_metadata(server, "sequences")["inputs"] == [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
    ]
    check_concurrent(client, repo, "sequences", [
        {"input_ids": np.arange(n * length, dtype=np.int64).reshape(n, length),
         "attention_mask": (np.arange(n * length).reshape(n, length) % 2).astype(np.int64)}
        for n, length in [(1, 3), (2, 3), (1, 5), (3, 5), (2, 3), (1, 1)]
    ], ["scores"])


def test_an_output_batch_dim_of_another_symbol_still_batches(
    client: triton.InferenceServerClient, repo: Path
) -> None:
    assert client.get_model_config("other_symbol").config.max_batch_size == 32
    check_concurrent(client, repo, "other_symbol", rows(
        12, lambda i, n: {"x": np.full((n, 4), i - 6, np.float32)}), ["y"])


def rows_of_twice_the_batch(path: Path) -> Path:
    """y = concat(x, x) along axis 0: its first dimension is computed, not the batch."""
    return save([helper.make_node("Concat", ["x", "x"], ["y"], axis=0)],
                [Value("x", TensorProto.FLOAT, ["batch", 4])],
                [Value("y", TensorProto.FLOAT, ["rows", 4])], path)


@pytest.mark.parametrize("config", [None, "max_batch_size: 8\n"])
def test_outputs_whose_rows_do_not_follow_the_batch_fail_the_load_saying_what_to_do(
    tmp_path: Path, start_server: Callable[..., RunningServer], config: str | None
) -> None:
    # Before: the model loaded with batching on, and every request of two rows (or of
    # one row batched with another caller's) failed INTERNAL: "output 'y' has shape
    # [4, 4], which does not carry the 2 rows of the batch along its first dimension".
    reason = load_failure(tmp_path, start_server, rows_of_twice_the_batch, config)
    assert "'y'" in reason and "max_batch_size: 0" in reason, reason


def test_such_a_model_serves_unbatched_with_max_batch_size_0(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    repo = tmp_path / "models"
    model_file = rows_of_twice_the_batch(repo / "m" / "1" / "model.onnx")
    write_config(repo / "m", "max_batch_size: 0\n")
    client = triton.InferenceServerClient(start_server(repo, exit_on_error=True).address)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    got = client.infer("m", [infer_input("x", x)]).as_numpy("y")
    assert same(got, expected(model_file, {"x": x}, ["y"])[0])


# 5. FP16, BOOL, pass-through and repeated outputs ---------------------------------------


def test_fp16_and_bool_outputs(
    client: triton.InferenceServerClient, repo: Path
) -> None:
    values = np.array([1.5, -2.25, 65504.0, 1e-8, 70000.0, np.nan], np.float32)
    check_concurrent(client, repo, "half_and_bool", rows(
        9, lambda i, n: {"x": np.resize(np.roll(values, i), (n, 3)),
                         "flag": np.resize(np.arange(3 * n) % (2 + i % 2) == 0, (n, 3))}),
        ["half", "not_flag"])


def test_an_output_that_is_also_an_input_passes_through(
    client: triton.InferenceServerClient, repo: Path
) -> None:
    check_concurrent(client, repo, "pass_through", rows(
        9, lambda i, n: {"x": np.full((n, 3), i, np.float32)}), ["y", "x"])


def test_an_output_the_graph_lists_twice_is_one_output(
    server: RunningServer, client: triton.InferenceServerClient, repo: Path
) -> None:
    # Before: metadata and ModelConfig listed 'y' twice, though an answer carries it once.
    assert rest_metadata(server, "output_twice")["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [-1, 3]}
    ]
    assert [o.name for o in client.get_model_config("output_twice").config.output] == ["y"]
    check_concurrent(client, repo, "output_twice", rows(
        6, lambda i, n: {"x": np.full((n, 3), i, np.float32)}), ["y"])


# 6. Files that are not models Ferry can load -------------------------------------------


def _write(content: bytes) -> Callable[[Path], object]:
    def build(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return build


def _opset(domain: str, version: int, op: str = "Neg") -> Callable[[Path], object]:
    def build(path: Path) -> None:
        graph = helper.make_graph(
            [helper.make_node(op, ["x"], ["y"], domain=domain)], "g",
            [Value("x", TensorProto.FLOAT, ["batch", 3])],
            [Value("y", TensorProto.FLOAT, ["batch", 3])],
        )
        opsets = [helper.make_opsetid("", 17 if domain else version)]
        if domain:
            opsets.append(helper.make_opsetid(domain, version))
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 9
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return build


def _truncated(path: Path) -> None:
    weights_model(path)
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize(("build", "wanted"), [
    (_write(b""), "not an ONNX model"),
    (_write(b"import torch\n\ntorch.save(model, 'model.pt')\n"), "not an ONNX model"),
    (_truncated, "not an ONNX model"),
    # onnxruntime's own words, without the C++ signature it wraps them in
    (_opset("", 99), "Current official support for domain ai.onnx is till opset"),
    (_opset("com.example", 1, "Frobnicate"), "standard ONNX operators"),
], ids=["empty", "python", "truncated", "opset-99", "custom-domain"])
def test_a_file_ferry_cannot_load_is_refused_with_its_reason(
    tmp_path: Path, start_server: Callable[..., RunningServer],
    build: Callable[[Path], object], wanted: str,
) -> None:
    reason = load_failure(tmp_path, start_server, build)
    assert wanted in reason, reason
    assert "onnxruntime::" not in reason and "std::" not in reason, reason

"""Triton's classification extension (tritonclient's `InferRequestedOutput(name,
class_count=k)`), through both ports against the top-k of what onnxruntime answers
in-process: "value:index[:label]" strings, [batch, k] for a batching model, [k] for one
that does not; labels from the output's `label_filename`; bad asks refused by name."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from ferry.server.classification import MAX_CLASS_RESULTS, classify
from tests.conftest import RunningServer, serving
from tests.models import save_graph, write_config

Value = helper.make_tensor_value_info
LABELS = ["cat", "dog", "emu", "yak", "owl"]


def scorer(path: Path, batch: bool = True) -> Path:
    """x [batch, 4] -> probabilities FP32 [batch, 5], votes INT32 [batch, 5] (ties),
    half FP16 [batch, 5]."""
    weights = numpy_helper.from_array(
        np.array([[1, 0, 2, 0, 1], [0, 3, 0, 1, 0], [2, 1, 0, 0, 3], [0, 0, 1, 2, 0]],
                 np.float32),
        "W",
    )
    leading: list[str | int] = ["batch"] if batch else []
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
         helper.make_node("Cast", ["logits"], ["votes"], to=TensorProto.INT32),
         helper.make_node("Cast", ["logits"], ["half"], to=TensorProto.FLOAT16)],
        "scorer",
        [Value("x", TensorProto.FLOAT, [*leading, 4])],
        [Value("probabilities", TensorProto.FLOAT, [*leading, 5]),
         Value("votes", TensorProto.INT32, [*leading, 5]),
         Value("half", TensorProto.FLOAT16, [*leading, 5])],
        [weights],
    )
    return save_graph(graph, path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("classification") / "models"
    scorer(root / "animals" / "1" / "model.onnx")
    write_config(
        root / "animals",
        "max_batch_size: 16\n"
        "dynamic_batching { max_queue_delay_microseconds: 50000 }\n"
        'output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 5 ] '
        'label_filename: "labels.txt" },\n'
        '  { name: "votes" data_type: TYPE_INT32 dims: [ 5 ] },\n'
        '  { name: "half" data_type: TYPE_FP16 dims: [ 5 ] } ]\n',
    )
    (root / "animals" / "labels.txt").write_text("\n".join(LABELS[:4]) + "\n")
    scorer(root / "single" / "1" / "model.onnx", batch=False)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    yield from serving(repo, exit_on_error=True)


def expected(repo: Path, model: str, x: np.ndarray, output: str, k: int,
             labels: list[str]) -> list[list[bytes]]:
    """The top k of onnxruntime's answer, per row, as Triton writes them."""
    session = ort.InferenceSession(
        str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (values,) = session.run([output], {"x": x})
    rows = values.reshape(-1, values.shape[-1])
    answer = []
    for row in rows:
        order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))[:k]
        texts = []
        for index in order:
            text = (f"{int(row[index])}:{index}" if row.dtype.kind in "iu"
                    else f"{float(row[index]):f}:{index}")
            texts.append((text + (f":{labels[index]}" if index < len(labels) else "")).encode())
        answer.append(texts)
    return answer


def grpc_infer(server: RunningServer, model: str, x: np.ndarray,
               outputs: list[triton.InferRequestedOutput]) -> triton.InferResult:
    with triton.InferenceServerClient(server.address) as client:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(model, [tensor], outputs=outputs)


def features(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


def test_top_classes_with_labels_over_grpc_and_rest(server: RunningServer, repo: Path) -> None:
    x = features(3, 1)
    want = expected(repo, "animals", x, "probabilities", 3, LABELS[:4])
    result = grpc_infer(server, "animals", x,
                        [triton.InferRequestedOutput("probabilities", class_count=3)])
    got = result.as_numpy("probabilities")
    assert got.shape == (3, 3) and got.tolist() == want
    assert result.get_output("probabilities").datatype == "BYTES"
    # The fifth class has no label line: "value:4" alone, as Triton answers it.
    everything = grpc_infer(server, "animals", x,
                            [triton.InferRequestedOutput("probabilities", class_count=5)])
    assert everything.as_numpy("probabilities").tolist() == expected(
        repo, "animals", x, "probabilities", 5, LABELS[:4])

    with triton_http.InferenceServerClient(server.http_address) as client:
        tensor = triton_http.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        for binary in (True, False):
            answer = client.infer("animals", [tensor], outputs=[
                triton_http.InferRequestedOutput("probabilities", binary_data=binary,
                                                 class_count=3)
            ])
            got = answer.as_numpy("probabilities").tolist()
            # JSON data comes back as text, binary data as bytes (tritonclient's reading).
            assert got == (want if binary else [[t.decode() for t in row] for row in want])


def test_integer_outputs_rank_ties_by_index_and_k_is_cut_to_the_classes(
    server: RunningServer, repo: Path
) -> None:
    x = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], np.float32)  # votes with ties, all zeros
    result = grpc_infer(server, "animals", x, [
        triton.InferRequestedOutput("votes", class_count=99),
        triton.InferRequestedOutput("probabilities"),  # the tensor, as it is
    ])
    assert result.as_numpy("votes").tolist() == expected(repo, "animals", x, "votes", 5, [])
    assert result.as_numpy("votes")[1].tolist() == [b"0:0", b"0:1", b"0:2", b"0:3", b"0:4"]
    assert result.as_numpy("probabilities").shape == (2, 5)


def test_an_unbatched_model_answers_k_classes(server: RunningServer, repo: Path) -> None:
    x = features(1, 2)[0]
    result = grpc_infer(server, "single", x,
                        [triton.InferRequestedOutput("probabilities", class_count=2)])
    got = result.as_numpy("probabilities")
    assert got.shape == (2,)
    assert got.tolist() == expected(repo, "single", x, "probabilities", 2, [])[0]


def test_callers_with_and_without_classes_share_batches(
    server: RunningServer, repo: Path
) -> None:
    def call(index: int) -> tuple[np.ndarray, object]:
        x = features(1 + index % 2, 10 + index)
        ask = [triton.InferRequestedOutput("probabilities", class_count=2)] if index % 2 else []
        return x, grpc_infer(server, "animals", x, ask).as_numpy("probabilities")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(8)))
    for index, (x, got) in enumerate(answers):
        if index % 2:
            assert got.tolist() == expected(repo, "animals", x, "probabilities", 2, LABELS[:4])
        else:
            session = ort.InferenceSession(str(repo / "animals" / "1" / "model.onnx"))
            assert np.allclose(got, session.run(["probabilities"], {"x": x})[0], rtol=1e-6)


@pytest.mark.parametrize(
    ("output", "count", "words"),
    [
        ("probabilities", 0, "parameter 'classification' must be a whole number of classes "
         "of at least 1, got 0"),
        ("probabilities", -3, "at least 1, got -3"),
        ("half", 2, "class results are not available for its datatype FP16"),
    ],
    ids=["zero", "negative", "fp16"],
)
def test_a_bad_ask_is_refused_naming_the_output(
    server: RunningServer, output: str, count: int, words: str
) -> None:
    requested = triton.InferRequestedOutput(output)
    requested._output.parameters["classification"].int64_param = count  # as any client may
    with pytest.raises(InferenceServerException) as refused:
        grpc_infer(server, "animals", features(1, 3), [requested])
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"output '{output}'" in refused.value.message()
    assert words in refused.value.message()


def test_more_class_strings_than_an_answer_may_hold_are_refused_before_they_are_made() -> None:
    """k comes from the caller: a wide output asked for whole would be a Python string per
    value before the answer's size is checked."""
    from ferry.server.config import ModelSettings, TensorSpec
    from ferry.server.errors import FerryError

    settings = ModelSettings(
        "m", 8, (TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (40_000,)),)
    )
    wide = {"y": np.zeros((2, 40_000), np.float32)}
    with pytest.raises(FerryError) as refused:
        classify(wide, {"y": 40_000}, settings)
    assert f"more than {MAX_CLASS_RESULTS} class results" in refused.value.message
    assert classify(wide, {"y": 3}, settings)["y"].shape == (2, 3)


def test_rest_refuses_a_count_that_is_not_a_whole_number(server: RunningServer) -> None:
    with triton_http.InferenceServerClient(server.http_address) as client:
        tensor = triton_http.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(features(1, 4))
        requested = triton_http.InferRequestedOutput("probabilities")
        requested._parameters["classification"] = "three"
        with pytest.raises(InferenceServerException) as refused:
            client.infer("animals", [tensor], outputs=[requested])
    assert refused.value.status() == "400"
    assert "got 'three'" in refused.value.message()


def test_the_config_shows_the_label_file_and_a_label_file_outside_the_folder_fails_the_load(
    server: RunningServer, tmp_path: Path
) -> None:
    with triton.InferenceServerClient(server.address) as client:
        config = client.get_model_config("animals").config
    assert config.output[0].label_filename == "labels.txt"

    scorer(tmp_path / "m" / "1" / "model.onnx")
    (tmp_path / "secret.txt").write_text("password\n")
    (tmp_path / "m" / "labels.txt").symlink_to(tmp_path / "secret.txt")
    write_config(tmp_path / "m", 'output [ { name: "probabilities" data_type: TYPE_FP32 '
                 'dims: [ 5 ] label_filename: "labels.txt" } ]\n')
    broken = RunningServer(tmp_path)
    try:
        with triton.InferenceServerClient(broken.address) as client:
            (entry,) = client.get_model_repository_index().models
        assert "label_filename must name a file in the model's folder" in entry.reason
    finally:
        broken.close()


def test_labels_reach_the_frontends_of_workers(repo: Path) -> None:
    """With --workers the answer is built in a frontend, from the settings the executor
    announced: the labels travel with them."""
    from tests.process import FerryProcess

    x = features(2, 5)
    with FerryProcess(repo, "--workers", "2", ready_count=2) as server, \
            triton.InferenceServerClient(server.address) as client:
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("animals", [tensor], outputs=[
            triton.InferRequestedOutput("probabilities", class_count=4)
        ])
        assert result.as_numpy("probabilities").tolist() == expected(
            repo, "animals", x, "probabilities", 4, LABELS[:4])
        assert server.stop() == 0

"""The seventh hostile-client pass, through real ports: Triton's classification extension
(k of every type and size, outputs it cannot rank, NaN, zero-sized and scalar outputs,
64-bit integers, label files with empty lines and Unicode line breaks, ever new sets of
classified outputs) and Triton's reshape (requests in the model's shape, zero-sized dims,
a model that answers outside its reshape)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from ferry.server import classification
from tests.conftest import RunningServer, serving
from tests.models import identity_model, save_graph, write_config

Value = helper.make_tensor_value_info
OUTPUTS = 7  # of the fan-out model: 127 sets of outputs to classify


def fan_out(path: Path) -> Path:
    """x [batch, 3] -> y0..y6, each x itself."""
    return save_graph(helper.make_graph(
        [helper.make_node("Identity", ["x"], [f"y{i}"]) for i in range(OUTPUTS)],
        "fan_out",
        [Value("x", TensorProto.FLOAT, ["batch", 3])],
        [Value(f"y{i}", TensorProto.FLOAT, ["batch", 3]) for i in range(OUTPUTS)],
    ), path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("round7") / "models"
    identity_model(root / "wide" / "1" / "model.onnx", "FP32", ("batch", "n"))
    write_config(root / "wide", "max_batch_size: 8\n")
    for datatype in ("INT64", "UINT64"):
        folder = root / datatype.lower()
        identity_model(folder / "1" / "model.onnx", datatype, ("batch", 3))
        write_config(folder, "max_batch_size: 8\n")
    identity_model(root / "scalar" / "1" / "model.onnx", "FP32", ())
    identity_model(root / "text" / "1" / "model.onnx", "BYTES", ("batch", 3))
    write_config(root / "text", "max_batch_size: 8\n")
    identity_model(root / "labelled" / "1" / "model.onnx", "FP32", ("batch", 5))
    write_config(root / "labelled", 'max_batch_size: 8\noutput [ { name: "OUTPUT0" '
                 'data_type: TYPE_FP32 dims: [ 5 ] label_filename: "labels.txt" } ]\n')
    # Line two is empty; line three holds a Unicode line separator and a form feed, which
    # end no line in a label file (Triton reads it with std::getline); line four ends CRLF.
    (root / "labelled" / "labels.txt").write_bytes(
        "cat\n\nemu\u2028yak\x0cowl\r\nelk\n".encode()
    )
    fan_out(root / "fan_out" / "1" / "model.onnx")
    write_config(root / "fan_out", "max_batch_size: 8\n")
    # Reshape: a flat image the model runs as [3, 4]; a model that answers a shape its
    # output's reshape does not hold (the graph's dims are symbolic, so only a run shows).
    identity_model(root / "flat" / "1" / "model.onnx", "FP32", ("batch", "h", "w"))
    write_config(root / "flat", "max_batch_size: 8\n"
                 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 12 ] '
                 "reshape: { shape: [ 3, 4 ] } } ]\n"
                 'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 12 ] '
                 "reshape: { shape: [ 3, 4 ] } } ]\n")
    identity_model(root / "columns" / "1" / "model.onnx", "FP32", ("batch", "h", "w"))
    write_config(root / "columns", "max_batch_size: 8\n"
                 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 2 ] '
                 "reshape: { shape: [ 2, -1 ] } } ]\n"
                 'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, 3 ] '
                 "reshape: { shape: [ 3, -1 ] } } ]\n")
    identity_model(root / "empty" / "1" / "model.onnx", "FP32", ("batch", "h", "w"))
    write_config(root / "empty", "max_batch_size: 8\n"
                 'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 0 ] '
                 "reshape: { shape: [ 0, 5 ] } } ]\n"
                 'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 0 ] '
                 "reshape: { shape: [ 0, 5 ] } } ]\n")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    yield from serving(repo, exit_on_error=True)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.address) as connected:
        yield connected


Parameter = Callable[[object], None]


def infer(
    client: triton.InferenceServerClient,
    model: str,
    x: np.ndarray,
    datatype: str,
    classes: dict[str, Parameter | int | None] | None = None,
    name: str = "INPUT0",
) -> triton.InferResult:
    tensor = triton.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    outputs = []
    for output, count in (classes or {}).items():
        requested = triton.InferRequestedOutput(output)
        if callable(count):
            # any field of the parameter, as any client may send
            count(requested._output.parameters["classification"])
        elif count is not None:  # None: the tensor as it is
            requested._output.parameters["classification"].int64_param = count
        outputs.append(requested)
    return client.infer(model, [tensor], outputs=outputs or None)


def rest(server: RunningServer, model: str, body: dict[str, object]) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://{server.http_address}/v2/models/{model}/infer", data=json.dumps(body).encode()
    )
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


ROW = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 5], "data": [1, 2, 3, 4, 5]}


def rest_classes(server: RunningServer, count: object, **more: object) -> tuple[int, bytes]:
    return rest(server, "wide", {"inputs": [ROW], "outputs": [
        {"name": "OUTPUT0", "parameters": {"classification": count, **more}}
    ]})


# -- classification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "values", "want"),
    [
        # 2**53 and 2**53 + 1 are one number as float64: ranked as float64 they tie, and
        # the tie goes to the lower index.
        ("INT64", [2**53, 2**53 + 1, -(2**63)],
         [b"9007199254740993:1", b"9007199254740992:0", b"-9223372036854775808:2"]),
        ("UINT64", [2**64 - 2, 2**64 - 1, 0],
         [b"18446744073709551615:1", b"18446744073709551614:0", b"0:2"]),
    ],
    ids=["int64", "uint64"],
)
def test_64_bit_integers_rank_by_their_exact_values(
    client: triton.InferenceServerClient, datatype: str, values: list[int], want: list[bytes]
) -> None:
    x = np.array([values], np.int64 if datatype == "INT64" else np.uint64)
    result = infer(client, datatype.lower(), x, datatype, {"OUTPUT0": 3})
    assert result.as_numpy("OUTPUT0").tolist() == [want]


def test_an_empty_label_line_adds_no_label_and_only_a_newline_ends_one(
    server: RunningServer, client: triton.InferenceServerClient
) -> None:
    """Triton appends a label only when it is not empty, and reads the file by '\\n'."""
    want = ["5.000000:0:cat", "4.000000:1", "3.000000:2:emu\u2028yak\x0cowl",
            "2.000000:3:elk", "1.000000:4"]
    x = np.array([[5, 4, 3, 2, 1]], np.float32)
    got = infer(client, "labelled", x, "FP32", {"OUTPUT0": 5}).as_numpy("OUTPUT0")
    assert got.tolist() == [[text.encode() for text in want]]
    status, body = rest(server, "labelled", {
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 5],
                    "data": [5, 4, 3, 2, 1]}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 5}}],
    })
    assert status == 200
    assert json.loads(body)["outputs"][0]["data"] == want


def test_classifying_ever_new_sets_of_outputs_keeps_a_bounded_table(
    client: triton.InferenceServerClient,
) -> None:
    """Each set of classified outputs is answered from settings of its own, kept for the
    encoders' caches: one per set a model has (2**outputs) would let callers grow the
    table without end."""
    x = np.array([[3, 1, 2]], np.float32)
    names = [f"y{i}" for i in range(OUTPUTS)]
    for chosen in (*range(1, 2**OUTPUTS), 1, 2**OUTPUTS - 1):
        asked = [name for bit, name in enumerate(names) if chosen >> bit & 1]
        ask: dict[str, Parameter | int | None] = {n: 2 if n in asked else None for n in names}
        result = infer(client, "fan_out", x, "FP32", ask, name="x")
        for name in names:
            got = result.as_numpy(name)
            if name in asked:
                assert got.tolist() == [[b"3.000000:0", b"2.000000:2"]]
            else:
                assert got.tolist() == x.tolist()
    kept = [len(variants) for _, variants in classification._VARIANTS.values()]
    assert kept and max(kept) <= 32


def set_field(field: str, value: object) -> Parameter:
    return lambda parameter: setattr(parameter, field, value)


@pytest.mark.parametrize(
    ("count", "said"),
    [
        (0, "got 0"),
        (-1, "got -1"),
        (set_field("bool_param", True), "got True"),
        (set_field("double_param", 2.0), "got 2.0"),
        (set_field("string_param", "2"), "got '2'"),
        (lambda parameter: parameter.SetInParent(), "got None"),
    ],
    ids=["zero", "negative", "bool", "double", "string", "no-value"],
)
def test_a_count_that_is_not_a_positive_whole_number_is_refused_over_grpc(
    client: triton.InferenceServerClient, count: Parameter | int, said: str
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        infer(client, "wide", np.ones((1, 5), np.float32), "FP32", {"OUTPUT0": count})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "output 'OUTPUT0': parameter 'classification' must be a whole number" in (
        refused.value.message()
    )
    assert said in refused.value.message()


@pytest.mark.parametrize(
    ("count", "said"),
    [(0, "got 0"), (-1, "got -1"), (True, "got 'True'"), (2.0, "got '2.0'"),
     ("2", "got '2'"), (None, "got 'None'"), ([2], "got '[2]'")],
    ids=["zero", "negative", "bool", "double", "string", "null", "list"],
)
def test_a_count_that_is_not_a_positive_whole_number_is_refused_over_rest(
    server: RunningServer, count: object, said: str
) -> None:
    status, body = rest_classes(server, count)
    assert status == 400
    message = json.loads(body)["error"]
    assert "output 'OUTPUT0': parameter 'classification' must be a whole number" in message
    assert said in message


def test_a_huge_count_is_cut_to_the_classes_without_allocating_it(
    server: RunningServer, client: triton.InferenceServerClient
) -> None:
    want = [b"5.000000:4", b"4.000000:3", b"3.000000:2", b"2.000000:1", b"1.000000:0"]
    x = np.tile(np.array([[1, 2, 3, 4, 5]], np.float32), (8, 1))
    for count in (2**63 - 1, set_field("uint64_param", 2**64 - 1)):
        got = infer(client, "wide", x, "FP32", {"OUTPUT0": count}).as_numpy("OUTPUT0")
        assert got.tolist() == [want] * 8
    status, body = rest_classes(server, 2**63 - 1)
    assert status == 200
    assert json.loads(body)["outputs"][0]["data"] == [t.decode() for t in want]
    # Many rows of many classes: refused by the results it would make, not by k.
    with pytest.raises(InferenceServerException) as refused:
        infer(client, "wide", np.ones((8, 20_000), np.float32), "FP32", {"OUTPUT0": 2**63 - 1})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "more than 65536 class results in one answer" in refused.value.message()


def test_outputs_with_nothing_to_rank_or_nothing_rankable(
    server: RunningServer, client: triton.InferenceServerClient
) -> None:
    zero = infer(client, "wide", np.ones((2, 0), np.float32), "FP32", {"OUTPUT0": 3})
    assert zero.as_numpy("OUTPUT0").shape == (2, 0)
    assert zero.get_output("OUTPUT0").datatype == "BYTES"
    scalar = infer(client, "scalar", np.array(2.5, np.float32), "FP32", {"OUTPUT0": 3})
    assert scalar.as_numpy("OUTPUT0").tolist() == [b"2.500000:0"]
    special = np.array([[3, np.nan, 1, np.inf, -np.inf]], np.float32)
    ranked = infer(client, "wide", special, "FP32", {"OUTPUT0": 5}).as_numpy("OUTPUT0")
    assert ranked.tolist() == [[b"inf:3", b"3.000000:0", b"1.000000:2", b"-inf:4", b"nan:1"]]
    with pytest.raises(InferenceServerException) as refused:
        infer(client, "text", np.array([[b"a", b"b", b"c"]], object), "BYTES", {"OUTPUT0": 2})
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "output 'OUTPUT0': class results are not available for its datatype BYTES" in (
        refused.value.message()
    )


def test_rest_classes_twice_and_as_binary_data(server: RunningServer) -> None:
    status, body = rest(server, "wide", {"inputs": [ROW], "outputs": [
        {"name": "OUTPUT0", "parameters": {"classification": 2}},
        {"name": "OUTPUT0", "parameters": {"classification": 3}},
    ]})
    assert status == 400
    assert json.loads(body)["error"] == "output 'OUTPUT0' is requested more than once"
    request = urllib.request.Request(
        f"http://{server.http_address}/v2/models/wide/infer",
        data=json.dumps({"inputs": [ROW], "outputs": [
            {"name": "OUTPUT0", "parameters": {"classification": 2, "binary_data": True}}
        ]}).encode(),
    )
    with urllib.request.urlopen(request) as answer:
        header_bytes = int(answer.headers["Inference-Header-Content-Length"])
        body = answer.read()
    header, binary = body[:header_bytes], body[header_bytes:]
    output = json.loads(header)["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 2]
    assert binary == b"\x0a\x00\x00\x005.000000:4\x0a\x00\x00\x004.000000:3"
    assert output["parameters"]["binary_data_size"] == len(binary)


# -- reshape ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[1, 3, 4], [1, 10], [1, 0]], ids=["model's", "short", "empty"])
def test_a_request_outside_the_config_dims_is_refused_naming_the_input_and_shape(
    server: RunningServer, client: triton.InferenceServerClient, shape: list[int]
) -> None:
    words = f"input 'INPUT0': expected shape [-1, 12], got {shape}"
    with pytest.raises(InferenceServerException) as refused:
        infer(client, "flat", np.zeros(shape, np.float32), "FP32")
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert words in refused.value.message()
    status, body = rest(server, "flat", {"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": shape, "data": [0] * int(np.prod(shape))}
    ]})
    assert status == 400 and words in json.loads(body)["error"]


def test_reshape_with_a_variable_and_with_a_zero_sized_dimension(
    client: triton.InferenceServerClient,
) -> None:
    x = np.arange(12, dtype=np.float32).reshape(1, 12)
    assert np.array_equal(infer(client, "flat", x, "FP32").as_numpy("OUTPUT0"), x)
    empty = infer(client, "empty", np.zeros((3, 0), np.float32), "FP32").as_numpy("OUTPUT0")
    assert empty.shape == (3, 0)


def test_a_model_answering_outside_its_reshape_fails_naming_the_output(
    client: triton.InferenceServerClient,
) -> None:
    """The graph's dims are symbolic, so the load cannot see that the model answers
    [batch, 2, n] to an output whose reshape is [3, -1]."""
    with pytest.raises(InferenceServerException) as failed:
        infer(client, "columns", np.zeros((1, 2, 2), np.float32), "FP32")
    assert failed.value.status() == "StatusCode.INTERNAL"
    message = failed.value.message()
    assert "output 'OUTPUT0'" in message
    assert "[1, 2, 2]" in message and "reshape [3, -1]" in message

"""Every datatype round-trips through an identity model, in both request encodings.

Raw: `raw_input_contents`, which is all tritonclient ever sends. Typed: the `contents`
fields, which tritonclient cannot send, so those requests are built with Ferry's stubs
and sent over plain gRPC; their responses are still read by tritonclient's InferResult,
so that decoding does not rely on Ferry's own codec. Outputs always come back raw.

Limit of BYTES: ONNX string tensors hold UTF-8 text (onnx.proto: "Each element of
string_data is a UTF-8 encoded Unicode string"), and onnxruntime cannot hand back a string
that is not UTF-8. So a BYTES element must be valid UTF-8 (empty strings, NUL bytes and
any non-ASCII text are fine); anything else is refused with INVALID_ARGUMENT naming the
input, before it is queued.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.proto.codec import NUMPY_DTYPES
from tests.conftest import RunningServer
from tests.models import identity_model

SHAPE = (3, 4)  # identity_model's default dims are ("batch", 4)

# Written from the protocol, not from Ferry's codec: which `contents` field carries what.
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
DATATYPES = [*TYPED_FIELDS, "FP16"]

TEXTS = [
    b"",
    b"plain ascii",
    "\u00e9t\u00e9".encode(),  # Latin-1 range, two bytes each in UTF-8
    "\u65e5\u672c\u8a9e".encode(),  # CJK
    "\U0001f6a2 ferry".encode(),  # outside the BMP: four UTF-8 bytes
    b"nul\x00inside",
    b"\x00",
    b"tab\tnewline\n",
    b"x" * 1000,
    b"",
    "\u03a9".encode(),
    b"end",
]


def sample(datatype: str) -> np.ndarray:
    """A SHAPE array with each type's edge values: limits, zero, NaN, infinities."""
    rng = np.random.default_rng(DATATYPES.index(datatype))
    if datatype == "BYTES":
        return np.array(TEXTS, dtype=object).reshape(SHAPE)
    if datatype == "BOOL":
        return np.array([True, False] * 6).reshape(SHAPE)
    dtype = np.dtype(tc.triton_to_np_dtype(datatype))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        edges = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
        rest = rng.integers(info.min, info.max, size=6, dtype=dtype, endpoint=True)
        return np.array([*edges, *rest], dtype=dtype).reshape(SHAPE)
    finfo = np.finfo(dtype)
    edges = [np.nan, np.inf, -np.inf, -0.0, finfo.max, finfo.min, finfo.tiny, finfo.eps]
    rest = rng.standard_normal(4)
    return np.array([*edges, *rest], dtype=dtype).reshape(SHAPE)


def assert_identical(got: np.ndarray, sent: np.ndarray) -> None:
    assert got.shape == sent.shape
    if sent.dtype == object:
        assert [bytes(v) for v in got.ravel()] == [bytes(v) for v in sent.ravel()]
        return
    assert got.dtype == sent.dtype
    if sent.dtype.kind == "f":  # bit for bit: NaN, -0.0 and subnormals included
        unsigned = np.dtype(f"u{sent.dtype.itemsize}")
        np.testing.assert_array_equal(got.view(unsigned), sent.view(unsigned))
    else:
        np.testing.assert_array_equal(got, sent)


def model_name(datatype: str) -> str:
    return f"identity_{datatype.lower()}"


def identity_repository(repo: Path) -> Path:
    """One identity model per datatype, named by model_name()."""
    for datatype in DATATYPES:
        identity_model(repo / model_name(datatype) / "1" / "model.onnx", datatype)
    return repo


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = RunningServer(identity_repository(tmp_path_factory.mktemp("repository")))
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


def raw_infer(client: tc.InferenceServerClient, datatype: str, array: np.ndarray) -> np.ndarray:
    tensor = tc.InferInput("INPUT0", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    result = client.infer(model_name(datatype), [tensor])
    output = result.get_output("OUTPUT0")
    assert output.datatype == datatype
    assert list(output.shape) == list(array.shape)
    got = result.as_numpy("OUTPUT0")
    assert got is not None
    return got


def typed_request(
    datatype: str, values: list[object], shape: tuple[int, ...]
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model_name(datatype), id="typed")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    if datatype in TYPED_FIELDS:
        getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(values)
    return request


def typed_infer(
    stub: pb_grpc.GRPCInferenceServiceStub, datatype: str, array: np.ndarray
) -> np.ndarray:
    values = list(array.ravel()) if datatype == "BYTES" else array.ravel().tolist()
    response = stub.ModelInfer(typed_request(datatype, values, array.shape), timeout=30)
    # Typed inputs are answered in typed contents (raw requests get raw answers).
    assert not response.raw_output_contents
    assert response.id == "typed"
    (output,) = response.outputs
    assert output.datatype == datatype
    values = list(getattr(output.contents, TYPED_FIELDS[datatype]))
    dtype = object if datatype == "BYTES" else NUMPY_DTYPES[datatype]
    got = np.empty(len(values), dtype=dtype)
    got[:] = values
    return got.reshape(tuple(output.shape))


@pytest.mark.parametrize("datatype", DATATYPES)
def test_raw_round_trip(client: tc.InferenceServerClient, datatype: str) -> None:
    sent = sample(datatype)
    assert_identical(raw_infer(client, datatype, sent), sent)


@pytest.mark.parametrize("datatype", list(TYPED_FIELDS))
def test_typed_contents_round_trip(stub: pb_grpc.GRPCInferenceServiceStub, datatype: str) -> None:
    sent = sample(datatype)
    assert_identical(typed_infer(stub, datatype, sent), sent)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_metadata_reports_the_datatype(client: tc.InferenceServerClient, datatype: str) -> None:
    metadata = client.get_model_metadata(model_name(datatype))
    assert [(t.datatype, list(t.shape)) for t in metadata.inputs] == [(datatype, [-1, 4])]
    assert [(t.datatype, list(t.shape)) for t in metadata.outputs] == [(datatype, [-1, 4])]


def test_fp16_has_no_typed_field(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    for request in (
        typed_request("FP16", [], SHAPE),  # no contents at all
        _with_fp32_contents(typed_request("FP16", [], SHAPE)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        message = caught.value.details()
        assert "INPUT0" in message and "FP16" in message and "raw" in message


def _with_fp32_contents(request: pb.ModelInferRequest) -> pb.ModelInferRequest:
    request.inputs[0].contents.fp32_contents.extend([0.5] * 12)
    return request


def test_bytes_of_strings_from_numpy_str_arrays(client: tc.InferenceServerClient) -> None:
    """tritonclient also takes str elements (sent as UTF-8); they come back as bytes."""
    texts = np.array([["a", "", "\u00fcber", "\u4e2d"]] * 2, dtype=object)
    got = raw_infer(client, "BYTES", texts)
    assert [bytes(v) for v in got.ravel()] == [t.encode() for t in texts.ravel()]


def test_bytes_of_empty_strings_only(
    client: tc.InferenceServerClient, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    empty = np.array([[b""] * 4], dtype=object)
    assert_identical(raw_infer(client, "BYTES", empty), empty)
    assert_identical(typed_infer(stub, "BYTES", empty), empty)


def test_bytes_that_are_not_utf8_are_refused_in_either_encoding(
    client: tc.InferenceServerClient, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """The documented limit: ONNX string tensors are UTF-8, so raw binary cannot pass."""
    binary = np.array([[b"ok", b"\xff\xfe", b"\x80", b"ok"]], dtype=object)
    with pytest.raises(InferenceServerException) as raised:
        raw_infer(client, "BYTES", binary)
    assert "INVALID_ARGUMENT" in str(raised.value.status())
    assert "INPUT0" in raised.value.message() and "UTF-8" in raised.value.message()

    with pytest.raises(grpc.RpcError) as caught:
        typed_infer(stub, "BYTES", binary)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in caught.value.details() and "UTF-8" in caught.value.details()

    # The model is unharmed.
    fine = np.array([[b"still", b"", b"fine", b"\x00"]], dtype=object)
    assert_identical(raw_infer(client, "BYTES", fine), fine)


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("INT8", 128), ("INT8", -129), ("INT16", 40000), ("UINT8", 256), ("UINT16", 70000)],
)
def test_typed_values_out_of_range_are_refused(
    stub: pb_grpc.GRPCInferenceServiceStub, datatype: str, value: int
) -> None:
    """int_contents and uint_contents are 32 bits wide: narrower types must not wrap."""
    values = [0] * 11 + [value]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(typed_request(datatype, values, SHAPE), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in caught.value.details() and datatype in caught.value.details()


def test_typed_contents_in_the_wrong_field_are_refused(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    request = typed_request("INT32", [], SHAPE)
    request.inputs[0].contents.fp32_contents.extend([1.0] * 12)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in caught.value.details() and "int_contents" in caught.value.details()


def test_raw_and_typed_contents_together_are_refused(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    request = typed_request("INT32", list(range(12)), SHAPE)
    request.raw_input_contents.append(np.arange(12, dtype="<i4").tobytes())
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in caught.value.details()

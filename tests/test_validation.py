"""Every way a request can be wrong, through the real gRPC port.

Each error must come back with the right status code and a message that names the input,
what was expected and what came. tritonclient sends the requests it can build; Ferry's own
stubs over plain grpc send the malformed ones tritonclient refuses to build.
"""

from __future__ import annotations

import struct
import threading
import tracemalloc
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.models import identity_model, mlp_model, two_input_model, write_config

MAX_BATCH = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("repo")
    mlp_model(repo / "mlp" / "1" / "model.onnx")
    write_config(repo / "mlp", f"max_batch_size: {MAX_BATCH}\n")
    two_input_model(repo / "add" / "1" / "model.onnx")
    identity_model(repo / "text" / "1" / "model.onnx", "BYTES", ("batch", "n"))
    identity_model(repo / "vec" / "1" / "model.onnx", "FP32", ("batch", "n"))
    running = RunningServer(repo)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


# Helpers ------------------------------------------------------------------------------


def triton_input(name: str, array: np.ndarray, datatype: str | None = None) -> triton.InferInput:
    from tritonclient.utils import np_to_triton_dtype

    tensor = triton.InferInput(name, list(array.shape), datatype or np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def triton_error(call: Callable[[], object]) -> tuple[str, str]:
    """Run a tritonclient call that must fail; return (status code name, message)."""
    with pytest.raises(InferenceServerException) as info:
        call()
    status = info.value.status() or ""
    return status.removeprefix("StatusCode."), info.value.message() or ""


def stub_error(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest
) -> tuple[str, str]:
    """Send a hand-built ModelInferRequest that must fail; return (code name, details)."""
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    error = info.value
    return error.code().name, error.details() or ""  # type: ignore[attr-defined]


def request(model: str, *inputs: tuple[str, str, list[int]], raw: list[bytes] | None = None
            ) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        req.raw_input_contents.extend(raw)
    return req


def fp32(rows: int = 1, features: int = 16) -> np.ndarray:
    return np.arange(rows * features, dtype=np.float32).reshape(rows, features) / 100


def assert_mentions(message: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def assert_serves(client: triton.InferenceServerClient) -> None:
    """The server still answers a good request correctly."""
    x = fp32(2)
    result = client.infer("mlp", [triton_input("x", x)])
    assert result.as_numpy("probs").shape == (2, 4)
    np.testing.assert_allclose(result.as_numpy("probs").sum(axis=1), 1, rtol=1e-5)


# Models and versions ------------------------------------------------------------------


def test_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    code, message = triton_error(lambda: client.infer("no_such_model", [triton_input("x", fp32())]))
    assert code == "NOT_FOUND"
    assert_mentions(message, "no_such_model")


def test_unknown_version_is_not_found(client: triton.InferenceServerClient) -> None:
    code, message = triton_error(
        lambda: client.infer("mlp", [triton_input("x", fp32())], model_version="7")
    )
    assert code == "NOT_FOUND"
    assert_mentions(message, "mlp", "'7'", "available: 1")


def test_metadata_of_unknown_model_and_version_is_not_found(
    client: triton.InferenceServerClient,
) -> None:
    code, message = triton_error(lambda: client.get_model_metadata("no_such_model"))
    assert (code, "no_such_model" in message) == ("NOT_FOUND", True)
    code, message = triton_error(lambda: client.get_model_config("mlp", model_version="9"))
    assert (code, "'9'" in message) == ("NOT_FOUND", True)


# Names --------------------------------------------------------------------------------


def test_unknown_input(client: triton.InferenceServerClient) -> None:
    code, message = triton_error(lambda: client.infer("mlp", [triton_input("y", fp32())]))
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "unknown input 'y'", "'x'")


def test_missing_input(client: triton.InferenceServerClient) -> None:
    a = np.ones((1, 3), np.float32)
    code, message = triton_error(lambda: client.infer("add", [triton_input("a", a)]))
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "missing input", "'b'")


def test_duplicate_input(client: triton.InferenceServerClient) -> None:
    code, message = triton_error(
        lambda: client.infer("mlp", [triton_input("x", fp32()), triton_input("x", fp32())])
    )
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "more than once")


def test_unknown_requested_output(client: triton.InferenceServerClient) -> None:
    code, message = triton_error(
        lambda: client.infer(
            "mlp", [triton_input("x", fp32())], outputs=[triton.InferRequestedOutput("nope")]
        )
    )
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "unknown output 'nope'", "'logits'", "'probs'")


def test_duplicate_requested_output(client: triton.InferenceServerClient) -> None:
    outputs = [triton.InferRequestedOutput("probs"), triton.InferRequestedOutput("probs")]
    code, message = triton_error(
        lambda: client.infer("mlp", [triton_input("x", fp32())], outputs=outputs)
    )
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'probs'", "more than once")


# Datatypes and shapes -----------------------------------------------------------------


def test_wrong_datatype(client: triton.InferenceServerClient) -> None:
    x = fp32().astype(np.float64)
    code, message = triton_error(lambda: client.infer("mlp", [triton_input("x", x)]))
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "expected FP32", "got FP64")


def test_wrong_rank(client: triton.InferenceServerClient) -> None:
    x = np.zeros(16, np.float32)
    code, message = triton_error(lambda: client.infer("mlp", [triton_input("x", x)]))
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "expected shape [-1, 16]", "got [16]")


def test_wrong_non_batch_dimension(client: triton.InferenceServerClient) -> None:
    x = np.zeros((1, 15), np.float32)
    code, message = triton_error(lambda: client.infer("mlp", [triton_input("x", x)]))
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "expected shape [-1, 16]", "got [1, 15]")


def test_negative_dimension(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    req = request("mlp", ("x", "FP32", [-3, 16]), raw=[b""])
    code, message = stub_error(stub, req)
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "negative", "[-3, 16]")


def test_batch_size_zero(client: triton.InferenceServerClient) -> None:
    x = np.zeros((0, 16), np.float32)
    code, message = triton_error(lambda: client.infer("mlp", [triton_input("x", x)]))
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "batch size 0", "'x'", f"1..{MAX_BATCH}")


def test_batch_larger_than_max_batch_size(client: triton.InferenceServerClient) -> None:
    x = fp32(MAX_BATCH + 1)
    code, message = triton_error(lambda: client.infer("mlp", [triton_input("x", x)]))
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, f"batch size {MAX_BATCH + 1}", "'x'", f"1..{MAX_BATCH}")
    # exactly max_batch_size rows is fine
    assert client.infer("mlp", [triton_input("x", fp32(MAX_BATCH))]).as_numpy("probs").shape == (
        MAX_BATCH,
        4,
    )


def test_inputs_disagree_on_batch_size(client: triton.InferenceServerClient) -> None:
    a = np.ones((2, 3), np.float32)
    b = np.ones((3, 3), np.float32)
    code, message = triton_error(
        lambda: client.infer("add", [triton_input("a", a), triton_input("b", b)])
    )
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "batch size", "'a' has 2", "'b' has 3")


# Raw contents -------------------------------------------------------------------------


def test_raw_content_byte_length_mismatch(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    req = request("mlp", ("x", "FP32", [1, 16]), raw=[fp32().tobytes()[:-4]])
    code, message = stub_error(stub, req)
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "FP32 [1, 16]", "expected 64 bytes", "got 60")


def test_raw_content_too_long_through_tritonclient(client: triton.InferenceServerClient) -> None:
    """tritonclient lets a shape be changed after the data is set: 2 rows claimed, 3 sent."""
    tensor = triton_input("x", fp32(3))
    tensor.set_shape([2, 16])
    code, message = triton_error(lambda: client.infer("mlp", [tensor]))
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "expected 128 bytes", "got 192")


def test_raw_input_contents_count_differs_from_inputs(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    one_row = np.ones((1, 3), np.float32).tobytes()
    req = request("add", ("a", "FP32", [1, 3]), ("b", "FP32", [1, 3]), raw=[one_row])
    code, message = stub_error(stub, req)
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "raw_input_contents has 1 entries", "2 inputs")


def test_both_raw_and_typed_contents(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    req = request("mlp", ("x", "FP32", [1, 16]), raw=[fp32().tobytes()])
    req.inputs[0].contents.fp32_contents.extend(fp32().ravel().tolist())
    code, message = stub_error(stub, req)
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "both raw_input_contents and typed contents")


def test_typed_contents_with_wrong_element_count(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    req = request("mlp", ("x", "FP32", [1, 16]))
    req.inputs[0].contents.fp32_contents.extend([0.5] * 15)
    code, message = stub_error(stub, req)
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "expected 16 values in contents.fp32_contents", "got 15")


def test_typed_contents_in_the_wrong_field(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    req = request("mlp", ("x", "FP32", [1, 16]))
    req.inputs[0].contents.int_contents.extend(range(16))
    code, message = stub_error(stub, req)
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'x'", "FP32", "contents.fp32_contents", "contents.int_contents")


def test_typed_contents_are_accepted(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """The control for the typed-contents errors: the right field and count work."""
    req = request("mlp", ("x", "FP32", [1, 16]))
    req.inputs[0].contents.fp32_contents.extend(fp32().ravel().tolist())
    response = stub.ModelInfer(req, timeout=30)
    assert [o.name for o in response.outputs] == ["logits", "probs"]


# BYTES --------------------------------------------------------------------------------


def _prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        pytest.param(_prefixed(b"ab") + struct.pack("<I", 100) + b"xyz", "declares 100 bytes",
                     id="length-past-end"),
        pytest.param(_prefixed(b"ab") + b"\x01\x00", "length prefix runs past the end",
                     id="truncated-prefix"),
        pytest.param(_prefixed(b"ab", b"cd") + b"junk", "left over", id="trailing-bytes"),
    ],
)
def test_bad_bytes_length_prefixes(
    stub: pb_grpc.GRPCInferenceServiceStub, raw: bytes, fragment: str
) -> None:
    req = request("text", ("INPUT0", "BYTES", [1, 2]), raw=[raw])
    code, message = stub_error(stub, req)
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'INPUT0'", "BYTES", fragment)


def test_good_bytes_round_trip(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    req = request("text", ("INPUT0", "BYTES", [1, 2]), raw=[_prefixed(b"ab", b"")])
    response = stub.ModelInfer(req, timeout=30)
    assert response.raw_output_contents[0] == _prefixed(b"ab", b"")


# Absurd shapes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "name", "datatype", "encoding"),
    [
        ("vec", "INPUT0", "FP32", "raw"),
        ("vec", "INPUT0", "FP32", "typed"),
        ("text", "INPUT0", "BYTES", "raw"),
        ("text", "INPUT0", "BYTES", "typed"),
        ("add", "a", "FP32", "raw"),
    ],
)
@pytest.mark.parametrize("shape", [[1, 2**40], [2**40, 1], [1, 2**62], [1, 2**31 + 1]])
def test_absurd_shape_is_rejected_before_allocation(
    client: triton.InferenceServerClient,
    stub: pb_grpc.GRPCInferenceServiceStub,
    model: str,
    name: str,
    datatype: str,
    encoding: str,
    shape: list[int],
) -> None:
    req = request(model, (name, datatype, shape))
    if model == "add":
        req.inputs.add(name="b", datatype="FP32", shape=shape)
    for tensor in req.inputs:
        if encoding == "raw":
            req.raw_input_contents.append(_prefixed(b"x") if datatype == "BYTES" else b"\0" * 4)
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.append(b"x")
        else:
            tensor.contents.fp32_contents.append(0.0)
    code, message = stub_error(stub, req)
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, f"'{name}'", str(shape))
    assert_serves(client)


@pytest.mark.parametrize(("datatype", "model"), [("FP32", "vec"), ("BYTES", "text")])
def test_large_claimed_shape_allocates_nothing(
    client: triton.InferenceServerClient,
    stub: pb_grpc.GRPCInferenceServiceStub,
    datatype: str,
    model: str,
) -> None:
    """A shape under the element cap but far beyond the bytes sent must fail on the byte
    count, not after building a tensor of the claimed size (here 2**24 elements: 128 MiB
    of object pointers for BYTES)."""
    shape = [1, 2**24]
    raw = _prefixed(b"x") if datatype == "BYTES" else b"\0" * 4
    req = request(model, ("INPUT0", datatype, shape), raw=[raw])
    tracemalloc.start()
    try:
        code, message = stub_error(stub, req)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == "INVALID_ARGUMENT"
    assert_mentions(message, "'INPUT0'", str(shape))
    assert peak < 16 * 2**20, f"peak traced allocation {peak} bytes while rejecting"
    assert_serves(client)


def test_server_stays_responsive_under_absurd_requests(
    server: RunningServer, client: triton.InferenceServerClient
) -> None:
    """Absurd requests from several threads at once, interleaved with good ones."""
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            with grpc.insecure_channel(server.address) as channel:
                s = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(10):
                    req = request("text", ("INPUT0", "BYTES", [1, 2**40]), raw=[_prefixed(b"x")])
                    with pytest.raises(grpc.RpcError) as info:
                        s.ModelInfer(req, timeout=30)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(5):
        assert_serves(client)
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert client.is_server_ready()


def test_one_invalid_request_does_not_disturb_valid_ones(
    client: triton.InferenceServerClient, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """After each kind of error the model still answers correctly."""
    stub_error(stub, request("mlp", ("x", "FP32", [1, 16]), raw=[b"\0"]))
    triton_error(lambda: client.infer("mlp", [triton_input("y", fp32())]))
    assert_serves(client)


def test_messages_are_plain_text_not_tracebacks(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    _, message = stub_error(stub, request("mlp", ("x", "FP32", [1, 16]), raw=[b"\0" * 3]))
    assert "Traceback" not in message

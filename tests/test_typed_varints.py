"""Typed integer and BOOL inputs (bool_contents, int_contents, int64_contents,
uint_contents, uint64_contents) decoded from their packed varint bytes with numpy.

protobuf's own parsing is the reference throughout: the decoder must read every payload
protobuf reads exactly as protobuf does, and answer None (so that the server falls back to
protobuf's container) for every payload protobuf refuses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.config import ModelSettings, TensorSpec
from ferry.server.errors import FerryError
from ferry.server.tensors import (
    VARINT_DECODE_MIN_VALUES,
    WIDE_VARINT_DECODE_MIN_VALUES,
    decode_request,
    decode_with_numpy,
)
from ferry.server.varints import (
    CHUNK_BYTES,
    SCALAR_DTYPES,
    Scalar,
    decode_packed,
    packed_payload,
)
from tests.conftest import RunningServer
from tests.models import OPSET

# Written from grpc_service.proto: each field's number and protobuf type.
FIELDS: dict[str, tuple[int, Scalar]] = {
    "bool_contents": (1, "bool"),
    "int_contents": (2, "int32"),
    "int64_contents": (3, "int64"),
    "uint_contents": (4, "uint32"),
    "uint64_contents": (5, "uint64"),
}
# Which field carries each datatype (the protocol's table, as tests/test_datatypes.py has it).
DATATYPE_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
}
# The unknown field that keeps a request off the fast path: field 15, varint 1.
UNKNOWN_FIELD = bytes([15 << 3 | 0, 1])


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            return bytes(out + bytes([low]))
        out.append(low | 0x80)


def field_bytes(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2]) + varint(len(payload)) + payload


def parsed(field: str, payload: bytes) -> np.ndarray | None:
    """What protobuf reads from `payload` as that packed field; None when it refuses it."""
    number, scalar = FIELDS[field]
    try:
        contents = pb.InferTensorContents.FromString(field_bytes(number, payload))
    except DecodeError:
        return None
    return np.asarray(list(getattr(contents, field)), dtype=SCALAR_DTYPES[scalar])


def decoded(field: str, payload: bytes, count: int) -> np.ndarray | None:
    return decode_packed(payload, count, FIELDS[field][1])


def serialized_payload(field: str, values: list[int] | list[bool]) -> bytes:
    contents = pb.InferTensorContents()
    getattr(contents, field).extend(values)
    payload = packed_payload(contents.SerializeToString(), FIELDS[field][0])
    assert payload is not None
    return bytes(payload)


def extremes(scalar: Scalar) -> list[int]:
    if scalar == "bool":
        return [0, 1]
    info = np.iinfo(SCALAR_DTYPES[scalar])
    return [int(info.min), int(info.max), 0, 1, -1 if info.min else 2, 127, 128, 2**14]


def random_values(scalar: Scalar, size: int, seed: int) -> list[int] | list[bool]:
    """Values of every varint length: a random number of random bits each."""
    rng = np.random.default_rng(seed)
    if scalar == "bool":
        return rng.integers(0, 2, size).astype(bool).tolist()
    info = np.iinfo(SCALAR_DTYPES[scalar])
    bits = rng.integers(0, info.bits + 1, size)
    magnitudes = rng.integers(0, 2**63, size, dtype=np.uint64, endpoint=True)
    values = [int(m) >> (64 - int(b)) if b else 0 for m, b in zip(magnitudes, bits, strict=True)]
    if info.min < 0:
        signs = rng.integers(0, 2, size)
        values = [-(v >> 1) - 1 if s else v >> 1 for v, s in zip(values, signs, strict=True)]
    return [*extremes(scalar), *values[: size - len(extremes(scalar))]]


# The decoder against protobuf's parsing ---------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_decodes_as_protobuf_parses_it(field: str) -> None:
    scalar = FIELDS[field][1]
    # Enough 10-byte varints to span several chunks, cut wherever they fall.
    values = random_values(scalar, 3 * CHUNK_BYTES // 5, seed=len(field))
    payload = serialized_payload(field, values)
    expected = parsed(field, payload)
    assert expected is not None and expected.size == len(values)
    got = decoded(field, payload, len(values))
    assert got is not None and got.dtype == SCALAR_DTYPES[scalar]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, np.asarray(values, dtype=SCALAR_DTYPES[scalar]))


@pytest.mark.parametrize("field", FIELDS)
def test_an_empty_field_is_no_values(field: str) -> None:
    got = decoded(field, b"", 0)
    assert got is not None and got.size == 0 and got.dtype == SCALAR_DTYPES[FIELDS[field][1]]
    assert decoded(field, b"", 1) is None


# Varints protobuf reads that its own serializer never writes: wider than the type, with
# bits past 64, or not the shortest.
ODD_VARINTS = [
    varint(2**32 + 5),  # an int32 or uint32 wider than 32 bits: the low 32 bits
    varint(2**40 - 1),
    varint(0x1_8000_0000),
    varint(2**63),
    varint(2**64 - 1),
    b"\x80\x00",  # 0 in two bytes
    b"\xff\x80\x80\x00",
    b"\xff" * 9 + b"\x7f",  # a 10th byte with bits past 64
    b"\xff" * 9 + b"\x02",
    b"\x80" * 9 + b"\x01",
    b"\x80" * 9 + b"\x00",
    b"\x80" * 8 + b"\x01",  # 9 bytes
]


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("odd", ODD_VARINTS)
def test_odd_varints_decode_as_protobuf_parses_them(field: str, odd: bytes) -> None:
    # Alone, and among others so that the decoder's multi-byte path reads it.
    for payload in (odd, varint(3) + odd + varint(2**35) + odd + b"\x01"):
        expected = parsed(field, payload)
        assert expected is not None
        got = decoded(field, payload, expected.size)
        assert got is not None
        np.testing.assert_array_equal(got, expected)


MALFORMED = {
    "a truncated last varint": varint(300) + b"\x81",
    "only a continuation byte": b"\x80",
    "an 11-byte varint": b"\xff" * 10 + b"\x01",
    "an 11-byte varint among others": varint(5) + b"\x80" * 10 + b"\x00" + varint(7),
    "a run of continuation bytes longer than a chunk": b"\x80" * (CHUNK_BYTES + 5) + b"\x01",
}


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_payloads_are_not_decoded_as_protobuf_refuses_them(
    field: str, payload: bytes
) -> None:
    # protobuf refuses the whole message, so no request carries them; the decoder, asked
    # anyway, declines (for any count) rather than make up values.
    assert parsed(field, payload) is None
    ends = sum(1 for byte in payload if byte < 0x80)
    for count in {0, 1, ends, ends + 1}:
        assert decoded(field, payload, count) is None


@pytest.mark.parametrize("field", FIELDS)
def test_a_count_other_than_the_payloads_is_declined(field: str) -> None:
    payload = serialized_payload(field, random_values(FIELDS[field][1], 1000, seed=3))
    assert decoded(field, payload, 1000) is not None
    assert decoded(field, payload, 999) is None
    assert decoded(field, payload, 1001) is None


def test_only_exactly_one_packed_field_gives_a_payload() -> None:
    packed = field_bytes(2, b"\x05\x06")
    assert bytes(packed_payload(packed, 2) or b"?") == b"\x05\x06"
    assert packed_payload(packed, 3) is None  # another field
    assert packed_payload(bytes([2 << 3 | 0, 5, 2 << 3 | 0, 6]), 2) is None  # unpacked
    assert packed_payload(packed + UNKNOWN_FIELD, 2) is None  # something after it
    assert packed_payload(packed[:-1], 2) is None  # shorter than its length
    assert packed_payload(bytes([2 << 3 | 2]) + b"\x80" * 11, 2) is None  # a bad length
    assert packed_payload(b"", 2) is None
    empty = packed_payload(field_bytes(2, b""), 2)
    assert empty is not None and len(empty) == 0
    long = bytes(range(128)) * 3
    assert bytes(packed_payload(field_bytes(4, long), 4) or b"?") == long  # a length of two bytes


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(list(FIELDS)),
    payload=st.lists(
        st.one_of(
            st.integers(0, 2**64 - 1).map(varint),
            st.binary(min_size=1, max_size=12),
        ),
        max_size=40,
    ).map(b"".join),
)
def test_any_payload_decodes_as_protobuf_parses_it_or_not_at_all(
    field: str, payload: bytes
) -> None:
    expected = parsed(field, payload)
    count = sum(1 for byte in payload if byte < 0x80)
    got = decoded(field, payload, count)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        np.testing.assert_array_equal(got, expected)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), field=st.sampled_from(list(FIELDS)))
def test_any_values_round_trip_as_protobufs_container_reads_them(
    data: st.DataObject, field: str
) -> None:
    scalar = FIELDS[field][1]
    if scalar == "bool":
        element: st.SearchStrategy[int] | st.SearchStrategy[bool] = st.booleans()
    else:
        info = np.iinfo(SCALAR_DTYPES[scalar])
        element = st.integers(int(info.min), int(info.max))
    values = data.draw(st.lists(element, max_size=300))
    contents = pb.InferTensorContents()
    getattr(contents, field).extend(values)
    payload = serialized_payload(field, values) if values else b""
    got = decoded(field, payload, len(values))
    assert got is not None
    expected = np.asarray(list(getattr(contents, field)), dtype=SCALAR_DTYPES[scalar])
    np.testing.assert_array_equal(got, expected)


# Requests: the fast path against the container's ------------------------------------


def settings_of(datatype: str) -> ModelSettings:
    return ModelSettings(
        name="m",
        max_batch_size=0,
        inputs=(TensorSpec("INPUT0", datatype, (-1,)),),
        outputs=(TensorSpec("OUTPUT0", datatype, (-1,)),),
    )


def request_of(
    datatype: str, values: list[int] | list[bool], slow: bool = False
) -> pb.ModelInferRequest:
    """A typed request; `slow`: with an unknown field in its contents, which keeps it off
    the fast path, so that protobuf's container is read as before."""
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=[len(values)])
    getattr(tensor.contents, DATATYPE_FIELDS[datatype]).extend(values)
    if slow:
        tensor.contents.ParseFromString(tensor.contents.SerializeToString() + UNKNOWN_FIELD)
    request = pb.ModelInferRequest.FromString(request.SerializeToString())
    number = FIELDS[DATATYPE_FIELDS[datatype]][0]
    fast = packed_payload(request.inputs[0].contents.SerializeToString(), number) is not None
    assert fast is (not slow and bool(values))
    return request


def outcome(request: pb.ModelInferRequest, datatype: str) -> np.ndarray | str:
    try:
        return decode_request(request, settings_of(datatype)).inputs["INPUT0"]
    except FerryError as exc:
        return exc.message


@pytest.mark.parametrize("datatype", DATATYPE_FIELDS)
def test_every_datatype_decodes_as_the_container_path_does(datatype: str) -> None:
    field = DATATYPE_FIELDS[datatype]
    scalar = FIELDS[field][1]
    in_range = np.asarray(random_values(scalar, 5000, seed=7), dtype=SCALAR_DTYPES[scalar])
    if datatype != "BOOL":
        info = np.iinfo(np.dtype(datatype.lower()))
        in_range = np.clip(in_range, info.min, info.max)
        assert in_range.min() == info.min and in_range.max() == info.max
    values = in_range.tolist()
    assert len(values) >= VARINT_DECODE_MIN_VALUES  # enough to take the fast path
    fast = outcome(request_of(datatype, values), datatype)
    slow = outcome(request_of(datatype, values, slow=True), datatype)
    assert isinstance(fast, np.ndarray) and isinstance(slow, np.ndarray)
    assert fast.dtype == slow.dtype == np.dtype(datatype.lower() if datatype != "BOOL" else bool)
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(fast, in_range)
    # An empty tensor; and a value one past the type's range, refused alike.
    empty = outcome(request_of(datatype, []), datatype)
    assert isinstance(empty, np.ndarray) and empty.size == 0
    if datatype not in ("BOOL", "INT32", "INT64", "UINT32", "UINT64"):
        info = np.iinfo(np.dtype(datatype.lower()))
        for bad in (int(info.max) + 1, int(info.min) - 1):
            if bad < 0 and datatype.startswith("U"):
                continue  # uint_contents cannot carry it
            refused = outcome(request_of(datatype, [*values, bad]), datatype)
            assert refused == outcome(request_of(datatype, [*values, bad], slow=True), datatype)
            assert refused == f"input 'INPUT0': values out of range for {datatype}"


def test_values_past_the_signed_range_are_kept_as_protobuf_reads_them() -> None:
    many = WIDE_VARINT_DECODE_MIN_VALUES  # wide values: enough to take the fast path
    for datatype, edges in (
        ("UINT32", [2**32 - 1, 2**31]),
        ("UINT64", [2**64 - 1, 2**63]),
        ("INT64", [-(2**63), -1]),
        ("INT32", [-(2**31), -1]),
    ):
        got = outcome(request_of(datatype, edges * many), datatype)
        expected = np.array(edges * many, dtype=np.dtype(datatype.lower()))
        np.testing.assert_array_equal(got, expected)


def test_random_64_bit_values_take_the_container_until_numpy_is_faster() -> None:
    rng = np.random.default_rng(3)
    below = WIDE_VARINT_DECODE_MIN_VALUES - 1
    hashes = rng.integers(-(2**63), 2**63 - 1, below, dtype=np.int64).tolist()
    token_ids = rng.integers(0, 50_000, below, dtype=np.int64).tolist()
    unsigned = rng.integers(2**56, 2**64 - 1, below, dtype=np.uint64).tolist()
    assert not decode_with_numpy(hashes, "int64_contents", below)
    assert not decode_with_numpy(unsigned, "uint64_contents", below)
    assert decode_with_numpy(token_ids, "int64_contents", below)
    assert decode_with_numpy([*hashes, 0], "int64_contents", below + 1)
    # Only 64-bit fields: an int32 field's negatives are 10 bytes too, but rarely all.
    assert decode_with_numpy([-1] * 4096, "int_contents", 4096)
    assert not decode_with_numpy(token_ids, "int64_contents", VARINT_DECODE_MIN_VALUES - 1)
    # Either way, the same answer.
    for values in (hashes, token_ids):
        fast = outcome(request_of("INT64", values), "INT64")
        np.testing.assert_array_equal(fast, np.array(values, dtype=np.int64))


def test_small_tensors_keep_the_container_path_and_its_answers() -> None:
    values = [0, -128, 127, 5]
    np.testing.assert_array_equal(outcome(request_of("INT8", values), "INT8"), np.int8(values))
    refused = outcome(request_of("INT8", [*values, 300]), "INT8")
    assert refused == "input 'INPUT0': values out of range for INT8"


# Through the port ------------------------------------------------------------------

LARGE = 16 * 1024 * 1024  # INT8 values in int_contents: 16 MiB on the wire, one byte each
# What decoding may cost per typed value: before, numpy walked protobuf's container at
# 40-60 ns per INT8 value here (67 for negative ones, 98 for INT64); now it is 5-7.
BOUND_NS_PER_VALUE = 20
# What the event loop may spend per value of the whole request, receiving and parsing it
# included: 50-57 ns before, 11-18 now on a quiet machine, 30 with the test suite and a
# benchmark sharing its two cores (a CPU time, yet it grows with the neighbours' cache use).
LOOP_BOUND_NS_PER_VALUE = 45


def extremes_model(path: Path) -> Path:
    """x INT8 [batch, n] -> its largest and smallest value per row: a small answer to a
    large request, so that the answer costs the server nothing."""
    x = helper.make_tensor_value_info("x", TensorProto.INT8, ["batch", "n"])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["largest"], axes=[1], keepdims=1),
            helper.make_node("ReduceMin", ["x"], ["smallest"], axes=[1], keepdims=1),
        ],
        "extremes",
        [x],
        [
            helper.make_tensor_value_info("largest", TensorProto.INT8, ["batch", 1]),
            helper.make_tensor_value_info("smallest", TensorProto.INT8, ["batch", 1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("varints") / "models"
    extremes_model(repo / "extremes" / "1" / "model.onnx")
    running = RunningServer(repo)
    yield running
    running.close()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def extremes_request(rows: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="extremes")
    tensor = request.inputs.add(name="x", datatype="INT8", shape=rows.shape)
    tensor.contents.int_contents.extend(rows.ravel().tolist())
    return request


def answer(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> list[int]:
    response = stub.ModelInfer(request, timeout=30)
    return [value for output in response.outputs for value in output.contents.int_contents]


def loop_cpu_s(server: RunningServer) -> float:
    """CPU time the server's event loop thread has spent: what every caller waits on."""
    assert server.thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(server.thread.ident))


def test_a_large_typed_int8_request_holds_the_event_loop_briefly(
    server: RunningServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 128, (2, LARGE // 2), dtype=np.int8)
    rows[0, 5], rows[1, 7] = 127, 0
    large = extremes_request(rows)
    # In process: the decoding itself, on this thread's clock.
    request = pb.ModelInferRequest.FromString(large.SerializeToString())
    settings = server.server.manager.get("extremes").settings
    started = time.thread_time()
    decoded = decode_request(request, settings)
    spent = time.thread_time() - started
    np.testing.assert_array_equal(decoded.inputs["x"], rows)
    assert spent < LARGE * BOUND_NS_PER_VALUE * 1e-9, spent
    del request, decoded

    # Through the port: the loop's whole share of the large request (receiving, parsing,
    # decoding, answering) stays small, and a small caller sent meanwhile is answered.
    small = extremes_request(np.array([[3, -4, 9]], dtype=np.int8))
    assert answer(stub, small) == [9, -4]
    before = loop_cpu_s(server)
    pending = stub.ModelInfer.future(large, timeout=60)
    assert answer(stub, small) == [9, -4]
    response = pending.result()
    loop_spent = loop_cpu_s(server) - before
    assert [list(o.contents.int_contents) for o in response.outputs] == [[127, 127], [0, 0]]
    assert loop_spent < LARGE * LOOP_BOUND_NS_PER_VALUE * 1e-9, loop_spent


def test_an_out_of_range_value_on_the_fast_path_is_invalid_argument_naming_the_input(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    request = extremes_request(np.zeros((1, 4 * VARINT_DECODE_MIN_VALUES), np.int8))
    request.inputs[0].contents.int_contents[500] = 300
    assert packed_payload(request.inputs[0].contents.SerializeToString(), 2) is not None
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "input 'x': values out of range for INT8"

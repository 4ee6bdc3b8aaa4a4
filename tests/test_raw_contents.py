"""Large ModelInferRequests have their raw_input_contents read where the received
message holds them (server/raw_contents.py): the split must mean exactly what protobuf's
own parse means, refuse exactly what it refuses, and serve through the real port."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf.message import DecodeError
from tritonclient.utils import InferenceServerException

from ferry.proto import grpc_service_pb2 as pb
from ferry.server.raw_contents import SPLIT_MIN_BYTES, SplitRequest, split_raw_contents
from ferry.server.wire import MalformedMessage, tolerant_infer_request
from tests.conftest import RunningServer
from tests.models import identity_model


def large_request(rows: int = 300) -> pb.ModelInferRequest:
    """Two raw inputs around other fields, parameters and an output: over the split size."""
    request = pb.ModelInferRequest(model_name="m", model_version="1", id="caller-7")
    request.parameters["priority"].int64_param = 2
    request.parameters["tag"].string_param = "é"
    request.inputs.add(name="a", datatype="FP32", shape=[rows, 256])
    request.inputs.add(name="b", datatype="INT8", shape=[3])
    request.outputs.add(name="y")
    request.raw_input_contents.append(np.arange(rows * 256, dtype=np.float32).tobytes())
    request.raw_input_contents.append(b"\x01\x02\x03")
    return request


def unknown_fields() -> bytes:
    """Fields ModelInferRequest does not know, of every wire type protobuf keeps."""
    return (
        bytes([99 << 3 & 0x7F | 0x80, 99 >> 4, 0x96, 0x01])  # field 99, varint 150
        + bytes([100 << 3 & 0x7F | 0x80 | 1, 100 >> 4]) + bytes(8)  # field 100, fixed64
        + bytes([101 << 3 & 0x7F | 0x80 | 5, 101 >> 4]) + bytes(4)  # field 101, fixed32
    )


def check_same_as_protobuf(data: bytes) -> None:
    split = split_raw_contents(data)
    assert split is not None
    rest, raw = split
    whole = pb.ModelInferRequest.FromString(data)
    parsed = pb.ModelInferRequest.FromString(rest)
    assert not parsed.raw_input_contents
    assert [bytes(view) for view in raw] == list(whole.raw_input_contents)
    parsed.raw_input_contents.extend(bytes(view) for view in raw)
    assert parsed == whole


def test_the_split_means_what_protobuf_parses() -> None:
    data = large_request().SerializeToString()
    assert len(data) >= SPLIT_MIN_BYTES
    check_same_as_protobuf(data)
    check_same_as_protobuf(data + unknown_fields())
    # Fields in any order, raw contents first or repeated singular fields (the last wins).
    raw_first = pb.ModelInferRequest(raw_input_contents=[b"", b"x" * 10])
    later = pb.ModelInferRequest(model_name="other", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="c", datatype="BYTES", shape=[1])])
    check_same_as_protobuf(
        raw_first.SerializeToString() + data + later.SerializeToString()
    )
    _, raw = split_raw_contents(data)  # type: ignore[misc]
    assert raw[0].obj is data  # a view, not a copy


def test_bytes_that_do_not_walk_are_left_to_protobuf() -> None:
    data = large_request().SerializeToString()
    assert split_raw_contents(pb.ModelInferRequest(model_name="m").SerializeToString()) is None
    for broken in [
        data[:-1],  # the last field cut short
        data[:1],  # a tag with no length
        data + b"\x80",  # a varint that never ends
        data + b"\x00\x01",  # field number 0
        data + bytes([1 << 3 | 3]),  # a group
        data + b"\xff" * 11,  # a varint over ten bytes
    ]:
        assert split_raw_contents(broken) is None


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 40, 1000, 150_000, 307_000])
def test_the_parser_refuses_what_protobuf_refuses_and_keeps_what_it_keeps(cut: int) -> None:
    data = large_request(600).SerializeToString()
    for sample in (data[:-cut], data[cut:], data[:cut] + data[cut + 1:]):
        got = tolerant_infer_request(sample)
        try:
            want = pb.ModelInferRequest.FromString(sample)
        except DecodeError:
            assert isinstance(got, MalformedMessage)
            continue
        if isinstance(got, SplitRequest):
            request = got.request
            request.raw_input_contents.extend(bytes(view) for view in got.raw_contents)
            assert request == want
        else:
            assert got == want


# Through the port --------------------------------------------------------------------

WIDTH = 32 * 1024  # FP32 values a row: 128 KiB, so that a few rows are split


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("raw_contents") / "models"
    identity_model(root / "wide" / "1" / "model.onnx", "FP32", ("batch", WIDTH))
    running = RunningServer(root, exit_on_error=True)
    yield running
    running.close()


def rows(count: int, start: float) -> np.ndarray:
    return np.arange(count * WIDTH, dtype=np.float32).reshape(count, WIDTH) + start


def wide_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


@pytest.mark.parametrize("count", [1, 4], ids=["parsed-whole", "split"])
def test_large_requests_are_answered_unary_and_streamed(
    server: RunningServer, count: int
) -> None:
    assert (count * WIDTH * 4 >= SPLIT_MIN_BYTES) == (count == 4)
    client = triton.InferenceServerClient(server.address)
    x = rows(count, 0.5)
    answer = client.infer("wide", [wide_input(x)], request_id=f"r{count}")
    assert answer.get_response().id == f"r{count}"
    assert answer.get_response().raw_output_contents  # raw in, raw out
    assert np.array_equal(answer.as_numpy("OUTPUT0"), x)

    answers: queue.Queue[object] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error or result))
    try:
        for index in range(3):
            client.async_stream_infer("wide", [wide_input(rows(count, index))],
                                      request_id=f"s{index}")
        # One with a wrong shape: its own error, named, and the stream goes on.
        wrong = triton.InferInput("INPUT0", [count, WIDTH + 1], "FP32")
        wrong.set_data_from_numpy(np.zeros((count, WIDTH + 1), np.float32))
        client.async_stream_infer("wide", [wrong], request_id="wrong")
        got = [answers.get(timeout=60) for _ in range(4)]
    finally:
        client.stop_stream()
    errors = [result for result in got if isinstance(result, InferenceServerException)]
    assert len(errors) == 1 and "input 'INPUT0': expected shape" in errors[0].message()
    for result in got:
        if not isinstance(result, InferenceServerException):
            index = int(result.get_response().id[1:])  # type: ignore[attr-defined]
            output = result.as_numpy("OUTPUT0")  # type: ignore[attr-defined]
            assert np.array_equal(output, rows(count, index))


def test_a_large_message_that_does_not_parse_is_invalid_argument(
    server: RunningServer,
) -> None:
    data = large_request(600).SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            call(data[:-1], timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest" in refused.value.details()

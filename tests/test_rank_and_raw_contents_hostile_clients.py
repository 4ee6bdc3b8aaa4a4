"""Hostile clients, round 7: inputs of unknown rank (any shape up to 64 dimensions) and
large raw_input_contents read where the received message or body holds them. Every
mistake is INVALID_ARGUMENT / 400 naming the input; callers batched together each get
their own answer, exactly; a cancelled large request leaves nothing behind."""

from __future__ import annotations

import gc
import http.client
import json
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper

from ferry.proto import grpc_service_pb2 as pb
from ferry.server.executor import Runner
from ferry.server.raw_contents import MAX_WALKED_FIELDS, SPLIT_MIN_BYTES, split_raw_contents
from ferry.server.security import SecurityOptions
from ferry.server.tensors import MAX_ANY_RANK
from ferry.server.wire import MalformedMessage, tolerant_infer_request
from tests.conftest import GatedInstance, RunningServer, serving
from tests.models import identity_model, save_graph, two_input_model, write_config
from tests.waiting import wait_until

WIDTH = 32 * 1024  # FP32 values a row of 'wide': 128 KiB
MAX_TENSOR_BYTES = 4 * 1024 * 1024
MAX_TENSOR_ELEMENTS = 1 << 21


def negate_any_rank(path: Path, elem: int = TensorProto.FLOAT) -> Path:
    """y = -x, with neither x nor y given a shape: onnxruntime runs it at any rank."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "negate_any_rank",
        [helper.make_tensor_value_info("x", elem, None)],
        [helper.make_tensor_value_info("y", elem, None)],
    )
    return save_graph(graph, path, check=False)


def negate(path: Path, dims: Sequence[int | str]) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "negate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))],
    )
    return save_graph(graph, path)


def repository(root: Path) -> Path:
    negate_any_rank(root / "plain" / "1" / "model.onnx")
    negate_any_rank(root / "batched" / "1" / "model.onnx")
    write_config(root / "batched", "max_batch_size: 8\n"
                 "dynamic_batching { max_queue_delay_microseconds: 20000 }\n")
    negate(root / "wide" / "1" / "model.onnx", ("batch", WIDTH))
    write_config(root / "wide", "max_batch_size: 64\n"
                 "dynamic_batching { max_queue_delay_microseconds: 20000 }\n")
    negate(root / "free" / "1" / "model.onnx", ("a", "b"))
    identity_model(root / "text" / "1" / "model.onnx", "BYTES", ("batch", "n"))
    two_input_model(root / "pair" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return repository(tmp_path_factory.mktemp("round7") / "models")


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    yield from serving(repo, exit_on_error=True, security=SecurityOptions(
        max_tensor_bytes=MAX_TENSOR_BYTES, max_tensor_elements=MAX_TENSOR_ELEMENTS,
    ))


@pytest.fixture(scope="module")
def infer(server: RunningServer) -> Iterator[Callable[..., pb.ModelInferResponse]]:
    """ModelInfer over a plain channel, of a message or of bytes sent as they are."""
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        yield lambda message: call(message, timeout=60)


def request(
    model: str, shape: Sequence[int], raw: bytes | None = None, name: str = "x",
    datatype: str = "FP32",
) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        message.raw_input_contents.append(raw)
    return message


def refused(infer: Callable[..., Any], message: pb.ModelInferRequest | bytes) -> str:
    with pytest.raises(grpc.RpcError) as error:
        infer(message)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    return str(error.value.details())


def rest(
    server: RunningServer, model: str, inputs: list[dict[str, Any]], binary: bytes = b"",
    binary_output: bool = False,
) -> tuple[int, Any, bytes]:
    """POST an inference request (a JSON header, then `binary`); the status, the JSON
    header of the answer and its binary part (with `binary_output`, the outputs')."""
    parameters = {"binary_data_output": True} if binary_output else {}
    header = json.dumps({"inputs": inputs, "parameters": parameters}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    connection = http.client.HTTPConnection(server.http_address, timeout=60)
    try:
        connection.request("POST", f"/v2/models/{model}/infer", header + binary, headers)
        answer = connection.getresponse()
        body = answer.read()
        length = answer.getheader("Inference-Header-Content-Length")
    finally:
        connection.close()
    json_length = int(length) if length else len(body)
    return answer.status, json.loads(body[:json_length]), body[json_length:]


def rest_refused(
    server: RunningServer, model: str, inputs: list[dict[str, Any]], binary: bytes = b""
) -> str:
    status, answer, _ = rest(server, model, inputs, binary)
    assert status == 400, answer
    return str(answer["error"])


def binary_input(name: str, shape: Sequence[int], size: int, datatype: str = "FP32") -> dict[
    str, Any
]:
    return {"name": name, "datatype": datatype, "shape": list(shape),
            "parameters": {"binary_data_size": size}}


# Inputs of unknown rank ----------------------------------------------------------------

# Shapes with no element, whose other dimensions multiply past what numpy (and int64) hold:
# numpy's "array is too big" came out of the common path's decode as INTERNAL / 500.
ZERO_AND_HUGE = [[0, 2**62], [2**62, 0], [0, 2**31, 2**31], [1, 0, 2**62]]


@pytest.mark.parametrize(
    ("model", "shape"),
    [(model, shape) for model in ("plain", "batched", "free") for shape in ZERO_AND_HUGE
     if model != "free" or len(shape) == 2],  # 'free' takes two dimensions
    ids=str,
)
def test_a_shape_of_no_element_whose_other_dimensions_overflow_is_refused_naming_the_input(
    server: RunningServer, infer: Callable[..., Any], model: str, shape: list[int]
) -> None:
    name = "x"
    message = refused(infer, request(model, shape, b""))
    assert f"input '{name}'" in message and "--max-tensor-elements" in message
    for binary in (True, False):
        entry = (binary_input(name, shape, 0) if binary
                 else {"name": name, "datatype": "FP32", "shape": shape, "data": []})
        error = rest_refused(server, model, [entry])
        assert f"input '{name}'" in error and "--max-tensor-elements" in error


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ([1] * (MAX_ANY_RANK + 1), f"{MAX_ANY_RANK} dimensions"),
        ([2**40, 2**40], "--max-tensor-elements"),
        ([1, 2**62, 2**62], "--max-tensor-elements"),
        ([1, -1, 3], "dimensions >= 0"),
        ([-2, -3], "dimensions >= 0"),
        ([1, 1024, 2048], "--max-tensor-bytes"),  # its elements fit, its bytes do not
        ([1, 4096, 1024], "--max-tensor-elements"),
    ],
    ids=["65-dims", "2^80", "2^124", "negative", "all-negative", "bytes", "elements"],
)
@pytest.mark.parametrize("model", ["plain", "batched"])
def test_shapes_past_the_limits_are_refused_naming_the_input_on_both_ports(
    server: RunningServer, infer: Callable[..., Any], model: str, shape: list[int],
    expected: str,
) -> None:
    assert expected in refused(infer, request(model, shape, bytes(4)))
    for entry, binary in [
        (binary_input("x", shape, 4), bytes(4)),
        ({"name": "x", "datatype": "FP32", "shape": shape, "data": [0.0]}, b""),
    ]:
        error = rest_refused(server, model, [entry], binary)
        assert "input 'x'" in error
        if binary:  # JSON data is counted against the shape first
            assert expected in error


@pytest.mark.parametrize("model", ["plain", "batched"])
def test_the_most_dimensions_and_dimensions_of_zero_are_served(
    server: RunningServer, infer: Callable[..., Any], model: str
) -> None:
    for shape in ([1] * MAX_ANY_RANK, [2] + [1] * (MAX_ANY_RANK - 1), [1, 0, 3], [1, 0] * 32):
        x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
        answer = infer(request(model, shape, x.tobytes()))
        assert list(answer.outputs[0].shape) == shape
        assert answer.raw_output_contents[0] == (-x).tobytes()
        status, header, _ = rest(server, model, [binary_input("x", shape, x.nbytes)],
                                 x.tobytes())
        assert status == 200, header
        assert header["outputs"][0]["shape"] == shape
        assert header["outputs"][0]["data"] == (-x).ravel().tolist()


def test_a_scalar_for_a_batching_model_is_refused_naming_the_input_on_both_ports(
    server: RunningServer, infer: Callable[..., Any]
) -> None:
    for raw in (bytes(4), None):
        message = refused(infer, request("batched", [], raw))
        assert "input 'x'" in message and "the batch first" in message
    for entry, binary in [(binary_input("x", [], 4), bytes(4)),
                          ({"name": "x", "datatype": "FP32", "shape": [], "data": [1.0]}, b"")]:
        error = rest_refused(server, "batched", [entry], binary)
        assert "input 'x'" in error and "the batch first" in error
    assert infer(request("plain", [], struct.pack("<f", 2.0))).raw_output_contents[0] == (
        struct.pack("<f", -2.0)
    )


@pytest.fixture
def gated_server(
    repo: Path, start_server: Callable[..., RunningServer],
    gated: Callable[[str, Runner], GatedInstance],
) -> tuple[RunningServer, dict[str, GatedInstance]]:
    """The repository served with every instance gated (and recording its batches)."""
    instances: dict[str, GatedInstance] = {}

    def wrap(model: str, inner: Runner) -> GatedInstance:
        instances[model] = gated(model, inner)
        return instances[model]

    return start_server(repo, wrap_instance=wrap), instances


def queue_depth(server: RunningServer, model: str) -> int:
    async def read() -> int:
        return server.server.manager.get(model).scheduler.queue_depth

    return server.call(read())


def test_requests_of_different_ranks_queued_together_are_never_merged(
    gated_server: tuple[RunningServer, dict[str, GatedInstance]],
) -> None:
    server, instances = gated_server
    gate = instances["batched"]
    gate.hold()
    rng = np.random.default_rng(7)
    shapes = [(1,), (2,), (1, 3), (2, 3), (1, 3, 2), (2, 3, 2), (1, 6), (1, 3, 2, 1), (3,),
              (1, 0), (2, 1, 1, 1)] * 2
    inputs = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        blocker = call.future(request("batched", [1, 1], bytes(4)), timeout=60)
        assert gate.entered.acquire(timeout=30)
        futures = [call.future(request("batched", list(x.shape), x.tobytes()), timeout=60)
                   for x in inputs]
        wait_until(lambda: queue_depth(server, "batched") == len(inputs),
                   what="every request queued")
        gate.release()
        blocker.result()
        answers = [future.result() for future in futures]
    for x, answer in zip(inputs, answers, strict=True):
        assert list(answer.outputs[0].shape) == list(x.shape)
        assert answer.raw_output_contents[0] == (-x).tobytes()
    ranks = [{value.ndim for value in batch.values()} for batch in gate.batches]
    assert all(len(rank) == 1 for rank in ranks)
    assert len(gate.batches) < len(inputs) + 1  # callers of one shape did share a run


# Large raw contents --------------------------------------------------------------------


def wide(rows: int, start: float) -> np.ndarray:
    return np.arange(rows * WIDTH, dtype=np.float32).reshape(rows, WIDTH) + start


def test_raw_contents_a_byte_short_or_long_are_refused_naming_the_input(
    server: RunningServer, infer: Callable[..., Any]
) -> None:
    data = wide(3, 0).tobytes()
    assert len(data) >= SPLIT_MIN_BYTES
    for raw in (data[:-1], data + b"\0"):
        message = refused(infer, request("wide", [3, WIDTH], raw))
        assert f"input 'x' FP32 [3, {WIDTH}]: expected {len(data)} bytes" in message
        assert f"got {len(raw)}" in message
        error = rest_refused(server, "wide", [binary_input("x", [3, WIDTH], len(raw))], raw)
        assert f"input 'x' FP32 [3, {WIDTH}]: expected {len(data)} bytes" in error


def test_more_or_fewer_raw_contents_than_inputs_and_mixed_encodings_are_refused(
    infer: Callable[..., Any],
) -> None:
    data = wide(3, 0).tobytes()
    more = request("wide", [3, WIDTH], data)
    more.raw_input_contents.append(data)
    assert "raw_input_contents has 2 entries but the request has 1 inputs" in refused(
        infer, more
    )
    pair = np.ones((2, 40000), np.float32).tobytes()
    fewer = request("pair", [2, 40000], pair, name="a")
    fewer.inputs.add(name="b", datatype="FP32", shape=[2, 40000])
    assert "raw_input_contents has 1 entries but the request has 2 inputs" in refused(
        infer, fewer
    )
    fewer.inputs[1].contents.fp32_contents.extend([1.0] * 80000)  # b typed, a raw
    assert "raw_input_contents has 1 entries but the request has 2 inputs" in refused(
        infer, fewer
    )
    both = request("wide", [3, WIDTH], data)
    both.inputs[0].contents.fp32_contents.append(1.0)
    assert "input 'x' has both raw_input_contents and typed contents" in refused(infer, both)


def strings(count: int, size: int) -> bytes:
    element = b"a" * size
    return b"".join(struct.pack("<I", size) + element for _ in range(count))


@pytest.mark.parametrize(
    ("where", "length", "expected"),
    [
        (0, 2**32 - 1, "element 0 of 300: declares 4294967295 bytes"),
        (299, 2**32 - 1, "element 299 of 300: declares 4294967295 bytes"),
        (299, 1001, "element 299 of 300: declares 1001 bytes but only 1000 remain"),
        (150, 999, "element 151 of 300: declares"),
    ],
    ids=["first-max", "last-max", "last-one-past", "middle-one-short"],
)
def test_bytes_with_corrupt_length_prefixes_in_large_messages_are_refused(
    server: RunningServer, infer: Callable[..., Any], where: int, length: int, expected: str
) -> None:
    data = bytearray(strings(300, 1000))
    data[where * 1004 : where * 1004 + 4] = struct.pack("<I", length)
    message = request("text", [1, 300], bytes(data), name="INPUT0", datatype="BYTES")
    assert message.ByteSize() >= SPLIT_MIN_BYTES
    error = refused(infer, message)
    assert "input 'INPUT0' BYTES [1, 300]: bad BYTES content" in error and expected in error
    rest_error = rest_refused(
        server, "text", [binary_input("INPUT0", [1, 300], len(data), "BYTES")], bytes(data)
    )
    assert "input 'INPUT0' BYTES [1, 300]: bad BYTES content" in rest_error
    assert expected in rest_error


def empty_raw_contents(count: int) -> bytes:
    """A request naming 'wide' whose body is `count` empty raw_input_contents: two bytes a
    field."""
    return pb.ModelInferRequest(model_name="wide").SerializeToString() + b"\x3a\x00" * count


def test_a_message_of_many_fields_is_left_to_protobuf_whole() -> None:
    # Walked field by field, 4 MiB of empty raw contents held 16 s of the event loop and
    # 959 MiB (two views per field); protobuf parses it whole in a fraction of a second.
    data = empty_raw_contents(SPLIT_MIN_BYTES)
    assert split_raw_contents(data) is None
    parsed = tolerant_infer_request(data)
    assert isinstance(parsed, pb.ModelInferRequest)
    assert len(parsed.raw_input_contents) == SPLIT_MIN_BYTES
    # Up to the bound, the split still reads them in place.
    walked = pb.ModelInferRequest(
        model_name="wide", raw_input_contents=[b"x" * SPLIT_MIN_BYTES]
    ).SerializeToString() + b"\x3a\x00" * (MAX_WALKED_FIELDS - 2)
    split = split_raw_contents(walked)
    assert split is not None and len(split[1]) == MAX_WALKED_FIELDS - 1
    assert split_raw_contents(walked + b"\x3a\x00") is None


def test_a_large_message_of_many_empty_raw_contents_is_refused_by_count(
    infer: Callable[..., Any],
) -> None:
    message = refused(infer, empty_raw_contents(SPLIT_MIN_BYTES))
    assert f"raw_input_contents has {SPLIT_MIN_BYTES} entries but the request has 0" in message


@pytest.mark.parametrize("tag_bytes", [6, 7, 10])
def test_a_raw_contents_tag_longer_than_protobuf_reads_is_refused_as_protobuf_refuses_it(
    infer: Callable[..., Any], tag_bytes: int
) -> None:
    data = request("wide", [3, WIDTH], wide(3, 0).tobytes()).SerializeToString()
    # Field 7, length-delimited, written in `tag_bytes` bytes (a tag is five at most).
    tag = bytes([0x3A | 0x80] + [0x80] * (tag_bytes - 2) + [0x00])
    longer = data + tag + b"\x01z"
    assert isinstance(tolerant_infer_request(longer), MalformedMessage)
    assert "not a valid ModelInferRequest" in refused(infer, longer)


def concurrently(count: int, send: Callable[[int], Any]) -> list[Any]:
    """`send(i)` for each i from `count` threads, all released at once."""
    start = threading.Barrier(count)

    def one(index: int) -> Any:
        start.wait(30)
        return send(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


CALLERS = 32
ROWS = 3  # 384 KiB a caller: over SPLIT_MIN_BYTES, so each is read in place


def test_concurrent_large_callers_each_get_their_own_values_on_both_ports(
    server: RunningServer, infer: Callable[..., Any]
) -> None:
    inputs = [wide(ROWS, 1_000_000.0 * index) for index in range(CALLERS)]
    assert inputs[0].nbytes >= SPLIT_MIN_BYTES

    def by_grpc(index: int) -> bytes:
        answer = infer(request("wide", [ROWS, WIDTH], inputs[index].tobytes()))
        return bytes(answer.raw_output_contents[0])

    def by_rest(index: int) -> bytes:
        status, header, body = rest(
            server, "wide", [binary_input("x", [ROWS, WIDTH], inputs[index].nbytes)],
            inputs[index].tobytes(), binary_output=True,
        )
        assert status == 200, header
        return body

    before = statistics(server, "wide")
    for send in (by_grpc, by_rest):
        for x, answer in zip(inputs, concurrently(CALLERS, send), strict=True):
            assert answer == (-x).tobytes()
    runs = statistics(server, "wide") - before
    assert runs < 2 * CALLERS  # some callers did share a batch


def statistics(server: RunningServer, model: str) -> int:
    connection = http.client.HTTPConnection(server.http_address, timeout=30)
    try:
        connection.request("GET", f"/v2/models/{model}/stats")
        stats = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    return int(stats["model_stats"][0]["execution_count"])


class HeldInstance(GatedInstance):
    """A gate that keeps no copy of what it runs (GatedInstance records every batch)."""

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.entered.release()
        if not self._gate.wait(60):
            raise TimeoutError("HeldInstance was never released")
        return self.inner.run(inputs, output_names)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CANCELLED_ROWS = 32  # 4 MiB a request


def test_large_requests_cancelled_before_their_answer_are_not_kept(
    repo: Path, start_server: Callable[..., RunningServer]
) -> None:
    instances: list[HeldInstance] = []

    def wrap(model: str, inner: Runner) -> Runner:
        if model != "wide":
            return inner
        instances.append(HeldInstance(inner))
        return instances[-1]

    server = start_server(repo, wrap_instance=wrap)
    (gate,) = instances
    messages = [request("wide", [CANCELLED_ROWS, WIDTH], wide(CANCELLED_ROWS, i).tobytes())
                .SerializeToString() for i in range(2)]
    small = request("wide", [1, WIDTH], wide(1, 0).tobytes()).SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda data: data,
            response_deserializer=pb.ModelInferResponse.FromString,
        )

        def cancel_while_running(times: int) -> None:
            for index in range(times):
                gate.hold()
                future = call.future(messages[index % 2], timeout=60)
                assert gate.entered.acquire(timeout=30)  # its batch is running
                future.cancel()
                gate.release()
                call(small, timeout=60)  # one instance: the cancelled batch is over

        cancel_while_running(10)  # allocators and caches settle
        gc.collect()
        before = resident_bytes()
        cancel_while_running(50)
        gc.collect()
        grown = resident_bytes() - before
    # Kept, 50 requests would hold 200 MiB.
    assert grown < 25 * len(messages[0]), f"RSS grew {grown} bytes"

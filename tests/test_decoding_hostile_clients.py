"""Hostile clients of request decoding and answers, a server that answers garbage to the
Python client, and a careless operator's `ferry serve` flags. Each test failed before
its fix."""

from __future__ import annotations

import subprocess
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ferry.client import AsyncFerryClient, FerryClient, FerryClientError
from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server import cli
from ferry.server.errors import FerryError
from ferry.server.tensors import decode_request, encode_response
from tests.conftest import RunningServer
from tests.models import identity_model, two_input_model, write_config
from tests.process import serve_command

StartServer = Callable[..., RunningServer]


# Requests --------------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    identity_model(root / "text" / "1" / "model.onnx", "BYTES")
    two_input_model(root / "add" / "1" / "model.onnx")
    optional = root / "optional"
    identity_model(optional / "1" / "model.onnx", "FP32")
    write_config(
        optional,
        'max_batch_size: 8\n'
        'input [{ name: "INPUT0" data_type: TYPE_FP32 dims: [4] optional: true }]\n',
    )
    return root


@pytest.fixture
def server(repo: Path, start_server: StartServer) -> RunningServer:
    return start_server(repo)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def refusal(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return str(caught.value.details())


def add_request(*outputs: pb.ModelInferRequest.InferRequestedOutputTensor) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add", outputs=outputs)
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 2])
        request.raw_input_contents.append(np.ones(2, np.float32).tobytes())
    return request


def test_typed_bytes_far_more_than_the_shape_are_refused_without_reading_each(
    server: RunningServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    # Shape [1, 4] and four million empty elements (8 MB): before, each was read to sum
    # the content's length before the count was compared, 0.2 s of the event loop here
    # (1.4 s for a 64 MiB message), while every other caller waits.
    request = pb.ModelInferRequest(model_name="text")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 4])
    tensor.contents.bytes_contents.extend([b""] * 4_000_000)
    request = pb.ModelInferRequest.FromString(request.SerializeToString())
    settings = server.server.manager.get("text").settings
    started = time.thread_time()
    with pytest.raises(FerryError) as caught:
        decode_request(request, settings)
    spent = time.thread_time() - started
    assert "INPUT0" in caught.value.message and "expected 4 values" in caught.value.message
    assert spent < 0.02, spent
    assert "expected 4 values in contents.bytes_contents" in refusal(stub, request)


def test_typed_floats_are_read_without_a_python_step_per_value(
    server: RunningServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    # 16 MiB of typed FP32 values: before, numpy walked protobuf's container value by
    # value, 0.35 s of the event loop here (1.3 s for a 64 MiB message) where every
    # other caller waits; a raw request of the same size costs nothing.
    values = np.linspace(-1, 1, 4 * 1024 * 1024, dtype=np.float32)
    request = pb.ModelInferRequest(model_name="add")
    for name in ("a", "b"):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[2, values.size // 2])
        tensor.contents.fp32_contents.extend(values.tolist())
    request = pb.ModelInferRequest.FromString(request.SerializeToString())
    settings = server.server.manager.get("add").settings
    # Against numpy's own walk over the same containers, value by value, timed on this
    # thread in this run (a busy machine slows both): the decode must cost well under it.
    started = time.thread_time()
    for tensor in request.inputs:
        np.fromiter(tensor.contents.fp32_contents, np.float32)
    value_by_value = time.thread_time() - started
    started = time.thread_time()
    decoded = decode_request(request, settings)
    spent = time.thread_time() - started
    assert spent < value_by_value / 2, (spent, value_by_value)
    assert np.array_equal(decoded.inputs["a"], values.reshape(2, -1))
    assert decoded.inputs["b"].dtype == np.float32
    # Through the server, typed in and typed out, the values are exact.
    small = pb.ModelInferRequest(model_name="add")
    for name, given in (("a", [0.1, -2.5, float("inf")]), ("b", [0.2, 1e-38, 1.0])):
        small.inputs.add(name=name, datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(
            given
        )
    answer = stub.ModelInfer(small, timeout=30)
    expected = np.float32([0.1, -2.5, np.inf]) + np.float32([0.2, 1e-38, 1.0])
    assert list(answer.outputs[0].contents.fp32_contents) == expected.tolist()


def test_classification_of_a_requested_output_is_answered_as_classes(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    # Triton's classification extension answers "value:index:label" strings in place of
    # the tensor (tests/test_classification.py has the rest); an unknown output next to
    # it, or a count that is not a whole number, is still refused by name.
    wanted = pb.ModelInferRequest.InferRequestedOutputTensor
    classify = wanted(name="sum")
    classify.parameters["classification"].int64_param = 2
    answer = stub.ModelInfer(add_request(classify), timeout=30)
    (output,) = answer.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("sum", "BYTES", [1, 2])
    assert "'nothing'" in refusal(stub, add_request(classify, wanted(name="nothing")))
    wrong = wanted(name="sum")
    wrong.parameters["classification"].string_param = "two"
    assert "output 'sum': parameter 'classification'" in refusal(stub, add_request(wrong))
    # Other output parameters (binary_data is for HTTP) are ignored, as Triton does.
    binary = wanted(name="sum")
    binary.parameters["binary_data"].bool_param = True
    response = stub.ModelInfer(add_request(binary), timeout=30)
    assert [output.name for output in response.outputs] == ["sum"]


def test_no_input_for_a_model_whose_inputs_are_all_optional_is_invalid_argument(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    # Before: StopIteration looking for the batch size, answered INTERNAL.
    message = refusal(stub, pb.ModelInferRequest(model_name="optional"))
    assert "no inputs" in message and "'INPUT0'" in message


def test_a_request_parameter_without_a_value_is_named_as_such(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    # Before: "must be an integer, got None".
    request = add_request()
    request.parameters["priority"].SetInParent()
    message = refusal(stub, request)
    assert "'priority'" in message and "no value" in message and "None" not in message


class OptionalSum:
    """Stands in for a model whose inputs are both optional: sum = a + b, an absent one
    counting 0. Gated: requests queue up until `release()`."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[str]] = []

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> dict[str, Any]:
        self.entered.set()
        assert self.gate.wait(30)
        self.batches.append(sorted(inputs))
        rows = next(iter(inputs.values())).shape[0]
        total = sum((np.asarray(v) for v in inputs.values()), np.zeros((rows, 2), np.float32))
        return {"sum": total}


def test_requests_that_send_different_optional_inputs_never_share_a_batch(
    tmp_path: Path, start_server: StartServer
) -> None:
    # Before: the batch key left absent inputs out, so a request sending only 'a' and
    # one sending only 'b' ([1, 2] each) were gathered together, and the gather failed
    # both (INTERNAL, KeyError): one caller failed the other.
    repo = tmp_path / "models"
    two_input_model(repo / "pair" / "1" / "model.onnx")
    write_config(
        repo / "pair",
        "max_batch_size: 8\n"
        'input [{ name: "a" data_type: TYPE_FP32 dims: [-1] optional: true },'
        ' { name: "b" data_type: TYPE_FP32 dims: [-1] optional: true }]\n',
    )
    runner = OptionalSum()
    server = start_server(repo, wrap_instance=lambda model, inner: runner)

    def request(name: str, value: float) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="pair")
        message.inputs.add(name=name, datatype="FP32", shape=[1, 2])
        message.raw_input_contents.append(np.full(2, value, np.float32).tobytes())
        return message

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        calls = [stub.ModelInfer.future(request("a", 1.0), timeout=30)]
        assert runner.entered.wait(30)  # the first runs (held); the next two queue
        scheduler = server.server.manager.get("pair").scheduler
        # One at a time, each seen queued before the next is sent: two calls sent
        # together may reach the queue in either order.
        for depth, (name, value) in enumerate((("b", 2.0), ("a", 3.0)), start=1):
            calls.append(stub.ModelInfer.future(request(name, value), timeout=30))
            deadline = time.monotonic() + 30
            while scheduler.queue_depth < depth:
                assert time.monotonic() < deadline, f"the request of {name!r} never queued"
                time.sleep(0.005)
        runner.gate.set()
        answers = [np.frombuffer(c.result().raw_output_contents[0], np.float32) for c in calls]
    assert [a.tolist() for a in answers] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    assert runner.batches == [["a"], ["b"], ["a"]]


# The client, against a server that answers garbage ---------------------------------


class GarbageServer:
    """A gRPC server whose ModelInfer answers whatever bytes it is given."""

    def __init__(self) -> None:
        self.answer = b""

        def infer(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self.answer

        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"


@pytest.fixture
def garbage() -> Iterator[GarbageServer]:
    server = GarbageServer()
    yield server
    server.server.stop(None)


def response(*outputs: tuple[str, str, list[int], dict[str, Any]]) -> bytes:
    message = pb.ModelInferResponse(model_name="m")
    for name, datatype, shape, contents in outputs:
        tensor = message.outputs.add(name=name, datatype=datatype, shape=shape)
        for field, values in contents.items():
            getattr(tensor.contents, field).extend(values)
    return message.SerializeToString()


GARBAGE_ANSWERS = {
    "uint8 value out of range": (response(("y", "UINT8", [1], {"uint_contents": [300]})), None),
    "shape whose int64 product wraps to 0": (
        response(("y", "FP32", [2**32, 2**32], {})), None
    ),
    "negative dims": (response(("y", "FP32", [-1, -1], {"fp32_contents": [1.0]})), None),
    "an output twice": (
        response(("y", "FP32", [1], {"fp32_contents": [1.0]}),
                 ("y", "FP32", [1], {"fp32_contents": [2.0]})),
        None,
    ),
    "a requested output missing": (
        response(("y", "FP32", [1], {"fp32_contents": [1.0]})), ["y", "z"]
    ),
    "not a response at all": (b"\xff\xff\xff", None),
}


@pytest.mark.parametrize("case", list(GARBAGE_ANSWERS))
def test_sync_client_raises_its_error_on_garbage_answers(
    garbage: GarbageServer, case: str
) -> None:
    garbage.answer, outputs = GARBAGE_ANSWERS[case]
    with FerryClient(garbage.address) as client, pytest.raises(FerryClientError) as caught:
        client.infer("m", {"x": np.ones(1, np.float32)}, outputs, timeout=10)
    assert caught.value.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(GARBAGE_ANSWERS))
async def test_async_client_raises_its_error_on_garbage_answers(
    garbage: GarbageServer, case: str
) -> None:
    garbage.answer, outputs = GARBAGE_ANSWERS[case]
    async with AsyncFerryClient(garbage.address) as client:
        with pytest.raises(FerryClientError) as caught:
            await client.infer("m", {"x": np.ones(1, np.float32)}, outputs, timeout=10)
    assert caught.value.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def test_client_names_what_is_wrong_with_an_answer(garbage: GarbageServer) -> None:
    with FerryClient(garbage.address) as client:
        for case, words in (
            ("uint8 value out of range", "UINT8"),
            ("an output twice", 'output "y" appears more than once'),
            ("a requested output missing", '"z" is missing'),
        ):
            garbage.answer, outputs = GARBAGE_ANSWERS[case]
            with pytest.raises(FerryClientError, match=words):
                client.infer("m", {"x": np.ones(1, np.float32)}, outputs, timeout=10)
        # A generator of output names is read once, and still checked.
        garbage.answer = GARBAGE_ANSWERS["a requested output missing"][0]
        with pytest.raises(FerryClientError, match='"z" is missing'):
            client.infer("m", {"x": np.ones(1)}, (n for n in ["y", "z"]), timeout=10)
        got = client.infer("m", {"x": np.ones(1)}, (n for n in ["y"]), timeout=10)
        assert got["y"].tolist() == [1.0]


# The command line ---------------------------------------------------------------


ABSURD_FLAGS = [
    (["--max-message-size", str(2**31)], "--max-message-size"),
    (["--max-message-size", str(2**40)], "--max-message-size"),
    (["--shutdown-grace", "nan"], "--shutdown-grace"),
    (["--shutdown-grace", "inf"], "--shutdown-grace"),
    (["--poll-repository", "inf"], "--poll-repository"),
    (["--session-threads", "100000"], "--session-threads"),
    (["--workers", "100000"], "--workers"),
    (["--min-ping-interval", "nan"], "--min-ping-interval"),
    (["--min-ping-interval", "inf"], "--min-ping-interval"),
    (["--min-ping-interval", "1e12"], "--min-ping-interval"),
    (["--max-concurrent-streams", str(2**40)], "--max-concurrent-streams"),
    (["--max-ping-strikes", str(2**40)], "--max-ping-strikes"),
    (["--http-port", "-2"], "--http-port"),
    (["--metrics-port", "-2"], "--metrics-port"),
    (["--max-stream-pending", "0"], "--max-stream-pending"),
    (["--max-stream-pending-bytes", "0"], "--max-stream-pending-bytes"),
    (["--process-role", "frontend"], "--executor-socket"),
    (["--process-role", "executor"], "--executor-socket"),
]


def _flag_id(value: object) -> str | None:
    return " ".join(value) if isinstance(value, list) else None


@pytest.mark.parametrize(("args", "flag"), ABSURD_FLAGS, ids=_flag_id)
def test_absurd_flag_values_exit_2_naming_the_flag(
    repo: Path,
    args: list[str],
    flag: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Before: each started a server (one with a thread or a process per unit asked for,
    # one that could never stop on NaN seconds), or died with a traceback from grpc.
    def started(coroutine: Any, *rest: Any) -> int:
        coroutine.close()
        return 99

    monkeypatch.setattr(cli.event_loop, "run", started)
    monkeypatch.setattr(cli, "Supervisor", lambda *a, **k: pytest.fail("supervisor started"))
    argv = ["serve", str(repo), "--host", "127.0.0.1", "--grpc-port", "0"]
    if flag != "--http-port":
        argv += ["--http-port", "-1"]
    if flag != "--metrics-port":
        argv += ["--metrics-port", "-1"]
    assert cli.main([*argv, *args]) == 2
    assert flag in capsys.readouterr().err


def test_a_message_size_past_grpcs_limit_exits_2_without_a_traceback(repo: Path) -> None:
    result = subprocess.run(
        serve_command(repo, "--max-message-size", str(2**31)),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--max-message-size" in result.stderr and "2147483647" in result.stderr
    assert "Traceback" not in result.stderr


def test_sound_flag_values_still_start(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[Any] = []

    def started(coroutine: Any, *rest: Any) -> int:
        runs.append(coroutine)
        coroutine.close()
        return 0

    monkeypatch.setattr(cli.event_loop, "run", started)
    argv = ["serve", str(repo), "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1",
            "--max-message-size", str(2**31 - 1), "--shutdown-grace", "0",
            "--poll-repository", "0.5", "--session-threads", "4", "--min-ping-interval", "0"]
    assert cli.main(argv) == 0 and len(runs) == 1


# Answers ---------------------------------------------------------------------------


MIB = 1024 * 1024


def test_a_typed_answer_costs_no_python_list_of_the_whole_output(
    tmp_path: Path, start_server: StartServer
) -> None:
    # 1 KiB of typed contents in, 16 MiB of FP32 out (refused as too large for 8 MiB):
    # before, the answer was built from one Python list of all 4 million floats, 128 MiB
    # of objects the request's sender made the server hold (and, measured in a `ferry
    # serve` process, a peak 190 MiB above the RSS before the request, now 50-115 MiB
    # as a raw request of the same size).
    from tests.test_hardening import tile_model

    repo = tmp_path / "tiles"
    tile_model(repo / "tile" / "1" / "model.onnx", repeats=65536)
    server = start_server(repo, max_message_bytes=8 * MIB)
    request = pb.ModelInferRequest(model_name="tile")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend(range(64))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
        small = pb.ModelInferRequest(model_name="tile")
        small.inputs.add(name="x", datatype="FP32", shape=[1, 1])
        small.inputs[0].contents.fp32_contents.append(2.0)
        answer = stub.ModelInfer(small, timeout=30)  # typed, and complete
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-message-size" in str(caught.value.details())
    assert list(answer.outputs[0].contents.fp32_contents) == [2.0] * 65536

    output = {"y": np.arange(MIB, dtype=np.float32).reshape(1, -1)}
    settings = server.server.manager.get("tile").settings
    tracemalloc.start()
    try:
        response = encode_response(request, settings, "1", output)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(response.outputs[0].contents.fp32_contents) == MIB
    assert response.outputs[0].contents.fp32_contents[-1] == MIB - 1
    assert peak < 8 * MIB, peak // MIB  # before: 32 MiB, a list of a million floats


def test_the_client_refuses_object_arrays_of_numbers_instead_of_sending_zero_bytes(
    garbage: GarbageServer,
) -> None:
    # Before: np.array([3], dtype=object) travelled as BYTES b"\x00\x00\x00" (bytes(3)).
    garbage.answer = response(("y", "FP32", [1], {"fp32_contents": [1.0]}))
    with FerryClient(garbage.address) as client:
        for value in (np.array([3], dtype=object), np.array(["a", None, 2.5], dtype=object)):
            with pytest.raises(TypeError, match=r'input "x".*str or bytes'):
                client.infer("m", {"x": value}, timeout=10)
        got = client.infer("m", {"x": np.array(["é", b"\xff"], dtype=object)}, timeout=10)
    assert got["y"].tolist() == [1.0]

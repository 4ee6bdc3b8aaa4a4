"""`--max-run-memory`: a request whose run would need more working memory than the
server allows (a model whose output grows with an input value) is refused with
RESOURCE_EXHAUSTED naming the flag, instead of growing the server until the kernel kills
it; the server's memory stays near where it was, and the next callers are answered.
Through the real port, with the onnxruntime arena limit doing the refusing."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.cli import build_parser, check_values
from ferry.server.errors import ErrorKind, FerryError
from ferry.server.executor import BatchItem, InstanceExecutor
from ferry.server.runtime import default_max_run_memory
from tests.process import FerryProcess

MIB = 1024 * 1024


def ramp_repository(root: Path) -> Path:
    """Model 'ramp': length INT64 [1] -> ramp FP32 [length] = 0, 1, ..., length - 1. Its
    output, and so its run's memory, grows with the value a caller sends."""
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["length"], ["n"]),
            helper.make_node("Cast", ["n"], ["limit"], to=TensorProto.FLOAT),
            helper.make_node("Constant", [], ["start"],
                             value=helper.make_tensor("s", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Constant", [], ["step"],
                             value=helper.make_tensor("d", TensorProto.FLOAT, [], [1.0])),
            helper.make_node("Range", ["start", "limit", "step"], ["ramp"]),
        ],
        "ramp",
        [helper.make_tensor_value_info("length", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("ramp", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (root / "ramp" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "ramp" / "1" / "model.onnx"))
    (root / "ramp" / "config.pbtxt").write_text("max_batch_size: 0\n")
    return root


def ramp_request(length: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="ramp")
    request.inputs.add(name="length", datatype="INT64", shape=[1])
    request.raw_input_contents.append(np.array([length], np.int64).tobytes())
    return request


def test_a_run_past_the_limit_is_refused_and_memory_stays_put(tmp_path: Path) -> None:
    repo = ramp_repository(tmp_path / "repo")
    limit = 64 * MIB
    with FerryProcess(repo, "--max-run-memory", str(limit), "--shutdown-grace", "0") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            answer = stub.ModelInfer(ramp_request(1000), timeout=30)
            ramp = np.frombuffer(answer.raw_output_contents[0], np.float32)
            np.testing.assert_array_equal(ramp, np.arange(1000, dtype=np.float32))
            # 3 MiB of output fits; its arena stays for the next runs.
            stub.ModelInfer(ramp_request(3 * MIB // 4), timeout=30)
            rss_before = server.status_value("VmRSS")
            server.reset_peak()
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(ramp_request(2**31), timeout=60)  # 8 GiB of FP32
            peak = server.status_value("VmHWM")
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            details = caught.value.details() or ""
            assert "--max-run-memory" in details and str(limit) in details, details
            assert "/onnxruntime_src" not in details, details
            again = stub.ModelInfer(ramp_request(5), timeout=30)
            assert np.frombuffer(again.raw_output_contents[0], np.float32).tolist() == [
                0, 1, 2, 3, 4
            ]
        assert server.process.poll() is None
        # Refused runs are logged by Ferry's rate-limited log of refusals, not a line each
        # by onnxruntime or as a failed batch.
        server.wait_for("fail with RESOURCE_EXHAUSTED")  # stderr is read on a thread
        assert "[E:onnxruntime" not in server.log, server.log[-2000:]
        assert "requests failed" not in server.log, server.log[-2000:]
    rise_mib = (peak - rss_before) / 1024
    print(f"peak rise {rise_mib:.0f} MiB for a run of 8 GiB against a limit of 64 MiB")
    assert rise_mib < 64, rise_mib


def test_the_default_limit_refuses_a_run_larger_than_the_machine() -> None:
    """By default the runs of all models may use three quarters of the memory this
    process may have (its cgroup's limit when lower than the machine's)."""
    default = default_max_run_memory()
    total = _machine_bytes()
    assert 0 < default <= total * 3 // 4
    assert default >= min(total * 3 // 4, 256 * MIB)


def test_a_run_past_the_limit_fails_only_the_request_that_needs_it() -> None:
    """A batch that runs out of the allowed memory is split like one that a caller's
    values broke: the requests that run on their own are answered."""

    class Model:
        may_run_on_loop = True

        def run_batch(
            self, parts: list[dict[str, np.ndarray]], rows: int, output_names: list[str]
        ) -> tuple[dict[str, np.ndarray], int]:
            x = np.concatenate([part["x"] for part in parts])
            if (x > 100).any():
                raise FerryError(ErrorKind.TOO_LARGE, "the run needs more memory")
            return {"y": x * 2}, 0

    executor = InstanceExecutor(Model())
    items = [BatchItem({"x": np.array([[v]], np.float32)}, 1, ("y",)) for v in (1, 2, 500, 3)]
    batch = executor.execute(items, ["y"])
    first, second, big, fourth = batch.outputs
    assert isinstance(big, FerryError) and big.kind is ErrorKind.TOO_LARGE
    assert [o["y"].tolist() for o in (first, second, fourth)] == [[[2]], [[4]], [[6]]]  # type: ignore[index]


@pytest.mark.parametrize("value", ["-1", "1", "1023"])
def test_a_bad_limit_is_refused_by_name(value: str) -> None:
    args = build_parser().parse_args(["serve", "repo", "--max-run-memory", value])
    with pytest.raises(ValueError, match="--max-run-memory"):
        check_values(args)


def _machine_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_answers_waiting_to_be_encoded_do_not_hold_the_cap(tmp_path: Path) -> None:
    """Eight callers at once of runs of 48 MiB against a cap of 64 MiB, on one instance
    (one run at a time): each run fits alone, so each is answered. A large output used to
    stay in the capped arena until its answer was encoded, while the next run had
    started: 3 of 8 were answered, the others refused "0 left"."""
    repo = ramp_repository(tmp_path / "repo")
    size = 12 * MIB  # FP32 values: 48 MiB
    with FerryProcess(repo, "--max-run-memory", str(64 * MIB), "--shutdown-grace", "0") as server:
        options = [("grpc.max_receive_message_length", 64 * MIB)]
        with grpc.insecure_channel(server.address, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer.future(ramp_request(size), timeout=120) for _ in range(8)]
            for call in calls:
                answer = call.result()
                assert len(answer.raw_output_contents[0]) == 4 * size

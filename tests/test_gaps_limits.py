"""`--max-concurrent-rpcs` and streams: "a stream counts once while open" (README). An
open ModelStreamInfer holds its place for its whole life, over gRPC and REST alike, and
gives it back when it ends; the probes are never counted."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.security import SecurityOptions
from tests.conftest import RunningServer
from tests.models import mlp_model

StartServer = Callable[..., RunningServer]
AT_LIMIT = (
    "the server is at its limit of 1 concurrent RPCs (--max-concurrent-rpcs); retry later"
)
END = None


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    return tmp_path / "repo"


def request(value: float) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    message.raw_input_contents.append(np.full((1, 16), value, np.float32).tobytes())
    return message


def requests_from(source: queue.Queue[pb.ModelInferRequest | None]) -> Iterator[Any]:
    """A stream's requests as a test hands them over; END closes the sending side."""
    while (item := source.get(timeout=30)) is not END:
        yield item


def unary_infer(server: RunningServer) -> tuple[str, str]:
    tensor = triton.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
    try:
        with triton.InferenceServerClient(server.address) as client:
            client.infer("m", [tensor], client_timeout=10)
    except InferenceServerException as error:
        return (error.status() or "").removeprefix("StatusCode."), error.message() or ""
    return "OK", ""


def rest_infer(server: RunningServer) -> tuple[int, Any]:
    body = json.dumps({"inputs": [
        {"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}
    ]}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(
            f"http://{server.http_address}/v2/models/m/infer", data=body
        ), timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_an_open_stream_holds_its_place_until_it_ends(
    repo: Path, start_server: StartServer
) -> None:
    """With --max-concurrent-rpcs 1 and one stream open (its first reply received, so
    it is admitted): a unary call is refused RESOURCE_EXHAUSTED with the limit's
    message, a REST call 503, a second stream RESOURCE_EXHAUSTED, while the health
    probe is still answered SERVING. Once the stream ends, a unary call goes through."""
    server = start_server(repo, security=SecurityOptions(max_concurrent_rpcs=1))
    sent: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    with grpc.insecure_channel(server.address) as channel:
        stub: Any = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        replies = stub.ModelStreamInfer(requests_from(sent), timeout=30)
        try:
            sent.put(request(1.0))
            first = next(replies)
            assert not first.error_message
            assert first.infer_response.model_name == "m"

            assert unary_infer(server) == ("RESOURCE_EXHAUSTED", AT_LIMIT)
            assert rest_infer(server) == (
                503, {"error": "too many concurrent requests: the limit is 1 "
                               "(--max-concurrent-rpcs)"}
            )
            second = stub.ModelStreamInfer(iter([request(2.0)]), timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                list(second)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details() == AT_LIMIT
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING
            )

            sent.put(request(3.0))  # the stream itself is still served
            assert not next(replies).error_message
        finally:
            sent.put(END)
        assert list(replies) == []
    assert unary_infer(server) == ("OK", "")

"""The standard gRPC health service, the protocol's readiness RPCs, and reflection, as
grpc_health_probe, Kubernetes probes, grpcurl and ghz see them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, write_config
from tests.waiting import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE = "inference.GRPCInferenceService"


def make_repo(root: Path, *, models: tuple[str, ...] = ("m", "n"), broken: bool = False) -> Path:
    repo = root / "repo"
    for name in models:
        mlp_model(repo / name / "1" / "model.onnx")
        write_config(repo / name, "max_batch_size: 4\n")
    if broken:
        (repo / "broken" / "1").mkdir(parents=True)
        (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    return repo


@pytest.fixture
def channel_to() -> Iterator[Callable[[RunningServer], grpc.Channel]]:
    channels: list[grpc.Channel] = []

    def connect(server: RunningServer) -> grpc.Channel:
        channel = grpc.insecure_channel(server.address)
        channels.append(channel)
        return channel

    yield connect
    for channel in channels:
        channel.close()


def check(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(response.status)


def test_serving_once_models_load_and_models_unloaded_on_purpose_leave_it_ready(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    channel_to: Callable[[RunningServer], grpc.Channel],
) -> None:
    server = start_server(make_repo(tmp_path))
    channel = channel_to(server)
    triton_client = triton.InferenceServerClient(server.address)
    try:
        assert check(channel, "") == SERVING
        assert check(channel, INFERENCE) == SERVING
        assert check(channel, "m") == SERVING
        assert check(channel, "n") == SERVING
        assert triton_client.is_server_live()
        assert triton_client.is_server_ready()
        assert triton_client.is_model_ready("m")

        server.call(server.server.manager.unload("m"))
        assert check(channel, "m") == NOT_SERVING
        assert not triton_client.is_model_ready("m")
        assert check(channel, "n") == SERVING
        assert triton_client.is_model_ready("n")

        # Unloaded on purpose, as Triton's readiness counts it: the server stays ready
        # (a probe would otherwise take every replica out for one unloaded model).
        assert check(channel, "") == SERVING
        assert triton_client.is_server_ready()
        server.call(server.server.manager.unload("n"))
        assert check(channel, "") == SERVING
        assert check(channel, INFERENCE) == SERVING
        assert check(channel, "n") == NOT_SERVING
        assert triton_client.is_server_ready()
        assert triton_client.is_server_live()

        server.call(server.server.manager.load("m"))
        assert check(channel, "m") == SERVING
        assert triton_client.is_model_ready("m")
    finally:
        triton_client.close()


def test_unknown_service_is_not_found(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    channel_to: Callable[[RunningServer], grpc.Channel],
) -> None:
    server = start_server(make_repo(tmp_path))
    with pytest.raises(grpc.RpcError) as caught:
        check(channel_to(server), "no-such-model")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with triton.InferenceServerClient(server.address) as client:
        assert not client.is_model_ready("no-such-model")


def test_a_model_that_fails_to_load_keeps_the_server_not_serving(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    channel_to: Callable[[RunningServer], grpc.Channel],
) -> None:
    server = start_server(make_repo(tmp_path, broken=True))
    channel = channel_to(server)
    assert check(channel, "broken") == NOT_SERVING
    assert check(channel, "m") == SERVING
    assert check(channel, "") == NOT_SERVING
    with triton.InferenceServerClient(server.address) as client:
        assert not client.is_server_ready()
        assert not client.is_model_ready("broken")
        assert client.is_model_ready("m")


def test_not_serving_while_draining(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    gated: Callable[..., GatedInstance],
    channel_to: Callable[[RunningServer], grpc.Channel],
) -> None:
    server = start_server(make_repo(tmp_path, models=("m",)), wrap_instance=gated)
    channel = channel_to(server)
    (gate,) = gated.instances  # type: ignore[attr-defined]
    gate.hold()
    client = triton.InferenceServerClient(server.address)
    answered: list[object] = []
    try:
        x = np.zeros((1, 16), np.float32)
        tensor = triton.InferInput("x", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.async_infer("m", [tensor], lambda result, error: answered.append(error))
        assert gate.entered.acquire(timeout=10)
        # The drain waits for the held request; meanwhile the probes say "not serving".
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace_s=30), server.loop)
        wait_until(lambda: check(channel, "") == NOT_SERVING, what="NOT_SERVING while draining")
        assert check(channel, "m") == NOT_SERVING
        assert not client.is_server_ready()
        gate.release()
        stopping.result(30)
        assert answered == [None]
    finally:
        gate.release()
        client.close()


def test_reflection_lists_and_describes_the_inference_service(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    channel_to: Callable[[RunningServer], grpc.Channel],
) -> None:
    server = start_server(make_repo(tmp_path))
    database = ProtoReflectionDescriptorDatabase(channel_to(server))
    services = database.get_services()
    assert INFERENCE in services
    assert "grpc.health.v1.Health" in services
    pool = DescriptorPool(database)
    service = pool.FindServiceByName(INFERENCE)
    methods = {method.name for method in service.methods}
    assert {"ServerLive", "ServerReady", "ModelReady", "ModelInfer", "ModelStatistics"} <= methods
    infer = service.methods_by_name["ModelInfer"]
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert infer.input_type.fields_by_name["raw_input_contents"].number == 7
    # the file that defines it resolves, dependencies included
    assert pool.FindFileContainingSymbol(INFERENCE).package == "inference"

"""grpc.health.v1 Watch as a client sees it: one message per change of the watched
service only (other services' changes wake the watcher but send nothing), and a service
unknown when the watch began that becomes known later."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.server.repository import ModelControl, ModelControlMode
from ferry.server.security import SecurityOptions
from tests.conftest import EXPLICIT_MODEL_CONTROL, RunningServer
from tests.models import mlp_model

StartServer = Callable[..., RunningServer]
Status = health_pb2.HealthCheckResponse
NOTHING_AT_START = SecurityOptions(model_control=ModelControl(ModelControlMode.EXPLICIT, ()))


def statuses(channel: grpc.Channel, service: str) -> Iterator[int]:
    """The statuses a Watch of `service` sends, as they come (30 s deadline)."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=service), timeout=30
    )
    return (reply.status for reply in watch)


def test_a_watcher_hears_only_its_own_services_changes(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Watching "m": SERVING at once; unloading "n" (seen by "n"'s own watcher) wakes
    "m"'s watcher but sends it nothing; unloading "m" then sends NOT_SERVING next (no
    repeated SERVING before it)."""
    for name in ("m", "n"):
        mlp_model(tmp_path / name / "1" / "model.onnx")
    server = start_server(tmp_path, security=EXPLICIT_MODEL_CONTROL)
    with grpc.insecure_channel(server.address) as channel, triton.InferenceServerClient(
        server.address
    ) as client:
        m_watch = statuses(channel, "m")
        n_watch = statuses(channel, "n")
        assert next(m_watch) == Status.SERVING
        assert next(n_watch) == Status.SERVING
        client.unload_model("n")
        assert next(n_watch) == Status.NOT_SERVING  # the change has been made
        client.unload_model("m")
        assert next(m_watch) == Status.NOT_SERVING


def test_a_watched_service_unknown_at_first_becomes_known_when_its_model_loads(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A Watch of a name no one reports gets SERVICE_UNKNOWN (not an error, as the
    health protocol asks) and stays open; a model of that name added to the repository
    and loaded makes the same watch send SERVING."""
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    server = start_server(tmp_path, security=NOTHING_AT_START)
    with grpc.insecure_channel(server.address) as channel:
        watch = statuses(channel, "late")
        assert next(watch) == Status.SERVICE_UNKNOWN
        mlp_model(tmp_path / "late" / "1" / "model.onnx")
        with triton.InferenceServerClient(server.address) as client:
            client.load_model("late")
        assert next(watch) == Status.SERVING


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService"])
def test_the_server_services_turn_not_serving_for_good_at_the_drain(
    tmp_path: Path, start_server: StartServer, service: str
) -> None:
    """At a stop, the server's services turn NOT_SERVING for their watchers, for good:
    a later set() (what a load finishing during the drain would make) is ignored."""
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    server = start_server(tmp_path)
    with grpc.insecure_channel(server.address) as channel:
        watch = statuses(channel, service)
        assert next(watch) == Status.SERVING
        server.call(server.server.health.enter_graceful_shutdown())
        assert next(watch) == Status.NOT_SERVING
        server.call(server.server.health.set(service, Status.SERVING))
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == (
            Status.NOT_SERVING
        )

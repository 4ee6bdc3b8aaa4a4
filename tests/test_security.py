"""Security through a real port: TLS and mutual TLS, model control, restricted API keys,
connection and tensor limits, and error messages that leak no file-system paths."""

from __future__ import annotations

import http.client
import json
import logging
import ssl
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.cli import build_parser, security_options
from ferry.server.errors import public_message
from ferry.server.grpc_status import shielded
from ferry.server.repository import ModelControl, ModelControlMode
from ferry.server.security import (
    ApiGroup,
    RestrictedApi,
    SecurityOptions,
    TlsFiles,
    api_group,
)
from tests.certificates import Identity, Pki
from tests.conftest import GatedInstance, RunningServer, one_place_server
from tests.models import mlp_model

StartServer = Callable[..., RunningServer]
FEATURES = 16

EXPLICIT = SecurityOptions(model_control=ModelControl(ModelControlMode.EXPLICIT))


def features(rows: int) -> np.ndarray:
    return np.random.default_rng(rows).standard_normal((rows, FEATURES)).astype(np.float32)


def infer_input(x: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def infer_request(x: np.ndarray, model: str = "m") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def code_of(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return (info.value.status() or "").removeprefix("StatusCode."), info.value.message() or ""


def rpc_error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details() or ""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    return tmp_path / "repo"


# TLS ----------------------------------------------------------------------------------


def tls_client(
    server: RunningServer, root: Path, identity: Identity | None = None
) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(
        server.address,
        ssl=True,
        root_certificates=str(root),
        private_key=str(identity.key) if identity else None,
        certificate_chain=str(identity.cert) if identity else None,
    )


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plain_text(
    repo: Path, start_server: StartServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = start_server(
        repo, security=SecurityOptions(tls=TlsFiles(pki.server.cert, pki.server.key))
    )
    assert not [r for r in caplog.records if "plain text" in r.getMessage()]
    assert [r for r in caplog.records if "uses TLS" in r.getMessage()]
    with tls_client(server, pki.ca.cert_path) as client:
        assert client.is_server_live()
        result = client.infer("m", [infer_input(features(2))])
        assert result.as_numpy("probs").shape == (2, 4)
    with tc.InferenceServerClient(server.address) as plain:
        code, _ = code_of(plain.is_server_live)
        assert code == "UNAVAILABLE"
    # a client that trusts another CA does not accept the server
    with tls_client(server, pki.other_ca.cert_path) as suspicious:
        code, _ = code_of(suspicious.is_server_live)
        assert code == "UNAVAILABLE"


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(
    repo: Path, start_server: StartServer, pki: Pki
) -> None:
    tls = TlsFiles(pki.server.cert, pki.server.key, client_ca=pki.ca.cert_path)
    server = start_server(repo, security=SecurityOptions(tls=tls))
    with tls_client(server, pki.ca.cert_path) as anonymous:
        code, _ = code_of(anonymous.is_server_live)
        assert code == "UNAVAILABLE"
    with tls_client(server, pki.ca.cert_path, pki.stranger) as stranger:
        code, _ = code_of(stranger.is_server_live)
        assert code == "UNAVAILABLE"
    with tls_client(server, pki.ca.cert_path, pki.client) as member:
        assert member.is_server_live()
        assert member.infer("m", [infer_input(features(1))]).as_numpy("logits").shape == (1, 4)


def test_rest_serves_https_with_the_same_tls_and_mutual_tls(
    repo: Path, start_server: StartServer, pki: Pki
) -> None:
    """The REST port takes gRPC's TLS settings (on the default loop, uvloop's TLS
    transport): a client with a certificate from the client CA is served; a client
    without one, a stranger's certificate and plain HTTP are refused."""
    tls = TlsFiles(pki.server.cert, pki.server.key, client_ca=pki.ca.cert_path)
    server = start_server(repo, security=SecurityOptions(tls=tls))
    url = f"https://{server.http_address}"

    def context(identity: Identity | None) -> ssl.SSLContext:
        trusted = ssl.create_default_context(cafile=str(pki.ca.cert_path))
        if identity is not None:
            trusted.load_cert_chain(str(identity.cert), str(identity.key))
        return trusted

    member = context(pki.client)
    with urllib.request.urlopen(f"{url}/v2/health/ready", context=member, timeout=10) as ready:
        assert ready.status == 200
    x = features(2)
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, FEATURES], "datatype": "FP32",
                     "data": x.ravel().tolist()}]}
    ).encode()
    request = urllib.request.Request(
        f"{url}/v2/models/m/infer", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, context=member, timeout=10) as answered:
        outputs = {o["name"]: o for o in json.loads(answered.read())["outputs"]}
    assert outputs["probs"]["shape"] == [2, 4]
    np.testing.assert_allclose(np.sum(np.reshape(outputs["probs"]["data"], (2, 4)), axis=1), 1.0,
                               rtol=1e-5)
    for refused in (context(None), context(pki.stranger)):
        with pytest.raises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"{url}/v2/health/ready", context=refused, timeout=10).close()
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://{server.http_address}/v2/health/ready", timeout=10).close()
    # The refusals cost the server nothing: the member is still served.
    with urllib.request.urlopen(f"{url}/v2/health/live", context=member, timeout=10) as live:
        assert live.status == 200


def test_plain_text_is_the_default_and_says_so_once(
    repo: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = start_server(repo)
    lines = [r for r in caplog.records if "plain text" in r.getMessage()]
    # Once per port, each named by the port it bound.
    assert sorted(r.getMessage().split(" is ")[0] for r in lines) == [
        f"REST on 127.0.0.1:{server.server.http_port}", f"gRPC on {server.address}"
    ]
    assert all(r.levelno == logging.WARNING for r in lines)
    with tc.InferenceServerClient(server.address) as client:
        assert client.is_server_live()


# Model control ------------------------------------------------------------------------


def test_model_control_none_refuses_load_and_unload(repo: Path, start_server: StartServer) -> None:
    server = start_server(repo)
    with tc.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("m")  # the repository loaded at start
        for call in (lambda: client.load_model("m"), lambda: client.unload_model("m")):
            code, message = code_of(call)
            assert code == "PERMISSION_DENIED"
            assert "--model-control-mode" in message
        assert client.is_model_ready("m")


def test_model_control_poll_refuses_load_and_unload(repo: Path, start_server: StartServer) -> None:
    server = start_server(
        repo,
        poll_repository_s=60.0,
        security=SecurityOptions(model_control=ModelControl(ModelControlMode.POLL)),
    )
    with tc.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("m")
        code, message = code_of(lambda: client.unload_model("m"))
        assert code == "PERMISSION_DENIED"
        assert "--model-control-mode=poll" in message


def test_explicit_mode_starts_empty_and_loads_on_request(
    repo: Path, start_server: StartServer
) -> None:
    server = start_server(repo, security=EXPLICIT)
    with tc.InferenceServerClient(server.address) as client:
        # Its start-up set is empty, so it is ready (as Triton's is): a readiness probe
        # lets the load calls through.
        assert client.is_server_ready()
        assert not client.is_model_ready("m")
        client.load_model("m")
        assert client.is_model_ready("m")
        assert client.is_server_ready()
        assert client.infer("m", [infer_input(features(1))]).as_numpy("probs").shape == (1, 4)
        client.unload_model("m")
        assert not client.is_model_ready("m")


def test_explicit_mode_loads_the_named_models_at_start(
    repo: Path, start_server: StartServer
) -> None:
    mlp_model(repo / "other" / "1" / "model.onnx")
    control = ModelControl(ModelControlMode.EXPLICIT, startup_models=("other",))
    server = start_server(repo, security=SecurityOptions(model_control=control))
    with tc.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("other")
        assert not client.is_model_ready("m")
        assert client.is_server_ready()


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", "link", "filelink"])
def test_explicit_mode_refuses_names_that_leave_the_repository(
    tmp_path: Path, repo: Path, start_server: StartServer, name: str
) -> None:
    outside = tmp_path / "x"
    mlp_model(outside / "1" / "model.onnx")
    (repo / "a").mkdir()
    mlp_model(repo / "a" / "b" / "1" / "model.onnx")
    (repo / "link").symlink_to(outside, target_is_directory=True)
    # a model folder inside the repository whose model file points outside it
    (repo / "filelink" / "1").mkdir(parents=True)
    (repo / "filelink" / "1" / "model.onnx").symlink_to(outside / "1" / "model.onnx")
    server = start_server(repo, security=EXPLICIT)
    with tc.InferenceServerClient(server.address) as client:
        code, message = code_of(lambda: client.load_model(name))
        assert code == "INVALID_ARGUMENT"
        assert str(tmp_path) not in message
        assert not client.is_model_ready(name)
        client.load_model("m")  # a valid name still loads
        assert client.is_model_ready("m")


def test_load_overrides_are_refused_unless_allowed(repo: Path, start_server: StartServer) -> None:
    server = start_server(repo, security=EXPLICIT)
    with tc.InferenceServerClient(server.address) as client:
        code, message = code_of(lambda: client.load_model("m", config='{"max_batch_size": 2}'))
        assert code == "PERMISSION_DENIED"
        assert "--allow-load-overrides" in message
        code, message = code_of(
            lambda: client.load_model("m", files={"file:1/model.onnx": b"onnx"}, config="{}")
        )
        assert code == "PERMISSION_DENIED"
        assert not client.is_model_ready("m")


def test_a_config_override_may_name_another_model_file(
    repo: Path, start_server: StartServer
) -> None:
    """As in Triton, the override's default_model_filename picks the file each version
    folder serves (it was ignored: the files were found with config.pbtxt's name)."""
    mlp_model(repo / "m" / "1" / "other.onnx", seed=7)
    x = features(1)
    expected = ort.InferenceSession(str(repo / "m" / "1" / "other.onnx")).run(
        ["probs"], {"x": x}
    )[0]
    control = ModelControl(ModelControlMode.EXPLICIT, allow_load_overrides=True)
    server = start_server(repo, security=SecurityOptions(model_control=control))
    with tc.InferenceServerClient(server.address) as client:
        client.load_model("m", config='{"default_model_filename": "other.onnx"}')
        probs = client.infer("m", [infer_input(x)]).as_numpy("probs")
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
        code, message = code_of(
            lambda: client.load_model("m", config='{"default_model_filename": "none.onnx"}')
        )
        assert code == "INVALID_ARGUMENT" and "none.onnx" in message, message
        np.testing.assert_allclose(  # the running version keeps serving
            client.infer("m", [infer_input(x)]).as_numpy("probs"), expected, rtol=1e-5, atol=1e-6
        )


def test_config_override_when_allowed(repo: Path, start_server: StartServer) -> None:
    control = ModelControl(ModelControlMode.EXPLICIT, allow_load_overrides=True)
    server = start_server(repo, security=SecurityOptions(model_control=control))
    with tc.InferenceServerClient(server.address) as client:
        client.load_model("m", config='{"max_batch_size": 2}')
        assert client.get_model_config("m").config.max_batch_size == 2
        code, message = code_of(lambda: client.infer("m", [infer_input(features(3))]))
        assert code == "INVALID_ARGUMENT" and "max_batch_size" in message
        # file overrides stay refused: a load names only what is inside the repository
        code, message = code_of(
            lambda: client.load_model("m", files={"file:1/model.onnx": b"onnx"}, config="{}")
        )
        assert code == "PERMISSION_DENIED" and "file:1/model.onnx" in message
        code, message = code_of(lambda: client.load_model("m", config="{not json"))
        assert code == "INVALID_ARGUMENT" and "config" in message
        for delay in ("-5", "1.5", "1" + "0" * 400):
            override = json.dumps(
                {"parameters": {"adaptive_queue_delay_microseconds": {"string_value": delay}}}
            )
            code, message = code_of(lambda o=override: client.load_model("m", config=o))
            assert code == "INVALID_ARGUMENT", (delay, code, message)
            assert "parameter adaptive_queue_delay_microseconds must" in message
        assert client.is_model_ready("m")  # the loaded version served on
        # a load without the override goes back to the repository's config
        client.load_model("m")
        assert client.get_model_config("m").config.max_batch_size != 2


# Restricted APIs ------------------------------------------------------------------------

KEY_HEADER = "ferry-key"
KEYS = {group: f"secret-{group.value}" for group in ApiGroup}


def _calls(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[ApiGroup, Callable[..., object]]:
    """One representative RPC per group, taking the metadata to send."""
    return {
        ApiGroup.HEALTH: lambda md: stub.ServerLive(pb.ServerLiveRequest(), metadata=md),
        ApiGroup.METADATA: lambda md: stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=md),
        ApiGroup.MODEL_CONFIG: lambda md: stub.ModelConfig(
            pb.ModelConfigRequest(name="m"), metadata=md
        ),
        ApiGroup.INFERENCE: lambda md: stub.ModelInfer(infer_request(features(1)), metadata=md),
        ApiGroup.MODEL_REPOSITORY: lambda md: stub.RepositoryIndex(
            pb.RepositoryIndexRequest(), metadata=md
        ),
        ApiGroup.STATISTICS: lambda md: stub.ModelStatistics(
            pb.ModelStatisticsRequest(), metadata=md
        ),
    }


@pytest.fixture
def restricted(repo: Path, start_server: StartServer) -> Iterator[grpc.Channel]:
    """Every group but health restricted, each with its own key."""
    restrictions = tuple(
        RestrictedApi(frozenset([group]), KEY_HEADER, KEYS[group])
        for group in ApiGroup
        if group is not ApiGroup.HEALTH
    )
    server = start_server(repo, security=SecurityOptions(restricted_apis=restrictions))
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.mark.parametrize(
    "group",
    [
        ApiGroup.METADATA,
        ApiGroup.MODEL_CONFIG,
        ApiGroup.INFERENCE,
        ApiGroup.MODEL_REPOSITORY,
        ApiGroup.STATISTICS,
    ],
)
def test_each_restricted_group_needs_its_key(restricted: grpc.Channel, group: ApiGroup) -> None:
    call = _calls(pb_grpc.GRPCInferenceServiceStub(restricted))[group]
    for metadata in ((), ((KEY_HEADER, "wrong"),), ((KEY_HEADER, KEYS[ApiGroup.TRACE]),)):
        code, message = rpc_error(lambda metadata=metadata: call(metadata))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert group.value in message and KEY_HEADER in message
        assert "secret" not in message
    call(((KEY_HEADER, KEYS[group]),))  # succeeds


def test_health_stays_open_for_probes_unless_restricted(
    restricted: grpc.Channel, repo: Path, start_server: StartServer
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(restricted)
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    health = health_pb2_grpc.HealthStub(restricted)
    check = health.Check(health_pb2.HealthCheckRequest(service=""))
    assert check.status == health_pb2.HealthCheckResponse.SERVING

    only_health = RestrictedApi(frozenset([ApiGroup.HEALTH]), "probe-key", "let-me-in")
    server = start_server(repo, security=SecurityOptions(restricted_apis=(only_health,)))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        code, _ = rpc_error(lambda: stub.ServerLive(pb.ServerLiveRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        key = (("probe-key", "let-me-in"),)
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=key).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        assert stub.ServerLive(pb.ServerLiveRequest(), metadata=key).live
        # the other groups stay open
        assert stub.ServerMetadata(pb.ServerMetadataRequest()).name == "ferry"


def test_restricted_streaming_inference_and_tritonclient_headers(
    repo: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = RestrictedApi.parse("inference,model-repository:X-Api-Key=s3cr3t-value")
    server = start_server(repo, security=SecurityOptions(restricted_apis=(key,)))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        code, _ = rpc_error(lambda: list(stub.ModelStreamInfer(iter([infer_request(features(1))]))))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        replies = list(
            stub.ModelStreamInfer(
                iter([infer_request(features(1))]), metadata=(("x-api-key", "s3cr3t-value"),)
            )
        )
        assert len(replies) == 1 and not replies[0].error_message
    with tc.InferenceServerClient(server.address) as client:
        code, _ = code_of(lambda: client.infer("m", [infer_input(features(1))]))
        assert code == "UNAUTHENTICATED"
        headers = {"x-api-key": "s3cr3t-value"}
        result = client.infer("m", [infer_input(features(1))], headers=headers)
        assert result.as_numpy("probs").shape == (1, 4)
    assert all("s3cr3t-value" not in r.getMessage() for r in caplog.records)
    assert "s3cr3t-value" not in repr(key)


def test_every_rpc_belongs_to_a_group() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert api_group(f"/{service.full_name}/{method.name}") is not None, method.name
    assert api_group("/grpc.health.v1.Health/Check") is ApiGroup.HEALTH
    assert api_group("/grpc.health.v1.Health/Watch") is ApiGroup.HEALTH
    assert api_group("/inference.GRPCInferenceService/NoSuchMethod") is None


def test_restricted_api_parsing(tmp_path: Path) -> None:
    parsed = RestrictedApi.parse("Inference, statistics:My-Key=abc")
    assert parsed.groups == {ApiGroup.INFERENCE, ApiGroup.STATISTICS}
    assert parsed.header == "my-key" and parsed.value == "abc"
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    assert RestrictedApi.parse(f"health:k=@{key_file}").value == "from-a-file"
    for bad in ("inference", "inference:k", "nope:k=topsecret", "inference:k=",
                "inference:grpc-x=topsecret", "inference:k-bin=topsecret",
                "inference:bad header=topsecret", "inference;k=topsecret"):
        with pytest.raises(ValueError) as info:
            RestrictedApi.parse(bad)
        assert "topsecret" not in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="more than once"):
        SecurityOptions(restricted_apis=(parsed, RestrictedApi.parse("inference:other=x")))


# Limits --------------------------------------------------------------------------------


def test_oversized_message_is_refused_and_the_server_stays_up(
    repo: Path, start_server: StartServer
) -> None:
    server = start_server(repo, max_message_bytes=64 * 1024)
    with tc.InferenceServerClient(server.address) as client:
        big = features(32)
        big = np.repeat(big, 40, axis=1)  # 32 x 640 FP32: 80 KiB
        tensor = tc.InferInput("x", list(big.shape), "FP32")
        tensor.set_data_from_numpy(big)
        code, _ = code_of(lambda: client.infer("m", [tensor]))
        assert code == "RESOURCE_EXHAUSTED"
        assert client.infer("m", [infer_input(features(2))]).as_numpy("probs").shape == (2, 4)


@pytest.mark.parametrize(
    ("limits", "rows", "flag"),
    [
        ({"max_tensor_bytes": 1024}, 20, "--max-tensor-bytes"),  # 20 x 16 x 4 = 1280 bytes
        ({"max_tensor_elements": 100}, 8, "--max-tensor-elements"),  # 128 elements
    ],
)
def test_oversized_tensor_is_refused_and_the_server_stays_up(
    repo: Path, start_server: StartServer, limits: dict[str, int], rows: int, flag: str
) -> None:
    server = start_server(repo, security=SecurityOptions(**limits))  # type: ignore[arg-type]
    with tc.InferenceServerClient(server.address) as client:
        code, message = code_of(lambda: client.infer("m", [infer_input(features(rows))]))
        assert code == "INVALID_ARGUMENT"
        assert "'x'" in message and flag in message
        assert client.infer("m", [infer_input(features(2))]).as_numpy("probs").shape == (2, 4)


def test_max_concurrent_rpcs(
    repo: Path, start_server: StartServer, gated: Callable[..., GatedInstance]
) -> None:
    server, gate = one_place_server(repo, start_server, gated)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = stub.ModelInfer.future(infer_request(features(1)), timeout=30)
        assert gate.entered.acquire(timeout=30)
        code, _ = rpc_error(
            lambda: stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.release()
        assert len(held.result().outputs) == 2
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_too_many_keepalive_pings_close_the_connection(
    repo: Path, start_server: StartServer
) -> None:
    """A client that pings an idle stream every 50 ms, against a server that allows one
    ping per 5 minutes and two strikes, is sent away (GOAWAY too_many_pings)."""
    server = start_server(repo)
    options = [
        ("grpc.keepalive_time_ms", 50),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def idle_requests() -> Iterator[pb.ModelInferRequest]:
            # hold the stream open, sending nothing, until the connection is closed
            channel_closed.wait(30)
            return
            yield  # pragma: no cover

        channel_closed = threading.Event()
        try:
            code, message = rpc_error(
                lambda: list(stub.ModelStreamInfer(idle_requests(), timeout=20))
            )
        finally:
            channel_closed.set()
        assert code == grpc.StatusCode.UNAVAILABLE, message
        assert "ping" in message.lower()
    with tc.InferenceServerClient(server.address) as client:
        assert client.is_server_live()


def test_grpc_options_carry_the_limits() -> None:
    options = dict(
        SecurityOptions(
            max_concurrent_streams=7, min_ping_interval_s=2.5, max_ping_strikes=3,
            keepalive_permit_without_calls=True,
        ).grpc_options()
    )
    assert options == {
        "grpc.max_concurrent_streams": 7,
        "grpc.http2.min_ping_interval_without_data_ms": 2500,
        "grpc.http2.max_ping_strikes": 3,
        "grpc.keepalive_permit_without_calls": 1,
    }
    with pytest.raises(ValueError, match="max concurrent streams"):
        SecurityOptions(max_concurrent_streams=0)
    limits = SecurityOptions().tensor_limits(max_message_bytes=1234)
    assert limits.max_bytes == 1234


# Errors leak nothing ----------------------------------------------------------------------


def test_load_failures_show_no_absolute_paths(
    repo: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    (repo / "corrupt" / "1").mkdir(parents=True)
    (repo / "corrupt" / "1" / "model.onnx").write_bytes(b"not an ONNX model")
    (repo / "empty").mkdir()
    caplog.set_level(logging.ERROR)
    server = start_server(repo, security=EXPLICIT)
    with tc.InferenceServerClient(server.address) as client:
        for name in ("corrupt", "empty"):
            code, message = code_of(lambda name=name: client.load_model(name))
            assert code == "INVALID_ARGUMENT", message
            assert str(repo) not in message and "/tmp" not in message, message
        index = {m.name: m.reason for m in client.get_model_repository_index().models}
        assert "corrupt/1/model.onnx" in index["corrupt"] or "model.onnx" in index["corrupt"]
        assert all(str(repo) not in reason for reason in index.values())
        code, message = code_of(lambda: client.infer("corrupt", [infer_input(features(1))]))
        assert code == "UNAVAILABLE" and str(repo) not in message
    # the log keeps the full detail
    assert any(str(repo) in r.getMessage() for r in caplog.records)


def test_public_message() -> None:
    root = Path("/srv/models")
    text = (
        "Load model from /srv/models/m/1/model.onnx failed: open /usr/lib/x.so: "
        "no such file; see '/etc/passwd' (/srv/models)"
    )
    assert public_message(text, root) == (
        "Load model from m/1/model.onnx failed: open <path>: no such file; "
        "see '<path>' (<model repository>)"
    )
    assert public_message("shape [-1, 16] of 'a/b' is fine", root) == (
        "shape [-1, 16] of 'a/b' is fine"
    )


@pytest.mark.asyncio
async def test_unexpected_exceptions_become_internal_without_detail(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def explode(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise ValueError("secret detail at /home/someone/file")

    async def explode_stream(
        request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        yield b"first"
        raise ValueError("secret detail at /home/someone/file")

    handlers = grpc.method_handlers_generic_handler(
        "test.Svc",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(shielded(explode, "/test.Svc/Unary")),
            "Stream": grpc.unary_stream_rpc_method_handler(
                shielded(explode_stream, "/test.Svc/Stream")
            ),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/test.Svc/Unary")(b"x", timeout=10)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in (info.value.details() or "")
            call = channel.unary_stream("/test.Svc/Stream")(b"x", timeout=10)
            assert await call.read() == b"first"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in (info.value.details() or "")
    finally:
        await server.stop(None)
    assert any("secret detail" in (r.exc_text or str(r.exc_info)) for r in caplog.records)


# The command line ---------------------------------------------------------------------------


def parse(*argv: str) -> SecurityOptions:
    return security_options(build_parser().parse_args(["serve", "model.onnx", *argv]))


def test_flags(tmp_path: Path, pki: Pki) -> None:
    defaults = parse()
    assert defaults.tls is None
    assert defaults.model_control.mode is ModelControlMode.NONE
    assert defaults.restricted_apis == ()
    options = parse(
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        "--tls-client-ca", str(pki.ca.cert_path),
        "--model-control-mode", "explicit", "--load-model", "a", "--load-model", "b",
        "--restricted-api", "model-repository:admin-key=k1",
        "--max-tensor-bytes", "4096", "--max-concurrent-streams", "8",
    )
    assert options.tls == TlsFiles(pki.server.cert, pki.server.key, pki.ca.cert_path)
    assert options.model_control.models_at_start() == ("a", "b")
    assert options.restricted_apis[0].groups == {ApiGroup.MODEL_REPOSITORY}
    assert options.max_tensor_bytes == 4096 and options.max_concurrent_streams == 8
    assert parse("--poll-repository", "5").model_control.mode is ModelControlMode.POLL
    for argv, complaint in [
        (("--tls-cert", str(pki.server.cert)), "go together"),
        (("--tls-client-ca", str(pki.ca.cert_path)), "needs --tls-cert"),
        (("--tls-cert", str(tmp_path / "nope"), "--tls-key", str(pki.server.key)), "nope"),
        (("--load-model", "a"), "explicit"),
        (("--model-control-mode", "poll"), "--poll-repository"),
        (("--model-control-mode", "explicit", "--poll-repository", "5"), "exclude"),
        (("--restricted-api", "everything:k=v"), "unknown API group"),
    ]:
        with pytest.raises(ValueError, match=complaint):
            parse(*argv)

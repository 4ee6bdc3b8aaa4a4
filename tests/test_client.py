"""ferry.client, sync and asyncio, against a real server; plus its wire conversions."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from ferry.client import (
    AsyncFerryClient,
    FerryClient,
    FerryClientError,
    ModelMetadata,
    TensorMetadata,
    _convert,
)
from ferry.proto import grpc_service_pb2 as pb
from ferry.server import __version__
from ferry.server.security import ApiGroup, RestrictedApi, SecurityOptions, TlsFiles
from tests.certificates import CertificateAuthority
from tests.conftest import GatedInstance, RunningServer
from tests.models import identity_model, mlp_model

FEATURES = 16
CLASSES = 4
WORDS = np.array(
    [["ferry", b"\x00raw", "", "caf\u00e9"], [b"dock", "x" * 300, "b", "c"]], dtype=object
)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repository")
    mlp_model(repo / "mlp" / "1" / "model.onnx")
    identity_model(repo / "text" / "1" / "model.onnx", "BYTES")
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(repository)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[FerryClient]:
    with FerryClient(server.address) as ferry:
        yield ferry


@pytest.fixture(scope="module")
def reference(repository: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    session = ort.InferenceSession(
        str(repository / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        logits, probs = session.run(["logits", "probs"], {"x": x})
        return {"logits": logits, "probs": probs}

    return run


def features(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def assert_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6)


def expected_words() -> np.ndarray:
    return np.vectorize(lambda w: w.encode() if isinstance(w, str) else w, otypes=[object])(WORDS)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but never listening: connections are refused, and no one else gets it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


MLP_METADATA = ModelMetadata(
    name="mlp",
    versions=("1",),
    platform="onnxruntime_onnx",
    inputs=(TensorMetadata("x", "FP32", (-1, FEATURES)),),
    outputs=(
        TensorMetadata("logits", "FP32", (-1, CLASSES)),
        TensorMetadata("probs", "FP32", (-1, CLASSES)),
    ),
)


# Sync client ----------------------------------------------------------------------


def test_infer_returns_every_output_for_every_row(
    client: FerryClient, reference: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> None:
    x = features(5, seed=1)
    assert_outputs(client.infer("mlp", {"x": x}), reference(x))


def test_infer_of_a_subset_of_outputs(
    client: FerryClient, reference: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> None:
    x = features(3, seed=2)
    got = client.infer("mlp", {"x": x}, ["probs"], request_id="r1", parameters={"tag": "a"})
    assert_outputs(got, {"probs": reference(x)["probs"]})


def test_infer_of_a_named_version(client: FerryClient) -> None:
    got = client.infer("mlp", {"x": features(1, seed=3)}, version="1", timeout=30)
    assert got["logits"].shape == (1, CLASSES)


def test_bytes_round_trip_through_an_identity_model(client: FerryClient) -> None:
    got = client.infer("text", {"INPUT0": WORDS})
    out = got["OUTPUT0"]
    assert out.dtype == object and out.shape == WORDS.shape
    assert out.tolist() == expected_words().tolist()


def test_str_arrays_travel_as_bytes(client: FerryClient) -> None:
    words = np.array([["a", "bb", "ccc", "\u00fc"]])
    got = client.infer("text", {"INPUT0": words})
    assert got["OUTPUT0"].tolist() == [[b"a", b"bb", b"ccc", "\u00fc".encode()]]


def test_health_and_metadata(client: FerryClient) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready("mlp") is True
    assert client.is_model_ready("mlp", "1") is True
    assert client.is_model_ready("nope") is False
    metadata = client.server_metadata()
    assert metadata.name == "ferry" and metadata.version == __version__
    assert isinstance(metadata.extensions, tuple)
    assert client.model_metadata("mlp") == MLP_METADATA


def test_unknown_model_is_not_found(client: FerryClient) -> None:
    with pytest.raises(FerryClientError) as caught:
        client.infer("nope", {"x": features(1, seed=4)})
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "nope" in caught.value.message
    with pytest.raises(FerryClientError) as caught:
        client.model_metadata("nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_wrong_datatype_is_invalid_argument(client: FerryClient) -> None:
    with pytest.raises(FerryClientError) as caught:
        client.infer("mlp", {"x": features(2, seed=5).astype(np.float64)})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "x" in caught.value.message and "FP64" in caught.value.message
    assert str(caught.value).startswith("INVALID_ARGUMENT: ")


def test_unreachable_server_is_unavailable(refused_port: int) -> None:
    ferry = FerryClient(f"127.0.0.1:{refused_port}")
    with ferry, pytest.raises(FerryClientError) as caught:
        ferry.is_server_live(timeout=10)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def held_server(
    start_server: Callable[..., RunningServer], tmp_path: Path, gated: Any
) -> tuple[str, GatedInstance]:
    """A server whose model "held" runs nothing until its gate is released."""
    mlp_model(tmp_path / "held" / "1" / "model.onnx")
    running = start_server(tmp_path, wrap_instance=gated)
    gate: GatedInstance = gated.instances[0]
    gate.hold()
    return running.address, gate


def test_timeout_is_deadline_exceeded(
    start_server: Callable[..., RunningServer], tmp_path: Path, gated: Any
) -> None:
    address, gate = held_server(start_server, tmp_path, gated)
    with FerryClient(address) as ferry:
        with pytest.raises(FerryClientError) as caught:
            ferry.infer("held", {"x": features(1, seed=6)}, timeout=0.3)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.release()
        got = ferry.infer("held", {"x": features(1, seed=6)}, timeout=30)
        assert got["logits"].shape == (1, CLASSES)


def test_client_is_shared_by_threads(
    client: FerryClient, reference: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> None:
    batches = [features(1 + i % 4, seed=100 + i) for i in range(16)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda x: client.infer("mlp", {"x": x}), batches))
    for x, got in zip(batches, results, strict=True):
        assert_outputs(got, reference(x))


# Asyncio client -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_infer_all_and_subset_concurrently(
    server: RunningServer, reference: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> None:
    batches = [features(1 + i % 3, seed=200 + i) for i in range(8)]
    async with AsyncFerryClient(server.address) as ferry:
        everything = await asyncio.gather(*(ferry.infer("mlp", {"x": x}) for x in batches))
        subsets = await asyncio.gather(
            *(ferry.infer("mlp", {"x": x}, ["logits"], timeout=30) for x in batches)
        )
    for x, got, subset in zip(batches, everything, subsets, strict=True):
        want = reference(x)
        assert_outputs(got, want)
        assert_outputs(subset, {"logits": want["logits"]})


@pytest.mark.asyncio
async def test_async_bytes_health_and_metadata(server: RunningServer) -> None:
    async with AsyncFerryClient(server.address) as ferry:
        got = await ferry.infer("text", {"INPUT0": WORDS})
        assert got["OUTPUT0"].tolist() == expected_words().tolist()
        assert await ferry.is_server_live() is True
        assert await ferry.is_server_ready() is True
        assert await ferry.is_model_ready("text") is True
        assert await ferry.is_model_ready("nope") is False
        assert (await ferry.server_metadata()).version == __version__
        assert await ferry.model_metadata("mlp", "1") == MLP_METADATA


@pytest.mark.asyncio
async def test_async_errors_carry_code_and_message(server: RunningServer) -> None:
    async with AsyncFerryClient(server.address) as ferry:
        with pytest.raises(FerryClientError) as caught:
            await ferry.infer("nope", {"x": features(1, seed=7)})
        assert caught.value.code == grpc.StatusCode.NOT_FOUND and "nope" in caught.value.message
        with pytest.raises(FerryClientError) as caught:
            await ferry.infer("mlp", {"x": features(1, seed=7)[:, :3]})
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "x" in caught.value.message


@pytest.mark.asyncio
async def test_async_unreachable_server_is_unavailable(refused_port: int) -> None:
    async with AsyncFerryClient(f"127.0.0.1:{refused_port}") as ferry:
        with pytest.raises(FerryClientError) as caught:
            await ferry.is_server_ready(timeout=10)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_async_timeout_is_deadline_exceeded(
    start_server: Callable[..., RunningServer], tmp_path: Path, gated: Any
) -> None:
    address, gate = held_server(start_server, tmp_path, gated)
    async with AsyncFerryClient(address) as ferry:
        with pytest.raises(FerryClientError) as caught:
            await ferry.infer("held", {"x": features(2, seed=8)}, timeout=0.3)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.release()
        got = await ferry.infer("held", {"x": features(2, seed=8)}, timeout=30)
        assert got["probs"].shape == (2, CLASSES)


# TLS and headers ------------------------------------------------------------------

KEY_HEADER = "x-ferry-key"


@pytest.fixture
def guarded(tmp_path: Path, start_server: Callable[..., RunningServer]) -> dict[str, Any]:
    """Mutual TLS, and inference restricted to callers that send KEY_HEADER."""
    ca = CertificateAuthority(tmp_path / "pki", "client-test-ca")
    server_identity = ca.issue("server", server=True)
    client_identity = ca.issue("client", server=False)
    mlp_model(tmp_path / "repo" / "mlp" / "1" / "model.onnx")
    security = SecurityOptions(
        tls=TlsFiles(server_identity.cert, server_identity.key, client_ca=ca.cert_path),
        restricted_apis=(RestrictedApi(frozenset([ApiGroup.INFERENCE]), KEY_HEADER, "s3cret"),),
    )
    running = start_server(tmp_path / "repo", security=security)
    return {
        "url": running.address,
        "root_certificates": ca.cert_path.read_bytes(),
        "private_key": client_identity.key.read_bytes(),
        "certificate_chain": client_identity.cert.read_bytes(),
    }


def test_tls_client_certificate_and_headers(guarded: dict[str, Any]) -> None:
    x = features(2, seed=9)
    with FerryClient(**guarded, headers={KEY_HEADER: "s3cret"}) as ferry:
        assert ferry.infer("mlp", {"x": x})["probs"].shape == (2, CLASSES)
    with FerryClient(**guarded) as keyless:
        assert keyless.is_server_live()  # health is not restricted
        with pytest.raises(FerryClientError) as caught:
            keyless.infer("mlp", {"x": x})
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert KEY_HEADER in caught.value.message
    with FerryClient(guarded["url"]) as plain, pytest.raises(FerryClientError) as caught:
        plain.is_server_live(timeout=10)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_async_tls_client_certificate_and_headers(guarded: dict[str, Any]) -> None:
    async with AsyncFerryClient(**guarded, headers={KEY_HEADER: "s3cret"}) as ferry:
        got = await ferry.infer("mlp", {"x": features(3, seed=10)})
        assert got["logits"].shape == (3, CLASSES)
    anonymous = {k: guarded[k] for k in ("url", "root_certificates")}
    async with AsyncFerryClient(**anonymous, headers={KEY_HEADER: "s3cret"}) as ferry:
        with pytest.raises(FerryClientError) as caught:
            await ferry.is_server_live(timeout=10)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE  # mutual TLS refuses it


def test_half_a_client_identity_is_refused() -> None:
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        FerryClient("127.0.0.1:1", private_key=b"key")


# Conversions ----------------------------------------------------------------------


def test_request_uses_the_raw_encoding_and_typed_parameters() -> None:
    x = np.arange(6, dtype=">f4").reshape(2, 3)  # big-endian in, little-endian on the wire
    request = _convert.infer_request(
        "m",
        {"x": x, "flags": np.array([True, False])},
        ["y"],
        version="3",
        request_id="abc",
        parameters={"flag": True, "priority": 2, "ratio": 0.5, "name": "n"},
    )
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "abc")
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
        ("x", "FP32", [2, 3]),
        ("flags", "BOOL", [2]),
    ]
    assert request.raw_input_contents[0] == np.arange(6, dtype="<f4").tobytes()
    assert request.raw_input_contents[1] == b"\x01\x00"
    assert [o.name for o in request.outputs] == ["y"]
    kinds = {k: v.WhichOneof("parameter_choice") for k, v in request.parameters.items()}
    assert kinds == {
        "flag": "bool_param",
        "priority": "int64_param",
        "ratio": "double_param",
        "name": "string_param",
    }


def test_request_rejects_what_the_protocol_cannot_carry() -> None:
    with pytest.raises(TypeError, match='input "z"'):
        _convert.infer_request(
            "m", {"z": np.array([1j])}, None, version="", request_id="", parameters=None
        )
    with pytest.raises(TypeError, match="parameter value"):
        _convert.infer_request(
            "m", {}, None, version="", request_id="", parameters={"p": [1]}  # type: ignore[dict-item]
        )


def test_typed_contents_in_a_response_are_decoded() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="a", datatype="INT16", shape=[2, 2]).contents.int_contents.extend(
        [1, -2, 3, -4]
    )
    response.outputs.add(name="s", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [b"x", b"yz"]
    )
    got = _convert.infer_outputs(response)
    assert got["a"].dtype == np.int16 and got["a"].tolist() == [[1, -2], [3, -4]]
    assert got["s"].tolist() == [b"x", b"yz"]


def test_malformed_responses_raise_client_errors() -> None:
    short = pb.ModelInferResponse(raw_output_contents=[b"\x00" * 3])
    short.outputs.add(name="y", datatype="FP32", shape=[1])
    mismatched = pb.ModelInferResponse()
    mismatched.outputs.add(name="y", datatype="FP32", shape=[3]).contents.fp32_contents.append(1)
    half = pb.ModelInferResponse()
    half.outputs.add(name="h", datatype="FP16", shape=[1])
    cases = ((short, "expected 4 bytes"), (mismatched, "1 elements"), (half, "FP16"))
    for response, words in cases:
        with pytest.raises(FerryClientError, match=words) as caught:
            _convert.infer_outputs(response)
        assert caught.value.code == grpc.StatusCode.INTERNAL

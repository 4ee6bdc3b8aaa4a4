"""The REST binding through its real port, read by independent clients: tritonclient.http
(sync and asyncio) and plain HTTP (urllib), next to gRPC on the same server."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc_grpc
import tritonclient.http as tc_http
import tritonclient.http.aio as tc_http_aio
from tritonclient.utils import InferenceServerException

from ferry.server.repository import ModelControl, ModelControlMode
from ferry.server.security import ApiGroup, RestrictedApi, SecurityOptions, TlsFiles
from tests.certificates import CertificateAuthority
from tests.conftest import EXPLICIT_MODEL_CONTROL, GatedInstance, RunningServer
from tests.models import mlp_model, write_config
from tests.test_datatypes import (
    DATATYPES,
    assert_identical,
    identity_repository,
    model_name,
    sample,
)
from tests.waiting import wait_until

StartServer = Callable[..., RunningServer]
SHAPE = (3, 4)


def features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def http(
    server: RunningServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request; returns status, headers and body whatever the status."""
    request = urllib.request.Request(
        f"http://{server.http_address}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def post_json(server: RunningServer, path: str, value: Any) -> tuple[int, Any]:
    status, _, body = http(server, "POST", path, json.dumps(value).encode())
    return status, json.loads(body) if body else None


def http_client(server: RunningServer, **kwargs: Any) -> tc_http.InferenceServerClient:
    return tc_http.InferenceServerClient(server.http_address, **kwargs)


def infer_alone(server: RunningServer, x: np.ndarray, **kwargs: Any) -> np.ndarray:
    """One inference on a client of its own: tritonclient.http's sync client runs on gevent,
    whose connections must not be shared between threads."""
    with http_client(server) as client:
        result = client.infer("m", [mlp_input(x)], **kwargs).as_numpy("probs")
    assert result is not None
    return result


def mlp_input(x: np.ndarray, binary: bool = True) -> tc_http.InferInput:
    tensor = tc_http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    return tmp_path / "repo"


# Health, metadata, config ------------------------------------------------------------


def test_health_metadata_and_config_match_grpc(repo: Path, start_server: StartServer) -> None:
    server = start_server(repo)
    with http_client(server) as client, tc_grpc.InferenceServerClient(server.address) as grpc:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("m") and client.is_model_ready("m", "1")
        assert not client.is_model_ready("absent")
        meta = client.get_server_metadata()
        assert meta["name"] == "ferry" and "model_repository" in meta["extensions"]
        model = client.get_model_metadata("m")
        grpc_model = grpc.get_model_metadata("m", as_json=True)
        assert model["versions"] == grpc_model["versions"] == ["1"]
        assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
            (t["name"], t["datatype"], [int(d) for d in t["shape"]])
            for t in grpc_model["inputs"]
        ]
        assert client.get_model_metadata("m", "1")["name"] == "m"
        config = client.get_model_config("m")
        assert config["name"] == "m"
        assert config["max_batch_size"] == grpc.get_model_config("m").config.max_batch_size
        # 64-bit integers are JSON numbers, as Triton writes them (perf_analyzer reads them)
        assert config["input"][0]["dims"] == [16]
    status, _, body = http(server, "GET", "/v2/health/ready")
    assert (status, body) == (200, b"")


# Inference: every datatype, JSON and binary ----------------------------------------


@pytest.fixture(scope="module")
def typed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = RunningServer(identity_repository(tmp_path_factory.mktemp("repository")))
    yield running
    running.close()


def json_sample(datatype: str) -> np.ndarray:
    """As `sample`, but finite: JSON has no NaN or infinity."""
    array = sample(datatype)
    if array.dtype.kind == "f":
        array = np.nan_to_num(array, nan=0.5, posinf=2.0, neginf=-2.0)
    if datatype == "BYTES":  # tritonclient sends JSON strings as UTF-8 text
        array = np.array([t.decode() for t in array.ravel()], dtype=object).reshape(SHAPE)
    return array


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips(
    typed_server: RunningServer, datatype: str, binary: bool
) -> None:
    array = sample(datatype) if binary else json_sample(datatype)
    tensor = tc_http.InferInput("INPUT0", list(SHAPE), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    wanted = tc_http.InferRequestedOutput("OUTPUT0", binary_data=binary)
    with http_client(typed_server) as client:
        result = client.infer(model_name(datatype), [tensor], outputs=[wanted])
    output = result.get_output("OUTPUT0")
    assert output["datatype"] == datatype and output["shape"] == list(SHAPE)
    assert ("data" in output) is not binary
    got = result.as_numpy("OUTPUT0")
    if datatype == "BYTES":
        expected = [t.encode() if isinstance(t, str) else t for t in array.ravel()]
        assert [v if isinstance(v, bytes) else str(v).encode() for v in got.ravel()] == expected
    elif datatype == "FP16" and not binary:
        np.testing.assert_array_equal(got.astype(np.float16), array)
    else:
        assert_identical(got.astype(array.dtype) if not binary else got, array)


def test_nested_json_data_scalars_and_request_id(typed_server: RunningServer) -> None:
    nested = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    status, body = post_json(typed_server, "/v2/models/identity_int32/infer", {
        "id": "abc",
        "inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [3, 4], "data": nested}],
    })
    assert status == 200, body
    assert body["id"] == "abc" and body["model_name"] == "identity_int32"
    assert body["model_version"] == "1"
    assert body["outputs"] == [
        {"name": "OUTPUT0", "datatype": "INT32", "shape": [3, 4], "data": list(range(1, 13))}
    ]


def test_binary_inputs_with_json_outputs_and_the_header_length(repo: Path,
                                                               start_server: StartServer) -> None:
    server = start_server(repo)
    x = features(2)
    header = json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 16],
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "probs", "parameters": {"binary_data": False}},
                    {"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()
    status, headers, body = http(server, "POST", "/v2/models/m/infer", header + x.tobytes(),
                                 {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, body
    json_length = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:json_length])
    probs, logits = answer["outputs"]
    assert probs["name"] == "probs" and len(probs["data"]) == 8
    assert logits["parameters"]["binary_data_size"] == len(body) - json_length == 2 * 4 * 4
    with tc_grpc.InferenceServerClient(server.address) as grpc:
        tensor = tc_grpc.InferInput("x", [2, 16], "FP32")
        tensor.set_data_from_numpy(x)
        expected = grpc.infer("m", [tensor])
    np.testing.assert_array_equal(
        np.frombuffer(body[json_length:], dtype="<f4").reshape(2, 4),
        expected.as_numpy("logits"),
    )
    np.testing.assert_allclose(np.array(probs["data"]).reshape(2, 4), expected.as_numpy("probs"))


def test_asyncio_client(repo: Path, start_server: StartServer) -> None:
    server = start_server(repo)

    async def use() -> list[np.ndarray]:
        client = tc_http_aio.InferenceServerClient(server.http_address)
        try:
            assert await client.is_server_ready()
            assert (await client.get_model_metadata("m"))["name"] == "m"
            results = await asyncio.gather(
                *(client.infer("m", [mlp_input(features(1, seed))]) for seed in range(8))
            )
            stats = await client.get_inference_statistics("m")
            assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 8
            return [r.as_numpy("probs") for r in results]
        finally:
            await client.close()

    probs = asyncio.run(use())
    assert [p.shape for p in probs] == [(1, 4)] * 8


# Errors: the gRPC path's messages, with Triton's HTTP status ---------------------------


def rest_error(call: Callable[[], object]) -> tuple[str | None, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def grpc_error(call: Callable[[], object]) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.message())


def test_errors_carry_the_grpc_message_and_an_http_status(
    repo: Path, start_server: StartServer
) -> None:
    server = start_server(repo)
    bad = features(2)[:, :15]
    with http_client(server) as client, tc_grpc.InferenceServerClient(server.address) as grpc:
        grpc_bad = tc_grpc.InferInput("x", list(bad.shape), "FP32")
        grpc_bad.set_data_from_numpy(bad)
        for binary in (True, False):
            status, message = rest_error(lambda b=binary: client.infer("m", [mlp_input(bad, b)]))
            assert status == "400"
            assert message == grpc_error(lambda: grpc.infer("m", [grpc_bad]))
            assert "input 'x'" in message and "[-1, 16]" in message
        status, message = rest_error(lambda: client.infer("nope", [mlp_input(features(1))]))
        assert (status, message) == ("404", "unknown model 'nope'")
        status, message = rest_error(lambda: client.infer("m", [mlp_input(features(1))],
                                                          model_version="7"))
        assert status == "404" and "has no version '7'" in message
        status, message = rest_error(lambda: client.get_model_metadata("nope"))
        assert status == "404"
        status, message = rest_error(lambda: client.load_model("m"))
        assert status == "403" and "--model-control-mode=explicit" in message

    cases: list[tuple[bytes, str]] = [
        (b"{not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"inputs": []}', "'inputs' must be a non-empty list"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16]}]}',
         "neither 'data' nor binary_data_size"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                 "data": [1] * 15}]}).encode(),
         "input 'x' FP32 [1, 16]: expected 16 values in 'data', got 15"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                 "data": ["a"] * 16}]}).encode(),
         "input 'x' is FP32: 'data' must hold numbers, got strings"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                 "data": [[1, 2], [3]]}]}).encode(),
         "expected 1 row of 16 values in 'data' (nested as the shape) or 16 values (flat), "
         "got 2 rows"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2],
                                 "data": [[1, 2], [3]]}]}).encode(),
         "'data' is not a regular array"),
        # 800 small lists where 16 numbers belong: refused before numpy walks them
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                 "data": [[[]]] * 800}]}).encode(),
         "expected 1 row of 16 values in 'data' (nested as the shape) or 16 values (flat), "
         "got 800 rows"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": ["1", 16],
                                 "data": [1] * 16}]}).encode(),
         "'shape' must be a list of integers"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1, 16],
                                 "data": [300] * 16}]}).encode(),
         "input 'x': expected FP32 [-1, 16], got INT8 [1, 16]"),  # before its values
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                 "data": [1] * 16}],
                     "outputs": [{"name": "nope"}]}).encode(),
         "unknown output 'nope'"),
        (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                 "parameters": {"binary_data_size": 64}}]}).encode(),
         "binary_data_size 64 does not fit"),
    ]
    for body, fragment in cases:
        status, _, answer = http(server, "POST", "/v2/models/m/infer", body)
        assert status == 400, (body, answer)
        assert fragment in json.loads(answer)["error"], (body, answer)
    status, _, answer = http(server, "GET", "/v3/anything")
    assert status == 404 and "no endpoint GET /v3/anything" in json.loads(answer)["error"]


def test_a_body_over_the_message_limit_is_refused(repo: Path, start_server: StartServer) -> None:
    server = start_server(repo, max_message_bytes=4096)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [64, 16],
                                   "data": [0.25] * 1024}]}).encode()
    status, _, answer = http(server, "POST", "/v2/models/m/infer", body)
    assert status == 413
    assert "larger than 4096 bytes" in json.loads(answer)["error"]
    # The limit holds for the decompressed body: a small gzip bomb is refused the same way.
    bomb = gzip.compress(b'{"inputs": [' + b" " * 3_000_000 + b"]}")
    assert len(bomb) < 4096
    status, _, answer = http(server, "POST", "/v2/models/m/infer", bomb,
                             {"Content-Encoding": "gzip"})
    assert status == 413
    x = features(1)
    with http_client(server) as client:  # the server still serves, compressed requests too
        result = client.infer("m", [mlp_input(x)], request_compression_algorithm="gzip")
        assert result.as_numpy("probs").shape == (1, 4)


def test_json_is_bounded_tighter_than_binary_data(repo: Path, start_server: StartServer) -> None:
    """JSON costs many times its size to decode, so it gets 1/16 of the message limit
    (here 64 KiB of 1 MiB); binary tensors get all of it."""
    server = start_server(repo, max_message_bytes=1 << 20)
    rows = 2048  # 128 KiB of FP32, over the JSON limit, well under the message limit
    data = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 16],
                                   "data": [0.25] * rows * 16}]}).encode()
    status, _, answer = http(server, "POST", "/v2/models/m/infer", data)
    assert status == 413
    assert "send large tensors as binary data" in json.loads(answer)["error"]
    x = features(rows)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 16],
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    status, _, answer = http(server, "POST", "/v2/models/m/infer", header + x.tobytes(),
                             {"Inference-Header-Content-Length": str(len(header))})
    # past the size limits: what stops it now is the model's max_batch_size
    assert status == 400 and "batch size 2048" in json.loads(answer)["error"], answer
    status, _, _ = http(server, "POST", "/v2/repository/index", b" " * (100 * 1024))
    assert status == 413


def test_a_full_queue_answers_503(
    tmp_path: Path, start_server: StartServer, gated: Callable[..., GatedInstance]
) -> None:
    folder = tmp_path / "repo" / "m"
    mlp_model(folder / "1" / "model.onnx")
    write_config(folder, "max_batch_size: 1\ndynamic_batching { default_queue_policy "
                 "{ max_queue_size: 1 } }\n")
    server = start_server(tmp_path / "repo", wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    gate.hold()
    with ThreadPoolExecutor(2) as pool, http_client(server) as client:
        running = pool.submit(infer_alone, server, features(1))
        try:
            assert gate.entered.acquire(timeout=30)
            queued = pool.submit(infer_alone, server, features(1))
            wait_until(lambda: server.server.manager.get("m").scheduler.queue_depth == 1,
                       what="a request waiting in the queue")
            status, message = rest_error(lambda: client.infer("m", [mlp_input(features(1))]))
        finally:
            gate.release()
        assert status == "503" and "queue" in message
        assert running.result(30).shape == (1, 4)
        assert queued.result(30).shape == (1, 4)


# Statistics, repository control --------------------------------------------------------


def test_statistics_and_explicit_load_unload(repo: Path, start_server: StartServer) -> None:
    mlp_model(repo / "other" / "1" / "model.onnx")
    server = start_server(repo, security=SecurityOptions(
        model_control=ModelControl(ModelControlMode.EXPLICIT, ("m",))
    ))
    with http_client(server) as client:
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert index["m"]["state"] == "READY" and index["other"]["state"] != "READY"
        assert not client.is_model_ready("other")
        client.load_model("other")
        assert client.is_model_ready("other")
        for rows in (1, 2, 3):
            client.infer("other", [mlp_input(features(rows))])
        stats = client.get_inference_statistics("other")["model_stats"]
        assert len(stats) == 1
        entry = stats[0]
        assert (entry["name"], entry["version"]) == ("other", "1")
        assert entry["inference_count"] == 6
        assert entry["inference_stats"]["success"]["count"] == 3
        assert isinstance(entry["inference_stats"]["success"]["ns"], int)
        every = client.get_inference_statistics()["model_stats"]
        assert {e["name"] for e in every} == {"m", "other"}
        client.unload_model("other")
        assert not client.is_model_ready("other")
        status, message = rest_error(lambda: client.unload_model("other"))
        assert status == "404" and "is not loaded" in message
        ready = client.get_model_repository_index()
        assert {e["name"] for e in ready if e["state"] == "READY"} == {"m"}


def test_statistics_of_a_model_cover_every_version(
    repo: Path, start_server: StartServer
) -> None:
    """As in Triton (and the gRPC call): a model's /stats without a version lists each
    of its versions; a version that is not a whole number is 400, one not loaded 404."""
    mlp_model(repo / "v" / "1" / "model.onnx")
    mlp_model(repo / "v" / "2" / "model.onnx", seed=2)
    write_config(repo / "v", "version_policy: { all: {} }\n")
    server = start_server(repo)
    with http_client(server) as client:
        stats = client.get_inference_statistics("v")["model_stats"]
        assert sorted((e["name"], e["version"]) for e in stats) == [("v", "1"), ("v", "2")]
        stats = client.get_inference_statistics("v", model_version="02")["model_stats"]
        assert [(e["name"], e["version"]) for e in stats] == [("v", "2")]
        status, message = rest_error(lambda: client.get_inference_statistics("v", "x1"))
        assert status == "400" and "version 'x1' is not a whole number" in message, message
        status, message = rest_error(lambda: client.get_inference_statistics("v", "3"))
        assert status == "404" and "no version '3'" in message, message


def test_load_with_a_config_override(repo: Path, start_server: StartServer) -> None:
    server = start_server(repo, security=SecurityOptions(
        model_control=ModelControl(ModelControlMode.EXPLICIT, ("*",), True)
    ))
    with http_client(server) as client:
        client.load_model("m", config=json.dumps({"max_batch_size": 4}))
        assert client.get_model_config("m")["max_batch_size"] == 4
    assert EXPLICIT_MODEL_CONTROL.model_control.mode is ModelControlMode.EXPLICIT


# One queue for both front doors ---------------------------------------------------------


def test_rest_and_grpc_requests_share_batches(
    tmp_path: Path, start_server: StartServer, gated: Callable[..., GatedInstance]
) -> None:
    folder = tmp_path / "repo" / "m"
    mlp_model(folder / "1" / "model.onnx")
    write_config(folder, "max_batch_size: 16\ndynamic_batching { }\n")
    server = start_server(tmp_path / "repo", wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    gate.hold()
    callers = 4
    with (
        ThreadPoolExecutor(2 * callers + 1) as pool,
        tc_grpc.InferenceServerClient(server.address) as grpc,
    ):
        first = pool.submit(infer_alone, server, features(1, 99))
        assert gate.entered.acquire(timeout=30)  # the model is busy: the others queue up

        def grpc_call(seed: int) -> np.ndarray:
            tensor = tc_grpc.InferInput("x", [1, 16], "FP32")
            tensor.set_data_from_numpy(features(1, seed))
            return grpc.infer("m", [tensor]).as_numpy("probs")

        def rest_call(seed: int) -> np.ndarray:
            return infer_alone(server, features(1, seed))

        futures = [pool.submit(grpc_call, s) for s in range(callers)]
        futures += [pool.submit(rest_call, s) for s in range(callers)]
        try:
            wait_until(
                lambda: server.server.manager.get("m").scheduler.queue_depth == 2 * callers,
                what="gRPC and REST requests in one queue",
            )
        finally:
            gate.release()
        first.result(30)
        answers = [f.result(30) for f in futures]
    # the same rows give the same answers whichever door they came by
    for seed in range(callers):
        np.testing.assert_array_equal(answers[seed], answers[callers + seed])
    assert gate.batch_rows == [1, 2 * callers]
    with http_client(server) as client:
        stats = client.get_inference_statistics("m")["model_stats"][0]
    assert stats["execution_count"] == 2 and stats["inference_count"] == 2 * callers + 1
    assert [b["batch_size"] for b in stats["batch_stats"]] == [1, 2 * callers]


def test_requests_are_counted_with_their_protocol(
    repo: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ferry.access")
    server = start_server(repo, access_log=True)
    with http_client(server) as client, tc_grpc.InferenceServerClient(server.address) as grpc:
        client.infer("m", [mlp_input(features(1))])
        rest_error(lambda: client.infer("m", [mlp_input(features(1)[:, :3])]))
        tensor = tc_grpc.InferInput("x", [1, 16], "FP32")
        tensor.set_data_from_numpy(features(1))
        grpc.infer("m", [tensor])
    text = server.server.metrics.render().decode()
    assert 'ferry_requests_total{code="OK",model="m",protocol="http"} 1.0' in text
    assert 'ferry_requests_total{code="OK",model="m",protocol="grpc"} 1.0' in text
    assert 'ferry_requests_total{code="INVALID_ARGUMENT",model="m",protocol="http"} 1.0' in text
    lines = [r.getMessage() for r in caplog.records if r.name == "ferry.access"]
    assert [line.split("protocol=")[1].split()[0] for line in lines] == ["http", "http", "grpc"]


# Security and drain --------------------------------------------------------------------


def test_restricted_groups_need_their_key_over_rest(repo: Path, start_server: StartServer) -> None:
    server = start_server(repo, security=SecurityOptions(restricted_apis=(
        RestrictedApi(frozenset({ApiGroup.INFERENCE, ApiGroup.MODEL_CONFIG}), "x-key", "s3cret"),
    )))
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                   "data": [0.5] * 16}]}).encode()
    status, _, answer = http(server, "POST", "/v2/models/m/infer", body)
    assert status == 401
    assert json.loads(answer)["error"] == (
        "the 'inference' API is restricted: send its key in the 'x-key' header"
    )
    status, _, _ = http(server, "POST", "/v2/models/m/infer", body, {"X-Key": "wrong"})
    assert status == 401
    status, _, _ = http(server, "POST", "/v2/models/m/infer", body, {"X-Key": "s3cret"})
    assert status == 200
    assert http(server, "GET", "/v2/models/m/config")[0] == 401
    assert http(server, "GET", "/v2/models/m")[0] == 200  # metadata stays open
    assert http(server, "GET", "/v2/health/ready")[0] == 200
    with http_client(server) as client:
        result = client.infer("m", [mlp_input(features(1))], headers={"x-key": "s3cret"})
        assert result.as_numpy("probs").shape == (1, 4)


def test_tls_applies_to_the_rest_port(repo: Path, start_server: StartServer,
                                      tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki", "ferry-test-ca")
    identity = ca.issue("server", server=True)
    server = start_server(repo, security=SecurityOptions(tls=TlsFiles(identity.cert,
                                                                      identity.key)))
    with tc_http.InferenceServerClient(
        server.http_address, ssl=True,
        ssl_options={"ca_certs": str(ca.cert_path)},
    ) as client:
        assert client.is_server_ready()
        assert client.infer("m", [mlp_input(features(1))]).as_numpy("probs").shape == (1, 4)
    with pytest.raises(Exception):  # noqa: B017 - plain text is not spoken at all
        urllib.request.urlopen(f"http://{server.http_address}/v2/health/live", timeout=10)


def test_drain_answers_503_then_closes_the_port(
    repo: Path, start_server: StartServer, gated: Callable[..., GatedInstance]
) -> None:
    server = start_server(repo, wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    gate.hold()
    with ThreadPoolExecutor(2) as pool, http_client(server) as client:
        accepted = pool.submit(infer_alone, server, features(1))
        assert gate.entered.acquire(timeout=30)
        stopping = threading.Thread(target=lambda: server.call(server.server.stop(grace_s=30)))
        stopping.start()
        wait_until(lambda: not server.server.is_ready(), what="the drain to begin")
        assert http(server, "GET", "/v2/health/ready")[0] == 503
        status, message = rest_error(lambda: client.infer("m", [mlp_input(features(1))]))
        assert status == "503" and "shutting down" in message
        gate.release()
        assert accepted.result(30).shape == (1, 4)
        stopping.join(30)
        assert not stopping.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{server.http_address}/v2/health/live", timeout=10)


def test_timeout_and_priority_parameters_apply_to_rest_requests(
    tmp_path: Path, start_server: StartServer, gated: Callable[..., GatedInstance]
) -> None:
    folder = tmp_path / "repo" / "m"
    mlp_model(folder / "1" / "model.onnx")
    write_config(folder, "max_batch_size: 8\ndynamic_batching { priority_levels: 2 }\n")
    server = start_server(tmp_path / "repo", wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    with http_client(server) as client:
        status, message = rest_error(lambda: client.infer("m", [mlp_input(features(1))],
                                                          priority=5))
        assert status == "400" and "priority 5 is outside 1..2" in message
        gate.hold()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(infer_alone, server, features(1))
            try:
                assert gate.entered.acquire(timeout=30)
                # Waits behind the held batch longer than its 1 ms timeout.
                status, message = rest_error(
                    lambda: client.infer("m", [mlp_input(features(1))], timeout=1000)
                )
            finally:
                gate.release()
            assert running.result(30).shape == (1, 4)
    assert status == "503" and "timed out" in message
    stats = server.server.manager.get("m").stats
    assert stats.fail.count == 2


def test_json_values_out_of_range_of_their_datatype_are_refused() -> None:
    from ferry.server.errors import FerryError
    from ferry.server.rest_codec import parse_infer

    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1, 16],
                                   "data": [300] * 16}]}).encode()
    with pytest.raises(FerryError, match="values out of range for INT8"):
        parse_infer(body, None, "m", "")


def test_binary_inputs_are_read_where_the_body_holds_them_and_outputs_copied_once() -> None:
    """A binary input is a view of the body, not a copy (a 16 MiB input took 2.6 ms of
    the loop in three copies: out of the body, into the protobuf and out of it again);
    a large binary output is copied once, into the answer."""
    from ferry.proto.codec import RAW_VIEW_MIN_BYTES
    from ferry.server.config import ModelSettings, TensorSpec
    from ferry.server.rest_codec import encode_infer, parse_infer
    from ferry.server.tensors import TensorLimits

    settings = ModelSettings(
        "m", 4096, (TensorSpec("x", "FP32", (256,)),), (TensorSpec("y", "FP32", (256,)),)
    )
    values = np.arange(2048 * 256, dtype=np.float32).reshape(2048, 256)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2048, 256],
                                     "parameters": {"binary_data_size": values.nbytes}}],
                         "parameters": {"binary_data_output": True}})
    body = header.encode() + values.tobytes()
    parsed = parse_infer(body, str(len(header)), "m", "", settings, TensorLimits())
    decoded = parsed.decode(settings, TensorLimits()).inputs["x"]
    assert np.array_equal(decoded, values)
    assert decoded.base is body  # numpy keeps the body the view was cut from
    assert not parsed.request.raw_input_contents

    # Big enough to be joined from a view; still the same bytes.
    outputs = {"y": values[: RAW_VIEW_MIN_BYTES // 1024 + 1] * 2}
    payload, header_bytes = encode_infer(parsed, settings, "1", outputs)
    assert header_bytes is not None
    answer = json.loads(payload[:header_bytes])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == outputs["y"].nbytes
    assert payload[header_bytes:] == outputs["y"].tobytes()

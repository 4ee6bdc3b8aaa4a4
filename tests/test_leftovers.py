"""Small defects left from earlier reviews, each through the real port where a client sees
it: booleans among numbers in REST JSON data, the shape of an output of unknown rank, a
retried run counted once, and what stands where a version's model file should be."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc_grpc
from onnx import TensorProto, helper

from ferry.server.binding import BindingPlan, BoundExecutor
from tests.conftest import RunningServer
from tests.models import identity_model, mlp_model

StartServer = Callable[..., RunningServer]


def post(server: RunningServer, path: str, body: object) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://{server.http_address}{path}", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(server: RunningServer, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{server.http_address}{path}", timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


# 1. Booleans among numbers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> Any:
    repo = tmp_path_factory.mktemp("identities")
    for datatype in ("INT8", "FP32", "INT64", "BOOL"):
        identity_model(repo / datatype.lower() / "1" / "model.onnx", datatype, ("batch", "n"))
    server = RunningServer(repo)
    yield server
    server.close()


def infer_body(datatype: str, shape: list[int], data: object, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT0", "datatype": datatype, "shape": shape, "data": data}],
            **extra}


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("INT8", [True, 1, 2, 3]),
        ("INT8", [1, 2, 3, False]),
        ("FP32", [True, 1.5, 2, 3]),
        ("FP32", [[0.5, 1.5], [False, 3.0]]),  # nested as the shape
        ("INT64", [1, 2, 3, True]),
    ],
)
def test_booleans_among_numbers_are_refused_by_name(
    identities: RunningServer, datatype: str, data: list[Any]
) -> None:
    shape = [2, 2] if isinstance(data[0], list) else [1, 4]
    status, answer = post(
        identities, f"/v2/models/{datatype.lower()}/infer", infer_body(datatype, shape, data)
    )
    assert status == 400, answer
    assert "'INPUT0'" in answer["error"] and datatype in answer["error"], answer
    assert "true/false" in answer["error"], answer


def test_booleans_among_many_numbers_are_refused(identities: RunningServer) -> None:
    """Past the size where data is looked over for strings anyway."""
    data: list[Any] = np.linspace(0, 1, 784).tolist()
    data[700] = True
    status, answer = post(identities, "/v2/models/fp32/infer", infer_body("FP32", [1, 784], data))
    assert status == 400, answer
    assert "'INPUT0'" in answer["error"] and "true/false" in answer["error"], answer


def test_numbers_and_booleans_where_they_belong_still_serve(identities: RunningServer) -> None:
    # Words that hold "true", "false" and many a u or f elsewhere in the body do not stand
    # in the way of numbers alone.
    body = infer_body(
        "INT8", [1, 4], [0, 1, 1, 0], id="true false unusual fluff",
        parameters={"binary_data_output": False},
    )
    status, answer = post(identities, "/v2/models/int8/infer", body)
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == [0, 1, 1, 0]
    status, answer = post(
        identities, "/v2/models/bool/infer", infer_body("BOOL", [1, 3], [True, False, True])
    )
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == [True, False, True]
    status, answer = post(
        identities, "/v2/models/fp32/infer", infer_body("FP32", [1, 3], [1, 0.5, 0])
    )
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == [1.0, 0.5, 0.0]


# 2. An output of unknown rank ------------------------------------------------------------


def reshape_model(path: Path) -> Path:
    """x FP32 [4] reshaped by s INT64 [n]: the graph cannot say the output's rank."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("s", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_an_output_of_unknown_rank_is_shown_variable_not_scalar(
    tmp_path: Path, start_server: StartServer
) -> None:
    reshape_model(tmp_path / "reshape" / "1" / "model.onnx")
    server = start_server(tmp_path)
    rest = get(server, "/v2/models/reshape")
    assert rest["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1]}]
    assert rest["inputs"][1]["shape"] == [-1]
    config = get(server, "/v2/models/reshape/config")
    assert config["output"][0]["dims"] == [-1]
    with tc_grpc.InferenceServerClient(server.address) as client:
        metadata = client.get_model_metadata("reshape")
        assert list(metadata.outputs[0].shape) == [-1]
        assert list(client.get_model_config("reshape").config.output[0].dims) == [-1]
        # and it serves outputs of any rank all the same
        x = tc_grpc.InferInput("x", [4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32))
        s = tc_grpc.InferInput("s", [2], "INT64")
        s.set_data_from_numpy(np.array([2, 2], dtype=np.int64))
        result = client.infer("reshape", [x, s])
        np.testing.assert_array_equal(
            result.as_numpy("y"), np.arange(4, dtype=np.float32).reshape(2, 2)
        )


# 3. A retried run counts once ------------------------------------------------------------


class _FailsOnce:
    """A session whose first IO-binding run fails, as one that found the arena full."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.failures = 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run_with_iobinding(self, *args: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("Available memory of 0 is smaller than requested bytes of 64")
        self._session.run_with_iobinding(*args)


@pytest.mark.parametrize("rows", [3, 4])  # padded to a bucket, and a lone request bound as is
def test_a_retried_run_counts_its_batch_and_padding_once(tmp_path: Path, rows: int) -> None:
    session = ort.InferenceSession(
        str(mlp_model(tmp_path / "mlp.onnx")), providers=["CPUExecutionProvider"]
    )
    executor = BoundExecutor(_FailsOnce(session), ort, BindingPlan(max_rows=8, buckets=(4, 8)))
    parts = [{"x": np.ones((rows, 16), dtype=np.float32)}]
    with pytest.raises(RuntimeError):
        executor.run(parts, rows, ["probs"])
    outputs, padded = executor.run(parts, rows, ["probs"])  # what _with_room does next
    assert outputs["probs"].shape == (rows, 4) and padded == 4 - rows
    counters = executor.counters
    assert (counters.batches, counters.padded_rows) == (1, 4 - rows)
    assert counters.direct_batches == (1 if rows == 4 else 0)


# 4. What stands where the model file should be --------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_model_file_that_is_not_a_file_is_named(
    tmp_path: Path, start_server: StartServer, kind: str
) -> None:
    mlp_model(tmp_path / "good" / "1" / "model.onnx")
    where = tmp_path / "odd" / "1" / "model.onnx"
    where.parent.mkdir(parents=True)
    if kind == "directory":
        where.mkdir()
    else:
        os.mkfifo(where)
    server = start_server(tmp_path)
    with tc_grpc.InferenceServerClient(server.address) as client:
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["good"].state == "READY"
        assert index["odd"].state == "UNAVAILABLE"
        expected = "a directory" if kind == "directory" else "a FIFO"
        assert f"1/model.onnx is {expected}, not a file" in index["odd"].reason, index["odd"]

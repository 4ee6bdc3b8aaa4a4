"""A request whose inputs came as typed `contents` (what a person sends with grpcurl or ghz's
JSON) is answered in typed contents too, readable as plain JSON; raw requests stay raw."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton

from tests.conftest import RunningServer
from tests.external_tools import REPO, require_tool
from tests.models import identity_model

EXAMPLE = REPO / "examples" / "model_repository"
SAMPLES = json.loads((REPO / "examples" / "digits_samples.json").read_text())


def grpcurl(address: str, request: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [require_tool("grpcurl"), "-plaintext", "-d", json.dumps(request), address,
         "inference.GRPCInferenceService/ModelInfer"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_grpcurl_gets_typed_answers_that_match_the_raw_ones(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(EXAMPLE)
    pixels = [float(v) for v in SAMPLES["pixels"][0]]
    answer = grpcurl(server.address, {
        "model_name": "digits",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64],
                    "contents": {"fp32_contents": pixels}}],
    })  # fmt: skip
    assert "raw_output_contents" not in answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    label = [int(v) for v in outputs["label"]["contents"]["int64_contents"]]
    probabilities = outputs["probabilities"]["contents"]["fp32_contents"]
    assert label == [SAMPLES["labels"][0]]
    assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-4

    # The same pixels sent raw (tritonclient) come back raw, with the same values.
    client = triton.InferenceServerClient(server.address)
    tensor = triton.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.array([pixels], dtype=np.float32))
    raw = client.infer("digits", [tensor])
    assert raw.get_response().raw_output_contents
    assert raw.as_numpy("label").tolist() == label
    np.testing.assert_allclose(raw.as_numpy("probabilities")[0], probabilities, rtol=1e-6)


def test_typed_bytes_come_back_typed(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    identity_model(tmp_path / "echo" / "1" / "model.onnx", "BYTES", ("batch", 2))
    server = start_server(tmp_path)
    sent = [base64.b64encode(text.encode()).decode() for text in ("ferry", "dock")]
    answer = grpcurl(server.address, {
        "model_name": "echo",
        "inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 2],
                    "contents": {"bytes_contents": sent}}],
    })  # fmt: skip
    (output,) = answer["outputs"]
    assert output["shape"] == ["1", "2"]
    assert output["contents"]["bytes_contents"] == sent

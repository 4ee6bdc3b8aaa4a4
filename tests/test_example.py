"""The bundled example: the committed digits model serves, its client script reports the
accuracy, and the training script still produces the model that is committed."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc

from ferry.client import FerryClient, ModelMetadata, TensorMetadata
from tests.conftest import RunningServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REPOSITORY = EXAMPLES / "model_repository"
MODEL = REPOSITORY / "digits" / "1" / "model.onnx"
SUBPROCESS_TIMEOUT_S = 90
# How far a model retrained on another machine may differ from the committed one, per class
# probability (README: "The example's client script").
PROBABILITY_ATOL = 1e-3


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = RunningServer(REPOSITORY)
    yield running
    running.close()


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    data = json.loads((EXAMPLES / "digits_samples.json").read_text())
    return {
        "pixels": np.array(data["pixels"], dtype=np.float32),
        "labels": np.array(data["labels"], dtype=np.int64),
    }


def signature(path: Path) -> list[tuple[str, int, list[int | str]]]:
    """Name, element type and shape of every graph input and output."""
    graph = onnx.load(str(path)).graph
    return [
        (
            t.name,
            t.type.tensor_type.elem_type,
            [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim],
        )
        for t in (*graph.input, *graph.output)
    ]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def test_committed_model_is_small_and_has_the_documented_signature() -> None:
    assert MODEL.stat().st_size < 1024 * 1024
    assert signature(MODEL) == [
        ("pixels", onnx.TensorProto.FLOAT, ["batch", 64]),
        ("label", onnx.TensorProto.INT64, ["batch"]),
        ("probabilities", onnx.TensorProto.FLOAT, ["batch", 10]),
    ]


def test_example_repository_serves_the_digits_model(server: RunningServer) -> None:
    with FerryClient(server.address) as client:
        assert client.is_model_ready("digits")
        assert client.model_metadata("digits") == ModelMetadata(
            name="digits",
            versions=("1",),
            platform="onnxruntime_onnx",
            inputs=(TensorMetadata("pixels", "FP32", (-1, 64)),),
            outputs=(
                TensorMetadata("label", "INT64", (-1,)),
                TensorMetadata("probabilities", "FP32", (-1, 10)),
            ),
        )
    triton = tc.InferenceServerClient(server.address)
    try:
        config = triton.get_model_config("digits").config
    finally:
        triton.close()
    assert config.max_batch_size == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, type(g).Kind.Name(g.kind)) for g in config.instance_group] == [
        (1, "KIND_CPU")
    ]


def test_served_outputs_equal_a_direct_onnxruntime_run(
    server: RunningServer, samples: dict[str, np.ndarray]
) -> None:
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"pixels": samples["pixels"]})
    with FerryClient(server.address) as client:
        got = client.infer("digits", {"pixels": samples["pixels"]})
    assert got["label"].dtype == np.int64 and got["label"].tolist() == label.tolist()
    assert got["probabilities"].shape == (len(samples["labels"]), 10)
    np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-6, atol=1e-7)
    assert np.mean(got["label"] == samples["labels"]) >= 0.9


def test_samples_file_is_what_other_language_clients_expect(
    samples: dict[str, np.ndarray],
) -> None:
    pixels, labels = samples["pixels"], samples["labels"]
    assert pixels.shape == (20, 64) and labels.shape == (20,)
    assert pixels.min() >= 0 and pixels.max() <= 16 and np.all(pixels == np.round(pixels))
    assert set(labels.tolist()) <= set(range(10))
    with np.load(EXAMPLES / "digits_test_split.npz") as split:
        np.testing.assert_array_equal(split["pixels"][:20], pixels)
        np.testing.assert_array_equal(split["labels"][:20], labels)


def test_digits_client_prints_the_accuracy(server: RunningServer) -> None:
    result = run_script(str(EXAMPLES / "digits_client.py"), "--url", server.address)
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"accuracy: (\d\.\d+) \(n=(\d+)\)\n", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) >= 0.9
    assert int(match.group(2)) == 360


def test_digits_client_without_a_server_says_so(tmp_path: Path) -> None:
    with socket.socket() as sock:  # bound, never listening: the connection is refused
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
        result = run_script(str(EXAMPLES / "digits_client.py"), "--url", url)
    assert result.returncode == 2  # as the README says
    assert f"cannot reach Ferry at {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_training_again_gives_the_committed_model_and_samples(tmp_path: Path) -> None:
    result = run_script(str(EXAMPLES / "train_digits.py"), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    accuracy = re.search(r"onnxruntime (\d\.\d+)", result.stdout)
    assert accuracy and float(accuracy.group(1)) >= 0.95, result.stdout
    retrained = tmp_path / "model_repository" / "digits"
    assert signature(retrained / "1" / "model.onnx") == signature(MODEL)
    # Byte equality holds only on one machine (another CPU's BLAS rounds the coefficients
    # differently, by up to about 2e-4): the documented promise is on the predictions.
    with np.load(EXAMPLES / "digits_test_split.npz") as split:
        pixels = split["pixels"].astype(np.float32)
    fresh = ort.InferenceSession(str(retrained / "1" / "model.onnx"),
                                 providers=["CPUExecutionProvider"])  # fmt: skip
    committed = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    fresh_label, fresh_probabilities = fresh.run(None, {"pixels": pixels})
    label, probabilities = committed.run(None, {"pixels": pixels})
    np.testing.assert_array_equal(fresh_label, label)
    np.testing.assert_allclose(fresh_probabilities, probabilities, rtol=0, atol=PROBABILITY_ATOL)
    assert (retrained / "config.pbtxt").read_text() == (
        REPOSITORY / "digits" / "config.pbtxt"
    ).read_text()
    # The split is fixed by its seed, so the held-out samples come out the same.
    assert json.loads((tmp_path / "digits_samples.json").read_text()) == json.loads(
        (EXAMPLES / "digits_samples.json").read_text()
    )
    with (
        np.load(tmp_path / "digits_test_split.npz") as fresh,
        np.load(EXAMPLES / "digits_test_split.npz") as committed,
    ):
        for key in ("pixels", "labels"):
            np.testing.assert_array_equal(fresh[key], committed[key])


def folder_state(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_training_by_default_leaves_the_checkout_as_it_is() -> None:
    before = folder_state(EXAMPLES)
    result = run_script(str(EXAMPLES / "train_digits.py"))
    assert result.returncode == 0, result.stderr
    assert folder_state(EXAMPLES) == before
    match = re.search(r"and samples into (\S+)\n", result.stdout)
    assert match, result.stdout
    out = Path(match.group(1))
    try:
        assert out.parent == Path(tempfile.gettempdir()) and out.name.startswith("ferry-digits-")
        assert (out / "model_repository" / "digits" / "1" / "model.onnx").is_file()
        assert f"ferry serve {out / 'model_repository'}" in result.stdout
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_training_refuses_an_out_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("")
    result = run_script(str(EXAMPLES / "train_digits.py"), "--out", str(target))
    assert result.returncode == 2
    assert f"--out {target}: exists and is not a folder" in result.stderr
    result = run_script(str(EXAMPLES / "train_digits.py"), "--out", str(tmp_path),
                        "--overwrite-committed")  # fmt: skip
    assert result.returncode == 2 and "not allowed with" in result.stderr

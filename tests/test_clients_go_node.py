"""The Go and Node.js example clients (examples/clients/) against a live Ferry: each sends one
sample of examples/digits_samples.json and must print what onnxruntime itself answers.

The Go stubs are committed (examples/clients/go/inference/, made by its generate.sh); a test
here regenerates them with the pinned protoc plugins and fails while they are stale."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import RunningServer
from tests.external_tools import REPO, missing, require_tool

MODEL_REPOSITORY = REPO / "examples" / "model_repository"
SAMPLES = REPO / "examples" / "digits_samples.json"
GO_CLIENT = REPO / "examples" / "clients" / "go"
NODE_CLIENT = REPO / "examples" / "clients" / "node"
SAMPLE_INDEXES = (0, 3)


def expected(index: int) -> tuple[int, np.ndarray]:
    """The example model's own answer for one sample, straight from onnxruntime."""
    pixels = np.asarray([json.loads(SAMPLES.read_text())["pixels"][index]], dtype=np.float32)
    session = ort.InferenceSession(
        str(MODEL_REPOSITORY / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    label, probabilities = session.run(["label", "probabilities"], {"pixels": pixels})
    return int(label[0]), np.asarray(probabilities[0], dtype=np.float32)


def parse_output(stdout: str) -> tuple[int, np.ndarray]:
    """Both clients print `label: N` and `probabilities: [JSON array]`, nothing else."""
    lines = dict(line.split(": ", 1) for line in stdout.strip().splitlines())
    assert set(lines) == {"label", "probabilities"}, stdout
    probabilities = np.asarray(json.loads(lines["probabilities"]), dtype=np.float64)
    return int(lines["label"]), probabilities.astype(np.float32)


def assert_matches_onnxruntime(stdout: str, index: int) -> None:
    label, probabilities = parse_output(stdout)
    want_label, want_probabilities = expected(index)
    assert label == want_label
    assert probabilities.shape == (10,)
    # Both clients print float32 values exactly (shortest round-trip form), so the server's
    # answer must equal onnxruntime's bit for bit, as it ran one row alone.
    np.testing.assert_array_equal(probabilities, want_probabilities)


def run(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command[0]} failed ({done.returncode}):\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def go_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = require_tool("go", "install Go (https://go.dev/dl/)")
    binary = tmp_path_factory.mktemp("go") / "digitsclient"
    run([go, "build", "-o", str(binary), "."], cwd=GO_CLIENT, timeout=540)
    return binary


@pytest.mark.timeout(600)
@pytest.mark.parametrize("index", SAMPLE_INDEXES)
def test_go_client_prints_what_onnxruntime_answers(
    index: int, go_binary: Path, start_server
) -> None:
    server: RunningServer = start_server(MODEL_REPOSITORY)
    command = [str(go_binary), "-addr", server.address, "-samples", str(SAMPLES)]
    done = run([*command, "-sample", str(index)], cwd=GO_CLIENT, timeout=60)
    assert_matches_onnxruntime(done.stdout, index)


@pytest.mark.parametrize("index", SAMPLE_INDEXES)
def test_node_client_prints_what_onnxruntime_answers(index: int, start_server) -> None:
    node = node_client()
    server: RunningServer = start_server(MODEL_REPOSITORY)
    command = [node, "digits_client.js", "--addr", server.address, "--sample", str(index)]
    done = run(command, cwd=NODE_CLIENT, timeout=60)
    assert_matches_onnxruntime(done.stdout, index)


def test_go_client_reports_a_server_error(go_binary: Path, start_server) -> None:
    server: RunningServer = start_server(MODEL_REPOSITORY)
    command = [str(go_binary), "-addr", server.address, "-samples", str(SAMPLES)]
    done = subprocess.run(
        [*command, "-model", "no-such-model"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    # gRPC's canonical code name, as the README's error table and the Node.js client say it.
    assert "ModelInfer: NOT_FOUND: unknown model 'no-such-model'" in done.stderr, done.stderr


def unreachable_address() -> tuple[socket.socket, str]:
    """A loopback port that is bound but never listens: connections to it are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


def test_go_client_names_the_status_when_no_server_answers(go_binary: Path) -> None:
    sock, address = unreachable_address()
    with sock:
        done = subprocess.run(
            [str(go_binary), "-addr", address, "-timeout", "5s"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
    assert done.returncode != 0
    assert "ModelInfer: UNAVAILABLE: " in done.stderr, done.stderr


@pytest.mark.parametrize("cwd", [REPO, GO_CLIENT], ids=["repository-root", "own-folder"])
def test_go_client_finds_the_samples_from_the_root_and_its_folder(
    cwd: Path, go_binary: Path, start_server
) -> None:
    server: RunningServer = start_server(MODEL_REPOSITORY)
    done = run([str(go_binary), "-addr", server.address], cwd=cwd, timeout=60)
    assert_matches_onnxruntime(done.stdout, 0)


def test_go_client_without_samples_says_where_it_looked(go_binary: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(go_binary)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "no samples file at examples/digits_samples.json" in done.stderr, done.stderr
    assert "-samples PATH" in done.stderr


def node_client() -> str:
    node = require_tool("node", "install Node.js 18 or newer")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing(f"{NODE_CLIENT}/node_modules is missing: run scripts/install-test-tools.sh")
    return node


def test_node_client_runs_from_the_repository_root(start_server) -> None:
    server: RunningServer = start_server(MODEL_REPOSITORY)
    script = str(NODE_CLIENT.relative_to(REPO) / "digits_client.js")
    done = run([node_client(), script, "--addr", server.address], cwd=REPO, timeout=60)
    assert_matches_onnxruntime(done.stdout, 0)


def test_node_client_names_the_status_of_a_server_error(start_server) -> None:
    server: RunningServer = start_server(MODEL_REPOSITORY)
    command = [node_client(), "digits_client.js", "--addr", server.address,
               "--model", "no-such-model"]  # fmt: skip
    done = subprocess.run(command, cwd=NODE_CLIENT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.startswith(
        "digits_client: ModelInfer: NOT_FOUND: unknown model 'no-such-model'"
    ), done.stderr


def test_node_client_names_the_status_when_no_server_answers() -> None:
    sock, address = unreachable_address()
    with sock:
        command = [node_client(), "digits_client.js", "--addr", address, "--timeout-ms", "5000"]
        done = subprocess.run(command, cwd=NODE_CLIENT, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.startswith("digits_client: ModelInfer: UNAVAILABLE: "), done.stderr


@pytest.mark.timeout(300)
def test_committed_go_stubs_are_fresh(tmp_path: Path) -> None:
    for plugin in ("protoc-gen-go", "protoc-gen-go-grpc"):
        if not (REPO / ".tools" / "bin" / plugin).is_file():
            missing(f".tools/bin/{plugin} is missing: run scripts/install-test-tools.sh")
    env = {**os.environ, "PATH": f"{REPO / '.tools' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        [str(GO_CLIENT / "generate.sh"), str(tmp_path)], check=True, env=env, timeout=240
    )
    committed = sorted(p.name for p in (GO_CLIENT / "inference").glob("*.go"))
    fresh = sorted(p.name for p in tmp_path.glob("*.go"))
    assert committed == fresh
    stale = [
        name
        for name in fresh
        if (tmp_path / name).read_bytes() != (GO_CLIENT / "inference" / name).read_bytes()
    ]
    assert not stale, f"stale Go stubs {stale}: run examples/clients/go/generate.sh"

"""`ferry` on the command line, run as a real subprocess: help, start-up log, signals."""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from ferry.server.cli import build_parser
from tests.models import fixed_shape_model, mlp_model, write_config

SERVING = re.compile(r"serving the Open Inference Protocol on (\S+):(\d+)")
START_TIMEOUT_S = 60


def ferry_command() -> list[str]:
    """The installed `ferry` entry point beside this Python, else the module behind it."""
    script = shutil.which("ferry", path=str(Path(sys.executable).parent))
    if script:
        return [script]
    return [sys.executable, "-c", "import sys; from ferry.server.cli import main; sys.exit(main())"]


def run_ferry(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ferry_command(), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class FerryProcess:
    """`ferry serve` in a subprocess, its stderr read line by line on a thread."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [*ferry_command(), "serve", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line matching {pattern.pattern!r} in:\n{self.stderr}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"ferry exited ({self.process.wait()}) before {pattern.pattern!r}:\n"
                    + self.stderr
                )
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                return match

    def finish(self, timeout: float = 60) -> int:
        """Wait for the process to exit; its whole stderr is then in `lines`."""
        code = self.process.wait(timeout)
        self._reader.join(10)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.finish()
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "mlp" / "1" / "model.onnx")
    write_config(
        tmp_path / "mlp",
        """
        max_batch_size: 8
        dynamic_batching { max_queue_delay_microseconds: 500 preferred_batch_size: [ 4 ] }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        """,
    )
    fixed_shape_model(tmp_path / "fixed" / "1" / "model.onnx")
    return tmp_path


@pytest.fixture
def serve(repository: Path) -> Iterator[FerryProcess]:
    process = FerryProcess(
        str(repository), "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "-1",
        "--metrics-port", "-1",
    )
    yield process
    process.close()


# Help ---------------------------------------------------------------------------------


def _serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]  # type: ignore[no-any-return]


def test_top_level_help_lists_serve() -> None:
    result = run_ferry("--help")
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout
    assert "serve a model repository or a single .onnx file" in result.stdout


def test_every_serve_option_is_explained() -> None:
    actions = [a for a in _serve_parser()._actions if not isinstance(a, argparse._HelpAction)]
    unexplained = [a.option_strings or a.dest for a in actions if not a.help]
    assert not unexplained, f"options without help text: {unexplained}"

    result = run_ferry("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    for action in actions:
        for option in action.option_strings:
            assert option in result.stdout, f"{option} missing from serve --help"
        first_words = " ".join(str(action.help).split()[:4]).split("%")[0]
        assert first_words in text, f"help of {action.option_strings or action.dest} missing"
    for option in ("--host", "--grpc-port", "--metrics-port"):
        assert option in result.stdout
    assert "REPOSITORY|MODEL.onnx" in result.stdout
    assert "(default: 8001)" in text


def test_version() -> None:
    result = run_ferry("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("ferry ")


# Serving ------------------------------------------------------------------------------


def test_serve_logs_each_model_and_answers(serve: FerryProcess) -> None:
    match = serve.wait_for(SERVING)
    host, port = match.group(1), int(match.group(2))
    assert host == "127.0.0.1"
    assert port > 0
    log = serve.stderr

    mlp_lines = [line for line in log.splitlines() if "model 'mlp'" in line and "ready" in line]
    assert len(mlp_lines) == 1, log
    mlp = mlp_lines[0]
    for fragment in (
        "x FP32 [-1, 16]",
        "logits FP32 [-1, 4]",
        "probs FP32 [-1, 4]",
        "max_batch_size=8",
        "max_queue_delay=500us",
        "preferred=[4]",
        "instances=2",
    ):
        assert fragment in mlp, f"{fragment!r} not in {mlp!r}"

    fixed_lines = [line for line in log.splitlines() if "model 'fixed'" in line and "ready" in line]
    assert len(fixed_lines) == 1, log
    assert "x FP32 [2, 3]" in fixed_lines[0]
    assert "y FP32 [2, 3]" in fixed_lines[0]
    assert "no batching" in fixed_lines[0]

    with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
        assert client.is_server_ready()
        x = np.ones((3, 16), np.float32)
        tensor = triton.InferInput("x", [3, 16], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("mlp", [tensor]).as_numpy("probs").shape == (3, 4)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly(serve: FerryProcess, signum: signal.Signals) -> None:
    serve.wait_for(SERVING)
    serve.process.send_signal(signum)
    code = serve.finish()
    assert code == 0, serve.stderr
    assert "Traceback" not in serve.stderr, serve.stderr
    assert f"{signum.name} received" in serve.stderr
    assert "stopped" in serve.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "event_loop", [None, "asyncio", "uvloop"], ids=["default", "asyncio", "uvloop"]
)
def test_each_event_loop_serves_and_stops(repository: Path, event_loop: str | None) -> None:
    """uvloop by default (it is a dependency); --event-loop asyncio is the standard loop.
    Either batches (mlp waits 500 us for a batch of 4), answers and drains on SIGTERM."""
    choice = ["--event-loop", event_loop] if event_loop else []
    process = FerryProcess(str(repository), "--host", "127.0.0.1", "--grpc-port", "0",
                           "--http-port", "-1", "--metrics-port", "-1", *choice)
    try:
        port = int(process.wait_for(SERVING).group(2))
        assert f"{event_loop or 'uvloop'} event loop" in process.stderr, process.stderr
        rng = np.random.default_rng(7)
        inputs = [rng.standard_normal((rows, 16)).astype(np.float32) for rows in (1, 2, 3)]
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
            answers: list[np.ndarray] = []
            for x in inputs:
                tensor = triton.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                answers.append(client.infer("mlp", [tensor]).as_numpy("probs"))
        for x, probs in zip(inputs, answers, strict=True):
            assert probs.shape == (len(x), 4)
            np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        process.process.send_signal(signal.SIGTERM)
        assert process.finish() == 0, process.stderr
        assert "Traceback" not in process.stderr, process.stderr
    finally:
        process.close()


def test_single_model_file(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "classifier.onnx")
    process = FerryProcess(str(model), "--host", "127.0.0.1", "--grpc-port", "0",
                           "--http-port", "-1", "--metrics-port", "-1")
    try:
        port = int(process.wait_for(SERVING).group(2))
        assert "model 'classifier' version 1 ready" in process.stderr
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
            assert client.is_model_ready("classifier", "1")
        process.process.send_signal(signal.SIGTERM)
        assert process.finish() == 0
    finally:
        process.close()


# Errors -------------------------------------------------------------------------------


def test_nonexistent_path_exits_with_a_clear_message(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "repository"
    result = run_ferry(
        "serve", str(missing), "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1"
    )
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--grpc-port", "70000"], "70000"),
        (["--grpc-port", "eight"], "--grpc-port"),
        (["--shutdown-grace", "-1"], "shutdown grace"),
    ],
)
def test_bad_option_values_exit_non_zero(
    repository: Path, args: list[str], fragment: str
) -> None:
    result = run_ferry("serve", str(repository), "--http-port", "-1", "--metrics-port", "-1", *args)
    assert result.returncode != 0
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_command_exits_non_zero() -> None:
    result = run_ferry()
    assert result.returncode != 0
    assert "serve" in result.stderr

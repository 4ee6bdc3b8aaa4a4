"""Graceful shutdown: every accepted request is answered, then the process exits 0."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, slow_start_repository, spin_model, write_config
from tests.process import FerryProcess, infer, metric
from tests.waiting import wait_until

FEATURES = 256


class ServerProcess:
    """`ferry serve` as a child process; stderr is collected by a reader thread."""

    def __init__(self, repo: Path, *extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ferry.server.cli", "serve", str(repo), "--host", "127.0.0.1",
             "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", *extra],
            stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(60):
            self.process.kill()
            raise AssertionError("ferry serve did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r"Open Inference Protocol on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def stderr(self) -> str:
        """Everything the process wrote, once it has exited."""
        self._reader.join(30)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return "".join(self.lines)


SPIN_OFFSET = 0.5
FOREVER = 1e9  # spin_model rounds: far longer than any test runs


@pytest.fixture
def spin_repo(tmp_path: Path) -> Path:
    """A model whose batch takes as long as its input says, one request per batch."""
    repo = tmp_path / "spin"
    spin_model(repo / "m" / "1" / "model.onnx", offset=SPIN_OFFSET)
    write_config(repo / "m", "max_batch_size: 1\n")
    return repo


def spin_infer(address: str, n: float) -> tuple[str, np.ndarray | None]:
    return infer(address, np.full((1, 4), n, np.float32), timeout=60)


def queue_depth(server: FerryProcess) -> float | None:
    return metric(server.scrape(), "ferry_queue_depth", model="m")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES, hidden=1024, classes=10)
    write_config(repo / "m", "max_batch_size: 8\n")
    return repo


def test_sigterm_mid_burst_answers_every_request_and_exits_zero(
    spin_repo: Path, ferry_process: Callable[..., FerryProcess]
) -> None:
    """Requests the server accepted before the signal are all answered OK; only those
    sent after it may be refused (UNAVAILABLE); the process exits 0 within the grace."""
    grace_s = 20.0
    server = ferry_process(spin_repo, "--shutdown-grace", str(grace_s), "--metrics-port", "0")
    accepted = 24
    spins = [2e5 + i for i in range(accepted)]  # about 0.2 s each, one at a time
    with concurrent.futures.ThreadPoolExecutor(accepted) as pool:
        futures = [pool.submit(spin_infer, server.address, n) for n in spins]
        # One runs, the rest wait in the queue: every one of them is accepted.
        wait_until(lambda: queue_depth(server) == accepted - 1, timeout=30,
                   what="the burst to be queued")
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait_for("SIGTERM received: draining", timeout=10)
        late = [pool.submit(spin_infer, server.address, 0.0) for _ in range(8)]
        outcomes = [f.result(timeout=60) for f in futures]
        late_outcomes = [f.result(timeout=60) for f in late]
    code = server.wait(timeout=grace_s + 10)
    elapsed = time.monotonic() - signalled

    assert [status for status, _ in outcomes] == ["OK"] * accepted
    for n, (_, y) in zip(spins, outcomes, strict=True):
        np.testing.assert_array_equal(y, np.full((1, 4), n + SPIN_OFFSET, np.float32))
    assert [status for status, _ in late_outcomes] == ["UNAVAILABLE"] * len(late)
    assert code == 0, server.log
    assert elapsed < grace_s, f"exited {elapsed:.1f} s after SIGTERM, grace {grace_s} s"
    assert "Traceback" not in server.log


def test_end_of_grace_answers_busy_work_unavailable_and_exits_on_time(
    spin_repo: Path, ferry_process: Callable[..., FerryProcess]
) -> None:
    grace_s = 1.0
    server = ferry_process(spin_repo, "--shutdown-grace", str(grace_s), "--metrics-port", "0")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(spin_infer, server.address, FOREVER) for _ in range(4)]
        wait_until(lambda: queue_depth(server) == 3, timeout=30, what="three queued requests")
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        outcomes = [f.result(timeout=30)[0] for f in futures]
        code = server.wait(timeout=30)
    elapsed = time.monotonic() - signalled
    assert outcomes == ["UNAVAILABLE"] * 4
    assert code == 0, server.log
    assert elapsed < grace_s + 3.0, f"exited {elapsed:.1f} s after SIGTERM, grace {grace_s} s"
    assert "Traceback" not in server.log


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_idle_server_stops_cleanly(repo: Path, signum: int) -> None:
    server = ServerProcess(repo)
    server.process.send_signal(signum)
    assert server.process.wait(timeout=30) == 0
    assert "Traceback" not in server.stderr


def test_grace_period_end_answers_queued_requests_unavailable(
    repo: Path, start_server: Callable[..., RunningServer],
    gated: Callable[..., GatedInstance],
) -> None:
    server = start_server(repo, wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    gate.hold()

    def call(marker: float) -> str:
        x = np.full((1, FEATURES), marker, dtype=np.float32)
        try:
            with triton.InferenceServerClient(server.address) as client:
                tensor = triton.InferInput("x", [1, FEATURES], "FP32")
                tensor.set_data_from_numpy(x)
                client.infer("m", [tensor], client_timeout=30)
        except InferenceServerException as error:
            return error.status()
        return "OK"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        running = pool.submit(call, 1.0)
        assert gate.entered.acquire(timeout=10)
        queued = [pool.submit(call, 2.0 + i) for i in range(3)]
        scheduler = server.server.manager.get("m").scheduler
        wait_until(lambda: scheduler.queue_depth == 3, what="three queued requests")
        # Drain with a short grace: the held batch cannot finish in time.
        server.call(server.server.stop(grace_s=0.2))
        outcomes = [f.result(timeout=30) for f in (running, *queued)]
    gate.release()
    assert outcomes == ["StatusCode.UNAVAILABLE"] * 4
    assert gate.batches == [] or all(
        float(np.unique(b["x"])[0]) == 1.0 for b in gate.batches
    )  # queued rows were never computed


def test_new_requests_during_drain_get_unavailable(
    repo: Path, start_server: Callable[..., RunningServer],
    gated: Callable[..., GatedInstance],
) -> None:
    server = start_server(repo, wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    gate.hold()
    x = np.ones((1, FEATURES), dtype=np.float32)

    def call() -> str:
        try:
            with triton.InferenceServerClient(server.address) as client:
                tensor = triton.InferInput("x", [1, FEATURES], "FP32")
                tensor.set_data_from_numpy(x)
                client.infer("m", [tensor], client_timeout=30)
        except InferenceServerException as error:
            return error.status() + " " + error.message()
        return "OK"

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(call)
        assert gate.entered.acquire(timeout=10)
        stopping = concurrent.futures.Future[None]()

        def stop() -> None:
            try:
                server.call(server.server.stop(grace_s=30))
                stopping.set_result(None)
            except Exception as exc:  # pragma: no cover - reported below
                stopping.set_exception(exc)

        threading.Thread(target=stop, daemon=True).start()
        wait_until(lambda: not server.server.is_ready(), what="the server to start draining")
        late = call()
        gate.release()
        assert running.result(30) == "OK"
        stopping.result(30)
    assert late.startswith("StatusCode.UNAVAILABLE"), late
    assert "shutting down" in late


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_second_signal_stops_at_once(
    spin_repo: Path, ferry_process: Callable[..., FerryProcess]
) -> None:
    """A busy server: the first signal starts a drain that could last the whole grace
    (600 s); the second answers the running and queued requests UNAVAILABLE at once."""
    server = ferry_process(spin_repo, "--shutdown-grace", "600", "--metrics-port", "0")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(spin_infer, server.address, FOREVER) for _ in range(4)]
        wait_until(lambda: queue_depth(server) == 3, timeout=30, what="three queued requests")
        server.send_signal(signal.SIGTERM)
        server.wait_for("SIGTERM received: draining", timeout=10)
        assert not any(f.done() for f in futures)  # the drain waits for them
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        outcomes = [f.result(timeout=30)[0] for f in futures]
        code = server.wait(timeout=30)
    elapsed = time.monotonic() - signalled
    assert outcomes == ["UNAVAILABLE"] * 4
    assert code == 0, server.log
    assert elapsed < 5.0, f"exited {elapsed:.1f} s after the second signal"
    assert "second signal" in server.log
    assert "Traceback" not in server.log


def test_second_signal_stops_at_once_while_clients_keep_sending(repo: Path) -> None:
    """The drain waits for clients to go quiet; a second signal does not."""
    server = ServerProcess(repo, "--shutdown-grace", "600")
    address = f"127.0.0.1:{server.port}"
    stop = threading.Event()
    answered = {"ok": 0, "refused": 0}

    def hammer() -> None:
        x = np.ones((1, FEATURES), dtype=np.float32)
        while not stop.is_set():
            try:
                with triton.InferenceServerClient(address) as client:
                    tensor = triton.InferInput("x", [1, FEATURES], "FP32")
                    tensor.set_data_from_numpy(x)
                    client.infer("m", [tensor], client_timeout=5)
                    answered["ok"] += 1
            except InferenceServerException:
                answered["refused"] += 1  # UNAVAILABLE once draining

    senders = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: answered["ok"] > 20, what="traffic before the signal")
        server.process.send_signal(signal.SIGTERM)
        # Clients still sending while the server drains: the drain would wait for them.
        wait_until(lambda: answered["refused"] > 50, what="requests refused while draining")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    finally:
        stop.set()
        for sender in senders:
            sender.join(30)
    assert "Traceback" not in server.stderr


def test_a_signal_during_start_up_stops_at_once(
    tmp_path: Path, ferry_process: Callable[..., FerryProcess]
) -> None:
    """SIGTERM while a model's warm-up still runs (here: one that would spin for minutes)
    stops the server at once, exit 0, instead of waiting for the start-up to end."""
    repo = slow_start_repository(tmp_path / "slow-start")
    server = ferry_process(repo, wait_ready=False)
    server.wait_for(r"plain text")  # the process is up and binding its ports
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0, server.log
    assert time.monotonic() - signalled < 10, server.log
    assert "stopped during start-up" in server.log

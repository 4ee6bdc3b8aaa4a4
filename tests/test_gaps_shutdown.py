"""The end of a shutdown grace with work still in hand: what each caller is told, and how
the process learns that an executor thread is still inside a batch."""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from ferry.server import app
from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, write_config
from tests.waiting import wait_until

StartServer = Callable[..., RunningServer]
RUNNING_REASON = (
    "model 'm': the server stopped while the request's batch was running (its shutdown "
    "grace period ended); the result was not kept"
)
QUEUED_REASON = "model 'm': model stopped before the request ran"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    write_config(tmp_path / "repo" / "m", "max_batch_size: 8\n")
    return tmp_path / "repo"


def outcome(address: str, marker: float) -> tuple[str, str]:
    """One inference on its own client: ("OK", "") or the error's status and message."""
    tensor = triton.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.full((1, 16), marker, np.float32))
    try:
        with triton.InferenceServerClient(address) as client:
            client.infer("m", [tensor], client_timeout=30)
    except InferenceServerException as error:
        return (error.status() or "").removeprefix("StatusCode."), error.message() or ""
    return "OK", ""


def queue_depth(server: RunningServer) -> int:
    async def read() -> int:
        return server.server.manager.get("m").scheduler.queue_depth

    return server.call(read())


def test_when_the_grace_ends_running_and_queued_callers_are_told_apart_and_the_thread_is_seen(
    repo: Path, start_server: StartServer, gated: Callable[..., GatedInstance]
) -> None:
    """A close whose grace (0 s) ends with one batch running and one request queued:
    the running caller hears its result was not kept, the queued one that its model
    stopped, both UNAVAILABLE; join_threads reports the thread still inside the batch
    (what makes `ferry serve` leave without it) until the batch ends."""
    server = start_server(repo, wrap_instance=gated)
    gate: GatedInstance = gated.instances[0]  # type: ignore[attr-defined]
    gate.hold()
    manager = server.server.manager
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(outcome, server.address, 1.0)
        assert gate.entered.acquire(timeout=10)
        queued = pool.submit(outcome, server.address, 2.0)
        wait_until(lambda: queue_depth(server) == 1, what="a queued request")
        server.call(manager.close(0.0))
        assert running.result(timeout=10) == ("UNAVAILABLE", RUNNING_REASON)
        assert queued.result(timeout=10) == ("UNAVAILABLE", QUEUED_REASON)
    assert manager.join_threads(0.05) is False
    gate.release()
    assert manager.join_threads(10.0) is True
    assert gate.batch_rows == [1]  # the queued request never ran


class Threads:
    def __init__(self, joined: bool) -> None:
        self.joined = joined
        self.timeouts: list[float] = []

    def join_threads(self, timeout_s: float) -> bool:
        self.timeouts.append(timeout_s)
        return self.joined


class Exited(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> None:
    """os._exit raises Exited instead, and logging.shutdown leaves pytest's handlers."""

    def exit_(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setattr(logging, "shutdown", lambda: None)


@pytest.mark.usefixtures("exits")
def test_a_batch_still_running_after_the_stop_makes_the_process_leave_with_0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """leave_if_a_batch_still_runs: threads that do not come back within the timeout
    make the process leave at once with exit code 0 (never finalise under a running
    session.run), after a warning."""
    threads = Threads(joined=False)
    with (
        caplog.at_level(logging.WARNING, logger=app.__name__),
        pytest.raises(Exited) as exited,
    ):
        app.leave_if_a_batch_still_runs(threads, 0.25)
    assert exited.value.code == 0
    assert threads.timeouts == [0.25]
    assert [r.getMessage() for r in caplog.records if r.name == app.__name__] == [
        "a batch is still running after the stop; exiting without it"
    ]


@pytest.mark.usefixtures("exits")
def test_threads_that_come_back_let_the_process_end_normally() -> None:
    """With every thread joined, leave_if_a_batch_still_runs returns (no exit), using
    the default timeout."""
    threads = Threads(joined=True)
    assert app.leave_if_a_batch_still_runs(threads) is None  # type: ignore[func-returns-value]
    assert threads.timeouts == [app.BATCH_JOIN_TIMEOUT_S]

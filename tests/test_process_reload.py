"""Reloads lose nothing, through a real `ferry serve` under load: the `--poll-repository`
timer picks up a new version (and new and removed models) by itself, and
`RepositoryModelLoad` swaps versions while requests are in flight. Every request sent is
answered OK, by the old version or the new one, and the new one serves afterwards."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from tests.models import spin_model, write_config
from tests.process import FerryProcess, infer
from tests.waiting import wait_until

StartProcess = Callable[..., FerryProcess]
SPIN = 2e4  # about 20 ms a batch: requests queue up behind each other
CLIENTS = 6


def add_version(repo: Path, version: int, offset: float) -> None:
    """Write the model outside the repository, then move its version folder in at once:
    a poll never sees a half-written file."""
    staging = repo.parent / f"staging-{version}"
    spin_model(staging / str(version) / "model.onnx", offset=offset)
    os.rename(staging / str(version), repo / "m" / str(version))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    spin_model(repo / "m" / "1" / "model.onnx", offset=1.0)
    write_config(repo / "m", "max_batch_size: 4\n")
    return repo


class Load:
    """CLIENTS threads sending requests until stopped; each records (sent_at_index,
    status, offset of the version that answered) in order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stop = threading.Event()
        self.swapped = threading.Event()  # set by the test once the new version serves
        self.results: list[list[tuple[bool, str, float | None]]] = [[] for _ in range(CLIENTS)]
        self.pool = concurrent.futures.ThreadPoolExecutor(CLIENTS)
        self.futures = [self.pool.submit(self._run, i) for i in range(CLIENTS)]

    def _run(self, index: int) -> None:
        results = self.results[index]
        x = np.full((1, 4), SPIN, np.float32)
        while not self.stop.is_set():
            after_swap = self.swapped.is_set()
            status, y = infer(self.address, x, timeout=30)
            offset = None if y is None else float(y[0, 0] - SPIN)
            results.append((after_swap, status, offset))

    def answered_by(self, offset: float) -> int:
        return sum(o == offset for r in self.results for _, _, o in list(r))

    def finish(self) -> list[tuple[bool, str, float | None]]:
        self.stop.set()
        for future in self.futures:
            future.result(timeout=60)
        self.pool.shutdown()
        return [result for results in self.results for result in results]


def check_nothing_lost(results: list[tuple[bool, str, float | None]]) -> None:
    statuses = [status for _, status, _ in results]
    assert set(statuses) == {"OK"}, {s: statuses.count(s) for s in set(statuses)}
    offsets = [offset for _, _, offset in results]
    assert offsets.count(1.0) > 0 and offsets.count(2.0) > 0  # in flight across the swap
    assert set(offsets) == {1.0, 2.0}
    late = [offset for after_swap, _, offset in results if after_swap]
    assert late and set(late) == {2.0}  # sent after the swap: only the new version


def test_poll_timer_reloads_under_load_and_loses_nothing(
    repo: Path, ferry_process: StartProcess
) -> None:
    server = ferry_process(repo, "--poll-repository", "0.2")
    load = Load(server.address)
    try:
        wait_until(lambda: load.answered_by(1.0) >= 2 * CLIENTS, timeout=30,
                   what="traffic on version 1")
        add_version(repo, 2, offset=2.0)  # nobody calls the server: the timer must notice
        server.wait_for("model 'm' changed in the repository: reloading", timeout=15)
        with triton.InferenceServerClient(server.address) as client:
            wait_until(lambda: client.get_model_metadata("m").versions == ["2"], timeout=30,
                       what="version 2 to replace version 1")
        load.swapped.set()
        wait_until(lambda: load.answered_by(2.0) >= 4 * CLIENTS, timeout=30,
                   what="traffic on version 2")
    finally:
        results = load.finish()
    check_nothing_lost(results)
    assert server.stop() == 0
    assert "failed" not in server.log and "Traceback" not in server.log


def test_poll_timer_loads_new_models_and_unloads_removed_ones(
    repo: Path, ferry_process: StartProcess
) -> None:
    server = ferry_process(repo, "--poll-repository", "0.2")
    with triton.InferenceServerClient(server.address) as client:
        assert not client.is_model_ready("n")
        staging = repo.parent / "staging-n"
        spin_model(staging / "n" / "1" / "model.onnx", offset=3.0)
        os.rename(staging / "n", repo / "n")
        server.wait_for("model 'n' changed in the repository: loading", timeout=15)
        wait_until(lambda: client.is_model_ready("n"), timeout=30, what="model n to load")
        status, y = infer(server.address, np.zeros((1, 4), np.float32), model="n")
        assert status == "OK" and y is not None and y[0, 0] == 3.0

        os.rename(repo / "n", staging / "gone")
        server.wait_for("model 'n' was removed from the repository: unloading", timeout=15)
        wait_until(lambda: not client.is_model_ready("n"), timeout=30, what="model n to go")
        assert infer(server.address, np.zeros((1, 4), np.float32), model="n")[0] == "NOT_FOUND"
        assert client.is_model_ready("m")
    assert server.stop() == 0


def test_repository_model_load_swaps_versions_under_load_and_loses_nothing(
    repo: Path, ferry_process: StartProcess
) -> None:
    server = ferry_process(repo, "--model-control-mode", "explicit", "--load-model", "m")
    load = Load(server.address)
    try:
        wait_until(lambda: load.answered_by(1.0) >= 2 * CLIENTS, timeout=30,
                   what="traffic on version 1")
        add_version(repo, 2, offset=2.0)
        with triton.InferenceServerClient(server.address) as client:
            client.load_model("m")  # returns once version 2 takes new requests
            load.swapped.set()
            assert client.get_model_metadata("m").versions == ["2"]
        wait_until(lambda: load.answered_by(2.0) >= 4 * CLIENTS, timeout=30,
                   what="traffic on version 2")
    finally:
        results = load.finish()
    check_nothing_lost(results)
    assert server.stop() == 0
    assert "Traceback" not in server.log


def test_a_broken_reload_keeps_the_running_version_serving(
    repo: Path, ferry_process: StartProcess
) -> None:
    server = ferry_process(repo, "--poll-repository", "0.2")
    staging = repo.parent / "staging-broken"
    (staging / "2").mkdir(parents=True)
    (staging / "2" / "model.onnx").write_bytes(b"not an onnx model")
    os.rename(staging / "2", repo / "m" / "2")
    server.wait_for("model 'm' .* failed to load", timeout=15)
    status, y = infer(server.address, np.zeros((1, 4), np.float32))
    assert status == "OK" and y is not None and y[0, 0] == 1.0
    assert server.stop() == 0

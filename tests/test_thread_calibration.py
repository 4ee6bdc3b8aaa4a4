"""Automatic intra-op threads: a model so small that one thread runs it faster gets one
thread; the others keep every core they were given."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from ferry.server import runtime
from ferry.server.runtime import SessionSettings, calibrated_intra_op_threads
from tests.models import mlp_model, write_config
from tests.process import FerryProcess
from tests.test_process_workers import infer_once, python_threads

FEATURES = 16


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return mlp_model(tmp_path / "tiny.onnx", features=FEATURES)


def samples() -> list[dict[str, np.ndarray]]:
    return [{"x": np.zeros((rows, FEATURES), np.float32)} for rows in (1, 8)]


class StepTimer:
    """perf_counter_ns whose readings advance by a fixed step per run, chosen by the
    thread count of the session being timed: the calibration sees what we tell it."""

    def __init__(self, step_ns: Callable[[], int]) -> None:
        self.now = 0
        self.reading = 0
        self.step_ns = step_ns

    def __call__(self) -> int:
        self.reading += 1
        if self.reading % 2 == 0:  # the end of a run
            self.now += self.step_ns()
        return self.now


def test_a_tiny_model_runs_on_one_thread(tiny: Path) -> None:
    assert calibrated_intra_op_threads(tiny, SessionSettings(intra_op_threads=2), samples(),
                                       ["logits"]) == 1


def test_threads_are_kept_where_they_run_the_model_faster(tiny: Path) -> None:
    runs = iter(range(10_000))
    runs_per_candidate = 2 * 15  # two samples, 15 runs each

    def step() -> int:
        # The multi-threaded session is timed first: fast; then the single thread: slow.
        return 1_000 if next(runs) < runs_per_candidate else 5_000

    chosen = calibrated_intra_op_threads(
        tiny, SessionSettings(intra_op_threads=4), samples(), ["logits"], timer=StepTimer(step)
    )
    assert chosen == 4


def test_big_models_explicit_one_thread_and_unknown_shapes_are_not_calibrated(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = SessionSettings(intra_op_threads=2)
    assert calibrated_intra_op_threads(tiny, settings, [], ["logits"]) == 2  # no sample
    assert calibrated_intra_op_threads(
        tiny, SessionSettings(intra_op_threads=1), samples(), ["logits"]
    ) == 1
    monkeypatch.setattr(runtime, "CALIBRATION_MAX_FILE_BYTES", 10)
    assert calibrated_intra_op_threads(tiny, settings, samples(), ["logits"]) == 2


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Path]:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx", features=FEATURES)
    write_config(tmp_path / "repo" / "m", "max_batch_size: 8\ninstance_group [ { count: 2 } ]\n")
    yield tmp_path / "repo"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: there is nothing to choose")
def test_a_served_tiny_model_starts_no_thread_pool_by_default(
    repo: Path, ferry_process: Callable[..., FerryProcess]
) -> None:
    counts = {}
    for flags in ((), ("--session-threads", "1")):
        server = ferry_process(repo, *flags)
        counts[flags] = python_threads(server.pid)
        infer_once(server.address)
        assert server.stop() == 0
    # Calibrated to one thread, two sessions start no pool threads: as with the flag.
    assert counts[()] == counts[("--session-threads", "1")], counts

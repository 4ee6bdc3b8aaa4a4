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


RUNS = 15  # timed runs per sample and candidate: the pool's two samples, then one thread's


def timed(wall_us: dict[tuple[str, int], int]) -> StepTimer:
    """A wall clock on which each (candidate, sample) takes the given time per run."""
    runs = iter(range(10_000))
    order = [("pool", 0), ("pool", 1), ("one", 0), ("one", 1)]
    return StepTimer(lambda: 1_000 * wall_us[order[next(runs) // RUNS]])


def test_threads_are_kept_where_a_lone_request_runs_faster_on_them(tiny: Path) -> None:
    clock = timed({("pool", 0): 1, ("pool", 1): 5, ("one", 0): 5, ("one", 1): 5})
    chosen = calibrated_intra_op_threads(
        tiny, SessionSettings(intra_op_threads=4), samples(), ["logits"], timer=clock
    )
    assert chosen == 4


def test_a_faster_full_batch_on_the_pool_does_not_keep_it(tiny: Path) -> None:
    """Under load there is no idle core for the pool: only a lone request's latency
    (the first sample) keeps it, and here one thread runs that as fast."""
    clock = timed({("pool", 0): 5, ("pool", 1): 1, ("one", 0): 5, ("one", 1): 5})
    same_cpu = StepTimer(lambda: 1_000)
    chosen = calibrated_intra_op_threads(
        tiny, SessionSettings(intra_op_threads=4), samples(), ["logits"], timer=clock,
        cpu_timer=same_cpu,
    )
    assert chosen == 1


def test_threads_are_kept_where_one_thread_costs_more_cpu(tiny: Path) -> None:
    readings = iter(range(10_000))
    pool_readings = 2 * RUNS * 2  # two samples of RUNS runs, a reading before and after each

    def cpu_clock() -> int:
        # Each of the pool's runs (timed first) costs 1 us of CPU, each of one thread's 10 us.
        reading = next(readings)
        step = 1_000 if reading < pool_readings else 10_000
        return (reading // 2) * 11_000 + (reading % 2) * step

    chosen = calibrated_intra_op_threads(
        tiny, SessionSettings(intra_op_threads=4), samples(), ["logits"],
        timer=timed({key: 1 for key in [("pool", 0), ("pool", 1), ("one", 0), ("one", 1)]}),
        cpu_timer=cpu_clock,
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

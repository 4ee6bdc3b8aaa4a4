"""The `--workers` supervisor's answer to children that exit: restart them, reset a dead
frontend's shared counts, and give up (exit 1) on a restart storm. Driven through
`Supervisor._exited` with stand-in children and a fake clock: no process is started, and
the 60 s restart window passes without waiting for it."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from ferry.server import workers
from ferry.server.workers import EXECUTOR, FRONTEND, MAX_RESTARTS, RESTART_WINDOW_S, Supervisor


@dataclass
class FakeProcess:
    """What the supervisor uses of a child's Popen."""

    pid: int
    returncode: int | None = None
    signals: list[int] = field(default_factory=list)

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    supervisor: Supervisor
    clock: Clock
    started_frontends: list[int]
    started_executors: list[list[int]]
    executor_starts_succeed: bool = True
    children: list[FakeProcess] = field(default_factory=list)

    def child(self, role: str, index: int) -> workers._Child:
        """A running child, registered with the supervisor as its own would be."""
        process = FakeProcess(pid=10_000 + len(self.children))
        self.children.append(process)
        child = workers._Child(role, index, process)  # type: ignore[arg-type]
        self.supervisor._children[process.pid] = child
        return child

    def exits(self, child: workers._Child, code: int) -> None:
        """What Supervisor.run does when waitpid reports the child gone."""
        del self.supervisor._children[child.process.pid]
        self.supervisor._exited(child, code)


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    clock = Clock()
    monkeypatch.setattr(workers, "time", SimpleNamespace(monotonic=clock))
    supervisor = Supervisor(["serve", "repo"], 2, "127.0.0.1", 18001, None, http_port=None)
    made = Harness(supervisor, clock, [], [])

    def start_frontend(index: int) -> None:
        made.started_frontends.append(index)

    def start_executors(indexes: object) -> bool:
        made.started_executors.append(list(indexes))  # type: ignore[call-overload]
        return made.executor_starts_succeed

    monkeypatch.setattr(supervisor, "_start_frontend", start_frontend)
    monkeypatch.setattr(supervisor, "_start_executors", start_executors)
    yield made
    os.close(supervisor._call_counts_fd)
    os.close(supervisor._connection_counts_fd)


def test_a_dead_frontend_is_restarted_with_its_shared_counts_reset(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A frontend that dies with calls and connections counted in the shared tables
    (its --max-concurrent-rpcs and --max-connections places) has its counts set back to
    zero, the other frontend's left alone, and is started again under its index."""
    supervisor = harness.supervisor
    frontend = harness.child(FRONTEND, 1)
    supervisor._call_counts.add(0, 2)
    supervisor._call_counts.add(1, 5)
    supervisor._connection_counts.add(1, 3)
    with caplog.at_level(logging.ERROR, logger=workers.__name__):
        harness.exits(frontend, -signal.SIGKILL)
    assert harness.started_frontends == [1]
    assert (supervisor._call_counts.of(0), supervisor._call_counts.of(1)) == (2, 0)
    assert supervisor._connection_counts.of(1) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"frontend process {frontend.process.pid} exited with -9; restarting it"
    ]


def test_a_restart_storm_makes_the_supervisor_give_up_and_stop_everyone(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """MAX_RESTARTS restarts within RESTART_WINDOW_S are allowed; the next exit in the
    window is not restarted: the supervisor logs that it gives up, sends SIGTERM to the
    children left, and will exit 1."""
    supervisor = harness.supervisor
    survivor = harness.child(EXECUTOR, 0)
    for _ in range(MAX_RESTARTS):
        harness.exits(harness.child(FRONTEND, 0), 1)
        harness.clock.now += 1.0
    assert harness.started_frontends == [0] * MAX_RESTARTS
    assert not supervisor._gave_up
    with caplog.at_level(logging.ERROR, logger=workers.__name__):
        harness.exits(harness.child(FRONTEND, 0), 1)
    assert harness.started_frontends == [0] * MAX_RESTARTS  # not restarted again
    assert supervisor._gave_up
    assert caplog.records[-1].getMessage() == (
        f"more than {MAX_RESTARTS} restarts within {RESTART_WINDOW_S:.0f} s: stopping"
    )
    assert survivor.process.signals == [signal.SIGTERM]  # type: ignore[attr-defined]


def test_restarts_spread_over_more_than_the_window_never_give_up(harness: Harness) -> None:
    """Only restarts within the last RESTART_WINDOW_S count: a child that dies now and
    then, however often in all, is restarted every time."""
    for _ in range(3 * MAX_RESTARTS):
        harness.exits(harness.child(FRONTEND, 1), 1)
        harness.clock.now += RESTART_WINDOW_S / (MAX_RESTARTS - 1)
    assert harness.started_frontends == [1] * (3 * MAX_RESTARTS)
    assert not harness.supervisor._gave_up


def test_a_dead_executor_is_restarted_and_one_that_cannot_start_again_stops_the_server(
    harness: Harness,
) -> None:
    """An executor that exits is started again for its device; if the new one dies
    before it is ready, the supervisor gives up and stops the frontends."""
    frontend = harness.child(FRONTEND, 0)
    harness.exits(harness.child(EXECUTOR, 0), -signal.SIGKILL)
    assert harness.started_executors == [[0]]
    assert not harness.supervisor._gave_up
    harness.executor_starts_succeed = False
    harness.exits(harness.child(EXECUTOR, 0), -signal.SIGSEGV)
    assert harness.started_executors == [[0], [0]]
    assert harness.supervisor._gave_up
    assert frontend.process.signals == [signal.SIGTERM]  # type: ignore[attr-defined]


def test_exits_during_a_stop_are_not_restarted_and_only_unclean_ones_count(
    harness: Harness,
) -> None:
    """While stopping, exits are never restarts; an exit by the stop's own signal is
    clean, any other code becomes the supervisor's worst (its exit code)."""
    supervisor = harness.supervisor
    supervisor._stop(signal.SIGTERM)
    harness.exits(harness.child(FRONTEND, 0), -signal.SIGTERM)
    harness.exits(harness.child(FRONTEND, 1), 0)
    assert supervisor._worst == 0
    harness.exits(harness.child(EXECUTOR, 0), -signal.SIGKILL)
    assert supervisor._worst == signal.SIGKILL
    assert harness.started_frontends == [] and harness.started_executors == []

"""The choice of event loop (server.event_loop): uvloop by default, asyncio on request."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.server.event_loop import (
    ASYNCIO,
    MAX_TIMER_S,
    UVLOOP,
    default_event_loop,
    loop_factory,
    loop_name,
    run,
    timer_delay,
    uvloop_available,
)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (-0.5, 0.0),
        (0.0, 0.0),
        (0.000001, 0.001),
        (0.0003, 0.001),
        (0.001, 0.001),
        (0.0010001, 0.002),
        (0.003 - 1e-12, 0.003),  # float error below a whole millisecond adds nothing
        (2.5, 2.5),
        (1e300, MAX_TIMER_S),
        (float("inf"), MAX_TIMER_S),
        (float("nan"), MAX_TIMER_S),
    ],
)
def test_timer_delays_round_up_to_whole_milliseconds(seconds: float, expected: float) -> None:
    assert timer_delay(seconds) == pytest.approx(expected, abs=1e-12)


def test_uvloop_is_installed_and_the_default() -> None:
    assert uvloop_available()
    assert default_event_loop() == UVLOOP


@pytest.mark.parametrize("kind", [UVLOOP, ASYNCIO])
def test_run_uses_the_loop_it_is_asked_for(kind: str) -> None:
    async def which() -> str:
        return loop_name(asyncio.get_running_loop())

    assert run(which(), kind) == kind


def test_an_unknown_loop_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown event loop 'tokio'.*uvloop, asyncio"):
        loop_factory("tokio")

    async def never() -> None:
        raise AssertionError("must not run")

    with pytest.raises(ValueError, match="tokio"):
        run(never(), "tokio")  # the coroutine is closed, not left unawaited


def test_uvloop_asked_for_but_missing_exits_2_with_a_message(tmp_path: Path) -> None:
    """A machine without uvloop serves on asyncio by default; asking for uvloop there
    is refused at start with a message, not a traceback."""
    script = (
        "import sys; sys.modules['uvloop'] = None; "  # import uvloop now fails
        "from ferry.server.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    serve = [sys.executable, "-c", script, "serve", str(tmp_path), "--grpc-port", "0",
             "--http-port", "-1", "--metrics-port", "-1"]
    done = subprocess.run([*serve, "--event-loop", "uvloop"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "uvloop is not installed" in done.stderr
    assert "--event-loop asyncio" in done.stderr
    assert "Traceback" not in done.stderr


def test_without_uvloop_the_default_is_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    assert not uvloop_available()
    assert default_event_loop() == ASYNCIO
    with pytest.raises(ValueError, match="uvloop is not installed"):
        loop_factory(UVLOOP)

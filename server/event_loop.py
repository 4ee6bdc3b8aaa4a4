"""Which asyncio event loop a Ferry process runs on.

uvloop (libuv, in Cython) runs the same asyncio code with less CPU per callback than the
standard library's loop: under load most of a unary call's CPU is the loop's own work
(waking on gRPC's completions, running handles, futures), so the loop is the largest single
lever on CPU per request (benchmarks/README.md, "Event loop"). It is the default wherever it
is installed; `--event-loop asyncio` keeps the standard loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

UVLOOP = "uvloop"
ASYNCIO = "asyncio"
EVENT_LOOPS = (UVLOOP, ASYNCIO)

T = TypeVar("T")

# The longest timer armed (a year): a deadline further off, or not finite, is looked at
# again long before then, since every dispatch re-arms the timer.
MAX_TIMER_S = 365 * 24 * 3600.0


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def default_event_loop() -> str:
    return UVLOOP if uvloop_available() else ASYNCIO


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new loop of that kind; ValueError when it cannot be had."""
    if kind == ASYNCIO:
        return asyncio.new_event_loop
    if kind != UVLOOP:
        raise ValueError(f"unknown event loop '{kind}': expected one of {', '.join(EVENT_LOOPS)}")
    try:
        import uvloop
    except ImportError:
        raise ValueError(
            "--event-loop uvloop: uvloop is not installed (pip install uvloop, or use "
            "--event-loop asyncio)"
        ) from None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: str) -> T:
    """asyncio.run on a loop of that kind."""
    try:
        factory = loop_factory(kind)
    except ValueError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """What a log line calls the running loop."""
    return UVLOOP if type(loop).__module__.startswith("uvloop") else ASYNCIO


def timer_delay(seconds: float) -> float:
    """A timer's delay, rounded up to whole milliseconds.

    Both loops count timers in milliseconds. The standard loop rounds a wait up, so a
    timer never fires before its time; uvloop rounds to the nearest, so a 0.3 ms timer
    fires at once, and a batcher re-arming it until its deadline would spin. Rounding up
    gives every loop the standard loop's behaviour. The small epsilon keeps a delay that
    is a whole number of milliseconds but for float error from gaining one more.
    """
    if seconds <= 0.0:
        return 0.0
    if not seconds < MAX_TIMER_S:  # NaN and infinity too: math.ceil refuses them
        return MAX_TIMER_S
    return math.ceil(seconds * 1000.0 - 1e-6) / 1000.0

"""A batch that fails while it runs on the event loop itself (a fast model's lone
request, `ModelScheduler._may_run_inline`): the failure must reach its caller like one
on an executor thread, and must leave the loop and the scheduler serving."""

from __future__ import annotations

import threading

import pytest

from ferry.server.errors import ErrorKind, FerryError
from tests.test_scheduler import (
    FakeTimer,
    LoopSafeInstance,
    Recorder,
    result,
    rows,
    send,
    serving,
)


@pytest.mark.asyncio
async def test_a_batch_that_fails_on_the_event_loop_answers_its_caller_and_serving_goes_on(
) -> None:
    """With every run measured at 500 us (a fake timer), a lone request runs on the
    loop; when the model raises there, the caller gets INTERNAL naming the model and the
    error, the batch is reported failed to the observers, and the next request runs on
    the loop again and succeeds."""
    instance = LoopSafeInstance()
    instance.fail_on_negative = True
    loop_thread = threading.current_thread().name
    recorder = Recorder()
    async with serving(
        instance, timer=FakeTimer(step_ns=500_000), observers=[recorder]
    ) as scheduler:
        await result(send(scheduler, rows(1)))  # the first runs on a thread: cost unknown
        with pytest.raises(FerryError) as caught:
            await result(send(scheduler, rows(-1)))
        assert instance.threads[-1] == loop_thread
        assert caught.value.kind is ErrorKind.INTERNAL
        assert caught.value.message == "model 'fake' failed to run: kaboom: negative input"
        assert (await result(send(scheduler, rows(2))))["double"].tolist() == [[4]]
        assert instance.threads[-1] == loop_thread
    assert [(t.rows, t.requests, t.failed) for t in recorder.timings] == [
        (1, 1, False), (1, 1, True), (1, 1, False)
    ]


@pytest.mark.asyncio
async def test_a_failed_batch_on_the_loop_does_not_count_as_its_recent_cost() -> None:
    """Failed runs do not move the measure of recent batch cost: after a failure on the
    loop the model is still judged fast and its next lone request runs on the loop."""
    instance = LoopSafeInstance()
    instance.fail_on_negative = True
    loop_thread = threading.current_thread().name
    async with serving(instance, timer=FakeTimer(step_ns=500_000)) as scheduler:
        await result(send(scheduler, rows(1)))
        for _ in range(3):
            with pytest.raises(FerryError):
                await result(send(scheduler, rows(-1)))
        await result(send(scheduler, rows(3)))
    assert instance.threads[1:] == [loop_thread] * 4

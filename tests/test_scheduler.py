"""ModelScheduler with a fake instance: who gets which rows, and when work runs.

Time is a fake clock moved by hand; the instance is held still on a threading.Event so
that queues fill deterministically. Waits on futures carry a timeout only as a safety
net: no test sleeps to make something happen.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import numpy as np
import pytest

from ferry.server.batching import BatchPolicy
from ferry.server.errors import ErrorKind, FerryError
from ferry.server.executor import InstanceExecutor, RunOnly
from ferry.server.scheduler import BatchTimings, ModelScheduler, Tensors

OUTPUTS = ("double", "plus_one")
SAFETY_S = 10.0


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeInstance:
    """Doubles `x` and adds one to it; records every batch; can be held still."""

    may_run_on_loop = False

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.asked: list[list[str]] = []
        self.fail_on_negative = False
        self.rows_returned: int | None = None  # force a wrong output row count
        self._gate = threading.Event()
        self._gate.set()
        self._entered = threading.Semaphore(0)

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def entered(self) -> None:
        """Wait until a batch has started to run (is inside run())."""
        got = await asyncio.to_thread(self._entered.acquire, True, SAFETY_S)
        assert got, "the instance was never called"

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> Tensors:
        self._entered.release()
        if not self._gate.wait(SAFETY_S):
            raise TimeoutError("FakeInstance was never released")
        x = np.array(inputs["x"], copy=True)
        self.batches.append(x)
        self.asked.append(list(output_names))
        if self.fail_on_negative and (x < 0).any():
            raise RuntimeError("kaboom: negative input")
        if self.rows_returned is not None:
            x = x[: self.rows_returned]
        computed = {"double": x * 2, "plus_one": x + 1}
        return {name: computed[name] for name in output_names}

    @property
    def batch_rows(self) -> list[int]:
        return [len(b) for b in self.batches]


class Recorder:
    def __init__(self) -> None:
        self.timings: list[BatchTimings] = []

    def batch_executed(self, timings: BatchTimings) -> None:
        self.timings.append(timings)


@asynccontextmanager
async def serving(
    *instances: FakeInstance,
    batchable: bool = True,
    clock: FakeClock | None = None,
    observers: Sequence[Recorder] = (),
    timer: FakeTimer | None = None,
    **policy: object,
) -> AsyncIterator[ModelScheduler]:
    policy.setdefault("max_batch_size", 8)
    scheduler = ModelScheduler(
        "fake",
        BatchPolicy(**policy),  # type: ignore[arg-type]
        executors(instances, batchable, timer),
        OUTPUTS,
        batchable=batchable,
        clock=clock or FakeClock(),
        observers=observers,
    )
    scheduler.start()
    try:
        yield scheduler
    finally:
        for instance in instances:
            instance.release()
        await asyncio.wait_for(scheduler.close(grace_s=SAFETY_S), SAFETY_S + 1)


class FakeTimer:
    """Stands in for perf_counter_ns: each reading is `step_ns` after the last, so every
    execution measures the same short time whatever the machine is doing."""

    def __init__(self, step_ns: int = 1_000) -> None:
        self.now_ns = 0
        self.step_ns = step_ns

    def __call__(self) -> int:
        self.now_ns += self.step_ns
        return self.now_ns


def executors(
    instances: Sequence[FakeInstance], batchable: bool = True, timer: FakeTimer | None = None
) -> list[InstanceExecutor]:
    """The fakes behind the executor seam, as the loader puts real instances there."""
    return [
        InstanceExecutor(
            RunOnly(instance, may_run_on_loop=instance.may_run_on_loop),
            batchable=batchable,
            **({"timer": timer} if timer is not None else {}),
        )
        for instance in instances
    ]


def rows(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(-1, 1)


def send(
    scheduler: ModelScheduler,
    x: np.ndarray,
    outputs: tuple[str, ...] = OUTPUTS,
    **kwargs: object,
) -> asyncio.Future[Tensors]:
    kwargs.setdefault("shape_key", x.shape[1:])
    return scheduler.submit({"x": x}, outputs, rows=len(x), **kwargs)  # type: ignore[arg-type]


async def result(future: asyncio.Future[Tensors]) -> Tensors:
    return await asyncio.wait_for(asyncio.shield(future), SAFETY_S)


async def error_of(future: asyncio.Future[Tensors]) -> FerryError:
    with pytest.raises(FerryError) as caught:
        await result(future)
    return caught.value


async def until(condition: object, what: str) -> None:
    """Let the loop run callbacks until `condition()` holds (never sleeps for time)."""
    for _ in range(1000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError(f"timed out waiting for {what}")


class CountingClock(FakeClock):
    """A FakeClock that counts how often the scheduler looks at it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.mark.asyncio
async def test_a_sub_millisecond_queue_delay_waits_without_spinning() -> None:
    """uvloop (the default loop) rounds a timer's delay to the nearest millisecond, so a
    0.3 ms timer fires at once: re-armed until the request is due, it would spin the loop.
    The scheduler rounds delays up, so it wakes about once per millisecond. The clock is
    held still, so the request stays 0.3 ms from due for as long as the test waits."""
    clock = CountingClock()
    instance = FakeInstance()
    async with serving(instance, clock=clock, max_queue_delay_s=0.0003) as scheduler:
        future = send(scheduler, rows(1))
        reads = clock.reads
        # Real time on purpose: what is under test is how often the loop's timer fires.
        await asyncio.sleep(0.02)
        assert not future.done()
        assert clock.reads - reads <= 40, f"{clock.reads - reads} wake-ups in 20 ms"
        clock.advance(0.0003)
        assert (await result(future))["double"].tolist() == [[2]]
    assert instance.batch_rows == [1]


# -- rows back to their callers ---------------------------------------------------------


@pytest.mark.asyncio
async def test_each_caller_gets_exactly_its_own_rows() -> None:
    instance = FakeInstance()
    async with serving(instance) as scheduler:
        instance.hold()
        first = send(scheduler, rows(100))
        await instance.entered()
        inputs = [rows(1), rows(2, 3), rows(4, 5, 6), rows(7)]
        futures = [send(scheduler, x) for x in inputs]
        instance.release()
        assert (await result(first))["double"].tolist() == [[200]]
        for x, future in zip(inputs, futures, strict=True):
            out = await result(future)
            np.testing.assert_array_equal(out["double"], x * 2)
            np.testing.assert_array_equal(out["plus_one"], x + 1)
        # The four queued requests ran as one batch of seven rows, in arrival order.
        assert instance.batch_rows == [1, 7]
        np.testing.assert_array_equal(instance.batches[1], np.concatenate(inputs))


@pytest.mark.asyncio
async def test_each_request_gets_only_the_outputs_it_asked_for() -> None:
    instance = FakeInstance()
    async with serving(instance) as scheduler:
        instance.hold()
        warmup = send(scheduler, rows(0))
        await instance.entered()
        a = send(scheduler, rows(1), ("double",))
        b = send(scheduler, rows(2, 3), ("plus_one",))
        c = send(scheduler, rows(4), ("plus_one", "double"))
        instance.release()
        await result(warmup)
        out_a, out_b, out_c = await result(a), await result(b), await result(c)
        assert set(out_a) == {"double"} and out_a["double"].tolist() == [[2]]
        assert set(out_b) == {"plus_one"} and out_b["plus_one"].tolist() == [[3], [4]]
        assert set(out_c) == {"double", "plus_one"}
        assert out_c["double"].tolist() == [[8]] and out_c["plus_one"].tolist() == [[5]]
        # They shared one batch, which computed the union of the outputs, in model order.
        assert instance.batch_rows == [1, 4]
        assert instance.asked[1] == ["double", "plus_one"]


@pytest.mark.asyncio
async def test_only_the_wanted_outputs_are_computed() -> None:
    instance = FakeInstance()
    async with serving(instance) as scheduler:
        await result(send(scheduler, rows(1), ("plus_one",)))
        assert instance.asked == [["plus_one"]]


@pytest.mark.asyncio
async def test_an_idle_scheduler_runs_a_request_at_once() -> None:
    instance = FakeInstance()
    async with serving(instance, max_queue_delay_s=0.0) as scheduler:
        out = await result(send(scheduler, rows(5)))
        assert out["double"].tolist() == [[10]]
        assert instance.batch_rows == [1]


# -- batching while busy ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_next_batch_gathers_while_one_runs() -> None:
    instance = FakeInstance()
    async with serving(instance, max_batch_size=4) as scheduler:
        instance.hold()
        running = send(scheduler, rows(0))
        await instance.entered()
        queued = [send(scheduler, rows(i)) for i in range(1, 7)]
        assert scheduler.queue_depth == 6  # nothing else started: the instance is busy
        instance.release()
        await asyncio.gather(*(result(f) for f in [running, *queued]))
        # Never more than max_batch_size rows; the queue emptied in two more batches.
        assert instance.batch_rows == [1, 4, 2]
        assert [b.ravel().tolist() for b in instance.batches] == [[0], [1, 2, 3, 4], [5, 6]]


@pytest.mark.asyncio
async def test_different_shapes_run_in_separate_batches() -> None:
    instance = FakeInstance()

    async with serving(instance) as scheduler:
        instance.hold()
        first = send(scheduler, rows(0))
        await instance.entered()
        narrow = send(scheduler, rows(1), shape_key="narrow")
        wide = send(scheduler, rows(2), shape_key="wide")
        narrow2 = send(scheduler, rows(3), shape_key="narrow")
        instance.release()
        for future in (first, narrow, wide, narrow2):
            await result(future)
        assert [b.ravel().tolist() for b in instance.batches] == [[0], [1, 3], [2]]


@pytest.mark.asyncio
async def test_two_instances_run_batches_concurrently() -> None:
    one, two = FakeInstance(), FakeInstance()
    async with serving(one, two) as scheduler:
        one.hold()
        two.hold()
        a = send(scheduler, rows(1))
        # Dispatch waits for the handlers already runnable; then `a` is on an instance.
        await until(lambda: scheduler.queue_depth == 0, "a to start")
        b = send(scheduler, rows(2))
        await one.entered()
        await two.entered()  # both run at the same time
        assert scheduler.queue_depth == 0
        one.release()
        two.release()
        assert (await result(a))["double"].tolist() == [[2]]
        assert (await result(b))["double"].tolist() == [[4]]
        assert sorted(one.batch_rows + two.batch_rows) == [1, 1]


# -- failures ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_failing_run_fails_only_the_request_that_fails_alone() -> None:
    instance = FakeInstance()
    instance.fail_on_negative = True
    recorder = Recorder()
    async with serving(instance, observers=[recorder]) as scheduler:
        instance.hold()
        good_before = send(scheduler, rows(1))
        await instance.entered()
        bad = send(scheduler, rows(-1))
        bad_neighbour = send(scheduler, rows(2))  # shares the failing batch
        instance.release()
        assert (await result(good_before))["double"].tolist() == [[2]]
        error = await error_of(bad)
        assert error.kind is ErrorKind.INTERNAL
        assert "kaboom: negative input" in error.message
        assert "'fake'" in error.message
        # Run again in halves, the neighbour gets its answer.
        assert (await result(bad_neighbour))["double"].tolist() == [[4]]
        # The model keeps serving.
        after = await result(send(scheduler, rows(3)))
        assert after["double"].tolist() == [[6]]
        # The batch that failed counts as run, for the request it answered.
        assert [(t.failed, t.requests) for t in recorder.timings] == [
            (False, 1), (False, 1), (False, 1)
        ]
        assert instance.batch_rows == [1, 2, 1, 1, 1]


@pytest.mark.asyncio
async def test_a_batch_whose_every_request_fails_alone_counts_as_failed() -> None:
    instance = FakeInstance()
    instance.fail_on_negative = True
    recorder = Recorder()
    async with serving(instance, observers=[recorder]) as scheduler:
        instance.hold()
        good_before = send(scheduler, rows(1))
        await instance.entered()
        doomed = [send(scheduler, rows(-1)), send(scheduler, rows(-2))]
        instance.release()
        await result(good_before)
        for future in doomed:
            assert (await error_of(future)).kind is ErrorKind.INTERNAL
        assert [t.failed for t in recorder.timings] == [False, True]


@pytest.mark.asyncio
async def test_outputs_without_the_batch_rows_fail_the_batch_as_internal() -> None:
    instance = FakeInstance()
    instance.rows_returned = 1
    async with serving(instance) as scheduler:
        instance.hold()
        first = send(scheduler, rows(1))
        await instance.entered()
        future = send(scheduler, rows(1, 2))
        instance.release()
        await result(first)  # one row in, one row out: fine
        error = await error_of(future)
        assert error.kind is ErrorKind.INTERNAL
        assert "output 'double'" in error.message and "2 rows" in error.message


@pytest.mark.asyncio
async def test_a_request_that_cannot_be_queued_is_refused_at_submit() -> None:
    instance = FakeInstance()
    async with serving(instance, max_batch_size=2, max_queue_size=1) as scheduler:
        with pytest.raises(FerryError) as caught:
            send(scheduler, rows(1, 2, 3))
        assert caught.value.kind is ErrorKind.INVALID_INPUT
        instance.hold()
        running = send(scheduler, rows(1))
        await instance.entered()
        queued = send(scheduler, rows(2))
        with pytest.raises(FerryError) as caught:
            send(scheduler, rows(3))
        assert caught.value.kind is ErrorKind.QUEUE_FULL
        instance.release()
        await result(running)
        await result(queued)
        assert instance.batch_rows == [1, 1]


# -- cancellation -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_cancelled_requests_leave_the_queue_and_never_reach_the_instance() -> None:
    instance = FakeInstance()
    async with serving(instance) as scheduler:
        instance.hold()
        running = send(scheduler, rows(0))
        await instance.entered()
        gone = send(scheduler, rows(1))
        kept = send(scheduler, rows(2))
        gone2 = send(scheduler, rows(3))
        assert scheduler.queue_depth == 3
        gone.cancel()
        gone2.cancel()
        await until(lambda: scheduler.queue_depth == 1, "the cancelled requests to leave")
        instance.release()
        await result(running)
        assert (await result(kept))["double"].tolist() == [[4]]
        assert [b.ravel().tolist() for b in instance.batches] == [[0], [2]]


@pytest.mark.asyncio
async def test_cancelling_a_running_request_leaves_its_batch_neighbours_answered() -> None:
    instance = FakeInstance()
    async with serving(instance, max_batch_size=2, max_queue_delay_s=3600.0) as scheduler:
        instance.hold()
        a, b = send(scheduler, rows(1)), send(scheduler, rows(2))  # a full batch: it runs
        await instance.entered()
        assert a.cancel()
        instance.release()
        assert (await result(b))["double"].tolist() == [[4]]
        assert a.cancelled()


# -- deadlines --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_expired_requests_are_answered_without_computing_while_the_instance_is_busy() -> (
    None
):
    clock = FakeClock()
    instance = FakeInstance()
    async with serving(instance, clock=clock) as scheduler:
        instance.hold()
        running = send(scheduler, rows(0))
        await instance.entered()
        # Deadlines far away in real time: only the fake clock makes them pass.
        late = send(scheduler, rows(1), deadline_s=clock.now + 60)
        on_time = send(scheduler, rows(2), deadline_s=clock.now + 600)
        patient = send(scheduler, rows(3))
        clock.advance(61)
        scheduler.poke()
        error = await error_of(late)  # answered while the instance is still held
        assert error.kind is ErrorKind.DEADLINE_EXCEEDED
        assert "'fake'" in error.message
        assert not running.done()
        instance.release()
        await result(running)
        await result(on_time)
        await result(patient)
        assert [b.ravel().tolist() for b in instance.batches] == [[0], [2, 3]]


@pytest.mark.asyncio
async def test_the_deadline_timer_answers_an_expired_request_by_itself() -> None:
    clock = FakeClock()
    instance = FakeInstance()
    async with serving(instance, clock=clock) as scheduler:
        instance.hold()
        running = send(scheduler, rows(0))
        await instance.entered()
        # The timer is armed for 10 ms of real time; by then the fake clock is far past.
        late = send(scheduler, rows(1), deadline_s=clock.now + 0.01)
        clock.advance(1.0)
        error = await error_of(late)
        assert error.kind is ErrorKind.DEADLINE_EXCEEDED
        instance.release()
        await result(running)
        assert instance.batch_rows == [1]


@pytest.mark.asyncio
async def test_a_request_waiting_for_its_batch_expires_at_its_deadline() -> None:
    clock = FakeClock()
    instance = FakeInstance()
    async with serving(instance, clock=clock, max_queue_delay_s=3600.0) as scheduler:
        waiting = send(scheduler, rows(1), deadline_s=clock.now + 5)
        assert scheduler.queue_depth == 1  # the queue delay holds it; the instance is idle
        clock.advance(5)
        scheduler.poke()
        assert (await error_of(waiting)).kind is ErrorKind.DEADLINE_EXCEEDED
        assert scheduler.queue_depth == 0
        assert instance.batches == []


@pytest.mark.asyncio
async def test_a_request_already_past_its_deadline_never_runs() -> None:
    clock = FakeClock()
    instance = FakeInstance()
    async with serving(instance, clock=clock) as scheduler:
        late = send(scheduler, rows(1), deadline_s=clock.now - 1)
        assert (await error_of(late)).kind is ErrorKind.DEADLINE_EXCEEDED
        ok = await result(send(scheduler, rows(2)))
        assert ok["double"].tolist() == [[4]]
        assert instance.batch_rows == [1]


@pytest.mark.asyncio
async def test_queue_delay_follows_the_injected_clock() -> None:
    clock = FakeClock()
    instance = FakeInstance()
    async with serving(instance, clock=clock, max_queue_delay_s=3600.0) as scheduler:
        a = send(scheduler, rows(1))
        clock.advance(1800)
        b = send(scheduler, rows(2))
        scheduler.poke()
        assert scheduler.queue_depth == 2 and instance.batches == []
        clock.advance(1800)  # the oldest has now waited the delay
        scheduler.poke()
        await result(a)
        await result(b)
        assert instance.batch_rows == [2]


# -- shutting down ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_close_finishes_queued_work_and_refuses_new_work() -> None:
    instance = FakeInstance()
    async with serving(instance, max_batch_size=2) as scheduler:
        instance.hold()
        futures = [send(scheduler, rows(0))]
        await instance.entered()
        futures += [send(scheduler, rows(i)) for i in range(1, 4)]
        closing = asyncio.ensure_future(scheduler.close(grace_s=SAFETY_S))
        await asyncio.sleep(0)  # let close() begin
        with pytest.raises(FerryError) as caught:
            send(scheduler, rows(9))
        assert caught.value.kind is ErrorKind.UNAVAILABLE
        assert not closing.done()
        instance.release()
        await asyncio.wait_for(closing, SAFETY_S)
        for i, future in enumerate(futures):
            assert (await result(future))["double"].tolist() == [[2 * i]]
        assert instance.batch_rows == [1, 2, 1]


@pytest.mark.asyncio
async def test_abort_answers_queued_and_running_requests_unavailable() -> None:
    instance = FakeInstance()
    async with serving(instance) as scheduler:
        instance.hold()
        running = send(scheduler, rows(0))
        await instance.entered()
        queued = send(scheduler, rows(1))
        scheduler.abort("the server is stopping")
        for future in (running, queued):
            error = await error_of(future)
            assert error.kind is ErrorKind.UNAVAILABLE
            assert "the server is stopping" in error.message
        assert scheduler.queue_depth == 0
        with pytest.raises(FerryError) as caught:
            send(scheduler, rows(2))
        assert caught.value.kind is ErrorKind.UNAVAILABLE
        instance.release()
    assert instance.batch_rows in ([], [1])  # the running batch may finish; never the queued


@pytest.mark.asyncio
async def test_close_after_its_grace_answers_what_is_left_unavailable() -> None:
    instance = FakeInstance()
    async with serving(instance) as scheduler:
        instance.hold()
        running = send(scheduler, rows(0))
        await instance.entered()
        queued = send(scheduler, rows(1))
        await asyncio.wait_for(scheduler.close(grace_s=0.0), SAFETY_S)
        assert (await error_of(running)).kind is ErrorKind.UNAVAILABLE
        assert (await error_of(queued)).kind is ErrorKind.UNAVAILABLE


# -- models that do not batch -----------------------------------------------------------


@pytest.mark.asyncio
async def test_a_model_that_does_not_batch_runs_one_request_at_a_time() -> None:
    instance = FakeInstance()
    async with serving(instance, batchable=False, max_batch_size=1) as scheduler:
        instance.hold()
        inputs = [rows(1, 2), rows(3), rows(4, 5, 6)]  # whole tensors, no batch axis
        futures = [
            scheduler.submit({"x": x}, OUTPUTS, rows=len(x), shape_key=x.shape)
            for x in inputs
        ]
        await instance.entered()
        assert scheduler.queue_depth == 2
        instance.release()
        for x, future in zip(inputs, futures, strict=True):
            np.testing.assert_array_equal((await result(future))["double"], x * 2)
        assert instance.batch_rows == [2, 1, 3]
        for x, ran in zip(inputs, instance.batches, strict=True):
            np.testing.assert_array_equal(ran, x)


# -- observers --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_observers_receive_the_timings_of_each_batch() -> None:
    instance = FakeInstance()
    first, second = Recorder(), Recorder()
    async with serving(instance, observers=[first, second]) as scheduler:
        instance.hold()
        futures = [send(scheduler, rows(0))]
        await instance.entered()
        futures += [send(scheduler, rows(1, 2)), send(scheduler, rows(3))]
        instance.release()
        for future in futures:
            await result(future)
        await until(lambda: len(first.timings) == 2, "both batches to be reported")
    assert first.timings == second.timings
    one, two = first.timings
    assert (one.rows, one.requests, len(one.queue_ns), one.failed) == (1, 1, 1, False)
    assert (two.rows, two.requests, len(two.queue_ns), two.failed) == (3, 2, 2, False)
    for timings in (one, two):
        assert all(ns >= 0 for ns in timings.queue_ns)
        assert min(timings.input_ns, timings.infer_ns, timings.output_ns) >= 0


# -- running a lone request on the event loop --------------------------------------------


class LoopSafeInstance(FakeInstance):
    """A fake that declares it may run on the event loop, and records where it ran."""

    may_run_on_loop = True

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def run(self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]) -> Tensors:
        self.threads.append(threading.current_thread().name)
        return super().run(inputs, output_names)


@pytest.mark.asyncio
async def test_a_lone_request_on_an_idle_fast_model_runs_on_the_loop() -> None:
    instance = LoopSafeInstance()
    loop_thread = threading.current_thread().name
    # Every execution measures 500 us on any machine: under the 1 ms limit for a lone
    # request on an idle model, over the 200 us limit for batches under load.
    async with serving(instance, timer=FakeTimer(step_ns=500_000)) as scheduler:
        # The first batch runs on the instance's thread: its cost is not known yet.
        assert (await result(send(scheduler, rows(1))))["double"].tolist() == [[2]]
        assert instance.threads[-1] != loop_thread
        # Now it is known to be short, and nothing else is waiting: no thread hand-off.
        assert (await result(send(scheduler, rows(2))))["double"].tolist() == [[4]]
        assert instance.threads[-1] == loop_thread
        # Several requests at once are a batch for the thread, never for the loop.
        both = [send(scheduler, rows(3)), send(scheduler, rows(4))]
        assert [(await result(f))["double"].tolist() for f in both] == [[[6]], [[8]]]
        assert instance.batch_rows[-1] == 2
        assert instance.threads[-1] != loop_thread


@pytest.mark.asyncio
async def test_under_load_a_very_fast_models_batches_run_on_the_loop() -> None:
    instance = LoopSafeInstance()
    loop_thread = threading.current_thread().name
    # Every execution measures 1 us: cheaper than any hand-off to a thread.
    async with serving(instance, timer=FakeTimer(step_ns=1_000)) as scheduler:
        assert (await result(send(scheduler, rows(1))))["double"].tolist() == [[2]]
        assert instance.threads[-1] != loop_thread  # the first batch: cost unknown
        many = [send(scheduler, rows(value)) for value in range(2, 30)]
        answers = [(await result(f))["double"].tolist() for f in many]
        assert answers == [[[2 * value]] for value in range(2, 30)]
        assert instance.threads[1:] == [loop_thread] * (len(instance.threads) - 1)
        assert sum(instance.batch_rows[1:]) == 28
        assert max(instance.batch_rows) == 8  # still batched, up to max_batch_size


@pytest.mark.asyncio
async def test_many_inline_batches_in_a_row_do_not_nest() -> None:
    # Each request has its own shape, so each is a batch of its own: hundreds of inline
    # batches from one dispatch must run one after another, not one call deeper each.
    instance = LoopSafeInstance()
    async with serving(instance, timer=FakeTimer(step_ns=1_000)) as scheduler:
        await result(send(scheduler, rows(1)))
        futures = [
            send(scheduler, np.full((1, width), 1.0, dtype=np.float32))
            for width in range(1, 1500)
        ]
        done = [await result(f) for f in futures]
        assert [d["double"].shape for d in done] == [(1, w) for w in range(1, 1500)]


@pytest.mark.asyncio
async def test_no_inline_run_for_slow_models_or_when_turned_off() -> None:
    instance = LoopSafeInstance()
    loop_thread = threading.current_thread().name
    scheduler = ModelScheduler(
        "fake", BatchPolicy(max_batch_size=8), executors([instance]), OUTPUTS,
        clock=FakeClock(), inline_max_s=0.0,
    )
    scheduler.start()
    try:
        for value in (1, 2, 3):
            await result(send(scheduler, rows(value)))
        assert loop_thread not in instance.threads
    finally:
        await scheduler.close(grace_s=SAFETY_S)


# -- gathering (no queue delay, a fast model) -------------------------------------------


def gathering(
    instance: FakeInstance,
    clock: FakeClock | None = None,
    *,
    step_ns: int = 1_000,
    adaptive_delay_s: float = 0.001,
) -> AbstractAsyncContextManager[ModelScheduler]:
    """A scheduler whose batches each measure `step_ns`, with the adaptive delay on."""
    return serving(
        instance, clock=clock or FakeClock(), timer=FakeTimer(step_ns=step_ns),
        adaptive_delay_s=adaptive_delay_s,
    )


async def burst_then_lone(
    scheduler: ModelScheduler, burst: int
) -> asyncio.Future[Tensors]:
    """Teach the scheduler a load of `burst` requests, then send one more alone."""
    assert (await result(send(scheduler, rows(1))))["double"].tolist() == [[2]]
    together = [send(scheduler, rows(value)) for value in range(burst)]
    for value, future in enumerate(together):
        assert (await result(future))["double"].tolist() == [[2 * value]]
    lone = send(scheduler, rows(100))
    scheduler.poke()
    return lone


@pytest.mark.asyncio
async def test_after_a_burst_a_fast_models_lone_request_waits_for_the_rows_expected() -> None:
    clock = FakeClock()
    instance = LoopSafeInstance()
    async with gathering(instance, clock) as scheduler:
        assert scheduler.gather_target == 1
        lone = await burst_then_lone(scheduler, 4)
        assert scheduler.gather_target == 4
        assert not lone.done() and scheduler.queue_depth == 1  # held for 4 rows
        more = [send(scheduler, rows(value)) for value in (101, 102, 103)]
        scheduler.poke()  # the 4 rows it waited for: the batch goes without the delay
        answers = [(await result(f))["double"].tolist() for f in (lone, *more)]
        assert answers == [[[200]], [[202]], [[204]], [[206]]]
        assert instance.batch_rows[-1] == 4
        # Alone again: it waits the adaptive delay once, and the target is back at one.
        lone = send(scheduler, rows(7))
        scheduler.poke()
        assert not lone.done()
        clock.advance(0.001)
        scheduler.poke()
        assert (await result(lone))["double"].tolist() == [[14]]
        assert scheduler.gather_target == 1
        assert (await result(send(scheduler, rows(8))))["double"].tolist() == [[16]]


@pytest.mark.asyncio
async def test_a_held_request_runs_at_once_when_the_model_drains() -> None:
    instance = LoopSafeInstance()
    async with gathering(instance) as scheduler:
        lone = await burst_then_lone(scheduler, 4)
        assert not lone.done()
        closing = asyncio.ensure_future(scheduler.close(grace_s=SAFETY_S))
        # The clock stands still: only the drain can have let it go.
        assert (await result(lone))["double"].tolist() == [[200]]
        await closing


@pytest.mark.asyncio
async def test_a_model_whose_batches_run_on_threads_never_holds_a_request() -> None:
    instance = LoopSafeInstance()
    # 500 us per batch: over the 200 us under which batches run on the loop under load.
    async with gathering(instance, step_ns=500_000) as scheduler:
        lone = await burst_then_lone(scheduler, 4)
        assert (await result(lone))["double"].tolist() == [[200]]  # the clock never moved


@pytest.mark.asyncio
async def test_without_an_adaptive_delay_nothing_is_held() -> None:
    instance = LoopSafeInstance()
    async with gathering(instance, adaptive_delay_s=0.0) as scheduler:
        lone = await burst_then_lone(scheduler, 4)
        assert (await result(lone))["double"].tolist() == [[200]]
        assert scheduler.gather_target == 1


@pytest.mark.asyncio
async def test_a_request_whose_deadline_would_pass_while_held_runs_at_once() -> None:
    """An instance is free: holding a request past its deadline would fail it for nothing,
    so a batch with such a request goes now, the held request with it."""
    clock = FakeClock()
    instance = LoopSafeInstance()
    async with gathering(instance, clock) as scheduler:
        lone = await burst_then_lone(scheduler, 4)  # teaches the target; lone is held
        assert not lone.done()
        short = send(scheduler, rows(9), deadline_s=clock.now + 0.0005)
        scheduler.poke()
        assert (await result(short))["double"].tolist() == [[18]]
        assert (await result(lone))["double"].tolist() == [[200]]
        assert instance.batch_rows[-1] == 2


@pytest.mark.asyncio
async def test_a_request_with_a_distant_deadline_is_still_held() -> None:
    clock = FakeClock()
    instance = LoopSafeInstance()
    async with gathering(instance, clock) as scheduler:
        await burst_then_lone(scheduler, 4)
        patient = send(scheduler, rows(9), deadline_s=clock.now + 1.0)
        scheduler.poke()
        assert not patient.done() and scheduler.queue_depth == 2
        clock.advance(0.001)  # the adaptive delay
        scheduler.poke()
        assert (await result(patient))["double"].tolist() == [[18]]


@pytest.mark.asyncio
async def test_a_held_batch_waits_without_spinning() -> None:
    """The loop's timer fires about once a millisecond while a batch is held and the
    clock stands still: a wake-up time in the past would spin the loop."""
    clock = CountingClock()
    instance = LoopSafeInstance()
    async with gathering(instance, clock) as scheduler:
        held = await burst_then_lone(scheduler, 4)
        assert not held.done()
        reads = clock.reads
        # Real time on purpose: what is under test is how often the loop's timer fires.
        await asyncio.sleep(0.02)
        assert not held.done()
        assert clock.reads - reads <= 40, f"{clock.reads - reads} wake-ups in 20 ms"
        clock.advance(0.001)
        scheduler.poke()
        assert (await result(held))["double"].tolist() == [[200]]


@pytest.mark.asyncio
async def test_a_caller_with_short_timeouts_is_never_failed_by_a_hold() -> None:
    """After a burst, one caller whose requests carry a 500 us timeout: each runs at
    once on the free instance instead of being held until it expires."""
    clock = FakeClock()
    instance = LoopSafeInstance()
    async with gathering(instance, clock) as scheduler:
        assert (await result(send(scheduler, rows(1))))["double"].tolist() == [[2]]
        burst = [send(scheduler, rows(value)) for value in range(4)]
        await asyncio.gather(*(result(future) for future in burst))
        assert scheduler.gather_target == 4
        for turn in range(5):
            clock.advance(0.01)
            short = send(scheduler, rows(turn), deadline_s=clock.now + 0.0005)
            scheduler.poke()
            assert (await result(short))["double"].tolist() == [[2 * turn]]


@pytest.mark.asyncio
async def test_a_cancelled_held_request_leaves_the_queue_and_never_runs() -> None:
    clock = FakeClock()
    instance = LoopSafeInstance()
    async with gathering(instance, clock) as scheduler:
        lone = await burst_then_lone(scheduler, 4)
        ran = len(instance.batches)
        lone.cancel()
        await asyncio.sleep(0)  # the cancellation callback runs on the loop
        assert scheduler.queue_depth == 0
        clock.advance(0.001)
        scheduler.poke()
        assert len(instance.batches) == ran

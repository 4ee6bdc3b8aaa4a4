"""The asyncio driver of one model's batch queue.

Event-loop code only (design A of `server.batching`): handlers call `submit`, which
queues the request and returns a future; the queue is asked for a batch whenever
something changes (a submit, a finished batch, a timer) and an executor is free, and the
batch goes to that executor's lane (`server.executor`), which runs it on its own thread
and reports back on the loop. Every path out of an execution, exceptions included,
resolves every future of its batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from .batching import Batch, BatchPolicy, BatchQueue, PendingRequest
from .errors import CALLERS_RUN_ERRORS, ErrorKind, FerryError
from .event_loop import timer_delay
from .executor import BatchExecutor, BatchItem, ExecutedBatch, ExecutionLane, Outcome
from .rows import Tensors

log = logging.getLogger(__name__)


class BatchTimings(NamedTuple):  # one per batch: a tuple is the cheapest record to build
    """What one execution cost, in nanoseconds; queue times are per request."""

    rows: int
    requests: int
    queue_ns: tuple[int, ...]
    input_ns: int
    infer_ns: int
    output_ns: int
    failed: bool
    padded_rows: int = 0  # rows of padding the instance ran to reach a batch bucket
    # A padding model's positions along its padded axis (see ExecutedBatch).
    real_elements: int = 0
    padded_elements: int = 0
    # Rows whose callers got them: fewer than `rows` when a caller left (cancelled, or
    # its deadline passed) while its batch ran. None: every row. `requests` and
    # `queue_ns` count only the answered requests.
    answered_rows: int | None = None


class BatchObserver(Protocol):
    def batch_executed(self, timings: BatchTimings) -> None: ...


@dataclass(slots=True, eq=False)
class Work:
    """The payload of a queued request."""

    inputs: Tensors
    outputs: tuple[str, ...]
    future: asyncio.Future[Tensors]
    arrival_ns: int = field(default_factory=time.perf_counter_ns)


@dataclass(slots=True, eq=False)
class _Running:
    lane: ExecutionLane
    batch: Batch[Work]
    start_ns: int


# A lone request on an idle model whose batches take less than this runs on the event
# loop (see ModelScheduler._may_run_inline); 0 turns that off.
DEFAULT_INLINE_MAX_S = 0.001
# Under load, batches of a model this fast run on the event loop too: the hand-off to a
# worker thread and back costs more than the batch itself.
DEFAULT_INLINE_BUSY_MAX_S = 0.0002


def _resolve(future: asyncio.Future[Tensors], value: Tensors | BaseException) -> None:
    """Settle a future unless its caller already left (deadline, cancellation)."""
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


class ModelScheduler:
    """Batches one model's requests and runs them on its instances."""

    def __init__(
        self,
        name: str,
        policy: BatchPolicy,
        executors: Sequence[BatchExecutor],
        output_names: Sequence[str],
        *,
        batchable: bool = True,
        clock: Callable[[], float] = time.monotonic,
        observers: Sequence[BatchObserver] = (),
        inline_max_s: float = DEFAULT_INLINE_MAX_S,
        inline_busy_max_s: float = DEFAULT_INLINE_BUSY_MAX_S,
    ) -> None:
        if not executors:
            raise ValueError("a model needs at least one executor")
        self.name = name
        self.batchable = batchable
        self._queue: BatchQueue[Work] = BatchQueue(policy)
        self._clock = clock
        self._output_order = tuple(output_names)
        self._observers = tuple(observers)
        self._inline_max_s = inline_max_s
        self._inline_busy_max_s = min(inline_busy_max_s, inline_max_s)
        self._lanes = [
            ExecutionLane(executor, f"ferry-{name}-{index}")
            for index, executor in enumerate(executors)
        ]
        # Every executor must promise it may run on the loop's thread (a wrapper that
        # blocks, like the tests' gates, must not).
        self._inline_capable = all(lane.may_run_on_loop for lane in self._lanes)
        self._dispatch_pending = False
        # Unknown until a batch has run on a thread: the first never runs inline.
        self._recent_infer_s = float("inf")
        self._free = list(self._lanes)
        self._inflight: dict[int, _Running] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._accepting = True
        self._gathering = True  # off once a drain has begun: no more requests are coming
        self._aborted = False
        self._idle_event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop

    @property
    def policy(self) -> BatchPolicy:
        return self._queue.policy

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def gather_target(self) -> int:
        """The requests a batch waits for while the model may gather (`server.gathering`)."""
        return self._queue.gather_target

    @property
    def busy(self) -> bool:
        return bool(self._queue) or (bool(self._inflight) and not self._aborted)

    def start(self) -> None:
        """Bind to the running event loop; call once, from the loop, before submit."""
        self._loop = asyncio.get_running_loop()

    def submit(
        self,
        inputs: Tensors,
        outputs: tuple[str, ...],
        *,
        rows: int,
        shape_key: object,
        deadline_s: float | None = None,
        priority: int = 1,
        length: int = 0,
    ) -> asyncio.Future[Tensors]:
        """Queue one request; the future resolves to its own output rows.

        Raises FerryError at once when the request cannot be queued. Cancelling the
        future (as grpc.aio does when the caller leaves) takes it out of the queue.
        """
        if not self._accepting:
            raise FerryError(ErrorKind.UNAVAILABLE, f"model '{self.name}' is shutting down")
        future: asyncio.Future[Tensors] = self._loop.create_future()
        batchable = self.batchable
        pending = PendingRequest(
            Work(inputs, outputs, future, time.perf_counter_ns()),
            rows if batchable else 1,
            shape_key if batchable else object(),
            self._clock(),
            deadline_s,
            priority,
            length,
        )
        self._queue.submit(pending)
        future.add_done_callback(lambda f: self._on_settled(f, pending))
        # Dispatch once the handlers that are already runnable have queued their
        # requests too: they join this batch instead of each starting its own.
        if not self._dispatch_pending:
            self._dispatch_pending = True
            self._loop.call_soon(self._deferred_dispatch)
        return future

    def stop_gathering(self) -> None:
        """A drain has begun (the requests it lets in still come, but no more after them):
        a batch held for more requests goes now, and none is held again."""
        self._gathering = False
        self._dispatch()

    def _deferred_dispatch(self) -> None:
        self._dispatch_pending = False
        self._dispatch()

    async def close(self, grace_s: float | None = None) -> None:
        """Stop taking requests, finish the queued ones, then stop the threads.

        After `grace_s` seconds whatever is still queued or running is answered
        UNAVAILABLE.
        """
        self._accepting = False
        self._dispatch()  # a batch held for more rows goes now: no more are coming
        try:
            await asyncio.wait_for(self._idle(), grace_s)
        except TimeoutError:
            self.abort(
                "model stopped before the request ran",
                running_reason="the server stopped while the request's batch was running "
                "(its shutdown grace period ended); the result was not kept",
            )
        if self._timer is not None:
            self._timer.cancel()
        for lane in self._lanes:
            lane.stop()

    def join_threads(self, timeout_s: float | None = None) -> bool:
        """After close(): wait for batches still running on the lanes' threads to end."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for lane in self._lanes:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not lane.join(left):
                return False
        return True

    def abort(self, reason: str, running_reason: str | None = None) -> None:
        """Answer everything queued or running with UNAVAILABLE, at once; the callers of
        running batches are told `running_reason` when given."""
        self._accepting = False
        self._aborted = True
        error = FerryError(ErrorKind.UNAVAILABLE, f"model '{self.name}': {reason}")
        for pending in self._queue.drain():
            _resolve(pending.payload.future, error)
        if running_reason is not None:
            error = FerryError(ErrorKind.UNAVAILABLE, f"model '{self.name}': {running_reason}")
        for running in self._inflight.values():
            for pending in running.batch.requests:
                _resolve(pending.payload.future, error)
        self._notify_if_idle()

    def poke(self) -> None:
        """Re-evaluate the queue now (timers do this by themselves; tests with a fake
        clock call it after moving time forward)."""
        self._dispatch()

    async def _idle(self) -> None:
        while self.busy:
            self._idle_event.clear()
            await self._idle_event.wait()

    def _notify_if_idle(self) -> None:
        # After abort() the running batches' callers are already answered: close() need
        # not wait for the threads to come back.
        if not self._queue and (not self._inflight or self._aborted):
            self._idle_event.set()

    def _on_settled(self, future: asyncio.Future[Tensors], pending: PendingRequest[Work]) -> None:
        if future.cancelled() and self._queue.discard(pending):
            # The request that left may have been what held a batch back.
            self._dispatch()

    def _dispatch(self) -> None:
        """Answer expired requests, start every batch an idle instance can take, and
        arm a timer for the next moment the answer may change."""
        queue = self._queue
        now = self._clock()
        for pending in queue.expire(now):
            _resolve(
                pending.payload.future,
                FerryError(
                    ErrorKind.DEADLINE_EXCEEDED,
                    f"request timed out after waiting in the queue of model '{self.name}'",
                ),
            )
        gather = self._may_gather()
        while self._free and queue:
            batch = queue.take_batch(now, gather)
            if batch is None:
                break
            if self._may_run_inline(batch):
                self._run_inline(self._free.pop(), batch)
            else:
                self._start(self._free.pop(), batch)
        # With every instance busy only deadlines matter: expired requests are
        # answered on time, not when an instance frees up.
        wakeup_at = queue.next_wakeup(now) if self._free else queue.next_deadline()
        if wakeup_at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if wakeup_at is not None:
                self._timer = self._loop.call_later(timer_delay(wakeup_at - now), self._on_timer)
            self._timer_at = wakeup_at
        self._notify_if_idle()

    def _may_gather(self) -> bool:
        """Whether a batch with no queue delay may wait for the requests it expects
        (`server.gathering`): only for a model fast enough to run its batches on the
        loop, where each batch's fixed cost is most of a request's, and never while the
        model drains."""
        return (
            self._gathering
            and self._accepting
            and self._inline_capable
            and self._recent_infer_s <= self._inline_busy_max_s
        )

    def _may_run_inline(self, batch: Batch[Work]) -> bool:
        """Whether a batch may run right here on the event loop instead of its thread.

        The hand-off to a worker thread and back (a queue put, a wake-up, and
        `call_soon_threadsafe` through the loop's self-pipe) costs tens of microseconds of
        CPU: more than a small model's whole batch. So a batch runs on the loop when the
        model's recent executions took at most `inline_busy_max_s`, or, for a lone request
        on an idle model (nothing else running or queued, so nobody waits for the loop),
        at most `inline_max_s`. Slower batches go to the executor threads, so that the
        loop keeps reading requests while the model computes. The first batch always runs
        on a thread: its cost is not known yet.
        """
        if not self._inline_capable:
            return False
        recent = self._recent_infer_s
        if recent <= self._inline_busy_max_s:
            return True
        return (
            recent <= self._inline_max_s
            and len(batch.requests) == 1
            and not self._inflight
            and not self._queue
        )

    def _items(self, batch: Batch[Work]) -> tuple[list[BatchItem], list[str]]:
        """Each request's part of a batch, and the outputs the batch must compute."""
        items = [
            BatchItem(r.payload.inputs, r.rows, r.payload.outputs, r.length)
            for r in batch.requests
        ]
        wanted = {name for item in items for name in item.outputs}
        return items, [name for name in self._output_order if name in wanted]

    def _run_inline(self, lane: ExecutionLane, batch: Batch[Work]) -> None:
        # Not in _inflight: it is over before anything else on the loop can look.
        running = _Running(lane, batch, time.perf_counter_ns())
        # The caller (_dispatch) goes on taking batches: no re-dispatch from in here, which
        # would nest one call deeper per batch.
        self._finish(running, lane.run_here(*self._items(batch)), redispatch=False)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._dispatch()

    def _start(self, lane: ExecutionLane, batch: Batch[Work]) -> None:
        running = _Running(lane, batch, time.perf_counter_ns())
        self._inflight[id(running)] = running
        items, output_names = self._items(batch)
        lane.start(items, output_names, self._loop, lambda outcome: self._finish(running, outcome))

    def _finish(self, running: _Running, outcome: Outcome, redispatch: bool = True) -> None:
        """Back on the loop: answer every request of the batch, whatever happened."""
        self._inflight.pop(id(running), None)
        batch = running.batch
        requests = batch.requests
        start_ns = running.start_ns
        if not isinstance(outcome, ExecutedBatch):
            error = self._execution_error(outcome)
            # A failure the caller's request caused (values the model refuses, a run past
            # --max-run-memory) is the rejection log's, which is rate-limited: a line
            # here for each would let one client write the log as fast as it sends.
            report = log.debug if error.kind in CALLERS_RUN_ERRORS else log.error
            report(
                "model '%s': batch of %d rows from %d requests failed: %s",
                self.name, batch.rows, len(requests), error.message,
            )
            for pending in requests:
                _resolve(pending.payload.future, error)
            record = BatchTimings(
                batch.rows, len(requests),
                tuple([start_ns - r.payload.arrival_ns for r in requests]), 0, 0, 0, True,
            )
        else:
            partly = False
            left: list[PendingRequest[Work]] | None = None  # ran, but their callers had gone
            for pending, result in zip(requests, outcome.outputs, strict=True):
                future = pending.payload.future
                if isinstance(result, BaseException):  # its part failed on its own
                    _resolve(future, self._execution_error(result))
                    partly = True
                elif not future.done():  # its caller may have left (_resolve, inlined)
                    future.set_result(result)
                elif left is None:
                    left = [pending]
                else:
                    left.append(pending)
            infer_ns = outcome.infer_ns
            if not partly and left is None:  # the common batch
                record = BatchTimings(
                    batch.rows, len(requests),
                    tuple([start_ns - r.payload.arrival_ns for r in requests]),
                    outcome.input_ns, infer_ns, outcome.output_ns, False, outcome.padded_rows,
                    outcome.real_elements, outcome.padded_elements,
                )
            else:
                record = self._record_in_part(batch, outcome, start_ns, partly, left or [])
            if not record.failed:
                # What a batch costs lately, to decide whether one may run inline.
                infer_s = infer_ns / 1e9
                if self._recent_infer_s == math.inf:
                    self._recent_infer_s = infer_s
                else:
                    self._recent_infer_s += (infer_s - self._recent_infer_s) * 0.25
        self._free.append(running.lane)
        for observer in self._observers:
            observer.batch_executed(record)
        if redispatch and (self._accepting or self._queue):
            self._dispatch()
        else:
            self._notify_if_idle()

    def _record_in_part(
        self,
        batch: Batch[Work],
        outcome: ExecutedBatch,
        start_ns: int,
        partly: bool,
        left: list[PendingRequest[Work]],
    ) -> BatchTimings:
        """The timings of a batch not every caller of which got its rows: a failed batch
        run again in parts (`partly`; padded: one request at a time), or one that ran
        although callers had `left`. It counts as one execution of the rows that ran,
        while only the answered requests count as inferences, with their queue and
        compute times (each caller that left is counted once, as its own failure, by the
        data plane)."""
        ran = [
            r for r, result in zip(batch.requests, outcome.outputs, strict=True)
            if not isinstance(result, BaseException)
        ]
        answered = [r for r in ran if r not in left] if left else ran
        elements = sum(r.rows * r.length for r in ran)
        return BatchTimings(
            sum(r.rows for r in ran), len(answered),
            tuple([start_ns - r.payload.arrival_ns for r in answered]),
            outcome.input_ns, outcome.infer_ns, outcome.output_ns, not ran,
            outcome.padded_rows,
            elements if partly else outcome.real_elements,
            elements if partly else outcome.padded_elements,
            sum(r.rows for r in answered),
        )

    def _execution_error(self, exc: BaseException) -> FerryError:
        if isinstance(exc, FerryError):
            return exc
        return FerryError(ErrorKind.INTERNAL, f"model '{self.name}' failed to run: {exc}")

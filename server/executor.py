"""The executor side of batching: what runs a formed batch, and the thread it runs on.

The seam between the event loop and execution is `BatchExecutor`: given each request's
inputs (a batch whose requests share their non-batch dimensions), it returns each
request's own outputs and the padding rows it ran. `InstanceExecutor` implements it over
one model instance of the runtime (anything with `run_batch`, or only `run` through
`RunOnly`); an executor in another process can implement it too.

`ExecutionLane` owns the one worker thread of an executor and brings results back to the
event loop with `call_soon_threadsafe`. Every path out of an execution, exceptions
included, reports back, so the scheduler can settle every caller of the batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Protocol

from .errors import CALLERS_RUN_ERRORS, ErrorKind, FerryError
from .padding import PaddingSettings
from .rows import Array, Tensors, gather, gather_padded, scatter, scatter_unpadded

log = logging.getLogger(__name__)

# A padded length that failed while each of its batch's requests then ran alone is not
# padded to for this long; then one batch tries it again. The wait doubles each time it
# fails again (a model's longest sequence), up to BUCKET_RETRY_MAX_S, and a try that runs
# (the failure was a moment's: a device short of memory) brings the bucket back.
BUCKET_RETRY_AFTER_S = 60.0
BUCKET_RETRY_MAX_S = 3600.0


class Runner(Protocol):
    """The least a model instance can do: run one set of inputs."""

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> Tensors: ...


class BatchRunner(Protocol):
    """A model instance that gathers a batch itself (into its own reusable buffers, padded
    to its batch buckets): returns the outputs exactly `rows` long, and the padding rows it
    ran and dropped. `may_run_on_loop` promises that running never blocks on anything but
    its own computation, so a short batch may run on the event loop's thread."""

    @property
    def may_run_on_loop(self) -> bool: ...

    def run_batch(
        self, parts: Sequence[Mapping[str, Array]], rows: int, output_names: Sequence[str]
    ) -> tuple[Tensors, int]: ...


class RunOnly:
    """Adapts an instance that only has `run` (a test's gate, a wrapper) to BatchRunner."""

    def __init__(self, runner: Runner, *, may_run_on_loop: bool = False) -> None:
        self.runner = runner
        self.may_run_on_loop = may_run_on_loop

    def run_batch(
        self, parts: Sequence[Mapping[str, Array]], rows: int, output_names: Sequence[str]
    ) -> tuple[Tensors, int]:
        return self.runner.run(gather(parts), output_names), 0


class BatchItem(NamedTuple):  # built per request or batch: a tuple is cheapest
    """One request's part of a batch."""

    inputs: Tensors
    rows: int
    outputs: tuple[str, ...]  # the outputs this request asked for
    length: int = 0  # along the padded axis, for a model that pads its inputs


class ExecutedBatch(NamedTuple):  # built per request or batch: a tuple is cheapest
    """Each request's own outputs, in the order of the batch, and what the run cost. A
    request whose part failed on its own (a padded batch re-run one request at a time)
    has its exception in place of its outputs."""

    outputs: Sequence[Tensors | BaseException]
    padded_rows: int
    input_ns: int
    infer_ns: int
    output_ns: int
    # A padding model's positions along the padded axis, summed over the rows: the
    # requests' own, and what ran after padding (batch-bucket rows not included).
    real_elements: int = 0
    padded_elements: int = 0


class BatchExecutor(Protocol):
    """The executor seam: run a batch of requests, return each request's outputs."""

    @property
    def may_run_on_loop(self) -> bool: ...

    def execute(self, items: Sequence[BatchItem], output_names: Sequence[str]) -> ExecutedBatch: ...


class InstanceExecutor:
    """Runs batches on one model instance: gather (inside the instance), run, scatter.

    `batchable` False: every batch is one request whose inputs are the whole tensors, and
    its outputs are returned whole. With `padding`, the requests' padded inputs are first
    padded to the bucket of the longest, and the outputs that follow that axis are cut
    back to each request's length. `timer` measures the stages (nanoseconds).

    A padded batch that fails is run again one request at a time, each at its own length,
    so that one caller's request (too long for the model, say) fails alone, and a bucket
    past the model's longest sequence (48 positions padded to 64) costs one failed run:
    when every request then ran alone, that padded length is too long for the model, and
    later batches that would reach it are padded only to their longest request, until a
    batch tries it again (BUCKET_RETRY_AFTER_S, doubling while it keeps failing). A batch
    without padding that fails is run again in halves (`_in_halves`) for the same reason.
    """

    def __init__(
        self,
        runner: BatchRunner,
        *,
        batchable: bool = True,
        padding: PaddingSettings | None = None,
        timer: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.runner = runner
        self.batchable = batchable
        self.padding = padding if batchable else None
        self._timer = timer
        # The shortest padded length a batch failed at while its requests ran alone; when
        # (timer) a batch may try it again, and the wait after that try if it fails.
        self._too_long: int | None = None
        self._retry_at_ns = 0
        self._retry_wait_s = BUCKET_RETRY_AFTER_S

    @property
    def may_run_on_loop(self) -> bool:
        return self.runner.may_run_on_loop

    def execute(self, items: Sequence[BatchItem], output_names: Sequence[str]) -> ExecutedBatch:
        if self.padding is not None:
            return self._execute_padded(self.padding, items, output_names)
        timer = self._timer
        t0 = timer()
        rows = sum(item.rows for item in items) if self.batchable else 1
        # Gathering happens inside the instance, so it counts as execution time.
        t1 = timer()
        try:
            outputs, padded_rows = self.runner.run_batch(
                [item.inputs for item in items], rows, output_names
            )
        except Exception:
            if len(items) == 1:
                raise  # what the request meets alone: the scheduler reports it
            parts, padded_rows = self._in_halves(items, output_names)
            failures = [part for part in parts if isinstance(part, Exception)]
            if len(failures) == len(parts) and not any(map(_may_be_a_callers, failures)):
                raise failures[0] from None  # the server's own: logged, as a batch's
            return ExecutedBatch(parts, padded_rows, t1 - t0, timer() - t1, 0)
        t2 = timer()
        if self.batchable:
            results = scatter(outputs, [i.rows for i in items], [i.outputs for i in items])
        else:
            results = [{name: outputs[name] for name in items[0].outputs}]
        t3 = timer()
        return ExecutedBatch(results, padded_rows, t1 - t0, t2 - t1, t3 - t2)

    def _in_halves(
        self, items: Sequence[BatchItem], output_names: Sequence[str]
    ) -> tuple[list[Tensors | BaseException], int]:
        """After a batch failed: each half runs, and a half that fails is split again, so
        that a request the model cannot take (a token id past its vocabulary) fails only
        its caller. One such request costs about twice the batch's rows again, in some
        2 x log2(requests) runs; a run per request would cost the per-run overhead that
        batching saves. When both halves fail with the server's own error (not one that
        may be the caller's input: a model that cannot run, a device out of memory),
        every part would fail the same way: they are not split again."""
        middle = len(items) // 2
        runs: list[tuple[Sequence[BatchItem], tuple[Tensors, int] | Exception]] = []
        for half in (items[:middle], items[middle:]):
            try:
                ran: tuple[Tensors, int] | Exception = self.runner.run_batch(
                    [item.inputs for item in half], sum(item.rows for item in half),
                    output_names,
                )
            except Exception as exc:
                ran = exc
            runs.append((half, ran))
        both_failed = all(isinstance(ran, Exception) for _, ran in runs)
        results: list[Tensors | BaseException] = []
        padded_rows = 0
        for half, ran in runs:
            if not isinstance(ran, Exception):
                outputs, half_padded = ran
                results.extend(
                    scatter(outputs, [i.rows for i in half], [i.outputs for i in half])
                )
            elif len(half) == 1 or (both_failed and not _may_be_a_callers(ran)):
                results.extend([ran] * len(half))
                continue
            else:
                half_results, half_padded = self._in_halves(half, output_names)
                results.extend(half_results)
            padded_rows += half_padded
        return results, padded_rows

    def _execute_padded(
        self, padding: PaddingSettings, items: Sequence[BatchItem], output_names: Sequence[str]
    ) -> ExecutedBatch:
        timer = self._timer
        t0 = timer()
        lengths = [item.length for item in items]
        row_counts = [item.rows for item in items]
        rows = sum(row_counts)
        longest = max(lengths)
        target = padding.buckets.padded_length(longest)
        retrying = False
        if self._too_long is not None and target >= self._too_long:
            retrying = target > longest and t0 >= self._retry_at_ns
            if not retrying:
                target = longest
        inputs = gather_padded(
            [item.inputs for item in items], lengths, target, padding.axis, padding.inputs
        )
        t1 = timer()
        try:
            outputs, padded_rows = self.runner.run_batch([inputs], rows, output_names)
        except Exception as exc:
            if len(items) == 1 and target == longest:
                raise  # what the request would meet alone: the scheduler reports it
            # A batch too large together for --max-run-memory says nothing of its length.
            too_long = None if _out_of_run_memory(exc) else target
            return self._each_alone(padding, items, output_names, too_long, retrying, t0)
        if retrying:
            log.warning("a padded batch ran at length %d again: its bucket is back", target)
            self._too_long = None
        t2 = timer()
        results = scatter_unpadded(
            outputs, row_counts, lengths, target, [i.outputs for i in items],
            padding.outputs or {},
        )
        t3 = timer()
        real = sum(r * n for r, n in zip(row_counts, lengths, strict=True))
        return ExecutedBatch(
            results, padded_rows, t1 - t0, t2 - t1, t3 - t2, real, rows * target
        )

    def _each_alone(
        self,
        padding: PaddingSettings,
        items: Sequence[BatchItem],
        output_names: Sequence[str],
        failed_at: int | None,
        retried: bool,
        t0: int,
    ) -> ExecutedBatch:
        """After a padded batch failed: each request at its own length, on its own.
        `failed_at`: the padded length to mark too long if they all run (None: none)."""
        timer = self._timer
        t1 = timer()
        results: list[Tensors | BaseException] = []
        padded_rows = 0
        for item in items:
            try:
                outputs, item_rows = self.runner.run_batch([item.inputs], item.rows, output_names)
                results.extend(
                    scatter_unpadded(
                        outputs, [item.rows], [item.length], item.length, [item.outputs],
                        padding.outputs or {},
                    )
                )
                padded_rows += item_rows
            except Exception as exc:
                results.append(exc)
        ran_alone = not any(isinstance(result, BaseException) for result in results)
        if ran_alone and failed_at is not None:
            self._mark_too_long(failed_at, retried, t0)
        t2 = timer()
        real = sum(item.rows * item.length for item in items)
        return ExecutedBatch(results, padded_rows, t1 - t0, t2 - t1, 0, real, real)


    def _mark_too_long(self, failed_at: int, retried: bool, now_ns: int) -> None:
        """A padded batch failed at `failed_at` while each of its requests then ran;
        `retried`: it was a try again of the length marked, which waits twice as long."""
        if retried:
            wait_s = min(self._retry_wait_s * 2, BUCKET_RETRY_MAX_S)
        else:
            wait_s = BUCKET_RETRY_AFTER_S
        if self._too_long is not None:
            failed_at = min(failed_at, self._too_long)
        self._too_long = failed_at
        self._retry_wait_s = wait_s
        self._retry_at_ns = now_ns + int(wait_s * 1e9)
        log.warning(
            "a padded batch failed at length %d while each of its requests ran alone; "
            "batches that would be padded to %d or more are padded only to their "
            "longest request for %g s, and then one tries again",
            failed_at, failed_at, wait_s,
        )


def _may_be_a_callers(exc: Exception) -> bool:
    """May a failed run be one request's fault, so that running its parts apart helps?
    The runtime says so with a FerryError of kind INVALID_INPUT (onnxruntime's
    InvalidArgument) or TOO_LARGE (past --max-run-memory: one request that asks for too
    much, or a batch too large together); any other FerryError is the server's (a model
    that cannot run, a device out of memory): every part would fail again. Other
    exceptions say nothing."""
    return not isinstance(exc, FerryError) or exc.kind in CALLERS_RUN_ERRORS


def _out_of_run_memory(exc: Exception) -> bool:
    """A run refused by --max-run-memory (the runtime's TOO_LARGE)."""
    return isinstance(exc, FerryError) and exc.kind is ErrorKind.TOO_LARGE


Outcome = ExecutedBatch | BaseException


class ExecutionLane:
    """One executor and its worker thread. Lighter than a ThreadPoolExecutor: a batch is
    one queue put away, with no future or work item built for it."""

    def __init__(self, executor: BatchExecutor, name: str) -> None:
        self.executor = executor
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # A daemon: a batch still running at exit must not keep the process alive.
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def may_run_on_loop(self) -> bool:
        return self.executor.may_run_on_loop

    def run_here(self, items: Sequence[BatchItem], output_names: Sequence[str]) -> Outcome:
        """Run a batch on the calling thread (the event loop's, for a short one)."""
        try:
            return self.executor.execute(items, output_names)
        except Exception as exc:
            return exc

    def start(
        self,
        items: Sequence[BatchItem],
        output_names: Sequence[str],
        loop: asyncio.AbstractEventLoop,
        done: Callable[[Outcome], None],
    ) -> None:
        """Run a batch on the lane's thread; `done(outcome)` is called on `loop`."""

        def job() -> None:
            outcome: Outcome
            try:
                outcome = self.executor.execute(items, output_names)
            except BaseException as exc:
                outcome = exc
            loop.call_soon_threadsafe(done, outcome)

        self._jobs.put(job)

    def stop(self) -> None:
        """Let the thread end once the batches already handed to it are done."""
        self._jobs.put(None)

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the thread to end; False if it is still running a batch."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
            # Its batch (inputs, outputs: possibly views of a frontend's shared memory)
            # goes now, not when the next batch replaces it.
            del job

"""Triton-compatible statistics of one model version, for the ModelStatistics RPC.

Fed once per executed batch by the scheduler and once per finished request by the
data plane; all calls happen on the event loop, so plain integers suffice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ferry.proto import grpc_service_pb2 as pb

from .errors import Status
from .outcomes import RequestOutcome
from .scheduler import BatchTimings

_OK = Status.OK


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def fill(self, message: pb.StatisticDuration) -> None:
        message.count = self.count
        message.ns = self.ns


@dataclass(slots=True)
class BatchSizeStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelStatistics:
    """Counts and cumulative durations in Triton's vocabulary."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.inference_count = 0  # rows
        self.execution_count = 0  # batches
        self.last_inference_ms = 0
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.by_batch_size: dict[int, BatchSizeStats] = {}

    def batch_executed(self, timings: BatchTimings) -> None:
        # Once per batch on the event loop: the durations are added in place, not through
        # a method call each.
        if timings.failed:
            return
        n = timings.requests
        input_ns, infer_ns, output_ns = timings.input_ns, timings.infer_ns, timings.output_ns
        rows = timings.rows
        # Rows whose callers left while their batch ran are not inferences of anyone.
        answered = timings.answered_rows
        self.inference_count += rows if answered is None else answered
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        queue = self.queue
        queue.count += n
        queue.ns += sum(timings.queue_ns)
        # Like Triton, each request is charged the compute time of the batch it ran in.
        compute = self.compute_input
        compute.count += n
        compute.ns += input_ns * n
        compute = self.compute_infer
        compute.count += n
        compute.ns += infer_ns * n
        compute = self.compute_output
        compute.count += n
        compute.ns += output_ns * n
        sizes = self.by_batch_size.get(rows)
        if sizes is None:
            sizes = self.by_batch_size[rows] = BatchSizeStats()
        compute = sizes.compute_input
        compute.count += 1
        compute.ns += input_ns
        compute = sizes.compute_infer
        compute.count += 1
        compute.ns += infer_ns
        compute = sizes.compute_output
        compute.count += 1
        compute.ns += output_ns

    def request_finished(self, outcome: RequestOutcome) -> None:
        duration = self.success if outcome.status is _OK else self.fail
        duration.count += 1
        duration.ns += outcome.duration_ns

    def to_proto(self) -> pb.ModelStatistics:
        message = pb.ModelStatistics(
            name=self.name,
            version=self.version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
        )
        stats = message.inference_stats
        self.success.fill(stats.success)
        self.fail.fill(stats.fail)
        self.queue.fill(stats.queue)
        self.compute_input.fill(stats.compute_input)
        self.compute_infer.fill(stats.compute_infer)
        self.compute_output.fill(stats.compute_output)
        for size in sorted(self.by_batch_size):
            entry = self.by_batch_size[size]
            batch = message.batch_stats.add(batch_size=size)
            entry.compute_input.fill(batch.compute_input)
            entry.compute_infer.fill(batch.compute_infer)
            entry.compute_output.fill(batch.compute_output)
        return message


def add_statistics(into: pb.ModelStatistics, other: pb.ModelStatistics) -> None:
    """Add `other`'s counts and durations to `into`: one version served by several
    executor processes (`--workers` with a model on several devices) reports their sum."""
    into.inference_count += other.inference_count
    into.execution_count += other.execution_count
    into.last_inference = max(into.last_inference, other.last_inference)
    _add_durations(into.inference_stats, other.inference_stats)
    sizes: dict[int, pb.InferBatchStatistics] = {}
    for batch in [*into.batch_stats, *other.batch_stats]:
        merged = sizes.get(batch.batch_size)
        if merged is None:
            merged = sizes[batch.batch_size] = pb.InferBatchStatistics(
                batch_size=batch.batch_size
            )
        _add_durations(merged, batch)
    del into.batch_stats[:]
    into.batch_stats.extend(sizes[size] for size in sorted(sizes))


def _add_durations(into: object, other: object) -> None:
    """Every StatisticDuration field of `other` added to the same field of `into`."""
    for field_descriptor, value in other.ListFields():  # type: ignore[attr-defined]
        if isinstance(value, pb.StatisticDuration):
            mine = getattr(into, field_descriptor.name)
            mine.count += value.count
            mine.ns += value.ns

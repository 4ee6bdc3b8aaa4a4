"""Prometheus metrics: one registry per server, fed once per batch and once per request,
and the HTTP endpoint that serves it.

Each FerryServer owns its CollectorRegistry (several servers may share a process, as in
the tests); nothing here touches prometheus_client's global default registry.

The per-request and per-batch figures are plain counters and bucket lists, written only
on the event loop (no lock per observation: prometheus_client's metric objects take one on
every `inc` and `observe`), and turned into metric families when scraped. A scrape runs on
the endpoint's thread and copies each list or dictionary in one C-level call, which no
other Python thread can interleave with.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .metrics_http import MetricsHttpServer, start_metrics_server
from .outcomes import RequestOutcome
from .scheduler import BatchObserver, BatchTimings

# prometheus_client adds a `<name>_created` timestamp series to every counter and histogram
# by default: Prometheus ignores it in the text format, and it doubles the series count. The
# switch is process-wide, and the process that imports this module is a Ferry server.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client has no hints here

# Requests for a model that is not loaded are counted under this one label value, so that
# callers cannot create label values (and time series) at will.
UNKNOWN_MODEL = "_unknown"

# From 25 us: a small model answers well under a millisecond, and a histogram that starts
# at 1 ms would put every such request in its first bucket.
LATENCY_BUCKETS_S = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0, 30.0,
)

NS_PER_S = 1e9
# Real / padded elements of a padding model's batch: 1 is a batch with no padding.
PADDING_FILL_BUCKETS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def batch_size_bounds(largest_max_batch_size: int) -> list[int]:
    """Powers of two from 1 up to the first one that holds the largest max_batch_size."""
    bounds = [1]
    while bounds[-1] < largest_max_batch_size:
        bounds.append(bounds[-1] * 2)
    return bounds


class Queued(Protocol):
    @property
    def queue_depth(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ModelView:
    """What a scrape needs to know of one loaded model version."""

    name: str
    queue: Queued  # read at scrape time
    max_batch_size: int


class LoopHistogram:
    """Observations in fixed buckets, written on the event loop only."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family_buckets(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative (le, count) pairs, +Inf last, and the sum, as scraped."""
        counts, total = list(self.counts), self.total
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, counts, strict=False):
            running += count
            buckets.append((_bound(bound), running))
        buckets.append(("+Inf", running + counts[-1]))
        return buckets, total


def _bound(value: float) -> str:
    return repr(float(value))


@dataclass(slots=True)
class _ModelFigures:
    """Per-batch figures of one model, written on the event loop only."""

    queue: LoopHistogram
    compute: LoopHistogram
    padding_fill: LoopHistogram
    inferences: int = 0
    batches: int = 0
    padded_rows: int = 0
    padded_elements: int = 0
    sizes: dict[int, int] | None = None  # executed batches by exact row count


class _ModelObserver:
    """The BatchObserver of one model."""

    def __init__(self, figures: _ModelFigures) -> None:
        self._figures = figures

    def batch_executed(self, timings: BatchTimings) -> None:
        # Like the statistics extension, only successful executions count: a failed
        # batch has no compute time to report, and its requests show up in
        # ferry_requests_total with their error code.
        if timings.failed:
            return
        figures = self._figures
        # LoopHistogram.observe inlined for the queue times: one per request.
        queue = figures.queue
        bounds, counts = queue.bounds, queue.counts
        total = queue.total
        for queue_ns in timings.queue_ns:
            seconds = queue_ns / NS_PER_S
            counts[bisect.bisect_left(bounds, seconds)] += 1
            total += seconds
        queue.total = total
        figures.compute.observe(timings.infer_ns / NS_PER_S)
        answered = timings.answered_rows  # None: every row of the batch
        figures.inferences += timings.rows if answered is None else answered
        figures.batches += 1
        figures.padded_rows += timings.padded_rows
        sizes = figures.sizes
        assert sizes is not None
        sizes[timings.rows] = sizes.get(timings.rows, 0) + 1
        if timings.padded_elements:
            figures.padded_elements += timings.padded_elements - timings.real_elements
            figures.padding_fill.observe(timings.real_elements / timings.padded_elements)


class _ScrapeTimeCollector:
    """Figures computed when scraped: queue depth, readiness and the batch-size histogram."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily("ferry_queue_depth", "", labels=["model"]),
            GaugeMetricFamily("ferry_model_ready", "", labels=["model"]),
            HistogramMetricFamily("ferry_batch_size", "", labels=["model"]),
            CounterMetricFamily("ferry_requests", "", labels=["model", "code", "protocol"]),
            HistogramMetricFamily("ferry_request_duration_seconds", "", labels=["model"]),
            HistogramMetricFamily("ferry_queue_duration_seconds", "", labels=["model"]),
            HistogramMetricFamily("ferry_compute_duration_seconds", "", labels=["model"]),
            CounterMetricFamily("ferry_inferences", "", labels=["model"]),
            CounterMetricFamily("ferry_batches", "", labels=["model"]),
            CounterMetricFamily("ferry_padded_rows", "", labels=["model"]),
            CounterMetricFamily("ferry_padded_elements", "", labels=["model"]),
            HistogramMetricFamily("ferry_padding_fill_ratio", "", labels=["model"]),
        ]

    def collect(self) -> Iterator[Metric]:
        views, ready = self._metrics.snapshot()
        depth = GaugeMetricFamily(
            "ferry_queue_depth", "Requests waiting in the batch queue", labels=["model"]
        )
        depths: dict[str, int] = {}
        for view in views:
            depths[view.name] = depths.get(view.name, 0) + view.queue.queue_depth
        for name in sorted(depths):
            depth.add_metric([name], depths[name])
        yield depth

        readiness = GaugeMetricFamily(
            "ferry_model_ready", "1 when the model can take requests, else 0", labels=["model"]
        )
        for name in sorted(ready):
            readiness.add_metric([name], 1 if ready[name] else 0)
        yield readiness

        largest = max((view.max_batch_size for view in views), default=1)
        sizes = HistogramMetricFamily(
            "ferry_batch_size", "Rows per executed batch", labels=["model"]
        )
        for name, counts in sorted(self._metrics.batch_size_counts().items()):
            bounds = batch_size_bounds(max(largest, 1))
            buckets = []
            for bound in bounds:
                below = sum(n for rows, n in counts.items() if rows <= bound)
                buckets.append((str(float(bound)), below))
            buckets.append(("+Inf", sum(counts.values())))
            rows_total = sum(rows * n for rows, n in counts.items())
            sizes.add_metric([name], buckets, rows_total)
        yield sizes
        yield from self._metrics.request_families()
        yield from self._metrics.batch_families()


class ServerMetrics:
    """Every metric of one server; a BatchObserver factory and an OutcomeObserver."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(_ScrapeTimeCollector(self))
        self._figures: dict[str, _ModelFigures] = {}
        self._batch_observers: dict[str, _ModelObserver] = {}
        # (model label, code, protocol) -> finished requests
        self._request_counts: dict[tuple[str, str, str], int] = {}
        self._request_durations: dict[str, LoopHistogram] = {}
        # Replaced whole (never mutated) by models_changed, so a scrape reads a
        # consistent pair without a lock.
        self._snapshot: tuple[tuple[ModelView, ...], Mapping[str, bool]] = ((), {})

    # Fed by the scheduler, the data plane and the app -----------------------------

    def observers_for(self, model: str, version: str) -> Sequence[BatchObserver]:
        """The BatchObserver of a model version (every version shares the model's)."""
        observer = self._batch_observers.get(model)
        if observer is None:
            figures = _ModelFigures(
                LoopHistogram(), LoopHistogram(), LoopHistogram(PADDING_FILL_BUCKETS), sizes={}
            )
            self._figures[model] = figures
            observer = self._batch_observers[model] = _ModelObserver(figures)
        return (observer,)

    def request_finished(self, outcome: RequestOutcome) -> None:
        label = outcome.model or UNKNOWN_MODEL
        # `_name_` (enum's documented attribute) is `name` without its Python-level
        # property: this runs once per request.
        key = (label, outcome.status._name_, outcome.protocol)
        counts = self._request_counts
        counts[key] = counts.get(key, 0) + 1
        # Every outcome, requests that named no loaded model included (under _unknown).
        duration = self._request_durations.get(label)
        if duration is None:
            duration = self._request_durations[label] = LoopHistogram()
        duration.observe(outcome.duration_ns / NS_PER_S)

    def models_changed(self, views: Iterable[ModelView], ready: Mapping[str, bool]) -> None:
        """Called on the loop whenever models load or unload."""
        self._snapshot = (tuple(views), dict(ready))

    # Read by scrapes ---------------------------------------------------------------

    def snapshot(self) -> tuple[tuple[ModelView, ...], Mapping[str, bool]]:
        return self._snapshot

    def batch_size_counts(self) -> dict[str, dict[int, int]]:
        return {
            name: dict(figures.sizes or {}) for name, figures in list(self._figures.items())
        }

    def request_families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "ferry_requests",
            "Finished inference requests, by gRPC status code and protocol (grpc, http)",
            labels=["model", "code", "protocol"],
        )
        for (model, code, protocol), count in sorted(list(self._request_counts.items())):
            requests.add_metric([model, code, protocol], count)
        yield requests
        durations = HistogramMetricFamily(
            "ferry_request_duration_seconds",
            "Inference request latency, from arrival to response, whatever its outcome",
            labels=["model"],
        )
        for model, histogram in sorted(list(self._request_durations.items())):
            durations.add_metric([model], *histogram.family_buckets())
        yield durations

    def batch_families(self) -> Iterator[Metric]:
        figures = sorted(list(self._figures.items()))
        queue = HistogramMetricFamily(
            "ferry_queue_duration_seconds",
            "Time each request waited in the queue before its batch ran",
            labels=["model"],
        )
        compute = HistogramMetricFamily(
            "ferry_compute_duration_seconds",
            "Model execution (session.run) time per batch",
            labels=["model"],
        )
        counters = {
            "inferences": CounterMetricFamily(
                "ferry_inferences", "Rows of successful batches answered to their callers",
                labels=["model"],
            ),
            "batches": CounterMetricFamily(
                "ferry_batches",
                "Successful batch executions (inferences / batches = mean batch size)",
                labels=["model"],
            ),
            "padded_rows": CounterMetricFamily(
                "ferry_padded_rows",
                "Padding rows run to fill a batch up to a batch bucket, "
                "not in ferry_inferences_total",
                labels=["model"],
            ),
            "padded_elements": CounterMetricFamily(
                "ferry_padded_elements",
                "Pad positions added along the padded axis of variable-length inputs, over "
                "all rows (padded minus real; rows padded to a batch bucket not included)",
                labels=["model"],
            ),
        }
        fill = HistogramMetricFamily(
            "ferry_padding_fill_ratio",
            "Real / padded elements along the padded axis, per batch of a padding model",
            labels=["model"],
        )
        for model, figure in figures:
            queue.add_metric([model], *figure.queue.family_buckets())
            compute.add_metric([model], *figure.compute.family_buckets())
            fill.add_metric([model], *figure.padding_fill.family_buckets())
            for attribute, family in counters.items():
                family.add_metric([model], getattr(figure, attribute))
        yield queue
        yield compute
        yield fill
        yield from counters.values()

    def render(self) -> bytes:
        """The exposition text, as /metrics serves it."""
        return bytes(generate_latest(self.registry))


class MetricsEndpoint:
    """The HTTP /metrics endpoint of one registry, on its own thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._httpd: MetricsHttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        self._httpd, self._thread = start_metrics_server(host, port, self._registry)
        return int(self._httpd.server_port)

    def close(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None
        self._thread = None

"""Prometheus metrics: one registry per server, fed once per batch and once per request,
and the HTTP endpoint that serves it.

Each FerryServer owns its CollectorRegistry (several servers may share a process, as in
the tests); nothing here touches prometheus_client's global default registry.
Updates happen on the event loop; scrapes run on the endpoint's thread and read only
values that prometheus_client guards with locks or plain snapshots swapped in whole.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from .outcomes import RequestOutcome
from .scheduler import BatchObserver, BatchTimings

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


class _BatchSizes:
    """Executed batches of one model counted by exact row count; the scrape turns them
    into a histogram whose buckets follow the models loaded at that moment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}

    def add(self, rows: int) -> None:
        with self._lock:
            self._counts[rows] = self._counts.get(rows, 0) + 1

    def snapshot(self) -> dict[int, int]:
        with self._lock:
            return dict(self._counts)


class _ModelObserver:
    """Per-batch metrics of one model, with its labelled children looked up once."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._queue = metrics.queue_duration.labels(model=model)
        self._compute = metrics.compute_duration.labels(model=model)
        self._inferences = metrics.inferences.labels(model=model)
        self._batches = metrics.batches.labels(model=model)
        self._padded = metrics.padded_rows.labels(model=model)
        self._sizes = metrics.batch_sizes_of(model)

    def batch_executed(self, timings: BatchTimings) -> None:
        # Like the statistics extension, only successful executions count: a failed
        # batch has no compute time to report, and its requests show up in
        # ferry_requests_total with their error code.
        if timings.failed:
            return
        observe = self._queue.observe
        for queue_ns in timings.queue_ns:
            observe(queue_ns / NS_PER_S)
        self._compute.observe(timings.infer_ns / NS_PER_S)
        self._inferences.inc(timings.rows)
        self._batches.inc()
        if timings.padded_rows:
            self._padded.inc(timings.padded_rows)
        self._sizes.add(timings.rows)


class _ScrapeTimeCollector:
    """Figures computed when scraped: queue depth, readiness and the batch-size histogram."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily("ferry_queue_depth", "", labels=["model"]),
            GaugeMetricFamily("ferry_model_ready", "", labels=["model"]),
            HistogramMetricFamily("ferry_batch_size", "", labels=["model"]),
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


class ServerMetrics:
    """Every metric of one server; a BatchObserver factory and an OutcomeObserver."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "ferry_requests_total",
            "Finished inference requests, by gRPC status code and protocol (grpc, http)",
            ["model", "code", "protocol"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "ferry_request_duration_seconds",
            "Inference request latency, from arrival to response, whatever its outcome",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "ferry_queue_duration_seconds",
            "Time each request waited in the queue before its batch ran",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "ferry_compute_duration_seconds",
            "Model execution (session.run) time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.inferences = Counter(
            "ferry_inferences_total",
            "Rows inferred in successful batches",
            ["model"],
            registry=registry,
        )
        self.batches = Counter(
            "ferry_batches_total",
            "Successful batch executions (inferences / batches = mean batch size)",
            ["model"],
            registry=registry,
        )
        self.padded_rows = Counter(
            "ferry_padded_rows_total",
            "Padding rows run to fill a batch up to a batch bucket, not in ferry_inferences_total",
            ["model"],
            registry=registry,
        )
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(_ScrapeTimeCollector(self))
        self._batch_sizes: dict[str, _BatchSizes] = {}
        self._batch_observers: dict[str, _ModelObserver] = {}
        self._request_children: dict[tuple[str, str, str], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}
        # Replaced whole (never mutated) by models_changed, so a scrape reads a
        # consistent pair without a lock.
        self._snapshot: tuple[tuple[ModelView, ...], Mapping[str, bool]] = ((), {})

    # Fed by the scheduler, the servicer and the app --------------------------------

    def observers_for(self, model: str, version: str) -> Sequence[BatchObserver]:
        """The BatchObserver of a model version (every version shares the model's)."""
        observer = self._batch_observers.get(model)
        if observer is None:
            observer = self._batch_observers[model] = _ModelObserver(self, model)
        return (observer,)

    def request_finished(self, outcome: RequestOutcome) -> None:
        model, code, protocol = outcome.model, outcome.status.name, outcome.protocol
        label = model or UNKNOWN_MODEL
        counter = self._request_children.get((label, code, protocol))
        if counter is None:
            counter = self._request_children[label, code, protocol] = self.requests.labels(
                model=label, code=code, protocol=protocol
            )
        counter.inc()
        if model:
            duration = self._duration_children.get(model)
            if duration is None:
                duration = self._duration_children[model] = self.request_duration.labels(
                    model=model
                )
            duration.observe(outcome.duration_ns / NS_PER_S)

    def models_changed(self, views: Iterable[ModelView], ready: Mapping[str, bool]) -> None:
        """Called on the loop whenever models load or unload."""
        self._snapshot = (tuple(views), dict(ready))

    # Read by scrapes ---------------------------------------------------------------

    def snapshot(self) -> tuple[tuple[ModelView, ...], Mapping[str, bool]]:
        return self._snapshot

    def batch_sizes_of(self, model: str) -> _BatchSizes:
        sizes = self._batch_sizes.get(model)
        if sizes is None:
            sizes = self._batch_sizes[model] = _BatchSizes()
        return sizes

    def batch_size_counts(self) -> dict[str, dict[int, int]]:
        return {name: sizes.snapshot() for name, sizes in list(self._batch_sizes.items())}

    def render(self) -> bytes:
        """The exposition text, as /metrics serves it."""
        return bytes(generate_latest(self.registry))


class MetricsEndpoint:
    """The HTTP /metrics endpoint of one registry, on its own thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        self._httpd, self._thread = start_http_server(port, host, self._registry)
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

"""One /metrics over several executor processes (`--workers` with several devices).

Each executor keeps its own registry. The first one serves /metrics; the others answer
its scrape with their metric families, over a Unix socket of their own
(`PeerFamiliesServer`). The scrape merges them (`MergedRegistry`):
- counters and histograms add up, series by series (a model on two GPUs has one series:
  both executors' batches). Histogram buckets are cumulative, so an executor whose
  bounds differ (its largest max_batch_size is another) counts at each bound what it
  counted at its largest bound below it;
- gauges add up too (queue depth), except `ferry_model_ready`, which is the largest (1 when
  any executor serves the model);
- `process_*` and `python_*` describe the process that serves /metrics, and come from it
  alone.

A peer that does not answer (restarting) counts with the figures it last gave, so that
the sums do not drop; a restarted executor counts from zero again, which Prometheus reads
as a counter reset of the sum.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import operator
import pickle
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from .handoff import peer_is_related

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 1.0
# Families of the process itself, taken from the process serving /metrics only.
OWN_PROCESS_PREFIXES = ("process_", "python_")
LARGEST_GAUGES = frozenset({"ferry_model_ready"})

# (sample name, labels, value)
Sample = tuple[str, dict[str, str], float]
# (family name, documentation, type, samples): plain data, as it travels between processes
Family = tuple[str, str, str, list[Sample]]
LabelKey = tuple[tuple[str, str], ...]


def families_of(registry: CollectorRegistry) -> list[Family]:
    return [
        (m.name, m.documentation, m.type, [(s.name, dict(s.labels), s.value) for s in m.samples])
        for m in registry.collect()
    ]


def _key(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


def _bound(text: str) -> float:
    return math.inf if text == "+Inf" else float(text)


def _merge_histogram(name: str, parts: Sequence[list[Sample]]) -> list[Sample]:
    """Samples of one histogram family from several sources, as one."""
    # series (labels without le) -> each source's {bound: cumulative count}
    buckets: dict[LabelKey, list[dict[float, float]]] = {}
    totals: dict[tuple[str, LabelKey], float] = {}
    texts: dict[float, str] = {}
    for source, samples in enumerate(parts):
        for sample_name, labels, value in samples:
            if sample_name == name + "_bucket":
                le = labels["le"]
                series = _key({k: v for k, v in labels.items() if k != "le"})
                per_source = buckets.setdefault(series, [{} for _ in parts])
                per_source[source][_bound(le)] = value
                texts[_bound(le)] = le
            else:
                key = (sample_name, _key(labels))
                totals[key] = totals.get(key, 0.0) + value
    merged: list[Sample] = []
    for series, per_source in buckets.items():
        own_bounds = [sorted(counts) for counts in per_source]
        for bound in sorted({bound for counts in per_source for bound in counts}):
            total = 0.0
            for counts, own in zip(per_source, own_bounds, strict=True):
                below = bisect.bisect_right(own, bound)
                total += counts[own[below - 1]] if below else 0.0
            merged.append((name + "_bucket", {**dict(series), "le": texts[bound]}, total))
    merged.extend((sample_name, dict(labels), value) for (sample_name, labels), value in
                  totals.items())
    return merged


def _merge_values(name: str, parts: Sequence[list[Sample]]) -> list[Sample]:
    combine: Callable[[float, float], float] = max if name in LARGEST_GAUGES else operator.add
    values: dict[tuple[str, LabelKey], float] = {}
    for samples in parts:
        for sample_name, labels, value in samples:
            key = (sample_name, _key(labels))
            values[key] = combine(values[key], value) if key in values else value
    return [(sample_name, dict(labels), value) for (sample_name, labels), value in values.items()]


def merge(sources: Sequence[Sequence[Family]]) -> list[Family]:
    """The families of several registries as one; the first source is this process."""
    order: list[str] = []
    found: dict[str, tuple[str, str, list[list[Sample]]]] = {}
    for index, families in enumerate(sources):
        for name, documentation, kind, samples in families:
            if index and name.startswith(OWN_PROCESS_PREFIXES):
                continue
            if name not in found:
                order.append(name)
                found[name] = (documentation, kind, [])
            found[name][2].append(samples)
    merged: list[Family] = []
    for name in order:
        documentation, kind, parts = found[name]
        if len(parts) == 1:
            samples = parts[0]
        elif kind == "histogram":
            samples = _merge_histogram(name, parts)
        else:
            samples = _merge_values(name, parts)
        merged.append((name, documentation, kind, samples))
    return merged


def fetch_families(address: str, timeout_s: float = PEER_TIMEOUT_S) -> list[Family]:
    """A peer executor's families (blocking: called on the scrape's thread)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(address)
        if not peer_is_related(sock):
            raise OSError(f"{address!r} is not one of this server's executors")
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    families: list[Family] = pickle.loads(b"".join(chunks))
    return families


class MergedRegistry(CollectorRegistry):
    """This process's registry, with the peer executors' families merged in at each
    scrape. Served by the first executor's /metrics."""

    def __init__(self, own: CollectorRegistry, peers: Sequence[str]) -> None:
        super().__init__()
        self._own = own
        self._peers = tuple(peers)
        # Each peer's families as it last answered: a peer that misses a scrape keeps
        # its figures in the sum, which would otherwise drop and read as a counter reset.
        self._last: dict[str, list[Family]] = {}

    def collect(self) -> Iterator[Metric]:
        sources = [families_of(self._own)]
        for address in self._peers:
            try:
                self._last[address] = fetch_families(address)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                log.warning("metrics: executor %s did not answer (%s); its figures of the "
                            "last scrape stand in", address.lstrip("\0"), exc)
            if address in self._last:
                sources.append(self._last[address])
        for name, documentation, kind, samples in merge(sources):
            metric = Metric(name, documentation, kind)
            for sample_name, labels, value in samples:
                metric.add_sample(sample_name, labels, value)
            yield metric


class PeerFamiliesServer:
    """Answers the first executor's scrapes with this executor's families."""

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        self._registry = registry
        self._address = address
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self._address)
        self._server = await asyncio.start_unix_server(self._answer, sock=listener)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None and peer_is_related(cast(socket.socket, sock)):
                writer.write(pickle.dumps(families_of(self._registry)))
                await writer.drain()
        except OSError:
            pass  # the scrape gave up; the next one asks again
        finally:
            writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def peer_metrics_address(executor_address: str) -> str:
    return executor_address + "-metrics"


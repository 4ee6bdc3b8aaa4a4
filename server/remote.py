"""The frontend side of `ferry serve --workers N`: models served by executor processes.

A frontend decodes and validates requests exactly as a single process does (its data
plane and servicer are the ordinary ones); only the model lookup differs. `RemoteModels`
serves the models the executors announced (one executor per device, each with an
`ExecutorLink`), each with a `RemoteScheduler` whose `submit` has the contract of
`ModelScheduler.submit` (a future of the request's own output rows) but hands the request
to an executor that serves the model over its link (`server.handoff`).

If an executor goes away, the callers waiting on it are answered UNAVAILABLE at once, the
models it alone served stop being ready (health turns NOT_SERVING), and its link
reconnects when the supervisor has restarted it. A model that another executor also
serves (a model on two GPUs) goes on through that one meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from itertools import count
from typing import Any

from ferry.proto import grpc_service_pb2 as pb

from .config import ModelSettings
from .errors import ErrorKind, FerryError, not_found
from .handoff import (
    CANCEL,
    CATALOG,
    DEFAULT_REGION_BYTES,
    ERROR,
    FLUSH,
    FLUSHED,
    OUTCOMES,
    RELEASE,
    RELEASED,
    RESULT,
    STATISTICS,
    STATISTICS_REPLY,
    SUBMIT,
    BlockAllocator,
    Channel,
    Region,
    peer_is_related,
    read_tensors,
    write_tensors,
)
from .loaded_model import LoadedModel, pick_version
from .outcomes import OutcomeObserver, RequestOutcome
from .repository import NOT_LOADED, IndexEntry, ModelState, shown
from .rows import Tensors
from .stats import ModelStatistics, add_statistics

log = logging.getLogger(__name__)

RECONNECT_DELAYS_S = (0.02, 0.05, 0.1, 0.2, 0.5)
EXECUTOR_GONE = "the executor process stopped; retry shortly"
EXECUTOR_NOT_YET = "this frontend is still connecting to the executor process; retry shortly"


class ExecutorLink:
    """This frontend's connection to the executor, and its requests in flight."""

    def __init__(self, address: str, index: int, region_bytes: int = DEFAULT_REGION_BYTES) -> None:
        self.address = address
        self.index = index
        # Set by RemoteModels: what the executor announced, and its loss.
        self.on_catalog: Callable[[list[Any], list[str], list[IndexEntry]], None] = (
            lambda models, known, index: None
        )
        self.on_lost: Callable[[], None] = lambda: None
        self._region_bytes = region_bytes
        self._ids = count()
        self._pending: dict[int, asyncio.Future[Tensors]] = {}
        self._statistics: dict[int, asyncio.Future[list[bytes]]] = {}
        # Outcomes gathered for the next flush of the channel, sent as one message.
        self._outbox: list[tuple[str, str, str, int, str, str]] = []
        self._outbox_flush = -1
        self._channel: Channel | None = None
        self._request_region: Region | None = None
        self._response_region: Region | None = None
        self._request_blocks = BlockAllocator(region_bytes)
        self._lost = asyncio.Event()
        self._announced = False  # the catalog of this connection has arrived
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._channel is not None and not self._channel.closed

    @property
    def serving(self) -> bool:
        """Connected, and the executor has announced its models since: requests may go."""
        return self._announced and self.connected

    @property
    def name(self) -> str:
        return self.address.lstrip("\0")

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def waiting(self) -> list[asyncio.Future[Tensors]]:
        """The futures of the requests in flight."""
        return list(self._pending.values())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_connected())

    async def _keep_connected(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self._connect()
            except OSError as exc:
                delay = RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)]
                if attempt == 0:
                    log.info("frontend %d: executor %s not reachable (%s); retrying",
                             self.index, self.name, exc)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            await self._lost.wait()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.address)
            if not peer_is_related(sock):
                raise OSError(f"{self.address!r} is not this server's executor")
            size = self._region_bytes
            requests = Region.create(f"ferry-frontend{self.index}-requests", size)
            responses = Region.create(f"ferry-frontend{self.index}-responses", size)
            try:
                socket.send_fds(
                    sock, [pickle.dumps((self.index, size, size))], [requests.fd, responses.fd]
                )
            finally:
                # The executor holds its own descriptors now; the mappings stay.
                requests.close()
                responses.close()
            sock.setblocking(False)
            channel = Channel(self._on_messages, self._connection_lost, RELEASE)
            # Set up before the connection is made: the executor's catalog may be read
            # before create_unix_connection returns, and a link that was not connected
            # then left its frontend unhealthy for good (unknown models: UNAVAILABLE).
            self._request_region, self._response_region = requests, responses
            self._request_blocks = BlockAllocator(size)
            self._lost = asyncio.Event()
            # A new channel counts its flushes from 0 again: the next outcome starts a list.
            self._outbox_flush = -1
            self._channel = channel
            await loop.create_unix_connection(lambda: channel, sock=sock)
        except BaseException:
            sock.close()
            self._channel = None
            raise

    def _connection_lost(self) -> None:
        """The executor went away: answer everyone waiting, and let the link reconnect."""
        self._channel = None
        self._announced = False
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(FerryError(ErrorKind.UNAVAILABLE, EXECUTOR_GONE))
        queries, self._statistics = self._statistics, {}
        for query in queries.values():
            if not query.done():
                query.set_exception(FerryError(ErrorKind.UNAVAILABLE, EXECUTOR_GONE))
        self._lost.set()
        if not self._closing:
            log.warning("frontend %d: lost the executor %s; its callers were answered "
                        "UNAVAILABLE", self.index, self.name)
        self.on_lost()

    def _on_messages(self, messages: list[Any]) -> None:
        for message in messages:
            tag = message[0]
            if tag == RESULT:
                future = self._pending.pop(message[1], None)
                assert self._response_region is not None
                channel = self._channel
                assert channel is not None
                outputs = read_tensors(
                    self._response_region, message[2], message[3], channel.release_later
                )
                if future is not None and not future.done():
                    future.set_result(outputs)
            elif tag == ERROR:
                future = self._pending.pop(message[1], None)
                if future is not None and not future.done():
                    future.set_exception(FerryError(ErrorKind(message[2]), message[3]))
            elif tag == RELEASED:
                free = self._request_blocks.free
                for block in message[1]:
                    free(block)
            elif tag == CATALOG:
                self._announced = True
                log.info("frontend %d: executor %s serves %d models", self.index, self.name,
                         len(message[1]))
                self.on_catalog(message[1], message[2], message[3])
            elif tag == FLUSH:
                assert self._channel is not None
                self._channel.send((FLUSHED, message[1]))
            elif tag == STATISTICS_REPLY:
                query = self._statistics.pop(message[1], None)
                if query is not None and not query.done():
                    query.set_result(message[2])

    def submit(
        self,
        model: str,
        version: str,
        inputs: Tensors,
        outputs: tuple[str, ...],
        rows: int,
        shape_key: object,
        deadline_s: float | None,
        priority: int,
        length: int = 0,
    ) -> asyncio.Future[Tensors]:
        channel = self._channel
        if channel is None or channel.closed:
            raise FerryError(ErrorKind.UNAVAILABLE, EXECUTOR_GONE)
        assert self._request_region is not None
        descriptors, block = write_tensors(self._request_region, self._request_blocks, inputs)
        request_id = next(self._ids)
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        channel.send((SUBMIT, request_id, model, version, descriptors, block, outputs, rows,
                      shape_key, deadline_s, priority, length))
        future.add_done_callback(lambda f: self._settled(request_id, f))
        return future

    def _settled(self, request_id: int, future: asyncio.Future[Tensors]) -> None:
        if future.cancelled() and self._pending.pop(request_id, None) is not None:
            channel = self._channel
            if channel is not None:
                channel.send((CANCEL, request_id))

    def report(self, outcome: RequestOutcome) -> None:
        """Send a finished request's outcome to the executor, which counts it."""
        channel = self._channel
        if channel is None:
            return
        if self._outbox_flush != channel.flushes:
            self._outbox = []
            self._outbox_flush = channel.flushes
            channel.send_lazy((OUTCOMES, self._outbox))
        self._outbox.append((outcome.model, outcome.version, outcome.status.value,
                               outcome.duration_ns, outcome.message, outcome.protocol))

    async def statistics(self) -> list[bytes]:
        channel = self._channel
        if channel is None:
            raise FerryError(ErrorKind.UNAVAILABLE, EXECUTOR_GONE)
        query = next(self._ids)
        future: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        self._statistics[query] = future
        channel.send((STATISTICS, query))
        return await future

    def abort(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(FerryError(ErrorKind.UNAVAILABLE, reason))

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        if self._channel is not None:
            self._channel.close()


class OutcomesToExecutor:
    """Counts a frontend's requests where the statistics and metrics live: an executor
    that serves the model (the first one up, for a model on several devices; their
    figures are added up wherever they are read)."""

    def __init__(self, links: Sequence[ExecutorLink]) -> None:
        self._all = tuple(links)
        # model -> the links that serve it, in executor order; kept by RemoteModels
        self.owners: dict[str, tuple[ExecutorLink, ...]] = {}

    def request_finished(self, outcome: RequestOutcome) -> None:
        links = self.owners.get(outcome.model, self._all)
        for link in links:
            if link.serving:
                link.report(outcome)
                return
        links[0].report(outcome)  # none up: counted if it is back by the next flush


class RemoteStatistics(ModelStatistics):
    """The executors' statistics of a version, as last fetched (`refresh_statistics`)."""

    latest: pb.ModelStatistics | None = None

    def to_proto(self) -> pb.ModelStatistics:
        return self.latest if self.latest is not None else super().to_proto()


class RemoteScheduler:
    """`ModelScheduler.submit`'s contract, served by an executor process: the one link's,
    or, for a version that several executors serve (a model on several devices), the
    connected link with the fewest requests in flight."""

    def __init__(self, links: Sequence[ExecutorLink], name: str, version: str) -> None:
        self.links = tuple(links)
        self._only = self.links[0] if len(self.links) == 1 else None
        self._turn = 0
        self.name = name
        self.version = version

    @property
    def queue_depth(self) -> int:
        return 0  # the executor reports its queues in the one /metrics

    @property
    def reachable(self) -> bool:
        return any(link.serving for link in self.links)

    def _pick(self) -> ExecutorLink:
        """Fewest in flight, ties taken in turn, so that equal devices share the load."""
        links = self.links
        self._turn = turn = (self._turn + 1) % len(links)
        best: ExecutorLink | None = None
        for offset in range(len(links)):
            link = links[(turn + offset) % len(links)]
            if link.serving and (best is None or link.in_flight < best.in_flight):
                best = link
        return best if best is not None else links[0]  # none up: its submit says so

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
        link = self._only or self._pick()
        return link.submit(self.name, self.version, inputs, outputs, rows, shape_key,
                           deadline_s, priority, length)

    async def close(self, grace_s: float | None = None) -> None:
        return None

    def abort(self, reason: str) -> None:
        return None

    def stop_gathering(self) -> None:
        return None  # the executor gathers; the supervisor tells it of the drain

    def join_threads(self, timeout_s: float | None = None) -> bool:
        return True


# What one executor announced: (name, version, settings) of its models, the names it
# knows, and its repository index.
Catalog = tuple[list[Any], list[str], list[IndexEntry]]


def merged_index(catalogs: Sequence[Catalog]) -> list[IndexEntry]:
    """The repository index over every executor: a model's READY versions wherever it is
    loaded; else why it is not, from the executor that tried ("not loaded" from one
    that never did)."""
    ready: dict[str, list[IndexEntry]] = {}
    other: dict[str, IndexEntry] = {}
    for _, _, index in catalogs:
        for entry in index:
            if entry.state is ModelState.READY:
                if entry not in ready.setdefault(entry.name, []):
                    ready[entry.name].append(entry)
            elif entry.name not in other or other[entry.name].reason == NOT_LOADED:
                other[entry.name] = entry
    entries: list[IndexEntry] = []
    for name in sorted(set(ready) | set(other)):
        if name in ready:
            entries.extend(sorted(ready[name], key=lambda e: int(e.version)))
        else:
            entries.append(other[name])
    return entries


class RemoteModels:
    """The models of the executor processes, as a frontend's data plane looks them up."""

    def __init__(
        self,
        links: Sequence[ExecutorLink],
        request_observers: Sequence[OutcomeObserver],
        on_change: Callable[[], Awaitable[None]] | None = None,
        outcomes: OutcomesToExecutor | None = None,
    ) -> None:
        self.links = tuple(links)
        for link in self.links:
            link.on_catalog = partial(self._catalog, link)
            link.on_lost = self._lost
        self._observers = tuple(request_observers)
        self._on_change = on_change
        self._outcomes = outcomes
        self._catalogs: dict[ExecutorLink, Catalog] = {}
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._known: list[str] = []
        self._index: list[IndexEntry] = []
        self._ready = asyncio.Event()  # every executor has announced its models once
        # Every executor serving and not closing: lookups take the short path.
        self._healthy = False
        self._closing = False
        self._changes: set[asyncio.Task[None]] = set()

    def _catalog(self, link: ExecutorLink, models: list[Any], known: list[str],
                 index: list[IndexEntry]) -> None:
        self._catalogs[link] = (models, known, index)
        if len(self._catalogs) == len(self.links):
            self._rebuild()
            self._ready.set()
        self._changed()

    def _rebuild(self) -> None:
        serving: dict[tuple[str, str], list[ExecutorLink]] = {}
        settings_of: dict[tuple[str, str], ModelSettings] = {}
        for link in self.links:  # in executor order: the first serves /metrics
            for name, version, settings in self._catalogs[link][0]:
                assert isinstance(settings, ModelSettings)
                serving.setdefault((name, version), []).append(link)
                settings_of.setdefault((name, version), settings)
        served: dict[str, dict[str, LoadedModel]] = {}
        for (name, version), links in serving.items():
            served.setdefault(name, {})[version] = LoadedModel(
                name, version, settings_of[name, version],
                RemoteScheduler(links, name, version),
                RemoteStatistics(name, version), observers=self._observers,
            )
        if self._outcomes is not None:
            self._outcomes.owners = {name: tuple(links) for (name, _), links in serving.items()}
        catalogs = [self._catalogs[link] for link in self.links]
        self._models = served
        self._known = sorted({name for _, known, _ in catalogs for name in known})
        self._index = merged_index(catalogs)
        self._healthy = not self._closing and all(link.serving for link in self.links)

    def _lost(self) -> None:
        self._healthy = False
        self._changed()

    def _changed(self) -> None:
        if self._on_change is None or self._closing:
            return
        on_change = self._on_change

        async def notify() -> None:
            await on_change()

        task = asyncio.get_running_loop().create_task(notify())
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)

    def _reachable(self, model: LoadedModel) -> bool:
        scheduler = model.scheduler
        return isinstance(scheduler, RemoteScheduler) and scheduler.reachable

    # ModelLookup --------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> LoadedModel:
        if self._healthy:
            versions = self._models.get(name)
            if versions:
                return pick_version(name, versions, version)
            raise not_found(f"unknown model '{shown(name)}'")
        if self._closing:
            raise FerryError(ErrorKind.UNAVAILABLE, "server is shutting down")
        if not self._ready.is_set():
            raise FerryError(ErrorKind.UNAVAILABLE, EXECUTOR_NOT_YET)
        versions = self._models.get(name)
        if not versions:
            # It may be served by the executor that is away.
            raise FerryError(ErrorKind.UNAVAILABLE, EXECUTOR_GONE)
        model = pick_version(name, versions, version)
        if not self._reachable(model):
            raise FerryError(ErrorKind.UNAVAILABLE, EXECUTOR_GONE)
        return model

    def loaded(self) -> list[LoadedModel]:
        return [
            model for versions in self._models.values() for model in versions.values()
            if self._reachable(model)
        ]

    def versions_of(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=int)

    def index(self) -> list[IndexEntry]:
        return list(self._index)

    async def load(self, name: str, config_override: str | None = None) -> None:
        raise FerryError(ErrorKind.UNAVAILABLE,
                         "loading models is not available with --workers above 1")

    async def unload(self, name: str) -> None:
        raise FerryError(ErrorKind.UNAVAILABLE,
                         "unloading models is not available with --workers above 1")

    async def refresh_statistics(self) -> None:
        """Fetch the executors' statistics, which count every frontend's requests; a
        version served by several executors gets their sum."""
        serving = [link for link in self.links if link.serving]
        replies = await asyncio.gather(
            *(link.statistics() for link in serving), return_exceptions=True
        )
        answered = [reply for reply in replies if not isinstance(reply, BaseException)]
        if not answered:  # every executor is away
            raise FerryError(ErrorKind.UNAVAILABLE, EXECUTOR_GONE)
        totals: dict[tuple[str, str], pb.ModelStatistics] = {}
        for reply in answered:
            for data in reply:
                message = pb.ModelStatistics.FromString(data)
                key = (message.name, message.version)
                if key in totals:
                    add_statistics(totals[key], message)
                else:
                    totals[key] = message
        for (name, version), message in totals.items():
            model = self._models.get(name, {}).get(version)
            if model is not None and isinstance(model.stats, RemoteStatistics):
                model.stats.latest = message

    # Lifecycle, as FerryServer drives it ---------------------------------------------

    def known_names(self) -> list[str]:
        return list(self._known)

    def is_loaded(self, name: str) -> bool:
        return self._ready.is_set() and any(
            self._reachable(model) for model in self._models.get(name, {}).values()
        )

    def all_ready(self) -> bool:
        """Every model can take requests: through any of its executors, so a model on two
        GPUs stays ready while one of them restarts."""
        if not self._ready.is_set() or not self._models:
            return False
        return self._healthy or all(
            any(self._reachable(model) for model in versions.values())
            for versions in self._models.values()
        )

    async def load_all(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """Wait until every executor has announced its models. Failures are the
        executors' to report (they exit on them, unless --exit-on-error=false): none
        here."""
        for link in self.links:
            link.start()
        await self._ready.wait()
        return {}

    async def close(self, grace_s: float | None) -> None:
        """Refuse new requests, wait (up to grace_s) for those in flight, then hang up."""
        self._closing = True
        self._healthy = False
        loop = asyncio.get_running_loop()
        deadline = None if grace_s is None else loop.time() + grace_s
        while waiting := [future for link in self.links for future in link.waiting()]:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                self.abort("server stopped before the request ran")
                break
            await asyncio.wait(waiting, timeout=left)
        # Let the callers just answered report their outcomes before hanging up.
        await asyncio.sleep(0)
        for link in self.links:
            await link.close()

    def abort(self, reason: str) -> None:
        for link in self.links:
            link.abort(reason)

    def join_threads(self, timeout_s: float) -> bool:
        return True

"""An executor process of `ferry serve --workers N`: the owner of the models of a device.

It loads every model with instances on its device once (every model, when there is one
executor), runs the ordinary `ModelScheduler` and `InstanceExecutor`s, serves the one
`/metrics` of the whole server (the first executor, merging the others' figures in:
`server.metrics_merge`), and takes requests from the frontend processes over a Unix socket
(`server.handoff`): each frontend is a `FrontendSession`.
Requests from every frontend land in the same batch queues; deadlines and priorities
arrive as the frontend computed them (monotonic clocks are system-wide), a cancelled
request is withdrawn from its queue, and queue bounds answer at once.
Request outcomes (status and duration) come back from the frontends, so statistics and
metrics count every frontend's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
from collections.abc import Sequence
from functools import partial
from itertools import count
from typing import Any

from .app import (
    BATCH_JOIN_TIMEOUT_S,
    ServerOptions,
    StartupError,
    leave_after_a_stop_during_start_up,
    leave_if_a_batch_still_runs,
    start_unless_stopped,
)
from .device_plan import model_devices, models_on
from .errors import ErrorKind, FerryError, Status
from .handoff import (
    CANCEL,
    CATALOG,
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
from .loading import LoadOptions
from .manager import ModelManager
from .metrics import MetricsEndpoint, ModelView, ServerMetrics
from .metrics_merge import MergedRegistry, PeerFamiliesServer, peer_metrics_address
from .outcomes import OutcomeObserver, RequestOutcome
from .repository import ModelRepository
from .rows import Tensors
from .workers import ABORT_SIGNAL

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
# A statistics query waits this long at most for the other frontends' outcomes.
FLUSH_TIMEOUT_S = 1.0


class FrontendSession:
    """One frontend's connection: its requests in flight and its two regions."""

    def __init__(
        self,
        service: ExecutorService,
        index: int,
        request_region: Region,
        response_region: Region,
    ) -> None:
        self.service = service
        self.index = index
        self.request_region = request_region
        self.response_region = response_region
        self.response_blocks = BlockAllocator(response_region.size)
        self.channel = Channel(self._on_messages, self._on_lost, RELEASED)
        self.pending: dict[int, asyncio.Future[Tensors]] = {}

    def _on_messages(self, messages: list[Any]) -> None:
        for message in messages:
            tag = message[0]
            if tag == SUBMIT:
                self._submit(message)
            elif tag == CANCEL:
                future = self.pending.get(message[1])
                if future is not None:
                    # Out of the queue if it is still there; a running batch still owns
                    # the inputs, and the block is released when its views die.
                    future.cancel()
            elif tag == RELEASE:
                free = self.response_blocks.free
                for block in message[1]:
                    free(block)
            elif tag == OUTCOMES:
                self.service.record_outcomes(message[1])
            elif tag == STATISTICS:
                self.service.statistics_for(self, message[1])
            elif tag == FLUSHED:
                self.service.flushed(self, message[1])

    def _submit(self, message: Any) -> None:
        _, request_id, name, version, descriptors, block, outputs, rows, shape_key, deadline_s, \
            priority, length = message
        try:
            # Read first: the views give the block back when they go, however this ends.
            inputs = read_tensors(
                self.request_region, descriptors, block, self.channel.release_later
            )
            model = self.service.manager.get(name, version)
            future = model.scheduler.submit(
                inputs, outputs, rows=rows, shape_key=shape_key, deadline_s=deadline_s,
                priority=priority,
                length=length,
            )
        except FerryError as error:
            self.channel.send((ERROR, request_id, error.kind.value, error.message))
            return
        except Exception as exc:  # a malformed descriptor: this request fails, not the link
            log.error("request from frontend %d could not be read: %r", self.index, exc)
            self.channel.send((ERROR, request_id, ErrorKind.INTERNAL.value,
                               "internal error in the executor process"))
            return
        self.pending[request_id] = future
        future.add_done_callback(partial(self._answer, request_id, inputs))

    def _answer(self, request_id: int, inputs: Tensors, future: asyncio.Future[Tensors]) -> None:
        del self.pending[request_id]
        if future.cancelled():
            return  # the frontend has forgotten it; a running batch may still read it
        # Its batch is over: drop its views of the frontend's region now, so that the
        # block goes back at once, whoever else still holds the request.
        inputs.clear()
        if self.channel.closed:
            return  # the frontend has gone
        error = future.exception()
        if error is None:
            try:
                descriptors, block = write_tensors(
                    self.response_region, self.response_blocks, future.result()
                )
            except Exception as exc:  # never leave the caller waiting
                error = exc
            else:
                self.channel.send((RESULT, request_id, descriptors, block))
                return
        if not isinstance(error, FerryError):
            log.error("request from frontend %d failed: %r", self.index, error)
            error = FerryError(ErrorKind.INTERNAL, "internal error in the executor process")
        self.channel.send((ERROR, request_id, error.kind.value, error.message))

    def _on_lost(self) -> None:
        """The frontend went away: its queued requests leave the queues; the regions go
        at once, or with the last view of them (a batch still running)."""
        log.info("frontend %d disconnected%s", self.index, self.service.where)
        for future in list(self.pending.values()):
            future.cancel()
        self.request_region.unmap()
        self.response_region.unmap()
        self.service.session_ended(self)


class ExecutorService:
    """The models, their metrics, and the socket the frontends connect to."""

    def __init__(
        self,
        options: ServerOptions,
        address: str,
        device: str | None = None,
        metrics_peers: Sequence[str] = (),
    ) -> None:
        """`device`: this executor loads only the instances on that device (one executor
        per device); None: every instance. `metrics_peers`: the other executors, whose
        figures this one's /metrics merges in."""
        self.options = options
        self.address = address
        self.device = device
        self.where = f" ({device})" if device else ""  # for log lines
        self.metrics = ServerMetrics()
        registry = self.metrics.registry
        self._metrics_endpoint = MetricsEndpoint(
            MergedRegistry(registry, metrics_peers) if metrics_peers else registry
        )
        # One executor of several that does not serve /metrics answers the one that does.
        self._peer_metrics = (
            PeerFamiliesServer(registry, peer_metrics_address(address))
            if device is not None and options.metrics_port is None
            else None
        )
        self.manager = ModelManager(
            ModelRepository(options.model_path),
            LoadOptions(
                gpu_fallback=options.gpu_fallback,
                session_threads=options.session_threads,
                max_run_memory=options.max_run_memory,
                batch_observers_for=self.metrics.observers_for,
                request_observers=(self.metrics,),
                device=device,
            ),
            drain_grace_s=options.shutdown_grace_s,
        )
        self.sessions: set[FrontendSession] = set()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._tokens = count()
        # Statistics queries waiting for frontends to flush: token -> (frontends still to
        # answer, the asking one, its query id).
        self._waiting: dict[int, tuple[set[FrontendSession], FrontendSession, int]] = {}

    async def start(self) -> None:
        """Metrics first (a slow load can be watched), then the models, then the socket."""
        if self.options.metrics_port is not None:
            port = self._metrics_endpoint.start(self.options.host, self.options.metrics_port)
            log.info("serving Prometheus metrics on http://%s:%d/metrics",
                     self.options.host, port)
        if self._peer_metrics is not None:
            await self._peer_metrics.start()
        failed = await self.manager.load_all(self._models_to_load())
        if failed and self.options.exit_on_error:
            # As a single process does: the supervisor then stops the server, exit code 1.
            raise StartupError(
                f"{'; '.join(failed.values())} (--exit-on-error=false serves what did load)"
            )
        manager = self.manager
        self.metrics.models_changed(
            [ModelView(m.name, m, m.settings.max_batch_size) for m in manager.loaded()],
            {name: manager.is_loaded(name) for name in manager.known_names()},
        )
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.address)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        log.info("executor ready%s: %d models", self.where, len(manager.loaded()))

    def _models_to_load(self) -> Sequence[str] | None:
        names = self.options.security.model_control.models_at_start()
        if self.device is None:
            return names
        repository = self.manager.repository
        plan = model_devices(repository, repository.model_names() if names is None else names)
        return models_on(plan, self.device)

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(self._listener)
            task = loop.create_task(self._open_session(connection))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _open_session(self, connection: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            if not peer_is_related(connection):
                raise ValueError("the peer is not a process of this server")
            connection.settimeout(HANDSHAKE_TIMEOUT_S)
            data, fds, _, _ = await loop.run_in_executor(
                None, socket.recv_fds, connection, 4096, 2
            )
            index, request_bytes, response_bytes = pickle.loads(data)
            if len(fds) != 2:
                raise ValueError(f"expected 2 region descriptors, got {len(fds)}")
            session = FrontendSession(
                self, index, Region(fds[0], request_bytes), Region(fds[1], response_bytes)
            )
            connection.setblocking(False)
            await loop.connect_accepted_socket(lambda: session.channel, connection)
        except (OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
            log.warning("a frontend's handshake failed: %s", exc)
            connection.close()
            return
        self.sessions.add(session)
        self._no_sessions.clear()
        session.channel.send(self.catalog())
        log.info("frontend %d connected%s", index, self.where)

    def session_ended(self, session: FrontendSession) -> None:
        self.sessions.discard(session)
        self.flushed(session, None)
        if not self.sessions:
            self._no_sessions.set()

    async def frontends_gone(self) -> None:
        """Until no frontend is connected."""
        await self._no_sessions.wait()

    def catalog(self) -> tuple[Any, ...]:
        manager = self.manager
        return (
            CATALOG,
            [(m.name, m.version, m.settings) for m in manager.loaded()],
            manager.known_names(),
            manager.index(),
        )

    def record_outcomes(self, outcomes: list[tuple[str, str, str, int, str, str]]) -> None:
        """Requests the frontends finished: counted by the models' statistics and the
        metrics, as if they had been served here."""
        for model, version, status, duration_ns, message, protocol in outcomes:
            outcome = RequestOutcome(model, version, Status(status), duration_ns, message,
                                     protocol)
            for observer in self._observers_of(model, version):
                observer.request_finished(outcome)

    def _observers_of(self, model: str, version: str) -> tuple[OutcomeObserver, ...]:
        try:
            return self.manager.get(model, version).observers if model else (self.metrics,)
        except FerryError:
            return (self.metrics,)

    def statistics_for(self, asking: FrontendSession, query: int) -> None:
        """Answer a statistics query once every other frontend has sent the outcomes it
        holds back (the asking one sent its own before the query)."""
        others = self.sessions - {asking}
        if not others:
            asking.channel.send((STATISTICS_REPLY, query, self._statistics()))
            return
        token = next(self._tokens)
        self._waiting[token] = (set(others), asking, query)
        for session in others:
            session.channel.send((FLUSH, token))
        asyncio.get_running_loop().call_later(FLUSH_TIMEOUT_S, self._answer_statistics, token)

    def flushed(self, session: FrontendSession, token: int | None) -> None:
        """A frontend has flushed (or, token None, gone away)."""
        for key in [token] if token is not None else list(self._waiting):
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting[0].discard(session)
                if not waiting[0]:
                    self._answer_statistics(key)

    def _answer_statistics(self, token: int) -> None:
        waiting = self._waiting.pop(token, None)
        if waiting is not None and not waiting[1].channel.closed:
            waiting[1].channel.send((STATISTICS_REPLY, waiting[2], self._statistics()))

    def _statistics(self) -> list[bytes]:
        return [m.stats.to_proto().SerializeToString() for m in self.manager.loaded()]

    async def stop(self, grace_s: float, join_timeout_s: float = BATCH_JOIN_TIMEOUT_S) -> None:
        """After the frontends have drained: finish what is queued, then close."""
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()
        await self.manager.close(grace_s)
        leave_if_a_batch_still_runs(self.manager, join_timeout_s)
        for session in list(self.sessions):
            session.channel.close()
        self._metrics_endpoint.close()
        if self._peer_metrics is not None:
            self._peer_metrics.close()


async def run_executor(
    options: ServerOptions,
    address: str,
    ready_fd: int | None,
    device: str | None = None,
    metrics_peers: Sequence[str] = (),
) -> int:
    """The executor process's main: serve until told to stop, then drain.

    SIGTERM or SIGINT, from the supervisor when its drain begins or from anyone else (a
    service manager signals every process of the server): no batch is held back for
    requests to come any more, the models serve on until the frontends, which drain
    first, are gone (at most --shutdown-grace), then finish what is queued. Any number
    of them means the same. ABORT_SIGNAL, from the supervisor on a second signal: queued
    and running requests are answered UNAVAILABLE and the process leaves at once. A stop
    during start-up ends it there."""
    service = ExecutorService(options, address, device, metrics_peers)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    aborted = asyncio.Event()

    def on_stop(signum: int) -> None:
        if stop.is_set():
            return  # the same drain, told again (the supervisor and a service manager)
        log.info("%s received: executor draining%s", signal.Signals(signum).name, service.where)
        stop.set()
        service.manager.stop_gathering()

    def on_abort() -> None:
        log.warning("told to stop at once: answering queued requests UNAVAILABLE")
        aborted.set()
        stop.set()
        service.manager.abort("server is stopping")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(ABORT_SIGNAL, on_abort)
    started = await start_unless_stopped(service.start(), stop)
    if started is None:
        await service.stop(0.0, join_timeout_s=0.0)
        log.info("executor stopped during start-up")
        leave_after_a_stop_during_start_up()
        return 0
    try:
        started.result()
    except OSError as exc:
        log.error("the executor cannot start: %s", exc)
        await service.stop(0.0)
        return 1
    if ready_fd is not None:
        # The supervisor may have stopped waiting (another executor failed to start).
        with contextlib.suppress(BrokenPipeError):
            os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    await stop.wait()
    if not aborted.is_set():
        # The frontends drain first: what they accepted still comes here.
        waiting = {
            asyncio.ensure_future(service.frontends_gone()),
            asyncio.ensure_future(aborted.wait()),
        }
        _, pending = await asyncio.wait(
            waiting, timeout=options.shutdown_grace_s, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
    if aborted.is_set():
        await service.stop(0.0, join_timeout_s=0.0)
    else:
        await service.stop(options.shutdown_grace_s)
    log.info("executor stopped")
    return 0

"""The application: wires the repository, the servicer, health and reflection into one
grpc.aio server, and runs its start-up and drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto._pool import POOL

from .dataplane import DataPlane, ModelLookup
from .errors import Status
from .event_loop import loop_name
from .grpc_status import shield_servicer
from .healthcheck import HealthService, add_health_service
from .loading import InstanceWrapper, LoadOptions
from .logs import AccessLog, RejectionLog, quiet_lost_answers
from .manager import ModelManager
from .metrics import MetricsEndpoint, ModelView, ServerMetrics
from .outcomes import OutcomeObserver
from .poller import RepositoryPoller
from .ports import host_port, port_is_free
from .providers import GpuFallback
from .reflection import ReflectionPool, add_reflection_service
from .repository import ModelControlMode, ModelRepository
from .rest import RestFrontDoor, RestServer
from .security import ApiGroup, SecurityOptions, api_group, api_keys, warn_plain_text
from .servicer import INFERENCE_SERVICE, InferenceServicer
from .streams import StreamLimits
from .wire import add_inference_service

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
# While draining, the port closes only after this long without a new request.
QUIET_PERIOD_S = 0.2
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A grpc.aio server accepts one call at a time: it asks gRPC's core for the next call only
# once the last has been handed to its handler, a round trip through gRPC's polling thread
# per call. Listeners sharing the port take turns on the same event loop, so calls on
# different connections are accepted together and their requests reach the batch queue in
# the same turn of the loop (measured in benchmarks/README.md, "Listeners").
DEFAULT_GRPC_LISTENERS = 4
# The fewest --max-connections places a gRPC listener gets (see FerryServer.__init__).
LISTENER_CONNECTIONS_AT_LEAST = 256
MAX_GRPC_LISTENERS = 64  # each is a gRPC server object with its own listening socket


class StartupError(OSError):
    """The server cannot serve what it was asked to: a model failed to load."""


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Everything `ferry serve` can be told. A port of 0 picks a free one."""

    model_path: Path
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int | None = 8000  # None: no REST port
    metrics_port: int | None = 8002  # None: no metrics endpoint
    shutdown_grace_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    poll_repository_s: float | None = None  # None: the repository is read once, at start
    session_threads: int = 0  # onnxruntime intra-op threads per session; 0: automatic
    # Working memory the runs of every CPU model may hold together (runtime.SessionSettings);
    # 0: no limit. ferry serve's default is runtime.default_max_run_memory().
    max_run_memory: int = 0
    access_log: bool = False  # one log line per inference request
    security: SecurityOptions = field(default_factory=SecurityOptions)
    # A KIND_GPU model where CUDA cannot be used: load it on the CPU with a warning, or
    # fail its load.
    gpu_fallback: GpuFallback = GpuFallback.CPU
    # Per ModelStreamInfer stream: unsent answers past which it stops reading requests.
    stream_limits: StreamLimits = field(default_factory=StreamLimits)
    # Share the gRPC port with other processes (SO_REUSEPORT), as --workers does; else
    # bind it alone, so that a port already taken fails the start.
    reuse_port: bool = False
    # grpc.aio servers sharing the gRPC port in this process. Each accepts one call at a
    # time, so several accept more calls per turn of the event loop (see
    # DEFAULT_GRPC_LISTENERS).
    grpc_listeners: int = 0  # 0: DEFAULT_GRPC_LISTENERS
    # A model of the start-up set that fails to load (or, outside explicit model control,
    # nothing to serve at all) fails the start, as Triton's --exit-on-error.
    exit_on_error: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc port must be within 0..65535, got {self.grpc_port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http port must be within 0..65535, got {self.http_port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be within 0..65535, got {self.metrics_port}")
        if self.poll_repository_s is not None and not self.poll_repository_s > 0:
            raise ValueError(
                f"poll interval must be > 0 s, got {self.poll_repository_s}"
            )
        if not 0 <= self.grpc_listeners <= MAX_GRPC_LISTENERS:
            raise ValueError(
                f"grpc listeners must be within 0..{MAX_GRPC_LISTENERS}, got "
                f"{self.grpc_listeners}"
            )
        if self.max_run_memory < 0:
            raise ValueError(f"max run memory must be >= 0 bytes, got {self.max_run_memory}")
        if self.session_threads < 0:
            raise ValueError(f"session threads must be >= 0, got {self.session_threads}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown grace must be >= 0 s, got {self.shutdown_grace_s}")
        if not isinstance(self.gpu_fallback, GpuFallback):
            raise ValueError(
                f"gpu fallback must be one of {', '.join(f.value for f in GpuFallback)}, "
                f"got {self.gpu_fallback!r}"
            )
        if self.max_message_bytes < 1024:
            raise ValueError(
                f"max message size must be >= 1024 bytes, got {self.max_message_bytes}"
            )


class ServedModels(ModelLookup, Protocol):
    """The models a server serves and their lifecycle, as the app drives it: the
    `ModelManager` of one process, or a frontend's view of the executor process."""

    def known_names(self) -> list[str]: ...

    def is_loaded(self, name: str) -> bool: ...

    def all_ready(self) -> bool: ...

    async def load_all(self, names: Sequence[str] | None = None) -> dict[str, str]: ...

    async def close(self, grace_s: float | None) -> None: ...

    def abort(self, reason: str) -> None: ...

    def join_threads(self, timeout_s: float) -> bool: ...


# Builds a frontend's models from the observers of its requests and the app's
# on-change hook (see server.remote).
ModelsFactory = Callable[
    [tuple[OutcomeObserver, ...], Callable[[], Awaitable[None]]], ServedModels
]


def _register_in_pool(*files: object) -> None:
    """Let reflection describe the health and reflection services too."""
    for file in files:
        name = file.name  # type: ignore[attr-defined]
        try:
            POOL.FindFileByName(name)
        except KeyError:
            POOL.AddSerializedFile(file.serialized_pb)  # type: ignore[attr-defined]


def nothing_to_serve(repository: Path) -> str:
    """What a repository without a model folder is told: the layout wanted, and how to
    serve an .onnx file found at its top as it is."""
    message = (
        f"{repository} holds no model to serve: a repository holds one folder per model, "
        "<model>/<version>/model.onnx (with an optional <model>/config.pbtxt)"
    )
    try:
        loose = sorted(p.name for p in repository.glob("*.onnx") if p.is_file())
    except OSError:
        loose = []
    if loose:
        message += f"; to serve one .onnx file as it is: ferry serve {repository / loose[0]}"
    return message


class FerryServer:
    """One Ferry process: models, the gRPC port and the health service.

    `clock` is the one monotonic clock of the server: queue deadlines, timers and the
    drain's quiet period all read it.
    """

    def __init__(
        self,
        options: ServerOptions,
        *,
        wrap_instance: InstanceWrapper | None = None,
        request_observers: Sequence[OutcomeObserver] = (),
        clock: Callable[[], float] = time.monotonic,
        models: ModelsFactory | None = None,
    ) -> None:
        self.options = options
        self._clock = clock
        self.metrics = ServerMetrics()
        self._metrics_endpoint = MetricsEndpoint(self.metrics.registry)
        self.metrics_port = 0  # the bound metrics port, once started (0: none)
        observers = (
            # A frontend's requests are counted by the executor process's metrics.
            *((self.metrics,) if models is None else ()),
            RejectionLog(),
            *((AccessLog(),) if options.access_log else ()),
            *request_observers,
        )
        self.manager: ServedModels
        if models is not None:
            self.manager = models(observers, self._models_changed)
        else:
            self.manager = ModelManager(
                ModelRepository(options.model_path),
                LoadOptions(
                    gpu_fallback=options.gpu_fallback,
                    session_threads=options.session_threads,
                    max_run_memory=options.max_run_memory,
                    clock=clock,
                    batch_observers_for=self.metrics.observers_for,
                    request_observers=observers,
                    wrap_instance=wrap_instance,
                ),
                drain_grace_s=options.shutdown_grace_s,
                on_change=self._models_changed,
            )
        self.dataplane = DataPlane(self.manager, observers, clock)
        self._draining = False
        self._aborted = False
        self._poller: RepositoryPoller | None = None
        self.health = HealthService()
        self.servicer = InferenceServicer(
            self.dataplane,
            is_ready=self.is_ready,
            tensor_limits=options.security.tensor_limits(options.max_message_bytes),
            model_control=options.security.model_control,
            max_response_bytes=options.max_message_bytes,
            stream_limits=options.stream_limits,
        )
        # One RPC limit for every listener, not one each.
        # One count of calls in flight for the gRPC listeners and the REST port together.
        slots = options.security.call_slots()
        self.call_places = slots  # --max-concurrent-rpcs, both ports (None: no limit)
        interceptors = options.security.interceptors(self._refused, slots)
        # Each listener takes its share of --max-connections, and the kernel spreads the
        # connections over them at random: a small limit goes to fewer listeners (one
        # under 2 x LISTENER_CONNECTIONS_AT_LEAST), so that the port is not refusing
        # while a listener still has room.
        listeners = max(1, min(
            options.grpc_listeners or DEFAULT_GRPC_LISTENERS,
            options.security.frontend_max_connections // LISTENER_CONNECTIONS_AT_LEAST,
        ))
        self._servers = [self._grpc_server(interceptors, listeners) for _ in range(listeners)]
        self.grpc_port = 0
        self.rest = RestServer(
            RestFrontDoor(
                self.dataplane,
                is_ready=self.is_ready,
                tensor_limits=options.security.tensor_limits(options.max_message_bytes),
                model_control=options.security.model_control,
                api_keys=api_keys(options.security.restricted_apis),
                max_body_bytes=options.max_message_bytes,
                max_concurrent=slots,
            ),
            max_connections=options.security.max_connections,
            idle_timeout_s=options.security.connection_idle_timeout_s,
            shared_connections=options.security.connection_table(),
        )
        self.http_port = 0  # the bound REST port, once started (0: none)

    def _grpc_server(
        self, interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]], listeners: int
    ) -> grpc.aio.Server:
        """One gRPC listener with every service registered, not yet bound."""
        quiet_lost_answers()
        security = self.options.security
        message_limit = self.options.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                *security.grpc_options(),
                *security.connection_options(listeners),
                # The listeners of this process share the port; without --reuse-port
                # start() checks first that nothing else listens on it.
                ("grpc.so_reuseport", 1),
            ],
            # The RPC limit is an interceptor of Ferry's (not gRPC's own option), so
            # that its refusals are counted.
            interceptors=interceptors,
        )
        shield_servicer(
            self.servicer,
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name,
            INFERENCE_SERVICE,
            self._refused,
        )
        add_inference_service(self.servicer, server)
        add_health_service(self.health, server)
        _register_in_pool(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        add_reflection_service(
            [INFERENCE_SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME],
            server,
            ReflectionPool(POOL),
        )
        return server

    def _refused(self, method: str, status: Status, message: str) -> None:
        """Count a refused inference call (other RPCs are not inference requests)."""
        if api_group(method) is ApiGroup.INFERENCE:
            self.dataplane.refused(status, message)

    def is_ready(self) -> bool:
        return not self._draining and self.manager.all_ready()

    async def start(self) -> int:
        """Load the repository, then open the port; returns the bound gRPC port."""
        host, port = self.options.host, self.options.grpc_port
        address = host_port(host, port)
        cause: BaseException | None = None
        if not self.options.reuse_port and not port_is_free(host, port):
            self.grpc_port = 0
        else:
            try:
                self.grpc_port = self.options.security.bind(self._servers, host, port)
            except RuntimeError as exc:  # grpc's word for a port it cannot bind
                self.grpc_port = 0
                cause = exc
        if self.grpc_port == 0:
            raise OSError(
                f"cannot listen on {address} for gRPC (--host, --grpc-port): the address "
                "is in use or cannot be bound"
            ) from cause
        if self.options.metrics_port is not None:
            # Up before the models load, so that a slow start can be watched.
            self.metrics_port = self._metrics_endpoint.start(
                self.options.host, self.options.metrics_port
            )
            log.info("serving Prometheus metrics on http://%s/metrics",
                     host_port(self.options.host, self.metrics_port))
        await self._models_changed()
        for server in self._servers:
            await server.start()
        if self.options.http_port is not None:
            tls = self.options.security.tls
            self.http_port = await self.rest.start(
                self.options.host,
                self.options.http_port,
                tls.ssl_context() if tls is not None else None,
                reuse_port=self.options.reuse_port,
            )
            log.info("serving the Open Inference Protocol's REST binding on %s://%s",
                     "https" if tls is not None else "http",
                     host_port(self.options.host, self.http_port))
            if tls is None:
                warn_plain_text("REST", self.options.host, self.http_port)
        model_control = self.options.security.model_control
        failed = await self.manager.load_all(model_control.models_at_start())
        await self._models_changed()  # an empty start-up set is ready now
        if self.options.exit_on_error:
            problem = "; ".join(failed.values())
            if not problem and not self.manager.loaded() and model_control.mode is not (
                ModelControlMode.EXPLICIT
            ):
                await self.stop(0.0)
                raise StartupError(nothing_to_serve(self.options.model_path))
            if problem:
                await self.stop(0.0)
                raise StartupError(f"{problem} (--exit-on-error=false serves what did load)")
        if self.options.poll_repository_s is not None:
            assert isinstance(self.manager, ModelManager), "a frontend does not poll"
            self._poller = RepositoryPoller(self.manager, self.options.poll_repository_s)
            await self._poller.prime()
            self._poller.start()
        log.info(
            "serving the Open Inference Protocol on %s (%d models ready, %s event loop)",
            host_port(self.options.host, self.grpc_port),
            len({model.settings.name for model in self.manager.loaded()}),  # not versions
            loop_name(asyncio.get_running_loop()),
        )
        return self.grpc_port

    def abort(self, reason: str) -> None:
        """Stop at once: queued and running requests are answered UNAVAILABLE, and a
        drain in progress closes the port without waiting for clients to go quiet."""
        self._aborted = True
        self.manager.abort(reason)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new work, answer every accepted request, then close the port."""
        grace = self.options.shutdown_grace_s if grace_s is None else grace_s
        self._draining = True
        if self._poller is not None:
            await self._poller.stop()
        await self.health.enter_graceful_shutdown()
        self._update_metrics(ready=False)
        clock = self._clock
        deadline = clock() + grace
        await self.manager.close(grace)
        # Keep answering UNAVAILABLE until clients stop sending (or the grace ends): a
        # call that reaches gRPC just as the port closes would be cut off as CANCELLED,
        # and a REST body still arriving would be dropped unanswered.
        while clock() < deadline and not self._aborted:
            quiet_for = self.dataplane.quiet_for()
            if quiet_for >= QUIET_PERIOD_S:
                if not self.rest.uploads_in_progress:
                    break
                quiet_for = 0.0  # look again in a quiet period
            await asyncio.sleep(min(QUIET_PERIOD_S - quiet_for, deadline - clock()))
        grace_left = max(0.0, min(deadline - clock(), 1.0))
        await asyncio.gather(
            *(server.stop(grace=grace_left) for server in self._servers),
            self.rest.close(),
        )
        self._metrics_endpoint.close()

    async def _models_changed(self) -> None:
        """Keep the health service and the metrics in step with the models."""
        if self._draining:
            return
        # Every status at once: a model gone from the repository is named by no one, and
        # `report` turns it NOT_SERVING.
        statuses = {
            name: SERVING if self.manager.is_loaded(name) else NOT_SERVING
            for name in self.manager.known_names()
        }
        overall = SERVING if self.is_ready() else NOT_SERVING
        statuses[""] = statuses[INFERENCE_SERVICE] = overall
        await self.health.report(statuses)
        self._update_metrics(ready=True)

    def _update_metrics(self, *, ready: bool) -> None:
        """Give the metrics the models to read at scrape time; while draining no model
        is ready, though the queues are still reported until they empty."""
        manager = self.manager
        views = [
            ModelView(model.name, model, model.settings.max_batch_size)
            for model in manager.loaded()
        ]
        self.metrics.models_changed(
            views, {name: ready and manager.is_loaded(name) for name in manager.known_names()}
        )


# After a stop, how long the executor threads may take to come back: an idle one returns
# at once. A batch still running then has had the whole grace period and its callers are
# answered already, so the process leaves without it rather than outlive --shutdown-grace.
BATCH_JOIN_TIMEOUT_S = 0.5


class _Joinable(Protocol):
    def join_threads(self, timeout_s: float) -> bool: ...


def leave_if_a_batch_still_runs(models: _Joinable, timeout_s: float = BATCH_JOIN_TIMEOUT_S) -> None:
    """After a stop: the interpreter must never finalise under a running session.run
    (onnxruntime then aborts the process, exit -6). Give the threads `timeout_s` to come
    back; if a batch still runs, flush the logs and leave with exit code 0."""
    if models.join_threads(timeout_s):
        return
    log.warning("a batch is still running after the stop; exiting without it")
    logging.shutdown()
    os._exit(0)


async def start_unless_stopped(
    start: Coroutine[Any, Any, object], stop: asyncio.Event
) -> asyncio.Future[object] | None:
    """Run a server's start-up unless a stop comes first (models loading, a frontend
    waiting for its executor): then the start is cancelled and None returned. Otherwise
    the finished start, whose result() raises what the start raised."""
    starting = asyncio.ensure_future(start)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if starting.done():
        return starting
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return None


def leave_after_a_stop_during_start_up() -> None:
    """A model still loading or warming up holds a worker thread that cannot be
    interrupted; the server never took a request, so leave without waiting for it."""
    logging.shutdown()
    os._exit(0)

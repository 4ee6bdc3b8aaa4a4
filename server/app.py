"""The application: wires the repository, the servicer, health and reflection into one
grpc.aio server, and runs its start-up and drain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.proto._pool import POOL

from .logs import AccessLog, RejectionLog
from .metrics import MetricsEndpoint, ModelView, ServerMetrics
from .poller import RepositoryPoller
from .providers import GpuFallback
from .reflection import ReflectionPool
from .repository import ModelManager, ModelRepository
from .scheduler import Instance
from .security import SecurityOptions, shield_servicer
from .servicer import InferenceServicer, RequestObserver

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
# While draining, the port closes only after this long without a new request.
QUIET_PERIOD_S = 0.2
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Everything `ferry serve` can be told. A port of 0 picks a free one."""

    model_path: Path
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int | None = 8002  # None: no metrics endpoint
    shutdown_grace_s: float = 30.0
    max_message_bytes: int = 64 * 1024 * 1024
    poll_repository_s: float | None = None  # None: the repository is read once, at start
    session_threads: int = 0  # onnxruntime intra-op threads per session; 0: automatic
    access_log: bool = False  # one log line per inference request
    security: SecurityOptions = field(default_factory=SecurityOptions)
    # A KIND_GPU model where CUDA cannot be used: "cpu" loads it on the CPU with a
    # warning, "fail" fails its load.
    gpu_fallback: str = GpuFallback.CPU.value

    def __post_init__(self) -> None:
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc port must be within 0..65535, got {self.grpc_port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be within 0..65535, got {self.metrics_port}")
        if self.poll_repository_s is not None and not self.poll_repository_s > 0:
            raise ValueError(
                f"poll interval must be > 0 s, got {self.poll_repository_s}"
            )
        if self.session_threads < 0:
            raise ValueError(f"session threads must be >= 0, got {self.session_threads}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown grace must be >= 0 s, got {self.shutdown_grace_s}")
        if self.gpu_fallback not in {f.value for f in GpuFallback}:
            raise ValueError(
                f"gpu fallback must be one of {', '.join(f.value for f in GpuFallback)}, "
                f"got {self.gpu_fallback!r}"
            )
        if self.max_message_bytes < 1024:
            raise ValueError(
                f"max message size must be >= 1024 bytes, got {self.max_message_bytes}"
            )


def _register_in_pool(*files: object) -> None:
    """Let reflection describe the health and reflection services too."""
    for file in files:
        name = file.name  # type: ignore[attr-defined]
        try:
            POOL.FindFileByName(name)
        except KeyError:
            POOL.AddSerializedFile(file.serialized_pb)  # type: ignore[attr-defined]


class FerryServer:
    """One Ferry process: models, the gRPC port and the health service."""

    def __init__(
        self,
        options: ServerOptions,
        *,
        wrap_instance: Callable[[str, Instance], Instance] | None = None,
        request_observers: Sequence[RequestObserver] = (),
    ) -> None:
        self.options = options
        self.metrics = ServerMetrics()
        self._metrics_endpoint = MetricsEndpoint(self.metrics.registry)
        self.metrics_port = 0  # the bound metrics port, once started (0: none)
        self.manager = ModelManager(
            ModelRepository(options.model_path),
            observers_for=self.metrics.observers_for,
            drain_grace_s=options.shutdown_grace_s,
            wrap_instance=wrap_instance,
            on_change=self._models_changed,
            gpu_fallback=GpuFallback(options.gpu_fallback),
            session_threads=options.session_threads,
        )
        self._draining = False
        self._aborted = False
        self._poller: RepositoryPoller | None = None
        self.health = HealthServicer()
        security = options.security
        self.servicer = InferenceServicer(
            self.manager,
            is_ready=self.is_ready,
            request_observers=(
                self.metrics,
                RejectionLog(),
                *((AccessLog(),) if options.access_log else ()),
                *request_observers,
            ),
            tensor_limits=security.tensor_limits(options.max_message_bytes),
            model_control=security.model_control,
        )
        message_limit = options.max_message_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                *security.grpc_options(),
            ],
            interceptors=security.interceptors(),
            maximum_concurrent_rpcs=security.max_concurrent_rpcs,
        )
        shield_servicer(
            self.servicer,
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name,
            INFERENCE_SERVICE,
        )
        # The generated registration function is untyped.
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self.servicer, self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        _register_in_pool(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        reflection.enable_server_reflection(
            [INFERENCE_SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME],
            self._server,
            pool=ReflectionPool(POOL),
        )
        self.grpc_port = 0

    def is_ready(self) -> bool:
        return not self._draining and self.manager.all_ready()

    async def start(self) -> int:
        """Load the repository, then open the port; returns the bound gRPC port."""
        address = f"{self.options.host}:{self.options.grpc_port}"
        try:
            self.grpc_port = self.options.security.bind(self._server, address)
        except RuntimeError as exc:  # grpc's "Failed to bind to address" (port in use)
            raise OSError(f"cannot listen on {address}: {exc}") from exc
        if self.grpc_port == 0:
            raise OSError(f"cannot listen on {address}")
        if self.options.metrics_port is not None:
            # Up before the models load, so that a slow start can be watched.
            self.metrics_port = self._metrics_endpoint.start(
                self.options.host, self.options.metrics_port
            )
            log.info("serving Prometheus metrics on http://%s:%d/metrics",
                     self.options.host, self.metrics_port)
        await self._models_changed()
        await self._server.start()
        await self.manager.load_all(self.options.security.model_control.models_at_start())
        if self.options.poll_repository_s is not None:
            self._poller = RepositoryPoller(self.manager, self.options.poll_repository_s)
            await self._poller.prime()
            self._poller.start()
        log.info(
            "serving the Open Inference Protocol on %s:%d (%d models ready)",
            self.options.host, self.grpc_port, len(self.manager.models),
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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.manager.close(grace)
        # Keep answering UNAVAILABLE until clients stop sending (or the grace ends): a
        # call that reaches gRPC just as the port closes would be cut off as CANCELLED.
        while loop.time() < deadline and not self._aborted:
            quiet_for = time.perf_counter() - self.servicer.last_request_at
            if quiet_for >= QUIET_PERIOD_S:
                break
            await asyncio.sleep(min(QUIET_PERIOD_S - quiet_for, deadline - loop.time()))
        await self._server.stop(grace=max(0.0, min(deadline - loop.time(), 1.0)))
        self._metrics_endpoint.close()

    async def wait_closed(self) -> None:
        await self._server.wait_for_termination()

    async def _models_changed(self) -> None:
        """Keep the health service and the metrics in step with the models."""
        if self._draining:
            return
        for name in self.manager.repository.model_names() + list(self.manager.models):
            ready = name in self.manager.models
            await self.health.set(name, SERVING if ready else NOT_SERVING)
        overall = SERVING if self.is_ready() else NOT_SERVING
        await self.health.set("", overall)
        await self.health.set(INFERENCE_SERVICE, overall)
        self._update_metrics(ready=True)

    def _update_metrics(self, *, ready: bool) -> None:
        """Give the metrics the models to read at scrape time; while draining no model
        is ready, though the queues are still reported until they empty."""
        loaded = self.manager.models
        views = [
            ModelView(model.name, model.scheduler, model.settings.max_batch_size)
            for versions in loaded.values()
            for model in versions.values()
        ]
        names = set(self.manager.repository.model_names()) | set(loaded)
        self.metrics.models_changed(views, {name: ready and name in loaded for name in names})

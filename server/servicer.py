"""The gRPC face of Ferry: the Open Inference Protocol servicer.

Handlers stay thin: look up the model, decode and validate, submit, await, encode. This
is the one place where FerryError kinds become gRPC status codes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import grpc

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc

from . import __version__
from .errors import ErrorKind, FerryError, invalid_input
from .repository import LoadedModel, ModelManager
from .security import ModelControl
from .tensors import TensorLimits, decode_request, encode_response

log = logging.getLogger(__name__)

STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}

SERVER_NAME = "ferry"
EXTENSIONS = ("model_configuration", "statistics", "model_repository", "schedule_policy")


class RequestObserver(Protocol):
    """Told of every finished inference request, with its status code name ("" for the
    model when the request named none that is loaded) and, when it failed, the message."""

    def request_finished(
        self, model: str, code: str, duration_ns: int, message: str = ""
    ) -> None: ...


def _parameter(request: pb.ModelInferRequest, name: str) -> int | None:
    if name not in request.parameters:
        return None
    param = request.parameters[name]
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        value = int(getattr(param, kind))
        if value < 0:
            raise invalid_input(f"request parameter '{name}' must not be negative, got {value}")
        return value
    raise invalid_input(f"request parameter '{name}' must be an integer, got {kind}")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        manager: ModelManager,
        *,
        is_ready: Callable[[], bool],
        request_observers: Sequence[RequestObserver] = (),
        clock: Callable[[], float] = time.monotonic,
        tensor_limits: TensorLimits = TensorLimits(),  # noqa: B008 - frozen
        model_control: ModelControl = ModelControl(),  # noqa: B008 - frozen
    ) -> None:
        self.manager = manager
        self._tensor_limits = tensor_limits
        self._model_control = model_control
        self._is_ready = is_ready
        self._observers = tuple(request_observers)
        self._clock = clock
        self.last_request_at = 0.0  # time.perf_counter() of the latest inference request

    # Health -------------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            self.manager.get(request.name, request.version)
        except FerryError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    # Metadata -----------------------------------------------------------------------

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        model = await self._model(request.name, request.version, context)
        settings = model.settings
        response = pb.ModelMetadataResponse(
            name=settings.name,
            versions=sorted(self.manager.models.get(settings.name, {}), key=int),
            platform="onnxruntime_onnx",
        )
        for spec in settings.inputs:
            response.inputs.add(
                name=spec.name, datatype=spec.datatype, shape=settings.input_shape(spec)
            )
        for spec in settings.outputs:
            response.outputs.add(
                name=spec.name, datatype=spec.datatype, shape=settings.input_shape(spec)
            )
        return response

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        model = await self._model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=model.settings.to_proto())

    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        if request.name:
            models = [await self._model(request.name, request.version, context)]
        else:
            models = [m for versions in self.manager.models.values() for m in versions.values()]
        for model in models:
            response.model_stats.append(model.stats.to_proto())
        return response

    # Repository ---------------------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self.manager.index():
            if request.ready and entry.state.value != "READY":
                continue
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state.value,
                reason=entry.reason,
            )
        return response

    async def RepositoryModelLoad(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        try:
            self._model_control.check_rpc("load")
            config = self._model_control.config_override(request.parameters)
            await self.manager.load(request.model_name, config_override=config)
        except FerryError as error:
            await self._abort(context, error)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            self._model_control.check_rpc("unload")
            await self.manager.unload(request.model_name)
        except FerryError as error:
            await self._abort(context, error)
        return pb.RepositoryModelUnloadResponse()

    # Inference ----------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context.time_remaining())
        except FerryError as error:
            await self._abort(context, error)
            raise  # unreachable: abort raises

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream are batched like any others; each response is sent as
        soon as it is ready, so they may arrive out of order (match them by id)."""
        replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = await self._infer(request, context.time_remaining())
                replies.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except FerryError as error:
                replies.put_nowait(
                    pb.ModelStreamInferResponse(
                        error_message=error.message,
                        infer_response=pb.ModelInferResponse(
                            model_name=request.model_name,
                            model_version=request.model_version,
                            id=request.id,
                        ),
                    )
                )

        async def read_all() -> None:
            loop = asyncio.get_running_loop()
            async for request in request_iterator:
                task = loop.create_task(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*list(pending))
            replies.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read_all())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def _infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None
    ) -> pb.ModelInferResponse:
        start_ns = time.perf_counter_ns()
        self.last_request_at = start_ns / 1e9
        model: LoadedModel | None = None
        code = "INTERNAL"
        message = ""
        try:
            model = self.manager.get(request.model_name, request.model_version)
            settings = model.settings
            decoded = decode_request(request, settings, self._tensor_limits)
            deadline_s = self._deadline(request, model, time_remaining)
            priority = self._priority(request, model)
            outputs = await model.scheduler.submit(
                decoded.inputs,
                decoded.outputs,
                rows=decoded.rows,
                shape_key=decoded.shape_key,
                deadline_s=deadline_s,
                priority=priority,
            )
            response = encode_response(request, settings, model.version, outputs)
            code = "OK"
            return response
        except FerryError as error:
            code = STATUS_CODES[error.kind].name
            message = error.message
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # never leak a traceback to the caller
            log.exception("unexpected error serving model '%s'", request.model_name)
            message = f"internal error: {type(exc).__name__}"
            raise FerryError(ErrorKind.INTERNAL, message) from exc
        finally:
            duration_ns = time.perf_counter_ns() - start_ns
            if model is not None:
                model.stats.request_finished(code == "OK", duration_ns)
            name = model.name if model is not None else ""
            for observer in self._observers:
                observer.request_finished(name, code, duration_ns, message)

    def _deadline(
        self, request: pb.ModelInferRequest, model: LoadedModel, time_remaining: float | None
    ) -> float | None:
        """The earliest of the caller's gRPC deadline and the model's queue timeout."""
        settings = model.settings
        timeout_s = settings.default_timeout_s
        requested = _parameter(request, "timeout") if request.parameters else None
        if requested and (settings.allow_timeout_override or timeout_s is None):
            timeout_s = requested / 1e6
        if timeout_s is None:  # the common case, without building a list
            return None if time_remaining is None else self._clock() + time_remaining
        limits = [t for t in (timeout_s, time_remaining) if t is not None]
        return self._clock() + min(limits) if limits else None

    def _priority(self, request: pb.ModelInferRequest, model: LoadedModel) -> int:
        settings = model.settings
        if settings.priority_levels <= 1:
            return 1  # as in Triton, a model without priority levels ignores the parameter
        requested = _parameter(request, "priority") if request.parameters else None
        if not requested:
            return settings.default_priority_level
        if requested > settings.priority_levels:
            raise invalid_input(
                f"priority {requested} is outside 1..{settings.priority_levels} "
                f"(priority_levels of model '{settings.name}')"
            )
        return requested

    async def _model(self, name: str, version: str, context: Any) -> LoadedModel:
        try:
            return self.manager.get(name, version)
        except FerryError as error:
            await self._abort(context, error)
            raise

    async def _abort(self, context: Any, error: FerryError) -> None:
        await context.abort(STATUS_CODES[error.kind], error.message)

    # Extensions Ferry does not implement ------------------------------------------

    async def _unimplemented(self, context: Any, what: str) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"Ferry does not implement the {what} extension"
        )

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "system shared memory")

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "system shared memory")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "system shared memory")

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "CUDA shared memory")

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "CUDA shared memory")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "CUDA shared memory")

    async def TraceSetting(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "trace")

    async def LogSettings(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "logging")

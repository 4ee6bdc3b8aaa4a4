"""The gRPC face of Ferry: the Open Inference Protocol servicer.

Handlers stay thin: decode the protobuf, call the data plane, encode the answer. Errors
become gRPC status codes through `server.grpc_status`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, cast

import grpc

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc

from . import __version__
from .client_text import bounded
from .dataplane import DataPlane, refuse_oversized_answer, statistics_of, text_bytes
from .errors import FerryError, Status
from .grpc_status import status_code
from .loaded_model import LoadedModel
from .raw_contents import SplitRequest
from .repository import ModelControl
from .rows import Array, Tensors
from .streams import ReplyQueue, StreamLimits
from .tensors import TensorLimits, decode_request, encode_response
from .wire import MalformedMessage

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "ferry"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A stream's reply wraps the ModelInferResponse: a field tag and a length of up to 5 bytes.
STREAM_FRAMING_BYTES = 6
# An error message may quote what the caller sent (a model name): it is cut to this many
# characters, so that it fits gRPC's status metadata (8 KiB by default on the client) and
# a stream's reply.
MAX_ERROR_MESSAGE_CHARS = 2048
# The status message travels percent-encoded: printable ASCII but '%' as one byte, any
# other byte of its UTF-8 as three. 2,048 ASCII characters never take more than this; a
# message with other characters is cut to it as well.
MAX_ERROR_MESSAGE_WIRE_BYTES = 3 * MAX_ERROR_MESSAGE_CHARS
# The limit an answer is held to, as its refusal names it.
SENT_MESSAGE_LIMIT = "the largest message the server sends (--max-message-size)"
EXTENSIONS = (
    "classification", "model_configuration", "statistics", "model_repository", "schedule_policy"
)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        *,
        is_ready: Callable[[], bool],
        tensor_limits: TensorLimits = TensorLimits(),  # noqa: B008 - frozen
        model_control: ModelControl = ModelControl(),  # noqa: B008 - frozen
        max_response_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        stream_limits: StreamLimits = StreamLimits(),  # noqa: B008 - frozen
    ) -> None:
        self._dataplane = dataplane
        self._models = dataplane.models
        self._tensor_limits = tensor_limits
        self._model_control = model_control
        self._is_ready = is_ready
        self._max_response = max_response_bytes
        self._stream_limits = stream_limits

    # Health -------------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            self._models.get(request.name, request.version)
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
            versions=self._models.versions_of(settings.name),
            platform="onnxruntime_onnx",
        )
        for spec in settings.inputs:
            response.inputs.add(
                name=spec.name, datatype=spec.datatype, shape=settings.client_shapes[spec.name]
            )
        for spec in settings.outputs:
            response.outputs.add(
                name=spec.name, datatype=spec.datatype, shape=settings.client_shapes[spec.name]
            )
        return response

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        model = await self._model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=model.settings.to_proto())

    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        response = pb.ModelStatisticsResponse()
        try:
            await self._models.refresh_statistics()
        except FerryError as error:
            await self._abort(context, error)
        try:
            models = statistics_of(self._models, request.name, request.version)
        except FerryError as error:
            await self._abort(context, error)
        for model in models:
            response.model_stats.append(model.stats.to_proto())
        return response

    # Repository ---------------------------------------------------------------------

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self._models.index():
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
            await self._models.load(request.model_name, config_override=config)
        except FerryError as error:
            await self._abort(context, error)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            self._model_control.check_rpc("unload")
            await self._models.unload(request.model_name)
        except FerryError as error:
            await self._abort(context, error)
        return pb.RepositoryModelUnloadResponse()

    # Inference ----------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest | SplitRequest, context: Any
    ) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context.time_remaining(), 0)
        except FerryError as error:
            await self._abort(context, error)
            raise  # unreachable: abort raises

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest | SplitRequest | MalformedMessage],
        context: Any,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream are batched like any others; each response is sent as
        soon as it is ready, so they may arrive out of order (match them by id). A request
        that fails, or whose answer would be too large to send, gets its own error_message
        and the stream goes on. The stream stops reading while it holds too many unsent
        answers (`server.streams`)."""
        replies: ReplyQueue[pb.ModelStreamInferResponse] = ReplyQueue(self._stream_limits)
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ModelInferRequest | SplitRequest) -> None:
            try:
                response = await self._infer(
                    request, context.time_remaining(), STREAM_FRAMING_BYTES
                )
                reply = pb.ModelStreamInferResponse(infer_response=response)
            except FerryError as error:
                named = request.request if isinstance(request, SplitRequest) else request
                reply = _error_reply(error.message, named, self._max_response)
            replies.put(reply, reply.ByteSize())

        async def read_all() -> None:
            loop = asyncio.get_running_loop()
            requests = aiter(request_iterator)
            while True:
                await replies.room()  # backpressure: leave requests unread
                try:
                    request = await anext(requests)
                except StopAsyncIteration:
                    break
                replies.started()
                if isinstance(request, MalformedMessage):
                    self._dataplane.refused(Status.INVALID_ARGUMENT, request.message)
                    replies.put(_error_reply(request.message), 0)
                    continue
                task = loop.create_task(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*list(pending))
            replies.finish()

        reader = asyncio.get_running_loop().create_task(read_all())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
                replies.sent()
            await reader
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    def _infer(
        self,
        received: pb.ModelInferRequest | SplitRequest,
        time_remaining: float | None,
        framing_bytes: int,
    ) -> Coroutine[Any, Any, pb.ModelInferResponse]:
        """The data plane's call, for the handler to await: not a coroutine of its own, so
        that each of the request's steps through the loop resumes one frame fewer."""
        # A large request has its contents kept apart (`type() is`: the cheapest test
        # for the common request, which is not one).
        if type(received) is SplitRequest:
            request, raw_contents = received
        else:
            request, raw_contents = cast(pb.ModelInferRequest, received), None
        limits = self._tensor_limits
        max_response = self._max_response

        def encode(model: LoadedModel, outputs: Tensors) -> pb.ModelInferResponse:
            settings = model.settings
            # Refused from the outputs' sizes before anything is built; what is built is
            # then checked to the byte (names, shapes and framing count too). Typed or raw
            # as `encode_response` decides it (a typed floor is the lower of the two).
            if raw_contents is not None or request.raw_input_contents or not request.inputs:
                # Raw: a numeric output's floor is its bytes, summed here without a call
                # per output; the refusal (and any other datatype) as before.
                total = framing_bytes
                for array in outputs.values():
                    if array.dtype.kind in "OSU":
                        total = max_response + 1
                        break
                    total += array.nbytes
                if total > max_response:
                    refuse_oversized_answer(
                        settings.name, outputs, raw_floor, max_response, SENT_MESSAGE_LIMIT,
                        settings.output_datatypes, framing_bytes,
                    )
            else:
                refuse_oversized_answer(
                    settings.name, outputs, typed_floor, max_response, SENT_MESSAGE_LIMIT,
                    settings.output_datatypes, framing_bytes,
                )
            if raw_contents is None:
                return encode_response(
                    request, settings, model.version, outputs,
                    max_bytes=max_response, framing_bytes=framing_bytes,
                )
            return encode_response(
                request, settings, model.version, outputs,
                max_bytes=max_response, framing_bytes=framing_bytes, raw_inputs=True,
            )

        return self._dataplane.infer(
            request.model_name,
            request.model_version,
            lambda settings: decode_request(request, settings, limits, raw_contents),
            encode,
            time_remaining,
        )

    async def _model(self, name: str, version: str, context: Any) -> LoadedModel:
        try:
            return self._models.get(name, version)
        except FerryError as error:
            await self._abort(context, error)
            raise

    async def _abort(self, context: Any, error: FerryError) -> None:
        # A call already over (the queue answers at the caller's own deadline) cannot be
        # answered: `grpc_status.shielded` ends it as a cancelled one.
        await context.abort(status_code(error), bounded_message(error.message))

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


def protobuf_floor(array: Array, typed: bool) -> int:
    """The fewest bytes an output takes in a ModelInferResponse, as `encode_response`
    writes it: raw, its bytes (a BYTES element: a 4-byte length and its content); typed
    contents (a request that came typed), one byte per integer (a varint), the element
    size per float, and a tag, a length and the content per BYTES element."""
    kind = array.dtype.kind
    if kind in "OSU":
        return text_bytes(array) + (2 if typed else 4) * array.size
    if typed and kind in "iu":
        return array.size
    return array.nbytes


def raw_floor(name: str, array: Array) -> int:
    return protobuf_floor(array, typed=False)


def typed_floor(name: str, array: Array) -> int:
    return protobuf_floor(array, typed=True)


def bounded_message(message: str) -> str:
    """The message as a caller gets it: cut in its middle (`client_text.bounded`), so
    that it still ends with what the server has, to fit MAX_ERROR_MESSAGE_CHARS and, once
    percent-encoded, MAX_ERROR_MESSAGE_WIRE_BYTES."""
    shown = bounded(message, MAX_ERROR_MESSAGE_CHARS)
    limit = MAX_ERROR_MESSAGE_CHARS
    # At most 12 wire bytes a character: a few rounds at most, and only for long
    # messages that are not ASCII.
    while not shown.isascii() and _wire_bytes(shown) > MAX_ERROR_MESSAGE_WIRE_BYTES:
        limit = limit * 3 // 4
        shown = bounded(message, limit)
    return shown


def _wire_bytes(message: str) -> int:
    return sum(1 if " " <= char <= "~" and char != "%" else 3 * _utf8_length(char)
               for char in message)


def _utf8_length(char: str) -> int:
    # From the code point: a lone surrogate (a file name decoded with surrogateescape)
    # cannot be encoded, and gRPC sends it as the three bytes of its code point.
    code = ord(char)
    return 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4


def _error_reply(
    message: str,
    request: pb.ModelInferRequest | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> pb.ModelStreamInferResponse:
    """A stream's answer to one request that failed; the stream goes on. It names the
    request (model, version, id) so the caller can match it, unless those alone would
    make it too large to send: then it carries the error alone."""
    message = bounded_message(message)
    if request is None:
        return pb.ModelStreamInferResponse(error_message=message)
    reply = pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        ),
    )
    if reply.ByteSize() + STREAM_FRAMING_BYTES > max_bytes:
        return pb.ModelStreamInferResponse(error_message=message)
    return reply

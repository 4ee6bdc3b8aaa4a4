"""The descriptor pool that server reflection answers from: Ferry's own pool, able to name
the file that defines a method as well as a service or message.

The reflection protocol lets a client ask for the file containing any fully-qualified
symbol, methods included, and ghz asks for `inference.GRPCInferenceService.ModelInfer`.
protobuf's upb pool resolves services and messages but not their methods, so without this
grpcio-reflection would answer NOT_FOUND and ghz would need the .proto file.

Also the reflection service itself (`add_reflection_service`), whose answers name what
was not found, and which refuses a malformed request alone rather than the whole stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer as AsyncReflectionServicer
from grpc_reflection.v1alpha.reflection import SERVICE_NAME

from .errors import cut
from .wire import MalformedMessage, tolerant

if TYPE_CHECKING:
    # grpcio-reflection types its pool argument as a DescriptorPool; this stands in for one.
    _PoolLike = DescriptorPool
else:
    _PoolLike = object


class ReflectionPool(_PoolLike):
    """Wraps a DescriptorPool; every lookup but one goes straight through."""

    def __init__(self, pool: DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            file = self._file_defining_method(symbol)
            if file is None:
                raise
            return file

    def _file_defining_method(self, symbol: str) -> FileDescriptor | None:
        service_name, _, method = symbol.rpartition(".")
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            return None
        if method not in service.methods_by_name:
            return None
        file: FileDescriptor = service.file
        return file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class ReflectionService(AsyncReflectionServicer):  # type: ignore[misc]  # untyped base
    """grpcio-reflection's asyncio servicer, with answers that say what was asked: a
    lookup that finds nothing names the symbol, file or type, and a request that is not
    a valid ServerReflectionRequest (or asks nothing) gets INVALID_ARGUMENT as its own
    error_response; the stream goes on, as it does after any lookup that fails."""

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest | MalformedMessage],
        context: Any,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for request in request_iterator:
            if isinstance(request, MalformedMessage):
                yield _error(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                continue
            asked = request.WhichOneof("message_request")
            if asked is None:
                yield _error(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"a ServerReflectionRequest must set one of {', '.join(_ASKED)}",
                    request,
                )
                continue
            async for response in super().ServerReflectionInfo(_one(request), context):
                error = response.error_response
                if response.HasField("error_response") and error.error_code == _NOT_FOUND:
                    error.error_message = _not_found(request, asked)
                yield response


_NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
_ASKED = tuple(
    field.name
    for field in reflection_pb2.ServerReflectionRequest.DESCRIPTOR.oneofs_by_name[
        "message_request"
    ].fields
)
# What a not-found answer quotes of the request is cut to this many characters.
MAX_QUOTED_CHARS = 200


async def _one(
    request: reflection_pb2.ServerReflectionRequest,
) -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
    yield request


def _error(
    code: grpc.StatusCode,
    message: str,
    request: reflection_pb2.ServerReflectionRequest | None = None,
) -> reflection_pb2.ServerReflectionResponse:
    return reflection_pb2.ServerReflectionResponse(
        error_response=reflection_pb2.ErrorResponse(
            error_code=code.value[0], error_message=message
        ),
        original_request=request,
    )


def _quoted(text: str) -> str:
    return repr(cut(text, MAX_QUOTED_CHARS - 3))


def _not_found(request: reflection_pb2.ServerReflectionRequest, asked: str) -> str:
    if asked == "file_by_filename":
        return f"no file {_quoted(request.file_by_filename)} is known to this server"
    if asked == "file_containing_symbol":
        return (
            f"no symbol {_quoted(request.file_containing_symbol)} is known to this server "
            "(a fully-qualified service, method, message or enum name is expected)"
        )
    if asked == "file_containing_extension":
        extension = request.file_containing_extension
        return (
            f"no extension {extension.extension_number} of message type "
            f"{_quoted(extension.containing_type)} is known to this server"
        )
    return (
        f"no message type {_quoted(request.all_extension_numbers_of_type)} is known to this server"
    )


def add_reflection_service(
    service_names: Iterable[str], server: grpc.aio.Server, pool: DescriptorPool
) -> None:
    """`enable_server_reflection` (v1alpha) with `ReflectionService`, and a request
    parser that turns bytes that are not a ServerReflectionRequest into a refusal of that
    request instead of gRPC's UNKNOWN for the whole stream."""
    service = ReflectionService(service_names, pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        service.ServerReflectionInfo,
        request_deserializer=tolerant(
            reflection_pb2.ServerReflectionRequest.FromString, "ServerReflectionRequest"
        ),
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )

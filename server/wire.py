"""Registering the inference service so that a request that is not valid protobuf reaches
Ferry's own code, which answers INVALID_ARGUMENT and counts it, instead of gRPC's
generic UNKNOWN with a traceback logged per message.

grpc.aio parses a request before any handler or interceptor runs; the generated
registration uses `FromString`, whose DecodeError escapes into gRPC. Here each method's
parser is wrapped so that a bad message becomes a `MalformedMessage` value; the shield
around the servicer (`server.grpc_status`) and the stream reader turn it into a refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc

from .raw_contents import SPLIT_MIN_BYTES, SplitRequest, split_raw_contents


@dataclass(frozen=True, slots=True)
class MalformedMessage:
    """What a method receives in place of a message that did not parse."""

    type_name: str

    @property
    def message(self) -> str:
        return f"request is not a valid {self.type_name}"


def tolerant(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    """A request parser that returns a MalformedMessage instead of raising."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return MalformedMessage(type_name)

    return deserialize


def tolerant_infer_request(data: bytes) -> pb.ModelInferRequest | SplitRequest | MalformedMessage:
    """`tolerant`'s ModelInferRequest parser, which reads a large request's
    raw_input_contents where the message holds them (a SplitRequest)."""
    try:
        if len(data) >= SPLIT_MIN_BYTES and (split := split_raw_contents(data)) is not None:
            return SplitRequest(pb.ModelInferRequest.FromString(split[0]), split[1])
        return pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return MalformedMessage("ModelInferRequest")


class _Recorder:
    """Stands in for the server to catch the generated registration's handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.handlers = service, handlers


def add_inference_service(servicer: object, server: grpc.aio.Server) -> None:
    """`add_GRPCInferenceServiceServicer_to_server`, with tolerant request parsers."""
    recorder = _Recorder()
    # The generated registration function is untyped.
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, recorder
    )
    handlers = {}
    for name, handler in recorder.handlers.items():
        parse = handler.request_deserializer
        message_type = parse.__self__  # type: ignore[union-attr]
        handlers[name] = handler._replace(  # type: ignore[attr-defined]
            request_deserializer=tolerant_infer_request
            if message_type is pb.ModelInferRequest
            else tolerant(parse, message_type.DESCRIPTOR.name)  # type: ignore[arg-type]
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(recorder.service, handlers),)
    )
    server.add_registered_method_handlers(  # type: ignore[attr-defined]
        recorder.service, handlers
    )

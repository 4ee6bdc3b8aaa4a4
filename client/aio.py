"""The asyncio client, on grpc.aio; the same methods as FerryClient, awaited.

A grpc.aio channel belongs to one event loop: the client opens it on its first call and
refuses, with a RuntimeError that says so, to be used from any other loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy.typing as npt

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc

from . import _convert
from ._channel import (
    CHANNEL_OPTIONS,
    DEFAULT_URL,
    call_metadata,
    call_timeout,
    channel_target,
    credentials,
)
from .errors import FerryClientError, from_rpc_error
from .metadata import ModelMetadata, ServerMetadata


class AsyncFerryClient:
    """Calls a Ferry (or any Open Inference Protocol gRPC server) at `url`, "host:port".

    Every method raises FerryClientError when the call fails, including when the server
    cannot be reached or the client is closed; `timeout` is in seconds (None or inf: no
    deadline; 0, negative or NaN: ValueError).

    It may be created anywhere; it works on the event loop of its first call, and raises
    RuntimeError when awaited on another one (make one client per loop).

    TLS is on when `tls` is true or any PEM argument is given (bytes of a PEM file):
    `root_certificates` to trust (default: the system's), and `private_key` with
    `certificate_chain` for a client certificate. `headers` go with every call, such as
    the key of a restricted API.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = channel_target(url)
        self._metadata = call_metadata(headers)
        self._credentials = credentials(tls, root_certificates, private_key, certificate_chain)
        # Opened by the first call, on its loop: grpc.aio binds a channel to the loop it
        # is made on, and outside any loop refuses to make one at all.
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        outputs: Iterable[str] | None = None,
        *,
        version: str = "",
        timeout: float | None = None,
        request_id: str = "",
        parameters: Mapping[str, _convert.ParameterValue] | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """Run `model` on `inputs` and return the requested outputs (all when None)."""
        outputs = None if outputs is None else list(outputs)  # read once, checked after
        request = _convert.infer_request(
            model, inputs, outputs, version=version, request_id=request_id, parameters=parameters
        )
        response: pb.ModelInferResponse = await self._call("ModelInfer", request, timeout)
        _convert.check_response_of(response, request)
        return _convert.infer_outputs(response, outputs)

    async def is_server_live(self, *, timeout: float | None = None) -> bool:
        response: pb.ServerLiveResponse = await self._call(
            "ServerLive", pb.ServerLiveRequest(), timeout
        )
        return response.live

    async def is_server_ready(self, *, timeout: float | None = None) -> bool:
        response: pb.ServerReadyResponse = await self._call(
            "ServerReady", pb.ServerReadyRequest(), timeout
        )
        return response.ready

    async def is_model_ready(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version)
        response: pb.ModelReadyResponse = await self._call("ModelReady", request, timeout)
        return response.ready

    async def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        response: pb.ServerMetadataResponse = await self._call(
            "ServerMetadata", pb.ServerMetadataRequest(), timeout
        )
        return _convert.server_metadata(response)

    async def model_metadata(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=version)
        response: pb.ModelMetadataResponse = await self._call(
            "ModelMetadata", request, timeout
        )
        return _convert.model_metadata(response)

    async def close(self) -> None:
        """Close the channel; calls in flight fail with CANCELLED. Closing twice is fine."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncFerryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _opened_stub(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._closed:
            raise FerryClientError(
                grpc.StatusCode.CANCELLED, "this AsyncFerryClient is closed; create a new one"
            )
        if self._loop is None:
            self._channel = (
                grpc.aio.secure_channel(self.url, self._credentials, options=CHANNEL_OPTIONS)
                if self._credentials is not None
                else grpc.aio.insecure_channel(self.url, options=CHANNEL_OPTIONS)
            )
            self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]
            self._loop = loop
        elif loop is not self._loop:
            # Else asyncio's "got Future attached to a different loop", or a hang.
            raise RuntimeError(
                "this AsyncFerryClient works on the event loop of its first call, not on "
                "this one; create one client per event loop"
            )
        return self._stub

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        deadline_s = call_timeout(timeout)
        stub = self._opened_stub()
        try:
            response = await getattr(stub, method)(
                request, timeout=deadline_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        except grpc.aio.UsageError:  # "Channel is closed", if close() won the race
            if self._closed:
                raise FerryClientError(
                    grpc.StatusCode.CANCELLED, "this AsyncFerryClient is closed; create a new one"
                ) from None
            raise
        if response is None:  # grpc.aio's answer to bytes that do not parse (sync raises)
            raise FerryClientError(
                grpc.StatusCode.INTERNAL, "malformed response: not a valid protobuf message"
            )
        return response

"""The blocking client, on grpc's sync channel. Safe to share between threads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import grpc
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


class FerryClient:
    """Calls a Ferry (or any Open Inference Protocol gRPC server) at `url`, "host:port".

    Every method raises FerryClientError when the call fails, including when the server
    cannot be reached or the client is closed; `timeout` is in seconds (None or inf: no
    deadline; 0, negative or NaN: ValueError).

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
        creds = credentials(tls, root_certificates, private_key, certificate_chain)
        self._channel = (
            grpc.secure_channel(self.url, creds, options=CHANNEL_OPTIONS)
            if creds is not None
            else grpc.insecure_channel(self.url, options=CHANNEL_OPTIONS)
        )
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._closed = False

    def infer(
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
        response: pb.ModelInferResponse = self._call(self._stub.ModelInfer, request, timeout)
        _convert.check_response_of(response, request)
        return _convert.infer_outputs(response, outputs)

    def is_server_live(self, *, timeout: float | None = None) -> bool:
        response: pb.ServerLiveResponse = self._call(
            self._stub.ServerLive, pb.ServerLiveRequest(), timeout
        )
        return response.live

    def is_server_ready(self, *, timeout: float | None = None) -> bool:
        response: pb.ServerReadyResponse = self._call(
            self._stub.ServerReady, pb.ServerReadyRequest(), timeout
        )
        return response.ready

    def is_model_ready(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version)
        response: pb.ModelReadyResponse = self._call(self._stub.ModelReady, request, timeout)
        return response.ready

    def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        response: pb.ServerMetadataResponse = self._call(
            self._stub.ServerMetadata, pb.ServerMetadataRequest(), timeout
        )
        return _convert.server_metadata(response)

    def model_metadata(
        self, model: str, version: str = "", *, timeout: float | None = None
    ) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=version)
        response: pb.ModelMetadataResponse = self._call(self._stub.ModelMetadata, request, timeout)
        return _convert.model_metadata(response)

    def close(self) -> None:
        """Close the channel; calls in flight fail with CANCELLED. Closing twice is fine."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> FerryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline_s = call_timeout(timeout)
        if self._closed:
            raise _closed_error()
        try:
            return method(request, timeout=deadline_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        except ValueError:  # grpc's "Cannot invoke RPC on closed channel!", if close() won
            if self._closed:
                raise _closed_error() from None
            raise


def _closed_error() -> FerryClientError:
    return FerryClientError(
        grpc.StatusCode.CANCELLED, "this FerryClient is closed; create a new one"
    )

"""Who may talk to Ferry, what they may ask, and how much: TLS credentials, the model-control
policy, per-API-group keys checked by a server interceptor, connection and tensor limits, and
the scrubbing of file-system paths from messages a caller sees.

Everything here is parsed and validated once, at start-up, into frozen settings.
"""

from __future__ import annotations

import argparse
import enum
import hmac
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from .errors import ErrorKind, FerryError
from .tensors import DEFAULT_MAX_TENSOR_ELEMENTS, TensorLimits

log = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any]"]]

INFERENCE_SERVICE = "inference.GRPCInferenceService"

# Defaults of the connection limits. The keep-alive values are gRPC's (and Triton's):
# a client may ping an idle connection at most every 5 minutes, and is dropped after
# two pings too many.
DEFAULT_MAX_CONCURRENT_STREAMS = 1024
DEFAULT_MIN_PING_INTERVAL_S = 300.0
DEFAULT_MAX_PING_STRIKES = 2


# TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of the server's certificate chain and key, and optionally the CA that
    signs client certificates (which turns on mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        try:
            chain = self.cert.read_bytes()
            key = self.key.read_bytes()
            client_ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as exc:
            raise OSError(f"cannot read a TLS file: {exc}") from exc
        return grpc.ssl_server_credentials(
            [(key, chain)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


# Model control ----------------------------------------------------------------------------


class ModelControlMode(enum.Enum):
    """As Triton's --model-control-mode."""

    NONE = "none"  # the repository loads at start; load/unload RPCs are refused
    EXPLICIT = "explicit"  # load/unload RPCs allowed; only --load-model models load at start
    POLL = "poll"  # the repository loads at start and is watched; load/unload RPCs refused


LOAD_ALL = "*"


@dataclass(frozen=True, slots=True)
class ModelControl:
    mode: ModelControlMode = ModelControlMode.NONE
    startup_models: tuple[str, ...] = ()  # explicit mode: names to load at start, or "*"
    allow_load_overrides: bool = False

    def __post_init__(self) -> None:
        if self.startup_models and self.mode is not ModelControlMode.EXPLICIT:
            raise ValueError(
                f"--load-model needs --model-control-mode=explicit "
                f"(got {self.mode.value}, which loads the whole repository)"
            )

    def models_at_start(self) -> tuple[str, ...] | None:
        """The models to load at start; None means every model of the repository."""
        if self.mode is not ModelControlMode.EXPLICIT or LOAD_ALL in self.startup_models:
            return None
        return self.startup_models

    def check_rpc(self, action: str) -> None:
        """Refuse RepositoryModelLoad/Unload unless the server runs in explicit mode."""
        if self.mode is not ModelControlMode.EXPLICIT:
            raise FerryError(
                ErrorKind.PERMISSION_DENIED,
                f"model {action} is turned off: the server runs with "
                f"--model-control-mode={self.mode.value}; "
                "--model-control-mode=explicit allows it",
            )

    def config_override(self, parameters: Mapping[str, Any]) -> str | None:
        """The JSON model config a load request sends to replace config.pbtxt, if it may.

        Without --allow-load-overrides every load parameter is refused; with it, only
        'config' (as Triton's, a JSON ModelConfig). File overrides are never accepted:
        a load may name only what is already inside the repository."""
        given = sorted(parameters)
        if not given:
            return None
        if not self.allow_load_overrides:
            raise FerryError(
                ErrorKind.PERMISSION_DENIED,
                f"load parameters ({', '.join(repr(n) for n in given)}) override the "
                "repository's config or files and are turned off; "
                "--allow-load-overrides allows a config override",
            )
        others = [name for name in given if name != "config"]
        if others:
            raise FerryError(
                ErrorKind.PERMISSION_DENIED,
                f"load parameters {', '.join(repr(n) for n in others)} are not accepted: "
                "Ferry takes model files only from its repository; 'config' is the one "
                "override it allows",
            )
        config = parameters["config"]
        if config.WhichOneof("parameter_choice") != "string_param":
            raise FerryError(
                ErrorKind.INVALID_INPUT, "load parameter 'config' must be a JSON string"
            )
        return str(config.string_param)


# Restricted API groups ----------------------------------------------------------------


class ApiGroup(enum.Enum):
    """Groups of RPCs that can each require a key, with Triton's names."""

    HEALTH = "health"
    METADATA = "metadata"
    MODEL_CONFIG = "model-config"
    INFERENCE = "inference"
    MODEL_REPOSITORY = "model-repository"
    STATISTICS = "statistics"
    SHARED_MEMORY = "shared-memory"
    TRACE = "trace"
    LOGGING = "logging"


_INFERENCE_METHODS: dict[str, ApiGroup] = {
    "ServerLive": ApiGroup.HEALTH,
    "ServerReady": ApiGroup.HEALTH,
    "ModelReady": ApiGroup.HEALTH,
    "ServerMetadata": ApiGroup.METADATA,
    "ModelMetadata": ApiGroup.METADATA,
    "ModelConfig": ApiGroup.MODEL_CONFIG,
    "ModelInfer": ApiGroup.INFERENCE,
    "ModelStreamInfer": ApiGroup.INFERENCE,
    "RepositoryIndex": ApiGroup.MODEL_REPOSITORY,
    "RepositoryModelLoad": ApiGroup.MODEL_REPOSITORY,
    "RepositoryModelUnload": ApiGroup.MODEL_REPOSITORY,
    "ModelStatistics": ApiGroup.STATISTICS,
    "SystemSharedMemoryStatus": ApiGroup.SHARED_MEMORY,
    "SystemSharedMemoryRegister": ApiGroup.SHARED_MEMORY,
    "SystemSharedMemoryUnregister": ApiGroup.SHARED_MEMORY,
    "CudaSharedMemoryStatus": ApiGroup.SHARED_MEMORY,
    "CudaSharedMemoryRegister": ApiGroup.SHARED_MEMORY,
    "CudaSharedMemoryUnregister": ApiGroup.SHARED_MEMORY,
    "TraceSetting": ApiGroup.TRACE,
    "LogSettings": ApiGroup.LOGGING,
}

# Whole services: the standard health service is for probes; reflection describes the API.
_SERVICES: dict[str, ApiGroup] = {
    "grpc.health.v1.Health": ApiGroup.HEALTH,
    "grpc.reflection.v1alpha.ServerReflection": ApiGroup.METADATA,
    "grpc.reflection.v1.ServerReflection": ApiGroup.METADATA,
}


def api_group(method: str) -> ApiGroup | None:
    """The group of a full method name such as '/inference.GRPCInferenceService/ModelInfer'."""
    service, _, name = method.lstrip("/").partition("/")
    if service == INFERENCE_SERVICE:
        return _INFERENCE_METHODS.get(name)
    return _SERVICES.get(service)


_HEADER = re.compile(r"[0-9a-z_.-]+")


@dataclass(frozen=True, slots=True)
class RestrictedApi:
    """Calls to these groups must carry `header: value` in their metadata."""

    groups: frozenset[ApiGroup]
    header: str
    value: str = field(repr=False)  # never shown in logs or reprs

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("a restricted API needs at least one group")
        if not _HEADER.fullmatch(self.header) or self.header.endswith("-bin") or (
            self.header.startswith("grpc-")
        ):
            raise ValueError(
                f"restricted API header {self.header!r} is not a usable gRPC metadata key "
                "(lower-case letters, digits, '-', '_', '.'; not 'grpc-*' or '*-bin')"
            )
        if not self.value or not self.value.isprintable() or not self.value.isascii():
            raise ValueError(
                f"the key of restricted header {self.header!r} must be non-empty printable ASCII"
            )

    @classmethod
    def parse(cls, text: str) -> RestrictedApi:
        """`GROUP[,GROUP...]:HEADER=VALUE`, as Triton's --grpc-restricted-protocol; a VALUE
        of `@PATH` is read from that file (so that it stays out of the process list)."""
        groups_text, colon, assignment = text.partition(":")
        header, equals, value = assignment.partition("=")
        if not colon or not equals:
            raise ValueError(
                f"restricted API {_redact_assignment(text)!r} is not GROUP[,GROUP...]:HEADER=VALUE"
            )
        groups = set()
        for name in groups_text.split(","):
            try:
                groups.add(ApiGroup(name.strip().lower()))
            except ValueError:
                known = ", ".join(g.value for g in ApiGroup)
                raise ValueError(
                    f"unknown API group {name.strip()!r} in --restricted-api; known: {known}"
                ) from None
        if value.startswith("@"):
            try:
                value = Path(value[1:]).read_text().strip()
            except OSError as exc:
                raise ValueError(f"cannot read the key of header {header!r}: {exc}") from exc
        return cls(frozenset(groups), header.strip().lower(), value)


def _redact_assignment(text: str) -> str:
    head, equals, _ = text.partition("=")
    return f"{head}=***" if equals else text


class RestrictedApiInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answers UNAUTHENTICATED to a call of a restricted group without its key."""

    def __init__(self, restrictions: Sequence[RestrictedApi]) -> None:
        self._keys: dict[ApiGroup, tuple[str, bytes]] = {}
        for restriction in restrictions:
            for group in restriction.groups:
                if group in self._keys:
                    raise ValueError(f"API group '{group.value}' is restricted more than once")
                self._keys[group] = (restriction.header, restriction.value.encode())

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        group = api_group(handler_call_details.method)
        key = self._keys.get(group) if group is not None else None
        if key is None:
            return await continuation(handler_call_details)
        header, expected = key
        supplied = [
            value
            for name, value in handler_call_details.invocation_metadata or ()
            if name == header
        ]
        if len(supplied) == 1:
            value = supplied[0]
            given = value if isinstance(value, bytes) else value.encode()
            if hmac.compare_digest(given, expected):
                return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        assert group is not None
        return _refusing(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            f"the '{group.value}' API is restricted: send its key in the '{header}' header",
        )


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape that refuses the call without reading the request."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; this makes it an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


# Errors that leak nothing -------------------------------------------------------------


def shield_servicer(servicer: object, method_names: Iterable[str], service: str) -> None:
    """Wrap each RPC method of a servicer, once, so that an exception escaping it becomes
    INTERNAL with a short message; the detail (and its traceback) goes only to the log.

    Done at start-up rather than in a server interceptor, which would cost an extra
    coroutine and handler lookup on every call.
    """
    for name in method_names:
        behaviour = getattr(servicer, name)
        setattr(servicer, name, shielded(behaviour, f"/{service}/{name}"))


async def _internal(context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error (details are in the server log)")


def shielded(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            responses: AsyncIterator[Any] = behaviour(request, context)
            try:
                async for response in responses:
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception:
                await _internal(context, method)
            finally:
                await responses.aclose()  # type: ignore[attr-defined]

        return stream
    if inspect.iscoroutinefunction(behaviour):

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception:
                await _internal(context, method)

        return call
    return behaviour  # a plain function: gRPC's own handling applies


_ABSOLUTE_PATH = re.compile(r"(?:^|(?<=[\s'\"(\[=:,]))/[^\s'\"()\[\],;:]*")


def public_message(text: str, repository: Path) -> str:
    """A message fit for a caller: paths inside the model repository become relative to it,
    any other absolute path becomes `<path>`. Logs keep the original."""
    root = str(repository)
    text = text.replace(root + "/", "").replace(root, "<model repository>")
    return _ABSOLUTE_PATH.sub("<path>", text)


# All the settings, and the flags that set them ------------------------------------------


@dataclass(frozen=True, slots=True)
class SecurityOptions:
    """TLS, model control, restricted APIs and limits, with defaults for local use."""

    tls: TlsFiles | None = None
    model_control: ModelControl = field(default_factory=ModelControl)
    restricted_apis: tuple[RestrictedApi, ...] = ()
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS  # per connection
    max_concurrent_rpcs: int | None = None  # whole server; None: no limit
    min_ping_interval_s: float = DEFAULT_MIN_PING_INTERVAL_S
    max_ping_strikes: int = DEFAULT_MAX_PING_STRIKES
    keepalive_permit_without_calls: bool = False
    max_tensor_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS
    max_tensor_bytes: int | None = None  # None: the max message size

    def __post_init__(self) -> None:
        if self.max_concurrent_streams < 1:
            raise ValueError(
                f"max concurrent streams must be >= 1, got {self.max_concurrent_streams}"
            )
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max concurrent RPCs must be >= 1, got {self.max_concurrent_rpcs}")
        if self.min_ping_interval_s < 0:
            raise ValueError(f"min ping interval must be >= 0 s, got {self.min_ping_interval_s}")
        if self.max_ping_strikes < 0:
            raise ValueError(f"max ping strikes must be >= 0, got {self.max_ping_strikes}")
        if self.max_tensor_elements < 1:
            raise ValueError(f"max tensor elements must be >= 1, got {self.max_tensor_elements}")
        if self.max_tensor_bytes is not None and self.max_tensor_bytes < 1:
            raise ValueError(f"max tensor bytes must be >= 1, got {self.max_tensor_bytes}")
        RestrictedApiInterceptor(self.restricted_apis)  # refuses a group restricted twice

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.http2.min_ping_interval_without_data_ms", round(self.min_ping_interval_s * 1e3)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
        ]

    def interceptors(self) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        if self.restricted_apis:
            interceptors.append(RestrictedApiInterceptor(self.restricted_apis))
        return interceptors

    def tensor_limits(self, max_message_bytes: int) -> TensorLimits:
        return TensorLimits(
            max_elements=self.max_tensor_elements,
            max_bytes=self.max_tensor_bytes or max_message_bytes,
        )

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        """Open the gRPC port, with TLS when configured; returns the port (0 on failure)."""
        if self.tls is None:
            port = server.add_insecure_port(address)
            log.warning(
                "gRPC on %s is plain text (no TLS): anyone on the network can read and send "
                "requests; --tls-cert and --tls-key turn on TLS",
                address,
            )
            return port
        port = server.add_secure_port(address, self.tls.credentials())
        log.info(
            "gRPC on %s uses TLS%s",
            address,
            " and requires client certificates (mutual TLS)" if self.tls.client_ca else "",
        )
        return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The security flags of `ferry serve`."""
    group = parser.add_argument_group("security")
    group.add_argument("--tls-cert", type=Path, metavar="PEM",
                       help="server certificate chain; with --tls-key, gRPC uses TLS")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    group.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                       help="CA that signs client certificates: turns on mutual TLS")
    group.add_argument(
        "--model-control-mode",
        choices=[m.value for m in ModelControlMode],
        default=ModelControlMode.NONE.value,
        help="none: load the repository at start and refuse load/unload RPCs; explicit: "
        "allow them and load only --load-model models at start; poll: as none, for the "
        "repository poller",
    )
    group.add_argument("--load-model", action="append", default=[], metavar="NAME",
                       help="explicit mode: a model to load at start ('*': all); repeatable")
    group.add_argument("--allow-load-overrides", action="store_true",
                       help="accept a 'config' override in RepositoryModelLoad")
    group.add_argument(
        "--restricted-api", action="append", default=[], metavar="GROUP[,GROUP]:HEADER=VALUE",
        help="require metadata HEADER=VALUE on calls of these API groups ("
        + ", ".join(g.value for g in ApiGroup)
        + "); VALUE '@FILE' reads the key from FILE; repeatable",
    )
    group.add_argument("--max-concurrent-streams", type=int,
                       default=DEFAULT_MAX_CONCURRENT_STREAMS, metavar="N",
                       help="concurrent RPCs per client connection")
    group.add_argument("--max-concurrent-rpcs", type=int, default=None, metavar="N",
                       help="concurrent RPCs in the whole server; more get RESOURCE_EXHAUSTED "
                       "(default: no limit%(default).0s)")
    group.add_argument("--min-ping-interval", type=float, default=DEFAULT_MIN_PING_INTERVAL_S,
                       metavar="SECONDS",
                       help="shortest interval between a client's keep-alive pings")
    group.add_argument("--max-ping-strikes", type=int, default=DEFAULT_MAX_PING_STRIKES,
                       metavar="N",
                       help="pings too many before the connection is closed (0: no limit)")
    group.add_argument("--keepalive-permit-without-calls", action="store_true",
                       help="let clients ping connections that have no call in flight")
    group.add_argument("--max-tensor-elements", type=int, default=DEFAULT_MAX_TENSOR_ELEMENTS,
                       metavar="N", help="most elements in one input tensor")
    group.add_argument("--max-tensor-bytes", type=int, default=None, metavar="BYTES",
                       help="most bytes in one input tensor "
                       "(default: --max-message-size%(default).0s)")


def options_from(args: argparse.Namespace) -> SecurityOptions:
    """Validate the security flags; raises ValueError with a message for the user."""
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        for path in (args.tls_cert, args.tls_key, args.tls_client_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
    elif args.tls_client_ca:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    mode = ModelControlMode(args.model_control_mode)
    polling = getattr(args, "poll_repository", None) is not None
    if mode is ModelControlMode.POLL and not polling:
        raise ValueError("--model-control-mode=poll needs --poll-repository SECONDS")
    if mode is ModelControlMode.EXPLICIT and polling:
        raise ValueError(
            "--poll-repository and --model-control-mode=explicit exclude each other: "
            "either the poller or load/unload calls decide what is loaded"
        )
    if polling:
        mode = ModelControlMode.POLL
    return SecurityOptions(
        tls=tls,
        model_control=ModelControl(
            mode,
            tuple(args.load_model),
            args.allow_load_overrides,
        ),
        restricted_apis=tuple(RestrictedApi.parse(text) for text in args.restricted_api),
        max_concurrent_streams=args.max_concurrent_streams,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        min_ping_interval_s=args.min_ping_interval,
        max_ping_strikes=args.max_ping_strikes,
        keepalive_permit_without_calls=args.keepalive_permit_without_calls,
        max_tensor_elements=args.max_tensor_elements,
        max_tensor_bytes=args.max_tensor_bytes,
    )

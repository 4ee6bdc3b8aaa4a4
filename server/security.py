"""Who may talk to Ferry, what they may ask, and how much: TLS credentials, per-API-group
keys checked by a server interceptor, and the connection and tensor limits.

Everything here is validated once, at start-up, into frozen settings; the flags that set
them are declared in `server.cli`.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import inspect
import ipaddress
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from .call_counts import CallCounts, SharedCallSlots
from .errors import Status
from .outcomes import RefusalHook
from .ports import bare_host, host_port
from .repository import ModelControl
from .servicer import INFERENCE_SERVICE
from .tensors import DEFAULT_MAX_TENSOR_ELEMENTS, TensorLimits

log = logging.getLogger(__name__)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any]"]]

# Defaults of the connection limits. The keep-alive values are gRPC's (and Triton's):
# a client may ping an idle connection at most every 5 minutes, and is dropped after
# two pings too many.
DEFAULT_MAX_CONCURRENT_STREAMS = 1024
DEFAULT_MIN_PING_INTERVAL_S = 300.0
DEFAULT_MAX_PING_STRIKES = 2
# Open connections per port (gRPC, and REST apart), and how long one may stay open
# without a call. A fleet of clients opens one or a few connections each: thousands is
# far above it, and bounds what idle connections hold (a descriptor and their buffers).
# An idle gRPC client reconnects on its next call, as after any GOAWAY.
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_CONNECTION_IDLE_TIMEOUT_S = 300.0
# A TLS client has this long (at most the idle timeout) to finish its handshake, on
# either port.
TLS_HANDSHAKE_TIMEOUT_S = 60.0


# TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of the server's certificate chain and key, and optionally the CA that
    signs client certificates (which turns on mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        # Checked as the REST port would load them first: gRPC refuses files it cannot use
        # only by failing to bind, which reads as a port in use.
        self.ssl_context()
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

    def ssl_context(self) -> ssl.SSLContext:
        """The same certificate, key and client CA for the REST port."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(cafile=self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise OSError(
                f"cannot use the TLS files (--tls-cert {self.cert}, --tls-key {self.key}"
                + (f", --tls-client-ca {self.client_ca}" if self.client_ca else "")
                + f"): {exc}"
            ) from exc
        return context


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
        if self.value != self.value.strip():
            # HTTP drops the spaces around a header value: no REST client could send it.
            raise ValueError(
                f"the key of restricted header {self.header!r} starts or ends with a space, "
                "which HTTP drops from header values"
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


def api_keys(restrictions: Sequence[RestrictedApi]) -> dict[ApiGroup, tuple[str, bytes]]:
    """Each restricted group's header and key; the gRPC and REST ports check the same."""
    keys: dict[ApiGroup, tuple[str, bytes]] = {}
    for restriction in restrictions:
        for group in restriction.groups:
            if group in keys:
                raise ValueError(f"API group '{group.value}' is restricted more than once")
            keys[group] = (restriction.header, restriction.value.encode())
    return keys


class RestrictedApiInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answers UNAUTHENTICATED to a call of a restricted group without its key."""

    def __init__(
        self, restrictions: Sequence[RestrictedApi], on_refusal: RefusalHook | None = None
    ) -> None:
        self._on_refusal = on_refusal
        self._keys = api_keys(restrictions)

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
            Status.UNAUTHENTICATED,
            f"the '{group.value}' API is restricted: send its key in the '{header}' header",
            handler_call_details.method,
            self._on_refusal,
        )


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any],
    status: Status,
    message: str,
    method: str,
    on_refusal: RefusalHook | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape that refuses the call without reading the request."""
    code = grpc.StatusCode[status.name]

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if on_refusal is not None:
            on_refusal(method, status, message)
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if on_refusal is not None:
            on_refusal(method, status, message)
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; this makes it an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


# Calls that a full server still answers: the probes (grpc.health.v1's Check, as
# deploy/kubernetes uses it, and the protocol's own liveness and readiness calls). They
# cost next to nothing, and a liveness probe refused because inference is busy would
# restart a pod that is only working. Triton has no such limit and answers health
# whatever inference is doing.
UNLIMITED_METHODS = frozenset({
    "/grpc.health.v1.Health/Check",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
})


class CallPlaces(Protocol):
    """What counts the calls of `--max-concurrent-rpcs`: `CallSlots` in one process,
    `call_counts.SharedCallSlots` in each frontend of `--workers N`."""

    limit: int

    @property
    def in_use(self) -> int: ...

    def take(self) -> bool: ...

    def give_back(self) -> None: ...


class CallSlots:
    """The places of `--max-concurrent-rpcs`: one count for the whole server, which the
    gRPC listeners and the REST port share. Used on the event loop only."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"max concurrent RPCs must be >= 1, got {limit}")
        self.limit = limit
        self.in_use = 0

    def take(self) -> bool:
        """Take a place; False when there is none."""
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        self.in_use -= 1


class ConcurrentRpcLimit(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """At most `limit` RPCs running in the whole server; more get RESOURCE_EXHAUSTED.
    gRPC's own `maximum_concurrent_rpcs` refuses inside gRPC, where Ferry cannot count
    the refusal. A call holds its place while its behaviour runs (a call that ends before
    that, say cancelled while its request was on the way, never takes one); a stream holds
    one for as long as it is open. `UNLIMITED_METHODS` neither take one nor are refused."""

    def __init__(self, limit: int | CallPlaces, on_refusal: RefusalHook | None = None) -> None:
        self._slots = CallSlots(limit) if isinstance(limit, int) else limit
        self._on_refusal = on_refusal

    @property
    def active(self) -> int:
        return self._slots.in_use

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in UNLIMITED_METHODS:
            return handler
        return self._limited(handler, handler_call_details.method)

    def _refuse(self, method: str) -> str:
        message = (
            f"the server is at its limit of {self._slots.limit} concurrent RPCs "
            "(--max-concurrent-rpcs); retry later"
        )
        if self._on_refusal is not None:
            self._on_refusal(method, Status.RESOURCE_EXHAUSTED, message)
        return message

    def _limited(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        behaviour = getattr(handler, kind)
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        slots = self._slots
        # A streaming behaviour either yields its responses or, as the standard health
        # service's Watch, writes them with `context.write` and returns.
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if not slots.take():
                    await context.abort(exhausted, self._refuse(method))
                try:
                    async with contextlib.aclosing(behaviour(request, context)) as responses:
                        async for response in responses:
                            yield response
                finally:
                    slots.give_back()

            return handler._replace(**{kind: streaming})  # type: ignore[attr-defined, no-any-return]

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not slots.take():
                await context.abort(exhausted, self._refuse(method))
            try:
                return await behaviour(request, context)
            finally:
                slots.give_back()

        return handler._replace(**{kind: call})  # type: ignore[attr-defined, no-any-return]


# All the settings ------------------------------------------


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
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # per port
    # A frontend of --workers N: the supervisor's table of call counts (a memfd) and this
    # frontend's place in it, so that --max-concurrent-rpcs holds for the whole server.
    shared_call_counts: tuple[int, int] | None = None
    # ... and its table of REST connections, so that --max-connections does too.
    shared_connection_counts: tuple[int, int] | None = None
    connection_idle_timeout_s: float = DEFAULT_CONNECTION_IDLE_TIMEOUT_S

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
        if self.max_connections < 1:
            raise ValueError(f"max connections must be >= 1, got {self.max_connections}")
        if not self.connection_idle_timeout_s > 0:
            raise ValueError(
                f"connection idle timeout must be > 0 s, got {self.connection_idle_timeout_s}"
            )
        RestrictedApiInterceptor(self.restricted_apis)  # refuses a group restricted twice

    def connection_table(self) -> tuple[CallCounts, int] | None:
        """A frontend of --workers N: every frontend's REST connections, and its place."""
        if self.shared_connection_counts is None:
            return None
        fd, index = self.shared_connection_counts
        return CallCounts(fd), index

    @property
    def frontend_max_connections(self) -> int:
        """The gRPC connections this process may hold: a frontend of --workers N holds
        its share of `max_connections` (gRPC counts inside each server, where no other
        process can see), N from the shared table's size."""
        frontends = 1
        if self.shared_connection_counts is not None:
            frontends = CallCounts(self.shared_connection_counts[0]).frontends
        return -(-self.max_connections // frontends)

    def connection_options(self, listeners: int = 1) -> list[tuple[str, int]]:
        """The connection limits of each of `listeners` gRPC servers sharing the port.
        gRPC counts connections per server (a connection over the count is closed as it
        arrives), and the kernel spreads them over the servers: each holds its share of
        `frontend_max_connections`. One idle for the timeout gets a GOAWAY."""
        share = -(-self.frontend_max_connections // listeners)
        # The idle timeout starts once the handshake is over, and gRPC's own bound on a
        # handshake is 120 s: a connection that never finished its TLS handshake held its
        # place that long, whatever the idle timeout said.
        handshake_s = min(self.connection_idle_timeout_s, TLS_HANDSHAKE_TIMEOUT_S)
        return [
            ("grpc.max_allowed_incoming_connections", share),
            ("grpc.max_connection_idle_ms", round(self.connection_idle_timeout_s * 1e3)),
            ("grpc.server_handshake_timeout_ms", max(1, round(handshake_s * 1e3))),
        ]

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.http2.min_ping_interval_without_data_ms", round(self.min_ping_interval_s * 1e3)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
        ]

    def call_slots(self) -> CallPlaces | None:
        """The places of `--max-concurrent-rpcs` (None: no limit), to give to both the
        gRPC interceptors and the REST port, so that it is one limit for the server."""
        if self.max_concurrent_rpcs is None:
            return None
        if self.shared_call_counts is not None:
            fd, index = self.shared_call_counts
            return SharedCallSlots(self.max_concurrent_rpcs, CallCounts(fd), index)
        return CallSlots(self.max_concurrent_rpcs)

    def interceptors(
        self, on_refusal: RefusalHook | None = None, slots: CallPlaces | None = None
    ) -> list[grpc.aio.ServerInterceptor[Any, Any]]:
        """The server interceptors; `slots`: those of `call_slots()`, shared with the REST
        port (without them, gRPC calls get places of their own)."""
        interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = []
        if slots is None:
            slots = self.call_slots()
        if slots is not None:
            interceptors.append(ConcurrentRpcLimit(slots, on_refusal))
        if self.restricted_apis:
            interceptors.append(RestrictedApiInterceptor(self.restricted_apis, on_refusal))
        return interceptors

    def tensor_limits(self, max_message_bytes: int) -> TensorLimits:
        return TensorLimits(
            max_elements=self.max_tensor_elements,
            max_bytes=self.max_tensor_bytes or max_message_bytes,
        )

    def bind(self, servers: Sequence[grpc.aio.Server], host: str, port: int) -> int:
        """Open the gRPC port on every listener, with TLS when configured; returns the
        port (0 on failure). The first listener binds `port` (0: a free one) and the
        others join it, so that a port picked by the system is the same for all."""
        bound = 0
        for server in servers:
            address = host_port(host, bound or port)
            if self.tls is None:
                added = server.add_insecure_port(address)
            else:
                added = server.add_secure_port(address, self.tls.credentials())
            if added == 0 or (bound and added != bound):
                return 0
            bound = added
        address = host_port(host, bound)
        if self.tls is None:
            warn_plain_text("gRPC", host, bound)
        else:
            log.info(
                "gRPC on %s uses TLS%s",
                address,
                " and requires client certificates (mutual TLS)" if self.tls.client_ca else "",
            )
        return bound


def warn_plain_text(port_name: str, host: str, port: int) -> None:
    """Say that a port serves without TLS, and who can reach it."""
    who = (
        "any process on this machine"
        if _is_loopback(bare_host(host))
        else "anyone who can reach this address"
    )
    log.warning(
        "%s on %s is plain text (no TLS): %s can read and send requests; "
        "--tls-cert and --tls-key turn on TLS",
        port_name, host_port(host, port), who,
    )


def _is_loopback(host: str) -> bool:
    """Whether a listening address is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

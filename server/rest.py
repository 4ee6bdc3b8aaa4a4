"""The REST face of Ferry: the Open Inference Protocol's HTTP/JSON binding, with Triton's
paths and bodies so that `tritonclient.http`, `perf_analyzer -i http` and `curl` work.

It runs on aiohttp, on the event loop that runs grpc.aio, and calls the same `DataPlane`:
a REST request lands in the same batch queue as a gRPC one, under the same limits, and is
counted in the same statistics and metrics (with protocol "http"). Handlers stay thin:
read the body, call the data plane or the model manager, write JSON.

HTTP status of each outcome, as Triton answers the same case: 400 bad input, 401 a
restricted API without its key, 403 a refused load/unload, 404 unknown model or version,
503 a full queue, a queue timeout, an answer over --max-message-size, a model that is not
ready or a server shutting down, 500 anything unexpected (its detail only in the log).
Every error body is `{"error": "<the message a gRPC client would get>"}`.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import hmac
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from aiohttp import HttpVersion11, StreamReader, hdrs, web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestPayloadError

from ferry.proto import grpc_service_pb2 as pb

from . import __version__
from .call_counts import CallCounts, SharedCallSlots
from .config import ModelSettings
from .dataplane import DataPlane, refuse_oversized_answer, statistics_of
from .errors import ErrorKind, FerryError, Status
from .loaded_model import LoadedModel
from .logs import Throttle, quiet_malformed_http
from .ports import bare_host, host_port, socket_family
from .repository import ModelControl
from .rest_codec import (
    ANSWER_LIMIT,
    BINARY_TYPE,
    HEADER_LENGTH,
    JSON_TYPE,
    RestRequest,
    answer_floor,
    dumps,
    encode_infer,
    json_object,
    message_json,
    parse_infer,
    set_parameters,
)
from .rows import Tensors
from .security import (
    DEFAULT_CONNECTION_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    TLS_HANDSHAKE_TIMEOUT_S,
    ApiGroup,
    CallPlaces,
    CallSlots,
)
from .servicer import EXTENSIONS, SERVER_NAME, bounded_message
from .tensors import DecodedRequest, TensorLimits

log = logging.getLogger(__name__)

# A body must arrive within this long, plus a second per MIN_UPLOAD_BYTES_PER_S it
# declares: an upload that stalls gives back its connection and what it buffered.
BODY_GRACE_S = 10.0
MIN_UPLOAD_BYTES_PER_S = 1024 * 1024

# An answer is held to the same limit as a request body. Over it: 503, as every
# RESOURCE_EXHAUSTED of the REST port (Triton's mapping); 413 would blame the request.

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HTTP_STATUS: dict[Status, int] = {
    Status.OK: 200,
    Status.INVALID_ARGUMENT: 400,
    Status.UNAUTHENTICATED: 401,
    Status.PERMISSION_DENIED: 403,
    Status.NOT_FOUND: 404,
    # A client that went away never reads its answer; 499 is what proxies log for it.
    Status.CANCELLED: 499,
    Status.INTERNAL: 500,
    Status.UNIMPLEMENTED: 501,
    # As Triton: a full queue and a request that timed out in it are "unavailable".
    Status.RESOURCE_EXHAUSTED: 503,
    Status.DEADLINE_EXCEEDED: 503,
    Status.UNAVAILABLE: 503,
}


def error_response(status: int, message: str) -> web.Response:
    # Cut as a gRPC client's is: it may quote megabytes the client sent.
    body = dumps({"error": bounded_message(message)})
    return web.Response(status=status, body=body, content_type=JSON_TYPE)


def json_response(value: Any) -> web.Response:
    return web.Response(body=dumps(value), content_type=JSON_TYPE)


class RestFrontDoor:
    """The routes and handlers of the REST binding, as an aiohttp application."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        is_ready: Callable[[], bool],
        tensor_limits: TensorLimits = TensorLimits(),  # noqa: B008 - frozen
        model_control: ModelControl = ModelControl(),  # noqa: B008 - frozen
        api_keys: Mapping[ApiGroup, tuple[str, bytes]] | None = None,
        max_body_bytes: int = 64 * 1024 * 1024,
        max_concurrent: int | CallPlaces | None = None,
    ) -> None:
        self._dataplane = dataplane
        self._models = dataplane.models
        self._is_ready = is_ready
        self._limits = tensor_limits
        self._model_control = model_control
        self._api_keys = dict(api_keys or {})
        self._max_body_bytes = max_body_bytes
        self._max_json_bytes = json_limit(max_body_bytes)
        # The places of --max-concurrent-rpcs: the server's, shared with gRPC, or (given a
        # number) the REST port's own.
        self._slots = (
            CallSlots(max_concurrent) if isinstance(max_concurrent, int) else max_concurrent
        )
        # Bodies still arriving: the drain waits for them (within its grace) to answer them.
        self.uploads = 0

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body_bytes)

        def add(
            method: str, path: str, group: ApiGroup, handler: Handler, limited: bool = True
        ) -> None:
            app.router.add_route(
                method,
                path,
                self._endpoint(group, handler, limited=limited),
                expect_handler=self._expect_continue(group),
            )

        health, metadata, config = ApiGroup.HEALTH, ApiGroup.METADATA, ApiGroup.MODEL_CONFIG
        inference, stats, repo = ApiGroup.INFERENCE, ApiGroup.STATISTICS, ApiGroup.MODEL_REPOSITORY
        # The probes' paths (these two and a model's /ready) are answered even at
        # --max-concurrent-rpcs, as their gRPC calls are (security.UNLIMITED_METHODS).
        add("GET", "/v2/health/live", health, self.live, limited=False)
        add("GET", "/v2/health/ready", health, self.ready, limited=False)
        add("GET", "/v2", metadata, self.server_metadata)
        # Before /v2/models/{model}, which would take "stats" for a model name.
        add("GET", "/v2/models/stats", stats, self.statistics)
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            add("GET", model, metadata, self.model_metadata)
            add("GET", model + "/ready", health, self.model_ready, limited=False)
            add("GET", model + "/config", config, self.model_config)
            add("GET", model + "/stats", stats, self.statistics)
            add("POST", model + "/infer", inference, self.infer)
        add("POST", "/v2/repository/index", repo, self.repository_index)
        add("POST", "/v2/repository/models/{model}/load", repo, self.load)
        add("POST", "/v2/repository/models/{model}/unload", repo, self.unload)
        # [\s\S], not ".": a path holding a line break (%0a) is no route too.
        app.router.add_route("*", r"/{path:[\s\S]*}", self.no_route)
        return app

    def _expect_continue(
        self, group: ApiGroup
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse | None]]:
        """The answer to `Expect: 100-continue`: a request without its group's key gets
        its 401 before it is invited to send its body (aiohttp's default invites every
        body, which a restricted route then reads and throws away), and a body declared
        over --max-message-size its 413."""
        key = self._api_keys.get(group)

        async def expect(request: web.Request) -> web.StreamResponse | None:
            if key is not None and not _has_key(request, *key):
                return _unauthorized(group, key[0])
            if self._declared_too_large(request):
                raise self._too_large(request)  # what Expect is for: refused unsent
            if not _plain(request):
                _check_coding(request)
            if request.version != HttpVersion11:
                return None
            if request.headers.get("Expect", "").lower() != "100-continue":
                raise web.HTTPExpectationFailed(
                    text=dumps({
                        "error": f"unknown Expect: {request.headers['Expect'][:100]}"
                    }).decode(),
                    content_type=JSON_TYPE,
                )
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the answer proper starts after it
            return None

        return expect

    def _endpoint(self, group: ApiGroup, handler: Handler, *, limited: bool = True) -> Handler:
        """The handler behind the API-key check and the concurrency limit (unless not
        `limited`), with every error turned into a JSON body and its HTTP status."""
        key = self._api_keys.get(group)
        slots = self._slots if limited else None

        async def handle(request: web.Request) -> web.StreamResponse:
            if key is not None and not _has_key(request, *key):
                return _unauthorized(group, key[0])
            if request.can_read_body:
                # A request counts against the limit once it has arrived, as a gRPC call
                # does: an upload still coming in must not hold a place.
                await self._body(request)
            if slots is not None and not slots.take():
                return error_response(
                    503,
                    f"too many concurrent requests: the limit is {slots.limit} "
                    "(--max-concurrent-rpcs)",
                )
            try:
                return await handler(request)
            except FerryError as error:
                return error_response(HTTP_STATUS[error.kind.status], error.message)
            except web.HTTPException:
                raise
            except Exception:
                log.exception("unexpected error in %s %s", request.method, request.path)
                return error_response(500, "internal error (details are in the server log)")
            finally:
                if slots is not None:
                    slots.give_back()

        return handle

    async def no_route(self, request: web.Request) -> web.Response:
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            match, methods = await resource.resolve(request)
            if match is None:  # the path is this resource's when methods is not empty
                allowed |= methods
        allowed.discard("*")
        if allowed:
            methods_text = ", ".join(sorted(allowed))
            response = error_response(
                405, f"{request.path} takes {methods_text}, not {request.method}"
            )
            response.headers["Allow"] = methods_text
            return response
        extension = _unimplemented_extension(request.path)
        if extension is not None:  # as gRPC answers these: UNIMPLEMENTED, by name
            return error_response(501, f"Ferry does not implement the {extension} extension")
        return error_response(
            404, f"no endpoint {request.method} {request.path}; see the /v2 paths of the "
            "Open Inference Protocol's REST binding"
        )

    # Health -------------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.Response()

    async def ready(self, request: web.Request) -> web.Response:
        if self._is_ready():
            return web.Response()
        return error_response(503, "server is not ready")

    async def model_ready(self, request: web.Request) -> web.Response:
        self._model(request)  # raises FerryError: 404 unknown, 503 not loaded
        return web.Response()

    # Metadata -----------------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(
            {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        settings = self._model(request).settings
        shapes = settings.client_shapes

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [
                {"name": s.name, "datatype": s.datatype, "shape": list(shapes[s.name])}
                for s in specs
            ]

        return json_response({
            "name": settings.name,
            "versions": self._models.versions_of(settings.name),
            "platform": "onnxruntime_onnx",
            "inputs": tensors(settings.inputs),
            "outputs": tensors(settings.outputs),
        })

    async def model_config(self, request: web.Request) -> web.Response:
        return json_response(message_json(self._model(request).settings.to_proto()))

    async def statistics(self, request: web.Request) -> web.Response:
        info = request.match_info
        await self._models.refresh_statistics()  # with --workers, kept by the executors
        models = statistics_of(self._models, info.get("model", ""), info.get("version", ""))
        return json_response({"model_stats": [_statistics_json(m) for m in models]})

    # Repository ---------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._check_json(len(body))
        options = json_object(body, "the repository index request")
        ready_only = options.get("ready") is True
        return json_response([
            {"name": e.name, "version": e.version, "state": e.state.value, "reason": e.reason}
            for e in self._models.index()
            if not ready_only or e.state.value == "READY"
        ])

    async def load(self, request: web.Request) -> web.Response:
        self._model_control.check_rpc("load")
        body = await self._body(request)
        self._check_json(len(body))
        options = json_object(body, "the load request")
        parameters = pb.RepositoryModelLoadRequest().parameters
        given = options.get("parameters") or {}
        if not isinstance(given, dict):
            raise FerryError(ErrorKind.INVALID_INPUT, "'parameters' must be a JSON object")
        set_parameters(parameters, given)
        # A value that is not a scalar (a config sent as a JSON object, not the JSON
        # string Triton takes; a list; null) is not dropped, which loaded the repository's
        # config with a 200: it is kept without a value, so that it is refused by name.
        for name in given:
            parameters.get_or_create(name)
        config = self._model_control.config_override(parameters)
        await self._models.load(request.match_info["model"], config_override=config)
        return web.Response()

    async def unload(self, request: web.Request) -> web.Response:
        self._model_control.check_rpc("unload")
        await self._models.unload(request.match_info["model"])
        return web.Response()

    # Inference ----------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        version = request.match_info.get("version", "")
        body = await self._body(request)
        header_length = request.headers.get(HEADER_LENGTH)
        json_length = len(body)
        if header_length is not None and header_length.isascii() and header_length.isdigit():
            json_length = min(json_length, int(header_length))
        self._check_json(json_length)
        limits = self._limits
        parsed: RestRequest | None = None

        def decode(settings: ModelSettings) -> DecodedRequest:
            nonlocal parsed
            parsed = parse_infer(body, header_length, name, version, settings, limits)
            return parsed.decode(settings, limits)

        max_answer = self._max_body_bytes

        def encode(model: LoadedModel, outputs: Tensors) -> tuple[bytes, int | None]:
            assert parsed is not None  # decoded before any output exists
            settings = model.settings
            # From the outputs' sizes (a floor of their JSON text) before the body is
            # rendered, then while it is rendered: JSON may take up to 6 times the floor.
            refuse_oversized_answer(
                settings.name, outputs, answer_floor(parsed), max_answer, ANSWER_LIMIT,
                settings.output_datatypes,
            )
            payload, header_bytes = encode_infer(
                parsed, settings, model.version, outputs, max_answer
            )
            if len(payload) > max_answer:
                raise FerryError(
                    ErrorKind.TOO_LARGE,
                    f"the response of model '{settings.name}' is {len(payload)} bytes, more "
                    f"than {max_answer}, {ANSWER_LIMIT}; ask for large outputs as binary "
                    "data (binary_data_output)",
                )
            return payload, header_bytes

        payload, header_bytes = await self._dataplane.infer(
            name, version, decode, encode, None, protocol="http"
        )
        if header_bytes is None:
            return web.Response(body=payload, content_type=JSON_TYPE)
        return web.Response(
            body=payload, content_type=BINARY_TYPE, headers={HEADER_LENGTH: str(header_bytes)}
        )

    # Helpers ------------------------------------------------------------------------

    def _model(self, request: web.Request) -> LoadedModel:
        info = request.match_info
        return self._models.get(info["model"], info.get("version", ""))

    def _check_json(self, json_length: int) -> None:
        """Refuse JSON over the JSON limit before it is parsed."""
        if json_length > self._max_json_bytes:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self._max_json_bytes,
                actual_size=json_length,
                text=dumps({
                    "error": f"the JSON of the request is {json_length} bytes, more than "
                    f"{self._max_json_bytes}, the limit for JSON (1/{JSON_SHARE} of "
                    "--max-message-size); send large tensors as binary data "
                    f"({HEADER_LENGTH} and binary_data_size)"
                }).decode(),
                content_type=JSON_TYPE,
            )

    async def _body(self, request: web.Request) -> bytes:
        """The request's body (read once, then kept), within the time it may take."""
        try:
            if not _plain(request):
                _check_coding(request)
                return await self._decoded_body(request)
            if request.content.is_eof():  # all there (the common case): no timer to arm
                return await request.read()
            if self._declared_too_large(request):
                raise self._too_large(request)  # refused before it is read
            return await self._upload(request, request.read())
        except RequestPayloadError as error:  # a body that does not decode or is cut off
            unreadable = web.HTTPBadRequest(
                text=dumps({"error": _unreadable_body(request, error)}).decode(),
                content_type=JSON_TYPE,
            )
            unreadable.force_close()  # where the next request would start is unknown
            raise unreadable from None
        except web.HTTPRequestEntityTooLarge:  # aiohttp's, or ours from the declared length
            raise self._too_large(request) from None

    async def _upload(self, request: web.Request, reading: Awaitable[bytes]) -> bytes:
        """`reading`, the read of a body still arriving, within BODY_GRACE_S plus a second
        per MIN_UPLOAD_BYTES_PER_S that the request declares."""
        size = request.content_length or self._max_body_bytes
        allowed_s = BODY_GRACE_S + size / MIN_UPLOAD_BYTES_PER_S
        self.uploads += 1
        try:
            async with asyncio.timeout(allowed_s):
                return await reading
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=dumps({
                    "error": f"the request body did not arrive within {allowed_s:.0f} s "
                    f"({BODY_GRACE_S:g} s, plus a second per "
                    f"{MIN_UPLOAD_BYTES_PER_S // 1024} KiB it declares)"
                }).decode(),
                content_type=JSON_TYPE,
            ) from None
        finally:
            self.uploads -= 1

    async def _decoded_body(self, request: web.Request) -> bytes:
        """A body sent with a Content-Encoding, decoded; kept on the request, since the
        handler asks for it again and the stream gives it only once."""
        kept = request.get(_DECODED_BODY)
        if kept is None:
            reading = _read_decoded(request.content, self._max_body_bytes)
            kept = request[_DECODED_BODY] = await self._upload(request, reading)
        return kept

    def _declared_too_large(self, request: web.Request) -> bool:
        """A plain body whose Content-Length is over --max-message-size (a compressed
        one is counted once decoded)."""
        declared = request.content_length
        return declared is not None and declared > self._max_body_bytes and _plain(request)

    def _too_large(self, request: web.Request) -> web.HTTPRequestEntityTooLarge:
        refusal = web.HTTPRequestEntityTooLarge(
            max_size=self._max_body_bytes,
            actual_size=request.content_length or 0,
            text=dumps({
                "error": f"the request body is larger than {self._max_body_bytes} bytes, "
                "the limit (--max-message-size)"
            }).decode(),
            content_type=JSON_TYPE,
        )
        # The rest of the body is never read: kept alive, the connection would take the
        # client's next request for it.
        refusal.force_close()
        return refusal


# Decoding JSON costs 16-20 times its size for flat numbers (a Python object per number,
# then arrays) and up to about 45 times for data nested as small as JSON allows, so JSON
# may use only this share of --max-message-size; binary data, about its own size to
# decode, may use all of it.
JSON_SHARE = 16
MIN_JSON_BYTES = 64 * 1024


def json_limit(max_body_bytes: int) -> int:
    return min(max_body_bytes, max(MIN_JSON_BYTES, max_body_bytes // JSON_SHARE))


def _statistics_json(model: LoadedModel) -> dict[str, Any]:
    stats = model.stats.to_proto()
    # Written even when empty, as Triton writes them: perf_analyzer reads every one.
    stats.inference_stats.cache_hit.SetInParent()
    stats.inference_stats.cache_miss.SetInParent()
    return message_json(stats)


# Where `_decoded_body` keeps a decoded body on its request (aiohttp 3.14's typed keys).
_DECODED_BODY = web.RequestKey("decoded_body", bytes)


async def _read_decoded(stream: StreamReader, max_bytes: int) -> bytes:
    """A body with a Content-Encoding, decoded as aiohttp hands it out (64 KiB at a time)
    and refused as soon as it passes `max_bytes`. Not aiohttp's `read()`: that raises the
    stream's buffer to the whole limit first, so that it inflates up to `max_bytes` per
    step and buffers twice that before the size is checked (a gzip body of 260 KB held
    264 MiB against the default limit, and 8 of them at once 2 GiB)."""
    body = bytearray()
    async for piece in stream.iter_any():
        body += piece
        if len(body) > max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=len(body))
    return bytes(body)


def _plain(request: web.Request) -> bool:
    """Is the body sent as it is (its Content-Length is its size once decoded)?"""
    return request.headers.get(hdrs.CONTENT_ENCODING, "").lower() in ("", "identity")


# The codings aiohttp decodes (br and zstd only with their libraries: without, it refuses
# them itself). It hands a body of any other coding on as it came, so that "x-gzip" or
# "gzip, gzip" was read as JSON ("not valid UTF-8") and "compress" as if it were plain.
_DECODED_CODINGS = frozenset({"gzip", "deflate", "br", "zstd"})


def _check_coding(request: web.Request) -> None:
    """Refuse (415, as RFC 9110 says) a body whose Content-Encoding the server does not
    decode, before it is read."""
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "")
    if coding.isascii() and coding.lower() in _DECODED_CODINGS:  # as aiohttp reads it
        return
    refusal = web.HTTPUnsupportedMediaType(
        text=dumps({
            "error": f"the request body's Content-Encoding {coding[:40]!r} is not one the "
            "server decodes: send it as it is (identity), or with gzip or deflate"
        }).decode(),
        content_type=JSON_TYPE,
    )
    refusal.force_close()  # its body is never read
    raise refusal


def _unreadable_body(request: web.Request, error: RequestPayloadError) -> str:
    """What is wrong with a body aiohttp could not read, without quoting it."""
    if isinstance(error.__cause__, ContentEncodingError):
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")[:40]
        return f"the request body does not decode as its Content-Encoding {encoding!r}"
    return ("the request body is cut short or malformed (its Content-Length or chunked "
            "Transfer-Encoding)")


def _unauthorized(group: ApiGroup, header: str) -> web.Response:
    return error_response(
        401, f"the '{group.value}' API is restricted: send its key in the '{header}' header"
    )


# Triton's extensions Ferry does not implement, by the start of their REST paths; a
# model's trace setting ends in /trace/setting.
_UNIMPLEMENTED_PATHS = (
    ("/v2/systemsharedmemory", "system shared memory"),
    ("/v2/cudasharedmemory", "CUDA shared memory"),
    ("/v2/trace/setting", "trace"),
    ("/v2/logging", "logging"),
)


def _unimplemented_extension(path: str) -> str | None:
    for start, extension in _UNIMPLEMENTED_PATHS:
        if path == start or path.startswith(start + "/"):
            return extension
    if path.startswith("/v2/models/") and path.endswith("/trace/setting"):
        return "trace"
    return None


def _has_key(request: web.Request, header: str, expected: bytes) -> bool:
    supplied = request.headers.getall(header, [])
    if len(supplied) != 1:
        return False
    return hmac.compare_digest(supplied[0].encode("utf-8", "surrogateescape"), expected)


class RestServer:
    """The REST port: an aiohttp runner on the current event loop, with a
    `start` / `close` lifecycle like the gRPC server's. At most `max_connections` are open
    at once (more are closed as they arrive, with a 503 written first), and a connection
    that carries no request for `idle_timeout_s` is closed."""

    def __init__(
        self,
        front_door: RestFrontDoor,
        close_timeout_s: float = 1.0,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout_s: float = DEFAULT_CONNECTION_IDLE_TIMEOUT_S,
        shared_connections: tuple[CallCounts, int] | None = None,
    ) -> None:
        self._app = front_door.application()
        self._front_door = front_door
        # By the time the port closes the models have answered every accepted request;
        # this only bounds the writing of the last responses.
        self._close_timeout_s = close_timeout_s
        self._runner: web.AppRunner | None = None
        self._listening: asyncio.AbstractServer | None = None
        self._connections = ConnectionCount(max_connections, shared_connections)
        self._idle_timeout_s = idle_timeout_s
        self.port = 0

    @property
    def open_connections(self) -> int:
        return self._connections.open

    @property
    def uploads_in_progress(self) -> int:
        """Requests whose bodies are still arriving."""
        return self._front_door.uploads

    async def start(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        reuse_port: bool = False,
    ) -> int:
        """Listen on host:port (0: a free port); returns the bound port. `reuse_port`: share
        it with the other frontends of `--workers`; a lone server binds it alone."""
        listener = _listening_socket(host, port, reuse_port)
        quiet_malformed_http()
        self._runner = web.AppRunner(
            self._app,
            handle_signals=False,
            shutdown_timeout=self._close_timeout_s,
            access_log=None,  # the access log is Ferry's own, per request outcome
            # A client that leaves cancels its handler, so its request leaves the queue.
            handler_cancellation=True,
            # aiohttp closes a connection that has carried no request for this long,
            # from its start (one that never sends) and after each answer (keep-alive).
            keepalive_timeout=self._idle_timeout_s,
        )
        await self._runner.setup()
        handlers = self._runner.server
        assert handlers is not None
        connections = self._connections

        loop = asyncio.get_running_loop()
        refused = _RefusedConnection.answer(connections.limit)
        # A TLS handshake may take no longer than a connection may stay idle, nor may
        # what is sent stay unread.
        handshake_s = min(self._idle_timeout_s, TLS_HANDSHAKE_TIMEOUT_S)
        unread_s = self._idle_timeout_s

        failures = Throttle(60.0, time.monotonic)  # a log line per kind and minute

        def accept() -> asyncio.BaseProtocol:
            """The protocol of a new connection. Nothing may escape from here: on uvloop a
            protocol factory that raises stops the port from accepting for good."""
            try:
                return counted()
            except Exception as exc:
                reported = failures.report(type(exc).__name__)
                if reported is not None:
                    log.error("a REST connection could not be set up, so it is closed%s",
                              reported[1], exc_info=True)
                return _ClosedAtOnce()

        def counted() -> asyncio.BaseProtocol:
            if not connections.take():
                if ssl_context is None:
                    return _RefusedConnection(refused, connections)
                # Counted before its handshake, which a client may never finish: past
                # the bound, a flood of silent connections is closed at once.
                if not connections.linger():
                    return _ClosedAtOnce()
                return _RefusedTlsConnection(
                    _tls(loop, _RefusedConnection(refused, connections, counted=True),
                         ssl_context, min(handshake_s, REFUSED_LINGER_S)),
                    connections,
                )
            try:
                if ssl_context is None:
                    return _CountedConnection(handlers(), connections, unread_s)
                # Counted outside TLS: a connection that leaves before its handshake ends
                # never reaches the protocol inside, but still gives its place back.
                return _CountedTlsConnection(
                    _tls(loop, handlers(), ssl_context, handshake_s), connections, unread_s
                )
            except BaseException:  # no protocol holds the place, to give it back on close
                connections.give_back()
                raise

        # Not an aiohttp site: the protocol of each connection is wrapped to count it, and
        # TLS is wrapped inside the count (not given to create_server).
        self._listening = await loop.create_server(accept, sock=listener, backlog=128)
        self.port = int(listener.getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening, let handlers in flight finish, then close every connection."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        if self._listening is not None:
            self._listening.close()
        await runner.cleanup()


class ConnectionCount:
    """The open connections of one port, against its limit. Event-loop code only.
    `shared`: a frontend of `--workers N`, the supervisor's table of every frontend's
    REST connections and this frontend's place in it; the limit is then the server's."""

    def __init__(self, limit: int, shared: tuple[CallCounts, int] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"max connections must be >= 1, got {limit}")
        self.limit = limit
        self.open = 0  # this port's own
        self.lingering = 0  # refused connections still read until they close
        self._warned = False
        # The places of the limit: this port's, or every frontend's.
        self._places: CallPlaces = (
            CallSlots(limit) if shared is None else SharedCallSlots(limit, *shared)
        )

    def linger(self) -> bool:
        """May one more refused connection be read until it closes?"""
        if self.lingering >= MAX_LINGERING_REFUSALS:
            return False
        self.lingering += 1
        return True

    def stop_lingering(self) -> None:
        self.lingering -= 1

    def take(self) -> bool:
        if not self._places.take():
            if not self._warned:  # once per time the port fills up, not per connection
                self._warned = True
                log.warning(
                    "the REST port holds %d connections, its limit (--max-connections): "
                    "new connections are refused until some close", self.limit,
                )
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1
        self._places.give_back()
        if self._places.in_use < self.limit * 3 // 4:  # what holds the limit, server-wide
            self._warned = False


class _Counted:
    """A connection's protocol (`inner`), counted in `count` until the connection is lost,
    or until `connection_made` fails (the loop then closes the transport, maybe without
    calling `connection_lost`). With `unread_timeout_s`, closed by the kernel once what
    it sends stays unread that long (see `_close_when_unread`)."""

    __slots__ = ("_count", "_inner", "_unread_s")

    def __init__(
        self, inner: Any, count: ConnectionCount, unread_timeout_s: float | None = None
    ) -> None:
        self._inner = inner
        self._count: ConnectionCount | None = count
        self._unread_s = unread_timeout_s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            if self._unread_s is not None:
                _close_when_unread(transport, self._unread_s)
            self._inner.connection_made(transport)
        except BaseException:
            self._give_back()
            raise

    def eof_received(self) -> bool | None:
        return cast("bool | None", self._inner.eof_received())

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._give_back()
        self._inner.connection_lost(exc)

    def _give_back(self) -> None:
        count, self._count = self._count, None
        if count is not None:
            count.give_back()


def _close_when_unread(transport: asyncio.BaseTransport, timeout_s: float) -> None:
    """Have the kernel close the connection once what it sends stays unacknowledged for
    `timeout_s` (TCP_USER_TIMEOUT; Linux). A client that reads nothing of a large answer
    advertises a zero window, and aiohttp has no write timeout nor counts a connection
    with a request in progress as idle: such a client held its connection, the answer and
    the request for good. One that reads, however slowly, acknowledges and stays."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    sock = transport.get_extra_info("socket")
    if option is None or sock is None:
        return
    try:
        milliseconds = min(max(1, round(timeout_s * 1000)), 2**31 - 1)
        sock.setsockopt(socket.IPPROTO_TCP, option, milliseconds)
    except OSError:  # not TCP, or a kernel without it: the answer waits, as before
        pass


class _CountedConnection(_Counted, asyncio.Protocol):
    """aiohttp's protocol for one plain connection, counted."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)


class _CountedTlsConnection(_Counted, asyncio.BufferedProtocol):
    """The TLS protocol (the loop's, around aiohttp's) of one connection, counted from
    the TCP connection's start to its end, whether or not its handshake ever ended."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> Any:
        return self._inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._inner.buffer_updated(nbytes)


def _tls(
    loop: asyncio.AbstractEventLoop,
    app: asyncio.Protocol,
    context: ssl.SSLContext,
    handshake_timeout_s: float,
) -> Any:
    """The server side of TLS around `app`, as the loop's create_server(ssl=...) builds
    it (uvloop's own TLS protocol on uvloop, asyncio's otherwise)."""
    tls_protocol: Any = asyncio.sslproto.SSLProtocol
    if type(loop).__module__.startswith("uvloop"):
        import uvloop.loop  # the event loop in use: imported already

        tls_protocol = getattr(uvloop.loop, "SSLProtocol")  # noqa: B009 - not in its stubs
    return tls_protocol(
        loop, app, context, None, server_side=True,
        ssl_handshake_timeout=handshake_timeout_s,
    )


# A refused connection is read (and what it sends thrown away) for this long at most, or
# this many bytes, before it is closed: closed with its request unread, the kernel would
# send a reset that destroys the 503 before the client reads it. At most
# MAX_LINGERING_REFUSALS linger at once; more are closed at once, as a flood's are.
REFUSED_LINGER_S = 2.0
REFUSED_DISCARD_BYTES = 1024 * 1024
MAX_LINGERING_REFUSALS = 256


class _RefusedConnection(asyncio.Protocol):
    """A connection over the limit: told so in a 503, then read until the client closes
    (what it sends is thrown away) for a short while, so that the 503 reaches it."""

    def __init__(self, answer: bytes, count: ConnectionCount, counted: bool = False) -> None:
        self._answer = answer
        self._count = count
        # Counted among the lingering refusals by its TLS wrapper (_RefusedTlsConnection).
        self._counted = counted
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._discarded = 0

    @staticmethod
    def answer(limit: int) -> bytes:
        """The 503 of every refused connection, built once per port."""
        body = dumps({
            "error": f"the server holds {limit} connections on this port, its limit "
            "(--max-connections); retry later"
        })
        return (
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.Transport, transport)  # uvloop's are not asyncio's classes
        writer.write(self._answer)
        if not self._counted and not self._count.linger():
            writer.close()
            return
        self._transport = writer
        if writer.can_write_eof():
            writer.write_eof()  # the answer is whole: a client may stop sending now
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, writer.close)

    def data_received(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > REFUSED_DISCARD_BYTES and self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._transport = None
            if not self._counted:
                self._count.stop_lingering()
        if self._timer is not None:
            self._timer.cancel()


class _RefusedTlsConnection(_CountedTlsConnection):
    """A refused TLS connection, counted among the lingering refusals from the TCP
    connection's start, handshake included (one that never finishes it never reaches the
    503 inside), to its end."""

    __slots__ = ()

    def _give_back(self) -> None:
        count, self._count = self._count, None
        if count is not None:
            count.stop_lingering()


class _ClosedAtOnce(asyncio.Protocol):
    """A refused TLS connection past MAX_LINGERING_REFUSALS: closed without a word (its
    503 could only follow a handshake); or one that could not be set up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound socket: exclusive, as gRPC's is (a second server on a taken port fails at
    start instead of sharing it silently), or with SO_REUSEPORT for `--workers`."""
    listener = socket.socket(socket_family(host), socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((bare_host(host), port))
    except OSError as exc:
        listener.close()
        raise OSError(
            f"cannot listen on {host_port(host, port)} for REST (--host, --http-port): {exc}"
        ) from exc
    return listener

"""The one place where Ferry's outcomes become gRPC status codes, and where an unexpected
exception in a handler becomes INTERNAL without leaking its detail to the caller."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from .errors import FerryError, Status
from .outcomes import RefusalHook
from .wire import MalformedMessage

log = logging.getLogger(__name__)

# Status names are gRPC's own, so the table is a lookup by name.
STATUS_CODES: dict[Status, grpc.StatusCode] = {
    status: grpc.StatusCode[status.name] for status in Status
}


def status_code(error: FerryError) -> grpc.StatusCode:
    return STATUS_CODES[error.kind.status]


def _no_hook(method: str, status: Status, message: str) -> None:
    pass


def shield_servicer(
    servicer: object,
    method_names: Iterable[str],
    service: str,
    on_refusal: RefusalHook = _no_hook,
) -> None:
    """Wrap each RPC method of a servicer, once, so that an exception escaping it becomes
    INTERNAL with a short message; the detail (and its traceback) goes only to the log.
    A unary request that was not valid protobuf (see `server.wire`) is refused with
    INVALID_ARGUMENT and reported to `on_refusal`.

    Done at start-up rather than in a server interceptor, which would cost an extra
    coroutine and handler lookup on every call.
    """
    for name in method_names:
        behaviour = getattr(servicer, name)
        setattr(servicer, name, shielded(behaviour, f"/{service}/{name}", on_refusal))


async def _internal(context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error (details are in the server log)")


async def _malformed(
    context: grpc.aio.ServicerContext[Any, Any],
    method: str,
    request: MalformedMessage,
    on_refusal: RefusalHook,
) -> None:
    on_refusal(method, Status.INVALID_ARGUMENT, request.message)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def shielded(
    behaviour: Callable[..., Any], method: str, on_refusal: RefusalHook = _no_hook
) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if type(request) is MalformedMessage:  # unary request, streamed response
                await _malformed(context, method, request, on_refusal)
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
            if type(request) is MalformedMessage:
                await _malformed(context, method, request, on_refusal)
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception:
                if context.done():
                    # The call ended first (the caller's deadline passed, or it left), so
                    # answering failed: no one is waiting, and nothing failed here.
                    log.debug("%s ended before its answer", method, exc_info=True)
                    raise asyncio.CancelledError from None
                await _internal(context, method)

        return call
    return behaviour  # a plain function: gRPC's own handling applies

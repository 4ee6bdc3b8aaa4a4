"""The transport-neutral inference path that every protocol front door calls.

A front door decodes its own wire format into a `DecodedRequest` and encodes the outputs
back; in between, the data plane looks the model up, turns the request's timeout and
priority into the queue's terms, submits it to the model's scheduler, and reports one
`RequestOutcome` however the request ends. So a request from any front door lands in the
same batch queue, under the same limits, and is counted the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Protocol, TypeVar

from .classification import ClassifiedOutputs, classified_settings, classify
from .config import ModelSettings
from .errors import ErrorKind, FerryError, Status, invalid_input
from .loaded_model import LoadedModel
from .outcomes import OutcomeObserver, RequestOutcome
from .repository import IndexEntry, shown
from .rows import Array, Tensors
from .tensors import DecodedRequest

log = logging.getLogger(__name__)

R = TypeVar("R")

# The caller's deadline is taken as `now + time_remaining` a moment after gRPC reads it,
# so a handler that gRPC cancels at the deadline may see the clock a little short of it.
_DEADLINE_SLACK_S = 0.001

# The fewest bytes one output can take in an answer, from its array alone (its raw bytes,
# the lengths of its BYTES elements, a floor of its JSON text): each front door has its own.
OutputFloor = Callable[[str, Array], int]


class ModelLookup(Protocol):
    """What the front doors need of the models being served, and of their lifecycle."""

    def get(self, name: str, version: str = "") -> LoadedModel: ...

    def loaded(self) -> list[LoadedModel]: ...

    def versions_of(self, name: str) -> list[str]: ...

    def index(self) -> list[IndexEntry]: ...

    async def load(self, name: str, config_override: str | None = None) -> None: ...

    async def unload(self, name: str) -> None: ...

    async def refresh_statistics(self) -> None:
        """Bring `stats` up to date where they are kept elsewhere (another process)."""


class DataPlane:
    def __init__(
        self,
        models: ModelLookup,
        observers: Sequence[OutcomeObserver] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = models
        # Told of requests that named no model being served; a model's own list is used
        # for the others.
        self._observers = tuple(observers)
        self._clock = clock
        self._last_request_at: float | None = None

    def quiet_for(self) -> float:
        """Seconds since the latest inference request arrived (infinite before the first)."""
        if self._last_request_at is None:
            return float("inf")
        return self._clock() - self._last_request_at

    def refused(self, status: Status, message: str, protocol: str = "grpc") -> None:
        """Count a request refused before it named a model (model label `_unknown`)."""
        outcome = RequestOutcome("", "", status, 0, message, protocol)
        for observer in self._observers:
            observer.request_finished(outcome)

    async def infer(
        self,
        model_name: str,
        version: str,
        decode: Callable[[ModelSettings], DecodedRequest],
        encode: Callable[[LoadedModel, Tensors], R],
        time_remaining: float | None,
        protocol: str = "grpc",
    ) -> R:
        """Run one request through its model's batch queue; raises FerryError."""
        start_ns = time.perf_counter_ns()
        now = self._clock()
        self._last_request_at = now
        model: LoadedModel | None = None
        status = Status.INTERNAL
        message = ""
        try:
            model = self.models.get(model_name, version)
            settings = model.settings
            decoded = decode(settings)
            # The common case inline (no timeout configured or asked, no priority levels);
            # the helpers decide the rest.
            if settings.default_timeout_s is None and not decoded.timeout_us:
                deadline_s = None if time_remaining is None else now + time_remaining
            else:
                deadline_s = _deadline(decoded, settings, now, time_remaining)
            outputs = await model.scheduler.submit(
                decoded.inputs,
                decoded.outputs,
                rows=decoded.rows,
                shape_key=decoded.shape_key,
                deadline_s=deadline_s,
                priority=1 if settings.priority_levels <= 1 else _priority(decoded, settings),
                length=decoded.length,
            )
            answered = model
            if type(decoded.outputs) is ClassifiedOutputs:  # not the common request
                outputs, answered = _as_classes(model, decoded.outputs, outputs)
            result = encode(answered, outputs)
            status = Status.OK
            return result
        except FerryError as error:
            status = error.kind.status
            message = error.message
            raise
        except asyncio.CancelledError:
            # grpc.aio cancels the handler both when its caller leaves and when the
            # caller's deadline passes: in the second case the caller saw DEADLINE_EXCEEDED.
            status = Status.CANCELLED
            if time_remaining is not None and (
                self._clock() >= now + time_remaining - _DEADLINE_SLACK_S
            ):
                status = Status.DEADLINE_EXCEEDED
            raise
        except Exception as exc:  # never leak a traceback to the caller
            log.exception("unexpected error serving model '%s'", shown(model_name))
            message = f"internal error: {type(exc).__name__}"
            raise FerryError(ErrorKind.INTERNAL, message) from exc
        finally:
            outcome = RequestOutcome(
                model.name if model is not None else "",
                model.version if model is not None else "",
                status,
                time.perf_counter_ns() - start_ns,
                message,
                protocol,
            )
            for observer in model.observers if model is not None else self._observers:
                observer.request_finished(outcome)


def _as_classes(
    model: LoadedModel, requested: ClassifiedOutputs, outputs: Tensors
) -> tuple[Tensors, LoadedModel]:
    """The outputs with those asked for as classes replaced by their top-k strings, and
    the version as its answer is encoded (those outputs BYTES)."""
    settings = model.settings
    classified = classify(outputs, requested.classes, settings)
    variant = classified_settings(settings, frozenset(requested.classes))
    return classified, dataclasses.replace(model, settings=variant)


def refuse_oversized_answer(
    model_name: str,
    outputs: Mapping[str, Array],
    floor: OutputFloor,
    max_bytes: int,
    limit: str,
    datatypes: Mapping[str, str] | None = None,
    framing_bytes: int = 0,
) -> None:
    """Refuse an answer that cannot fit in `max_bytes` before it is built: encoding it
    first would allocate it (and a JSON rendering several times the tensors) only to
    throw it away. `floor` never counts more than the encoding takes, so an answer that
    fits is never refused here; the front door still checks what it built. `limit` says
    which limit, for the message; `framing_bytes`: what the message that carries the
    answer adds to it. Raises FerryError (TOO_LARGE)."""
    total = framing_bytes
    for name, array in outputs.items():
        total += floor(name, array)
    if total <= max_bytes:
        return
    name, size = max(((n, floor(n, a)) for n, a in outputs.items()), key=lambda item: item[1])
    array = outputs[name]
    datatype = datatypes.get(name, str(array.dtype)) if datatypes else str(array.dtype)
    raise FerryError(
        ErrorKind.TOO_LARGE,
        f"the response of model '{model_name}' is at least {total} bytes, more than "
        f"{max_bytes}, {limit}; output '{name}' ({datatype} {list(array.shape)}) alone is "
        f"{size} bytes",
    )


def text_bytes(array: Array) -> int:
    """The bytes of a BYTES tensor's elements, at least (a str counts its characters,
    never more than its UTF-8 bytes), without a list of them."""
    elements: Iterable[Sized] = array.flat  # type: ignore[assignment]
    return sum(map(len, elements))


def statistics_of(models: ModelLookup, name: str, version: str) -> list[LoadedModel]:
    """The versions a statistics request asks for: every loaded version of every model
    (no name), every loaded version of one model (a name alone: as Triton, not only the
    newest), or one version. Raises FerryError (NOT_FOUND) as `ModelLookup.get` does."""
    if not name:
        return models.loaded()
    chosen = models.get(name, version)  # refuses an unknown model or version
    if version:
        return [chosen]
    return [model for model in models.loaded() if model.name == name]


def _deadline(
    decoded: DecodedRequest, settings: ModelSettings, now: float, time_remaining: float | None
) -> float | None:
    """The earliest of the caller's deadline and the model's queue timeout, on the clock."""
    timeout_s = settings.default_timeout_s
    requested = decoded.timeout_us
    if requested and (settings.allow_timeout_override or timeout_s is None):
        timeout_s = requested / 1e6
    if timeout_s is None:  # the common case, without building a list
        return None if time_remaining is None else now + time_remaining
    if time_remaining is None:
        return now + timeout_s
    return now + min(timeout_s, time_remaining)


def _priority(decoded: DecodedRequest, settings: ModelSettings) -> int:
    if settings.priority_levels <= 1:
        return 1  # as in Triton, a model without priority levels ignores the parameter
    requested = decoded.priority
    if not requested:
        return settings.default_priority_level
    if requested > settings.priority_levels:
        raise invalid_input(
            f"priority {requested} is outside 1..{settings.priority_levels} "
            f"(priority_levels of model '{settings.name}')"
        )
    return requested

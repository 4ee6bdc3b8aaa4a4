"""A model version being served: its settings, its batch scheduler, its statistics, and
everyone told of its finished requests."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .config import ModelSettings
from .errors import cut, invalid_input, not_found
from .outcomes import OutcomeObserver
from .rows import Tensors
from .stats import ModelStatistics


class RequestScheduler(Protocol):
    """What serves a version's requests: the local `ModelScheduler`, or in a frontend
    process the executor process behind `server.remote.RemoteScheduler`."""

    @property
    def queue_depth(self) -> int: ...

    def submit(
        self,
        inputs: Tensors,
        outputs: tuple[str, ...],
        *,
        rows: int,
        shape_key: object,
        deadline_s: float | None = None,
        priority: int = 1,
        length: int = 0,
    ) -> asyncio.Future[Tensors]: ...

    async def close(self, grace_s: float | None = None) -> None: ...

    def abort(self, reason: str) -> None: ...

    def stop_gathering(self) -> None: ...

    def join_threads(self, timeout_s: float | None = None) -> bool: ...


@dataclass(slots=True, eq=False)  # one object per loaded version: compared by identity
class LoadedModel:
    name: str
    version: str
    settings: ModelSettings
    scheduler: RequestScheduler
    stats: ModelStatistics
    # Told of every finished request to this version: its statistics first, then the
    # server's observers (metrics, logs).
    observers: tuple[OutcomeObserver, ...] = ()

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth


# A version as requests name it: a whole number in ASCII digits that fits int64 ("02" is
# version 2), as in Triton.
_VERSION = re.compile(r"[0-9]{1,19}")
# A version quoted in a message is cut to this many characters: it came from a caller.
_SHOWN_VERSION_CHARS = 40


def pick_version(name: str, versions: Mapping[str, LoadedModel], version: str) -> LoadedModel:
    """The version a request names, or the newest when it names none."""
    if not version:
        return versions[max(versions, key=int)]
    model = versions.get(version)
    if model is not None:  # named as the server names it: the common case
        return model
    shown = cut(version, _SHOWN_VERSION_CHARS)
    if not _VERSION.fullmatch(version):
        raise invalid_input(
            f"model '{name}': version '{shown}' is not a whole number (versions are "
            "named by their folders: 1, 2, ...)"
        )
    model = versions.get(str(int(version)))
    if model is None:
        raise not_found(
            f"model '{name}' has no version '{shown}'; available: "
            f"{', '.join(sorted(versions, key=int))}"
        )
    return model

"""A model version being served: its settings, its batch scheduler, its statistics, and
everyone told of its finished requests."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelSettings
from .outcomes import OutcomeObserver
from .scheduler import ModelScheduler
from .stats import ModelStatistics


@dataclass(slots=True, eq=False)  # one object per loaded version: compared by identity
class LoadedModel:
    name: str
    version: str
    settings: ModelSettings
    scheduler: ModelScheduler
    stats: ModelStatistics
    # Told of every finished request to this version: its statistics first, then the
    # server's observers (metrics, logs).
    observers: tuple[OutcomeObserver, ...] = ()

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

"""Which executor process of `ferry serve --workers N` loads which model: one executor per
device that the repository's instance groups use (the CPU, each GPU).

The supervisor reads the plan to know which executors to start; each executor reads it to
know which models to load, and loads only its own device's instances of them. Read from
config.pbtxt alone, so it costs no model load and imports no onnxruntime. A model whose
config cannot be read goes to the first executor, whose load then reports why.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import instance_groups_of
from .devices import CPU_DEVICE, device_keys, device_order
from .errors import FerryError
from .repository import ModelRepository


def model_devices(repository: ModelRepository, names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each model's devices; () for a model whose config cannot be read."""
    plan: dict[str, tuple[str, ...]] = {}
    for name in names:
        try:
            source = repository.locate(name)
            groups = instance_groups_of(source.config.message if source.config else None)
        except (ValueError, FerryError, OSError):  # ConfigError, a config that is not UTF-8
            plan[name] = ()
            continue
        plan[name] = device_keys(groups)
    return plan


def executor_devices(plan: dict[str, tuple[str, ...]]) -> list[str]:
    """One executor per device in use, the CPU first (it serves /metrics)."""
    devices = {device for keys in plan.values() for device in keys}
    return sorted(devices or {CPU_DEVICE}, key=device_order)


def models_on(plan: dict[str, tuple[str, ...]], device: str) -> list[str]:
    """The models the executor of `device` loads; the first executor also takes the
    models whose config cannot be read, so that their failure is reported."""
    first = executor_devices(plan)[0]
    return [
        name for name, keys in plan.items() if device in keys or (not keys and device == first)
    ]

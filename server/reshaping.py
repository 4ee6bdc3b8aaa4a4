"""Triton's `reshape`: clients send and receive a tensor in its config `dims`, the model
runs it in `reshape.shape`. Requests are checked, batched and answered in `dims`; an
instance wrapped here turns each batch's inputs into the model's shapes just before it
runs, and its outputs back (views, not copies). The config checked at load that every
shape `dims` admits holds the same elements in `reshape` (server/config.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .config import ModelSettings, TensorSpec
from .rows import Array, Tensors


def has_reshape(settings: ModelSettings) -> bool:
    return any(spec.reshape is not None for spec in (*settings.inputs, *settings.outputs))


class ReshapingInstance:
    """A model instance whose inputs and outputs the config reshapes. Everything else
    (device, statistics, binding plan, ...) is the instance's own."""

    def __init__(self, instance: Any, settings: ModelSettings) -> None:
        self.instance = instance
        self.device: str = instance.device
        self.device_id: int = instance.device_id
        self.may_run_on_loop: bool = instance.may_run_on_loop
        self._batching = settings.batchable
        self._inputs = {s.name: s.reshape for s in settings.inputs if s.reshape is not None}
        self._outputs = {s.name: s.dims for s in settings.outputs if s.reshape is not None}
        self._reshapes = {s.name: s.reshape for s in settings.outputs if s.reshape is not None}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.instance, name)

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> Tensors:
        outputs = self.instance.run(self._reshaped(inputs, self._inputs), output_names)
        return self._answered(outputs)

    def run_batch(
        self, parts: Sequence[Mapping[str, Array]], rows: int, output_names: Sequence[str]
    ) -> tuple[Tensors, int]:
        outputs, padded = self.instance.run_batch(
            [self._reshaped(part, self._inputs) for part in parts], rows, output_names
        )
        return self._answered(outputs), padded

    def _answered(self, outputs: Mapping[str, Array]) -> dict[str, Array]:
        """The outputs in their config dims. Inputs always fit (the config check at load
        and the requests' checks see to it), but a graph whose dims are symbolic may answer
        a shape its reshape does not hold: say which output, rather than numpy's words."""
        try:
            return self._reshaped(outputs, self._outputs)
        except ValueError:
            for name, dims in self._outputs.items():
                array = outputs.get(name)
                if array is None:
                    continue
                try:
                    self._reshaped({name: array}, {name: dims})
                except ValueError:
                    raise ValueError(
                        f"output '{name}': the model answered {list(array.shape)}, which does "
                        f"not hold the elements of its config dims {list(dims)} "
                        f"(reshape {list(self._reshapes[name])})"
                    ) from None
            raise

    def _reshaped(
        self, arrays: Mapping[str, Array], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, Array]:
        batching = self._batching
        return {
            name: array if name not in shapes else array.reshape(
                (array.shape[0], *shapes[name]) if batching else shapes[name]
            )
            for name, array in arrays.items()
        }


def model_dims(specs: Sequence[TensorSpec]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, datatype, dims) of each tensor as the model itself has it."""
    return [(spec.name, spec.datatype, spec.model_dims) for spec in specs]

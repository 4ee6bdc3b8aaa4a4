"""Rows along the batch axis: requests' inputs gathered into one batch, and a batch's
outputs handed back to each request as its own rows. Pure numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .errors import ErrorKind, FerryError

Array = npt.NDArray[np.generic]
Tensors = dict[str, Array]


def gather(parts: Sequence[Mapping[str, Array]]) -> Mapping[str, Array]:
    """Concatenate each input along axis 0; a lone request is passed through uncopied."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def scatter(
    outputs: Mapping[str, Array], rows: Sequence[int], wanted: Sequence[Sequence[str]]
) -> list[Tensors]:
    """Give each request its own rows (`rows[i]` of them, in order) of the outputs it
    asked for (`wanted[i]`), as views."""
    total = sum(rows)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise FerryError(
                ErrorKind.INTERNAL,
                f"output '{name}' has shape {list(array.shape)}, which does not carry the "
                f"{total} rows of the batch along its first dimension (a model whose "
                "outputs do not follow its batch is served with max_batch_size: 0)",
            )
    if len(rows) == 1:  # a lone request: its outputs are the batch's, no views needed
        return [{name: outputs[name] for name in wanted[0]}]
    results: list[Tensors] = []
    start = 0
    for count, names in zip(rows, wanted, strict=True):
        stop = start + count
        results.append({name: outputs[name][start:stop] for name in names})
        start = stop
    return results


def gather_padded(
    parts: Sequence[Mapping[str, Array]],
    lengths: Sequence[int],
    target: int,
    axis: int,
    pad_values: Mapping[str, float | int],
) -> Mapping[str, Array]:
    """Concatenate each input along axis 0 as `gather` does, the inputs of `pad_values`
    first padded along `axis` from each part's length (`lengths[i]`) to `target` with
    their pad value: one copy per input, into an array filled with that value."""
    if len(parts) == 1 and lengths[0] == target:
        return parts[0]
    gathered: dict[str, Array] = {}
    for name, first in parts[0].items():
        if name not in pad_values:
            gathered[name] = (
                first if len(parts) == 1 else np.concatenate([part[name] for part in parts])
            )
            continue
        rows = sum(part[name].shape[0] for part in parts)
        shape = (rows, *first.shape[1:axis], target, *first.shape[axis + 1 :])
        batch = np.full(shape, pad_values[name], dtype=first.dtype)
        start = 0
        for part, length in zip(parts, lengths, strict=True):
            array = part[name]
            stop = start + array.shape[0]
            batch[(slice(start, stop), *_leading(axis), slice(0, length))] = array
            start = stop
        gathered[name] = batch
    return gathered


def scatter_unpadded(
    outputs: Mapping[str, Array],
    rows: Sequence[int],
    lengths: Sequence[int],
    target: int,
    wanted: Sequence[Sequence[str]],
    output_axes: Mapping[str, int],
) -> list[Tensors]:
    """`scatter`, with each output of `output_axes` cut back along its axis from the
    padded length `target` to each request's own length, as views."""
    results = scatter(outputs, rows, wanted)
    for name, axis in output_axes.items():
        array = outputs.get(name)
        if array is None:
            continue
        if array.ndim <= axis or array.shape[axis] != target:
            raise FerryError(
                ErrorKind.INTERNAL,
                f"output '{name}' has shape {list(array.shape)}, whose axis {axis} should "
                f"follow the padded length {target}",
            )
        for result, length in zip(results, lengths, strict=True):
            if name in result and length != target:
                result[name] = result[name][(*_leading(axis), slice(None), slice(0, length))]
    return results


def _leading(axis: int) -> tuple[slice, ...]:
    """Whole slices for the axes between the batch axis and `axis`."""
    return (slice(None),) * (axis - 1)

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
                f"{total} rows of the batch along its first dimension",
            )
    results: list[Tensors] = []
    start = 0
    for count, names in zip(rows, wanted, strict=True):
        stop = start + count
        results.append({name: outputs[name][start:stop] for name in names})
        start = stop
    return results

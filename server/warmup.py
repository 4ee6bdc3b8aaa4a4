"""Warm-up: inputs run through each instance at load, before the model reports ready.

The first run of a shape pays for kernel selection, memory arenas, TensorRT engine builds
and CUDA graph capture; warm-up pays it at load instead of on the first caller. Samples
come from the config's `model_warmup` (as in Triton: zero, random or file data) or, when a
model has batch buckets, one zero batch per bucket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ferry.proto.codec import NUMPY_DTYPES

from .errors import ErrorKind, FerryError

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]

WARMUP_FOLDER = "warmup"  # <model>/warmup/<input_data_file>, as in Triton


@dataclass(frozen=True, slots=True)
class WarmupInput:
    """One input of a sample: its type, its shape without the batch dimension of a
    batching model, and where its values come from."""

    datatype: str
    dims: tuple[int, ...]
    fill: str = "zero"  # "zero", "random" or "file"
    data_file: str = ""  # with fill "file": a file name inside <model>/warmup/


@dataclass(frozen=True, slots=True)
class WarmupSample:
    name: str
    batch_size: int  # rows; 0 for a model that does not batch
    inputs: tuple[tuple[str, WarmupInput], ...]
    count: int = 1  # how many times it runs


class Runner(Protocol):
    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]: ...


def sample_arrays(sample: WarmupSample, folder: Path | None = None) -> dict[str, Array]:
    """The input arrays of a sample; `folder` is the model's folder, for data files."""
    rng = np.random.default_rng(0)
    arrays: dict[str, Array] = {}
    for name, spec in sample.inputs:
        shape = (sample.batch_size, *spec.dims) if sample.batch_size else spec.dims
        arrays[name] = _fill(name, spec, shape, rng, folder)
    return arrays


def _fill(
    name: str,
    spec: WarmupInput,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    folder: Path | None,
) -> Array:
    count = int(np.prod(shape, dtype=np.int64))
    if spec.datatype == "BYTES":
        text = np.empty(count, dtype=object)
        text[:] = "" if spec.fill == "zero" else "0"
        return text.reshape(shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    if spec.fill == "zero":
        return np.zeros(shape, dtype=dtype)
    if spec.fill == "random":
        if dtype.kind == "f":
            return rng.random(shape).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(dtype)
        return rng.integers(0, 8, shape).astype(dtype)
    if folder is None:
        raise FerryError(ErrorKind.INVALID_INPUT, f"warm-up input '{name}' needs its data file")
    path = folder / WARMUP_FOLDER / spec.data_file
    if not path.resolve().is_relative_to(folder.resolve()):
        # As for model.onnx: a link out of the model's folder is not followed, and
        # nothing about its target (not even its size) is told.
        raise FerryError(
            ErrorKind.INVALID_INPUT,
            f"warm-up input '{name}': {WARMUP_FOLDER}/{spec.data_file} resolves outside "
            "the model's folder",
        )
    # Like Triton, the file holds the sample's values once; a batch repeats them.
    one = shape[1:] if len(shape) > len(spec.dims) else shape
    need = int(np.prod(one, dtype=np.int64)) * dtype.itemsize
    if path.exists() and not path.is_file():
        # a FIFO would block the load (and the model's lock) for good, a device never end
        raise FerryError(
            ErrorKind.INVALID_INPUT,
            f"warm-up input '{name}': {WARMUP_FOLDER}/{spec.data_file} is not a regular file",
        )
    try:
        with path.open("rb") as file:
            raw = file.read(need)  # only what the sample needs, however large the file
    except OSError as exc:
        raise FerryError(
            ErrorKind.INVALID_INPUT,
            f"warm-up input '{name}': cannot read {WARMUP_FOLDER}/{spec.data_file}: "
            f"{exc.strerror}",
        ) from exc
    if len(raw) < need:
        raise FerryError(
            ErrorKind.INVALID_INPUT,
            f"warm-up input '{name}': {WARMUP_FOLDER}/{spec.data_file} has {len(raw)} bytes, "
            f"{need} needed for {spec.datatype} {list(one)}",
        )
    values = np.frombuffer(raw[:need], dtype=dtype.newbyteorder("<")).astype(dtype)
    return np.broadcast_to(values.reshape(one), shape).copy()


def bucket_samples(
    buckets: Sequence[int],
    inputs: Sequence[tuple[str, str, tuple[int, ...]]],
    runs: int = 1,
    lengths: Sequence[tuple[int, Mapping[str, int]]] = (),
) -> tuple[WarmupSample, ...]:
    """One zero batch per bucket; none when an input has a variable non-batch dimension
    (its shape at run time cannot be guessed). `inputs` are (name, datatype, dims).

    `lengths` are a padding model's length buckets, each with its padded inputs and their
    axis (batch axis 0): then each batch bucket runs at each length, the padded axes set."""
    samples: list[WarmupSample] = []
    for length, axes in lengths or [(0, {})]:
        shaped = [
            (name, datatype, _with_length(dims, axes.get(name), length))
            for name, datatype, dims in inputs
        ]
        if any(-1 in dims for _, _, dims in shaped):
            return ()
        label = f" length {length}" if axes else ""
        samples.extend(
            WarmupSample(
                name=f"bucket {size}{label}",
                batch_size=size,
                inputs=tuple(
                    (name, WarmupInput(datatype, dims)) for name, datatype, dims in shaped
                ),
                count=runs,
            )
            for size in buckets
        )
    return tuple(samples)


def _with_length(dims: tuple[int, ...], axis: int | None, length: int) -> tuple[int, ...]:
    if axis is None:
        return dims
    return (*dims[: axis - 1], length, *dims[axis:])


def warm_up(
    model: str,
    instance: Runner,
    samples: Sequence[WarmupSample],
    output_names: Sequence[str],
    folder: Path | None = None,
) -> None:
    """Run every sample through one instance; a failure fails the load, as in Triton."""
    for sample in samples:
        arrays = sample_arrays(sample, folder)
        start = time.perf_counter()
        for _ in range(max(1, sample.count)):
            try:
                instance.run(arrays, output_names)
            except FerryError as exc:
                raise FerryError(
                    ErrorKind.INVALID_INPUT, f"warm-up '{sample.name}' failed: {exc.message}"
                ) from exc
        log.debug(
            "model '%s': warm-up '%s' ran %d times in %.1f ms",
            model, sample.name, max(1, sample.count), (time.perf_counter() - start) * 1e3,
        )

"""Variable-length inputs: which inputs a model lets Ferry pad, along which axis and with
what value; the lengths a batch is padded to; and which outputs are cut back after.

Pure Python over plain data (the arrays themselves are padded in `server.rows`). Padding
changes the answers of a model that does not mask its padding, so it is only ever on when
the model's config.pbtxt asks for it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ferry.proto.codec import NUMPY_DTYPES

from .errors import cut, invalid_input

Array = npt.NDArray[np.generic]

# config.pbtxt `parameters` keys (Ferry's own, like batch_buckets).
PADDING_INPUTS_PARAMETER = "padding_inputs"  # "input_ids=0,attention_mask=0"
PADDING_AXIS_PARAMETER = "padding_axis"  # "1": the axis of the full shape, batch axis 0
PADDING_OUTPUTS_PARAMETER = "padding_outputs"  # "token_states=1"; absent: found at load
LENGTH_BUCKETS_PARAMETER = "length_buckets"  # "16,32,64,128"; absent: powers of two
MAX_PADDING_RATIO_PARAMETER = "max_padding_ratio"  # "2": padded / real elements

DEFAULT_PADDING_AXIS = 1
DEFAULT_MAX_PADDING_RATIO = 2.0
# A config's length_buckets: each is a padded shape warmed up (at every batch bucket) and,
# on a GPU, bound and captured; a load request may send any config.
MAX_LENGTH_BUCKETS = 256
# The two lengths the model runs on at load to find which outputs follow the padded axis.
PROBE_LENGTHS = (3, 5)

TensorDims = tuple[str, str, tuple[int, ...]]  # name, datatype, dims without the batch axis


class PaddingConfigError(ValueError):
    """A padding setting that does not fit the model; the message names input and axis."""


@dataclass(frozen=True, slots=True)
class LengthBuckets:
    """The lengths a batch is padded to, and how much padding a batch may carry."""

    lengths: tuple[int, ...] = ()  # ascending; () means powers of two
    max_padding_ratio: float = DEFAULT_MAX_PADDING_RATIO

    def __post_init__(self) -> None:
        if list(self.lengths) != sorted(set(self.lengths)) or any(n < 1 for n in self.lengths):
            raise PaddingConfigError(
                f"parameter {LENGTH_BUCKETS_PARAMETER} must be distinct positive lengths, "
                f"got {list(self.lengths)}"
            )
        if not 1.0 <= self.max_padding_ratio < math.inf:
            raise PaddingConfigError(
                f"parameter {MAX_PADDING_RATIO_PARAMETER} must be a finite number >= 1 "
                f"(padded elements per real element), got {self.max_padding_ratio}"
            )

    def padded_length(self, length: int) -> int:
        """The bucket that holds `length`; past the largest listed bucket, `length` itself."""
        if not self.lengths:
            return 1 << max(0, length - 1).bit_length()
        index = bisect.bisect_left(self.lengths, length)
        return self.lengths[index] if index < len(self.lengths) else length

    def fits(self, rows: int, longest: int, real_elements: int) -> bool:
        """Whether `rows` rows padded to the bucket of `longest` stay within the ratio."""
        return rows * self.padded_length(longest) <= self.max_padding_ratio * real_elements


# The shape key's entry for an optional input a request left out: no shape has it, so
# requests that send different inputs never share a batch (their inputs cannot stack).
ABSENT_INPUT = (-1,)


@dataclass(frozen=True, slots=True)
class PaddingSettings:
    """A model's padding, validated against its graph. Axes count the batch axis as 0."""

    axis: int
    inputs: Mapping[str, float | int]  # padded input -> its pad value
    buckets: LengthBuckets
    # Outputs cut back to each request's length -> their axis; None until found at load.
    outputs: Mapping[str, int] | None = None

    def request_key(
        self, arrays: Mapping[str, Array], order: Sequence[str]
    ) -> tuple[int, tuple[tuple[int, ...], ...]]:
        """A request's length along the padded axis, and its shape key: the non-batch
        shapes with the padded axis left out, so requests of any length share a group."""
        axis = self.axis
        length = -1
        first = ""
        key = []
        for name in order:
            array = arrays.get(name)
            if array is None:  # an optional input left out keeps its place in the key
                key.append(ABSENT_INPUT)
                continue
            shape = array.shape
            if name in self.inputs:
                if length < 0:
                    length, first = shape[axis], name
                elif shape[axis] != length:
                    raise invalid_input(
                        f"inputs '{first}' and '{name}' must have the same length along "
                        f"axis {axis} (the padded axis), got {length} and {shape[axis]}"
                    )
                key.append((*shape[1:axis], *shape[axis + 1 :]))
            else:
                key.append(shape[1:])
        return max(length, 0), tuple(key)

    def describe(self) -> str:
        lengths = list(self.buckets.lengths) or "powers of two"
        return (
            f"padding {', '.join(self.inputs)} along axis {self.axis} to {lengths} "
            f"(at most {self.buckets.max_padding_ratio:g}x real)"
        )


def parse_padding(
    parameters: Mapping[str, str],
    inputs: Sequence[TensorDims],
    outputs: Sequence[TensorDims],
    max_batch_size: int,
) -> PaddingSettings | None:
    """The padding a config's parameters ask for, checked against the model's tensors;
    None when the config does not name any padded input."""
    text = parameters.get(PADDING_INPUTS_PARAMETER, "").strip()
    others = [
        key
        for key in (
            PADDING_AXIS_PARAMETER,
            PADDING_OUTPUTS_PARAMETER,
            LENGTH_BUCKETS_PARAMETER,
            MAX_PADDING_RATIO_PARAMETER,
        )
        if key in parameters
    ]
    if not text:
        if others:
            raise PaddingConfigError(
                f"parameters {', '.join(others)} need parameter {PADDING_INPUTS_PARAMETER} "
                "(the inputs to pad and their pad values, e.g. \"input_ids=0,attention_mask=0\")"
            )
        return None
    if max_batch_size <= 0:
        raise PaddingConfigError(
            f"parameter {PADDING_INPUTS_PARAMETER} needs a model that batches (max_batch_size > 0)"
        )
    axis = _whole_number(parameters, PADDING_AXIS_PARAMETER, DEFAULT_PADDING_AXIS)
    by_name = {name: (datatype, dims) for name, datatype, dims in inputs}
    pad_values: dict[str, float | int] = {}
    for name, value_text in _pairs(text, PADDING_INPUTS_PARAMETER, "input=pad value"):
        if name not in by_name:
            raise PaddingConfigError(
                f"parameter {PADDING_INPUTS_PARAMETER}: '{name}' is not an input of the model, "
                f"whose inputs are {', '.join(repr(n) for n in by_name)}"
            )
        if name in pad_values:
            raise PaddingConfigError(
                f"parameter {PADDING_INPUTS_PARAMETER}: input '{name}' is named twice; "
                "give each padded input one pad value"
            )
        datatype, dims = by_name[name]
        _check_axis(f"input '{name}'", dims, axis, PADDING_INPUTS_PARAMETER)
        pad_values[name] = _pad_value(name, datatype, value_text)
    output_axes: dict[str, int] | None = None
    if PADDING_OUTPUTS_PARAMETER in parameters:
        output_dims = {name: dims for name, _, dims in outputs}
        output_axes = {}
        for name, axis_text in _pairs(
            parameters[PADDING_OUTPUTS_PARAMETER], PADDING_OUTPUTS_PARAMETER, "output=axis"
        ):
            if name not in output_dims:
                raise PaddingConfigError(
                    f"parameter {PADDING_OUTPUTS_PARAMETER}: '{name}' is not an output of the "
                    f"model, whose outputs are {', '.join(repr(n) for n in output_dims)}"
                )
            if not _is_whole(axis_text):
                raise PaddingConfigError(
                    f"parameter {PADDING_OUTPUTS_PARAMETER}: output '{name}' needs a whole "
                    f"axis number, got {axis_text!r}"
                )
            if name in output_axes:
                raise PaddingConfigError(
                    f"parameter {PADDING_OUTPUTS_PARAMETER}: output '{name}' is named twice; "
                    "give each output one axis"
                )
            _check_axis(
                f"output '{name}'", output_dims[name], int(axis_text), PADDING_OUTPUTS_PARAMETER
            )
            output_axes[name] = int(axis_text)
    lengths: tuple[int, ...] = ()
    if LENGTH_BUCKETS_PARAMETER in parameters:
        lengths = _length_buckets(parameters[LENGTH_BUCKETS_PARAMETER])
    ratio_text = parameters.get(MAX_PADDING_RATIO_PARAMETER, str(DEFAULT_MAX_PADDING_RATIO))
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise PaddingConfigError(
            f"parameter {MAX_PADDING_RATIO_PARAMETER} must be a number >= 1, got {ratio_text!r}"
        ) from None
    return PaddingSettings(axis, pad_values, LengthBuckets(lengths, ratio), output_axes)


def to_parameters(padding: PaddingSettings) -> dict[str, str]:
    """The config parameters that give these settings back (for the ModelConfig RPC)."""
    parameters = {
        PADDING_INPUTS_PARAMETER: ",".join(f"{n}={v}" for n, v in padding.inputs.items()),
        PADDING_AXIS_PARAMETER: str(padding.axis),
        MAX_PADDING_RATIO_PARAMETER: f"{padding.buckets.max_padding_ratio:g}",
    }
    if padding.buckets.lengths:
        parameters[LENGTH_BUCKETS_PARAMETER] = ",".join(map(str, padding.buckets.lengths))
    if padding.outputs is not None:
        parameters[PADDING_OUTPUTS_PARAMETER] = ",".join(
            f"{n}={a}" for n, a in padding.outputs.items()
        )
    return parameters


class Runner(Protocol):
    def run(
        self, inputs: Mapping[str, Array], output_names: Sequence[str]
    ) -> Mapping[str, Array]: ...


def probe_output_axes(
    runner: Runner,
    padding: PaddingSettings,
    inputs: Sequence[TensorDims],
    output_names: Sequence[str],
) -> dict[str, int]:
    """Run the model on one row at two lengths and return, for each output, the axis that
    follows the padded length. Outputs whose shape does not change are returned whole;
    one that changes in another way cannot be cut back, and is refused."""
    shapes = _probe_shapes(runner, padding, inputs, output_names)
    short, long = PROBE_LENGTHS
    axes: dict[str, int] = {}
    for name in output_names:
        first, second = shapes[0][name], shapes[1][name]
        if first == second:
            continue
        axis = _following_axis(first, second)
        if axis is None:
            raise PaddingConfigError(
                f"output '{name}' has shape {list(first)} for inputs of length {short} and "
                f"{list(second)} for length {long}: no single axis follows the padded length, "
                f"so Ferry cannot cut it back; name its axis in parameter "
                f"{PADDING_OUTPUTS_PARAMETER} (\"{name}=<axis>\")"
            )
        axes[name] = axis
    return axes


def check_output_axes(
    runner: Runner,
    padding: PaddingSettings,
    inputs: Sequence[TensorDims],
    output_names: Sequence[str],
) -> None:
    """The config named the outputs to cut back (`padding.outputs`): run the model on one
    row at two lengths and refuse an axis that does not follow the padded length, and an
    output left out whose shape does (each caller would get its batch's padding)."""
    declared = padding.outputs or {}
    shapes = _probe_shapes(runner, padding, inputs, output_names)
    short, long = PROBE_LENGTHS
    for name in output_names:
        first, second = shapes[0][name], shapes[1][name]
        seen = f"{list(first)} for inputs of length {short}, {list(second)} for length {long}"
        following = _following_axis(first, second)
        axis = declared.get(name)
        if axis is None:
            if first != second:
                hint = f"{name}={following}" if following is not None else f"{name}=<axis>"
                raise PaddingConfigError(
                    f"parameter {PADDING_OUTPUTS_PARAMETER} does not name output '{name}', "
                    f"whose shape follows the padded length ({seen}): each caller would get "
                    f"it at its batch's padded length; name its axis (\"{hint}\")"
                )
        elif not (
            axis < min(len(first), len(second)) and first[axis] == short and second[axis] == long
        ):
            follows = f" (axis {following} follows it)" if following is not None else ""
            raise PaddingConfigError(
                f"parameter {PADDING_OUTPUTS_PARAMETER}: axis {axis} of output '{name}' does "
                f"not follow the padded length: the output has shape {list(first)} for inputs "
                f"of length {short} and {list(second)} for length {long}{follows}"
            )


def _probe_shapes(
    runner: Runner,
    padding: PaddingSettings,
    inputs: Sequence[TensorDims],
    output_names: Sequence[str],
) -> list[dict[str, tuple[int, ...]]]:
    """Each output's shape for one row of pad values at each of PROBE_LENGTHS (other
    variable axes 1)."""
    shapes = []
    for length in PROBE_LENGTHS:
        arrays = {}
        for name, datatype, dims in inputs:
            shape = [1, *(1 if d < 0 else d for d in dims)]
            if name in padding.inputs:
                shape[padding.axis] = length
            arrays[name] = np.full(shape, padding.inputs.get(name, 0), NUMPY_DTYPES[datatype])
        outputs = runner.run(arrays, output_names)
        shapes.append({name: tuple(outputs[name].shape) for name in output_names})
    return shapes


def _following_axis(first: tuple[int, ...], second: tuple[int, ...]) -> int | None:
    """The one axis (not the batch axis) that is PROBE_LENGTHS in the two shapes while
    every other axis stays the same; None if there is no such single axis."""
    short, long = PROBE_LENGTHS
    if len(first) != len(second):
        return None
    following = [
        axis for axis in range(1, len(first)) if first[axis] == short and second[axis] == long
    ]
    if len(following) != 1 or any(
        a != b for axis, (a, b) in enumerate(zip(first, second, strict=True))
        if axis != following[0]
    ):
        return None
    return following[0]


def _length_buckets(text: str) -> tuple[int, ...]:
    """The listed lengths, ascending and once each (the order they are written in does
    not matter); whole ASCII numbers only, at most MAX_LENGTH_BUCKETS of them."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    wrong = [part for part in parts if not _is_whole(part)]
    if wrong:
        raise PaddingConfigError(
            f"parameter {LENGTH_BUCKETS_PARAMETER} must be whole lengths separated by commas, "
            f"got {cut(wrong[0], 40)!r}"
        )
    lengths = sorted({int(part) for part in parts})
    if len(lengths) > MAX_LENGTH_BUCKETS:
        raise PaddingConfigError(
            f"parameter {LENGTH_BUCKETS_PARAMETER} lists {len(lengths)} lengths, more than "
            f"{MAX_LENGTH_BUCKETS} (each is a padded shape to warm up and keep)"
        )
    return tuple(lengths)


def _pairs(text: str, key: str, form: str) -> list[tuple[str, str]]:
    pairs = []
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise PaddingConfigError(
                f"parameter {key} must be {form} pairs separated by commas, got {part.strip()!r}"
            )
        pairs.append((name.strip(), value.strip()))
    return pairs


def _is_whole(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def _whole_number(parameters: Mapping[str, str], key: str, default: int) -> int:
    text = parameters.get(key, str(default)).strip()
    if not _is_whole(text):
        raise PaddingConfigError(f"parameter {key} must be a whole number, got {text!r}")
    return int(text)


def _check_axis(label: str, dims: tuple[int, ...], axis: int, key: str) -> None:
    """`dims` leave out the batch axis: axis n of the full shape is dims[n - 1]."""
    shape = ["batch", *dims]
    if not 1 <= axis <= len(dims):
        raise PaddingConfigError(
            f"parameter {key}: {label} has shape {shape}, which has no axis {axis} to pad "
            f"(axis 0 is the batch axis; 1..{len(dims)} are allowed)"
        )
    if dims[axis - 1] != -1:
        raise PaddingConfigError(
            f"parameter {key}: {label} has shape {shape}, whose axis {axis} is fixed at "
            f"{dims[axis - 1]}; padding needs a variable (-1) axis"
        )


def _pad_value(name: str, datatype: str, text: str) -> float | int:
    dtype = NUMPY_DTYPES.get(datatype)
    if datatype == "BYTES" or dtype is None:
        raise PaddingConfigError(
            f"parameter {PADDING_INPUTS_PARAMETER}: input '{name}' is {datatype}, which "
            "cannot be padded (numeric inputs only)"
        )
    try:
        value: float | int = float(text) if dtype.kind == "f" else int(text)
    except ValueError:
        raise PaddingConfigError(
            f"parameter {PADDING_INPUTS_PARAMETER}: pad value {text!r} of input '{name}' is "
            f"not a {datatype} number"
        ) from None
    if dtype.kind == "f":
        # nan or inf at a padded position reaches the real ones of a masked model (0 x nan
        # is nan), and a value past the type's range becomes inf when the batch is filled.
        largest = float(np.finfo(dtype.type).max)  # type: ignore[type-var]
        if not -largest <= value <= largest:
            raise PaddingConfigError(
                f"parameter {PADDING_INPUTS_PARAMETER}: pad value {text!r} of input '{name}' "
                f"is not a finite {datatype} number (-{largest:g}..{largest:g})"
            )
    if dtype.kind in "iub":
        low, high = (0, 1)
        if dtype.kind != "b":
            info = np.iinfo(dtype.type)  # type: ignore[type-var]
            low, high = int(info.min), int(info.max)
        if not low <= value <= high:
            raise PaddingConfigError(
                f"parameter {PADDING_INPUTS_PARAMETER}: pad value {value} of input '{name}' "
                f"is outside {datatype}'s {low}..{high}"
            )
    return value

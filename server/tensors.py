"""Decode and validate a ModelInferRequest into arrays; encode arrays into a response.

Everything a request can get wrong is found here, before anything is queued or
allocated: names, datatypes, ranks, dimensions, byte lengths and BYTES prefixes. Every
message names the input, what was expected and what came.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto.codec import CONTENTS_FIELDS, NUMPY_DTYPES, BytesFormatError, from_raw, to_raw

from .classification import CLASSIFICATION_PARAMETER, ClassifiedOutputs
from .classification import check_request as check_classification
from .config import ModelSettings, TensorSpec
from .errors import ErrorKind, FerryError, cut, invalid_input
from .padding import ABSENT_INPUT, PaddingSettings
from .varints import Scalar, decode_packed, packed_payload

Array = npt.NDArray[np.generic]

# By default no single tensor may claim more elements than this, whatever its byte length:
# a guard against shapes whose product overflows or asks for absurd allocations.
DEFAULT_MAX_TENSOR_ELEMENTS = 1 << 31
DEFAULT_MAX_TENSOR_BYTES = 64 * 1024 * 1024
# What one BYTES element costs once decoded, besides its content: the bytes object protobuf
# hands out (33 bytes), the str it becomes (49), and a slot in the object arrays and list
# between (8 each). An empty element costs two bytes on the wire, so without counting this
# a small message could make the server build millions of objects.
BYTES_ELEMENT_OVERHEAD = 112
# Elements of an output turned into Python values at a time, for a typed answer.
TYPED_ANSWER_SLICE = 65536
# Typed integer and bool inputs with fewer values are read from protobuf's container:
# below this, its 40-100 ns per value cost less than decoding the wire bytes with numpy
# (measured: 1.1-1.5x slower at 1,024 values, 0.6-0.9x at 4,096).
VARINT_DECODE_MIN_VALUES = 4096
# Random 64-bit values (hashes, random ids: varints of 9 and 10 bytes mixed) decode no
# faster with numpy below this many (1.0-1.4x the container's time at 8k-32k, 0.67x at
# 128k), so a sample of them that looks so keeps them in the container until here.
WIDE_VARINT_DECODE_MIN_VALUES = 65536
_WIDE_SAMPLES = 16


@dataclass(frozen=True, slots=True)
class TensorLimits:
    """The largest input tensor a request may carry, checked before anything is allocated.
    Bytes count the decoded size: elements times the element size, or for BYTES the
    length of its content plus BYTES_ELEMENT_OVERHEAD per element."""

    max_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES

    def __post_init__(self) -> None:
        if self.max_elements < 1 or self.max_bytes < 1:
            raise ValueError(f"tensor limits must be >= 1, got {self}")


class DecodedRequest(NamedTuple):  # one per request: a tuple is the cheapest record
    """A request in the server's terms, whatever protocol it came by."""

    inputs: dict[str, Array]
    outputs: tuple[str, ...]
    rows: int
    shape_key: tuple[tuple[int, ...], ...]
    timeout_us: int | None = None  # the request parameter 'timeout'
    priority: int | None = None  # the request parameter 'priority'
    length: int = 0  # along the padded axis, for a model that pads its inputs


def _describe(datatype: str, shape: Sequence[int]) -> str:
    return f"{datatype} {shown_shape(shape)}"


# Dimensions of a shape an error message shows: a client may send millions (a byte each
# in the message), whose text took 20 times the request and seconds of the event loop.
SHOWN_DIMS = 16


def shown_shape(shape: Sequence[object]) -> str:
    """A shape as an error message shows it: whole, or its first SHOWN_DIMS and its rank."""
    if len(shape) <= SHOWN_DIMS:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:SHOWN_DIMS]))}, ...] ({len(shape)} dimensions)"


# The most dimensions an input of any rank may have (TensorSpec.any_rank): numpy's limit.
MAX_ANY_RANK = 64


def expected_dims(spec: TensorSpec, model: ModelSettings, shape: Sequence[int]) -> tuple[int, ...]:
    """The dimensions to check a shape of a rank other than the input's client shape
    against: any, for an input of any rank (with its batch dimension when the model
    batches, and at most MAX_ANY_RANK); otherwise FerryError naming the shape expected."""
    least = 1 if model.batchable else 0
    if not spec.any_rank:
        raise invalid_input(
            f"input '{spec.name}': expected shape {list(model.client_shapes[spec.name])}, "
            f"got {shown_shape(shape)}"
        )
    if not least <= len(shape) <= MAX_ANY_RANK:
        raise invalid_input(
            f"input '{spec.name}': the model takes it at any shape of "
            + (f"1 to {MAX_ANY_RANK} dimensions, the batch first" if least
               else f"at most {MAX_ANY_RANK} dimensions")
            + f", got {shown_shape(shape)}"
        )
    return (-1,) * len(shape)


def decode_request(
    request: pb.ModelInferRequest,
    model: ModelSettings,
    limits: TensorLimits = TensorLimits(),
    raw_contents: Sequence[bytes | memoryview] | None = None,
) -> DecodedRequest:
    """The request in the server's terms, or FerryError saying what is wrong with it.
    `raw_contents` stands for the request's raw_input_contents (the REST port's, kept
    out of the protobuf)."""
    if raw_contents is None:
        raw_contents = request.raw_input_contents
    # In this order whichever path decodes: the inputs, the outputs, then the batch key and
    # the padded size, so that a request with several faults hears of the same one first.
    plain = _decode_plain_raw(request, raw_contents, model, limits)
    if plain is not None:
        arrays, rows, shape_key = plain
        outputs = _requested_outputs(request, model)
        length = 0
        if shape_key is None:  # a padding model: its key leaves the padded axis out
            length, shape_key = batch_key(arrays, model)
            _check_padded_size(arrays, model.padding, length, limits)  # type: ignore[arg-type]
    else:  # anything else, errors included, takes the general path
        arrays = _decode_inputs(request, raw_contents, model, limits)
        outputs = _requested_outputs(request, model)
        length, shape_key = batch_key(arrays, model)
        if model.padding is not None:
            _check_padded_size(arrays, model.padding, length, limits)
        rows = next(iter(arrays.values())).shape[0] if model.batchable else 1
    if not request.parameters:
        return DecodedRequest(arrays, outputs, rows, shape_key, length=length)
    return DecodedRequest(
        arrays,
        outputs,
        rows,
        shape_key,
        timeout_us=_integer_parameter(request, "timeout"),
        priority=_integer_parameter(request, "priority"),
        length=length,
    )


class _KnownInput(NamedTuple):
    """An input tensor's header (name, datatype, shape) that passed the fast path's checks
    for one model: what its raw content is decoded to."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]
    elements: int
    size: int  # bytes of its raw content
    rows: int  # its first dimension (the batch size of a batchable model)


# Headers are remembered only this short (a name, a datatype and a few dimensions take
# 20-60 bytes; anything longer carries parameters) and only this many per model, so that
# callers cannot grow the table.
KNOWN_INPUT_MAX_BYTES = 256
KNOWN_INPUTS_PER_MODEL = 1024
# Answer headers (model, version, outputs' names, datatypes and shapes) kept per model.
ANSWER_TEMPLATES_PER_MODEL = 256


class _ModelCodec:
    """What one model's requests and answers are checked against and built from, learned
    from the requests themselves: the input headers that passed the fast path's checks
    (keyed by their serialized bytes: one protobuf call instead of one per field, and
    reading a repeated shape field through protobuf's container costs 0.5 us) and the
    serialized headers of its answers. Both depend on the model's settings alone."""

    __slots__ = ("answers", "inputs", "settings")

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings  # held, so that its id() is not reused while cached
        self.inputs: dict[bytes, _KnownInput] = {}
        self.answers: dict[tuple[object, ...], bytes] = {}


_CODECS: dict[int, _ModelCodec] = {}
# Models' tables kept at once: past this (many models, or models reloaded many times
# over), the one kept longest goes, so that a server of many models still keeps most.
_CODECS_KEPT = 256


def _codec(model: ModelSettings) -> _ModelCodec:
    codec = _CODECS.get(id(model))
    if codec is None or codec.settings is not model:
        _CODECS.pop(id(model), None)  # a settings object gone, whose id() came back
        if len(_CODECS) >= _CODECS_KEPT:
            del _CODECS[next(iter(_CODECS))]
        codec = _CODECS[id(model)] = _ModelCodec(model)
    return codec


def _known_input(
    tensor: pb.ModelInferRequest.InferInputTensor, model: ModelSettings
) -> _KnownInput | None:
    """The header of a fixed-size input in raw_input_contents, checked against the model
    (name, datatype, rank, the dimensions it fixes, none negative, no typed contents);
    None when the general path must look at it."""
    plan = model.raw_inputs.get(tensor.name)
    if plan is None:
        return None
    datatype, expected, itemsize = plan
    dims = tensor.shape
    if tensor.datatype != datatype or len(dims) != len(expected):
        return None
    shape = tuple(dims)
    elements = 1
    for given, wanted in zip(shape, expected, strict=True):
        if given < 0 or (given != wanted and wanted != -1):
            return None
        elements *= given
    # No element: `_check_shape` bounds its other dimensions, which numpy multiplies.
    if not elements or tensor.HasField("contents"):
        return None
    return _KnownInput(
        tensor.name, shape, NUMPY_DTYPES[datatype], elements, elements * itemsize,
        shape[0] if shape else 1,
    )


def _decode_plain_raw(
    request: pb.ModelInferRequest,
    raw_contents: Sequence[bytes | memoryview],
    model: ModelSettings,
    limits: TensorLimits,
) -> tuple[dict[str, Array], int, tuple[tuple[int, ...], ...] | None] | None:
    """The common request in one pass: every input of the model once, fixed-size, in
    raw_input_contents, every check passing. Its arrays, rows and shape key (None for a
    padding model, whose key `batch_key` computes); None for anything else: the general
    path then decodes it, or says precisely what is wrong."""
    inputs = request.inputs
    count = len(inputs)
    if not raw_contents or len(raw_contents) != count or count != len(model.inputs):
        return None
    known = _codec(model).inputs
    batchable = model.batchable
    arrays: dict[str, Array] = {}
    rows = -1
    for index in range(count):  # by index: zip over protobuf's containers costs more
        tensor = inputs[index]
        raw = raw_contents[index]
        header = tensor.SerializeToString()
        plan = known.get(header)
        if plan is None:
            plan = _known_input(tensor, model)
            if plan is None:
                return None
            if len(header) <= KNOWN_INPUT_MAX_BYTES and len(known) < KNOWN_INPUTS_PER_MODEL:
                known[header] = plan
        name = plan.name
        if (
            name in arrays
            or len(raw) != plan.size
            or plan.elements > limits.max_elements
            or plan.size > limits.max_bytes
        ):
            return None
        if batchable:
            if rows < 0:
                rows = plan.rows
            elif plan.rows != rows:
                return None
        # One array over the bytes, not frombuffer and a reshaped view: half the cost.
        arrays[name] = np.ndarray(plan.shape, plan.dtype, raw)
    if not batchable:
        rows = 1
    elif not 1 <= rows <= model.max_batch_size:
        return None
    if model.padding is not None:
        return arrays, rows, None
    if count == 1:
        return arrays, rows, (arrays[name].shape[1:],)
    return arrays, rows, tuple(arrays[n].shape[1:] for n in model.input_names)


def _decode_inputs(
    request: pb.ModelInferRequest,
    raw_contents: Sequence[bytes | memoryview],
    model: ModelSettings,
    limits: TensorLimits,
) -> dict[str, Array]:
    specs = model.inputs_by_name
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise invalid_input(
            f"raw_input_contents has {len(raw_contents)} entries but the request has "
            f"{len(request.inputs)} inputs; send one entry per input, in the same order"
        )
    arrays: dict[str, Array] = {}
    for index, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise invalid_input(
                f"unknown input '{cut(tensor.name, 100)}': model '{model.name}' takes "
                + ", ".join(f"'{name}'" for name in specs)
            )
        if tensor.name in arrays:
            raise invalid_input(f"input '{tensor.name}' appears more than once")
        shape = _check_shape(tensor, spec, model, limits)
        raw = raw_contents[index] if raw_contents else None
        _check_bytes(tensor, spec, shape, raw, limits)
        arrays[tensor.name] = _decode_tensor(tensor, spec, shape, raw)

    missing = (
        [name for name, spec in specs.items() if name not in arrays and not spec.optional]
        if len(arrays) != len(specs)
        else ()
    )
    if missing:
        raise invalid_input(
            f"missing input {', '.join(repr(n) for n in missing)} for model '{model.name}'"
        )
    if not arrays and model.batchable:  # all optional, none sent: nothing gives the rows
        raise invalid_input(
            f"the request has no inputs: model '{model.name}' takes "
            + ", ".join(f"'{name}'" for name in specs)
            + " (optional, but at least one must be sent)"
        )

    rows = 1
    if model.batchable:
        batch_sizes = {name: array.shape[0] for name, array in arrays.items()}
        rows = next(iter(batch_sizes.values()))
        if len(arrays) > 1 and len(set(batch_sizes.values())) > 1:
            raise invalid_input(
                "inputs disagree on the batch size (first dimension): "
                + ", ".join(f"'{n}' has {b}" for n, b in batch_sizes.items())
            )
        if not 1 <= rows <= model.max_batch_size:
            raise invalid_input(
                f"batch size {rows} (first dimension of input '{next(iter(arrays))}') is "
                f"outside 1..{model.max_batch_size}, the max_batch_size of model '{model.name}'"
            )
    return arrays


def _check_padded_size(
    arrays: Mapping[str, Array], padding: PaddingSettings, length: int, limits: TensorLimits
) -> None:
    """The tensor limits hold for each padded input at the length it may be padded to: a
    request of length 0 has no element to count, yet padded to its bucket its other axes
    count in full ([16, 0, 250000] would become 4 million elements)."""
    padded_length = padding.buckets.padded_length(length)
    if padded_length <= length:
        return  # past the largest bucket, or exactly one: as sent, already checked
    axis = padding.axis
    for name in padding.inputs:
        array = arrays.get(name)
        if array is None:
            continue
        shape = (*array.shape[:axis], padded_length, *array.shape[axis + 1 :])
        elements = math.prod(shape)
        if elements > limits.max_elements or elements * array.itemsize > limits.max_bytes:
            raise invalid_input(
                f"input '{name}' {list(array.shape)} is padded along axis {axis} to "
                f"{list(shape)}, {elements * array.itemsize} bytes, more than the limit per "
                f"tensor ({limits.max_elements} elements, {limits.max_bytes} bytes: "
                "--max-tensor-elements, --max-tensor-bytes)"
            )


def batch_key(
    arrays: Mapping[str, Array], model: ModelSettings
) -> tuple[int, tuple[tuple[int, ...], ...]]:
    """What decides which requests may share a batch: the length along the padded axis
    (0 when the model does not pad) and the shape key (the non-batch shapes, the padded
    axis left out). Raises FerryError when padded inputs disagree on their length."""
    if model.padding is None:
        # An optional input left out keeps its place: requests that send different
        # inputs cannot be gathered into one batch.
        return 0, tuple(
            arrays[s.name].shape[1:] if s.name in arrays else ABSENT_INPUT for s in model.inputs
        )
    return model.padding.request_key(arrays, model.input_names)


def _integer_parameter(request: pb.ModelInferRequest, name: str) -> int | None:
    """A non-negative integer request parameter; unknown parameters are ignored."""
    if name not in request.parameters:
        return None
    param = request.parameters[name]
    kind = param.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        value = int(getattr(param, kind))
        if value < 0:
            raise invalid_input(f"request parameter '{name}' must not be negative, got {value}")
        return value
    raise invalid_input(
        f"request parameter '{name}' must be an integer (int64_param or uint64_param), "
        f"got {kind or 'a parameter with no value'}"
    )


def _check_shape(
    tensor: pb.ModelInferRequest.InferInputTensor,
    spec: TensorSpec,
    model: ModelSettings,
    limits: TensorLimits,
) -> tuple[int, ...]:
    dims = tensor.shape  # checked by its length before it is copied or shown
    expected = model.client_shapes[spec.name]
    if tensor.datatype != spec.datatype:
        raise invalid_input(
            f"input '{spec.name}': expected {_describe(spec.datatype, expected)}, got "
            f"{_describe(tensor.datatype or '(no datatype)', dims)}"
        )
    if len(dims) != len(expected):
        expected = expected_dims(spec, model, dims)
    shape = tuple(dims)
    # One plain loop (every request passes here): the dimensions the model fixes must
    # match, and none may be negative.
    negative = False
    for given, wanted in zip(shape, expected, strict=True):
        if given != wanted and wanted != -1:
            raise invalid_input(
                f"input '{spec.name}': expected shape {list(expected)}, got {list(shape)}"
            )
        if given < 0:
            negative = True
    if negative:
        raise invalid_input(
            f"input '{spec.name}': expected dimensions >= 0, got shape {list(shape)} "
            "with a negative dimension"
        )
    # Exact whatever the size (Python integers do not overflow); the limit is checked on
    # the shape, before anything is allocated.
    elements = math.prod(shape)
    if elements > limits.max_elements:
        raise invalid_input(
            f"input '{spec.name}': shape {list(shape)} has more than "
            f"{limits.max_elements} elements, the limit per tensor (--max-tensor-elements)"
        )
    # A shape with a 0 has no element, but numpy (and onnxruntime) multiply its other
    # dimensions all the same: past int64 it is numpy's "array is too big".
    if not elements and math.prod(d for d in shape if d) > limits.max_elements:
        raise invalid_input(
            f"input '{spec.name}': shape {list(shape)} has no element, but its other "
            f"dimensions multiply to more than {limits.max_elements}, the limit per tensor "
            "(--max-tensor-elements)"
        )
    return shape


def _check_bytes(
    tensor: pb.ModelInferRequest.InferInputTensor,
    spec: TensorSpec,
    shape: tuple[int, ...],
    raw: bytes | memoryview | None,
    limits: TensorLimits,
) -> None:
    """The decoded size of the tensor, bounded before any per-element work."""
    if spec.datatype == "BYTES":
        count = math.prod(shape)
        size = BYTES_ELEMENT_OVERHEAD * count
        if raw is not None:
            size += len(raw)
        elif size <= limits.max_bytes and len(tensor.contents.bytes_contents) == count:
            # Summed only once the count is bounded and matches the shape: a small shape
            # with millions of elements sent would cost seconds here; `_decode_typed`
            # refuses it for its count.
            size += sum(len(value) for value in tensor.contents.bytes_contents)
    else:
        dtype = NUMPY_DTYPES.get(spec.datatype)
        size = dtype.itemsize if dtype is not None else 1
        for dim in shape:
            size *= dim
        if raw is not None:
            size = max(size, len(raw))
    if size > limits.max_bytes:
        raise _over_tensor_bytes(spec.name, spec.datatype, shape, size, limits)


def check_bytes_count(name: str, shape: Sequence[int], limits: TensorLimits) -> None:
    """A BYTES tensor of this shape, refused if its elements alone (before any content)
    pass --max-tensor-bytes: for a front door with work per element to do first."""
    size = BYTES_ELEMENT_OVERHEAD * math.prod(shape)
    if size > limits.max_bytes:
        raise _over_tensor_bytes(name, "BYTES", shape, size, limits)


def _over_tensor_bytes(
    name: str, datatype: str, shape: Sequence[int], size: int, limits: TensorLimits
) -> FerryError:
    what = (
        f" ({BYTES_ELEMENT_OVERHEAD} bytes per element plus the content)"
        if datatype == "BYTES"
        else ""
    )
    return invalid_input(
        f"input '{name}' {_describe(datatype, shape)} decodes to at least "
        f"{size} bytes{what}, more than {limits.max_bytes}, the limit per tensor "
        "(--max-tensor-bytes)"
    )


def _decode_tensor(
    tensor: pb.ModelInferRequest.InferInputTensor,
    spec: TensorSpec,
    shape: tuple[int, ...],
    raw: bytes | memoryview | None,
) -> Array:
    if raw is not None:
        if tensor.HasField("contents"):
            raise invalid_input(
                f"input '{spec.name}' has both raw_input_contents and typed contents; "
                "use one encoding"
            )
        return _decode_raw(raw, spec, shape)
    return _decode_typed(tensor, spec, shape)


def _decode_raw(raw: bytes | memoryview, spec: TensorSpec, shape: tuple[int, ...]) -> Array:
    try:
        array = from_raw(raw, spec.datatype, shape)
    except BytesFormatError as exc:
        raise invalid_input(
            f"input '{spec.name}' {_describe(spec.datatype, shape)}: bad BYTES content: {exc}"
        ) from exc
    except ValueError as exc:
        raise invalid_input(
            f"input '{spec.name}' {_describe(spec.datatype, shape)}: {exc}"
        ) from exc
    return _as_text(array, spec) if spec.datatype == "BYTES" else array


def _decode_typed(
    tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec, shape: tuple[int, ...]
) -> Array:
    field = CONTENTS_FIELDS.get(spec.datatype)
    if field is None:
        raise invalid_input(
            f"input '{spec.name}': {spec.datatype} has no typed contents field; "
            "send it in raw_input_contents"
        )
    # The wrong field first: otherwise it would read as "0 values" in the right one.
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        raise invalid_input(
            f"input '{spec.name}' is {spec.datatype}, which travels in contents.{field}, "
            f"but the request set contents.{others[0]}"
        )
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise invalid_input(
            f"input '{spec.name}' {_describe(spec.datatype, shape)}: expected {count} "
            f"values in contents.{field}, got {len(values)}"
        )
    if spec.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return _as_text(array.reshape(shape), spec)
    if field in _FIXED_WIDTH_FIELDS:
        floats = _fixed_width_values(tensor.contents, field, count)
        if floats is not None:
            return floats.astype(NUMPY_DTYPES[spec.datatype], copy=False).reshape(shape)
    elif field in _VARINT_FIELDS and decode_with_numpy(values, field, count):
        wide = _varint_values(tensor.contents, field, count)
        if wide is not None:
            values = wide  # then range-checked as the container's values would be
    return _checked_values(values, field, spec).reshape(shape)


# The packed fixed-width fields: their field number.
_FIXED_WIDTH_FIELDS = {"fp32_contents": 6, "fp64_contents": 7}
# The packed varint fields: their field number and protobuf scalar type.
_VARINT_FIELDS: dict[str, tuple[int, Scalar]] = {
    "bool_contents": (1, "bool"),
    "int_contents": (2, "int32"),
    "int64_contents": (3, "int64"),
    "uint_contents": (4, "uint32"),
    "uint64_contents": (5, "uint64"),
}
_WIDE_FIELDS = frozenset({"int64_contents", "uint64_contents"})


def _fixed_width_values(
    contents: pb.InferTensorContents, field: str, count: int
) -> Array | None:
    """The `count` values of a float field, the only one set, read from its wire bytes:
    numpy walking protobuf's container costs 80 ns per value (a second of the event loop
    for 64 MiB), this one copy. None when the bytes are not the one packed field."""
    payload = packed_payload(contents.SerializeToString(), _FIXED_WIDTH_FIELDS[field])
    dtype = _FIELD_DTYPES[field]
    if payload is None or len(payload) != count * dtype.itemsize:
        return None
    return np.frombuffer(payload, dtype=dtype, count=count)


def decode_with_numpy(values: Sequence[int], field: str, count: int) -> bool:
    """Whether `_varint_values` decodes these `count` values faster than the container."""
    if count < VARINT_DECODE_MIN_VALUES:
        return False
    if count >= WIDE_VARINT_DECODE_MIN_VALUES or field not in _WIDE_FIELDS:
        return True
    # Negative int64s and values from 2**56 up travel in 9 or 10 bytes.
    step = count // _WIDE_SAMPLES
    wide = sum(not 0 <= values[i] < 1 << 56 for i in range(0, step * _WIDE_SAMPLES, step))
    return wide < _WIDE_SAMPLES // 2


def _varint_values(contents: pb.InferTensorContents, field: str, count: int) -> Array | None:
    """The `count` values of an integer or bool field, the only one set, decoded from its
    wire bytes at the field's width: numpy walking protobuf's container costs 40-100 ns
    per value (2.6 s of the event loop for 64 MiB of INT8), this 1-20, plus protobuf's
    re-serializing (1 ns per small value, 35 per 10-byte one: negative int32 and most
    int64). None when the bytes are not the one packed field."""
    number, scalar = _VARINT_FIELDS[field]
    payload = packed_payload(contents.SerializeToString(), number)
    return None if payload is None else decode_packed(payload, count, scalar)


def _checked_values(values: object, field: str, spec: TensorSpec) -> Array:
    """Typed fields are wider than some datatypes (INT8 travels as int32): refuse values
    that do not fit instead of wrapping them around. The field is read at its own width:
    left to guess, numpy turns UINT64 values above 2**63 into float64 and loses them."""
    dtype = NUMPY_DTYPES[spec.datatype]
    try:
        wide = np.asarray(values, dtype=_FIELD_DTYPES[field])
        if wide.dtype == dtype:  # the field's own width: nothing to narrow or check
            return wide
        array = wide.astype(dtype)
        if wide.size and dtype.kind in "iu" and not np.array_equal(array, wide):
            raise invalid_input(f"input '{spec.name}': values out of range for {spec.datatype}")
    except OverflowError as exc:
        raise invalid_input(
            f"input '{spec.name}': values out of range for {spec.datatype}"
        ) from exc
    return array


# The width of each typed contents field, as the protocol declares it.
_FIELD_DTYPES: dict[str, np.dtype[np.generic]] = {
    "bool_contents": np.dtype("bool"),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}


def _as_text(array: Array, spec: TensorSpec) -> Array:
    """BYTES inputs feed ONNX string tensors, whose elements are UTF-8 text: decode each
    element to str here, where a bad one fails only its own request. (onnxruntime would
    turn a bytes element into its repr, "b'...'", and cannot return non-UTF-8 strings.)
    Outputs need nothing: `to_raw` encodes str elements as UTF-8."""
    elements = array.reshape(-1).tolist()
    text = np.empty(len(elements), dtype=object)
    for index, element in enumerate(elements):
        try:
            text[index] = element.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise invalid_input(
                f"input '{spec.name}': BYTES element {index} is not valid UTF-8 "
                f"({exc.reason} at byte {exc.start}); ONNX string tensors hold UTF-8 text"
            ) from exc
    return text.reshape(array.shape)


def _requested_outputs(request: pb.ModelInferRequest, model: ModelSettings) -> tuple[str, ...]:
    names = model.output_names
    requested = request.outputs
    count = len(requested)
    if not count:
        return names
    if count == 1:  # the common case; each index into protobuf's container costs
        first = requested[0]
        name = first.name
        if name in names and not first.parameters:
            return (name,)
    wanted: list[str] = []
    classes: dict[str, int] = {}
    for output in requested:
        if output.name not in names:
            raise invalid_input(
                f"unknown output '{cut(output.name, 100)}': model '{model.name}' gives "
                + ", ".join(f"'{n}'" for n in names)
            )
        if output.name in wanted:
            raise invalid_input(f"output '{output.name}' is requested more than once")
        if CLASSIFICATION_PARAMETER in output.parameters:
            spec = next(s for s in model.outputs if s.name == output.name)
            classes[output.name] = check_classification(
                spec, _parameter_value(output.parameters[CLASSIFICATION_PARAMETER])
            )
        wanted.append(output.name)
    return ClassifiedOutputs(tuple(wanted), classes) if classes else tuple(wanted)


def _parameter_value(parameter: pb.InferParameter) -> object:
    """An InferParameter's value, None when it has none."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def encode_response(
    request: pb.ModelInferRequest,
    model: ModelSettings,
    version: str,
    outputs: Mapping[str, Array],
    *,
    max_bytes: int | None = None,
    framing_bytes: int = 0,
    raw_inputs: bool = False,
) -> pb.ModelInferResponse:
    """Outputs travel as raw_output_contents, as Triton sends them; a request whose inputs
    came as typed `contents` (grpcurl, ghz with JSON) is answered in typed contents too,
    when every output has a typed field (FP16 and BF16 have none: then all go raw).
    With `max_bytes`, an answer larger than that (`framing_bytes` added) is refused as
    `check_response_size` refuses it."""
    datatypes = model.output_datatypes
    # `raw_inputs`: the request's raw_input_contents were kept apart from it.
    if (
        not raw_inputs
        and not request.raw_input_contents
        and request.inputs
        and _all_typed(outputs, datatypes)
    ):
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=version, id=request.id
        )
        add_output = response.outputs.add
        for name, array in outputs.items():
            datatype = datatypes[name]
            tensor = add_output(name=name, datatype=datatype, shape=array.shape)
            field = getattr(tensor.contents, CONTENTS_FIELDS[datatype])
            flat = array.reshape(-1)
            # In slices: a whole tensor as a Python list costs 8 times its size in
            # objects (32 bytes per float) on top of the answer, for an answer that may
            # then be refused as too large.
            for start in range(0, flat.size, TYPED_ANSWER_SLICE):
                values = flat[start : start + TYPED_ANSWER_SLICE].tolist()
                if datatype == "BYTES":
                    values = [
                        v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values
                    ]
                field.extend(values)
        if max_bytes is not None:
            check_response_size(response, max_bytes, framing_bytes)
        return response
    # The header (model, version, each output's name, datatype and shape) is parsed from
    # the bytes of an earlier answer with the same outputs: building it field by field
    # costs twice as much.
    answers = _codec(model).answers
    if len(outputs) == 1:
        name, array = next(iter(outputs.items()))
        key: tuple[object, ...] = (version, name, array.shape)
    else:
        key = (version, *[(name, array.shape) for name, array in outputs.items()])
    header = answers.get(key)
    if header is None:
        message = pb.ModelInferResponse(model_name=model.name, model_version=version)
        for name, array in outputs.items():
            message.outputs.add(name=name, datatype=datatypes[name], shape=array.shape)
        header = message.SerializeToString()
        if len(answers) < ANSWER_TEMPLATES_PER_MODEL:
            answers[key] = header
    response = pb.ModelInferResponse.FromString(header)
    request_id = request.id
    # At most: each field adds a 1-byte tag and a length of at most 5 bytes (protobuf's
    # varint, for anything under 32 GiB); the id's UTF-8 at most 4 bytes a character.
    most = len(header) + framing_bytes
    if request_id:
        response.id = request_id
        most += 6 + 4 * len(request_id)
    raw_contents = response.raw_output_contents
    for array in outputs.values():
        raw = to_raw(array)
        raw_contents.append(raw)
        most += 6 + len(raw)
    if max_bytes is not None and most > max_bytes:
        check_response_size(response, max_bytes, framing_bytes)  # exact, to the byte
    return response


def _all_typed(outputs: Mapping[str, Array], datatypes: Mapping[str, str]) -> bool:
    return all(datatypes[name] in CONTENTS_FIELDS for name in outputs)


def check_response_size(
    response: pb.ModelInferResponse, max_bytes: int, framing_bytes: int = 0
) -> None:
    """Refuse an answer larger than the server may send, as that request's own error: left
    to gRPC, it would end the call (or a whole stream) with no word of which request.
    `framing_bytes`: what the message that carries the response adds to it."""
    size = response.ByteSize() + framing_bytes
    if size > max_bytes:
        raise FerryError(
            ErrorKind.TOO_LARGE,
            f"the response of model '{response.model_name}' is {size} bytes, more than "
            f"{max_bytes}, the largest message the server sends (--max-message-size)",
        )

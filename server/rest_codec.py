"""The REST binding's bodies: JSON tensors and Triton's binary tensor data extension in,
JSON (and binary outputs on request) out.

An inference body becomes the same `ModelInferRequest` a gRPC client would send, with every
tensor in `raw_input_contents`, so that `tensors.decode_request` validates both front doors
alike: one set of checks, one set of messages. JSON `data` is turned into arrays by numpy
and orjson, never by a Python loop over numbers.

Binary extension: the body is a JSON header of `Inference-Header-Content-Length` bytes,
then the raw bytes of each input whose parameters give `binary_data_size`, in the order of
`inputs`; outputs asked for with `binary_data` come back the same way.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto.codec import (
    NUMPY_DTYPES,
    RAW_VIEW_MIN_BYTES,
    encode_bytes_elements,
    raw_view,
    to_raw,
)

from .classification import CLASSIFICATION_PARAMETER
from .config import ModelSettings
from .dataplane import OutputFloor, text_bytes
from .errors import ErrorKind, FerryError, invalid_input
from .tensors import (
    Array,
    DecodedRequest,
    TensorLimits,
    check_bytes_count,
    decode_request,
    expected_dims,
    shown_shape,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
ANSWER_LIMIT = "the largest answer the server sends (--max-message-size)"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

_INT64_RANGE = (-(1 << 63), (1 << 63) - 1)
_UINT64_MAX = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class RestRequest:
    """An inference body, parsed: the protobuf request it stands for, and which outputs
    go back as binary data (None: all of them)."""

    request: pb.ModelInferRequest
    binary_outputs: frozenset[str] | None
    has_id: bool
    # Each input's content, as raw_input_contents would hold it: kept out of the protobuf,
    # which would copy it in and copy it out again (a binary input is a view of the body).
    raw_contents: Sequence[bytes | memoryview] = ()

    def decode(self, settings: ModelSettings, limits: TensorLimits) -> DecodedRequest:
        return decode_request(self.request, settings, limits, self.raw_contents)


def parse_json(text: bytes | memoryview, what: str) -> Any:
    # Without the cyclic garbage collector while orjson builds the result: JSON makes no
    # cycles, and a body of many small lists (4 MiB of `[0],`) otherwise set off
    # collection after collection over what was built so far, 290 ms against 90.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise invalid_input(f"{what} is not valid JSON: {exc}") from exc
    finally:
        if collecting:
            gc.enable()


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """A body that must be a JSON object, or empty (an empty object)."""
    if not body.strip():
        return {}
    value = parse_json(body, what)
    if not isinstance(value, dict):
        raise invalid_input(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_infer(
    body: bytes,
    header_length: str | None,
    model_name: str,
    version: str,
    settings: ModelSettings | None = None,
    limits: TensorLimits | None = None,
) -> RestRequest:
    """Parse an inference body; raises FerryError (invalid input) naming what is wrong.
    With the model's `settings`, an input's name and datatype are checked before its
    JSON `data` is read, so that a misspelt input or a wrong datatype is named as such
    (with the same words as over gRPC), not as a count of values; with `limits`, BYTES
    data is held to --max-tensor-bytes by its count before a step per element."""
    view = memoryview(body)
    if header_length is None:
        json_end = len(body)
    else:
        try:
            json_end = int(header_length)
        except ValueError:
            json_end = -1
        if not 0 < json_end <= len(body):
            raise invalid_input(
                f"{HEADER_LENGTH} is {header_length!r}: expected the byte length of the JSON "
                f"header, between 1 and the body's {len(body)} bytes"
            )
    header = parse_json(view[:json_end], "the inference request")
    if not isinstance(header, dict):
        raise invalid_input("the inference request must be a JSON object")
    request = pb.ModelInferRequest(model_name=model_name, model_version=version)
    request_id = header.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise invalid_input(f"'id' must be a string, got {type(request_id).__name__}")
        request.id = request_id
    parameters = _mapping(header.get("parameters"), "parameters")
    set_parameters(request.parameters, parameters)

    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid_input("'inputs' must be a non-empty list of tensors")
    offset = json_end
    # Past _MOST_PADDED_CHARS of text, every input's data is looked over anyway.
    booleans = json_end <= _MOST_PADDED_CHARS and _mentions_booleans(body, json_end)
    raw: list[bytes | memoryview] = []
    for tensor in inputs:
        offset = _add_input(request, raw, tensor, view, offset, settings, limits, booleans)
    if offset != len(body):
        raise invalid_input(
            f"the body has {len(body) - offset} bytes after the last input's binary data; "
            f"binary_data_size of the inputs adds up to {offset - json_end}"
        )

    binary_all = parameters.get("binary_data_output") is True
    outputs = header.get("outputs")
    if outputs is None:
        return RestRequest(
            request, None if binary_all else frozenset(), request_id is not None, raw
        )
    if not isinstance(outputs, list):
        raise invalid_input("'outputs' must be a list of requested outputs")
    binary: set[str] = set()
    for output in outputs:
        name = _add_output(request, output)
        options = _mapping(output.get("parameters"), f"parameters of output '{name}'")
        if options.get("binary_data", binary_all) is True:
            binary.add(name)
    return RestRequest(request, frozenset(binary), request_id is not None, raw)


def _mapping(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid_input(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def set_parameters(target: Any, parameters: Mapping[str, Any]) -> None:
    """Copy JSON parameters into a protobuf map of InferParameter; values that are not
    scalars are skipped, as unknown parameters are ignored rather than refused."""
    for name, value in parameters.items():
        if isinstance(value, bool):
            target[name].bool_param = value
        elif isinstance(value, int):
            if _INT64_RANGE[0] <= value <= _INT64_RANGE[1]:
                target[name].int64_param = value
            elif 0 <= value <= _UINT64_MAX:
                target[name].uint64_param = value
            else:
                raise invalid_input(f"parameter '{name}' is out of the 64-bit range: {value}")
        elif isinstance(value, float):
            target[name].double_param = value
        elif isinstance(value, str):
            target[name].string_param = value


def _add_input(
    request: pb.ModelInferRequest,
    raw: list[bytes | memoryview],
    tensor: object,
    body: memoryview,
    offset: int,
    settings: ModelSettings | None = None,
    limits: TensorLimits | None = None,
    booleans: bool = True,
) -> int:
    """Append one input tensor to `request` and its content to `raw`; returns where the
    next binary input starts. Without `booleans`, the body's JSON text holds no true or
    false."""
    if not isinstance(tensor, dict):
        raise invalid_input("each entry of 'inputs' must be a JSON object")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise invalid_input("an input has no 'name' string")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise invalid_input(f"input '{name}' has no 'datatype' string")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        type(dim) is int and _INT64_RANGE[0] <= dim <= _INT64_RANGE[1] for dim in shape
    ):
        shown = shown_shape(shape) if isinstance(shape, list) else repr(shape)
        raise invalid_input(f"input '{name}': 'shape' must be a list of integers, got {shown}")
    size = _mapping(tensor.get("parameters"), f"parameters of input '{name}'").get(
        "binary_data_size"
    )
    data = tensor.get("data")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    if size is not None:
        if data is not None:
            raise invalid_input(f"input '{name}' has both 'data' and binary_data_size; use one")
        if type(size) is not int or size < 0 or offset + size > len(body):
            raise invalid_input(
                f"input '{name}': binary_data_size {size!r} does not fit the "
                f"{len(body) - offset} bytes left in the body"
            )
        raw.append(body[offset : offset + size])
        return offset + size
    if data is None:
        raise invalid_input(f"input '{name}' has neither 'data' nor binary_data_size")
    if settings is not None:
        _check_declared(name, datatype, shape, settings)
    raw.append(_json_to_raw(name, datatype, shape, data, limits, len(body), booleans))
    return offset


def _check_declared(name: str, datatype: str, shape: list[int], settings: ModelSettings) -> None:
    """The input is one of the model's, of its datatype and rank (decode_request's words):
    the rank before the dimensions are multiplied, which takes time quadratic in it."""
    spec = settings.inputs_by_name.get(name)
    if spec is None:
        raise invalid_input(
            f"unknown input '{name}': model '{settings.name}' takes "
            + ", ".join(f"'{known}'" for known in settings.inputs_by_name)
        )
    expected = settings.client_shapes[name]
    if datatype != spec.datatype:
        raise invalid_input(
            f"input '{name}': expected {spec.datatype} {list(expected)}, "
            f"got {datatype} {shown_shape(shape)}"
        )
    if len(shape) != len(expected):
        expected_dims(spec, settings, shape)


def _add_output(request: pb.ModelInferRequest, output: object) -> str:
    if not isinstance(output, dict) or not isinstance(output.get("name"), str):
        raise invalid_input("each entry of 'outputs' must be a JSON object with a 'name'")
    name: str = output["name"]
    options = _mapping(output.get("parameters"), f"parameters of output '{name}'")
    added = request.outputs.add(name=name)
    if CLASSIFICATION_PARAMETER in options:
        # As over gRPC: a whole number as int64_param; anything else as text, for
        # decode_request to refuse in the same words.
        count = options[CLASSIFICATION_PARAMETER]
        parameter = added.parameters[CLASSIFICATION_PARAMETER]
        if type(count) is int and _INT64_RANGE[0] <= count <= _INT64_RANGE[1]:
            parameter.int64_param = count
        else:
            parameter.string_param = str(count)[:40]
    return name


def _json_to_raw(
    name: str,
    datatype: str,
    shape: list[int],
    data: object,
    limits: TensorLimits | None = None,
    text_bytes: int = 0,
    booleans: bool = True,
) -> bytes:
    """JSON `data` (flat, or nested as the shape) as raw bytes of `datatype`."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise invalid_input(
            f"input '{name}': unknown datatype '{datatype}'; expected one of "
            + ", ".join(NUMPY_DTYPES)
        )
    if not isinstance(data, list):
        data = [data]  # a scalar, as Triton accepts for a one-element tensor
    if any(dim < 0 for dim in shape):
        raise invalid_input(
            f"input '{name}': expected dimensions >= 0, got shape {shown_shape(shape)} "
            "with a negative dimension"
        )
    count = math.prod(shape)
    if datatype == "BYTES":
        if limits is not None:  # 4 MiB of "", took 330 MB before decode_request refused it
            check_bytes_count(name, shape, limits)
        elements = _flat_strings(name, data)
        if len(elements) != count:
            raise invalid_input(
                f"input '{name}' BYTES {shown_shape(shape)}: expected {count} values in "
                "'data', "
                f"got {len(elements)}"
            )
        return encode_bytes_elements(elements)
    if shape and len(data) not in (count, shape[0]):
        # Neither flat nor nested as the shape: refused before numpy walks it (a body of
        # 800,000 small lists took numpy 0.5 s on the event loop to find that out).
        if data and isinstance(data[0], list) and shape[0] != count:
            per_row = count // shape[0] if shape[0] else 0
            raise invalid_input(
                f"input '{name}' {datatype} {shown_shape(shape)}: expected "
                f"{_counted(shape[0], 'row')} "
                f"of {_counted(per_row, 'value')} in 'data' (nested as the shape) or "
                f"{count} values (flat), got {_counted(len(data), 'row')}"
            )
        raise invalid_input(
            f"input '{name}' {datatype} {shown_shape(shape)}: expected {count} values in 'data', "
            f"got {len(data)}"
        )
    numeric = dtype.kind != "b"
    if count * text_bytes > _MOST_PADDED_CHARS or (booleans and numeric):
        kinds = _leaf_types(data)
        if str in kinds:
            raise invalid_input(
                f"input '{name}' is {datatype}: 'data' must hold numbers, got strings"
            )
        if bool in kinds and numeric:
            # numpy reads true among numbers as 1 (Triton refuses it: a JSON boolean is
            # for BOOL only); all true/false is refused by _as_datatype.
            among = "" if kinds == {bool} else " among them"
            raise invalid_input(
                f"input '{name}' is {datatype}: 'data' must hold "
                f"{_WANTED[dtype.kind]}, got true/false{among}"
            )
    try:
        values = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise invalid_input(f"input '{name}': 'data' is not a regular array: {exc}") from exc
    if values.size != count:
        raise invalid_input(
            f"input '{name}' {datatype} {shown_shape(shape)}: expected {count} values in 'data', "
            f"got {values.size}"
        )
    return to_raw(_as_datatype(name, datatype, dtype, values, data).reshape(-1))


# numpy reads numbers with a string among them as strings, each padded to the longest (4
# bytes a character): 60,000 characters among 511 numbers took 123 MB. Past this many
# characters of padding at worst (count times the body's length), data is first looked
# over for strings, which costs about what numpy's own reading does. Below it, data is
# looked over (for true or false among numbers, which numpy reads as 1 and 0) only when
# the body's text holds a true or false somewhere.
_MOST_PADDED_CHARS = 4 * 1024 * 1024
_MOST_R_LOOKED_AT = 8
_WANTED = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}


def _leaf_types(data: list[Any]) -> set[type]:
    values: Iterable[Any] = data
    row = data
    while row and isinstance(row[0], list):  # nested as the shape: each level flattened
        row = row[0]
        values = chain.from_iterable(values)
    try:
        return set(map(type, values))
    except TypeError:  # a number where a row should be: ragged, which numpy refuses next
        return set()


def _mentions_booleans(text: bytes, end: int) -> bool:
    """Whether JSON text may hold true or false, by single-byte searches at memchr's
    speed (0.2 us for 3 KB, where looking for the two words takes 4 us): a request's keys
    and numbers hold no lowercase f, and an r only in a few keys ("parameters"), each one
    looked at; a body with more r's than that is looked over."""
    if text.find(b"f", 0, end) >= 0:
        return True
    at = text.find(b"r", 0, end)
    for _ in range(_MOST_R_LOOKED_AT):
        if at < 0:
            return False
        if text[max(at - 1, 0) : at + 3] == b"true":
            return True
        at = text.find(b"r", at + 1, end)
    return True


def _counted(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


# The largest finite FP16 and FP32 values, by element size.
_LARGEST = {size: float(np.finfo(f"f{size}").max) for size in (2, 4)}


def _as_datatype(
    name: str, datatype: str, dtype: np.dtype[Any], values: Array, data: object
) -> Array:
    """Numbers of the right kind, and in range, for the datatype; nothing is wrapped or
    truncated silently."""
    if values.size == 0:
        return values.astype(dtype)
    kind = values.dtype.kind
    if kind in "fO" and dtype.kind in "iu":
        # numpy reads integers beyond int64 mixed with others as float64 (or objects):
        # only UINT64 data meets this, and it needs the exact integers back.
        return _exact_integers(name, datatype, dtype, data)
    accepted = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if kind not in accepted:
        raise invalid_input(
            f"input '{name}' is {datatype}: 'data' must hold {_WANTED[dtype.kind]}, "
            f"got {_describe_kind(values)}"
        )
    if dtype.kind == "f" and dtype.itemsize < values.dtype.itemsize:
        # Checked before the cast, which would make them infinity (FP16 70000).
        largest = _LARGEST[dtype.itemsize]
        if float(np.abs(values).max()) > largest:
            raise invalid_input(
                f"input '{name}': values out of range for {datatype} (largest {largest:g})"
            )
    converted = values.astype(dtype)
    if dtype.kind in "iu" and not np.array_equal(converted, values):
        raise invalid_input(f"input '{name}': values out of range for {datatype}")
    return converted


def _exact_integers(name: str, datatype: str, dtype: np.dtype[Any], data: object) -> Array:
    """The slow path, element by element, for integer data that numpy reads as float64 or
    objects (integers beyond int64 mixed with others, which only UINT64 needs): each value
    must be a JSON integer within the datatype's range."""
    objects = np.array(data, dtype=object).reshape(-1)
    info = np.iinfo(dtype)
    for value in objects:
        if type(value) is not int:
            raise invalid_input(
                f"input '{name}' is {datatype}: 'data' must hold integers, "
                f"got {type(value).__name__}"
            )
        if not info.min <= value <= info.max:
            raise invalid_input(f"input '{name}': values out of range for {datatype}")
    return objects.astype(dtype)


def _describe_kind(values: Array) -> str:
    return {"b": "true/false", "U": "strings", "O": "mixed or out-of-range values"}.get(
        values.dtype.kind, f"{values.dtype} values"
    )


def _flat_strings(name: str, data: list[Any]) -> list[str]:
    """BYTES elements as JSON strings, flat or nested; element by element, as BYTES
    tensors are Python objects whatever the front door."""
    flat: list[str] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, str):
                raise invalid_input(
                    f"input '{name}' is BYTES: 'data' must hold strings, got "
                    f"{type(item).__name__}"
                )
            flat.append(item)
        else:
            stack.pop()
    return flat


# Responses --------------------------------------------------------------------------


def encode_infer(
    request: RestRequest,
    settings: ModelSettings,
    version: str,
    outputs: Mapping[str, Array],
    max_bytes: int | None = None,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it.
    With `max_bytes`, a body that may be larger is rendered a slice of each output at a
    time and refused (TOO_LARGE) as soon as it passes the limit: JSON text takes up to
    six times the floor that `answer_floor` checks before it, and rendered whole, a body
    to be refused would first take all of it."""
    binary_names = request.binary_outputs
    datatypes = settings.output_datatypes
    described: list[dict[str, Any]] = []
    chunks: list[bytes | memoryview] = []
    in_json: list[Array] = []
    # What the answer may take, at first with the widest element for every value.
    ceiling = _HEADER_CEILING + 6 * (len(settings.name) + len(version))
    for name, array in outputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatypes[name],
            "shape": array.shape,
        }
        if binary_names is None or name in binary_names:
            # Copied once, into the joined body.
            raw = raw_view(array) if array.nbytes >= RAW_VIEW_MIN_BYTES else to_raw(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
            ceiling += _OUTPUT_CEILING + 6 * len(name) + 21 * array.ndim + len(raw)
        else:
            entry["data"] = _json_data(array)
            in_json.append(array)
            ceiling += _OUTPUT_CEILING + 6 * len(name) + 21 * array.ndim + (
                json_ceiling(array) if array.dtype.kind in "OSU"
                else _MOST_ELEMENT_CHARS * array.size
            )
        described.append(entry)
    response: dict[str, Any] = {"model_name": settings.name, "model_version": version}
    if request.has_id:
        response["id"] = request.request.id
        ceiling += 6 * len(request.request.id)
    if (
        max_bytes is not None
        and ceiling > max_bytes
        and ceiling + sum(json_ceiling(a) - _MOST_ELEMENT_CHARS * a.size
                          for a in in_json if a.dtype.kind not in "OSU") > max_bytes
    ):
        header = _bounded_header(
            response, described, max_bytes - sum(map(len, chunks)), max_bytes
        )
    else:
        response["outputs"] = described
        header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join((header, *chunks)), len(header)


# What a JSON answer adds to its names, its id, its outputs' data and their shapes (20
# digits and a comma a dimension): its keys and punctuation, an output's datatype and
# parameters (generous bounds).
_HEADER_CEILING = 256
_OUTPUT_CEILING = 128
# Elements of an output rendered at a time when the answer may be over the limit.
JSON_SLICE = 65536
# The most bytes orjson writes for one element, comma included, by numpy kind and size:
# "-0.0000010003218" (FP32 and FP16), "-2.2250738585072014e-308", "-9223372036854775808",
# "false".
_FLOAT_CHARS = {2: 17, 4: 17, 8: 25}
_MOST_ELEMENT_CHARS = 33  # a float wider than 8 bytes


def json_ceiling(array: Array) -> int:
    """The most bytes of an output's `data` in a JSON answer, brackets included; a
    string element takes its quotes and at most six bytes per byte ("\\u001f")."""
    count = array.size
    dtype = array.dtype
    if dtype.kind in "OSU":
        return 6 * text_bytes(array) + 3 * count + 2
    per_element = _ELEMENT_CHARS.get(dtype)
    if per_element is None:
        per_element = _ELEMENT_CHARS[dtype] = _element_chars(dtype)
    return per_element * count + 2


_ELEMENT_CHARS: dict[np.dtype[Any], int] = {}


def _element_chars(dtype: np.dtype[Any]) -> int:
    if dtype.kind == "f":
        return _FLOAT_CHARS.get(dtype.itemsize, 33)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return max(len(str(info.min)), len(str(info.max))) + 1
    return 6  # "false,"


def _bounded_header(
    response: dict[str, Any], described: list[dict[str, Any]], max_bytes: int, limit: int
) -> bytes:
    """The JSON header `orjson.dumps` would write for `response` with `described` as its
    outputs, built a slice of data at a time; TOO_LARGE once it passes `max_bytes` (what
    the answer's `limit` leaves it beside the binary outputs)."""
    pieces: list[bytes] = []
    size = 0

    def add(piece: bytes) -> None:
        nonlocal size
        size += len(piece)
        if size > max_bytes:
            raise FerryError(
                ErrorKind.TOO_LARGE,
                f"the response of model '{response['model_name']}' is more than "
                f"{limit} bytes, {ANSWER_LIMIT}; ask for large outputs as binary data "
                "(binary_data_output)",
            )
        pieces.append(piece)

    head = dumps({**response, "outputs": []})
    add(head[: -len(b"]}")])
    for index, entry in enumerate(described):
        if index:
            add(b",")
        data = entry.pop("data", None)
        rendered = dumps(entry)
        if data is None:
            add(rendered)
            continue
        add(rendered[:-1] + b',"data":[')
        for start in range(0, len(data), JSON_SLICE):
            if start:
                add(b",")
            add(dumps(data[start : start + JSON_SLICE])[1:-1])
        add(b"]}")
    add(b"]}")
    return b"".join(pieces)


# The shortest JSON orjson writes for one element, by numpy kind: "0.0" for a float
# (never "0"), "true", a digit; every element but the last also has its comma.
_JSON_ELEMENT_CHARS = {"f": 3, "b": 4, "i": 1, "u": 1}


def json_floor(array: Array) -> int:
    """The fewest bytes of an output's `data` in a JSON answer, brackets aside: a string
    element takes its quotes and at least one byte per byte (an undecodable byte becomes
    U+FFFD, three) or per character."""
    count = array.size
    if count == 0:
        return 0
    kind = array.dtype.kind
    if kind in "OSU":
        return text_bytes(array) + 3 * count - 1
    return (_JSON_ELEMENT_CHARS.get(kind, 1) + 1) * count - 1


def answer_floor(request: RestRequest) -> OutputFloor:
    """The floor of each output of the answer to `request`: raw bytes for an output sent
    as binary data, JSON text for the others."""
    binary_names = request.binary_outputs

    def floor(name: str, array: Array) -> int:
        if binary_names is None or name in binary_names:
            kind = array.dtype.kind
            return text_bytes(array) + 4 * array.size if kind in "OSU" else array.nbytes
        return json_floor(array)

    return floor


def _json_data(array: Array) -> Any:
    if array.dtype.kind in "OSU":
        return [
            element.decode("utf-8", "replace") if isinstance(element, bytes) else element
            for element in array.reshape(-1).tolist()
        ]
    return np.ascontiguousarray(array).reshape(-1)  # orjson writes numpy arrays natively


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


# Protobuf messages as Triton's JSON --------------------------------------------------

_INT64_TYPES = frozenset({
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
})


def message_json(message: Message) -> dict[str, Any]:
    """A message as Triton writes it: proto field names, every field present, and 64-bit
    integers as JSON numbers (protobuf's own mapping writes them as strings, which
    perf_analyzer and tritonclient do not read)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(message.DESCRIPTOR, data)
    return data


def _int64_as_numbers(descriptor: Any, data: dict[str, Any]) -> None:
    for name, value in data.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            continue
        nested = field.message_type
        if nested is not None and nested.GetOptions().map_entry:
            value_field = nested.fields_by_name["value"]
            if value_field.message_type is not None:
                for item in value.values():
                    _int64_as_numbers(value_field.message_type, item)
            elif value_field.type in _INT64_TYPES:
                data[name] = {key: int(item) for key, item in value.items()}
        elif nested is not None:
            for item in value if isinstance(value, list) else (value,):
                _int64_as_numbers(nested, item)
        elif field.type in _INT64_TYPES:
            data[name] = [int(v) for v in value] if isinstance(value, list) else int(value)

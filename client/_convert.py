"""Between numpy and the protocol messages: requests out, responses and metadata in.

Shared by the sync and asyncio clients so that both read the wire the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from ferry.proto import codec
from ferry.proto import grpc_service_pb2 as pb

from .errors import FerryClientError
from .metadata import ModelMetadata, ServerMetadata, TensorMetadata

ParameterValue = bool | int | float | str

# Protobuf cannot serialize a message of 2 GiB or more. Without this check such a request
# was copied whole, then failed inside gRPC after 20 s, as DEADLINE_EXCEEDED.
MAX_REQUEST_BYTES = 2**31 - 1

_INT64 = range(-(2**63), 2**63)


def _text(what: str, value: object) -> str:
    # Protobuf turns None into "" and a number into a TypeError that names nothing.
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__} {value!r:.80}")
    return value


def _set_parameter(target: pb.InferParameter, key: str, value: ParameterValue) -> None:
    # bool before int: True is an int to Python, but a bool_param on the wire. numpy's
    # scalars (a value read from an array) count as the Python type they hold.
    if isinstance(value, (bool, np.bool_)):
        target.bool_param = bool(value)
    elif isinstance(value, (int, np.integer)):
        if int(value) not in _INT64:
            raise ValueError(f"parameter {key!r}: {value} does not fit in an int64")
        target.int64_param = int(value)
    elif isinstance(value, (float, np.floating)):
        target.double_param = float(value)
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise TypeError(
            f"parameter value {value!r:.80} (of {key!r}) is not a bool, int, float or str"
        )


def _input_array(name: str, value: npt.ArrayLike) -> npt.NDArray[Any]:
    if isinstance(value, np.ma.MaskedArray):
        # np.asarray drops the mask: what lies under a masked value would be sent.
        raise TypeError(
            f'input "{name}": a masked array cannot travel; fill it first (.filled(value))'
        )
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:  # ragged nested lists, mostly
        raise ValueError(f'input "{name}": not an array of one shape: {error}') from None
    if array.dtype.kind == "O":
        for index, element in enumerate(array.flat):
            # bytes(3) is three zero bytes: an int would travel as that, unnoticed.
            if not isinstance(element, (str, bytes, bytearray, memoryview)):
                raise TypeError(
                    f'input "{name}": an object array travels as BYTES, whose elements must '
                    f"be str or bytes; element {index} is {type(element).__name__} "
                    f"{element!r:.80}"
                )
    return array


def _raw_contents(name: str, array: npt.NDArray[Any]) -> bytes:
    try:
        return codec.to_raw(array)
    except UnicodeEncodeError as error:  # a lone surrogate, as from os.fsdecode
        flat = array.reshape(-1)
        index = next(i for i, e in enumerate(flat) if isinstance(e, str) and e == error.object)
        raise ValueError(
            f'input "{name}": element {index} is not valid Unicode text ({error.reason} '
            f"at {error.start}); pass bytes for data that is not text"
        ) from None


def _check_size(name: str, size: int, before: int) -> None:
    if before + size > MAX_REQUEST_BYTES:
        total = f" (with the inputs before it, {before + size} bytes)" if before else ""
        raise ValueError(
            f'input "{name}": {size} bytes{total} is over the {MAX_REQUEST_BYTES} bytes '
            "(2 GiB) one gRPC request can carry; send fewer rows per call"
        )


def infer_request(
    model: str,
    inputs: Mapping[str, npt.ArrayLike],
    outputs: Iterable[str] | None,
    *,
    version: str,
    request_id: str,
    parameters: Mapping[str, ParameterValue] | None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with every input in the raw encoding.

    Raises TypeError or ValueError, naming the input, for what the protocol cannot carry."""
    request = pb.ModelInferRequest(
        model_name=_text("model", model),
        model_version=_text("version", version),
        id=_text("request_id", request_id),
    )
    for key, parameter in (parameters or {}).items():
        _set_parameter(request.parameters[_text("a parameter name", key)], key, parameter)
    arrays: list[tuple[str, npt.NDArray[Any], str]] = []
    numeric_bytes = 0
    for name, value in inputs.items():
        _text("an input name", name)
        array = _input_array(name, value)
        try:
            datatype = codec.datatype_of(array)
        except ValueError as error:
            raise TypeError(f'input "{name}": {error}') from None
        if datatype != "BYTES":  # checked before any input is copied
            _check_size(name, array.nbytes, numeric_bytes)
            numeric_bytes += array.nbytes
        arrays.append((name, array, datatype))
    request_bytes = 0
    for name, array, datatype in arrays:
        raw = _raw_contents(name, array)
        _check_size(name, len(raw), request_bytes)
        request_bytes += len(raw)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(raw)
    for name in outputs or ():
        request.outputs.add(name=_text("an output name", name))
    return request


def _malformed(message: str) -> FerryClientError:
    return FerryClientError(grpc.StatusCode.INTERNAL, f"malformed response: {message}")


# No array of more bytes can exist (numpy's own limit); a shape past it is refused
# before numpy is asked, whose answer ("array is too big") named no output.
_MAX_ARRAY_BYTES = np.iinfo(np.intp).max


def _checked_shape(output: Any) -> tuple[int, ...]:
    """The output's shape, refused when no array can have it."""
    shape = tuple(output.shape)
    if min(shape, default=0) < 0:
        raise _malformed(f'output "{output.name}": shape {list(shape)} has a negative dimension')
    # Zero-size arrays count too: numpy multiplies every dimension, zeros aside.
    itemsize = codec.NUMPY_DTYPES[output.datatype].itemsize
    if math.prod(max(dim, 1) for dim in shape) * itemsize > _MAX_ARRAY_BYTES:
        raise _malformed(f'output "{output.name}": shape {list(shape)} is larger than any array')
    return shape


def _typed_contents(output: Any, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    datatype = output.datatype
    field = codec.CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise _malformed(f'output "{output.name}": {datatype} cannot travel as typed contents')
    values = getattr(output.contents, field)
    # Exact (no int64 product that wraps around to the count sent), and before any copy.
    if len(values) != math.prod(shape):
        raise _malformed(f'output "{output.name}": {len(values)} elements for shape {list(shape)}')
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:  # typed fields are wider than some datatypes (UINT8 travels as uint32)
        return np.array(values, dtype=codec.NUMPY_DTYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError) as error:
        raise _malformed(f'output "{output.name}": {datatype} values: {error}') from None


def check_response_of(
    response: pb.ModelInferResponse, request: pb.ModelInferRequest
) -> None:
    """Refuse an answer to another request: another model, version or request id.

    Fields a server leaves empty are not compared."""
    for what, sent, got in (
        ("model", request.model_name, response.model_name),
        ("version", request.model_version, response.model_version),
        ("request id", request.id, response.id),
    ):
        if sent and got and sent != got:
            raise _malformed(f"the answer is for {what} {got!r:.200}, not {sent!r:.200}")


def infer_outputs(
    response: pb.ModelInferResponse, requested: Iterable[str] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """The response's outputs by name (`requested`: those the request named, each of
    which must be there); numeric arrays are read-only views of the message."""
    results = _outputs(response)
    if len(results) != len(response.outputs):
        names = [output.name for output in response.outputs]
        twice = next(name for name in names if names.count(name) > 1)
        raise _malformed(f'output "{twice}" appears more than once')
    missing = [name for name in requested or () if name not in results]
    if missing:
        raise _malformed(
            "the requested output " + ", ".join(f'"{name}"' for name in missing)
            + " is missing; the response has " + (", ".join(f'"{n}"' for n in results) or "none")
        )
    return results


def _outputs(response: pb.ModelInferResponse) -> dict[str, npt.NDArray[Any]]:
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise _malformed(f"{len(raw)} raw contents for {len(response.outputs)} outputs")
    results: dict[str, npt.NDArray[Any]] = {}
    for index, output in enumerate(response.outputs):
        if output.datatype not in codec.NUMPY_DTYPES:
            raise _malformed(f'output "{output.name}": unknown datatype {output.datatype!r}')
        shape = _checked_shape(output)
        if raw:
            if output.contents.ByteSize():  # which one is the answer?
                raise _malformed(f'output "{output.name}": both raw and typed contents')
            try:
                results[output.name] = codec.from_raw(raw[index], output.datatype, shape)
            except ValueError as error:
                raise _malformed(f'output "{output.name}": {error}') from None
        else:
            results[output.name] = _typed_contents(output, shape)
    return results


def server_metadata(response: pb.ServerMetadataResponse) -> ServerMetadata:
    return ServerMetadata(
        name=response.name, version=response.version, extensions=tuple(response.extensions)
    )


def model_metadata(response: pb.ModelMetadataResponse) -> ModelMetadata:
    def tensors(items: Iterable[Any]) -> tuple[TensorMetadata, ...]:
        return tuple(
            TensorMetadata(name=t.name, datatype=t.datatype, shape=tuple(t.shape)) for t in items
        )

    return ModelMetadata(
        name=response.name,
        versions=tuple(response.versions),
        platform=response.platform,
        inputs=tensors(response.inputs),
        outputs=tensors(response.outputs),
    )

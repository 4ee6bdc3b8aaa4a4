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


def _set_parameter(target: pb.InferParameter, value: ParameterValue) -> None:
    # bool before int: True is an int to Python, but a bool_param on the wire.
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise TypeError(f"parameter value {value!r} is not a bool, int, float or str")


def infer_request(
    model: str,
    inputs: Mapping[str, npt.ArrayLike],
    outputs: Iterable[str] | None,
    *,
    version: str,
    request_id: str,
    parameters: Mapping[str, ParameterValue] | None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with every input in the raw encoding."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for key, parameter in (parameters or {}).items():
        _set_parameter(request.parameters[key], parameter)
    for name, value in inputs.items():
        array = np.asarray(value)
        try:
            datatype = codec.datatype_of(array)
        except ValueError as error:
            raise TypeError(f'input "{name}": {error}') from None
        if array.dtype.kind == "O" and not all(
            isinstance(element, (str, bytes, bytearray, memoryview)) for element in array.flat
        ):
            # bytes(3) is three zero bytes: an int would travel as that, unnoticed.
            raise TypeError(
                f'input "{name}": an object array travels as BYTES, whose elements must be '
                "str or bytes"
            )
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(codec.to_raw(array))
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def _malformed(message: str) -> FerryClientError:
    return FerryClientError(grpc.StatusCode.INTERNAL, f"malformed response: {message}")


def _typed_contents(output: Any) -> npt.NDArray[Any]:
    datatype = output.datatype
    field = codec.CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise _malformed(f'output "{output.name}": {datatype} cannot travel as typed contents')
    values = getattr(output.contents, field)
    shape = tuple(output.shape)
    # Exact (no int64 product that wraps around to the count sent), and before any copy.
    if min(shape, default=0) < 0 or len(values) != math.prod(shape):
        raise _malformed(f'output "{output.name}": {len(values)} elements for shape {list(shape)}')
    if datatype == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:  # typed fields are wider than some datatypes (UINT8 travels as uint32)
        return np.array(values, dtype=codec.NUMPY_DTYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError) as error:
        raise _malformed(f'output "{output.name}": {datatype} values: {error}') from None


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
        if raw:
            try:
                results[output.name] = codec.from_raw(raw[index], output.datatype, output.shape)
            except ValueError as error:
                raise _malformed(f'output "{output.name}": {error}') from None
        else:
            results[output.name] = _typed_contents(output)
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

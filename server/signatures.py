"""What a model's graph declares: its input and output tensors, read from the ONNX file.

Neutral ground between the model configuration and the runtime: it reads the graph with the
`onnx` package (no session is opened) and maps ONNX element types to protocol datatypes
through the protocol's own datatype table, so there is no second table to keep in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from ferry.proto.codec import NUMPY_DTYPES

from .errors import ErrorKind, FerryError

_DATATYPES_BY_DTYPE = {dtype: name for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"}


@dataclass(frozen=True, slots=True)
class TensorSignature:
    """A tensor as the graph declares it; -1 marks a dimension fixed only at run time."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GraphSignature:
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]


def datatype_of_element_type(element_type: int) -> str | None:
    """The protocol datatype of an ONNX element type, or None when it has none."""
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(element_type))
    except (KeyError, TypeError, ValueError):
        return None
    if element_type == onnx.TensorProto.STRING:
        return "BYTES"
    return _DATATYPES_BY_DTYPE.get(dtype.newbyteorder("<"))


def datatype_of_runtime_type(type_name: str) -> str | None:
    """The protocol datatype of a runtime type string such as 'tensor(float)', whose inner
    word is the ONNX element type's name in lower case."""
    if not (type_name.startswith("tensor(") and type_name.endswith(")")):
        return None
    try:
        element_type = onnx.TensorProto.DataType.Value(type_name[7:-1].upper())
    except ValueError:
        return None
    return datatype_of_element_type(element_type)


def read_signature(model_file: Path) -> GraphSignature:
    """The graph's inputs (initializers excluded) and outputs, without loading weights.

    Raises FerryError naming the file when it is not an ONNX model or declares a tensor
    whose type the protocol cannot carry.
    """
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except (DecodeError, OSError, ValueError) as exc:
        raise FerryError(
            ErrorKind.INVALID_INPUT,
            f"{model_file.name} is not an ONNX model (it does not parse as ModelProto: "
            f"{type(exc).__name__})",
        ) from exc
    graph = model.graph
    if not graph.output:
        raise FerryError(
            ErrorKind.INVALID_INPUT,
            f"{model_file.name} is not an ONNX model (its graph has no outputs)",
        )
    initializers = {tensor.name for tensor in graph.initializer}
    return GraphSignature(
        inputs=tuple(_tensor(v, model_file) for v in graph.input if v.name not in initializers),
        outputs=tuple(_tensor(v, model_file) for v in graph.output),
    )


def _tensor(value: onnx.ValueInfoProto, model_file: Path) -> TensorSignature:
    kind = value.type.WhichOneof("value")
    element_type = value.type.tensor_type.elem_type if kind == "tensor_type" else 0
    datatype = datatype_of_element_type(element_type) if element_type else None
    if datatype is None:
        described = (
            onnx.TensorProto.DataType.Name(element_type) if element_type else kind or "untyped"
        )
        raise FerryError(
            ErrorKind.INVALID_INPUT,
            f"{model_file.name}: tensor '{value.name}' has type {described}, which Ferry "
            "cannot serve",
        )
    dims = value.type.tensor_type.shape.dim
    shape = tuple(
        d.dim_value if d.WhichOneof("value") == "dim_value" and d.dim_value >= 0 else -1
        for d in dims
    )
    return TensorSignature(value.name, datatype, shape)

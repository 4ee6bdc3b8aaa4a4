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
    rank_known: bool = True  # False: the graph gives no shape at all, not even a rank


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
    # A graph may list one output twice (onnx.checker allows it); an answer carries it once.
    outputs: dict[str, onnx.ValueInfoProto] = {}
    for value in graph.output:
        outputs.setdefault(value.name, value)
    return GraphSignature(
        inputs=tuple(_tensor(v, model_file) for v in graph.input if v.name not in initializers),
        outputs=tuple(_tensor(v, model_file) for v in outputs.values()),
    )


def _what_to_do(kind: str | None) -> str:
    """For a tensor type Ferry cannot serve: how to export the model so that it can."""
    if kind in ("sequence_type", "map_type"):
        # sklearn classifiers' probabilities, as skl2onnx exports them by default
        return (
            "the protocol carries tensors only. A sequence of maps is sklearn's ZipMap: "
            "export the classifier without it (skl2onnx: to_onnx(model, X, "
            "options={'zipmap': False})) to get the probabilities as one tensor"
        )
    if kind == "optional_type":
        return "export the model with a plain tensor input instead of an optional one"
    return (
        "add a Cast node to a type the protocol carries (BFLOAT16 to FLOAT16 or FLOAT, say) "
        "and export the model again"
    )


def stored_bytes(model_file: Path, bound: int) -> int:
    """The bytes a model reads at load: its file and the external data files its weights
    are in (torch.onnx.export writes a large model's weights next to a small model.onnx).
    Once over `bound` the count stops: the file of a large model is not parsed."""
    size = model_file.stat().st_size
    if size > bound:
        return size
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except (DecodeError, OSError, ValueError):
        return size  # the load itself reports what is wrong with the file
    locations = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for location in locations:
        try:
            size += (model_file.parent / location).stat().st_size
        except (OSError, ValueError):
            pass  # a missing file: onnxruntime refuses the load, naming it
    return size


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
            f"cannot serve; {_what_to_do(kind)}",
        )
    dims = value.type.tensor_type.shape.dim
    shape = tuple(
        d.dim_value if d.WhichOneof("value") == "dim_value" and d.dim_value >= 0 else -1
        for d in dims
    )
    return TensorSignature(
        value.name, datatype, shape, rank_known=value.type.tensor_type.HasField("shape")
    )

"""Tiny ONNX models made on the fly for tests (the example model is the only committed one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity_model(path: Path, datatype: str, dims: tuple[int | str, ...] = ("batch", 4)) -> Path:
    """INPUT0 -> Identity -> OUTPUT0, of one datatype."""
    elem = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("INPUT0", elem, list(dims))],
        [helper.make_tensor_value_info("OUTPUT0", elem, list(dims))],
    )
    return _save(graph, path)


def mlp_model(
    path: Path, features: int = 16, hidden: int = 8, classes: int = 4, seed: int = 0
) -> Path:
    """x [batch, features] -> MatMul+Add -> Relu -> MatMul -> logits, plus softmax probs.

    Two outputs, so tests can ask for a subset.
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((features, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"]),
            helper.make_node("Add", ["h0", "b1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes]),
        ],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(b1, "b1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    return _save(graph, path)


def two_input_model(path: Path) -> Path:
    """a [batch, -1] + b [batch, -1] -> sum: the second dimension varies per request."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "n"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "n"]),
        ],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", "n"])],
    )
    return _save(graph, path)


def fixed_shape_model(path: Path) -> Path:
    """x [2, 3] -> Neg -> y: no variable first dimension, so it does not batch."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return _save(graph, path)


def write_config(model_folder: Path, text: str) -> Path:
    model_folder.mkdir(parents=True, exist_ok=True)
    path = model_folder / "config.pbtxt"
    path.write_text(text)
    return path


def spin_model(path: Path, offset: float = 0.0, features: int = 4) -> Path:
    """x [batch, features] -> y = x + offset, after spinning max(x) times through a Loop.

    The caller chooses how long a batch takes: zeros (warm-up) run at once, a row of 1e9
    keeps the instance busy for as long as a test needs. `offset` tells versions apart.
    Process-level tests use it where an in-process test would gate the executor.
    """
    state = 16
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["s_in", "w"], ["s_out"]),
        ],
        "spin_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [state, state]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [state, state]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["most"], keepdims=0),
            helper.make_node("Cast", ["most"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "", "s0"], ["s"], body=body),
            helper.make_node("ReduceSum", ["s"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["x", "offset"], ["shifted"]),
            helper.make_node("Add", ["shifted", "nothing"], ["y"]),
        ],
        "spin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        [
            numpy_helper.from_array(np.eye(state, dtype=np.float32), "s0"),
            numpy_helper.from_array(np.eye(state, dtype=np.float32), "w"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
            numpy_helper.from_array(np.array(offset, dtype=np.float32), "offset"),
        ],
    )
    return _save(graph, path)

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


def save_graph(graph: onnx.GraphProto, path: Path, check: bool = True) -> Path:
    """`graph` as a model file at `path` (its folders made); `check` runs onnx's checker,
    which wants every graph input shaped."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    if check:
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
    return save_graph(graph, path)


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
    return save_graph(graph, path)


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
    return save_graph(graph, path)


def fixed_shape_model(path: Path) -> Path:
    """x [2, 3] -> Neg -> y: no variable first dimension, so it does not batch."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return save_graph(graph, path)


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
    return save_graph(graph, path)


def slow_start_repository(root: Path) -> Path:
    """A repository whose one model `m` (spin_model) warms up for minutes: a server
    stays in its start-up for as long as a test needs."""
    spin_model(root / "m" / "1" / "model.onnx")
    write_config(root / "m", """
        max_batch_size: 1
        model_warmup [ { name: "long" batch_size: 1 inputs { key: "x" value {
            data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "spin" } } } ]
    """)
    (root / "m" / "warmup").mkdir()
    (root / "m" / "warmup" / "spin").write_bytes(np.full(4, 1e9, np.float32).tobytes())
    return root


def masked_encoder_model(
    path: Path,
    vocab: int = 64,
    width: int = 16,
    max_length: int = 256,
    layers: int = 1,
    seed: int = 0,
) -> Path:
    """A small transformer-style encoder over token ids that masks its padding.

    input_ids INT64 [batch, seq] and attention_mask INT64 [batch, seq] (1 real, 0 pad) ->
    token_states FP32 [batch, seq, width] and pooled FP32 [batch, width]. Embedding
    lookup plus learned positions; per layer, single-head self-attention whose keys are
    masked (an additive -1e9 on padded keys, so they get exactly zero weight), a residual
    and a tanh feed-forward; then the mean of the real tokens' states.
    """
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
        values = (rng.standard_normal(shape) * scale / np.sqrt(shape[0])).astype(np.float32)
        return numpy_helper.from_array(values, name)

    def const(name: str, values: object, dtype: type = np.float32) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, dtype=dtype), name)

    initializers = [
        weight("embedding", vocab, width, scale=float(np.sqrt(vocab))),
        weight("positions", max_length, width, scale=float(np.sqrt(max_length)) * 0.2),
        const("one_i", 1, np.int64),
        const("zero_i", 0, np.int64),
        const("axis_1", [1], np.int64),
        const("axis_2", [2], np.int64),
        const("one_f", 1.0),
        const("big_negative", -1e9),
        const("scale", 1.0 / np.sqrt(width)),
        const("tiny", 1e-9),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["embedding", "input_ids"], ["tokens"]),
        n("Shape", ["input_ids"], ["ids_shape"]),
        n("Gather", ["ids_shape", "one_i"], ["seq_len"]),
        n("Range", ["zero_i", "seq_len", "one_i"], ["position_ids"]),
        n("Gather", ["positions", "position_ids"], ["position_states"]),
        n("Add", ["tokens", "position_states"], ["h0"]),
        n("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["mask", "axis_1"], ["key_mask"]),  # [batch, 1, seq]
        n("Sub", ["one_f", "key_mask"], ["key_padding"]),
        n("Mul", ["key_padding", "big_negative"], ["key_bias"]),
    ]
    state = "h0"
    for layer in range(layers):
        p = f"l{layer}_"
        initializers += [
            weight(p + "wq", width, width),
            weight(p + "wk", width, width),
            weight(p + "wv", width, width),
            weight(p + "wo", width, width),
            weight(p + "w1", width, 2 * width),
            weight(p + "w2", 2 * width, width),
        ]
        nodes += [
            n("MatMul", [state, p + "wq"], [p + "q"]),
            n("MatMul", [state, p + "wk"], [p + "k"]),
            n("MatMul", [state, p + "wv"], [p + "v"]),
            n("Transpose", [p + "k"], [p + "kt"], perm=[0, 2, 1]),
            n("MatMul", [p + "q", p + "kt"], [p + "raw_scores"]),
            n("Mul", [p + "raw_scores", "scale"], [p + "scaled"]),
            n("Add", [p + "scaled", "key_bias"], [p + "scores"]),
            n("Softmax", [p + "scores"], [p + "attention"], axis=-1),
            n("MatMul", [p + "attention", p + "v"], [p + "context"]),
            n("MatMul", [p + "context", p + "wo"], [p + "projected"]),
            n("Add", [state, p + "projected"], [p + "mixed"]),
            n("MatMul", [p + "mixed", p + "w1"], [p + "hidden"]),
            n("Tanh", [p + "hidden"], [p + "activated"]),
            n("MatMul", [p + "activated", p + "w2"], [p + "ffn"]),
            n("Add", [p + "mixed", p + "ffn"], [p + "out"]),
        ]
        state = p + "out"
    nodes += [
        n("Identity", [state], ["token_states"]),
        n("Unsqueeze", ["mask", "axis_2"], ["token_mask"]),  # [batch, seq, 1]
        n("Mul", ["token_states", "token_mask"], ["masked_states"]),
        n("ReduceSum", ["masked_states", "axis_1"], ["state_sum"], keepdims=0),
        n("ReduceSum", ["mask", "axis_1"], ["token_count"], keepdims=1),
        n("Max", ["token_count", "tiny"], ["safe_count"]),
        n("Div", ["state_sum", "safe_count"], ["pooled"]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info(
                "token_states", TensorProto.FLOAT, ["batch", "seq", width]
            ),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", width]),
        ],
        initializers,
    )
    return save_graph(graph, path)

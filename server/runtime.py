"""The runtime: onnxruntime sessions that turn input arrays into output arrays.

Knows nothing of requests, batching or gRPC. One `OnnxInstance` is one session, used by
one worker thread at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ErrorKind, FerryError

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "Ferry needs an ONNX Runtime: install 'ferry-inference[cpu]' (onnxruntime) on a "
        "CPU machine or 'ferry-inference[gpu]' (onnxruntime-gpu) on an NVIDIA GPU machine"
    ) from exc

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]

# onnxruntime's type strings -> protocol datatypes.
ORT_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


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


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """How each session is built. Thread counts of 0 let onnxruntime choose."""

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization_level: int = 99  # onnxruntime's ORT_ENABLE_ALL
    # onnxruntime's intra-op threads spin while they wait for work by default; in a server
    # that spinning takes the cores the gRPC event loop needs (measured: about 20% fewer
    # requests per second on 2 cores with a small model), so it is off unless asked for.
    allow_spinning: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


def _signature(args: Sequence[Any]) -> tuple[TensorSignature, ...]:
    result = []
    for arg in args:
        datatype = ORT_DATATYPES.get(arg.type)
        if datatype is None:
            raise FerryError(
                ErrorKind.INTERNAL,
                f"tensor '{arg.name}' has type {arg.type}, which Ferry cannot serve",
            )
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
        result.append(TensorSignature(arg.name, datatype, shape))
    return tuple(result)


def default_intra_op_threads(instances: int) -> int:
    """Split the machine's cores between a model's instances, at least one each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, instances))


class OnnxInstance:
    """One onnxruntime session of a model file."""

    def __init__(self, model_path: Path, settings: SessionSettings) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0"
        )
        options.graph_optimization_level = ort.GraphOptimizationLevel(
            _optimization_level(settings.graph_optimization_level)
        )
        options.log_severity_level = 3  # errors only; load problems are reported by Ferry
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=list(settings.providers)
            )
        except Exception as exc:  # onnxruntime's own exception types, one per failure
            # The caller may see this message: name the file, not where it lives.
            reason = _first_line(exc).replace(str(model_path), model_path.name)
            raise FerryError(
                ErrorKind.INVALID_INPUT, f"onnxruntime cannot load {model_path.name}: {reason}"
            ) from exc
        self.signature = GraphSignature(
            inputs=_signature(self.session.get_inputs()),
            outputs=_signature(self.session.get_outputs()),
        )

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        try:
            values = self.session.run(list(output_names), dict(inputs))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise FerryError(ErrorKind.INTERNAL, f"onnxruntime: {_first_line(exc)}") from exc
        return dict(zip(output_names, values, strict=True))


def _optimization_level(level: int) -> int:
    """Map Triton's graph level (-1, 0, 1, 2...) or onnxruntime's (0, 1, 2, 99)."""
    if level < 0:
        return 0  # disabled
    return {0: 99, 1: 1, 2: 2}.get(level, 99)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Whether this machine can run a model on CUDA, asked once per test session: tests marked
`gpu` are skipped (with this reason) where it cannot, and machine-dependent expectations
branch on it instead of assuming a CPU-only machine."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import onnxruntime as ort

CUDA = "CUDAExecutionProvider"


@functools.cache
def gpu_unavailable_reason() -> str | None:
    """None when onnxruntime has CUDA and a session starts on GPU 0, else why not."""
    available = ort.get_available_providers()
    if CUDA not in available:
        return f"onnxruntime has no {CUDA} (available: {', '.join(available)})"
    from tests.models import identity_model  # onnx only where CUDA is worth trying

    with tempfile.TemporaryDirectory() as folder:
        model = identity_model(Path(folder) / "model.onnx", "FP32")
        try:
            session = ort.InferenceSession(
                str(model), providers=[(CUDA, {"device_id": "0"}), "CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            return f"{CUDA} did not start on GPU 0: {exc}"
    if CUDA not in session.get_providers():
        return f"{CUDA} did not start on GPU 0 (no device, or CUDA/cuDNN missing)"
    return None


def has_gpu() -> bool:
    return gpu_unavailable_reason() is None

"""Ferry's server: a dynamic-batching Open Inference Protocol server for ONNX models."""

__version__ = "0.1.0"

"""Where a model's sessions should run, as plain settings: instance groups, TensorRT and
CUDA graphs.

Read from the model configuration, acted on by the runtime's provider selection; neither
side imports the other, and nothing here imports onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InstanceGroup:
    """Triton's instance_group: `count` sessions, on each GPU listed for KIND_GPU."""

    kind: str = "KIND_CPU"  # KIND_CPU or KIND_GPU (KIND_AUTO is read as KIND_CPU)
    count: int = 1
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class TensorRtSettings:
    """The opt-in TensorRT execution provider (gpu_execution_accelerator "tensorrt")."""

    precision: str = "FP32"  # or FP16
    max_workspace_bytes: int = 0  # 0: onnxruntime's default
    engine_cache_path: str = ""  # a folder for built engines; "": no cache


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """Everything the runtime needs to place a model's sessions."""

    instance_groups: tuple[InstanceGroup, ...] = (InstanceGroup(),)
    tensorrt: TensorRtSettings | None = None
    cuda_graphs: bool = False

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


CPU_DEVICE = "cpu"


def gpu_device(gpu: int) -> str:
    return f"gpu{gpu}"


def device_keys(groups: tuple[InstanceGroup, ...]) -> tuple[str, ...]:
    """The devices a model's instances run on, as `--workers` names its executors: "cpu"
    for KIND_CPU groups, "gpuN" for each GPU of a KIND_GPU group (GPU 0 when none is
    listed, as the runtime places them). In first-seen order, each once."""
    keys: dict[str, None] = {}
    for group in groups:
        if group.kind != "KIND_GPU":
            keys[CPU_DEVICE] = None
            continue
        for gpu in group.gpus or (0,):
            keys[gpu_device(gpu)] = None
    return tuple(keys)


def on_device(settings: DeviceSettings, device: str) -> DeviceSettings:
    """Only the instances that run on `device` (a key of `device_keys`): what the executor
    process of that device creates. Empty groups when the model has none there."""
    kept: list[InstanceGroup] = []
    for group in settings.instance_groups:
        if group.kind != "KIND_GPU":
            if device == CPU_DEVICE:
                kept.append(group)
            continue
        gpus = tuple(gpu for gpu in group.gpus or (0,) if gpu_device(gpu) == device)
        if gpus:
            kept.append(InstanceGroup(group.kind, group.count, gpus))
    return DeviceSettings(tuple(kept), settings.tensorrt, settings.cuda_graphs)


def device_order(device: str) -> tuple[int, int]:
    """The CPU first, then GPUs by number: the first executor serves /metrics."""
    return (-1, 0) if device == CPU_DEVICE else (0, int(device.removeprefix("gpu")))

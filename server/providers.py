"""Where each session of a model runs: execution providers from the config, and the
fallback to the CPU when a GPU cannot be used.

`instance_group { kind: KIND_GPU gpus: [...] count }` puts `count` sessions on each listed
GPU (GPU 0 when none is listed), on CUDAExecutionProvider, behind TensorrtExecutionProvider
when the config opts in. When CUDA cannot be used (this onnxruntime has no CUDA provider,
or it does not start), the model loads on the CPU with one warning, or fails to load with
`--gpu-fallback fail`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .devices import DeviceSettings
from .errors import ErrorKind, FerryError
from .runtime import CPU_PROVIDER, ExecutionProvider, OnnxInstance, SessionSettings

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


class GpuFallback(enum.Enum):
    """What a KIND_GPU model does where CUDA cannot be used (`ferry serve --gpu-fallback`)."""

    CPU = "cpu"  # load on the CPU, with one warning
    FAIL = "fail"  # fail the load


@dataclass(frozen=True, slots=True)
class Placement:
    """One session: the GPU it runs on (None: the CPU) and its providers, in order."""

    gpu: int | None
    providers: tuple[ExecutionProvider, ...]


@dataclass(slots=True)
class Instances:
    """The sessions of one model version, and the warnings their creation raised."""

    instances: list[OnnxInstance]
    warnings: list[str]


def placements(settings: DeviceSettings) -> list[Placement]:
    """The sessions the config asks for, in instance-group order."""
    result: list[Placement] = []
    for group in settings.instance_groups:
        if group.kind != "KIND_GPU":
            result.extend(Placement(None, (CPU_PROVIDER,)) for _ in range(group.count))
            continue
        for gpu in group.gpus or (0,):
            result.extend(Placement(gpu, gpu_providers(settings, gpu)) for _ in range(group.count))
    return result


def gpu_providers(settings: DeviceSettings, gpu: int) -> tuple[ExecutionProvider, ...]:
    """TensorRT (when asked for), then CUDA, then the CPU for operators neither has."""
    device = ("device_id", str(gpu))
    graphs = settings.cuda_graphs
    cuda = ExecutionProvider(CUDA, (device, *((("enable_cuda_graph", "1"),) if graphs else ())))
    trt = settings.tensorrt
    if trt is None:
        return (cuda, CPU_PROVIDER)
    options = [device]
    if trt.precision == "FP16":
        options.append(("trt_fp16_enable", "True"))
    if trt.max_workspace_bytes:
        options.append(("trt_max_workspace_size", str(trt.max_workspace_bytes)))
    if trt.engine_cache_path:
        options.append(("trt_engine_cache_enable", "True"))
        options.append(("trt_engine_cache_path", trt.engine_cache_path))
    if graphs:
        options.append(("trt_cuda_graph_enable", "True"))
    return (ExecutionProvider(TENSORRT, tuple(options)), cuda, CPU_PROVIDER)


def create_instances(
    model_file: Path,
    settings: DeviceSettings,
    base: SessionSettings,
    fallback: GpuFallback,
    available: Sequence[str],
) -> Instances:
    """Create the sessions of `settings` on the devices it asks for, falling back to the
    CPU (or failing, per `fallback`) where a GPU provider is missing or does not start."""
    wanted = placements(settings)
    warnings: list[str] = []
    gpu_wanted = any(p.gpu is not None for p in wanted)
    cpu_only = False  # once CUDA has failed, the remaining GPU sessions go to the CPU too
    if gpu_wanted and CUDA not in available:
        reason = (
            f"this onnxruntime has no {CUDA} (available: {', '.join(available)}); "
            "install ferry-inference[gpu] (onnxruntime-gpu) instead of [cpu]"
        )
        cpu_only = _fall_back(reason, fallback, warnings)
    elif gpu_wanted and settings.tensorrt is not None and TENSORRT not in available:
        reason = f"this onnxruntime has no {TENSORRT}"
        _give_up_tensorrt(reason, fallback, warnings)
        settings = dataclasses.replace(settings, tensorrt=None)
        wanted = placements(settings)
    instances: list[OnnxInstance] = []
    for placement in wanted:
        if placement.gpu is None or cpu_only:
            instances.append(OnnxInstance(model_file, _on(base, (CPU_PROVIDER,), cpu=True)))
            continue
        instance, reason = _try_gpu(model_file, base, placement)
        if instance is not None and reason:  # CUDA started, TensorRT did not
            _give_up_tensorrt(reason, fallback, warnings)
        elif instance is None:
            cpu_only = _fall_back(reason, fallback, warnings)
            instance = OnnxInstance(model_file, _on(base, (CPU_PROVIDER,), cpu=True))
        instances.append(instance)
    return Instances(instances, warnings)


def _on(
    base: SessionSettings, providers: tuple[ExecutionProvider, ...], *, cpu: bool
) -> SessionSettings:
    return dataclasses.replace(base, providers=providers, cuda_graphs=base.cuda_graphs and not cpu)


def _try_gpu(
    model_file: Path, base: SessionSettings, placement: Placement
) -> tuple[OnnxInstance | None, str]:
    """A session on the placement's GPU, or None and why not. A session whose TensorRT
    did not start but CUDA did is kept, with the reason."""
    try:
        instance = OnnxInstance(model_file, _on(base, placement.providers, cpu=False))
    except FerryError as exc:
        return None, f"onnxruntime could not create a session on GPU {placement.gpu}: " + (
            exc.message
        )
    started = instance.providers
    if CUDA not in started:
        # onnxruntime carries on without a provider that fails to start (no device,
        # CUDA or cuDNN libraries missing); its own log has the details.
        return None, (
            f"{CUDA} did not start on GPU {placement.gpu} (no such device, or the CUDA or "
            "cuDNN libraries are missing)"
        )
    if placement.providers[0].name == TENSORRT and TENSORRT not in started:
        return instance, f"{TENSORRT} did not start on GPU {placement.gpu}"
    return instance, ""


def _fall_back(reason: str, fallback: GpuFallback, warnings: list[str]) -> bool:
    if fallback is GpuFallback.FAIL:
        raise FerryError(
            ErrorKind.UNAVAILABLE,
            f"the config asks for a GPU but {reason} (--gpu-fallback fail)",
        )
    if not any(w.startswith("GPU instances run on the CPU") for w in warnings):
        warnings.append(f"GPU instances run on the CPU: {reason}")
    return True


def _give_up_tensorrt(reason: str, fallback: GpuFallback, warnings: list[str]) -> None:
    if fallback is GpuFallback.FAIL:
        raise FerryError(
            ErrorKind.UNAVAILABLE,
            f"the config asks for TensorRT but {reason} (--gpu-fallback fail)",
        )
    if not any(w.startswith("TensorRT is not used") for w in warnings):
        warnings.append(f"TensorRT is not used, CUDA alone runs the model: {reason}")

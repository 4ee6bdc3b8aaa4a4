"""Loading one model: from its source on disk to schedulers that take requests.

For each version its policy selects: derive the settings from the graph and the config
(read once, by the repository), create the onnxruntime sessions on the devices the config
asks for, warm each one up, then wrap them in a scheduler with its statistics. Sessions
are built and warmed on worker threads, so a slow load never stalls other models.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ferry.proto.codec import NUMPY_DTYPES

from .batching import BatchPolicy
from .classification import read_labels
from .config import ConfigError, ModelSettings, TensorSpec, check_onnx_backend, settings_from
from .devices import on_device
from .errors import FerryError
from .executor import BatchExecutor, InstanceExecutor, Runner, RunOnly
from .loaded_model import LoadedModel
from .outcomes import OutcomeObserver
from .padding import (
    PADDING_OUTPUTS_PARAMETER,
    PROBE_LENGTHS,
    PaddingConfigError,
    check_output_axes,
    probe_output_axes,
)
from .providers import GpuFallback, create_instances, placements
from .repository import ModelSource
from .reshaping import ReshapingInstance, has_reshape, model_dims
from .rows import Array, Tensors
from .runtime import (
    SessionSettings,
    available_providers,
    calibrated_intra_op_threads,
    default_intra_op_threads,
)
from .scheduler import BatchObserver, ModelScheduler
from .signatures import read_signature
from .stats import ModelStatistics
from .warmup import bucket_samples, sample_arrays, warm_up

log = logging.getLogger(__name__)

BatchObserverFactory = Callable[[str, str], Sequence[BatchObserver]]
# Tests wrap each instance (to hold it still, or count its batches); a wrapper has `run`.
InstanceWrapper = Callable[[str, "Instance"], Runner]


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How every model of a server is loaded."""

    gpu_fallback: GpuFallback = GpuFallback.CPU
    session_threads: int = 0  # 0: default_intra_op_threads decides
    max_run_memory: int = 0  # bytes for the runs of every CPU session together; 0: no limit
    clock: Callable[[], float] = time.monotonic
    batch_observers_for: BatchObserverFactory = lambda name, version: ()
    request_observers: tuple[OutcomeObserver, ...] = ()
    wrap_instance: InstanceWrapper | None = field(default=None)
    # The executor process of one device (`--workers` with several devices): only the
    # instances on it. None: every instance the config asks for.
    device: str | None = None


class Instance(Runner, Protocol):
    """A model instance as loading hands it on: an OnnxInstance, or one reshaping its
    tensors (server/reshaping.py)."""

    device: str
    device_id: int

    @property
    def may_run_on_loop(self) -> bool: ...

    def run_batch(
        self, parts: Sequence[Mapping[str, Array]], rows: int, output_names: Sequence[str]
    ) -> tuple[Tensors, int]: ...


def build_sessions(
    source: ModelSource, version: int, options: LoadOptions
) -> tuple[ModelSettings, list[Instance]]:
    """The settings and the sessions of one version (runs on a worker thread)."""
    config = source.config
    model_file = source.versions[version]
    settings = settings_from(
        source.name,
        read_signature(model_file),
        config.message if config else None,
        config.set_fields if config else set(),
        config.warnings if config else [],
    )
    if any(spec.label_filename for spec in settings.outputs):
        try:
            labels = read_labels(source.folder, settings)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        settings = dataclasses.replace(settings, labels=labels)
    devices = settings.devices
    if options.device is not None:
        devices = on_device(devices, options.device)
        if not devices.instance_groups:
            raise ConfigError(f"no instance_group of the config runs on {options.device}")
    where = placements(devices)
    threads = options.session_threads or default_intra_op_threads(len(where))
    session_settings = SessionSettings(
        intra_op_threads=threads,
        graph_optimization_level=settings.graph_optimization_level,
        max_batch_size=settings.max_batch_size,
        io_binding=settings.io_binding,
        batch_buckets=settings.batch_buckets,
        cuda_graphs=settings.cuda_graphs,
        max_run_memory=options.max_run_memory,
    )
    if not options.session_threads and all(p.gpu is None for p in where):
        # Automatic threads on the CPU: as many as the cores allow, unless the model is so
        # small that one thread runs it faster.
        chosen = calibrated_intra_op_threads(
            model_file, session_settings, _calibration_samples(settings), settings.output_names
        )
        session_settings = dataclasses.replace(session_settings, intra_op_threads=chosen)
    created = create_instances(
        model_file, devices, session_settings, options.gpu_fallback, available_providers()
    )
    if created.warnings:
        settings = dataclasses.replace(settings, warnings=(*settings.warnings, *created.warnings))
    instances: list[Instance] = list(created.instances)
    if has_reshape(settings):
        instances = [ReshapingInstance(instance, settings) for instance in instances]
    check_batch_rows(settings, instances[0])
    return with_output_axes(settings, instances[0]), instances


def check_batch_rows(settings: ModelSettings, instance: Runner) -> None:
    """A batching model must answer one output row per input row, since each caller gets
    its own rows back: run two zero rows through it once, and refuse the load of a model
    whose output's first dimension is something else (a sum over the batch, a list of
    detections) rather than fail every batch of its callers."""
    if not settings.batchable:
        return
    inputs = [(spec.name, spec.datatype, spec.dims) for spec in settings.inputs]
    samples = bucket_samples([2], inputs)
    if not samples or _row_bytes(inputs) > CALIBRATION_MAX_SAMPLE_BYTES:
        return  # a dimension known only at run time, or rows too large to try
    try:
        outputs = instance.run(sample_arrays(samples[0]), settings.output_names)
    except FerryError as exc:  # a model that refuses zeros: its callers' rows will tell
        log.debug("model '%s': not checking its batch rows: %s", settings.name, exc.message)
        return
    for name, value in outputs.items():
        if value.shape[:1] != (2,):
            raise ConfigError(
                f"output '{name}' has shape {list(value.shape)} for a batch of 2 rows: its "
                "first dimension does not follow the batch, so requests cannot share a "
                "run; set max_batch_size: 0 in the model's config.pbtxt to serve it "
                "unbatched"
            )


def with_output_axes(settings: ModelSettings, instance: Runner) -> ModelSettings:
    """A padding model whose config does not say which outputs follow the padded axis:
    find them by running the model on two lengths; one whose config names them: check
    them the same way."""
    padding = settings.padding
    if padding is None:
        return settings
    inputs = [(t.name, t.datatype, t.dims) for t in settings.inputs]
    named = padding.outputs is not None
    try:
        if named:
            check_output_axes(instance, padding, inputs, settings.output_names)
            return settings
        axes = probe_output_axes(instance, padding, inputs, settings.output_names)
    except PaddingConfigError as exc:
        raise ConfigError(str(exc)) from None
    except FerryError as exc:
        if named:
            # A model that cannot run on the probe's inputs is taken at its word: a config
            # names the outputs for such a model.
            log.warning(
                "model '%s': running it on inputs of lengths %s to check parameter %s "
                "failed (%s); the outputs it names are cut back as given",
                settings.name, PROBE_LENGTHS, PADDING_OUTPUTS_PARAMETER, exc.message,
            )
            return settings
        raise ConfigError(
            f"running the model on inputs of lengths {PROBE_LENGTHS} to find the outputs "
            f"that follow the padded axis failed ({exc.message}); name them in parameter "
            f"{PADDING_OUTPUTS_PARAMETER}"
        ) from None
    log.info("model '%s': outputs cut back to each request's length: %s", settings.name, axes)
    return dataclasses.replace(settings, padding=dataclasses.replace(padding, outputs=axes))


# The thread calibration runs its samples some thirty times: a full batch larger than
# this (a max_batch_size of 2**31-1, or wide dims) is cut to the rows that fit, and a
# model whose one row is larger is not calibrated at all.
CALIBRATION_MAX_SAMPLE_BYTES = 16 * 1024 * 1024


def _calibration_samples(settings: ModelSettings) -> list[dict[str, Array]]:
    """Zero inputs of one row and of a full batch (or as many rows as fit the bound);
    none when a non-batch dimension is only known at run time (no shape to try it
    with), or when one row is over the bound."""
    inputs = model_dims(settings.inputs)  # run by sessions of their own: no reshape
    if any(-1 in dims for _, _, dims in inputs):
        return []
    row_bytes = _row_bytes(inputs)
    if row_bytes > CALIBRATION_MAX_SAMPLE_BYTES:
        return []
    rows = min(settings.max_batch_size, CALIBRATION_MAX_SAMPLE_BYTES // max(1, row_bytes))
    sizes = [1, rows] if settings.batchable else [0]
    return [sample_arrays(sample) for sample in bucket_samples(sorted(set(sizes)), inputs)]


def _row_bytes(inputs: Sequence[tuple[str, str, tuple[int, ...]]]) -> int:
    """The bytes of one row of fixed-shape inputs (a BYTES element counted as 8)."""
    return sum(
        math.prod(dims) * (8 if datatype == "BYTES" else NUMPY_DTYPES[datatype].itemsize)
        for _, datatype, dims in inputs
    )


def policy_for(settings: ModelSettings) -> BatchPolicy:
    return BatchPolicy(
        max_batch_size=max(1, settings.max_batch_size),
        max_queue_delay_s=settings.max_queue_delay_s,
        preferred_batch_sizes=settings.preferred_batch_sizes,
        max_queue_size=settings.max_queue_size,
        priority_levels=settings.priority_levels,
        priority_aging_s=settings.priority_aging_s if settings.priority_levels > 1 else None,
        padding=settings.padding.buckets if settings.padding is not None else None,
        adaptive_delay_s=settings.adaptive_queue_delay_s,
    )


def describe(settings: ModelSettings, version: str, devices: Sequence[str] = ()) -> str:
    """One log line: tensors, shapes, datatypes and batching settings."""

    def tensors(specs: Sequence[TensorSpec]) -> str:
        return ", ".join(f"{s.name} {s.datatype} {settings.client_shape(s)}" for s in specs)

    adaptive = (
        f" (adaptive up to {settings.adaptive_queue_delay_s * 1e6:.0f}us)"
        if settings.max_queue_delay_s == 0 and settings.adaptive_queue_delay_s > 0
        else ""
    )
    batching = (
        f"max_batch_size={settings.max_batch_size} "
        f"max_queue_delay={settings.max_queue_delay_s * 1e6:.0f}us{adaptive} "
        f"preferred={list(settings.preferred_batch_sizes)} "
        f"max_queue_size={settings.max_queue_size}"
        if settings.batchable
        else "no batching"
    )
    return (
        f"model '{settings.name}' version {version} ready: inputs [{tensors(settings.inputs)}] "
        f"outputs [{tensors(settings.outputs)}]; {batching}; "
        + (
            f"instances={len(devices)} on {', '.join(sorted(set(devices)))}"
            if devices
            else f"instances={settings.instance_count} ({settings.instance_kind})"
        )
        + (f"; batch buckets {list(settings.batch_buckets)}" if settings.batch_buckets else "")
        + (f"; {settings.padding.describe()}" if settings.padding is not None else "")
    )


async def load_versions(source: ModelSource, options: LoadOptions) -> dict[str, LoadedModel]:
    """Every version the source's policy selects, ready to take requests."""
    if source.config is not None:
        check_onnx_backend(source.config.message)
    versions = source.selected_versions()
    if not versions:
        found = f"; {'; '.join(source.misplaced)}" if source.misplaced else ""
        raise ConfigError(
            f"no version folder with a model file in {source.folder} "
            f"(expected {source.folder}/<version>/{source.filename}){found}"
        )
    loaded: dict[str, LoadedModel] = {}
    try:
        for number in versions:
            # The config's warnings once per model, not once per version.
            model = await _load_version(source, number, options, warn=not loaded)
            loaded[model.version] = model
    except BaseException:
        # A later version failed (or the load was cancelled): the versions already built
        # never serve, so their sessions and threads go now.
        await asyncio.gather(*(model.scheduler.close(0) for model in loaded.values()))
        raise
    return loaded


async def _load_version(
    source: ModelSource, number: int, options: LoadOptions, warn: bool = True
) -> LoadedModel:
    loop = asyncio.get_running_loop()
    settings, instances = await loop.run_in_executor(
        None, build_sessions, source, number, options
    )
    version = str(number)
    for warning in settings.warnings if warn else ():
        log.warning("model '%s': %s", source.name, warning)
    devices = [f"{i.device}:{i.device_id}" if i.device != "cpu" else "cpu" for i in instances]
    wrap = options.wrap_instance
    runners: Sequence[Runner] = (
        [wrap(source.name, instance) for instance in instances] if wrap else instances
    )
    padding = settings.padding
    executors: list[BatchExecutor] = [
        InstanceExecutor(RunOnly(runner), batchable=settings.batchable, padding=padding)
        for runner in runners
    ] if wrap else [
        InstanceExecutor(instance, batchable=settings.batchable, padding=padding)
        for instance in instances
    ]
    if settings.warmup:
        # Before the model is registered: it reports ready only once every instance has
        # run its warm-up.
        await asyncio.gather(
            *(
                loop.run_in_executor(
                    None, warm_up, source.name, runner, settings.warmup,
                    settings.output_names, source.folder,
                )
                for runner in runners
            )
        )
    stats = ModelStatistics(source.name, version)
    scheduler = ModelScheduler(
        source.name,
        policy_for(settings),
        executors,
        settings.output_names,
        batchable=settings.batchable,
        clock=options.clock,
        observers=(stats, *options.batch_observers_for(source.name, version)),
    )
    scheduler.start()
    log.info(describe(settings, version, devices))
    return LoadedModel(
        source.name, version, settings, scheduler, stats,
        observers=(stats, *options.request_observers),
    )

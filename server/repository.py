"""The model repository: Triton's folder layout on disk, and the models loaded from it.

Layout: `<repository>/<model>/<version>/model.onnx`, with an optional
`<repository>/<model>/config.pbtxt`; or a single `model.onnx` served as version 1 of a
model named after the file. Loading builds the sessions on a worker thread, so a slow
load never stalls requests to other models.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format

from ferry.proto import model_config_pb2 as mc

from .batching import BatchPolicy
from .config import (
    DEFAULT_MODEL_FILENAME,
    ConfigError,
    ModelSettings,
    TensorSpec,
    read_config_file,
    settings_from,
)
from .errors import ErrorKind, FerryError, not_found
from .providers import GpuFallback, create_instances, placements
from .runtime import OnnxInstance, SessionSettings, available_providers, default_intra_op_threads
from .scheduler import BatchObserver, Instance, ModelScheduler
from .security import public_message
from .stats import ModelStatistics
from .warmup import warm_up

log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where one model's files are."""

    name: str
    folder: Path
    config_path: Path | None
    versions: dict[int, Path]  # version -> model file


@dataclass(slots=True)
class LoadedModel:
    name: str
    version: str
    settings: ModelSettings
    scheduler: ModelScheduler
    stats: ModelStatistics


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: ModelState
    reason: str = ""


class ModelRepository:
    """Finds models on disk; knows nothing of sessions."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.single_file = self.path.is_file()
        if not self.path.exists():
            raise FileNotFoundError(f"model repository {path} does not exist")

    def model_names(self) -> list[str]:
        if self.single_file:
            return [self.path.stem]
        return sorted(
            p.name for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def locate(self, name: str) -> ModelSource:
        if self.single_file:
            if name != self.path.stem:
                raise not_found(f"unknown model '{name}'")
            return ModelSource(name, self.path.parent, None, {1: self.path})
        folder = self._model_folder(name)
        config_path = folder / "config.pbtxt"
        self._check_inside(name, config_path)
        filename = DEFAULT_MODEL_FILENAME
        if config_path.is_file():
            config, _, _ = read_config_file(config_path)
            filename = config.default_model_filename or filename
        versions = {
            int(p.name): p / filename
            for p in folder.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / filename).is_file()
        }
        for path in versions.values():
            self._check_inside(name, path)
        return ModelSource(name, folder, config_path if config_path.is_file() else None, versions)

    def _check_inside(self, name: str, path: Path) -> None:
        """Refuse a model file or config that is a symlink out of the repository."""
        if path.exists() and not path.resolve().is_relative_to(self.path):
            raise FerryError(
                ErrorKind.INVALID_INPUT,
                f"model '{name}': {path.relative_to(self.path)} resolves outside the "
                "model repository",
            )

    def _model_folder(self, name: str) -> Path:
        """The folder of a model, refusing names that would leave the repository."""
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise FerryError(ErrorKind.INVALID_INPUT, f"invalid model name {name!r}")
        folder = self.path / name
        resolved = folder.resolve()
        if resolved.parent != self.path:
            raise FerryError(
                ErrorKind.INVALID_INPUT,
                f"model '{name}' resolves outside the model repository",
            )
        if not folder.is_dir():
            raise not_found(f"model '{name}' is not in the model repository")
        return folder


@contextlib.contextmanager
def _with_config(source: ModelSource, config_json: str | None) -> Iterator[ModelSource]:
    """The source with its config.pbtxt replaced by a JSON override (Triton's load 'config'
    parameter), written to a private temporary file for the length of one load."""
    if config_json is None:
        yield source
        return
    try:
        config = json_format.Parse(config_json, mc.ModelConfig())
    except json_format.ParseError as exc:
        raise ConfigError(f"load parameter 'config' is not a JSON ModelConfig: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="ferry-config-") as folder:
        path = Path(folder) / "config.pbtxt"
        path.write_text(text_format.MessageToString(config), encoding="utf-8")
        yield dataclasses.replace(source, config_path=path)


def _select_versions(source: ModelSource, config: mc.ModelConfig | None) -> list[int]:
    available = sorted(source.versions)
    policy = config.version_policy if config is not None else mc.ModelVersionPolicy()
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        missing = [v for v in policy.specific.versions if v not in source.versions]
        if missing:
            raise ConfigError(f"version_policy names versions {missing} that have no model file")
        return sorted(policy.specific.versions)
    count = policy.latest.num_versions if choice == "latest" else 1
    return available[-max(1, count) :]


def build_model(
    source: ModelSource,
    version: int,
    gpu_fallback: GpuFallback = GpuFallback.CPU,
    session_threads: int = 0,
) -> tuple[ModelSettings, list[OnnxInstance]]:
    """Read the config and create the sessions of one version (runs on a worker thread)."""
    config, set_fields, warnings = (
        read_config_file(source.config_path) if source.config_path else (None, set(), [])
    )
    model_file = source.versions[version]
    first = OnnxInstance(model_file, SessionSettings())
    settings = settings_from(source.name, first.signature, config, set_fields, warnings)
    session_settings = SessionSettings(
        intra_op_threads=session_threads or default_intra_op_threads(len(placements(settings))),
        graph_optimization_level=settings.graph_optimization_level,
        max_batch_size=settings.max_batch_size,
        io_binding=settings.io_binding,
        batch_buckets=settings.batch_buckets,
        cuda_graphs=settings.cuda_graphs,
    )
    created = create_instances(
        model_file, settings, session_settings, gpu_fallback, available_providers()
    )
    if created.warnings:
        settings = dataclasses.replace(settings, warnings=(*settings.warnings, *created.warnings))
    return settings, created.instances


def policy_for(settings: ModelSettings) -> BatchPolicy:
    return BatchPolicy(
        max_batch_size=max(1, settings.max_batch_size),
        max_queue_delay_s=settings.max_queue_delay_s,
        preferred_batch_sizes=settings.preferred_batch_sizes,
        max_queue_size=settings.max_queue_size,
        priority_levels=settings.priority_levels,
        priority_aging_s=settings.priority_aging_s if settings.priority_levels > 1 else None,
    )

ObserverFactory = Callable[[str, str], Sequence[BatchObserver]]


def describe(settings: ModelSettings, version: str, devices: Sequence[str] = ()) -> str:
    """One log line: tensors, shapes, datatypes and batching settings."""

    def tensors(specs: Sequence[TensorSpec]) -> str:
        return ", ".join(f"{s.name} {s.datatype} {settings.input_shape(s)}" for s in specs)

    batching = (
        f"max_batch_size={settings.max_batch_size} "
        f"max_queue_delay={settings.max_queue_delay_s * 1e6:.0f}us "
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
    )


class ModelManager:
    """The models being served, by name and version, and their load/unload lifecycle."""

    def __init__(
        self,
        repository: ModelRepository,
        observers_for: ObserverFactory = lambda name, version: (),
        drain_grace_s: float = 30.0,
        wrap_instance: Callable[[str, Instance], Instance] | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
        gpu_fallback: GpuFallback = GpuFallback.CPU,
        session_threads: int = 0,
    ) -> None:
        self.repository = repository
        self._session_threads = session_threads  # 0: default_intra_op_threads decides
        self._gpu_fallback = gpu_fallback
        self._observers_for = observers_for
        self._wrap_instance = wrap_instance
        self._on_change = on_change
        self._drain_grace_s = drain_grace_s
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._failures: dict[str, str] = {}
        self._states: dict[str, ModelState] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing = False
        self._closing_schedulers: list[ModelScheduler] = []

    @property
    def models(self) -> dict[str, dict[str, LoadedModel]]:
        return self._models

    async def load_all(self, names: Sequence[str] | None = None) -> None:
        """Load these models (None: every model of the repository)."""
        for name in self.repository.model_names() if names is None else names:
            try:
                await self.load(name)
            except FerryError:
                pass  # logged and recorded in the index; the other models still serve

    def all_ready(self) -> bool:
        """Every model asked for at start is loaded, and at least one is: a server with no
        model to serve is not ready, even in explicit mode before its first load."""
        return bool(self._models) and not self._failures

    def get(self, name: str, version: str = "") -> LoadedModel:
        if self._closing:
            raise FerryError(ErrorKind.UNAVAILABLE, "server is shutting down")
        versions = self._models.get(name)
        if not versions:
            if name in self._failures:
                raise FerryError(
                    ErrorKind.UNAVAILABLE,
                    f"model '{name}' is not loaded: {self._failures[name]}",
                )
            raise not_found(f"unknown model '{name}'")
        if not version:
            return versions[max(versions, key=int)]
        model = versions.get(version)
        if model is None:
            raise not_found(
                f"model '{name}' has no version '{version}'; available: "
                f"{', '.join(sorted(versions, key=int))}"
            )
        return model

    def index(self) -> list[IndexEntry]:
        entries: list[IndexEntry] = []
        names = set(self.repository.model_names()) | set(self._models) | set(self._failures)
        for name in sorted(names):
            if name in self._models:
                entries.extend(
                    IndexEntry(name, version, ModelState.READY)
                    for version in sorted(self._models[name], key=int)
                )
            elif name in self._failures:
                entries.append(IndexEntry(name, "", ModelState.UNAVAILABLE, self._failures[name]))
            else:
                state = self._states.get(name, ModelState.UNAVAILABLE)
                reason = "" if state is not ModelState.UNAVAILABLE else "not loaded"
                entries.append(IndexEntry(name, "", state, reason))
        return entries

    async def load(self, name: str, config_override: str | None = None) -> None:
        """Load (or reload) a model; on failure the running versions keep serving.
        `config_override` is a JSON ModelConfig used instead of config.pbtxt."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            self._states[name] = ModelState.LOADING
            try:
                source = self.repository.locate(name)
                with _with_config(source, config_override) as source:
                    loaded = await self._build_versions(source)
            except (FerryError, ConfigError, OSError, RuntimeError, ValueError) as exc:
                detail = exc.message if isinstance(exc, FerryError) else str(exc)
                where = self.repository.path / name
                log.error("model '%s' (%s) failed to load: %s", name, where, detail)
                # callers see paths relative to the repository, and no others
                reason = public_message(detail, self.repository.path)
                if name in self._models:
                    self._states[name] = ModelState.READY
                elif name in self.repository.model_names():
                    self._failures[name] = reason
                    self._states[name] = ModelState.UNAVAILABLE
                else:
                    # not a model of the repository (a typo, '../x'): it leaves no trace,
                    # neither in the index nor in the server's readiness
                    self._states.pop(name, None)
                kind = exc.kind if isinstance(exc, FerryError) else ErrorKind.INVALID_INPUT
                await self._changed()
                raise FerryError(kind, f"model '{name}' failed to load: {reason}") from exc
            previous = self._models.get(name, {})
            self._models[name] = loaded
            self._failures.pop(name, None)
            self._states[name] = ModelState.READY
            for model in previous.values():
                self._retire(model)
        await self._changed()

    async def unload(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            versions = self._models.pop(name, None)
            self._failures.pop(name, None)
            if versions is None:
                raise not_found(f"model '{name}' is not loaded")
            self._states[name] = ModelState.UNAVAILABLE
            for model in versions.values():
                self._retire(model)
            log.info("model '%s' unloaded", name)
        await self._changed()

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    async def close(self, grace_s: float | None) -> None:
        """Finish every model's queued requests (up to grace_s), then stop them."""
        self._closing = True
        # Kept for abort(): a second signal must reach the schedulers being drained here.
        self._closing_schedulers = [
            model.scheduler for versions in self._models.values() for model in versions.values()
        ]
        self._models = {}
        await asyncio.gather(
            *(scheduler.close(grace_s) for scheduler in self._closing_schedulers),
            *self._draining,
        )

    def abort(self, reason: str) -> None:
        """Answer everything queued or running UNAVAILABLE, during a close() too."""
        for versions in self._models.values():
            for model in versions.values():
                model.scheduler.abort(reason)
        for scheduler in self._closing_schedulers:
            scheduler.abort(reason)

    def _retire(self, model: LoadedModel) -> None:
        """Let a replaced or unloaded version finish what it accepted, in the background."""
        task = asyncio.get_running_loop().create_task(model.scheduler.close(self._drain_grace_s))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _build_versions(self, source: ModelSource) -> dict[str, LoadedModel]:
        config = read_config_file(source.config_path)[0] if source.config_path else None
        versions = _select_versions(source, config)
        if not versions:
            raise ConfigError(
                f"no version folder with a model file in {source.folder} "
                f"(expected {source.folder}/<version>/{DEFAULT_MODEL_FILENAME})"
            )
        loop = asyncio.get_running_loop()
        loaded: dict[str, LoadedModel] = {}
        for number in versions:
            settings, instances = await loop.run_in_executor(
                None, build_model, source, number, self._gpu_fallback, self._session_threads
            )
            version = str(number)
            for warning in settings.warnings:
                log.warning("model '%s': %s", source.name, warning)
            devices = [
                f"{i.device}:{i.device_id}" if i.device != "cpu" else "cpu" for i in instances
            ]
            if self._wrap_instance is not None:
                instances = [self._wrap_instance(source.name, i) for i in instances]  # type: ignore[misc]
            if settings.warmup:
                # Before the model is registered: it reports ready only once every
                # instance has run its warm-up.
                outputs = [spec.name for spec in settings.outputs]
                await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            None, warm_up, source.name, instance, settings.warmup, outputs,
                            source.folder,
                        )
                        for instance in instances
                    )
                )
            stats = ModelStatistics(source.name, version)
            scheduler = ModelScheduler(
                source.name,
                policy_for(settings),
                instances,
                [spec.name for spec in settings.outputs],
                batchable=settings.batchable,
                observers=(stats, *self._observers_for(source.name, version)),
            )
            scheduler.start()
            loaded[version] = LoadedModel(source.name, version, settings, scheduler, stats)
            log.info(describe(settings, version, devices))
        return loaded

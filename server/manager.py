"""The models being served, by name and version, and their lifecycle: load, reload,
unload, failures, retirement of replaced versions, and closing.

Which files a model comes from is the repository's business (`server.repository`); how a
version is built is the loader's (`server.loading`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from .config import ConfigError
from .errors import ErrorKind, FerryError, not_found, public_message
from .loaded_model import LoadedModel, pick_version
from .loading import LoadOptions, load_versions
from .repository import NOT_LOADED, IndexEntry, ModelRepository, ModelState, shown

log = logging.getLogger(__name__)


class ModelManager:
    """The models being served, by name and version, and their load/unload lifecycle."""

    def __init__(
        self,
        repository: ModelRepository,
        load_options: LoadOptions = LoadOptions(),  # noqa: B008 - frozen
        drain_grace_s: float = 30.0,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.repository = repository
        self._load_options = load_options
        self._on_change = on_change
        self._drain_grace_s = drain_grace_s
        self._models: dict[str, dict[str, LoadedModel]] = {}
        # Each model's newest version, for requests that name none; empty while closing.
        self._latest: dict[str, LoadedModel] = {}
        self._failures: dict[str, str] = {}
        self._states: dict[str, ModelState] = {}
        self._draining: set[asyncio.Task[None]] = set()
        # Versions that no longer take requests but may still hold some: replaced or
        # unloaded ones, and at close every one. abort() must still reach them.
        self._retiring: set[LoadedModel] = set()
        # One lock per model name in use, with how many hold or await it: a name is
        # forgotten when the last one leaves (names come from callers, any number of them).
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._closing = False
        # The models the start-up asked for; None until it has said (not ready before).
        self._startup: frozenset[str] | None = None

    def loaded(self) -> list[LoadedModel]:
        """Every version being served, model by model."""
        return [model for versions in self._models.values() for model in versions.values()]

    def versions_of(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=int)

    def is_loaded(self, name: str) -> bool:
        return name in self._models

    def known_names(self) -> list[str]:
        """The models of the repository and those loaded, each once, sorted; the loaded
        ones alone while the repository cannot be read (a volume gone: the poller and the
        index say so), so that a drain or an unload still completes."""
        try:
            listed = set(self.repository.model_names())
        except OSError:
            listed = set()
        return sorted(listed | set(self._models))

    async def load_all(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """Load the start-up set: these models (None: every model of the repository).
        Returns the models that failed, with the reason of each."""
        names = self.repository.model_names() if names is None else list(names)
        self._startup = frozenset(names)
        failed: dict[str, str] = {}
        for name in names:
            try:
                await self.load(name)
            except FerryError as error:
                # logged and recorded in the index; the other models still serve
                failed[name] = error.message
        return failed

    def all_ready(self) -> bool:
        """Every model of the start-up set is loaded (an empty set, as in explicit mode
        without --load-model, is ready at once). Not before the start-up has said."""
        startup = self._startup
        return startup is not None and all(name in self._models for name in startup)

    def get(self, name: str, version: str = "") -> LoadedModel:
        if not version:  # the common case: one dictionary look-up per request
            latest = self._latest.get(name)
            if latest is not None:
                return latest
        if self._closing:
            raise FerryError(ErrorKind.UNAVAILABLE, "server is shutting down")
        versions = self._models.get(name)
        if not versions:
            if name in self._failures:
                raise FerryError(
                    ErrorKind.UNAVAILABLE,
                    f"model '{name}' is not loaded: {self._failures[name]}",
                )
            if self.repository.holds(name):
                # In the repository, not loaded (explicit model control, or unloaded).
                raise not_found(
                    f"model '{shown(name)}' is in the model repository but not loaded; "
                    "load it with RepositoryModelLoad (REST: POST "
                    f"/v2/repository/models/{shown(name)}/load)"
                )
            raise not_found(f"unknown model '{shown(name)}'")
        return pick_version(name, versions, version)

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
                reason = "" if state is not ModelState.UNAVAILABLE else NOT_LOADED
                entries.append(IndexEntry(name, "", state, reason))
        return entries

    async def load(self, name: str, config_override: str | None = None) -> None:
        """Load (or reload) a model; on failure the running versions keep serving.
        `config_override` is a JSON ModelConfig used instead of config.pbtxt."""
        async with self._exclusive(name):
            self._refuse_while_closing(name, "load")
            self._states[name] = ModelState.LOADING
            try:
                source = self.repository.locate(name, config_override)
                loaded = await load_versions(source, self._load_options)
                if self._closing:  # the server began to stop while this loaded
                    await asyncio.gather(*(m.scheduler.close(0) for m in loaded.values()))
                    self._refuse_while_closing(name, "load")
            except asyncio.CancelledError:
                # The caller went away (a load RPC cancelled): the model is as before.
                self._settle_unloaded(name)
                raise
            except FerryError as exc:
                if exc.kind is ErrorKind.UNAVAILABLE and self._closing:
                    self._settle_unloaded(name)
                    raise
                error = self._load_failed(name, exc)
                await self._changed()
                raise error from exc
            except Exception as exc:
                error = self._load_failed(name, exc)
                await self._changed()
                raise error from exc
            previous = self._models.get(name, {})
            self._models[name] = loaded
            self._latest[name] = loaded[max(loaded, key=int)]
            self._failures.pop(name, None)
            self._states[name] = ModelState.READY
            for model in previous.values():
                self._retire(model)
        await self._changed()

    def _refuse_while_closing(self, name: str, action: str) -> None:
        if self._closing:
            raise FerryError(
                ErrorKind.UNAVAILABLE,
                f"server is shutting down: model '{shown(name)}' cannot {action}",
            )

    def _load_failed(self, name: str, exc: Exception) -> FerryError:
        """Log a failed load and record it for the index; the error for the caller."""
        where = self.repository.location_of(shown(name))
        if isinstance(exc, (FerryError, ConfigError, OSError, RuntimeError, ValueError)):
            detail = exc.message if isinstance(exc, FerryError) else str(exc)
            log.error("model '%s' (%s) failed to load: %s", shown(name), where, detail)
            kind = exc.kind if isinstance(exc, FerryError) else ErrorKind.INVALID_INPUT
        else:  # a bug of Ferry's: say so, keep the traceback in the log
            detail = f"internal error: {type(exc).__name__}"
            log.exception("model '%s' (%s) failed to load", shown(name), where)
            kind = ErrorKind.INTERNAL
        # callers see paths relative to the repository, and no others
        reason = public_message(detail, self.repository.path)
        self._settle_unloaded(name, reason)
        return FerryError(kind, f"model '{shown(name)}' failed to load: {reason}")

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        """One load or unload of a model at a time."""
        lock, users = self._locks.get(name, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    def _settle_unloaded(self, name: str, reason: str | None = None) -> None:
        """After a load that did not happen: the versions that served keep serving; a
        model of the repository that had none is UNAVAILABLE (for `reason`, if given)."""
        if name in self._models:
            self._states[name] = ModelState.READY
        elif name in self.repository.model_names():
            if reason is not None:
                self._failures[name] = reason
            self._states[name] = ModelState.UNAVAILABLE
        else:
            # not a model of the repository (a typo, '../x'): it leaves no trace,
            # neither in the index nor in the server's readiness
            self._states.pop(name, None)

    async def unload(self, name: str) -> None:
        """Stop serving a model. One that failed to load has nothing to stop (NOT_FOUND),
        but is forgotten all the same: its failure, and its place in readiness."""
        async with self._exclusive(name):
            self._refuse_while_closing(name, "unload")
            versions = self._models.pop(name, None)
            self._latest.pop(name, None)
            failed = self._failures.pop(name, None) is not None
            if self._startup is not None and (versions is not None or failed):
                # Unloaded on purpose: no longer a model readiness waits for (as in Triton).
                self._startup = self._startup - {name}
            if versions is not None:
                self._states[name] = ModelState.UNAVAILABLE
                for model in versions.values():
                    self._retire(model)
                log.info("model '%s' unloaded", name)
        if versions is not None or failed:
            await self._changed()
        if versions is None:
            raise not_found(f"model '{shown(name)}' is not loaded")

    async def refresh_statistics(self) -> None:
        """Statistics are kept here, always up to date."""

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()

    async def close(self, grace_s: float | None) -> None:
        """Finish every model's queued requests (up to grace_s), then stop them."""
        self._closing = True
        closing = self.loaded()
        self._retiring.update(closing)
        self._models = {}
        self._latest = {}
        await asyncio.gather(
            *(model.scheduler.close(grace_s) for model in closing), *self._draining
        )

    def stop_gathering(self) -> None:
        """A drain has begun: no model holds a batch back for requests to come."""
        for model in self.loaded():
            model.scheduler.stop_gathering()

    def abort(self, reason: str) -> None:
        """Answer everything queued or running, in every version (retiring ones included),
        UNAVAILABLE at once."""
        for model in (*self.loaded(), *self._retiring):
            model.scheduler.abort(reason)

    def join_threads(self, timeout_s: float) -> bool:
        """After close(): wait for batches still running on executor threads to end, so
        that the process never exits under a running session. False if some did not."""
        models = (*self.loaded(), *self._retiring)
        return all(model.scheduler.join_threads(timeout_s) for model in models)

    def _retire(self, model: LoadedModel) -> None:
        """Let a replaced or unloaded version finish what it accepted, in the background."""
        self._retiring.add(model)
        task = asyncio.get_running_loop().create_task(model.scheduler.close(self._drain_grace_s))
        self._draining.add(task)

        def retired(done: asyncio.Task[None]) -> None:
            self._draining.discard(done)
            if not self._closing:
                self._retiring.discard(model)

        task.add_done_callback(retired)

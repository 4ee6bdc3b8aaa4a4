"""Watch the model repository and apply its changes: `ferry serve --poll-repository S`.

Every S seconds the files of each model (config.pbtxt and its version folders) are
fingerprinted by name, size and modification time. A new model is loaded, a changed one
reloaded (the old version drains while the new one takes new requests) and a removed one
unloaded. A model that fails to load keeps its running version serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from .errors import FerryError
from .manager import ModelManager
from .repository import is_model_name

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(folder: Path) -> Fingerprint:
    """Name, size and mtime of every file under a model's folder, in a stable order."""
    entries: list[tuple[str, int, int]] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            try:
                stat = path.stat()
            except OSError:
                continue  # removed while we looked: the next poll sees the new state
            entries.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def snapshot(repository: Path) -> dict[str, Fingerprint]:
    if repository.is_file():
        stat = repository.stat()
        return {repository.stem: ((repository.name, stat.st_size, stat.st_mtime_ns),)}
    root = repository.resolve()
    return {
        child.name: fingerprint(child)
        for child in sorted(repository.iterdir())
        if is_model_name(child.name) and child.is_dir() and _inside(child, root)
    }


def _inside(folder: Path, root: Path) -> bool:
    """Whether a model folder is not a link out of the repository: such a model never
    loads (`ModelRepository`), and walking it (a link to "/") could take minutes a poll."""
    return folder.resolve().parent == root


class RepositoryPoller:
    def __init__(self, manager: ModelManager, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"poll interval must be > 0 s, got {interval_s}")
        self.manager = manager
        self.interval_s = interval_s
        self._known: dict[str, Fingerprint] = {}
        self._task: asyncio.Task[None] | None = None

    async def prime(self) -> None:
        """Remember the repository as it is now (the models were just loaded from it)."""
        self._known = await self._snapshot()

    async def poll_once(self) -> None:
        current = await self._snapshot()
        for name in sorted(set(self._known) - set(current)):
            log.info("model '%s' was removed from the repository: unloading", name)
            try:
                await self.manager.unload(name)
            except FerryError as error:
                log.warning("unloading model '%s': %s", name, error.message)
        for name, files in sorted(current.items()):
            if self._known.get(name) == files:
                continue
            action = "reloading" if name in self._known else "loading"
            log.info("model '%s' changed in the repository: %s", name, action)
            try:
                await self.manager.load(name)
            except FerryError:
                pass  # logged by the manager; the running version keeps serving
        self._known = current

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ferry-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except OSError as exc:
                log.warning("cannot read the model repository: %s", exc)

    async def _snapshot(self) -> dict[str, Fingerprint]:
        return await asyncio.get_running_loop().run_in_executor(
            None, snapshot, self.manager.repository.path
        )

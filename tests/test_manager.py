"""ModelManager's lifecycle when a load goes wrong in ways a config check does not catch:
a bug of Ferry's (any exception) or a caller that goes away mid-load. Either way the
model must not stay LOADING: the index, readiness and later loads depend on its state."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from ferry.server import manager as manager_module
from ferry.server.errors import ErrorKind, FerryError
from ferry.server.manager import ModelManager
from ferry.server.repository import ModelRepository, ModelState
from tests.models import mlp_model


def states(manager: ModelManager) -> dict[str, tuple[ModelState, str]]:
    return {entry.name: (entry.state, entry.reason) for entry in manager.index()}


@pytest.fixture
def manager(tmp_path: Path) -> ModelManager:
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    return ModelManager(ModelRepository(tmp_path))


@pytest.mark.asyncio
async def test_an_unexpected_error_while_loading_leaves_the_model_unavailable_with_a_reason(
    manager: ModelManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object) -> None:
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(manager_module, "load_versions", broken)
    with pytest.raises(FerryError) as caught:
        await manager.load("m")
    assert caught.value.kind is ErrorKind.INTERNAL
    assert caught.value.message == "model 'm' failed to load: internal error: OverflowError"
    assert states(manager)["m"] == (ModelState.UNAVAILABLE, "internal error: OverflowError")
    # The traceback is for the operator's log, not the caller.
    assert any(record.exc_info for record in caplog.records if record.levelno >= logging.ERROR)


@pytest.mark.asyncio
async def test_a_start_up_load_that_hits_a_bug_fails_that_model_only(
    tmp_path: Path, manager: ModelManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlp_model(tmp_path / "n" / "1" / "model.onnx")
    real = manager_module.load_versions

    async def broken_for_n(source: object, options: object) -> object:
        if getattr(source, "name", "") == "n":
            raise ArithmeticError("boom")
        return await real(source, options)  # type: ignore[arg-type]

    monkeypatch.setattr(manager_module, "load_versions", broken_for_n)
    failed = await manager.load_all()
    assert set(failed) == {"n"}
    assert manager.is_loaded("m")
    assert states(manager)["n"][0] is ModelState.UNAVAILABLE


@pytest.mark.asyncio
async def test_a_cancelled_load_leaves_the_model_as_it_was(
    manager: ModelManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def slow(*args: object) -> None:
        started.set()
        await asyncio.Event().wait()  # until cancelled

    monkeypatch.setattr(manager_module, "load_versions", slow)
    load = asyncio.create_task(manager.load("m"))
    await started.wait()
    assert states(manager)["m"][0] is ModelState.LOADING
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    assert states(manager)["m"][0] is ModelState.UNAVAILABLE

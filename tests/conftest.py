"""Shared fixtures: a real Ferry server on an ephemeral loopback port, run on its own
event-loop thread so that blocking clients (tritonclient) can talk to it from a test."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from ferry.server.app import FerryServer, ServerOptions
from ferry.server.event_loop import default_event_loop, loop_factory
from ferry.server.executor import Runner
from ferry.server.repository import ModelControl, ModelControlMode
from ferry.server.security import SecurityOptions
from tests.certificates import Pki
from tests.gpu import gpu_unavailable_reason
from tests.process import FerryProcess
from tests.workers import Workers

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=60.0,
        help="how long tests/test_soak.py keeps its clients busy (CI: 60)",
    )

# The loop every in-process test runs on: the servers' default (uvloop where installed).
# FERRY_TEST_EVENT_LOOP=asyncio runs them on the standard library's loop instead.
TEST_EVENT_LOOP = os.environ.get("FERRY_TEST_EVENT_LOOP") or default_event_loop()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {TEST_EVENT_LOOP: loop_factory(TEST_EVENT_LOOP)}


def soak_timeout_s(soak_seconds: float) -> float:
    """The timeout of a soak test: its requested length, plus time to start the server
    and for the last requests (30 s deadlines) to come back. The global 120 s would kill
    `--soak-seconds 600` half-way."""
    return soak_seconds * 1.25 + 90.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soak_seconds = float(config.getoption("--soak-seconds"))
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(soak_timeout_s(soak_seconds)))
        if item.get_closest_marker("gpu") is not None:
            reason = gpu_unavailable_reason()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs a GPU: {reason}"))


# Load/unload RPCs are refused unless a server runs in explicit model control; with "*" it
# still loads the whole repository at start. Pass as start_server(..., security=...).
EXPLICIT_MODEL_CONTROL = SecurityOptions(
    model_control=ModelControl(ModelControlMode.EXPLICIT, ("*",))
)


class RunningServer:
    """A FerryServer started in a background thread; stop it with close()."""

    def __init__(
        self,
        model_path: Path,
        *,
        wrap_instance: Callable[[str, Runner], Runner] | None = None,
        **options: Any,
    ) -> None:
        self.loop = loop_factory(TEST_EVENT_LOOP)()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        options.setdefault("host", "127.0.0.1")
        options.setdefault("grpc_port", 0)
        options.setdefault("metrics_port", 0)
        options.setdefault("http_port", 0)
        options.setdefault("shutdown_grace_s", 5.0)
        # Tests look at servers whose models fail to load; `ferry serve` exits instead.
        options.setdefault("exit_on_error", False)

        async def create() -> FerryServer:
            return FerryServer(ServerOptions(model_path=model_path, **options),
                               wrap_instance=wrap_instance)

        self.server = self.call(create())
        self.port = self.call(self.server.start())
        self.address = f"127.0.0.1:{self.port}"
        self.http_address = f"127.0.0.1:{self.server.http_port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.server.stop(grace_s=5.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def serving(model_path: Path, **options: Any) -> Iterator[RunningServer]:
    """A RunningServer for a fixture to yield from (`yield from serving(repo)`), closed
    after."""
    running = RunningServer(model_path, **options)
    yield running
    running.close()


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    """Factory: start_server(model_path, **ServerOptions fields) -> RunningServer."""
    servers: list[RunningServer] = []

    def start(model_path: Path, **kwargs: Any) -> RunningServer:
        server = RunningServer(model_path, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


class GatedInstance:
    """Wraps a real instance: records every batch it runs, and can be held still.

    `hold()` makes the next runs wait until `release()`; tests use it to let a queue
    fill up deterministically, without sleeping.
    """

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.batches: list[dict[str, np.ndarray]] = []
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Semaphore(0)

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def run(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.entered.release()
        if not self._gate.wait(60):
            raise TimeoutError("GatedInstance was never released")
        self.batches.append({name: np.array(value, copy=True) for name, value in inputs.items()})
        return self.inner.run(inputs, output_names)

    @property
    def batch_rows(self) -> list[int]:
        return [len(next(iter(batch.values()))) for batch in self.batches]


@pytest.fixture
def gated() -> Iterator[Callable[[str, Runner], GatedInstance]]:
    """A wrap_instance hook that gates every instance; the gates are in `.instances`."""
    instances: list[GatedInstance] = []

    def wrap(model: str, inner: Runner) -> GatedInstance:
        gate = GatedInstance(inner)
        instances.append(gate)
        return gate

    wrap.instances = instances  # type: ignore[attr-defined]
    yield wrap
    for gate in instances:
        gate.release()


def one_place_server(
    repo: Path, start_server: Callable[..., RunningServer], gated: Callable[..., GatedInstance]
) -> tuple[RunningServer, GatedInstance]:
    """A server with --max-concurrent-rpcs 1 whose model holds every batch until the gate
    (held already) is released."""
    server = start_server(
        repo, wrap_instance=gated, security=SecurityOptions(max_concurrent_rpcs=1)
    )
    gate: GatedInstance = gated.instances[0]  # type: ignore[attr-defined]
    gate.hold()
    return server, gate


@pytest.fixture
def ferry_process() -> Iterator[Callable[..., FerryProcess]]:
    """Factory: ferry_process(model_path, *flags) -> a ready `ferry serve` child process
    (see tests/process.py); any still running at the end of the test is killed."""
    processes: list[FerryProcess] = []

    def start(model_path: Path, *args: str, **kwargs: Any) -> FerryProcess:
        process = FerryProcess(model_path, *args, **kwargs)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA and its identities, made once per module (key generation is slow)."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def workers() -> Iterator[list[Workers]]:
    """`ferry serve --workers N` servers a test started, stopped after it."""
    started: list[Workers] = []
    yield started
    for server in started:
        server.stop()

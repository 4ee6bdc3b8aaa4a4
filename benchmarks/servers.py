"""Servers under test: each one is a name and a command line, started as a subprocess.

A command line may use `{python}`, `{repo}` and `{port}`; so a new variant (Ferry with
`--workers 2`, another flag, another server altogether) is one `--server NAME=COMMAND`.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc

from .cpu import process_group_cpu_seconds

# The baselines keep these names: the report's ratios and targets are relative to them.
NAIVE = "naive"
NULL = "null"
NULL_LISTENERS = "null-l4"
NULL_UVLOOP = "null-l4-uv"
NULLS = (NULL, NULL_LISTENERS, NULL_UVLOOP)
BASELINES = (NAIVE, *NULLS)
READY_PROBES = 8

FERRY = (
    "{python} -m ferry.server.cli serve {repo} --grpc-port {port} --http-port -1 --metrics-port -1 "
    "--log-level WARNING"
)
# Named command lines; `python -m benchmarks.run` measures ferry, naive and null unless
# told otherwise with --server.
DEFAULT_SERVERS: dict[str, str] = {
    "ferry": FERRY,
    # Two frontend processes sharing the port (SO_REUSEPORT), ghz's connections spread over
    # them, and one executor process that batches for both.
    "ferry-w2": FERRY + " --workers 2",
    NAIVE: "{python} -m benchmarks.naive_server {repo} --port {port}",
    NULL: "{python} -m benchmarks.null_server {repo} --port {port}",
    # The null server with as many listeners as Ferry's default (--grpc-listeners): what
    # grpc.aio alone costs when it accepts calls the way Ferry does.
    NULL_LISTENERS: "{python} -m benchmarks.null_server {repo} --port {port} --listeners 4",
    # And on uvloop, Ferry's default --event-loop: grpc.aio's floor on Ferry's loop.
    NULL_UVLOOP: "{python} -m benchmarks.null_server {repo} --port {port} --listeners 4 "
    "--event-loop uvloop",
}


@dataclass(frozen=True, slots=True)
class ServerVariant:
    name: str
    command: str

    @classmethod
    def parse(cls, spec: str) -> ServerVariant:
        """`NAME=COMMAND`, or a bare NAME from DEFAULT_SERVERS."""
        name, sep, command = spec.partition("=")
        name = name.strip()
        if not sep:
            if name not in DEFAULT_SERVERS:
                known = ", ".join(DEFAULT_SERVERS)
                raise ValueError(f"unknown server {name!r}: use NAME=COMMAND or one of {known}")
            command = DEFAULT_SERVERS[name]
        if not name or not command.strip():
            raise ValueError(f"server {spec!r}: expected NAME=COMMAND")
        return cls(name, command.strip())

    @property
    def is_baseline(self) -> bool:
        return self.name in BASELINES

    @property
    def is_null(self) -> bool:
        return self.name in NULLS

    def argv(self, repo: Path, port: int) -> list[str]:
        return shlex.split(self.command.format(python=sys.executable, repo=repo, port=port))


def free_port() -> int:
    """A port nobody listens on now (the servers under test need one they are told)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RunningServer:
    """A server subprocess: started and waited for on enter, stopped on exit."""

    def __init__(
        self,
        variant: ServerVariant,
        repo: Path,
        models: list[str],
        log_path: Path,
        ready_timeout_s: float = 120.0,
    ) -> None:
        self.variant = variant
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self._argv = variant.argv(repo, self.port)
        self._models = models
        self._log_path = log_path
        self._ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RunningServer:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("wb") as log:
            # Its own process group, so that stopping it reaches any workers it started.
            self._process = subprocess.Popen(
                self._argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        """Poll readiness until it holds on READY_PROBES new connections in a row: with
        several processes sharing the port, each connection may reach another one."""
        assert self._process is not None
        deadline = time.monotonic() + self._ready_timeout_s
        in_a_row = 0
        while in_a_row < READY_PROBES:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"server {self.variant.name!r} exited with {self._process.returncode} "
                    f"before it was ready; see {self._log_path}"
                )
            if self._ready_on_new_connection():
                in_a_row += 1
                continue
            in_a_row = 0
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"server {self.variant.name!r} not ready after "
                    f"{self._ready_timeout_s:.0f} s; see {self._log_path}"
                )
            time.sleep(0.1)

    def _ready_on_new_connection(self) -> bool:
        # A local subchannel pool: a new TCP connection, not one shared with earlier channels.
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(self.target, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            try:
                return stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready and all(
                    stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=1.0).ready
                    for m in self._models
                )
            except grpc.RpcError:
                return False  # not listening yet, or still loading

    @property
    def pid(self) -> int:
        """The server's process (its group leader)."""
        assert self._process is not None
        return self._process.pid

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server's whole process group has used so far."""
        assert self._process is not None
        return process_group_cpu_seconds(self._process.pid)

    def check_alive(self) -> None:
        """Raise if the server has exited: what ghz measured after that is not the server."""
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(
                f"server {self.variant.name!r} exited with {self._process.returncode} during "
                f"the run; see {self._log_path}"
            )

    def stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

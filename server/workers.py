"""`ferry serve --workers N`: one executor process per device and N frontend processes on
one port.

One Python process is bound by its event loop and the GIL, so it cannot use every core
for gRPC. With `--workers N` the supervisor (this module, the process the user started)
runs:
- one **executor** process per device the models' instance groups use (`cpu`, `gpuN`;
  `server.device_plan`), or a single one when they all use one device
  (`server.executor_process`): it loads its models once, with that device's instances,
  owns their batch queues, and the first one serves the one `/metrics` of the server;
- N **frontend** processes (`server.remote`): ordinary grpc.aio servers sharing the gRPC
  port (gRPC turns SO_REUSEPORT on by default on Linux, so the kernel spreads
  connections between them) that decode and validate requests and hand the tensors to
  the executor that serves the model through shared memory (`server.handoff`).

Faults: when an executor exits unexpectedly, the frontends answer the callers waiting on
it UNAVAILABLE and report NOT_SERVING, and the supervisor starts a new executor for that
device (its models load and warm up again); a frontend that dies is restarted and only its
own calls are lost. More than MAX_RESTARTS restarts within RESTART_WINDOW_S: the supervisor stops
everything and exits 1.

Drain: SIGTERM/SIGINT goes to every frontend, which drains as a single server does; once
they have all exited the executors are told to stop, and finish what is still queued.
The exit code is the worst of the processes' last exits (1 after giving up).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from .call_counts import CallCounts, create_call_counts
from .ports import bare_host, socket_family

log = logging.getLogger(__name__)

EXECUTOR = "executor"
FRONTEND = "frontend"
# What the supervisor sends its children on a second SIGTERM/SIGINT: stop at once. Apart
# from the stop signals, which a child may get twice for one stop (from the supervisor,
# and from a service manager that signals every process of the server).
ABORT_SIGNAL = signal.SIGUSR1
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


def free_port(host: str) -> int:
    """A port nobody listens on now, for frontends that must all bind the same one."""
    return free_ports(host, 1)[0]


def free_ports(host: str, count: int, taken: Collection[int] = ()) -> list[int]:
    """`count` distinct ports nobody listens on now, none of them in `taken`: the probes
    stay bound until all are chosen, since the kernel may hand a closed one out again."""
    probes: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            probe = socket.socket(socket_family(host), socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind((bare_host(host), 0))
            port = int(probe.getsockname()[1])
            if port not in taken and port not in ports:
                ports.append(port)
    finally:
        for probe in probes:
            probe.close()
    return ports


def socket_address(name: str) -> str:
    """The executor's Unix socket, in the abstract namespace: no file to leave behind."""
    return "\0" + name


def _drop_option(args: list[str], name: str) -> list[str]:
    result: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        result.append(arg)
    return result


def role_command(
    argv: Sequence[str],
    role: str,
    *,
    socket_name: str,
    grpc_port: int,
    metrics_port: int | None,
    index: int = 0,
    ready_fd: int | None = None,
    device: str | None = None,
    metrics_peers: Sequence[str] = (),
    call_counts_fd: int | None = None,
    connection_counts_fd: int | None = None,
    http_port: int | None = None,
) -> list[str]:
    """The command line of one process: the user's arguments, one process, its role.
    A frontend's `socket_name` lists every executor's, comma-separated."""
    args = list(argv)
    for option in ("--workers", "--grpc-port", "--metrics-port", "--process-role",
                   "--executor-socket", "--frontend-index", "--ready-fd", "--executor-device",
                   "--peer-executors", "--call-counts-fd", "--connection-counts-fd",
                   "--http-port"):
        args = _drop_option(args, option)
    args += ["--workers", "1", "--process-role", role, "--executor-socket", socket_name]
    if role == EXECUTOR:
        # The (first) executor serves the server's one /metrics; the frontends serve none.
        args += ["--grpc-port", str(grpc_port)]
        args += ["--metrics-port", str(-1 if metrics_port is None else metrics_port)]
        if ready_fd is not None:
            args += ["--ready-fd", str(ready_fd)]
        if device is not None:
            args += ["--executor-device", device]
        if metrics_peers:
            args += ["--peer-executors", ",".join(metrics_peers)]
    else:
        # Frontends share the port on purpose (SO_REUSEPORT); a lone server binds it alone.
        args += ["--grpc-port", str(grpc_port), "--reuse-port", "--metrics-port", "-1"]
        args += ["--http-port", str(-1 if http_port is None else http_port)]
        args += ["--frontend-index", str(index)]
        if call_counts_fd is not None:
            args += ["--call-counts-fd", str(call_counts_fd)]
        if connection_counts_fd is not None:
            args += ["--connection-counts-fd", str(connection_counts_fd)]
    return [sys.executable, "-m", "ferry.server.cli", *args]


_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _child_setup() -> None:
    """In each child, before it runs: its own process group, so that a terminal's Ctrl-C
    reaches it once, through the supervisor (which drains in order); and SIGKILL when the
    supervisor dies, so that no process outlives it."""
    os.setpgid(0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGTERM/SIGINT wait while a child starts and is registered, so that a stop never
    misses a child that has just been started."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


@dataclass(slots=True)
class _Child:
    role: str
    index: int
    process: subprocess.Popen[bytes]


class Supervisor:
    """Starts the executors, then the frontends; restarts what dies; drains in order."""

    def __init__(
        self,
        argv: Sequence[str],
        workers: int,
        host: str,
        grpc_port: int,
        metrics_port: int | None,
        devices: Sequence[str] = ("cpu",),
        http_port: int | None = None,
    ) -> None:
        self.argv = list(argv)
        self.workers = workers
        # The frontends share one REST port as they share the gRPC one: a port of 0 is
        # chosen here, once (each frontend would otherwise bind a port of its own), and
        # the metrics port too, so that a restarted executor serves where the first did.
        # Chosen together, so that no two are the same.
        asked = (grpc_port, http_port, metrics_port)
        chosen = iter(free_ports(host, asked.count(0), {p for p in asked if p}))
        self.grpc_port = grpc_port or next(chosen)
        self.http_port = http_port if http_port != 0 else next(chosen)
        self.metrics_port = metrics_port if metrics_port != 0 else next(chosen)
        base = f"ferry-{os.getpid()}-{secrets.token_hex(4)}"
        # One executor per device; a single one loads every instance, as it always has.
        self.devices: list[str | None] = list(devices) if len(devices) > 1 else [None]
        self.socket_names = [base if d is None else f"{base}-{d}" for d in self.devices]
        self._children: dict[int, _Child] = {}
        self._restarts: deque[float] = deque()
        self._stopping = False
        self._signals = 0
        self._gave_up = False
        self._worst = 0
        # The calls in flight of each frontend, for a --max-concurrent-rpcs of the whole
        # server; a frontend that died with calls has its count set back before restarting.
        self._call_counts_fd = create_call_counts(workers)
        self._call_counts = CallCounts(self._call_counts_fd)
        # ... and the REST connections of each, for a --max-connections of the server.
        self._connection_counts_fd = create_call_counts(workers, "ferry-connection-counts")
        self._connection_counts = CallCounts(self._connection_counts_fd)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if not self._start_executors(range(len(self.devices))):
            # The others have served nothing yet: no need to wait for their loads.
            started = list(self._children.values())
            self._children.clear()
            for each in started:
                each.process.kill()
                each.process.wait()
            if self._stopping and self._signals:
                log.info("stopped during start-up")
                return 0  # told to stop while loading: the executor left, as asked
            log.error("an executor process failed to start")
            return 1
        for index in range(self.workers):
            if not self._stopping:
                self._start_frontend(index)
        if self.devices == [None]:
            executors = "one executor"
        else:
            executors = f"{len(self.devices)} executors ({', '.join(map(str, self.devices))})"
        rest = "" if self.http_port is None else f"; REST on port {self.http_port}"
        log.info("serving on gRPC port %d: %d frontends and %s%s",
                 self.grpc_port, self.workers, executors, rest)
        while self._children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            child = self._children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            child.process.returncode = code
            self._exited(child, code)
        return 1 if self._gave_up else self._worst

    def _exited(self, child: _Child, code: int) -> None:
        if self._stopping:
            # Ended by the signal it was sent (before it could handle it: a process
            # still starting) counts as a clean stop.
            if code not in (-signal.SIGTERM, -signal.SIGINT, -ABORT_SIGNAL):
                self._worst = max(self._worst, abs(code))
            return
        log.error("%s process %s exited with %d; restarting it",
                  child.role, child.process.pid, code)
        if self._too_many_restarts():
            log.error("more than %d restarts within %.0f s: stopping", MAX_RESTARTS,
                      RESTART_WINDOW_S)
            self._gave_up = True
            self._stop(signal.SIGTERM)
            return
        if child.role == EXECUTOR:
            if not self._start_executors([child.index]) and not self._stopping:
                self._gave_up = True
                self._stop(signal.SIGTERM)
        else:
            self._call_counts.reset(child.index)
            self._connection_counts.reset(child.index)
            self._start_frontend(child.index)

    def _too_many_restarts(self) -> bool:
        now = time.monotonic()
        restarts = self._restarts
        while restarts and now - restarts[0] > RESTART_WINDOW_S:
            restarts.popleft()
        restarts.append(now)
        return len(restarts) > MAX_RESTARTS

    def _start_executors(self, indexes: Iterable[int]) -> bool:
        """Start these executors (by device index) together and wait until each has
        loaded its models; False as soon as one dies first."""
        pipes = {self._spawn_executor(index): index for index in indexes}
        poller = select.poll()
        for read_end in pipes:
            poller.register(read_end, select.POLLIN)  # end of file arrives as POLLHUP
        ready = True
        try:
            while pipes and ready:
                for read_end, _ in poller.poll():
                    # "ready" once the models are loaded; end of file if it died first.
                    ready = bool(os.read(read_end, 16)) and ready
                    poller.unregister(read_end)
                    os.close(read_end)
                    del pipes[read_end]
        finally:
            for read_end in pipes:
                os.close(read_end)
        if self._stopping and not self._frontends():
            self._signal_executor(signal.SIGTERM)
        return ready

    def _spawn_executor(self, index: int) -> int:
        """Start one executor; returns the pipe it writes "ready" to."""
        read_end, write_end = os.pipe()
        first = index == 0  # serves /metrics, with the others' figures merged in
        command = role_command(
            self.argv, EXECUTOR, socket_name=self.socket_names[index],
            grpc_port=self.grpc_port, metrics_port=self.metrics_port if first else None,
            ready_fd=write_end, device=self.devices[index],
            metrics_peers=self.socket_names[1:] if first else (),
        )
        with _signals_held():
            process = subprocess.Popen(command, pass_fds=(write_end,), preexec_fn=_child_setup)
            self._children[process.pid] = _Child(EXECUTOR, index, process)
        os.close(write_end)
        return read_end

    def _start_frontend(self, index: int) -> None:
        command = role_command(
            self.argv, FRONTEND, socket_name=",".join(self.socket_names),
            grpc_port=self.grpc_port,
            metrics_port=self.metrics_port, index=index, call_counts_fd=self._call_counts_fd,
            connection_counts_fd=self._connection_counts_fd, http_port=self.http_port,
        )
        with _signals_held():
            process = subprocess.Popen(
                command, pass_fds=(self._call_counts_fd, self._connection_counts_fd),
                preexec_fn=_child_setup,
            )
            self._children[process.pid] = _Child(FRONTEND, index, process)
            if self._stopping:  # the stop came while it was being started
                process.send_signal(signal.SIGTERM)

    def _frontends(self) -> list[_Child]:
        return [c for c in self._children.values() if c.role == FRONTEND]

    def _signal_executor(self, signum: int) -> None:
        for child in self._children.values():
            if child.role == EXECUTOR:
                child.process.send_signal(signum)

    def _stop(self, signum: int) -> None:
        """The frontends drain; the executor, told at once, stops holding batches back and
        closes once they are gone (see run_executor). A second signal: everyone at once."""
        self._stopping = True
        stop = ABORT_SIGNAL if self._signals > 1 else signum
        for child in self._children.values():
            child.process.send_signal(stop)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self._stop(signum)


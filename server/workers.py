"""`ferry serve --workers N`: several server processes sharing one gRPC port.

One Python process is bound by its event loop and the GIL, so it cannot use every core for
gRPC; gRPC turns on SO_REUSEPORT by default on Linux, so N processes can listen on the
same port and the kernel spreads connections between them. Each worker is a full Ferry
(its own models, batcher, statistics) and serves metrics on `metrics_port + index`. The
supervisor only starts the workers, forwards SIGTERM/SIGINT to them, and exits with the
worst exit code. """

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from .runtime import default_intra_op_threads

log = logging.getLogger(__name__)


def free_port(host: str) -> int:
    """A port nobody listens on now, for workers that must all bind the same one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def worker_command(
    argv: Sequence[str], index: int, grpc_port: int, metrics_port: int | None, workers: int
) -> list[str]:
    """The command line of one worker: the same arguments, one process, its own ports."""
    args = list(argv)
    args = _drop_option(args, "--workers")
    args = _drop_option(args, "--grpc-port")
    args = _drop_option(args, "--metrics-port")
    if not any(a == "--session-threads" or a.startswith("--session-threads=") for a in args):
        # Each worker's sessions get their share of the cores, not the whole machine.
        args += ["--session-threads", str(default_intra_op_threads(1, workers))]
    args += ["--workers", "1", "--grpc-port", str(grpc_port), "--reuse-port"]
    args += ["--metrics-port", str(-1 if metrics_port is None else metrics_port + index)]
    return [sys.executable, "-m", "ferry.server.cli", *args]


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


def supervise(
    argv: Sequence[str], workers: int, host: str, grpc_port: int, metrics_port: int | None
) -> int:
    """Run `workers` server processes on one port until they exit; returns the exit code."""
    port = grpc_port or free_port(host)
    if metrics_port == 0:
        log.warning("--metrics-port 0 with --workers: each worker picks its own metrics port")
    processes = [
        subprocess.Popen(worker_command(argv, index, port, metrics_port, workers))
        for index in range(workers)
    ]
    log.info("started %d workers sharing gRPC port %d", workers, port)

    def forward(signum: int, frame: FrameType | None) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [process.wait() for process in processes]
    return max((abs(code) for code in codes), default=0)

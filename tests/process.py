"""`ferry serve` as a real child process, for the tests of what the README promises about
the process itself: start-up, readiness, signals, reloads, exit codes, workers, flags.

    with FerryProcess(repo, "--shutdown-grace", "5") as server:
        ...  # server.address, server.metrics_url
        code = server.stop()  # SIGTERM, then the exit code; server.log has all of stderr

The process binds 127.0.0.1 port 0 and the bound port is read from its log line
"serving the Open Inference Protocol on HOST:PORT", which it writes once every model
is loaded: when the constructor returns, the server is ready. Nothing here sleeps:
every wait is for a log line or an exit, bounded by a timeout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

SERVING = re.compile(r"serving the Open Inference Protocol on (\S+):(\d+)")
METRICS = re.compile(r"serving Prometheus metrics on http://(\S+):(\d+)/metrics")
START_TIMEOUT_S = 60.0


def serve_command(model_path: Path | str, *args: str) -> list[str]:
    """`python -m ferry.server.cli serve MODEL_PATH ...` on loopback; a port of 0 and no
    metrics endpoint unless the arguments say otherwise."""
    command = [sys.executable, "-m", "ferry.server.cli", "serve", str(model_path), *args]

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in args)

    for flag, default in (("--host", "127.0.0.1"), ("--grpc-port", "0"),
                          ("--http-port", "-1"), ("--metrics-port", "-1")):
        if not given(flag):
            command += [flag, default]
    return command


class FerryProcess:
    """One `ferry serve` child process, its stderr collected line by line on a thread."""

    def __init__(
        self,
        model_path: Path | str,
        *args: str,
        wait_ready: bool = True,
        ready_count: int = 1,
        timeout: float = START_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = serve_command(model_path, *args)
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        self.metrics_port = 0
        if wait_ready:
            try:
                matches = self.wait_for(SERVING, count=ready_count, timeout=timeout)
            except BaseException:
                self.close()
                raise
            self.port = int(matches[0].group(2))
            metrics = self.matches(METRICS)
            if metrics:
                self.metrics_port = int(metrics[0].group(2))

    # Output -------------------------------------------------------------------------

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        """Everything the process has written to stderr so far."""
        with self._changed:
            return "".join(self._lines)

    def matches(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        with self._changed:
            lines = list(self._lines)
        return [m for m in (pattern.search(line) for line in lines) if m]

    def wait_for(
        self, pattern: re.Pattern[str] | str, count: int = 1, timeout: float = 30.0
    ) -> list[re.Match[str]]:
        """Wait until `count` lines of the log match; fail with the log if the process
        exits first or the time runs out."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for m in (regex.search(line) for line in self._lines) if m]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    what = "exited" if self._eof else f"still running after {timeout} s"
                    raise AssertionError(
                        f"ferry {what} before {count} line(s) matching {regex.pattern!r}:\n"
                        + "".join(self._lines)
                    )
                self._changed.wait(remaining)

    # Addresses ----------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        assert self.metrics_port, "this server has no metrics endpoint (--metrics-port)"
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def scrape(self, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:
            return str(response.read().decode())

    # What the process holds --------------------------------------------------------

    def status_value(self, field: str) -> int:
        """A number of /proc/PID/status, such as Threads, or VmRSS and VmHWM in KiB."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
        assert match, f"no {field} in /proc/{self.pid}/status"
        return int(match.group(1))

    def reset_peak(self) -> None:
        """Let VmHWM (peak RSS) start again from the current RSS."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    # Lifecycle ----------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.process.pid

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """The exit code, once the process has exited and its stderr is all read."""
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send a signal and return the exit code."""
        self.send_signal(signum)
        return self.wait(timeout)

    def close(self) -> None:
        """Kill the process if it still runs (a test that failed half-way)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self._reader.join(10)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> FerryProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on (Linux: its socket inodes in /proc/net/tcp*)."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def infer(
    address: str,
    x: np.ndarray,
    *,
    model: str = "m",
    input_name: str = "x",
    output_name: str = "y",
    timeout: float = 30.0,
    **client_options: Any,
) -> tuple[str, np.ndarray | None]:
    """One ModelInfer through tritonclient on its own connection: ("OK", the output), or
    the status code's name and None."""
    try:
        with triton.InferenceServerClient(address, **client_options) as client:
            tensor = triton.InferInput(input_name, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer(model, [tensor], client_timeout=timeout)
            return "OK", result.as_numpy(output_name)
    except InferenceServerException as error:
        return str(error.status()).removeprefix("StatusCode."), None


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from Prometheus text (None when the series is absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None

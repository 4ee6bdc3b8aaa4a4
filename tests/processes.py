"""`ferry serve` as a child process, for tests that measure the process itself (memory,
threads, exit codes): the port is read from its log, stderr is collected by a thread."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

STARTED = re.compile(r"Open Inference Protocol on [\d.]+:(\d+)")
METRICS = re.compile(r"Prometheus metrics on http://[\d.]+:(\d+)/metrics")


class FerryProcess:
    def __init__(self, model_path: Path, *extra: str, wait: bool = True) -> None:
        port = () if "--grpc-port" in extra else ("--grpc-port", "0")
        http = () if "--http-port" in extra else ("--http-port", "-1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ferry.server.cli", "serve", str(model_path),
             "--host", "127.0.0.1", *port, *http, *extra],
            stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait and not self._started.wait(60):
            self.process.kill()
            raise AssertionError("ferry serve did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if match := METRICS.search(line):
                self.metrics_port = int(match.group(1))
            if match := STARTED.search(line):
                self.port = int(match.group(1))
                self._started.set()
        self._started.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def status_kib(self, field: str) -> int:
        """A /proc/PID/status figure such as VmRSS or VmHWM, in KiB."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        assert match, f"no {field} in /proc/{self.pid}/status"
        return int(match.group(1))

    def reset_peak(self) -> None:
        """Let VmHWM (peak RSS) start again from the current RSS."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def threads(self) -> int:
        return self.status_kib_plain("Threads")

    def status_kib_plain(self, field: str) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
        assert match
        return int(match.group(1))

    def finish(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    @property
    def stderr(self) -> str:
        """Everything the process wrote, once it has exited."""
        self._reader.join(30)
        return "".join(self.lines)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._reader.join(10)
        if self.process.stderr is not None:
            self.process.stderr.close()

"""`ferry serve --workers N` as a user starts it, for the tests that drive its processes:
its log read as it is written, its processes by role, and what /proc says of them."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.proto import grpc_service_pb2 as pb
from tests.process import FerryProcess

SERVING_LINE = r"serving the Open Inference Protocol on "
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Workers(FerryProcess):
    """`ferry serve --workers N` as a user starts it; its log is read as it is written."""

    def __init__(self, repository: Path, workers: int = 2, *extra: str) -> None:
        super().__init__(
            repository, "--http-port", "0", "--metrics-port", "0", "--workers", str(workers),
            "--shutdown-grace", "10", *extra, wait_ready=False,
        )
        try:
            self.port = int(self.wait_for(r"serving on gRPC port (\d+)")[0].group(1))
            self.metrics_port = int(
                self.wait_for(r"metrics on http://[^:]+:(\d+)/")[0].group(1)
            )
            self.wait_for_frontends(workers)
        except BaseException:
            self.close()
            raise

    def wait_for(
        self, pattern: re.Pattern[str] | str, count: int = 1, timeout: float = 60.0
    ) -> list[re.Match[str]]:
        """As FerryProcess.wait_for, with time for an executor's restart by default."""
        return super().wait_for(pattern, count, timeout)

    def wait_for_frontends(self, count: int, *, after: int = 0) -> None:
        self.wait_for(SERVING_LINE, count + after)

    def children(self) -> dict[str, list[int]]:
        """The processes of the server by role, read from /proc."""
        roles: dict[str, list[int]] = {"executor": [], "frontend": []}
        for pid in children_of(self.pid):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--process-role" in command:
                role = command[command.index(b"--process-role") + 1].decode()
                roles[role].append(pid)
        return roles

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on the one /metrics."""
        total = 0.0
        for line in self.scrape().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """The exit code after a signal; killed if it does not exit in time."""
        try:
            return super().stop(signum, timeout)
        finally:
            self.close()
            print(self.log)  # shown by pytest when the test fails


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except FileNotFoundError:
        return []


def established(pid: int, port: int) -> int:
    """TCP connections to `port` that process `pid` holds, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


class HealthWatch:
    """The server's overall health as a Watch stream reports it, change by change."""

    def __init__(self, address: str) -> None:
        self.statuses: list[int] = []
        self._seen = threading.Condition()
        self._channel = grpc.insecure_channel(address)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            for reply in health_pb2_grpc.HealthStub(self._channel).Watch(
                health_pb2.HealthCheckRequest(service="")
            ):
                with self._seen:
                    self.statuses.append(reply.status)
                    self._seen.notify_all()
        except grpc.RpcError:
            pass  # the channel was closed

    def wait_for(self, last: list[int], timeout: float) -> None:
        """Until the latest statuses are `last`."""
        with self._seen:
            if not self._seen.wait_for(lambda: self.statuses[-len(last):] == last, timeout):
                raise AssertionError(f"health never became {last}: {self.statuses}")

    def close(self) -> None:
        self._channel.close()
        self._thread.join(5)


def infer_logits(
    address: str, model: str, x: np.ndarray, timeout: float | None = None
) -> np.ndarray:
    """The model's "logits" for input "x", by tritonclient on a connection of its own."""
    with triton.InferenceServerClient(address) as client:
        data = triton.InferInput("x", list(x.shape), "FP32")
        data.set_data_from_numpy(x)
        logits = client.infer(model, [data], client_timeout=timeout).as_numpy("logits")
        assert logits is not None
        return logits


def infer_request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    """A raw ModelInferRequest of input "x", for the generated stubs."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def own_connection(address: str) -> grpc.Channel:
    """A channel with a connection of its own (grpc shares them between channels)."""
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return channel


def channels_by_frontend(server: Workers, each: int) -> dict[int, list[grpc.Channel]]:
    """New connections until every frontend holds `each` of them, by frontend pid."""
    frontends = server.children()["frontend"]
    held = {pid: [] for pid in frontends}  # type: dict[int, list[grpc.Channel]]
    spare: list[grpc.Channel] = []
    for _ in range(64):
        before = {pid: established(pid, server.port) for pid in frontends}
        channel = own_connection(server.address)
        gained = [pid for pid in frontends if established(pid, server.port) > before[pid]]
        assert len(gained) == 1
        (held[gained[0]] if len(held[gained[0]]) < each else spare).append(channel)
        if all(len(channels) == each for channels in held.values()):
            break
    for channel in spare:
        channel.close()
    assert all(len(channels) == each for channels in held.values()), "a frontend never answered"
    return held

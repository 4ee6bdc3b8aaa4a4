"""`ferry serve --workers N` and `--session-threads N`, through real processes: the workers
share one gRPC port and every one of them answers, each serves metrics on
`--metrics-port` + its index, SIGTERM reaches them all, and the supervisor exits with
the worst exit code of its workers."""

from __future__ import annotations

import os
import signal
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from ferry.server.runtime import default_intra_op_threads
from tests.models import mlp_model, write_config
from tests.process import FerryProcess, listening_ports, metric
from tests.waiting import wait_until

StartProcess = Callable[..., FerryProcess]
FEATURES = 16


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES)
    write_config(repo / "m", "max_batch_size: 8\n")
    return repo


def free_port_pair() -> int:
    """A port P with P and P + 1 free now (the metrics ports of two workers)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no two consecutive free ports")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone while we looked
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")"
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def start_workers(start: StartProcess, repo: Path, *args: str) -> FerryProcess:
    server = start(repo, "--workers", "2", *args, ready_count=2)
    shared = server.wait_for(r"started 2 workers sharing gRPC port (\d+)")[0]
    assert int(shared.group(1)) == server.port
    return server


def infer_once(address: str) -> None:
    """One request on a connection of its own (the kernel spreads connections)."""
    with triton.InferenceServerClient(address) as client:
        tensor = triton.InferInput("x", [1, FEATURES], "FP32")
        tensor.set_data_from_numpy(np.ones((1, FEATURES), np.float32))
        assert client.infer("m", [tensor], client_timeout=30).as_numpy("probs").shape == (1, 4)


def ok_count(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return metric(text, "ferry_requests_total", model="m", code="OK") or 0.0


def test_workers_share_the_port_all_answer_and_serve_metrics_on_port_plus_index(
    repo: Path, ferry_process: StartProcess
) -> None:
    metrics_port = free_port_pair()
    server = start_workers(ferry_process, repo, "--metrics-port", str(metrics_port))
    workers = children(server.pid)
    assert len(workers) == 2
    by_index = {int(option(cmdline(w), "--metrics-port")) - metrics_port: w for w in workers}
    assert sorted(by_index) == [0, 1]
    for index, pid in by_index.items():
        assert listening_ports(pid) == {server.port, metrics_port + index}
    assert listening_ports(server.pid) == set()  # the supervisor serves nothing itself

    # Connections are spread by the kernel: keep opening new ones until both answered.
    sent = 0
    while min(ok_count(metrics_port), ok_count(metrics_port + 1)) == 0:
        assert sent < 200, "one worker never got a connection"
        infer_once(server.address)
        sent += 1
    assert ok_count(metrics_port) + ok_count(metrics_port + 1) == sent

    assert server.stop(signal.SIGTERM) == 0
    assert server.log.count("SIGTERM received: draining") == 2, server.log
    assert "Traceback" not in server.log
    for pid in workers:  # reaped by the supervisor before it exited
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_supervisor_forwards_signals_to_every_worker(
    repo: Path, ferry_process: StartProcess, signum: signal.Signals
) -> None:
    server = start_workers(ferry_process, repo)
    assert server.stop(signum) == 0
    assert server.log.count(f"{signum.name} received: draining") == 2, server.log
    assert server.log.count("INFO ferry: stopped") == 2, server.log


def test_the_supervisor_exits_with_the_worst_exit_code(
    repo: Path, ferry_process: StartProcess
) -> None:
    server = start_workers(ferry_process, repo)
    first, _ = children(server.pid)
    os.kill(first, signal.SIGKILL)  # a worker that dies: exit code -9
    wait_until(lambda: first not in children(server.pid) or _zombie(first),
               what="the killed worker to exit")
    infer_once(server.address)  # the other worker still serves
    assert server.stop(signal.SIGTERM) == 9  # max(|-9|, 0)
    assert server.log.count("SIGTERM received: draining") == 1


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_get_their_share_of_the_cores_or_the_given_session_threads(
    repo: Path, ferry_process: StartProcess
) -> None:
    server = start_workers(ferry_process, repo)
    expected = str(default_intra_op_threads(1, 2))
    assert [option(cmdline(w), "--session-threads") for w in children(server.pid)] == [
        expected, expected
    ]
    assert server.stop() == 0

    server = start_workers(ferry_process, repo, "--session-threads", "3")
    assert [option(cmdline(w), "--session-threads") for w in children(server.pid)] == ["3", "3"]
    assert server.stop() == 0


def python_threads(pid: int) -> int:
    """Threads named like the interpreter (onnxruntime's intra-op pool is among them)."""
    tasks = Path(f"/proc/{pid}/task")
    return sum((task / "comm").read_text().strip() == "python" for task in tasks.iterdir())


def test_session_threads_sets_each_sessions_intra_op_threads(
    tmp_path: Path, ferry_process: StartProcess
) -> None:
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES)
    write_config(repo / "m", "max_batch_size: 8\ninstance_group [ { count: 2 } ]\n")
    counts = {}
    for threads in (1, 4):
        server = ferry_process(repo, "--session-threads", str(threads))
        counts[threads] = python_threads(server.pid)
        infer_once(server.address)
        assert server.stop() == 0
    # onnxruntime starts threads - 1 pool threads per session; two sessions.
    assert counts[4] - counts[1] >= 2 * 3, counts

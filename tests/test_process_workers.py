"""`ferry serve --workers N` and `--session-threads N`, through real processes: N
frontends share one gRPC port and every one answers, one executor process owns the models
and serves the one /metrics, SIGTERM and SIGINT drain them all (exit 0), and the sessions
live in the executor alone. (tests/test_frontends.py drives batching across frontends,
faults, restarts and the exit code of a server that cannot recover.)"""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

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


def roles(pid: int) -> dict[str, list[int]]:
    by_role: dict[str, list[int]] = {}
    for child in children(pid):
        by_role.setdefault(option(cmdline(child), "--process-role"), []).append(child)
    return by_role


def start_workers(start: StartProcess, repo: Path, *args: str) -> FerryProcess:
    server = start(repo, "--workers", "2", *args, ready_count=2)
    shared = server.wait_for(r"serving on gRPC port (\d+): 2 frontends and one executor")[0]
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


def test_frontends_share_the_port_and_one_metrics_endpoint_counts_them_all(
    repo: Path, ferry_process: StartProcess
) -> None:
    server = start_workers(ferry_process, repo, "--metrics-port", "0")
    metrics_port = int(server.wait_for(r"metrics on http://[^:]+:(\d+)/")[0].group(1))
    processes = roles(server.pid)
    assert sorted(processes) == ["executor", "frontend"]
    assert len(processes["frontend"]) == 2 and len(processes["executor"]) == 1
    for frontend in processes["frontend"]:
        assert listening_ports(frontend) == {server.port}
    (executor,) = processes["executor"]
    assert listening_ports(executor) == {metrics_port}
    assert listening_ports(server.pid) == set()  # the supervisor serves nothing itself

    sent = 30
    for _ in range(sent):  # each on a new connection, spread by the kernel
        infer_once(server.address)
    # Every frontend's requests, counted in one place (frontends report within ms).
    wait_until(lambda: ok_count(metrics_port) == sent, what=f"{sent} OK requests counted")

    every = [*processes["frontend"], executor]
    assert server.stop(signal.SIGTERM) == 0
    assert server.log.count("SIGTERM received: draining") == 2, server.log  # the frontends
    assert "Traceback" not in server.log
    for pid in every:  # reaped by the supervisor before it exited
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_supervisor_drains_every_process_on_a_signal(
    repo: Path, ferry_process: StartProcess, signum: signal.Signals
) -> None:
    server = start_workers(ferry_process, repo)
    assert server.stop(signum) == 0
    assert server.log.count(f"{signum.name} received: draining") == 2, server.log
    assert "executor draining" in server.log


def test_sessions_live_in_the_executor_with_every_core_or_the_given_threads(
    repo: Path, ferry_process: StartProcess
) -> None:
    server = start_workers(ferry_process, repo)
    processes = roles(server.pid)
    # The frontends load no model: only the executor starts onnxruntime's threads.
    (executor,) = processes["executor"]
    assert all("--session-threads" not in cmdline(p) for p in processes["frontend"])
    assert server.stop() == 0

    server = start_workers(ferry_process, repo, "--session-threads", "3")
    (executor,) = roles(server.pid)["executor"]
    assert option(cmdline(executor), "--session-threads") == "3"
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

"""The cost of handing a request to the executor process, per request.

The same model (mlp_small: 256 FP32 inputs, 10 outputs per row) is served two ways, with
no gRPC in front: by a `ModelScheduler` in this process, and by a real executor process
through `RemoteScheduler` (shared memory and the Unix socket). The difference is the
hand-off: its latency, and its CPU per request (this event loop's thread plus the
executor's, against this loop's thread alone), at 1, 8 and 64 rows per request, one at a
time and 64 in flight.

    python -m benchmarks.handoff [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ferry.server.loading import LoadOptions
from ferry.server.manager import ModelManager
from ferry.server.remote import ExecutorLink, RemoteModels
from ferry.server.repository import ModelRepository
from ferry.server.rows import Tensors
from ferry.server.workers import socket_address

from .make_models import OVERHEAD_BOUND, write_repository

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
ROWS = (1, 8, 64)

Submit = Callable[[Tensors, int], "asyncio.Future[Tensors]"]


def _thread_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def _drive(submit: Submit, rows: int, concurrency: int, seconds: float,
                 executor_pid: int | None) -> tuple[float, float, float]:
    """Requests in waves of `concurrency`: (us per request wall, us CPU of this event
    loop's thread, us CPU of the executor's event loop thread). Model threads are left
    out on both sides; a lone request runs on the loop on both sides."""
    x = np.random.default_rng(0).standard_normal((rows, OVERHEAD_BOUND.features)).astype(
        np.float32)
    inputs = {"x": x}
    for _ in range(50):  # warm-up
        await asyncio.gather(*(submit(inputs, rows) for _ in range(concurrency)))
    count = 0
    cpu0 = time.thread_time()
    remote0 = _thread_cpu_s(executor_pid) if executor_pid else 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await asyncio.gather(*(submit(inputs, rows) for _ in range(concurrency)))
        count += concurrency
    wall = time.perf_counter() - start
    cpu = time.thread_time() - cpu0
    remote = (_thread_cpu_s(executor_pid) - remote0) if executor_pid else 0.0
    return wall / count * 1e6, cpu / count * 1e6, remote / count * 1e6


def _config(repo: Path) -> None:
    # Room for 64 requests of 64 rows in one batch, and no waiting.
    (repo / OVERHEAD_BOUND.name / "config.pbtxt").write_text(
        "max_batch_size: 4096\ndynamic_batching { max_queue_delay_microseconds: 0 }\n"
        "instance_group { count: 1 kind: KIND_CPU }\n"
    )


async def _local(repo: Path, points: list[tuple[int, int]], seconds: float) -> list[tuple[
        float, float, float]]:
    manager = ModelManager(ModelRepository(repo), LoadOptions())
    await manager.load(OVERHEAD_BOUND.name)
    model = manager.get(OVERHEAD_BOUND.name)

    def submit(inputs: Tensors, rows: int) -> asyncio.Future[Tensors]:
        return model.scheduler.submit(inputs, ("logits",), rows=rows, shape_key=((256,),))

    results = [await _drive(submit, rows, concurrency, seconds, None)
               for rows, concurrency in points]
    await manager.close(5)
    return results


async def _remote(repo: Path, points: list[tuple[int, int]], seconds: float) -> list[tuple[
        float, float, float]]:
    name = f"ferry-handoff-{secrets.token_hex(4)}"
    read_end, write_end = os.pipe()
    executor = subprocess.Popen(
        [sys.executable, "-m", "ferry.server.cli", "serve", str(repo), "--metrics-port", "-1",
         "--shutdown-grace", "2",
         "--log-level", "WARNING", "--process-role", "executor", "--executor-socket", name,
         "--ready-fd", str(write_end)],
        pass_fds=(write_end,),
    )
    os.close(write_end)
    try:
        assert os.read(read_end, 16), "the executor did not start"
        os.close(read_end)
        link = ExecutorLink(socket_address(name), 0)

        async def nothing() -> None:
            return None

        models = RemoteModels((link,), (), nothing)
        await models.load_all()
        model = models.get(OVERHEAD_BOUND.name)

        def submit(inputs: Tensors, rows: int) -> asyncio.Future[Tensors]:
            return model.scheduler.submit(inputs, ("logits",), rows=rows, shape_key=((256,),))

        results = [await _drive(submit, rows, concurrency, seconds, executor.pid)
                   for rows, concurrency in points]
        await models.close(5)
        return results
    finally:
        executor.terminate()
        executor.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.handoff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="per point")
    parser.add_argument("--work", type=Path, default=HERE / ".work" / "handoff")
    args = parser.parse_args(argv)
    repo = write_repository(args.work, (OVERHEAD_BOUND,))
    _config(repo)
    points = [(rows, 1) for rows in ROWS] + [(rows, 64) for rows in ROWS]
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    local = asyncio.run(_local(repo, points, args.seconds))
    remote = asyncio.run(_remote(repo, points, args.seconds))
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print("| rows/request | in flight | in process: us/request (loop CPU) | through the "
          "executor process: us/request (loop CPU here + executor loop CPU) | hand-off: "
          "latency us | hand-off: CPU us |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (rows, concurrency), here, there in zip(points, local, remote, strict=True):
        print(f"| {rows} | {concurrency} | {here[0]:.1f} ({here[1]:.1f}) | {there[0]:.1f} "
              f"({there[1]:.1f} + {there[2]:.1f}) | {there[0] - here[0]:+.1f} | "
              f"{there[1] + there[2] - here[1]:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

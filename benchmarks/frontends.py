"""One process against `--workers N` (N frontends and one executor) under ghz.

For each model and each process layout, in one run: throughput and latency at one
concurrency of batch-1 calls, the mean batch size (from the server's /metrics), the
memory of the whole process tree (PSS, so shared pages count once), and the CPU each
process role spends per request (the executor's event loop apart from its model threads):
the figures a projection to more cores is made from.

    python -m benchmarks.frontends [--workers 1 2] [--models mlp_small mlp_large]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from .load import LoadSpec, find_ghz, run_ghz, write_request
from .make_models import MODELS, write_repository
from .servers import RunningServer, ServerVariant, free_port

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Point:
    model: str
    workers: int
    concurrency: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float
    pss_mib: dict[str, float]  # by role
    cpu_us_per_request: dict[str, float]  # by role: frontends, executor loop, executor model


def _children(pid: int) -> list[int]:
    try:
        found = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return found + [grand for child in found for grand in _children(child)]


def _role(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"--process-role" in command:
        return command[command.index(b"--process-role") + 1].decode()
    workers = command[command.index(b"--workers") + 1] if b"--workers" in command else b"1"
    return "supervisor" if int(workers) > 1 else "server"


def _cpu_s(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds so far: frontends, the executor's event loop (its main thread), and
    the executor's other threads (the model); a single process counts as 'server'."""
    totals: dict[str, float] = {}
    for pid in [root, *_children(root)]:
        role = _role(pid)
        if role == "executor":
            loop = _cpu_s(pid, pid)
            totals["executor loop"] = totals.get("executor loop", 0.0) + loop
            totals["executor model"] = totals.get("executor model", 0.0) + _cpu_s(pid) - loop
        elif role == "server":
            loop = _cpu_s(pid, pid)
            totals["server loop"] = totals.get("server loop", 0.0) + loop
            totals["server model"] = totals.get("server model", 0.0) + _cpu_s(pid) - loop
        else:
            totals[role] = totals.get(role, 0.0) + _cpu_s(pid)
    return totals


def _pss_mib(root: int) -> dict[str, float]:
    """Proportional set size by role: shared pages (libraries, the shared-memory regions)
    are split between the processes that map them, so the roles add up."""
    by_role: dict[str, float] = {}
    for pid in [root, *_children(root)]:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                role = _role(pid)
                by_role[role] = by_role.get(role, 0.0) + int(line.split()[1]) / 1024
    return by_role


def _metric(port: int, name: str, model: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f'{name}{{model="{model}"}}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def measure(args: argparse.Namespace) -> list[Point]:
    work = args.work
    repo = write_repository(work / "models")
    ghz = find_ghz(args.ghz)
    points: list[Point] = []
    for model in [m for m in MODELS if m.name in args.models]:
        request = write_request(work / "requests" / f"{model.name}-1.bin", model.name,
                                model.features, 1)
        for workers in args.workers:
            metrics_port = free_port()
            command = (
                "{python} -m ferry.server.cli serve {repo} --grpc-port {port} "
                f"--metrics-port {metrics_port} --log-level WARNING --workers {workers} "
                + args.server_args
            )
            variant = ServerVariant(f"ferry-w{workers}", command)
            log = work / "logs" / f"frontends-{model.name}-w{workers}.log"
            with RunningServer(variant, repo, [model.name], log) as server:
                assert server._process is not None
                root = server._process.pid
                spec = LoadSpec(args.concurrency, 1, duration_s=args.warmup,
                                connections=args.connections)
                run_ghz(ghz, server.target, request, spec, model.name, variant.name)
                before = (_metric(metrics_port, "ferry_inferences_total", model.name),
                          _metric(metrics_port, "ferry_batches_total", model.name),
                          _cpu_by_role(root))
                spec = LoadSpec(args.concurrency, 1, duration_s=args.duration,
                                connections=args.connections)
                result = run_ghz(ghz, server.target, request, spec, model.name, variant.name)
                after = (_metric(metrics_port, "ferry_inferences_total", model.name),
                         _metric(metrics_port, "ferry_batches_total", model.name),
                         _cpu_by_role(root))
                pss = _pss_mib(root)
                server.check_alive()
            answered = max(1, result.count)
            cpu = {role: (after[2][role] - before[2].get(role, 0.0)) / answered * 1e6
                   for role in after[2] if role != "supervisor"}
            batches = after[1] - before[1]
            point = Point(
                model.name, workers, args.concurrency, result.req_per_s, result.p50_ms,
                result.p99_ms, sum(result.errors.values()),
                (after[0] - before[0]) / batches if batches else float("nan"), pss, cpu,
            )
            print(json.dumps(asdict(point)), flush=True)
            points.append(point)
            time.sleep(1)  # let the stopped server's sockets and threads go
    return points


def table(points: list[Point]) -> str:
    lines = [
        "| model | processes | req/s | p50 ms | p99 ms | errors | mean batch | PSS MiB (by role) "
        "| CPU us/request by role |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in points:
        layout = "one" if p.workers == 1 else f"{p.workers} frontends + executor"
        cpu = ", ".join(f"{role} {us:.0f}" for role, us in sorted(p.cpu_us_per_request.items()))
        pss = f"{sum(p.pss_mib.values()):.0f}"
        if len(p.pss_mib) > 1:
            pss += " (" + ", ".join(f"{r} {m:.0f}" for r, m in sorted(p.pss_mib.items())) + ")"
        lines.append(
            f"| {p.model} | {layout} | {p.req_per_s:,.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} "
            f"| {p.errors} | {p.mean_batch:.1f} | {pss} | {cpu} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontends",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=[m.name for m in MODELS])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=HERE / ".work")
    parser.add_argument("--ghz", default=None)
    parser.add_argument("--server-args", default="", help="more flags for ferry serve")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    points = measure(args)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    print(table(points))
    return 0


if __name__ == "__main__":
    sys.exit(main())

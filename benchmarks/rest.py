"""REST against gRPC on one Ferry, in one run: perf_analyzer drives the same model at the
same concurrency over gRPC (unary ModelInfer), over HTTP with the binary tensor extension,
and over HTTP with JSON tensors.

    .venv/bin/python -m benchmarks.rest                  # about 1.5 minutes
    .venv/bin/python -m benchmarks.rest --smoke          # seconds: checks that it works

One load generator for all three, so the protocols differ and nothing else: Triton's
perf_analyzer (`.tools/bin/perf_analyzer`, from scripts/install-test-tools.sh), synchronous
calls, one connection per concurrent request, batch-1 requests of random FP32 rows. The
three protocols take turns, round after round, so that a busy spell of the machine spreads
over them all; each figure is the median of its rounds. For reference, each round also
measures gRPC unary with ghz, the load tool of `benchmarks.run` (written in Go, lighter on
the shared cores than perf_analyzer's gRPC client), at the same concurrency.

The target of issue 16: REST binary >= 0.7x gRPC unary throughput at concurrency 64 on the
overhead-bound model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .load import LoadSpec, find_ghz, run_ghz, write_request
from .make_models import OVERHEAD_BOUND, write_repository
from .servers import RunningServer, ServerVariant, free_port

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 0.7


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    flags: tuple[str, ...]  # perf_analyzer's, besides -u
    http: bool


GHZ = "grpc (ghz)"
PROTOCOLS = (
    Protocol("grpc", ("-i", "grpc"), http=False),
    Protocol("http-binary", ("-i", "http", "--input-tensor-format", "binary",
                             "--output-tensor-format", "binary"), http=True),
    Protocol("http-json", ("-i", "http", "--input-tensor-format", "json",
                           "--output-tensor-format", "json"), http=True),
)


@dataclass(frozen=True, slots=True)
class Point:
    protocol: str
    round: int
    concurrency: int
    infer_per_s: float
    p50_us: float
    p99_us: float


def find_perf_analyzer() -> str:
    pinned = HERE.parent / ".tools" / "bin" / "perf_analyzer"
    if pinned.is_file():
        return str(pinned)
    found = shutil.which("perf_analyzer")
    if found is None:
        raise SystemExit("perf_analyzer not found: run scripts/install-test-tools.sh")
    return found


def measure(
    perf_analyzer: str, protocol: Protocol, url: str, model: str, concurrency: int,
    window_ms: int, work: Path, round_index: int,
) -> Point:
    report = work / f"{protocol.name}-{round_index}.csv"
    command = [
        perf_analyzer, "-m", model, "-u", url, *protocol.flags,
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--measurement-interval", str(window_ms),
        # Two shared cores never hold perf_analyzer's default 10 %: take what comes.
        "--stability-percentage", "999", "--max-trials", "10",
        "-f", str(report),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer ({protocol.name}) failed:\n{done.stdout}{done.stderr}")
    with report.open() as file:
        row = next(csv.DictReader(file))
    return Point(
        protocol.name, round_index, concurrency, float(row["Inferences/Second"]),
        float(row["p50 latency"]), float(row["p99 latency"]),
    )


def measure_ghz(ghz: Path, target: str, request: Path, concurrency: int, seconds: float,
                round_index: int) -> Point:
    spec = LoadSpec(concurrency=concurrency, duration_s=seconds, connections=4)
    result = run_ghz(ghz, target, request, spec, OVERHEAD_BOUND.name, "ferry")
    if result.errors:
        raise RuntimeError(f"ghz saw errors: {result.errors}")
    return Point(GHZ, round_index, concurrency, result.req_per_s,
                 result.p50_ms * 1000, result.p99_ms * 1000)


def summary(points: list[Point]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for name in (*(p.name for p in PROTOCOLS), GHZ):
        mine = [p for p in points if p.protocol == name]
        if not mine:
            continue
        table[name] = {
            "infer_per_s": statistics.median(p.infer_per_s for p in mine),
            "p50_ms": statistics.median(p.p50_us for p in mine) / 1000,
            "p99_ms": statistics.median(p.p99_us for p in mine) / 1000,
        }
    grpc = table["grpc"]["infer_per_s"]
    for row in table.values():
        row["x_grpc"] = row["infer_per_s"] / grpc if grpc else 0.0
    return table


def markdown(table: dict[str, dict[str, float]], concurrency: int, rounds: int,
             window_ms: int, load: str) -> str:
    lines = [
        f"perf_analyzer, `{OVERHEAD_BOUND.name}` (overhead-bound), batch-1 requests, "
        f"concurrency {concurrency}, {rounds} rounds of each protocol in turn, "
        f"{window_ms} ms windows; medians. Load average before / after: {load}.",
        "",
        "| protocol | infer/s | x gRPC | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in table.items():
        if name == GHZ:
            continue
        lines.append(
            f"| {name} | {row['infer_per_s']:,.0f} | {row['x_grpc']:.2f} | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} |"
        )
    ratio = table["http-binary"]["x_grpc"]
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    lines += ["", f"Target: REST binary >= {TARGET_RATIO}x gRPC unary: **{verdict}** "
              f"({ratio:.2f}x, both driven by perf_analyzer)."]
    if GHZ in table:
        ghz = table[GHZ]
        against = table["http-binary"]["infer_per_s"] / ghz["infer_per_s"]
        lines += ["", f"For reference, gRPC unary under ghz in the same rounds: "
                  f"{ghz['infer_per_s']:,.0f} infer/s (p50 {ghz['p50_ms']:.2f} ms, p99 "
                  f"{ghz['p99_ms']:.2f} ms); REST binary under perf_analyzer is "
                  f"{against:.2f}x that."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=4000)
    parser.add_argument("--smoke", action="store_true", help="one short round at 4")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "rest",
                        help="where rest.json and rest.md go")
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.rounds, args.window_ms = 4, 1, 500
    perf_analyzer = find_perf_analyzer()
    ghz = find_ghz()
    work = Path(tempfile.mkdtemp(prefix="ferry-rest-bench-"))
    repo = write_repository(work / "models", (OVERHEAD_BOUND,))
    request = write_request(work / "request.bin", OVERHEAD_BOUND.name, OVERHEAD_BOUND.features, 1)
    http_port = free_port()
    variant = ServerVariant(
        "ferry",
        "{python} -m ferry.server.cli serve {repo} --host 127.0.0.1 --grpc-port {port} "
        f"--http-port {http_port} --metrics-port -1 --log-level WARNING",
    )
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    points: list[Point] = []
    with RunningServer(variant, repo, [OVERHEAD_BOUND.name], work / "server.log") as server:
        for round_index in range(args.rounds):
            for protocol in PROTOCOLS:
                url = f"127.0.0.1:{http_port}" if protocol.http else server.target
                point = measure(perf_analyzer, protocol, url, OVERHEAD_BOUND.name,
                                args.concurrency, args.window_ms, work, round_index)
                server.check_alive()
                print(f"round {round_index}: {point.protocol}: {point.infer_per_s:,.0f} infer/s",
                      file=sys.stderr)
                points.append(point)
            point = measure_ghz(ghz, server.target, request, args.concurrency,
                                3 * args.window_ms / 1000, round_index)
            print(f"round {round_index}: {GHZ}: {point.infer_per_s:,.0f} infer/s", file=sys.stderr)
            points.append(point)
    load = f"{load_before} / " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    table = summary(points)
    text = markdown(table, args.concurrency, args.rounds, args.window_ms, load)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rest.json").write_text(json.dumps(
        {"points": [asdict(p) for p in points], "summary": table}, indent=2) + "\n")
    (args.out / "rest.md").write_text(text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

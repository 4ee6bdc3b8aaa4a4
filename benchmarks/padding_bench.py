"""Mixed-length workload: batch-1 requests with lengths drawn uniformly from 8 to 128
against a transformer-style masked encoder, Ferry with padding on, Ferry with it off
(today's grouping by shape) and the naive server, in the same run.

ghz sends one request file per run, so the load comes from this asyncio generator with
the grpc.aio stubs: CONCURRENCY workers, each sending its next request as soon as the
last is answered, from a pool of requests built and serialised before the clock starts.
It shares the machine's cores with the server under test (as ghz does in run.py).

    python -m benchmarks.padding_bench --duration 20 --out benchmarks/results/padding.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from tests.models import masked_encoder_model

from .servers import DEFAULT_SERVERS, FERRY, NAIVE, RunningServer, ServerVariant, free_port

MODEL = "encoder"
VOCAB = 1000


@dataclass(frozen=True, slots=True)
class Result:
    server: str
    requests: int
    errors: int
    seconds: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    mean_batch_rows: float | None  # from the statistics extension (Ferry only)
    padded_per_real: float | None  # padded / real elements along the sequence axis
    server_cpu_us: float  # the server's CPU (every thread) per answered request
    load_cpu_us: float  # the load generator's (this process's) CPU per answered request


def config_text(
    padding: bool, max_batch_size: int, delay_us: int, length_buckets: str = ""
) -> str:
    text = (
        f"max_batch_size: {max_batch_size}\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    )
    if padding:
        text += (
            'parameters { key: "padding_inputs" value { string_value: '
            '"input_ids=0,attention_mask=0" } }\n'
        )
    if length_buckets:
        text += (
            'parameters { key: "length_buckets" value { string_value: '
            f'"{length_buckets}" }} }}\n'
        )
    return text


def make_repo(
    root: Path, padding: bool, args: argparse.Namespace, length_buckets: str = ""
) -> Path:
    name = "padding-off" if not padding else "padding-on-listed" if length_buckets else "padding-on"
    repo = root / name
    masked_encoder_model(
        repo / MODEL / "1" / "model.onnx",
        vocab=VOCAB,
        width=args.width,
        max_length=args.max_length,
        layers=args.layers,
    )
    (repo / MODEL / "config.pbtxt").write_text(
        config_text(padding, args.max_batch_size, args.delay_us, length_buckets)
    )
    return repo


def request_pool(args: argparse.Namespace) -> tuple[list[bytes], list[int]]:
    """Serialised requests and their lengths, uniform in min..max length."""
    rng = np.random.default_rng(args.seed)
    pool, lengths = [], []
    for _ in range(args.pool):
        length = int(rng.integers(args.min_length, args.max_length + 1))
        ids = rng.integers(1, VOCAB, (1, length)).astype(np.int64)
        mask = np.ones((1, length), np.int64)
        request = pb.ModelInferRequest(model_name=MODEL)
        for name, array in (("input_ids", ids), ("attention_mask", mask)):
            request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
            request.raw_input_contents.append(array.tobytes())
        pool.append(request.SerializeToString())
        lengths.append(length)
    return pool, lengths


async def drive(
    target: str, pool: list[bytes], lengths: list[int], concurrency: int, seconds: float
) -> tuple[list[float], int, int, float]:
    """Latencies (s) of answered requests, errors, real elements sent, and elapsed time."""
    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        latencies: list[float] = []
        errors = 0
        real = 0
        stop_at = time.perf_counter() + seconds

        async def worker(index: int) -> None:
            nonlocal errors, real
            position = index * 7919
            while time.perf_counter() < stop_at:
                pick = position % len(pool)
                position += 1
                start = time.perf_counter()
                try:
                    await infer(pool[pick], timeout=30)
                except grpc.RpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                real += lengths[pick]

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return latencies, errors, real, time.perf_counter() - started


def mean_batch_rows(target: str) -> float | None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL)).model_stats[0]
        except grpc.RpcError:
            return None  # the naive server has no statistics extension
    return stats.inference_count / stats.execution_count if stats.execution_count else None


def padded_elements(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(r'^ferry_padded_elements_total\{model="encoder"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def measure(
    name: str, command: str, repo: Path, args: argparse.Namespace, logs: Path
) -> Result:
    metrics_port = free_port() if "--metrics-port" in command else 0
    command = command.replace("--metrics-port -1", f"--metrics-port {metrics_port}")
    variant = ServerVariant(name, command)
    pool, lengths = request_pool(args)
    with RunningServer(variant, repo, [MODEL], logs / f"{name}.log") as server:
        asyncio.run(drive(server.target, pool, lengths, args.concurrency, args.warmup))
        padded_before = padded_elements(metrics_port) if metrics_port else 0.0
        server_cpu, load_cpu = server.cpu_seconds(), time.process_time()
        latencies, errors, real, elapsed = asyncio.run(
            drive(server.target, pool, lengths, args.concurrency, args.duration)
        )
        server_cpu, load_cpu = server.cpu_seconds() - server_cpu, time.process_time() - load_cpu
        server.check_alive()
        batch_rows = mean_batch_rows(server.target) if name != NAIVE else None
        ratio = None
        if metrics_port and name.startswith("ferry-padding"):
            added = padded_elements(metrics_port) - padded_before
            ratio = (real + added) / real if real else None
    latencies.sort()
    return Result(
        server=name,
        requests=len(latencies),
        errors=errors,
        seconds=round(elapsed, 2),
        throughput_rps=round(len(latencies) / elapsed, 1),
        p50_ms=round(1e3 * statistics.median(latencies), 2) if latencies else 0.0,
        p99_ms=round(1e3 * latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else 0.0,
        mean_batch_rows=round(batch_rows, 2) if batch_rows else None,
        padded_per_real=round(ratio, 3) if ratio else None,
        server_cpu_us=round(1e6 * server_cpu / max(1, len(latencies)), 1),
        load_cpu_us=round(1e6 * load_cpu / max(1, len(latencies)), 1),
    )


def in_process(repo: Path, args: argparse.Namespace) -> dict[str, float]:
    """onnxruntime alone on the same lengths (no server): rows/s run one request at a
    time, and run in batches of up to max_batch_size rows that share a length bucket
    (powers of two, and `--length-buckets` when given), each padded to its bucket, as
    Ferry's fullest batches are; shows what batching can gain on this machine at all."""
    session = ort.InferenceSession(
        str(repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_length, args.max_length + 1, 4 * args.max_batch_size)

    def feed(rows: int, length: int) -> dict[str, np.ndarray]:
        return {
            "input_ids": np.ones((rows, length), np.int64),
            "attention_mask": np.ones((rows, length), np.int64),
        }

    session.run(None, feed(args.max_batch_size, args.max_length))  # warm-up
    start = time.perf_counter()
    for length in lengths:
        session.run(None, feed(1, int(length)))
    alone = len(lengths) / (time.perf_counter() - start)

    def bucketed(bucket_of: Callable[[int], int]) -> float:
        by_bucket: dict[int, int] = {}
        for length in lengths:
            bucket = bucket_of(int(length))
            by_bucket[bucket] = by_bucket.get(bucket, 0) + 1
        start = time.perf_counter()
        for bucket, count in by_bucket.items():
            for first in range(0, count, args.max_batch_size):
                session.run(None, feed(min(args.max_batch_size, count - first), bucket))
        return round(len(lengths) / (time.perf_counter() - start), 1)

    ceiling = {
        "alone_rows_per_s": round(alone, 1),
        "padded_batches_rows_per_s": bucketed(lambda n: 1 << (n - 1).bit_length()),
    }
    if args.length_buckets:
        listed = sorted(int(n) for n in args.length_buckets.split(","))
        ceiling["listed_buckets_rows_per_s"] = bucketed(
            lambda n: next((b for b in listed if b >= n), n)
        )
    return ceiling


def report(
    results: list[Result], args: argparse.Namespace, ceiling: dict[str, float] | None = None
) -> str:
    by_name = {r.server: r for r in results}
    lines = [
        f"Mixed lengths {args.min_length}..{args.max_length}, batch 1, concurrency "
        f"{args.concurrency}, {args.duration:.0f} s each; encoder width {args.width}, "
        f"{args.layers} layer(s)",
        "",
        "| server | req/s | p50 ms | p99 ms | mean batch rows | padded/real | errors "
        "| server CPU us/req | load CPU us/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.server} | {r.throughput_rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.mean_batch_rows if r.mean_batch_rows is not None else '-'} | "
            f"{r.padded_per_real if r.padded_per_real is not None else '-'} | {r.errors} | "
            f"{r.server_cpu_us:.0f} | {r.load_cpu_us:.0f} |"
        )
    on, off, naive = (by_name.get(n) for n in ("ferry-padding", "ferry-no-padding", NAIVE))
    if on and off and naive:
        lines += [
            "",
            f"padding on / padding off: {on.throughput_rps / off.throughput_rps:.2f}x "
            f"throughput (target >= 3x); p99 {on.p99_ms:.2f} vs {off.p99_ms:.2f} ms "
            "(target: no worse)",
            f"padding on / naive: {on.throughput_rps / naive.throughput_rps:.2f}x throughput "
            "(target >= 3x)",
        ]
    if ceiling:
        lines += [
            "",
            f"in-process onnxruntime on the same lengths: {ceiling['alone_rows_per_s']:.0f} "
            f"rows/s one request at a time, {ceiling['padded_batches_rows_per_s']:.0f} rows/s "
            f"in batches of up to {args.max_batch_size} padded to power-of-two buckets"
            + (
                f", {ceiling['listed_buckets_rows_per_s']:.0f} rows/s to the listed buckets"
                if "listed_buckets_rows_per_s" in ceiling else ""
            ),
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per server")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--min-length", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--width", type=int, default=64, help="the encoder's model width")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--delay-us", type=int, default=0, help="max_queue_delay_microseconds")
    parser.add_argument("--pool", type=int, default=1024, help="distinct requests to cycle")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--length-buckets",
        default="",
        help='also run Ferry with padding to these lengths (config length_buckets, '
        'e.g. "16,32,48,64,80,96,112,128") as ferry-padding-listed',
    )
    parser.add_argument("--server-args", default="", help="more flags for ferry serve")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ferry-padding-bench-") as folder:
        root = Path(folder)
        on, off = make_repo(root, True, args), make_repo(root, False, args)
        ferry = f"{FERRY} {args.server_args}".strip()
        runs = [
            ("ferry-padding", ferry, on),
            ("ferry-no-padding", ferry, off),
            (NAIVE, DEFAULT_SERVERS[NAIVE], off),
        ]
        if args.length_buckets:
            listed = make_repo(root, True, args, args.length_buckets)
            runs.insert(1, ("ferry-padding-listed", ferry, listed))
        results = [
            measure(name, command, repo, args, root / "logs") for name, command, repo in runs
        ]
        ceiling = in_process(on, args)
    text = report(results, args, ceiling)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        setup = {
            "python": sys.version.split()[0],
            "onnxruntime": ort.__version__,
            "grpcio": grpc.__version__,
            "machine": platform.machine(),
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        document = {
            "setup": setup,
            "in_process": ceiling,
            "results": [asdict(r) for r in results],
            "report": text,
        }
        args.out.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

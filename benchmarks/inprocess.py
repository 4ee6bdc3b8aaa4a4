"""Ferry's own CPU per unary request, in-process: no gRPC, no load tool, no other process.

    .venv/bin/python -m benchmarks.inprocess --model mlp_small --concurrency 1 64
    PYTHONPATH=benchmarks/.work/before/<commit>-path .venv/bin/python -m benchmarks.inprocess

Starts a FerryServer on the event loop `ferry serve` uses (its gRPC port bound to a free
port and never called), then calls `InferenceServicer.ModelInfer` on it from CONCURRENCY
tasks, each awaiting its answer before sending the next: the request parsed from the same
bytes ghz sends and the answer serialized, as grpc.aio does around a handler. It reports
the event loop thread's CPU time per request (`time.thread_time_ns`), the median of
`--rounds` rounds, so that a neighbour's load moves it little. With PYTHONPATH pointing at
an earlier build (`benchmarks.previous_build`), the same script measures that build.
`--profile OUT` writes a cProfile of one more round per concurrency to OUT-cN.txt (the
45 functions with the most time of their own, and the command that made it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ferry.proto import grpc_service_pb2 as pb
from ferry.server.app import FerryServer, ServerOptions
from ferry.server.event_loop import loop_factory

from .load import write_request
from .make_models import MODELS, write_repository

HERE = Path(__file__).resolve().parent


class _Context:
    """The part of grpc.aio's ServicerContext that ModelInfer uses."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


async def _round(servicer: Any, payload: bytes, concurrency: int, requests: int) -> int:
    """CPU nanoseconds of the loop's thread for `requests` calls from `concurrency` tasks."""
    context = _Context()
    parse = pb.ModelInferRequest.FromString
    each = requests // concurrency

    async def caller() -> None:
        for _ in range(each):
            response = await servicer.ModelInfer(parse(payload), context)
            response.SerializeToString()

    start = time.thread_time_ns()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.thread_time_ns() - start


async def _measure(args: argparse.Namespace) -> None:
    model = next(m for m in MODELS if m.name == args.model)
    with tempfile.TemporaryDirectory() as scratch:
        repo = write_repository(Path(scratch) / "models", (model,))
        # The bytes ghz sends (benchmarks.load).
        payload = write_request(
            Path(scratch) / "request.bin", model.name, model.features, 1
        ).read_bytes()
        server = FerryServer(ServerOptions(
            model_path=repo, host="127.0.0.1", grpc_port=0, http_port=None,
            metrics_port=None, exit_on_error=True,
        ))
        await server.start()
        try:
            servicer = server.servicer
            for concurrency in args.concurrency:
                count = args.requests - args.requests % concurrency
                await _round(servicer, payload, concurrency, count)  # warm-up
                rounds = [
                    await _round(servicer, payload, concurrency, count) / count / 1000
                    for _ in range(args.rounds)
                ]
                print(
                    f"{model.name} c={concurrency}: {statistics.median(rounds):.2f} us/request "
                    f"on the loop's thread (median of {args.rounds} rounds of {count}; "
                    f"min {min(rounds):.2f}, max {max(rounds):.2f})",
                    flush=True,
                )
                if args.profile is not None:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    await _round(servicer, payload, concurrency, count)
                    profiler.disable()
                    out = Path(f"{args.profile}-c{concurrency}.txt")
                    text = io.StringIO()
                    stats = pstats.Stats(profiler, stream=text)
                    stats.sort_stats("tottime").print_stats(45)
                    command = f"python -m benchmarks.inprocess {' '.join(sys.argv[1:])}"
                    out.write_text(
                        f"{model.name} c={concurrency}, {count} requests: `{command}`\n\n"
                        + text.getvalue()
                    )
        finally:
            await server.stop(0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__)
    parser.add_argument("--model", default="mlp_small", choices=[m.name for m in MODELS])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--requests", type=int, default=6400, help="per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", type=Path, help="path prefix of a cProfile per concurrency")
    parser.add_argument("--event-loop", default="uvloop", choices=["uvloop", "asyncio"])
    args = parser.parse_args(argv)
    runner = asyncio.Runner(loop_factory=loop_factory(args.event_loop))
    with runner:
        runner.run(_measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

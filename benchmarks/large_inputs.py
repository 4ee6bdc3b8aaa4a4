"""What a large tensor costs the event loop, in-process: parsing and decoding one request
(gRPC's ModelInferRequest bytes, REST's binary and JSON bodies) and encoding one REST
binary answer, at several sizes. No server, no sockets: the code each front door runs on
the loop's thread for a request, CPU time per call, the best of `--repeats` timings.

    .venv/bin/python -m benchmarks.large_inputs
    PYTHONPATH=benchmarks/.work/before/<commit>-path .venv/bin/python -m benchmarks.large_inputs

With PYTHONPATH pointing at an earlier build (`benchmarks.previous_build`), the same script
measures that build, so that the two can be set side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from ferry.proto import grpc_service_pb2 as pb
from ferry.server.config import ModelSettings, TensorSpec
from ferry.server.rest_codec import RestRequest, encode_infer, parse_infer
from ferry.server.tensors import TensorLimits, decode_request

try:  # builds before it parsed gRPC requests whole
    from ferry.server.wire import tolerant_infer_request as parse_grpc
except ImportError:
    parse_grpc = pb.ModelInferRequest.FromString

WIDTH = 256  # FP32 values a row: 1 KiB
SETTINGS = ModelSettings(
    "m", 1 << 20, (TensorSpec("x", "FP32", (WIDTH,)),), (TensorSpec("y", "FP32", (WIDTH,)),)
)
LIMITS = TensorLimits(max_elements=1 << 40, max_bytes=1 << 40)


def grpc_request(rows: int) -> Callable[[], object]:
    request = pb.ModelInferRequest(model_name="m", id="caller")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, WIDTH])
    request.raw_input_contents.append(np.ones((rows, WIDTH), np.float32).tobytes())
    data = request.SerializeToString()

    def run() -> object:
        parsed = parse_grpc(data)
        if isinstance(parsed, pb.ModelInferRequest):
            return decode_request(parsed, SETTINGS, LIMITS)
        return decode_request(parsed.request, SETTINGS, LIMITS, parsed.raw_contents)

    return run


def rest_binary_request(rows: int) -> Callable[[], object]:
    header = json.dumps({"inputs": [{
        "name": "x", "datatype": "FP32", "shape": [rows, WIDTH],
        "parameters": {"binary_data_size": rows * WIDTH * 4},
    }]}).encode()
    body = header + np.ones((rows, WIDTH), np.float32).tobytes()
    return lambda: parse_infer(body, str(len(header)), "m", "", SETTINGS, LIMITS).decode(
        SETTINGS, LIMITS
    )


def rest_json_request(rows: int) -> Callable[[], object]:
    body = json.dumps({"inputs": [{
        "name": "x", "datatype": "FP32", "shape": [rows, WIDTH], "data": [0.25] * (rows * WIDTH),
    }]}).encode()
    return lambda: parse_infer(body, None, "m", "", SETTINGS, LIMITS).decode(SETTINGS, LIMITS)


def rest_binary_answer(rows: int) -> Callable[[], object]:
    request = RestRequest(pb.ModelInferRequest(), None, False)
    outputs = {"y": np.ones((rows, WIDTH), np.float32)}
    return lambda: encode_infer(request, SETTINGS, "1", outputs, 1 << 40)


CASES: dict[str, Callable[[int], Callable[[], object]]] = {
    "grpc request": grpc_request,
    "rest binary request": rest_binary_request,
    "rest json request": rest_json_request,
    "rest binary answer": rest_binary_answer,
}


def cpu_us(run: Callable[[], object], calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            run()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 600, 16384],
                        help="rows of 1 KiB per request (default: 1 64 600 16384)")
    parser.add_argument("--json-rows-max", type=int, default=600,
                        help="larger JSON bodies are skipped (seconds each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-mb", type=float, default=200.0,
                        help="bytes handled per timing, which sets the calls per timing")
    args = parser.parse_args(argv)
    print("| case | rows | KiB | CPU us per call |")
    print("|---|---:|---:|---:|")
    for name, make in CASES.items():
        for rows in args.rows:
            if name == "rest json request" and rows > args.json_rows_max:
                continue
            calls = max(3, min(20_000, int(args.budget_mb * 1e6 // (rows * WIDTH * 4))))
            spent = cpu_us(make(rows), calls, args.repeats)
            print(f"| {name} | {rows} | {rows * WIDTH * 4 // 1024:,} | {spent:,.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ferry on one GPU against onnxruntime-gpu alone, with a ResNet-50-sized model.

Builds the model by script (random weights: stem, bottleneck stages [3, 4, 6, 3], global
average pooling, a fully connected layer; FP32 [batch, 3, 224, 224] with a dynamic batch),
then in one run reports:

- in-process onnxruntime throughput (images/s) at batch 1, 8, 32 and 64: the ceiling;
- Ferry's throughput and p50/p99 latency at concurrency 1, 16, 64 and 128 (one image per
  request, from ghz when it is installed, else a Python asyncio client);
- the ratio of Ferry's throughput to the best in-process figure.

    .venv/bin/python -m benchmarks.gpu_bench                 # on a GPU machine: a few minutes
    .venv/bin/python -m benchmarks.gpu_bench --dry-run       # a tiny network on the CPU: seconds

On a GPU the server runs with `--gpu-fallback fail`, so a machine where CUDA does not work
fails rather than measuring the CPU. `--dry-run` keeps every step (the KIND_GPU config
falls back to the CPU) and is what CI runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ferry.client import AsyncFerryClient
from ferry.proto import grpc_service_pb2 as pb

from .load import LoadSpec, find_ghz, run_ghz
from .servers import FERRY, RunningServer, ServerVariant

ROOT = Path(__file__).resolve().parent.parent
MODEL = "resnet"
INPUT = "images"
OUTPUT = "logits"
OPSET = 17
BATCH_SIZES = (1, 8, 32, 64)
CONCURRENCIES = (1, 16, 64, 128)
MAX_BATCH_SIZE = 64


@dataclass(frozen=True, slots=True)
class Network:
    """The shape of the residual network: ResNet-50's by default."""

    width: int = 64
    blocks: tuple[int, ...] = (3, 4, 6, 3)
    image: int = 224
    classes: int = 1000

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image, self.image)


RESNET50 = Network()
TINY = Network(width=4, blocks=(1, 1, 1, 1), image=32, classes=10)


def build_resnet(net: Network, seed: int = 0) -> onnx.ModelProto:
    """A bottleneck ResNet with random weights (batch norm folded into conv biases)."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []
    count = 0

    def conv(x: str, cin: int, cout: int, k: int, stride: int = 1, gain: float = 1.0) -> str:
        nonlocal count
        count += 1
        name = f"conv{count}"
        scale = gain * np.sqrt(2.0 / (cin * k * k))
        w = (rng.standard_normal((cout, cin, k, k)) * scale).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"{name}.w"))
        weights.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b"))
        nodes.append(
            helper.make_node(
                "Conv", [x, f"{name}.w", f"{name}.b"], [name],
                kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
            )
        )
        return name

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [f"{x}.relu"]))
        return f"{x}.relu"

    x = relu(conv(INPUT, 3, net.width, 7, stride=2))
    nodes.append(
        helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1])
    )
    x, channels = "pool", net.width
    for stage, blocks in enumerate(net.blocks):
        width = net.width * 2**stage
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            y = relu(conv(x, channels, width, 1))
            y = relu(conv(y, width, width, 3, stride))
            y = conv(y, width, 4 * width, 1, gain=0.2)  # keeps the random residuals tame
            shortcut = conv(x, channels, 4 * width, 1, stride) if block == 0 else x
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{y}.add"]))
            x, channels = relu(f"{y}.add"), 4 * width
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], axis=1))
    fc = (rng.standard_normal((channels, net.classes)) / np.sqrt(channels)).astype(np.float32)
    weights.append(numpy_helper.from_array(fc, "fc.w"))
    weights.append(numpy_helper.from_array(np.zeros(net.classes, np.float32), "fc.b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], [OUTPUT]))
    graph = helper.make_graph(
        nodes,
        "resnet",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *net.input_shape])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", net.classes])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def config_text(cuda_graphs: bool) -> str:
    buckets = ",".join(str(1 << n) for n in range(MAX_BATCH_SIZE.bit_length()))
    return f"""
name: "{MODEL}"
max_batch_size: {MAX_BATCH_SIZE}
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
instance_group [ {{ kind: KIND_GPU count: 1 gpus: [ 0 ] }} ]
parameters {{ key: "batch_buckets" value {{ string_value: "{buckets}" }} }}
{"optimization { cuda { graphs: true } }" if cuda_graphs else ""}
"""


def write_repository(work: Path, net: Network, cuda_graphs: bool) -> tuple[Path, int]:
    """The model repository, rebuilt only when the network changed; returns (repository,
    parameters)."""
    repo = work / "models"
    model_file = repo / MODEL / "1" / "model.onnx"
    stamp = repo / MODEL / "network.json"
    wanted = json.dumps(asdict(net))
    if not (model_file.is_file() and stamp.is_file() and stamp.read_text() == wanted):
        model = build_resnet(net)
        model_file.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(model_file))
        stamp.write_text(wanted)
    (repo / MODEL / "config.pbtxt").write_text(config_text(cuda_graphs))
    return repo, parameter_count(onnx.load(str(model_file), load_external_data=False))


# In-process ceiling --------------------------------------------------------------------


def in_process(
    model_file: Path, net: Network, providers: list[str], seconds: float
) -> dict[int, float]:
    """Images per second of session.run, host arrays in and out, at each batch size."""
    session = ort.InferenceSession(str(model_file), providers=providers)
    rng = np.random.default_rng(0)
    result: dict[int, float] = {}
    for batch in BATCH_SIZES:
        feed = {INPUT: rng.random((batch, *net.input_shape), dtype=np.float32)}
        for _ in range(3):
            session.run([OUTPUT], feed)
        runs, start = 0, time.perf_counter()
        while True:
            session.run([OUTPUT], feed)
            runs += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        result[batch] = runs * batch / elapsed
    return result


# Load on Ferry -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadPoint:
    concurrency: int
    requests: int
    errors: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    driver: str


async def python_load(
    target: str, image: np.ndarray, concurrency: int, seconds: float
) -> LoadPoint:
    """`concurrency` callers, each sending one image at a time for `seconds`."""
    latencies: list[float] = []
    errors = 0
    async with AsyncFerryClient(target) as client:
        await client.infer(MODEL, {INPUT: image})
        stop_at = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    await client.infer(MODEL, {INPUT: image}, timeout=30)
                except Exception:  # counted, not raised: the point records the failures
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    return LoadPoint(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        images_per_s=len(latencies) / elapsed,
        p50_ms=statistics.median(ordered) * 1e3,
        p99_ms=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        driver="python",
    )


def ghz_load(
    ghz: Path, target: str, request_file: Path, concurrency: int, seconds: float, raw: Path
) -> LoadPoint:
    spec = LoadSpec(concurrency=concurrency, rows=1, duration_s=seconds)
    point = run_ghz(ghz, target, request_file, spec, MODEL, "ferry", raw)
    return LoadPoint(
        concurrency=concurrency,
        requests=point.ok,
        errors=sum(point.errors.values()),
        images_per_s=point.req_per_s,
        p50_ms=point.p50_ms,
        p99_ms=point.p99_ms,
        driver="ghz",
    )


def write_request(path: Path, image: np.ndarray) -> Path:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name=INPUT, datatype="FP32", shape=list(image.shape))
    request.outputs.add(name=OUTPUT)
    request.raw_input_contents.append(image.tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(request.SerializeToString())
    return path


# The run -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "cpu": platform.processor() or platform.machine(),
    }
    smi = shutil.which("nvidia-smi")
    if smi:
        query = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        )
        info["gpu"] = query.stdout.strip() or query.stderr.strip()
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny network on the CPU with tiny counts: checks the harness")
    parser.add_argument("--seconds", type=float, default=None,
                        help="per measured point (default 10; 0.3 with --dry-run)")
    parser.add_argument("--load", choices=["auto", "ghz", "python"], default="auto",
                        help="load generator: ghz when installed (auto), or the Python client")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="serve with optimization { cuda { graphs: true } }")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work" / "gpu",
                        help="where the model and logs go")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results as JSON here (default: <work>/results.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dry = args.dry_run
    net = TINY if dry else RESNET50
    seconds = args.seconds if args.seconds is not None else (0.3 if dry else 10.0)
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if not dry and not has_cuda:
        print("no CUDAExecutionProvider here: install ferry-inference[gpu] on a GPU machine, "
              "or use --dry-run", file=sys.stderr)
        return 2
    providers = ["CPUExecutionProvider"] if dry else ["CUDAExecutionProvider",
                                                       "CPUExecutionProvider"]
    repo, parameters = write_repository(work, net, args.cuda_graphs and not dry)
    model_file = repo / MODEL / "1" / "model.onnx"
    print(f"model: {parameters / 1e6:.1f} M parameters, input {list(net.input_shape)}",
          flush=True)

    ceiling = in_process(model_file, net, providers, seconds)
    best = max(ceiling.values())

    ghz = None
    if args.load in ("auto", "ghz"):
        try:
            ghz = find_ghz()
        except FileNotFoundError:
            if args.load == "ghz":
                raise
    image = np.random.default_rng(1).random((1, *net.input_shape), dtype=np.float32)
    request_file = write_request(work / "request.bin", image)
    fallback = "cpu" if dry else "fail"
    variant = ServerVariant("ferry", FERRY + f" --gpu-fallback {fallback}")
    points: list[LoadPoint] = []
    with RunningServer(variant, repo, [MODEL], work / "ferry.log", ready_timeout_s=600) as server:
        for concurrency in CONCURRENCIES:
            if ghz is not None:
                raw = work / f"ghz-c{concurrency}.json"
                point = ghz_load(ghz, server.target, request_file, concurrency, seconds, raw)
            else:
                point = asyncio.run(python_load(server.target, image, concurrency, seconds))
            server.check_alive()
            points.append(point)
            print(f"ferry c={concurrency}: {point.images_per_s:.1f} images/s", flush=True)

    results = {
        "dry_run": dry,
        "network": asdict(net),
        "parameters": parameters,
        "machine": machine(),
        "seconds_per_point": seconds,
        "in_process_images_per_s": {str(b): v for b, v in ceiling.items()},
        "ferry": [asdict(p) for p in points],
        "ratio_to_best_in_process": {str(p.concurrency): p.images_per_s / best for p in points},
    }
    out = args.out or work / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    lines = [
        f"machine: {results['machine']}",
        "",
        "| in-process batch | images/s |",
        "| ---: | ---: |",
        *(f"| {b} | {v:.1f} |" for b, v in results["in_process_images_per_s"].items()),
        "",
        "| Ferry concurrency | images/s | p50 ms | p99 ms | errors | ratio to best in-process |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios = results["ratio_to_best_in_process"]
    for point in results["ferry"]:
        lines.append(
            f"| {point['concurrency']} | {point['images_per_s']:.1f} | {point['p50_ms']:.2f} | "
            f"{point['p99_ms']:.2f} | {point['errors']} | "
            f"{ratios[str(point['concurrency'])]:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

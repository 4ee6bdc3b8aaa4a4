"""The streaming path, measured separately: ModelStreamInfer under ghz.

Each ghz call is one bidirectional stream that sends `messages` batch-1 requests without
waiting for the answers, so the server sees `streams x messages` requests in flight at
most. Throughput counts messages (requests) of the streams that completed: a stream ends
only after the server has answered every message on it.
"""

from __future__ import annotations

import base64
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .load import PROTO_DIR
from .make_models import INPUT_NAME, OUTPUT_NAME

STREAM_METHOD = "inference.GRPCInferenceService.ModelStreamInfer"


@dataclass(frozen=True, slots=True)
class StreamMeasurement:
    model: str
    server: str
    streams: int
    messages_per_stream: int
    stream_calls_ok: int
    errors: dict[str, int]
    seconds: float
    messages_per_s: float
    mean_stream_ms: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def write_stream_data(path: Path, model: str, features: int, seed: int = 0) -> Path:
    """ghz's JSON data for one batch-1 request (bytes fields are base64 in JSON)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((1, features)).astype(np.float32)
    message = {
        "model_name": model,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [1, features]}],
        "outputs": [{"name": OUTPUT_NAME}],
        "raw_input_contents": [base64.b64encode(data.tobytes()).decode()],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([message]))
    return path


def run_stream(
    ghz: Path,
    target: str,
    data_file: Path,
    model: str,
    server: str,
    *,
    streams: int,
    messages: int,
    duration_s: float | None,
    total: int | None = None,
    connections: int = 4,
) -> StreamMeasurement:
    command = [
        str(ghz), "--insecure", "--proto", str(PROTO_DIR / "grpc_service.proto"),
        "-i", str(PROTO_DIR), "--call", STREAM_METHOD, "--data-file", str(data_file),
        "--stream-call-count", str(messages), "--concurrency", str(streams),
        "--connections", str(max(1, min(connections, streams))), "--timeout", "60s",
        "--format", "json",
    ]
    if total is not None:
        command += ["--total", str(total)]
    else:
        command += ["--duration", f"{duration_s}s", "--duration-stop", "wait"]
    done = subprocess.run([*command, target], capture_output=True, text=True)
    if done.returncode != 0 and not done.stdout.strip():
        raise RuntimeError(f"ghz failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout)
    codes: dict[str, int] = dict(report.get("statusCodeDistribution") or {})
    ok = codes.pop("OK", 0)
    seconds = float(report.get("total", 0)) / 1e9
    return StreamMeasurement(
        model=model,
        server=server,
        streams=streams,
        messages_per_stream=messages,
        stream_calls_ok=ok,
        errors=codes,
        seconds=seconds,
        messages_per_s=ok * messages / seconds if seconds > 0 else 0.0,
        mean_stream_ms=float(report.get("average", 0)) / 1e6,
    )

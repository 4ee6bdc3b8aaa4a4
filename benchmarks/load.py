"""Load from ghz: one measured point is one ghz run against ModelInfer.

The request is a serialized ModelInferRequest (raw_input_contents, random FP32 rows from a
fixed seed) given to ghz as a binary file; ghz reads the method from proto/grpc_service.proto.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ferry.proto import grpc_service_pb2 as pb

from .make_models import INPUT_NAME, OUTPUT_NAME

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
METHOD = "inference.GRPCInferenceService.ModelInfer"


def find_ghz(explicit: str | None = None) -> Path:
    """ghz from --ghz, else PATH, else .tools/bin (where scripts/install-test-tools.sh puts it)."""
    candidates = [explicit] if explicit else [shutil.which("ghz"), str(ROOT / ".tools/bin/ghz")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("ghz not found: run scripts/install-test-tools.sh (it needs Go)")


def ghz_version(ghz: Path) -> str:
    """The module version Go recorded in the binary (ghz --version says 'dev' when built
    with go install), else ghz's own answer."""
    go = shutil.which("go")
    if go:
        info = subprocess.run([go, "version", "-m", str(ghz)], capture_output=True, text=True)
        for line in info.stdout.splitlines():
            fields = line.split()
            if fields[:2] == ["mod", "github.com/bojand/ghz"] and len(fields) > 2:
                return fields[2]
    own = subprocess.run([str(ghz), "--version"], capture_output=True, text=True)
    return (own.stdout or own.stderr).strip() or "unknown"


def write_request(path: Path, model: str, features: int, rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, features)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[rows, features])
    request.outputs.add(name=OUTPUT_NAME)
    request.raw_input_contents.append(data.tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(request.SerializeToString())
    return path


@dataclass(frozen=True, slots=True)
class LoadSpec:
    concurrency: int
    rows: int = 1
    duration_s: float | None = 10.0  # a fixed duration, or
    total: int | None = None  # a fixed request count
    connections: int = 4
    ghz_cpus: int | None = None  # GOMAXPROCS of ghz; None: ghz's default, every core


@dataclass(frozen=True, slots=True)
class Measurement:
    """One point: what ghz reported, reduced to what the report needs."""

    model: str
    server: str
    concurrency: int
    rows: int
    connections: int
    count: int
    ok: int
    errors: dict[str, int]
    seconds: float
    req_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    tool: str = "ghz"
    # The server's CPU time (every process and thread) during the point, per OK answer.
    server_cpu_us_per_request: float = float("nan")

    @property
    def rows_per_s(self) -> float:
        return self.req_per_s * self.rows

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def ghz_command(ghz: Path, target: str, request_file: Path, spec: LoadSpec) -> list[str]:
    # gRPC multiplexes streams, so a few connections carry any concurrency; each gets at
    # least one worker, and several let SO_REUSEPORT spread them over server processes.
    connections = max(1, min(spec.connections, spec.concurrency))
    command = [
        str(ghz),
        "--insecure",
        "--proto",
        str(PROTO_DIR / "grpc_service.proto"),
        "-i",
        str(PROTO_DIR),
        "--call",
        METHOD,
        "--binary-file",
        str(request_file),
        "--concurrency",
        str(spec.concurrency),
        "--connections",
        str(connections),
        "--timeout",
        "30s",
        "--format",
        "json",
    ]
    if spec.ghz_cpus is not None:
        command += ["--cpus", str(spec.ghz_cpus)]
    if spec.total is not None:
        command += ["--total", str(spec.total)]
    else:
        assert spec.duration_s is not None
        # Requests still in flight when the time is up are left out, not counted as errors.
        command += ["--duration", f"{spec.duration_s}s", "--duration-stop", "ignore"]
    return [*command, target]


def run_ghz(
    ghz: Path,
    target: str,
    request_file: Path,
    spec: LoadSpec,
    model: str,
    server: str,
    raw_path: Path | None = None,
) -> Measurement:
    command = ghz_command(ghz, target, request_file, spec)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 and not done.stdout.strip():
        raise RuntimeError(f"ghz failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout)
    report.pop("details", None)  # one entry per request: large, and not needed
    if raw_path is not None:
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        raw_path.write_text(json.dumps({"command": command, "report": report}, indent=1))
    return summarize(report, model, server, spec)


def summarize(report: dict[str, object], model: str, server: str, spec: LoadSpec) -> Measurement:
    codes: dict[str, int] = dict(report.get("statusCodeDistribution") or {})  # type: ignore[call-overload]
    ok = codes.pop("OK", 0)
    percentiles = {
        int(entry["percentage"]): float(entry["latency"]) / 1e6
        for entry in report.get("latencyDistribution") or []  # type: ignore[union-attr]
    }
    seconds = float(report.get("total", 0)) / 1e9  # type: ignore[arg-type]
    return Measurement(
        model=model,
        server=server,
        concurrency=spec.concurrency,
        rows=spec.rows,
        connections=max(1, min(spec.connections, spec.concurrency)),
        count=int(report.get("count", 0)),  # type: ignore[call-overload]
        ok=ok,
        errors=codes,
        seconds=seconds,
        # Only answered requests count toward throughput.
        req_per_s=ok / seconds if seconds > 0 else 0.0,
        p50_ms=percentiles.get(50, float("nan")),
        p90_ms=percentiles.get(90, float("nan")),
        p99_ms=percentiles.get(99, float("nan")),
        mean_ms=float(report.get("average", 0)) / 1e6,  # type: ignore[arg-type]
    )

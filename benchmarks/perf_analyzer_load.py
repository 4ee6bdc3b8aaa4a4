"""Load from Triton's perf_analyzer: a second, independent load tool next to ghz.

perf_analyzer reads the model's metadata and config, sends batch-1 requests of random data
at a fixed concurrency and reports the throughput and latency of its last measurement
window. Stability is not required (two shared cores are noisy); the windows are fixed.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import tempfile
from pathlib import Path

from .load import ROOT, LoadSpec, Measurement


def find_perf_analyzer() -> Path | None:
    """The wrapper scripts/install-test-tools.sh puts in .tools/bin, else PATH."""
    for candidate in (str(ROOT / ".tools/bin/perf_analyzer"), shutil.which("perf_analyzer")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def run_perf_analyzer(
    perf_analyzer: Path,
    target: str,
    spec: LoadSpec,
    model: str,
    server: str,
    window_s: float,
) -> Measurement:
    with tempfile.TemporaryDirectory(prefix="ferry-pa-") as folder:
        report = Path(folder) / "report.csv"
        command = [
            str(perf_analyzer), "-m", model, "-i", "grpc", "-u", target, "-b", str(spec.rows),
            "--concurrency-range", f"{spec.concurrency}:{spec.concurrency}",
            "--measurement-mode", "time_windows",
            "--measurement-interval", str(round(window_s * 1000)),
            "--stability-percentage", "999", "--max-trials", "3",
            "--percentile", "99",
            "-f", str(report),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()[-2000:]
            raise RuntimeError(f"perf_analyzer failed ({done.returncode}): {output}")
        with report.open() as file:
            (row,) = list(csv.DictReader(file))
    per_s = float(row["Inferences/Second"]) / spec.rows
    return Measurement(
        model=model,
        server=server,
        concurrency=spec.concurrency,
        rows=spec.rows,
        connections=1,
        count=round(per_s * window_s),
        ok=round(per_s * window_s),
        errors={},
        seconds=window_s,
        req_per_s=per_s,
        # perf_analyzer writes latencies in microseconds.
        p50_ms=float(row.get("p50 latency") or "nan") / 1000,
        p90_ms=float(row.get("p90 latency") or "nan") / 1000,
        p99_ms=float(row.get("p99 latency") or "nan") / 1000,
        mean_ms=float(row.get("Avg latency") or "nan") / 1000,
        tool="perf_analyzer",
    )

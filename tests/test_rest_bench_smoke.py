"""The REST benchmark in its smoke mode: one command starts Ferry with both ports, drives
it with perf_analyzer over gRPC, HTTP binary and HTTP JSON (and ghz over gRPC), and writes
its table. Nothing here depends on how fast anything ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.external_tools import require_tool

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_rest_benchmark_smoke_run(tmp_path: Path) -> None:
    require_tool("perf_analyzer")
    require_tool("ghz")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.rest", "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "rest.json").read_text())
    assert set(results["summary"]) == {"grpc", "http-binary", "http-json", "grpc (ghz)"}
    for row in results["summary"].values():
        assert row["infer_per_s"] > 0
    table = (out / "rest.md").read_text()
    assert "| http-binary |" in table and "Target: REST binary" in table

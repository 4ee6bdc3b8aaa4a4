"""Triton's perf_analyzer profiles Ferry: it reads ModelMetadata, ModelConfig and
ModelStatistics, then sends load at concurrency 1 and 2 over gRPC, briefly, with no error."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.external_tools import REPO, require_system_library, require_tool

MODEL_REPOSITORY = REPO / "examples" / "model_repository"


def profile_briefly(perf_analyzer: str, protocol: list[str], report: Path) -> str:
    """Run perf_analyzer on the example model at concurrency 1 and 2 with `protocol`'s
    flags (-i, -u, ...); check that it succeeded, measured both and saw the server's
    statistics; its stdout."""
    command = [
        perf_analyzer, "-m", "digits", *protocol,
        "--concurrency-range", "1:2",
        "--measurement-mode", "count_windows", "--measurement-request-count", "50",
        # Stability is not under test, and two shared cores are noisy: any window will do.
        "--stability-percentage", "999", "--max-trials", "10",
        "-f", str(report),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"perf_analyzer failed ({done.returncode}):\n{output}"
    assert "error" not in output.lower(), output
    with report.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["Concurrency"] for row in rows] == ["1", "2"], rows
    for row in rows:
        assert float(row["Inferences/Second"]) > 0, row
    # The server-side section comes from Ferry's statistics, so it must show work done.
    assert "Successful request count" in done.stdout, done.stdout
    return done.stdout


@pytest.mark.timeout(240)
def test_perf_analyzer_profiles_the_example_model(start_server, tmp_path: Path) -> None:
    # The wrapper in .tools/bin puts CUDA's runtime library (from PyPI) on the library path.
    perf_analyzer = require_tool("perf_analyzer")
    require_system_library("b64", "libb64-0d")
    server: RunningServer = start_server(MODEL_REPOSITORY)
    profile_briefly(perf_analyzer, ["-i", "grpc", "-u", server.address], tmp_path / "perf.csv")

"""Triton's perf_analyzer profiles Ferry over REST (`-i http`), with binary tensors and with
JSON ones: it reads the model's metadata, config and statistics as Triton's JSON, then sends
load at concurrency 1 and 2, briefly, with no error."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.external_tools import REPO, require_tool

MODEL_REPOSITORY = REPO / "examples" / "model_repository"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tensor_format", ["binary", "json"])
def test_perf_analyzer_over_http(
    start_server: Callable[..., RunningServer], tmp_path: Path, tensor_format: str
) -> None:
    perf_analyzer = require_tool("perf_analyzer")
    server = start_server(MODEL_REPOSITORY)
    report = tmp_path / "perf.csv"
    command = [
        perf_analyzer, "-m", "digits", "-i", "http", "-u", server.http_address,
        "--input-tensor-format", tensor_format, "--output-tensor-format", tensor_format,
        "--concurrency-range", "1:2",
        "--measurement-mode", "count_windows", "--measurement-request-count", "50",
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
    # The server-side section comes from the statistics endpoint's JSON.
    assert "Successful request count" in done.stdout, done.stdout
    stats = server.server.manager.get("digits").stats
    assert stats.inference_count > 0

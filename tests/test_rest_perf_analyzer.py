"""Triton's perf_analyzer profiles Ferry over REST (`-i http`), with binary tensors and with
JSON ones: it reads the model's metadata, config and statistics as Triton's JSON, then sends
load at concurrency 1 and 2, briefly, with no error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.external_tools import REPO, require_tool
from tests.test_perf_analyzer import profile_briefly

MODEL_REPOSITORY = REPO / "examples" / "model_repository"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tensor_format", ["binary", "json"])
def test_perf_analyzer_over_http(
    start_server: Callable[..., RunningServer], tmp_path: Path, tensor_format: str
) -> None:
    perf_analyzer = require_tool("perf_analyzer")
    server = start_server(MODEL_REPOSITORY)
    protocol = [
        "-i", "http", "-u", server.http_address,
        "--input-tensor-format", tensor_format, "--output-tensor-format", tensor_format,
    ]  # fmt: skip
    profile_briefly(perf_analyzer, protocol, tmp_path / "perf.csv")
    stats = server.server.manager.get("digits").stats
    assert stats.inference_count > 0

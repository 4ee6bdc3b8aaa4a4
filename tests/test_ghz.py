"""ghz, the gRPC load generator, against a live Ferry with the ready configs in
benchmarks/ghz/: through server reflection and through proto/ on disk, at a few
concurrencies, for a bounded number of requests each."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RunningServer
from tests.external_tools import REPO, require_tool

MODEL_REPOSITORY = REPO / "examples" / "model_repository"
CONFIG = REPO / "benchmarks" / "ghz" / "digits.json"
REQUESTS = 40
CONCURRENCIES = (1, 4, 8)
PROTO_FLAGS = ["--proto", "proto/grpc_service.proto", "--import-paths", "proto"]


def run_ghz(ghz: str, address: str, concurrency: int, extra: list[str], out: Path) -> dict:
    # The config names its data file relative to the repository root, as the README runs it.
    command = [
        ghz, "--config", str(CONFIG.relative_to(REPO)), *extra,
        "-n", str(REQUESTS), "-c", str(concurrency),
        "--format", "json", "--output", str(out), address,
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ghz failed ({done.returncode}): {done.stderr}{done.stdout}"
    report: dict = json.loads(out.read_text())
    return report


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["reflection", "proto"])
def test_ghz_reports_only_ok_replies(mode: str, start_server, tmp_path: Path) -> None:
    ghz = require_tool("ghz")
    server: RunningServer = start_server(MODEL_REPOSITORY)
    extra = PROTO_FLAGS if mode == "proto" else []
    for concurrency in CONCURRENCIES:
        report = run_ghz(ghz, server.address, concurrency, extra, tmp_path / f"c{concurrency}.json")
        where = f"{mode}, concurrency {concurrency}"
        assert report["count"] == REQUESTS, where
        assert report["statusCodeDistribution"] == {"OK": REQUESTS}, where
        assert not report.get("errorDistribution"), (where, report.get("errorDistribution"))
        assert report["options"]["concurrency"] == concurrency, where


def test_ghz_data_file_carries_the_example_samples() -> None:
    """The ghz data file holds real rows of examples/digits_samples.json, in its shape."""
    config = json.loads(CONFIG.read_text())
    requests = json.loads((REPO / config["data-file"]).read_text())
    samples = json.loads((REPO / "examples" / "digits_samples.json").read_text())
    assert config["call"] == "inference.GRPCInferenceService/ModelInfer"
    assert requests, "the data file holds no request"
    for request in requests:
        assert request["model_name"] == "digits"
        (tensor,) = request["inputs"]
        assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("pixels", "FP32", [1, 64])
        assert tensor["contents"]["fp32_contents"] in samples["pixels"]

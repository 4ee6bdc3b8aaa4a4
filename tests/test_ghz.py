"""ghz, the gRPC load generator, against a live Ferry with the ready configs in
benchmarks/ghz/: through server reflection and through proto/ on disk, at a few
concurrencies, for a bounded number of requests each."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import tritonclient.grpc

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


def _delay_zero_repository(tmp_path: Path, adaptive_us: str | None) -> Path:
    """The example repository with digits at max_queue_delay 0 (what the adaptive delay
    applies to), and the adaptive delay set when given."""
    repository = tmp_path / f"repo-{adaptive_us}"
    shutil.copytree(MODEL_REPOSITORY, repository)
    config = repository / "digits" / "config.pbtxt"
    text = config.read_text().replace(
        "max_queue_delay_microseconds: 500", "max_queue_delay_microseconds: 0"
    )
    assert "max_queue_delay_microseconds: 0" in text
    if adaptive_us is not None:
        text += (
            'parameters { key: "adaptive_queue_delay_microseconds" '
            f'value: {{ string_value: "{adaptive_us}" }} }}\n'
        )
    config.write_text(text)
    return repository


@pytest.mark.timeout(300)
def test_ghz_load_on_a_delay_zero_model_gathers_larger_batches(
    ferry_process, tmp_path: Path
) -> None:
    """16 ghz workers against a fast model with no queue delay, in `ferry serve` processes:
    with the adaptive delay (the default) its batches hold more rows than with it off."""
    ghz = require_tool("ghz")
    mean_batch = {}
    for adaptive_us in (None, "0"):
        server = ferry_process(_delay_zero_repository(tmp_path, adaptive_us))
        command = [
            ghz, "--config", str(CONFIG.relative_to(REPO)), "-n", "3000", "-c", "16",
            "--connections", "2", "--format", "json", server.address,
        ]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"ghz failed ({done.returncode}): {done.stderr}"
        assert json.loads(done.stdout)["statusCodeDistribution"] == {"OK": 3000}
        with tritonclient.grpc.InferenceServerClient(server.address) as client:
            stats = client.get_inference_statistics("digits").model_stats[0]
        assert stats.inference_count == 3000
        mean_batch[adaptive_us] = stats.inference_count / stats.execution_count
        server.stop()
    assert mean_batch[None] >= 1.3 * mean_batch["0"], mean_batch

"""benchmarks/gpu_bench.py: the dry run (tiny network, CPU) goes through every step, and the
full-size network is ResNet-50's size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from benchmarks import gpu_bench
from tests.gpu import has_gpu

ROOT = Path(__file__).resolve().parent.parent


def test_the_dry_run_measures_every_point(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_bench", "--dry-run", "--load", "python",
         "--seconds", "0.2", "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert results["dry_run"] is True
    assert set(results["in_process_images_per_s"]) == {"1", "8", "32", "64"}
    assert all(v > 0 for v in results["in_process_images_per_s"].values())
    points = results["ferry"]
    assert [p["concurrency"] for p in points] == [1, 16, 64, 128]
    for point in points:
        assert point["requests"] > 0 and point["errors"] == 0
        assert 0 < point["p50_ms"] <= point["p99_ms"]
    best = max(results["in_process_images_per_s"].values())
    for point in points:
        ratio = results["ratio_to_best_in_process"][str(point["concurrency"])]
        assert ratio == pytest.approx(point["images_per_s"] / best)
    assert "| Ferry concurrency |" in done.stdout
    # Without a GPU the KIND_GPU config fell back to the CPU, and said so once.
    log = (tmp_path / "work" / "ferry.log").read_text()
    assert log.count("GPU instances run on the CPU") == (0 if has_gpu() else 1)


def test_the_full_network_is_resnet50_sized(tmp_path: Path) -> None:
    model = gpu_bench.build_resnet(gpu_bench.RESNET50)
    assert 25e6 < gpu_bench.parameter_count(model) < 26e6  # ResNet-50: 25.6 M
    shape = model.graph.input[0].type.tensor_type.shape
    assert shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in shape.dim[1:]] == [3, 224, 224]
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    assert convs == 1 + 3 * 16 + 4  # stem, three per bottleneck, four projections
    path = tmp_path / "resnet50.onnx"
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape == ["batch", 1000]


def test_without_cuda_the_full_run_refuses_to_measure_the_cpu(tmp_path: Path) -> None:
    if has_gpu():
        pytest.skip("this machine has a GPU: the full run would start")
    assert gpu_bench.main(["--work", str(tmp_path)]) == 2

"""Packaging: without an ONNX Runtime installed, importing Ferry's runtime says which extra
to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A `None` entry in sys.modules makes `import onnxruntime` raise ImportError, exactly as
# when neither onnxruntime nor onnxruntime-gpu is installed.
HIDE_ONNXRUNTIME = "import sys; sys.modules['onnxruntime'] = None; "


@pytest.mark.parametrize("module", ["ferry.server.runtime", "ferry.server.cli"])
def test_without_onnxruntime_the_import_error_names_the_extras(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", HIDE_ONNXRUNTIME + f"import {module}"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: Ferry needs an ONNX Runtime"), result.stderr
    assert "ferry-inference[cpu]" in last and "ferry-inference[gpu]" in last


def test_with_onnxruntime_the_same_import_works() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import ferry.server.runtime"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr

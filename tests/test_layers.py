"""The layers hold: protocol code and the model configuration load without onnxruntime.

(The full set of layer contracts is checked by lint-imports in scripts/test.sh.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROTOCOL_MODULES = (
    "ferry.server.config",
    "ferry.server.tensors",
    "ferry.server.servicer",
    "ferry.server.dataplane",
    "ferry.server.batching",
    "ferry.server.scheduler",
)


def test_protocol_and_config_import_with_onnxruntime_unimportable() -> None:
    script = textwrap.dedent(
        f"""
        import importlib, sys
        sys.modules["onnxruntime"] = None  # any import of it now raises ImportError
        for name in {PROTOCOL_MODULES!r}:
            importlib.import_module(name)
        try:
            import ferry.server.runtime
        except ImportError as exc:
            print("runtime refused:", "ONNX Runtime" in str(exc))
        loaded = sorted(m for m in sys.modules if m.startswith("onnxruntime"))
        print("loaded:", loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # The check itself works: the runtime, which does need onnxruntime, cannot load.
    assert "runtime refused: True" in result.stdout
    assert "loaded: ['onnxruntime']" in result.stdout  # only the blocking None entry

"""The in-process ceiling: onnxruntime alone, rows per second at a few batch sizes.

No server, no network, no copies but onnxruntime's own: what any server on this machine
could at best reach for a model, with the session options onnxruntime picks by default.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

BATCH_SIZES = (1, 8, 32)


def measure(
    model_path: Path, batch_sizes: tuple[int, ...] = BATCH_SIZES, seconds: float = 2.0
) -> dict[int, float]:
    """Rows per second of `session.run` at each batch size, after a short warm-up."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    features = int(spec.shape[1])
    rng = np.random.default_rng(0)
    rows_per_s: dict[int, float] = {}
    for batch in batch_sizes:
        feed = {spec.name: rng.standard_normal((batch, features)).astype(np.float32)}
        for _ in range(3):
            session.run(None, feed)
        runs = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            session.run(None, feed)
            runs += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        rows_per_s[batch] = runs * batch / (now - start)
    return rows_per_s

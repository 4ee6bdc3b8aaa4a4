"""`--workers N`: every frontend is healthy once it is serving. A frontend's link to the
executor was set up only after its connection coroutine returned, while the executor's
catalog could already have been read: that frontend then saw its executor as never
connected and answered a request for an unknown model UNAVAILABLE ("the executor process
stopped") instead of NOT_FOUND, for as long as it ran (found in a leak hunt, in 4 starts of
6 on a 2-core machine)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.models import mlp_model, write_config
from tests.process import FerryProcess, infer

STARTS = 3
CALLS = 20  # each on its own connection, spread by the kernel over both frontends


def test_every_frontend_answers_an_unknown_model_not_found(
    tmp_path: Path, ferry_process: Callable[..., FerryProcess]
) -> None:
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=4)
    write_config(repo / "m", "max_batch_size: 8\n")
    x = np.zeros((1, 4), np.float32)
    for _ in range(STARTS):
        server = ferry_process(repo, "--workers", "2", ready_count=2)
        codes = [infer(server.address, x, model="nope")[0] for _ in range(CALLS)]
        assert codes == ["NOT_FOUND"] * CALLS, codes
        assert server.stop() == 0

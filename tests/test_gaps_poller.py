"""`--poll-repository`: a single-file repository, a failed model taken out of the
repository, and a repository that cannot be read for a while. The polls are driven
with poll_once() where a test needs one; the loop's own timing only where the loop
itself is what is tested."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from ferry.server import poller as poller_module
from ferry.server.healthcheck import check
from ferry.server.poller import RepositoryPoller, snapshot
from tests.conftest import RunningServer
from tests.models import mlp_model
from tests.waiting import wait_until

StartServer = Callable[..., RunningServer]
NEVER_S = 3600.0  # an interval whose timer never fires within a test


def probs(server: RunningServer, model: str) -> np.ndarray:
    tensor = triton.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.linspace(-1, 1, 16, dtype=np.float32)[None])
    with triton.InferenceServerClient(server.address) as client:
        result = client.infer(model, [tensor]).as_numpy("probs")
    assert result is not None
    return np.asarray(result)


def primed(server: RunningServer, interval_s: float = NEVER_S) -> RepositoryPoller:
    poller = RepositoryPoller(server.server.manager, interval_s)  # type: ignore[arg-type]
    server.call(poller.prime())
    return poller


def test_a_single_file_repository_is_reloaded_when_its_file_changes(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A repository that is one .onnx file is fingerprinted as its model (named after
    the file): a poll with the file unchanged keeps the loaded model, a poll after the
    file was replaced serves the new one."""
    model_file = mlp_model(tmp_path / "m.onnx", seed=0)
    assert list(snapshot(model_file)) == ["m"]
    server = start_server(model_file)
    poller = primed(server)
    before = probs(server, "m")
    loaded = server.server.manager.get("m")
    server.call(poller.poll_once())
    assert server.server.manager.get("m") is loaded
    mlp_model(model_file, seed=1)
    stat = model_file.stat()
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    server.call(poller.poll_once())
    assert server.server.manager.get("m") is not loaded
    after = probs(server, "m")
    assert not np.allclose(after, before)


@pytest.fixture
def failed_model_removed(
    tmp_path: Path, start_server: StartServer
) -> tuple[RunningServer, RepositoryPoller]:
    """A server whose start-up model "bad" failed to load (next to a good one), with a
    primed poller; "bad"'s folder has been removed since, not yet polled."""
    mlp_model(tmp_path / "good" / "1" / "model.onnx")
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    server = start_server(tmp_path)
    poller = primed(server)
    with triton.InferenceServerClient(server.address) as client:
        names = [m["name"] for m in client.get_model_repository_index(as_json=True)["models"]]
        assert names == ["bad", "good"]
        assert not client.is_server_ready()
    shutil.rmtree(tmp_path / "bad")
    return server, poller


def test_a_failed_model_taken_out_of_the_repository_leaves_the_index(
    failed_model_removed: tuple[RunningServer, RepositoryPoller],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The poll's unload of a model that never loaded fails ("not loaded", logged as a
    warning, the poll goes on), but its failure leaves the repository index."""
    server, poller = failed_model_removed
    with caplog.at_level(logging.WARNING, logger=poller_module.__name__):
        server.call(poller.poll_once())
    assert [r.getMessage() for r in caplog.records if r.name == poller_module.__name__] == [
        "unloading model 'bad': model 'bad' is not loaded"
    ]
    with triton.InferenceServerClient(server.address) as client:
        assert client.get_model_repository_index(as_json=True)["models"] == [
            {"name": "good", "version": "1", "state": "READY"}
        ]
        assert client.is_model_ready("good")


def test_a_failed_model_taken_out_of_the_repository_no_longer_holds_readiness_back(
    failed_model_removed: tuple[RunningServer, RepositoryPoller],
) -> None:
    """As for a served model removed under --poll-repository (it leaves the start-up
    set, as in Triton), removing the broken model the server was waiting for makes the
    server ready again: the operator's fix must not need a restart."""
    server, poller = failed_model_removed
    server.call(poller.poll_once())
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_server_ready()
    assert check(server.address) == "SERVING"


def test_a_served_model_taken_out_of_the_repository_is_unloaded_and_reported_not_serving(
    tmp_path: Path, start_server: StartServer
) -> None:
    """A poll after a served model's folder was removed unloads it: its health service
    name turns NOT_SERVING (not left SERVING, though no one names it any more), the
    server stays SERVING, the index forgets the model, and a request for it is refused
    NOT_FOUND; the other model serves."""
    mlp_model(tmp_path / "gone" / "1" / "model.onnx")
    mlp_model(tmp_path / "kept" / "1" / "model.onnx")
    server = start_server(tmp_path)
    poller = primed(server)
    assert check(server.address, "gone") == "SERVING"
    shutil.rmtree(tmp_path / "gone")
    server.call(poller.poll_once())
    assert check(server.address, "gone") == "NOT_SERVING"
    assert check(server.address, "kept") == "SERVING"
    assert check(server.address) == "SERVING"  # it left the start-up set, as in Triton
    with triton.InferenceServerClient(server.address) as client:
        assert [m["name"] for m in client.get_model_repository_index(as_json=True)["models"]] == [
            "kept"
        ]
        with pytest.raises(InferenceServerException) as caught:
            probs(server, "gone")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        assert caught.value.message() == "unknown model 'gone'"
    assert probs(server, "kept").shape == (1, 4)


def test_the_poll_loop_survives_a_repository_it_cannot_read(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The repository moved away: each poll logs that it cannot be read, the loaded
    model keeps serving, and once the repository is back (with a new model) the next
    poll loads the new model."""
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx")
    server = start_server(repo)
    poller = primed(server, interval_s=0.02)
    server.call(_start(poller))
    try:
        away = repo.rename(tmp_path / "away")
        with caplog.at_level(logging.WARNING, logger=poller_module.__name__):
            wait_until(
                lambda: any("cannot read the model repository" in r.getMessage()
                            for r in caplog.records),
                what="the poller to report the unreadable repository",
            )
        assert probs(server, "m").shape == (1, 4)
        mlp_model(away / "n" / "1" / "model.onnx", seed=3)
        away.rename(repo)
        wait_until(lambda: server.server.manager.is_loaded("n"), what="model n to load")
        assert probs(server, "n").shape == (1, 4)
    finally:
        server.call(poller.stop())


async def _start(poller: RepositoryPoller) -> None:
    poller.start()


@pytest.mark.parametrize("interval_s", [0, -1.5])
def test_a_poll_interval_must_be_positive(interval_s: float) -> None:
    """RepositoryPoller refuses an interval that is not > 0 (a loop that never yields)
    before it looks at its manager."""
    with pytest.raises(ValueError) as caught:
        RepositoryPoller(None, interval_s)  # type: ignore[arg-type]
    assert str(caught.value) == f"poll interval must be > 0 s, got {interval_s}"

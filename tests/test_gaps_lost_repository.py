"""A model repository that disappears while the server runs (a network volume lost, a
folder moved away): the models already loaded must keep serving, the RPCs that read the
repository must fail cleanly, and the server must still be able to unload and drain."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from ferry.server.healthcheck import check
from tests.conftest import EXPLICIT_MODEL_CONTROL, RunningServer
from tests.models import mlp_model

StartServer = Callable[..., RunningServer]
GENERIC = "internal error (details are in the server log)"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "repo" / "m" / "1" / "model.onnx")
    return tmp_path / "repo"


@pytest.fixture
def moved_away(repo: Path) -> Iterator[Callable[[], None]]:
    """Call it to move the repository away; it is put back before the server stops."""
    away = repo.with_name("repo.away")

    def move() -> None:
        repo.rename(away)

    yield move
    if away.exists():
        away.rename(repo)


def infer(client: triton.InferenceServerClient) -> np.ndarray:
    tensor = triton.InferInput("x", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    result = client.infer("m", [tensor]).as_numpy("probs")
    assert result is not None
    return np.asarray(result)


def test_the_index_fails_cleanly_and_inference_goes_on_when_the_repository_is_gone(
    repo: Path, start_server: StartServer, moved_away: Callable[[], None]
) -> None:
    """RepositoryIndex reads the folder: with it gone, gRPC answers INTERNAL and REST 500
    with the generic message (the server's path is not told), while the loaded model
    still answers inferences."""
    server = start_server(repo)
    with triton.InferenceServerClient(server.address) as client:
        before = infer(client)
        moved_away()
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_repository_index()
        assert caught.value.status() == "StatusCode.INTERNAL"
        assert caught.value.message() == GENERIC
        request = urllib.request.Request(
            f"http://{server.http_address}/v2/repository/index", data=b"{}", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(request, timeout=10)
        with http_error.value as answer:
            assert answer.code == 500
            assert json.loads(answer.read()) == {"error": GENERIC}
        np.testing.assert_array_equal(infer(client), before)


def test_a_server_whose_repository_is_gone_still_drains(
    repo: Path, start_server: StartServer, moved_away: Callable[[], None]
) -> None:
    """A stop (SIGTERM) after the repository vanished must still drain and close the
    gRPC port; it must not die with the repository's FileNotFoundError."""
    server = start_server(repo)
    moved_away()
    server.call(server.server.stop(grace_s=1.0))
    assert check(server.address, timeout_s=2.0) == "UNAVAILABLE"


def test_an_unload_while_the_repository_is_gone_is_answered_and_seen_by_health(
    repo: Path, start_server: StartServer, moved_away: Callable[[], None]
) -> None:
    """In explicit model control an unload does not need the repository: it succeeds,
    and the health service stops reporting the model SERVING."""
    server = start_server(repo, security=EXPLICIT_MODEL_CONTROL)
    with triton.InferenceServerClient(server.address) as client:
        moved_away()
        try:
            client.unload_model("m")
        finally:
            assert not client.is_model_ready("m")  # the unload itself did happen
        assert check(server.address, "m") == "NOT_SERVING"

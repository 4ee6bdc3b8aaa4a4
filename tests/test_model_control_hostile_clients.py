"""Model control and the model repository against hostile or careless clients and
operators: load requests whose config override asks for absurd amounts of memory or CPU,
config.pbtxt and version folders no one should write, names no repository holds, and
loads that race the server's shutdown. Each is refused by name, costs the server nothing
out of proportion, and leaves the other models serving."""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from ferry.server.executor import Runner
from ferry.server.repository import ModelControl, ModelControlMode
from ferry.server.security import SecurityOptions
from tests.conftest import EXPLICIT_MODEL_CONTROL, GatedInstance, RunningServer
from tests.models import identity_model, mlp_model, write_config
from tests.waiting import wait_until

StartServer = Callable[..., RunningServer]

OVERRIDES = SecurityOptions(
    model_control=ModelControl(ModelControlMode.EXPLICIT, ("*",), allow_load_overrides=True)
)


def error_of(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return (info.value.status() or "").removeprefix("StatusCode."), info.value.message() or ""


def infer_probs(client: triton.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], client_timeout=30).as_numpy("probs")  # type: ignore[no-any-return]


def x_input(rows: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    return tmp_path


def assert_refused(
    client: triton.InferenceServerClient, override: dict[str, object], *named: str
) -> None:
    """The override fails the load at once, INVALID_ARGUMENT naming `named`, and the
    version that served keeps serving."""
    x = x_input()
    before = infer_probs(client, "m", x)
    code, message = error_of(
        lambda: client.load_model("m", config=json.dumps(override), client_timeout=20)
    )
    assert code == "INVALID_ARGUMENT", (code, message)
    for word in named:
        assert word in message, (word, message)
    assert client.is_model_ready("m")
    np.testing.assert_array_equal(infer_probs(client, "m", x), before)


# Config overrides that ask for memory or CPU out of proportion ----------------------------


@pytest.mark.parametrize("levels", [1_000_000, 2**64 - 1])
def test_huge_priority_levels_are_refused(
    repo: Path, start_server: StartServer, levels: int
) -> None:
    # One queue per level was allocated on the event loop: 2**64-1 levels stalled every
    # caller while the server ran out of memory.
    server = start_server(repo, security=OVERRIDES)
    with triton.InferenceServerClient(server.address) as client:
        override = {"max_batch_size": 4, "dynamic_batching": {"priority_levels": str(levels)}}
        assert_refused(client, override, "priority_levels", str(levels))


@pytest.mark.parametrize("count", [257, 2**31 - 1])
def test_huge_instance_counts_are_refused(
    repo: Path, start_server: StartServer, count: int
) -> None:
    # Each instance is an onnxruntime session and a thread: 2**31-1 of them is a request
    # for all the memory there is.
    server = start_server(repo, security=OVERRIDES)
    with triton.InferenceServerClient(server.address) as client:
        override = {"instance_group": [{"kind": "KIND_CPU", "count": count}]}
        assert_refused(client, override, "instance_group", "count", str(count))


def warmup(count: int = 1, dims: list[int] | None = None) -> dict[str, object]:
    return {
        "name": "w",
        "batch_size": 1,
        "count": count,
        "inputs": {"x": {"data_type": "TYPE_FP32", "dims": dims or [16], "zero_data": True}},
    }


@pytest.mark.parametrize("count", [1001, 2**32 - 1])
def test_endless_warm_up_is_refused(repo: Path, start_server: StartServer, count: int) -> None:
    # 2**32-1 warm-up runs held the model's lock (no unload, no reload) and a core for
    # days, and the load could not be cancelled.
    server = start_server(repo, security=OVERRIDES)
    with triton.InferenceServerClient(server.address) as client:
        override = {"max_batch_size": 4, "model_warmup": [warmup(count)]}
        assert_refused(client, override, "model_warmup 'w'", "count", str(count))


def test_huge_warm_up_tensors_are_refused(tmp_path: Path, start_server: StartServer) -> None:
    identity_model(tmp_path / "m" / "1" / "model.onnx", "FP32", ("batch", "n"))
    mlp_model(tmp_path / "other" / "1" / "model.onnx")
    server = start_server(tmp_path, security=OVERRIDES)
    with triton.InferenceServerClient(server.address) as client:
        elements = 50_000_000  # 200 MB of zeros, far past what a request may send
        override = {
            "max_batch_size": 4,
            "model_warmup": [
                {
                    "name": "w",
                    "batch_size": 4,
                    "inputs": {
                        "INPUT0": {"data_type": "TYPE_FP32", "dims": [elements], "zero_data": True}
                    },
                }
            ],
        }
        code, message = error_of(
            lambda: client.load_model("m", config=json.dumps(override), client_timeout=20)
        )
        assert code == "INVALID_ARGUMENT", (code, message)
        assert "model_warmup 'w'" in message and "INPUT0" in message, message
        assert str(elements) in message, message
        assert client.is_model_ready("m")
        assert client.is_model_ready("other")


def test_a_huge_max_batch_size_loads_without_a_batch_of_that_size(
    repo: Path, start_server: StartServer
) -> None:
    # The thread calibration ran a zero batch of max_batch_size rows: 2**31-1 rows of 16
    # floats is 128 GiB, and the load failed INTERNAL (MemoryError), or the server died.
    server = start_server(repo, security=OVERRIDES)
    with triton.InferenceServerClient(server.address) as client:
        client.load_model("m", config=json.dumps({"max_batch_size": 2**31 - 1}))
        assert client.get_model_config("m").config.max_batch_size == 2**31 - 1
        x = x_input(3)
        assert infer_probs(client, "m", x).shape == (3, 4)


# config.pbtxt and the repository on disk --------------------------------------------------


@pytest.mark.parametrize("dims", [[-2], [-(2**63)]])
def test_negative_dims_other_than_minus_one_are_refused(
    tmp_path: Path, start_server: StartServer, dims: list[int]
) -> None:
    identity_model(tmp_path / "m" / "1" / "model.onnx", "FP32", ("batch", "n"))
    write_config(
        tmp_path / "m",
        f'max_batch_size: 4\ninput [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: {dims} }} ]\n',
    )
    mlp_model(tmp_path / "good" / "1" / "model.onnx")
    server = start_server(tmp_path, security=EXPLICIT_MODEL_CONTROL)
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("good")
        assert not client.is_model_ready("m")
        index = {e.name: e for e in client.get_model_repository_index().models}
        assert index["m"].state == "UNAVAILABLE"
        assert "INPUT0" in index["m"].reason and "dims" in index["m"].reason, index["m"]
        assert str(dims[0]) in index["m"].reason


def test_hostile_config_files_fail_by_name_with_a_short_reason(
    tmp_path: Path, start_server: StartServer
) -> None:
    configs = {
        # (config.pbtxt, what the reason must say)
        "latin1": (b"max_batch_size: 4\n# caf\xe9\n", "config.pbtxt is not UTF-8"),
        # protobuf quotes the whole line: 200 kB of braces became the reason in the index
        "braces": (b"dynamic_batching " + b"{ " * 50_000 + b"}" * 50_000, "config.pbtxt: 1:"),
        "named": (b'name: "' + b"x" * 100_000 + b'"\n', "config names the model"),
        "overflow": (
            b'input [ { name: "x" data_type: TYPE_FP32 dims: [ 99999999999999999999 ] } ]',
            "out of range",
        ),
        "datatype": (b'input [ { name: "x" data_type: TYPE_FOO dims: [ 16 ] } ]', "TYPE_FOO"),
        "twice": (b"max_batch_size: 4\nmax_batch_size: 8\n", "max_batch_size"),
    }
    for name, (text, _) in configs.items():
        mlp_model(tmp_path / name / "1" / "model.onnx")
        (tmp_path / name / "config.pbtxt").write_bytes(text)
    mlp_model(tmp_path / "good" / "1" / "model.onnx")
    server = start_server(tmp_path, security=EXPLICIT_MODEL_CONTROL)
    with triton.InferenceServerClient(server.address) as client:
        index = {e.name: e for e in client.get_model_repository_index().models}
        for name, (_, reason) in configs.items():
            assert index[name].state == "UNAVAILABLE", name
            assert reason in index[name].reason, (name, index[name].reason[:200])
            assert len(index[name].reason) < 1000, (name, len(index[name].reason))
            code, message = error_of(lambda name=name: client.load_model(name))
            assert code == "INVALID_ARGUMENT" and reason in message, (code, message[:200])
        assert infer_probs(client, "good", x_input()).shape == (2, 4)


def test_a_warm_up_file_that_is_a_fifo_fails_the_load_at_once(
    repo: Path, start_server: StartServer
) -> None:
    # Reading it blocked a worker thread, the load, and the model's lock, for good.
    (repo / "m" / "warmup").mkdir()
    fifo = repo / "m" / "warmup" / "x.bin"
    os.mkfifo(fifo)
    server = start_server(repo, security=OVERRIDES)
    sample = warmup()
    sample["inputs"] = {"x": {"data_type": "TYPE_FP32", "dims": [16], "input_data_file": "x.bin"}}
    override = json.dumps({"max_batch_size": 4, "model_warmup": [sample]})
    with triton.InferenceServerClient(server.address) as client:
        try:
            code, message = error_of(
                lambda: client.load_model("m", config=override, client_timeout=10)
            )
        finally:  # unblock a reader, should there be one
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(fifo) else -1
            if descriptor >= 0:
                os.close(descriptor)
        assert code == "INVALID_ARGUMENT", (code, message)
        assert "warmup/x.bin is not a regular file" in message
        assert client.is_model_ready("m")


def _has_reader(fifo: Path) -> bool:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody has it open for reading
        return False
    return True


def test_a_version_named_many_times_loads_once(repo: Path, start_server: StartServer) -> None:
    # Each mention built a session and an executor thread; all but the last were never
    # served nor closed: one request, a million sessions.
    # Threads of other tests' servers (a module's server with a model "m") are not ours.
    others = {t for t in threading.enumerate() if t.name.startswith("ferry-m-")}
    server = start_server(repo, security=OVERRIDES)

    def lanes() -> int:
        return sum(
            t.name.startswith("ferry-m-") and t not in others for t in threading.enumerate()
        )

    with triton.InferenceServerClient(server.address) as client:
        override = {"version_policy": {"specific": {"versions": [1] * 6}}}
        client.load_model("m", config=json.dumps(override))
        assert client.get_model_metadata("m").versions == ["1"]
        wait_until(lambda: lanes() == 1, what=f"one lane, not {lanes()}")
        override = {"version_policy": {"specific": {"versions": list(range(2, 100_000))}}}
        code, message = error_of(lambda: client.load_model("m", config=json.dumps(override)))
        assert code == "INVALID_ARGUMENT", (code, message)
        assert "versions [2, 3, 4, 5, 6, 7, 8, 9, 10, 11] and 99988 more" in message, message
        assert client.is_model_ready("m")


def test_the_poller_does_not_walk_links_out_of_the_repository(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A link to "/" had every poll walk the whole file system, for a model that can
    # never load (it resolves outside the repository); every change out there was a
    # reload attempt.
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx")
    outside = tmp_path / "outside"
    mlp_model(outside / "1" / "model.onnx")
    (repo / "link").symlink_to(outside, target_is_directory=True)
    server = start_server(repo, poll_repository_s=3600.0)
    poller = server.server._poller
    assert poller is not None
    (outside / "notes.txt").write_text("changed")
    caplog.set_level(logging.INFO, logger="ferry.server.poller")
    caplog.clear()  # the start-up's refusal of 'link'
    server.call(poller.poll_once())
    assert not [r for r in caplog.records if "'link'" in r.getMessage()], caplog.text
    mlp_model(repo / "m" / "2" / "model.onnx")  # changes inside are still seen
    server.call(poller.poll_once())
    with triton.InferenceServerClient(server.address) as client:
        assert client.get_model_metadata("m").versions == ["2"]


ARABIC_ONE = "\u0661"


def test_version_folders_that_are_not_plain_numbers_are_ignored(
    tmp_path: Path, start_server: StartServer
) -> None:
    good = mlp_model(tmp_path / "m" / "1" / "model.onnx")
    # str.isdigit() takes these, int() refuses or misreads them: "²" failed the whole
    # model with "invalid literal for int()", U+0661 (Arabic one) was a
    # second version 1.
    for odd in ("²", ARABIC_ONE, "1" + "0" * 5000):
        try:
            (tmp_path / "m" / odd).mkdir()
        except OSError:  # a name longer than the file system allows
            continue
        (tmp_path / "m" / odd / "model.onnx").write_bytes(good.read_bytes())
    (tmp_path / "m" / ARABIC_ONE / "model.onnx").write_bytes(b"not onnx")
    server = start_server(tmp_path, security=EXPLICIT_MODEL_CONTROL)
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("m"), client.get_model_repository_index()
        assert client.get_model_metadata("m").versions == ["1"]
        assert infer_probs(client, "m", x_input()).shape == (2, 4)


def test_a_folder_whose_name_is_not_utf8_does_not_break_the_index(
    tmp_path: Path, start_server: StartServer
) -> None:
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    odd = os.path.join(os.fsencode(tmp_path), b"bad\xff")
    os.mkdir(odd)
    mlp_model(Path(os.fsdecode(odd)) / "1" / "model.onnx")
    server = start_server(tmp_path, security=EXPLICIT_MODEL_CONTROL)
    with triton.InferenceServerClient(server.address) as client:
        names = [e.name for e in client.get_model_repository_index().models]
        assert names == ["m"]
        assert client.is_server_ready()
        assert infer_probs(client, "m", x_input()).shape == (2, 4)


# Names no repository holds ----------------------------------------------------------------


def test_loads_of_names_that_are_not_there_leave_nothing_behind(
    repo: Path, start_server: StartServer
) -> None:
    server = start_server(repo, security=EXPLICIT_MODEL_CONTROL)
    manager = server.server.manager
    before = dict(manager._locks)
    with triton.InferenceServerClient(server.address) as client:
        for n in range(50):
            code, _ = error_of(lambda n=n: client.load_model(f"ghost-{n}"))
            assert code == "NOT_FOUND"
            code, _ = error_of(lambda n=n: client.unload_model(f"ghost-{n}"))
            assert code == "NOT_FOUND"
        long_name = "é" * 100_000  # 200 kB: each such name was kept for good
        code, message = error_of(lambda: client.load_model(long_name))
        assert code in ("NOT_FOUND", "INVALID_ARGUMENT"), (code, message)
        assert len(message) <= 2048 + 100
        code, message = error_of(lambda: client.load_model("a\0b"))
        assert code == "INVALID_ARGUMENT" and "model name" in message
        assert client.is_model_ready("m")
    assert manager._locks.keys() == before.keys()


def test_a_long_unicode_model_name_gets_a_status_the_client_can_read(
    repo: Path, start_server: StartServer
) -> None:
    # Cut to 2,048 characters, a name of "€" still percent-encoded to 18 kB of status
    # metadata: the client saw RESOURCE_EXHAUSTED "Stream removed", not the answer.
    server = start_server(repo, security=EXPLICIT_MODEL_CONTROL)
    name = "€" * 20_000
    with triton.InferenceServerClient(server.address) as client:
        code, message = error_of(lambda: client.load_model(name))
        assert code == "INVALID_ARGUMENT" and "model name" in message, (code, message)
        code, message = error_of(lambda: client.unload_model(name))
        assert code == "NOT_FOUND", (code, message)
        code, message = error_of(lambda: infer_probs(client, name, x_input()))
        assert code == "NOT_FOUND", (code, message)
        assert client.is_model_ready("m")


def test_a_failed_load_of_several_versions_leaves_no_threads_behind(
    repo: Path, start_server: StartServer
) -> None:
    # Version 1 was built (its session and executor thread started), version 2 failed:
    # version 1 was never served and never closed, its thread kept for good, per load.
    # Threads of other tests' servers (a module's server with a model "m") are not ours.
    others = {t for t in threading.enumerate() if t.name.startswith("ferry-m-")}
    server = start_server(repo, security=OVERRIDES)
    manager = server.server.manager
    (repo / "m" / "2").mkdir()
    (repo / "m" / "2" / "model.onnx").write_bytes(b"not onnx")

    def lanes() -> int:
        return sum(
            t.name.startswith("ferry-m-") and t not in others for t in threading.enumerate()
        )

    with triton.InferenceServerClient(server.address) as client:
        before = lanes()
        override = json.dumps({"version_policy": {"all": {}}})
        for _ in range(5):
            code, message = error_of(lambda: client.load_model("m", config=override))
            assert code == "INVALID_ARGUMENT" and "model.onnx" in message, (code, message)
        assert client.is_model_ready("m")
        assert infer_probs(client, "m", x_input()).shape == (2, 4)
        wait_until(lambda: lanes() == before, what=f"{lanes()} lanes, {before} before")
        assert [m.version for m in manager.loaded()] == ["1"]


def test_a_deeply_nested_config_override_is_refused_by_name(
    repo: Path, start_server: StartServer
) -> None:
    server = start_server(repo, security=OVERRIDES)
    with triton.InferenceServerClient(server.address) as client:
        nested = '{"parameters": ' + "[" * 100_000 + "]" * 100_000 + "}"
        code, message = error_of(lambda: client.load_model("m", config=nested))
        assert code == "INVALID_ARGUMENT", (code, message)
        assert "load parameter 'config'" in message, message
        assert client.is_model_ready("m")


# Loads that race the shutdown -------------------------------------------------------------


def test_a_load_after_the_models_closed_is_refused(repo: Path, start_server: StartServer) -> None:
    server = start_server(repo, security=EXPLICIT_MODEL_CONTROL)
    manager = server.server.manager
    server.call(manager.close(1.0))
    with triton.InferenceServerClient(server.address) as client:
        code, message = error_of(lambda: client.load_model("m"))
        assert code == "UNAVAILABLE", (code, message)
        assert "shutting down" in message
    assert manager.loaded() == []


def test_a_load_that_ends_after_the_models_closed_is_not_served(
    repo: Path, start_server: StartServer
) -> None:
    instances: list[GatedInstance] = []

    def held(model: str, inner: Runner) -> GatedInstance:
        gate = GatedInstance(inner)
        if instances:  # the start-up's instance runs freely, the reload's is held
            gate.hold()
        instances.append(gate)
        return gate

    server = start_server(repo, security=OVERRIDES, wrap_instance=held)
    manager = server.server.manager
    override = json.dumps({"max_batch_size": 4, "model_warmup": [warmup()]})
    outcome: list[BaseException | None] = []

    def load() -> None:
        with triton.InferenceServerClient(server.address) as client:
            try:
                client.load_model("m", config=override, client_timeout=20)
                outcome.append(None)
            except InferenceServerException as error:
                outcome.append(error)

    loader = threading.Thread(target=load)
    loader.start()
    wait_until(lambda: len(instances) == 2, what="the new version's instance")
    assert instances[1].entered.acquire(timeout=10)  # in its warm-up, held
    closing = server.call(_start(manager.close(5.0)))
    for gate in instances:
        gate.release()
    server.call(_wait(closing))
    loader.join(20)
    assert outcome and isinstance(outcome[0], InferenceServerException), outcome
    assert (outcome[0].status() or "").endswith("UNAVAILABLE")
    assert manager.loaded() == []
    assert manager.join_threads(5.0)


async def _start(coro: object) -> object:
    import asyncio

    return asyncio.ensure_future(coro)  # type: ignore[arg-type]


async def _wait(task: object) -> None:
    await task  # type: ignore[misc]


# Storms -----------------------------------------------------------------------------------


def test_a_load_unload_storm_never_gives_a_wrong_answer_or_internal(
    repo: Path, start_server: StartServer
) -> None:
    server = start_server(repo, security=OVERRIDES)
    x = x_input(3)
    with triton.InferenceServerClient(server.address) as client:
        expected = infer_probs(client, "m", x)
    stop = threading.Event()
    failures: list[str] = []
    answered = [0]

    def caller() -> None:
        with triton.InferenceServerClient(server.address) as client:
            while not stop.is_set():
                try:
                    probs = infer_probs(client, "m", x)
                except InferenceServerException as error:
                    status = (error.status() or "").removeprefix("StatusCode.")
                    if status not in ("UNAVAILABLE", "NOT_FOUND") or "'m'" not in (
                        error.message() or ""
                    ):
                        failures.append(f"{status}: {error.message()}")
                    continue
                answered[0] += 1
                if not np.allclose(probs, expected, rtol=1e-5, atol=1e-6):
                    failures.append(f"wrong answer {probs}")

    def controller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with triton.InferenceServerClient(server.address) as client:
            for _ in range(8):
                try:
                    if rng.random() < 0.5:
                        client.unload_model("m")
                    else:
                        count = int(rng.integers(1, 3))
                        client.load_model(
                            "m",
                            config=json.dumps({"instance_group": [{"count": count}]}),
                        )
                except InferenceServerException as error:
                    status = (error.status() or "").removeprefix("StatusCode.")
                    if status != "NOT_FOUND":  # unloading what another unloaded
                        failures.append(f"control {status}: {error.message()}")

    callers = [threading.Thread(target=caller) for _ in range(3)]
    controllers = [threading.Thread(target=controller, args=(seed,)) for seed in range(2)]
    for thread in (*callers, *controllers):
        thread.start()
    for thread in controllers:
        thread.join(60)
    stop.set()
    for thread in callers:
        thread.join(60)
    assert not any(t.is_alive() for t in (*callers, *controllers))
    assert not failures, failures[:5]
    with triton.InferenceServerClient(server.address) as client:
        client.load_model("m")
        np.testing.assert_allclose(infer_probs(client, "m", x), expected, rtol=1e-5, atol=1e-6)


# The REST door ----------------------------------------------------------------------------


def rest_post(server: RunningServer, path: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://{server.http_address}{path}", data=body, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize(
    ("quoted", "status", "says"),
    [
        ("..", 400, "model name"),
        ("%2E%2E", 400, "model name"),
        ("..%2Fm", 400, "model name"),
        ("a%00b", 400, "model name"),
        ("%E2%82%AC" * 200, 400, "model name"),  # 600 bytes: no folder is named so
        ("ghost", 404, "ghost"),
    ],
)
def test_rest_load_and_unload_of_hostile_names(
    repo: Path, start_server: StartServer, quoted: str, status: int, says: str
) -> None:
    server = start_server(repo, security=OVERRIDES)
    code, body = rest_post(server, f"/v2/repository/models/{quoted}/load", b"{}")
    assert code == status and says in body, (code, body[:300])
    assert len(body) < 4096
    code, body = rest_post(server, f"/v2/repository/models/{quoted}/unload", b"{}")
    assert code in (400, 404), (code, body[:300])
    override = {"parameters": {"config": json.dumps({"instance_group": [{"count": 2**31 - 1}]})}}
    code, body = rest_post(server, "/v2/repository/models/m/load", json.dumps(override).encode())
    assert code == 400 and "instance_group" in body, (code, body[:300])
    with triton.InferenceServerClient(server.address) as client:
        assert infer_probs(client, "m", x_input()).shape == (2, 4)

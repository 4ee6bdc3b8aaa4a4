"""The model repository through the real gRPC port: Triton's layout, config.pbtxt, version
policies, models that fail to load, the single-file shortcut and path safety."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import EXPLICIT_MODEL_CONTROL, GatedInstance, RunningServer
from tests.models import fixed_shape_model, identity_model, mlp_model, write_config

StartServer = Callable[..., RunningServer]


def x_input(rows: int = 2, features: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)


def infer_probs(
    client: triton.InferenceServerClient, model: str, x: np.ndarray, version: str = ""
) -> tuple[np.ndarray, str]:
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], model_version=version)
    return result.as_numpy("probs"), result.get_response().model_version


def direct_probs(model_file: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"x": x})[0]  # type: ignore[no-any-return]


def error_of(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return (info.value.status() or "").removeprefix("StatusCode."), info.value.message() or ""


# config.pbtxt -------------------------------------------------------------------------


def test_config_is_honoured(
    tmp_path: Path, start_server: StartServer, gated: Callable[..., GatedInstance]
) -> None:
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    write_config(
        tmp_path / "m",
        """
        name: "m"
        platform: "onnxruntime_onnx"
        max_batch_size: 8
        dynamic_batching {
          max_queue_delay_microseconds: 5000
          preferred_batch_size: [ 4, 8 ]
        }
        instance_group [ { count: 3 kind: KIND_CPU } ]
        """,
    )
    server = start_server(tmp_path, wrap_instance=gated)
    with triton.InferenceServerClient(server.address) as client:
        config = client.get_model_config("m").config
        assert config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 5000
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert sum(group.count for group in config.instance_group) == 3

        metadata = client.get_model_metadata("m")
        assert [(i.name, i.datatype, list(i.shape)) for i in metadata.inputs] == [
            ("x", "FP32", [-1, 16])
        ]

        # what the server runs with, not only what it reports
        policy = server.server.manager.get("m").scheduler.policy
        assert policy.max_batch_size == 8
        assert policy.max_queue_delay_s == pytest.approx(0.005)
        assert policy.preferred_batch_sizes == (4, 8)

        # count 3 -> three instances, and all three run at the same time: with every
        # instance held, three requests sent one after another each reach an instance
        instances: list[GatedInstance] = gated.instances  # type: ignore[attr-defined]
        assert len(instances) == 3
        for gate in instances:
            gate.hold()
        entered = [0, 0, 0]
        done: queue.Queue[object] = queue.Queue()
        for i in range(3):
            tensor = triton.InferInput("x", [1, 16], "FP32")
            tensor.set_data_from_numpy(x_input(1, seed=i))
            client.async_infer("m", [tensor], callback=lambda result, error: done.put(error))
            assert _wait_entered(instances, entered, i + 1), f"request {i} found no instance"
        assert entered == [1, 1, 1]
        for gate in instances:
            gate.release()
        assert [done.get(timeout=30) for _ in range(3)] == [None, None, None]
        assert [g.batch_rows for g in instances] == [[1], [1], [1]]


def _wait_entered(instances: list[GatedInstance], entered: list[int], expected: int) -> bool:
    """Count entries into each instance's run() until there are `expected` in all."""
    deadline = time.monotonic() + 30
    while sum(entered) < expected and time.monotonic() < deadline:
        for index, gate in enumerate(instances):
            if gate.entered.acquire(timeout=0.01):
                entered[index] += 1
    return sum(entered) >= expected


def test_defaults_without_config(tmp_path: Path, start_server: StartServer) -> None:
    """No config: shapes from the graph, batchable with the documented default size."""
    from ferry.server.config import DEFAULT_MAX_BATCH_SIZE

    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    fixed_shape_model(tmp_path / "fixed" / "1" / "model.onnx")
    server = start_server(tmp_path)
    with triton.InferenceServerClient(server.address) as client:
        assert client.get_model_config("m").config.max_batch_size == DEFAULT_MAX_BATCH_SIZE
        assert client.get_model_config("fixed").config.max_batch_size == 0
        metadata = client.get_model_metadata("fixed")
        assert [list(i.shape) for i in metadata.inputs] == [[2, 3]]


def test_triton_only_fields_warn_but_do_not_fail(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    write_config(
        tmp_path / "m",
        """
        max_batch_size: 4
        backend: "onnxruntime"
        response_cache { enable: true }
        model_transaction_policy { decoupled: false }
        dynamic_batching { preserve_ordering: true max_queue_delay_microseconds: 100 }
        instance_group [ { count: 2 kind: KIND_CPU host_policy: "numa0" } ]
        batch_input [
          { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: TYPE_FP32 source_input: ["x"] }
        ]
        """,
    )
    caplog.set_level(logging.WARNING)
    server = start_server(tmp_path)
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("m")
        config = client.get_model_config("m").config
        assert config.max_batch_size == 4
        assert config.instance_group[0].count == 2
        probs, _ = infer_probs(client, "m", x_input())
        np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    text = "\n".join(warnings)
    for field in ("response_cache", "model_transaction_policy", "preserve_ordering",
                  "instance_group.host_policy", "batch_input"):
        assert field in text, f"no warning names {field}: {warnings}"
    assert all("'m'" in w for w in warnings if "ignoring" in w)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# Version policy -----------------------------------------------------------------------


def _three_versions(repo: Path) -> dict[str, Path]:
    return {
        str(v): mlp_model(repo / "m" / str(v) / "model.onnx", seed=v) for v in (1, 2, 3)
    }


def test_latest_version_by_default(tmp_path: Path, start_server: StartServer) -> None:
    files = _three_versions(tmp_path)
    server = start_server(tmp_path)
    x = x_input()
    with triton.InferenceServerClient(server.address) as client:
        assert list(client.get_model_metadata("m").versions) == ["3"]
        assert client.is_model_ready("m", "3")
        assert not client.is_model_ready("m", "1")
        probs, version = infer_probs(client, "m", x)
        assert version == "3"
        np.testing.assert_allclose(probs, direct_probs(files["3"], x), rtol=1e-5, atol=1e-6)
        code, message = error_of(lambda: infer_probs(client, "m", x, version="1"))
        assert code == "NOT_FOUND"
        assert "'1'" in message


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("all {}", ["1", "2", "3"]),
        ("latest { num_versions: 2 }", ["2", "3"]),
        ("specific { versions: [1, 3] }", ["1", "3"]),
    ],
)
def test_version_policy(
    tmp_path: Path, start_server: StartServer, policy: str, served: list[str]
) -> None:
    files = _three_versions(tmp_path)
    write_config(tmp_path / "m", f"version_policy: {{ {policy} }}\n")
    server = start_server(tmp_path)
    x = x_input()
    with triton.InferenceServerClient(server.address) as client:
        assert list(client.get_model_metadata("m").versions) == served
        for version in ("1", "2", "3"):
            assert client.is_model_ready("m", version) == (version in served)
        for version in served:
            probs, answered = infer_probs(client, "m", x, version=version)
            assert answered == version
            np.testing.assert_allclose(
                probs, direct_probs(files[version], x), rtol=1e-5, atol=1e-6
            )
        # without a version, the newest served one answers
        assert infer_probs(client, "m", x)[1] == served[-1]
        index = client.get_model_repository_index()
        assert sorted(m.version for m in index.models if m.name == "m") == served


# Models that fail to load -------------------------------------------------------------


def test_failed_models_are_reported_and_the_others_serve(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    good = mlp_model(tmp_path / "good" / "1" / "model.onnx")
    (tmp_path / "corrupt" / "1").mkdir(parents=True)
    (tmp_path / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    mlp_model(tmp_path / "badsyntax" / "1" / "model.onnx")
    write_config(tmp_path / "badsyntax", "max_batch_size: lots\n")
    mlp_model(tmp_path / "badinput" / "1" / "model.onnx")
    write_config(
        tmp_path / "badinput", 'input [ { name: "nope" data_type: TYPE_FP32 dims: [16] } ]\n'
    )
    mlp_model(tmp_path / "toobig" / "1" / "model.onnx")
    write_config(
        tmp_path / "toobig", "max_batch_size: 4\ndynamic_batching { preferred_batch_size: [ 9 ] }\n"
    )
    mlp_model(tmp_path / "hugedelay" / "1" / "model.onnx")
    write_config(  # past a float: refused by name, not an OverflowError that stops the start
        tmp_path / "hugedelay",
        'parameters { key: "adaptive_queue_delay_microseconds" '
        f'value {{ string_value: "1{"0" * 400}" }} }}\n',
    )
    (tmp_path / "empty").mkdir()
    reasons = {
        "corrupt": "model.onnx",
        "badsyntax": "config.pbtxt",
        "badinput": "nope",
        "toobig": "preferred_batch_size 9",
        "hugedelay": "adaptive_queue_delay_microseconds must be at most 1000000",
        "empty": "no version folder",
    }

    caplog.set_level(logging.INFO)
    server = start_server(tmp_path, security=EXPLICIT_MODEL_CONTROL)

    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for name, reason in reasons.items():
        folder = str(tmp_path / name)
        lines = [m for m in errors if f"'{name}'" in m]
        assert lines, f"no error logged for {name}: {errors}"
        assert folder in lines[0], f"{lines[0]!r} does not give the path {folder}"
        assert reason in lines[0], f"{lines[0]!r} does not give the reason {reason!r}"

    with triton.InferenceServerClient(server.address) as client:
        assert client.is_server_live()
        assert client.is_model_ready("good")
        x = x_input()
        probs, _ = infer_probs(client, "good", x)
        np.testing.assert_allclose(probs, direct_probs(good, x), rtol=1e-5, atol=1e-6)

        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["good"].state == "READY"
        for name, reason in reasons.items():
            assert not client.is_model_ready(name)
            assert index[name].state == "UNAVAILABLE"
            assert reason in index[name].reason, (name, index[name].reason)
            code, message = error_of(lambda name=name: infer_probs(client, name, x))
            assert code == "UNAVAILABLE"
            assert reason in message

        # fixing the model on disk and loading it again brings it up
        mlp_model(tmp_path / "corrupt" / "1" / "model.onnx")
        client.load_model("corrupt")
        assert client.is_model_ready("corrupt")
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["corrupt"].state == "READY"
        assert index["corrupt"].reason == ""


# The single-file shortcut -------------------------------------------------------------


def test_single_onnx_file(tmp_path: Path, start_server: StartServer) -> None:
    model_file = mlp_model(tmp_path / "digits_mlp.onnx")
    server = start_server(model_file, security=EXPLICIT_MODEL_CONTROL)
    x = x_input(3)
    with triton.InferenceServerClient(server.address) as client:
        assert client.is_server_ready()
        metadata = client.get_model_metadata("digits_mlp")
        assert list(metadata.versions) == ["1"]
        assert client.is_model_ready("digits_mlp", "1")
        probs, version = infer_probs(client, "digits_mlp", x)
        assert version == "1"
        np.testing.assert_allclose(probs, direct_probs(model_file, x), rtol=1e-5, atol=1e-6)
        index = client.get_model_repository_index().models
        assert [(m.name, m.version, m.state) for m in index] == [("digits_mlp", "1", "READY")]
        code, _ = error_of(lambda: client.load_model("other"))
        assert code == "NOT_FOUND"


# Path safety --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", "a\\b", "/etc"])
def test_model_names_cannot_escape_the_repository(
    tmp_path: Path, start_server: StartServer, name: str
) -> None:
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx")
    # a model just outside the repository, which '../x' would reach
    mlp_model(tmp_path / "x" / "1" / "model.onnx")
    server = start_server(repo, security=EXPLICIT_MODEL_CONTROL)
    with triton.InferenceServerClient(server.address) as client:
        code, message = error_of(lambda: client.load_model(name))
        assert code == "INVALID_ARGUMENT"
        assert "model name" in message
        # the refused name leaves no trace: the index and readiness are unchanged
        names = [m.name for m in client.get_model_repository_index().models]
        assert name not in names
        assert client.is_server_ready()
        assert client.is_model_ready("m")


def test_symlink_out_of_the_repository_is_refused(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx")
    mlp_model(tmp_path / "outside" / "1" / "model.onnx")
    server = start_server(repo, security=EXPLICIT_MODEL_CONTROL)
    (repo / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with triton.InferenceServerClient(server.address) as client:
        code, message = error_of(lambda: client.load_model("link"))
        assert code == "INVALID_ARGUMENT"
        assert "outside the model repository" in message
        assert not client.is_model_ready("link")


def test_loading_an_unknown_model_leaves_the_server_ready(
    tmp_path: Path, start_server: StartServer
) -> None:
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    server = start_server(tmp_path, security=EXPLICIT_MODEL_CONTROL)
    with triton.InferenceServerClient(server.address) as client:
        code, message = error_of(lambda: client.load_model("ghost"))
        assert code == "NOT_FOUND"
        assert "ghost" in message
        assert client.is_server_ready()
        assert "ghost" not in [m.name for m in client.get_model_repository_index().models]


def test_model_added_after_start_loads_on_request(
    tmp_path: Path, start_server: StartServer
) -> None:
    mlp_model(tmp_path / "m" / "1" / "model.onnx")
    server = start_server(tmp_path, security=EXPLICIT_MODEL_CONTROL)
    identity_model(tmp_path / "late" / "1" / "model.onnx", "INT32")
    with triton.InferenceServerClient(server.address) as client:
        assert not client.is_model_ready("late")
        client.load_model("late")
        assert client.is_model_ready("late")
        client.unload_model("late")
        assert not client.is_model_ready("late")


def test_unknown_fields_are_found_at_any_depth() -> None:
    """The warning names every Triton-only field, nested ones included, and is not fooled by
    strings, comments, lists, maps or values that look like names."""
    from ferry.server.config import _written_fields

    top, unknown, _ = _written_fields(
        """
        # max_queue_delay { not: a field }
        name: "a { b"  max_batch_size: 4
        backend: 'x ] y'
        response_cache { enable: true }
        dynamic_batching: { preserve_ordering: true max_queue_delay_microseconds: 1e3
                            default_queue_policy { max_queue_size: 3 timeout: -inf } }
        instance_group [ { count: 2 kind: KIND_CPU host_policy: "n" gpus: [0, 1] },
                         { count: 1 passive: true } ]
        input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 16 ] allow_ragged_batch: true } ]
        parameters { key: "k" value: { string_value: "v" } }
        parameters: [ { key: "k2" value { string_value: "v" extra: 1 } } ]
        sequence_batching { control_input [ { name: "START" } ] }
        version_policy: { all {} }
        """
    )
    assert top == {
        "name", "max_batch_size", "backend", "dynamic_batching", "instance_group", "input",
        "parameters", "version_policy",
    }
    assert unknown == [
        "dynamic_batching.default_queue_policy.timeout",
        "input.allow_ragged_batch",
        "instance_group.host_policy",
        "instance_group.passive",
        "parameters.value.extra",
        "response_cache",
        "sequence_batching",
    ]


def test_a_configs_warning_is_logged_once_per_model_not_per_version(
    tmp_path: Path, start_server: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    """The README says once per model; with three versions served it was said three
    times."""
    caplog.set_level(logging.WARNING)
    for version in (1, 2, 3):
        mlp_model(tmp_path / "m" / str(version) / "model.onnx", seed=version)
    write_config(tmp_path / "m", "version_policy: { all {} }\nresponse_cache { enable: true }\n")
    server = start_server(tmp_path)
    with triton.InferenceServerClient(server.address) as client:
        assert [m.version for m in client.get_model_repository_index().models] == ["1", "2", "3"]
    said = [r for r in caplog.records if "response_cache" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]

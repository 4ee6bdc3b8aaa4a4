"""A new user's first hour, from a fresh clone: what the README tells them to type must work
as written, and what the command line says must agree with it. Each test drives real
things: `ferry serve` as a child process on port 0, the README's own commands through bash,
tritonclient as the independent client."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from ferry.client import AsyncFerryClient, FerryClient
from ferry.server.cli import build_parser
from tests.external_tools import REPO, require_tool
from tests.process import FerryProcess

README = REPO / "README.md"
REST = re.compile(r"REST binding on http://(\S+):(\d+)")


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ferry.server.cli", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


# The command line -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--shutdown-grace", "-1"),
        ("--grpc-listeners", "65"),
        ("--grpc-listeners", "-1"),
        ("--poll-repository", "0"),
        ("--max-concurrent-rpcs", "0"),
        ("--min-ping-interval", "-1"),
    ],
)
def test_a_bad_flag_value_is_named_in_the_message(flag: str, value: str) -> None:
    """The README promises exit code 2 and a message naming the flag; these were reported
    in the server's internal words ('grpc listeners must be within 0..64')."""
    done = ferry(
        "serve", str(REPO / "examples" / "model_repository"), "--host", "127.0.0.1",
        "--grpc-port", "0", "--http-port", "-1", "--metrics-port", "-1", flag, value,
    )
    assert done.returncode == 2, done.stderr
    assert flag in done.stderr and value in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def serve_parser() -> argparse.ArgumentParser:
    commands = next(
        action for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return commands.choices["serve"]  # type: ignore[no-any-return]


def serve_help() -> str:
    done = ferry("serve", "--help")
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())  # undo argparse's wrapping


def test_every_user_flag_of_serve_is_in_the_readme() -> None:
    """--host and --grpc-port were in no line of the README: a user whose port 8001 was
    taken had to find them in --help."""
    serve = serve_parser()
    flags = {
        option
        for group in serve._action_groups if group.title != "internal"
        for action in group._group_actions
        for option in action.option_strings if option.startswith("--") and option != "--help"
    }
    readme = README.read_text()
    missing = sorted(flag for flag in flags if not re.search(rf"{flag}(?![a-z-])", readme))
    assert not missing, f"serve flags the README never names: {missing}"


def test_serve_help_says_what_the_readme_says() -> None:
    text = serve_help()
    # README: "--metrics-port; 0 picks a free port, -1 turns it off"
    metrics = text.split("--metrics-port METRICS_PORT ")[-1]
    assert metrics.startswith("HTTP port of the Prometheus /metrics endpoint; 0 picks a free")
    # README: --max-message-size bounds REST bodies and answers as well as gRPC messages
    size = text.split("--max-message-size BYTES ")[-1].split(" --")[0]
    assert "REST" in size, size
    top = ferry("--help")
    assert "REST" in " ".join(top.stdout.split())


def readme_flag_defaults() -> dict[str, str]:
    """flag -> the default its README table row gives (the tables of flags with defaults)."""
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| ([^|]+) \|", README.read_text(), re.MULTILINE)
    return {flag: default.strip() for flag, default in rows}


def readme_value(text: str) -> object:
    """A README default as the parser holds it: '64 MiB', '2^31', '0, that is 4', 'off'."""
    sizes = {"KiB": 2**10, "MiB": 2**20}
    if match := re.fullmatch(r"(\d+) (KiB|MiB)", text):
        return int(match.group(1)) * sizes[match.group(2)]
    if match := re.fullmatch(r"(\d+)\^(\d+)", text):
        return int(match.group(1)) ** int(match.group(2))
    text = text.split(",")[0]
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d*", text):
        return float(text)
    return {"off": None, "no limit": None}.get(text, text)


def test_the_readme_tables_give_the_defaults_of_serve() -> None:
    readme = readme_flag_defaults()
    assert {"--host", "--grpc-port", "--http-port", "--metrics-port", "--max-message-size"} <= set(
        readme
    )
    serve = serve_parser()
    for action in serve._actions:
        for flag in action.option_strings:
            if flag not in readme or readme[flag].startswith("`"):
                continue  # not in a table, or "the value of another flag"
            default = None if action.default is False else action.default
            if flag in ("--event-loop", "--max-run-memory"):
                continue  # uvloop where it is installed, a share of memory: the machine decides
            expected = readme_value(readme[flag])
            if isinstance(default, (int, float)) and isinstance(expected, (int, float)):
                assert float(default) == float(expected), (flag, default, readme[flag])
            else:
                assert default == expected, (flag, default, readme[flag])


# The README's own-model walkthrough ----------------------------------------------------


def walkthrough() -> tuple[str, str, list[tuple[str, str]]]:
    """(set-up commands, the serve command, [(curl command, expected output)]) of the
    README's "Your own model" section."""
    section = README.read_text().split("### Your own model, step by step", 1)[1]
    section = section.split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2, "the walkthrough is two sh blocks: set up and serve, then call"
    setup, serve = blocks[0].rstrip("\n").rsplit("\n", 1)
    assert serve.startswith(".venv/bin/ferry serve "), serve
    examples: list[tuple[str, str]] = []
    command: list[str] = []
    for line in blocks[1].splitlines():
        if line.startswith("# "):
            examples.append(("\n".join(command), line[2:]))
            command = []
        else:
            command.append(line)
    assert not command and len(examples) >= 2, "every command is followed by its output"
    return setup, serve, examples


def test_the_readme_own_model_walkthrough_runs_as_written(tmp_path: Path) -> None:
    require_tool("curl", "install curl (apt-get install curl)")
    setup, serve, examples = walkthrough()
    # The user's .venv is this interpreter's; everything else runs as written.
    script = setup.replace(".venv/bin/python", sys.executable)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    words = serve.split()
    repository = tmp_path / words[2]
    grpc_port, http_port = (words[words.index(flag) + 1] for flag in ("--grpc-port", "--http-port"))
    with FerryProcess(repository, "--http-port", "0") as server:
        http = server.wait_for(REST)[0]
        http_address = f"127.0.0.1:{http.group(2)}"
        for command, expected in examples:
            run = command.replace(f"127.0.0.1:{http_port}", http_address)
            result = subprocess.run(
                ["bash", "-c", run], capture_output=True, text=True, timeout=60, check=False
            )
            assert result.returncode == 0, (command, result.stderr)
            assert result.stdout.strip() == expected, command

        # ... and tritonclient over gRPC, as the README's other examples call it
        model = next(w for w in re.findall(r"/v2/models/([\w-]+)/infer", examples[0][0]))
        client = triton.InferenceServerClient(server.address)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        tensor = triton.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer(model, [tensor]).as_numpy("y"), 2 * x)
        wrong = triton.InferInput("x", [2, 4], "FP64")
        wrong.set_data_from_numpy(x.astype(np.float64))
        with pytest.raises(InferenceServerException) as refused:
            client.infer(model, [wrong])
        assert refused.value.message() == "input 'x': expected FP32 [-1, 4], got FP64 [2, 4]"
        client.close()
        assert server.stop() == 0
    assert grpc_port != "8001", "the walkthrough must not collide with the example's ports"


# scripts/setup.sh ---------------------------------------------------------------------


def fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A checkout whose .venv/bin/python only records its arguments: what setup.sh asks
    of pip, without a network or a real install."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    log = tmp_path / "calls.log"
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    python.chmod(0o755)
    return tmp_path, log


def setup(checkout: Path, *args: str) -> list[str]:
    """Run scripts/setup.sh; the pip commands it ran."""
    log = checkout / "calls.log"
    log.unlink(missing_ok=True)
    done = subprocess.run(
        ["bash", str(checkout / "scripts" / "setup.sh"), *args], cwd=checkout,
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
    )
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_setup_installs_once_so_the_example_serves_again_offline(tmp_path: Path) -> None:
    """scripts/serve-example.sh ran a full editable install at every start: without a
    network (a laptop on a train, a machine behind a proxy) the second start failed in
    pip before the server ran."""
    checkout, _ = fake_checkout(tmp_path)
    first = setup(checkout)
    assert any("install" in call and ".[cpu]" in call for call in first), first
    assert setup(checkout) == []  # nothing changed: no pip at all
    assert any(".[cpu,test]" in call for call in setup(checkout, "test"))
    assert setup(checkout) == []  # the test set-up holds the runtime one
    assert setup(checkout, "test") == []
    with (checkout / "constraints.txt").open("a") as constraints:
        constraints.write("# a new pin\n")
    assert any(".[cpu]" in call for call in setup(checkout))  # a changed pin installs again


# ferry.client ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http://", "https://", "grpc://"])
def test_the_client_says_what_a_url_with_a_scheme_should_be(scheme: str) -> None:
    """A url such as "http://127.0.0.1:8001", as REST clients write it, failed each call
    with gRPC's "errors resolving ... Misformatted domain name"."""
    with FerryProcess(REPO / "examples" / "model_repository") as server:
        with pytest.raises(ValueError, match=re.escape(f"as '{server.address}'")):
            FerryClient(f"{scheme}{server.address}/")
        with pytest.raises(ValueError, match="host:port"):
            AsyncFerryClient(f"{scheme}{server.address}")
        # gRPC's own target forms still dial
        with FerryClient(f"dns:///{server.address}") as client:
            pixels = np.zeros((1, 64), dtype=np.float32)
            assert client.infer("digits", {"pixels": pixels})["label"].shape == (1,)
        assert server.stop() == 0


# Messages that tell a new user what to fix ------------------------------------------


def test_a_model_of_the_repository_that_is_not_loaded_says_how_to_load_it() -> None:
    """Explicit model control with nothing loaded: a call to the example model answered
    "unknown model 'digits'" although RepositoryIndex lists it. Now NOT_FOUND still, with
    a message that says it is in the repository and how to load it; a typo stays
    "unknown model"."""
    with FerryProcess(
        REPO / "examples" / "model_repository", "--model-control-mode", "explicit",
        "--http-port", "-1", "--metrics-port", "-1",
    ) as server, triton.InferenceServerClient(server.address) as client:
        x = triton.InferInput("pixels", [1, 64], "FP32")
        x.set_data_from_numpy(np.zeros((1, 64), np.float32))
        with pytest.raises(InferenceServerException) as not_loaded:
            client.infer("digits", [x])
        assert not_loaded.value.status() == "StatusCode.NOT_FOUND"
        message = not_loaded.value.message()
        assert "'digits' is in the model repository but not loaded" in message, message
        assert "RepositoryModelLoad" in message and "/v2/repository/models/digits/load" in message
        with pytest.raises(InferenceServerException) as typo:
            client.infer("digit", [x])
        assert typo.value.message() == "unknown model 'digit'"
        client.load_model("digits")
        assert client.infer("digits", [x]).as_numpy("label") is not None


def _rest_error(port: int, body: dict[str, object]) -> tuple[int, str]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/digits/infer", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]


def test_rest_names_a_misspelt_input_or_a_wrong_datatype_before_counting_its_values() -> None:
    """A misspelt input, or FP64 sent for FP32, with too few values in 'data': the
    message named the count, and the user fixed the count only to meet the real mistake
    next. Now the name and the datatype come first, in gRPC's words; and a nested 'data'
    with too few rows says so in rows."""
    with FerryProcess(
        REPO / "examples" / "model_repository", "--http-port", "0", "--metrics-port", "-1",
    ) as server:
        port = int(server.wait_for(REST)[0].group(2))
        status, message = _rest_error(port, {"inputs": [
            {"name": "pixel", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 10}]})
        assert (status, message) == (400, "unknown input 'pixel': model 'digits' takes 'pixels'")
        status, message = _rest_error(port, {"inputs": [
            {"name": "pixels", "datatype": "FP64", "shape": [1, 64], "data": [0.0] * 10}]})
        assert (status, message) == (
            400, "input 'pixels': expected FP32 [-1, 64], got FP64 [1, 64]"), message
        status, message = _rest_error(port, {"inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": [[0.0] * 64]}]})
        assert status == 400
        assert message == (
            "input 'pixels' FP32 [2, 64]: expected 2 rows of 64 values in 'data' (nested as "
            "the shape) or 128 values (flat), got 1 row"
        )


def test_a_model_saved_by_a_newer_onnx_says_which_ir_version_to_save(tmp_path: Path) -> None:
    """onnx's default IR version is newer than the pinned onnxruntime reads: the load
    failed with onnxruntime's C++ source path and signature, and no word on what to do."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 99  # newer than any onnxruntime reads
    (tmp_path / "new" / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "new" / "1" / "model.onnx"))
    done = ferry(
        "serve", str(tmp_path), "--host", "127.0.0.1", "--grpc-port", "0",
        "--http-port", "-1", "--metrics-port", "-1",
    )
    assert done.returncode == 1, done.stderr
    assert "Unsupported model IR version: 99" in done.stderr, done.stderr
    assert re.search(r"save the model with IR version \d+ or lower", done.stderr), done.stderr
    assert "/onnxruntime_src/" not in done.stderr


@pytest.mark.parametrize(
    ("method", "path", "extension"),
    [
        ("GET", "/v2/systemsharedmemory/status", "system shared memory"),
        ("POST", "/v2/systemsharedmemory/region/r/register", "system shared memory"),
        ("GET", "/v2/cudasharedmemory/status", "CUDA shared memory"),
        ("GET", "/v2/trace/setting", "trace"),
        ("POST", "/v2/models/digits/trace/setting", "trace"),
        ("GET", "/v2/logging", "logging"),
    ],
)
def test_rest_says_which_triton_extension_is_not_implemented(
    rest_server: int, method: str, path: str, extension: str
) -> None:
    """gRPC answers these UNIMPLEMENTED naming the extension; REST answered 404 "no
    endpoint", which reads as a typo in the path. Now 501 with gRPC's words."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{rest_server}{path}", method=method,
        data=b"{}" if method == "POST" else None,
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=10)
    assert answer.value.code == 501
    assert json.loads(answer.value.read()) == {
        "error": f"Ferry does not implement the {extension} extension"
    }


@pytest.fixture(scope="module")
def rest_server() -> Iterator[int]:
    with FerryProcess(
        REPO / "examples" / "model_repository", "--http-port", "0", "--metrics-port", "-1",
    ) as server:
        yield int(server.wait_for(REST)[0].group(2))


# What a Triton user brings: configs, model control, statistics ---------------------------


def _classifier(folder: Path) -> None:
    """sklearn's LogisticRegression as skl2onnx writes it without ZipMap: 'label' is
    [batch] (no dimension besides the batch), 'probabilities' [batch, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.eye(4, 3, dtype=np.float32), "W")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["float_input", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "logreg",
        [helper.make_tensor_value_info("float_input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    (folder / "1").mkdir(parents=True)
    onnx.save(model, str(folder / "1" / "model.onnx"))


def test_a_triton_config_with_reshape_for_a_batch_only_output_loads(tmp_path: Path) -> None:
    """Triton's config for an output that has no dimension besides the batch (a label)
    is `dims: [ 1 ] reshape: { shape: [ ] }`: Triton requires at least one dim, and
    tritonclient users copy this config unchanged. Ferry ignored reshape, checked `dims`
    against the graph and failed the load with "config output 'label' has dims [1], which
    do not fit the graph's []". Now the graph is checked against `reshape.shape` and the
    client sees `dims`, as in Triton (tests/test_reshape.py has the rest)."""
    _classifier(tmp_path / "iris")
    (tmp_path / "iris" / "config.pbtxt").write_text(
        'name: "iris"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "float_input" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [\n'
        '  { name: "label" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } },\n'
        '  { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] }\n'
        ']\n'
    )
    with FerryProcess(tmp_path) as server, triton.InferenceServerClient(server.address) as client:
        x = triton.InferInput("float_input", [2, 4], "FP32")
        x.set_data_from_numpy(np.eye(2, 4, dtype=np.float32))
        result = client.infer("iris", [x])
        assert result.as_numpy("label").tolist() == [[0], [1]]  # Triton's shape: [batch, 1]
        assert server.stop() == 0


def test_unloading_one_model_leaves_the_server_ready_as_in_triton(tmp_path: Path) -> None:
    """Explicit model control, two models loaded at start, one unloaded through the API:
    the server turned not ready (REST 503, health NOT_SERVING) while the other model
    serves, so a Kubernetes readiness probe takes the replica out of every Service for
    good. Triton's readiness skips models that were unloaded on purpose ("Okay if model
    is not ready due to unload", server.cc). The same happened with --poll-repository
    when a model folder is removed. Now an unload (API or poller) takes the model out of
    the start-up set that readiness checks (ModelManager.unload)."""
    _classifier(tmp_path / "iris")
    _classifier(tmp_path / "other")
    with FerryProcess(
        tmp_path, "--model-control-mode", "explicit", "--load-model", "iris",
        "--load-model", "other",
    ) as server, triton.InferenceServerClient(server.address) as client:
        assert client.is_server_ready()
        client.unload_model("other")
        assert not client.is_model_ready("other")
        assert client.is_model_ready("iris")
        assert client.is_server_ready(), "one model unloaded on purpose: still ready"
        assert server.stop() == 0


def test_rest_statistics_count_the_requests_with_several_workers() -> None:
    """With --workers 2, GET /v2/models/{m}/stats (tritonclient.http's
    get_inference_statistics) answered zeros after 360 rows had been served, or whatever a
    gRPC ModelStatistics call on the same frontend had last fetched; `perf_analyzer -i
    http` (README: "works unchanged") then fails every pass with "failed to find the
    requested model version" and exits 99, its statistics never changing. The REST
    handler reads RemoteStatistics.latest without calling refresh_statistics, as the gRPC
    servicer does. Fix: await
    `self._models.refresh_statistics()` in RestFrontDoor.statistics (a FerryError as its
    status) before statistics_of."""
    import tritonclient.http as triton_http

    with FerryProcess(
        REPO / "examples" / "model_repository", "--workers", "2", "--http-port", "0",
        ready_count=2,
    ) as server:
        port = int(server.wait_for(REST)[0].group(2))
        client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
        x = triton_http.InferInput("pixels", [2, 64], "FP32")
        x.set_data_from_numpy(np.zeros((2, 64), np.float32))
        for _ in range(5):
            client.infer("digits", [x])
        stats = client.get_inference_statistics("digits")["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] == 5, stats
        assert stats["inference_count"] == 10, stats
        client.close()
        assert server.stop() == 0


def test_class_count_answers_the_same_classes_over_both_ports() -> None:
    """tritonclient's InferRequestedOutput(..., class_count=3), as Triton's image client
    examples ask: refused on both ports at first (and in different words), now the top
    classes as "value:index" strings, the same over gRPC and REST."""
    import tritonclient.http as triton_http

    with FerryProcess(
        REPO / "examples" / "model_repository", "--http-port", "0",
    ) as server, triton.InferenceServerClient(server.address) as grpc_client:
        port = int(server.wait_for(REST)[0].group(2))
        pixels = np.linspace(0, 16, 128, dtype=np.float32).reshape(2, 64)
        x = triton.InferInput("pixels", [2, 64], "FP32")
        x.set_data_from_numpy(pixels)
        over_grpc = grpc_client.infer(
            "digits", [x], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)]
        ).as_numpy("probabilities")
        http_client = triton_http.InferenceServerClient(f"127.0.0.1:{port}")
        y = triton_http.InferInput("pixels", [2, 64], "FP32")
        y.set_data_from_numpy(pixels)
        over_rest = http_client.infer(
            "digits", [y],
            outputs=[triton_http.InferRequestedOutput("probabilities", class_count=3)],
        ).as_numpy("probabilities")
        http_client.close()
        assert over_grpc.shape == (2, 3)
        assert over_rest.tolist() == over_grpc.tolist()
        for row in over_grpc.tolist():
            values = [float(text.split(b":")[0]) for text in row]
            assert values == sorted(values, reverse=True)
        assert server.stop() == 0


def test_an_input_that_follows_the_length_but_is_not_padded_is_named_at_load(
    tmp_path: Path,
) -> None:
    """A BERT-style export has input_ids, attention_mask and token_type_ids, all
    [batch, seq]. With the README's setting, padding_inputs "input_ids=0,attention_mask=0",
    the model loads without a word, and requests of different lengths never share a batch:
    token_type_ids keeps its length in the grouping (measured: 200 concurrent requests of
    lengths 1-39 ran in 183 batches, ferry_padded_elements_total 0). Fix: at load, a
    warning per input whose padding axis is variable in the graph and that padding_inputs
    leaves out, naming it and the setting to add (token_type_ids=0)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((16, 4), np.float32), "table")
    types = numpy_helper.from_array(np.ones((2, 4), np.float32), "types")
    axis = numpy_helper.from_array(np.array([2], np.int64), "axis")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["words"]),
            helper.make_node("Gather", ["types", "token_type_ids"], ["kinds"]),
            helper.make_node("Add", ["words", "kinds"], ["summed"]),
            helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask", "axis"], ["mask3"]),
            helper.make_node("Mul", ["summed", "mask3"], ["token_states"]),
        ],
        "bert_like",
        [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
         for name in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("token_states", TensorProto.FLOAT, ["batch", "seq", 4])],
        [table, types, axis],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    (tmp_path / "bert" / "1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "bert" / "1" / "model.onnx"))
    (tmp_path / "bert" / "config.pbtxt").write_text(
        "max_batch_size: 64\n"
        "dynamic_batching { max_queue_delay_microseconds: 1000 }\n"
        'parameters { key: "padding_inputs" value { string_value: '
        '"input_ids=0,attention_mask=0" } }\n'
    )
    with FerryProcess(tmp_path) as server:
        warnings = [
            line for line in server.log.splitlines()
            if "WARNING" in line and "token_type_ids" in line and "padding_inputs" in line
        ]
        assert warnings, server.log
        assert server.stop() == 0


# What the log and --help say ----------------------------------------------------------


def test_the_plain_text_warning_names_the_bound_ports() -> None:
    """README: Ferry listens "in plain text and with every API open, and logs a warning
    saying so". With --grpc-port 0 the warning said "gRPC on 127.0.0.1:0 is plain text"
    (server/security.py formats the asked port, not `bound`), and it never names the REST
    port, which is plain HTTP on the same interface. Fix: format `bound`, and say the same
    of the REST port (or one line for both) once it is bound."""
    with FerryProcess(
        REPO / "examples" / "model_repository", "--http-port", "0",
    ) as server:
        rest_port = server.wait_for(REST)[0].group(2)
        warnings = " ".join(
            line for line in server.log.splitlines() if "WARNING" in line and "plain" in line
        )
        assert f"127.0.0.1:{server.port} " in warnings, warnings
        assert f"127.0.0.1:{rest_port} " in warnings, warnings
        assert server.stop() == 0


def test_serve_help_says_tls_covers_the_rest_port_too() -> None:
    """README: "with --tls-cert it [the REST port] speaks HTTPS only"; `ferry serve --help`
    says "--tls-cert PEM  server certificate chain; with --tls-key, gRPC uses TLS", which
    reads as if REST stayed plain HTTP. Fix: the help of --tls-cert names both ports."""
    text = serve_help()
    tls = text.split("--tls-cert PEM ")[-1].split(" --tls-key PEM ")[0]
    assert "REST" in tls or "HTTPS" in tls, tls


def test_a_folder_of_onnx_files_says_what_layout_is_expected(tmp_path: Path) -> None:
    """`ferry serve exports/` on a folder holding model.onnx directly (where an exporter
    wrote it) said "exports holds no model to serve (--exit-on-error=false serves what did
    load)": no word of the layout it wanted, and a hint that cannot help, since nothing
    loaded. Fix: when a repository holds no model folder, say what layout is expected
    (<model>/<version>/model.onnx) and, for .onnx files found at the top, that one file
    can be served as it is (`ferry serve exports/model.onnx`)."""
    exports = tmp_path / "exports"
    exports.mkdir()
    shutil.copy(REPO / "examples" / "model_repository" / "digits" / "1" / "model.onnx", exports)
    done = ferry(
        "serve", str(exports), "--host", "127.0.0.1", "--grpc-port", "0",
        "--http-port", "-1", "--metrics-port", "-1",
    )
    assert done.returncode == 1, done.stderr
    assert "<version>/model.onnx" in done.stderr, done.stderr
    assert "exports/model.onnx" in done.stderr, done.stderr


def test_tritons_model_repository_flag_is_taken_for_the_repository() -> None:
    """A Triton user's first command, `ferry serve --model-repository=models`, answered
    only "the following arguments are required: REPOSITORY|MODEL.onnx". Triton's flag
    (and its older --model-store) now stands for the argument; one repository only."""
    repository = REPO / "examples" / "model_repository"
    with FerryProcess(f"--model-repository={repository}") as server, \
            triton.InferenceServerClient(server.address) as client:
        assert client.is_model_ready("digits")
        assert server.stop() == 0
    for args, words in [
        ((str(repository), "--model-store", str(repository)), "Ferry serves one repository"),
        ((), "(or Triton's --model-repository REPOSITORY)"),
    ]:
        done = ferry("serve", *args, "--grpc-port", "0", "--metrics-port", "-1")
        assert done.returncode == 2, done.stderr
        assert words in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("config", "file", "named"),
    [
        ('backend: "pytorch"\n', "model.pt", "backend 'pytorch'"),
        ('platform: "tensorflow_savedmodel"\n', "model.onnx", "platform 'tensorflow_savedmodel'"),
    ],
    ids=["pytorch-folder", "onnx-file-under-another-platform"],
)
def test_a_model_of_another_backend_is_refused_by_name(
    tmp_path: Path, config: str, file: str, named: str
) -> None:
    """A repository shared with Triton holds models of other backends: a pytorch model
    failed with "no version folder with a model file ... expected pt/<version>/model.onnx",
    and a model.onnx under `platform: "tensorflow_savedmodel"` loaded without a word."""
    (tmp_path / "m" / "1").mkdir(parents=True)
    shutil.copy(
        REPO / "examples" / "model_repository" / "digits" / "1" / "model.onnx",
        tmp_path / "m" / "1" / file,
    )
    (tmp_path / "m" / "config.pbtxt").write_text(config)
    done = ferry(
        "serve", str(tmp_path), "--host", "127.0.0.1", "--grpc-port", "0",
        "--http-port", "-1", "--metrics-port", "-1",
    )
    assert done.returncode == 1, done.stderr
    assert f"the config names {named}: Ferry serves ONNX models with onnxruntime only" in (
        done.stderr
    )

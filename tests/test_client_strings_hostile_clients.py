"""Hostile clients of every string a client controls: model names and versions, request
ids, input and output names, parameters, datatypes and REST paths, as they come back in
error messages and go into the server's log and its metrics.

A string a client sends may be megabytes long and hold line breaks, terminal escapes and
NUL: an answer or a log line quotes a bounded part of it, escaped, and still says what
the server has; a metric label never takes it."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.client_text import bounded
from ferry.server.servicer import MAX_ERROR_MESSAGE_CHARS
from tests.conftest import RunningServer, serving
from tests.models import identity_model
from tests.process import FerryProcess

# What a hostile string may hold: line breaks that would start a forged record, a
# terminal escape that clears the screen, NUL, Unicode's line separator and C1's NEL.
FORGING = "a\nERROR forged record\r\x1b[2J\x00\u2028\x85b"
MIB = 1024 * 1024
# A log line may quote a client string, but never grows with it: far below a MiB.
MAX_LOG_LINE_CHARS = 20_000
# The gRPC channel options that let a test send messages of a few MiB.
# How a line of the text log format starts: its record's time and level.
RECORD_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")
LARGE_MESSAGES = [("grpc.max_send_message_length", 64 * MIB),
                  ("grpc.max_receive_message_length", 64 * MIB)]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    identity_model(root / "ident" / "1" / "model.onnx", "FP32")
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    yield from serving(repository)


def infer_request(model: str = "ident", **fields: str) -> pb.ModelInferRequest:
    """A valid request of the identity model, but for `fields` (input=, output=, ...)."""
    request = pb.ModelInferRequest(
        model_name=model, model_version=fields.get("version", ""), id=fields.get("id", "")
    )
    tensor = request.inputs.add(name=fields.get("input", "INPUT0"), datatype="FP32",
                                shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    if "output" in fields:
        request.outputs.add(name=fields["output"])
    if "parameter" in fields:
        request.parameters[fields["parameter"]].string_param = fields["parameter"]
    return request


def grpc_error(address: str, request: pb.ModelInferRequest) -> grpc.RpcError:
    with grpc.insecure_channel(address, options=LARGE_MESSAGES) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
    return caught.value


def rest_infer(address: str, body: dict[str, object]) -> tuple[int, str]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", "/v2/models/ident/infer", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())["error"]
    finally:
        connection.close()


# Error messages: bounded, and still saying what the server has --------------------------


@pytest.mark.parametrize("character", ["n", "\u00e9", "\U0001f600"])
def test_a_megabyte_input_name_is_refused_naming_the_inputs_the_model_takes(
    server: RunningServer, character: str
) -> None:
    """An unknown input name of a MiB was answered with the first 2,048 characters of
    "unknown input 'nnnn...': model 'ident' takes 'INPUT0'", which are all the name's:
    the caller never learnt which inputs the model takes. (Other than ASCII, each
    character is 6 to 12 bytes of the percent-encoded status: the cut came earlier.)"""
    error = grpc_error(server.address, infer_request(input=character * MIB))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert details.startswith("unknown input '" + character * 10), details[:100]
    assert details.endswith("model 'ident' takes 'INPUT0'"), details[-200:]
    assert len(details) <= MAX_ERROR_MESSAGE_CHARS


def test_a_megabyte_output_name_is_refused_naming_the_outputs_the_model_gives(
    server: RunningServer,
) -> None:
    error = grpc_error(server.address, infer_request(output="o" * MIB))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert details.startswith("unknown output 'ooo") and len(details) <= MAX_ERROR_MESSAGE_CHARS
    assert details.endswith("model 'ident' gives 'OUTPUT0'"), details[-200:]


def test_a_rest_input_name_of_a_megabyte_is_refused_naming_the_inputs(
    server: RunningServer,
) -> None:
    name = "r" * (2 * MIB)
    status, error = rest_infer(server.http_address, {
        "inputs": [{"name": name, "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]
    })
    assert status == 400
    assert error.startswith("unknown input 'rrr") and len(error) <= MAX_ERROR_MESSAGE_CHARS
    assert error.endswith("model 'ident' takes 'INPUT0'"), error[-200:]


def test_a_rest_datatype_of_a_megabyte_is_refused_naming_the_one_expected(
    server: RunningServer,
) -> None:
    status, error = rest_infer(server.http_address, {
        "inputs": [{"name": "INPUT0", "datatype": "D" * MIB, "shape": [1, 4],
                    "data": [1, 2, 3, 4]}]
    })
    assert status == 400 and len(error) <= MAX_ERROR_MESSAGE_CHARS
    assert error.startswith("input 'INPUT0': expected FP32 [-1, 4], got DDD"), error[:100]


def test_an_unknown_model_is_named_bounded_and_an_unknown_version_with_those_there_are(
    server: RunningServer,
) -> None:
    unknown = grpc_error(server.address, infer_request(model="m" * MIB))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert (unknown.details() or "").startswith("unknown model 'mmm")
    assert len(unknown.details() or "") < 200
    version = grpc_error(server.address, infer_request(version="7"))
    assert version.code() == grpc.StatusCode.NOT_FOUND
    assert version.details() == "model 'ident' has no version '7'; available: 1"
    malformed = grpc_error(server.address, infer_request(version="9" * MIB))
    assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a whole number" in (malformed.details() or "")
    assert len(malformed.details() or "") < 200


def test_bounded_keeps_the_head_and_the_tail_within_the_limit() -> None:
    assert bounded("short", 10) == "short"
    text = "head" + "x" * 10_000 + "tail"
    shown = bounded(text, 100)
    assert len(shown) <= 100 and shown.startswith("headxx") and shown.endswith("xxtail")
    assert "characters cut" in shown
    assert bounded(text, 10) == text[:10]  # too short for a note: the head alone
    for limit in range(40, 200):
        assert len(bounded(text, limit)) <= limit


def test_a_path_with_a_line_break_gets_a_json_404(server: RunningServer) -> None:
    """The catch-all route matched '.', which stops at a line break: such a path got
    aiohttp's own text 404 instead of Ferry's JSON error."""
    host, port = server.http_address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", "/v2/no-such-path%0AERROR%20forged")
        answer = connection.getresponse()
        body = answer.read()
    finally:
        connection.close()
    assert answer.status == 404
    assert json.loads(body)["error"].startswith("no endpoint GET /v2/no-such-path\nERROR")


# The log: one line per record, of bounded length --------------------------------------


def test_a_load_of_a_megabyte_name_logs_a_bounded_line(tmp_path: Path) -> None:
    """A single-file server in explicit model control logged each load of an unknown
    name with the whole name: a 2 MiB request made a 2 MiB ERROR line, for every call."""
    model = identity_model(tmp_path / "ident.onnx", "FP32")
    with FerryProcess(model, "--model-control-mode", "explicit", "--load-model", "ident") as ferry:
        with grpc.insecure_channel(ferry.address, options=LARGE_MESSAGES) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for name in ("z" * (2 * MIB), FORGING):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name))
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                assert len(caught.value.details() or "") <= MAX_ERROR_MESSAGE_CHARS
        ferry.wait_for(r"failed to load: unknown model 'a\\n", timeout=10)
        assert ferry.stop() == 0
    lines = ferry.log.splitlines()
    assert max(map(len, lines)) < MAX_LOG_LINE_CHARS, max(map(len, lines))
    assert not [line for line in lines if line.startswith("ERROR forged")]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_forging_strings_in_every_field_stay_inside_their_log_line(
    repository: Path, log_format: str
) -> None:
    """Every field a client sets, over gRPC and REST, with --access-log at DEBUG: each
    record is one line (in JSON, one object), with no escape or NUL left raw."""
    with FerryProcess(
        repository, "--access-log", "--log-level", "DEBUG", "--log-format", log_format,
        "--http-port", "0", "--model-control-mode", "explicit", "--load-model", "ident",
    ) as ferry:
        http_port = int(re.findall(r"REST binding on http://\S+:(\d+)", ferry.log)[0])
        with grpc.insecure_channel(ferry.address, options=LARGE_MESSAGES) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for fields in ({"model": FORGING}, {"version": FORGING}, {"input": FORGING},
                           {"output": FORGING}, {"id": FORGING}, {"parameter": FORGING},
                           {"model": FORGING * 100_000}):
                try:
                    stub.ModelInfer(infer_request(**fields))
                except grpc.RpcError:
                    pass
            for call, request in (
                (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=FORGING)),
                (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=FORGING)),
            ):
                with pytest.raises(grpc.RpcError):
                    call(request)
        forged_path = "a%0AERROR%20forged%20record%0D%1B%5B2J%00%FF"
        for method, path in (("POST", f"/v2/models/{forged_path}/infer"),
                             ("POST", f"/v2/models/ident/versions/{forged_path}/infer"),
                             ("POST", f"/v2/repository/models/{forged_path}/load"),
                             ("GET", f"/v2/{forged_path}")):
            connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
            connection.request(method, path, body=b"{}")
            assert connection.getresponse().status in (400, 404)
            connection.close()
        ferry.wait_for("protocol=http" if log_format == "text" else '"protocol": "http"')
        assert ferry.stop() == 0
    lines = ferry.log.splitlines()
    assert "forged record" in ferry.log  # quoted, escaped, in the lines that name it
    # Every line is a record of its own: a timestamped line, or one JSON object.
    if log_format == "json":
        assert all(isinstance(json.loads(line), dict) for line in lines)
    else:
        assert not [line for line in lines if not RECORD_START.match(line)]
    for raw in ("\x1b", "\x00", "\x85", "\u2028", "\r"):
        assert raw not in ferry.log, raw
    assert max(map(len, lines)) < MAX_LOG_LINE_CHARS


# Metrics and memory: nothing keyed by a name a client invents ----------------------------


def test_thousands_of_unknown_model_names_add_no_series_and_no_memory(
    repository: Path,
) -> None:
    """3,000 names of 4 KB each: were anything to keep them (a series, a lock or a state
    per name), the server would hold 12 MB more."""
    with FerryProcess(repository, "--http-port", "0", "--metrics-port", "0") as ferry:
        http_port = int(re.findall(r"REST binding on http://\S+:(\d+)", ferry.log)[0])
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4],
                                       "data": [1, 2, 3, 4]}]})

        with grpc.insecure_channel(ferry.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def send(first: int, count: int) -> None:
                for index in range(first, first + count):
                    name = f"unknown-{index}-" + "q" * 4000
                    if index % 2:
                        try:
                            stub.ModelInfer(infer_request(model=name, id=name))
                        except grpc.RpcError as error:
                            assert error.code() == grpc.StatusCode.NOT_FOUND
                    else:
                        connection.request("POST", f"/v2/models/{name}/infer", body=body)
                        assert connection.getresponse().read() and True

            send(0, 500)  # warm: every path and allocator pool in use once
            series = series_of(ferry.scrape())
            rss_kib = ferry.status_value("VmRSS")
            send(500, 3_000)
            after = series_of(ferry.scrape())
        connection.close()
        assert after == series, sorted(after ^ series)[:10]
        assert ferry.status_value("VmRSS") - rss_kib < 6 * 1024
        assert ferry.stop() == 0
    assert "unknown-" not in "".join(after)


def series_of(exposition: str) -> set[str]:
    """The series of a scrape, by name and labels (not value)."""
    return {line.rsplit(" ", 1)[0] for line in exposition.splitlines()
            if line and not line.startswith("#")}

"""Hypothesis throws malformed ModelInferRequests at a live server.

Each must get a clean error with a fitting status code (never INTERNAL or UNKNOWN), the
server must keep answering valid requests, and its memory must not grow without bound.
"""

from __future__ import annotations

import gc
import tracemalloc
import warnings
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NonInteractiveExampleWarning

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.models import identity_model, mlp_model, write_config

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
DATATYPES = ["FP32", "FP16", "FP64", "INT8", "INT64", "UINT8", "BOOL", "BYTES", "", "FLOAT",
             "fp32", "INT128"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("fuzz") / "repo"
    mlp_model(repo / "mlp" / "1" / "model.onnx", features=4)
    write_config(repo / "mlp", "max_batch_size: 8\n")
    identity_model(repo / "text" / "1" / "model.onnx", "BYTES", ("batch", 2))
    running = RunningServer(repo)
    yield running
    running.close()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


dims = st.one_of(
    st.integers(min_value=-3, max_value=10),
    st.sampled_from([2**31, 2**40, 2**62, -(2**62)]),
)


@st.composite
def length_prefixed(draw: st.DrawFn) -> bytes:
    """BYTES content whose length prefixes may lie."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        data = draw(st.binary(max_size=8))
        declared = draw(st.one_of(st.just(len(data)), st.integers(0, 2**32 - 1)))
        parts.append(declared.to_bytes(4, "little") + data)
    return b"".join(parts) + draw(st.binary(max_size=3))


@st.composite
def malformed_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        # Mostly real models and versions, so that most requests reach the validation.
        model_name=draw(st.sampled_from(["mlp"] * 5 + ["text"] * 4 + ["nope", ""])),
        model_version=draw(st.sampled_from([""] * 6 + ["1"] * 3 + ["2", "x"])),
        id=draw(st.text(max_size=4)),
    )
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["x", "x", "INPUT0", "INPUT0", "y", ""])),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(st.lists(dims, max_size=4)),
        )
        if use_raw:
            request.raw_input_contents.append(
                draw(st.one_of(st.binary(max_size=64), length_prefixed()))
            )
            if draw(st.integers(0, 9)) == 0:
                tensor.contents.fp32_contents.append(1.0)  # both encodings at once
        else:
            field = draw(st.sampled_from(["fp32_contents", "int_contents", "bytes_contents",
                                          "bool_contents", "uint64_contents"]))
            values = {
                "fp32_contents": st.lists(st.floats(width=32, allow_nan=True), max_size=12),
                "int_contents": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12),
                "bytes_contents": st.lists(st.binary(max_size=4), max_size=12),
                "bool_contents": st.lists(st.booleans(), max_size=12),
                "uint64_contents": st.lists(st.integers(0, 2**64 - 1), max_size=12),
            }[field]
            getattr(tensor.contents, field).extend(draw(values))
    if use_raw and draw(st.integers(0, 9)) == 0:
        request.raw_input_contents.append(b"extra")  # more raw entries than inputs
    for name in draw(st.lists(st.sampled_from(["logits", "probs", "OUTPUT0", "zz"]),
                              max_size=3)):
        request.outputs.add(name=name)
    if draw(st.booleans()):
        request.parameters["priority"].int64_param = draw(st.integers(-5, 5))
    if draw(st.booleans()):
        request.parameters["timeout"].string_param = "soon"
    return request


def status_of(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest
) -> grpc.StatusCode:
    try:
        stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        assert error.details(), "an error without a message"
        return error.code()
    return grpc.StatusCode.OK


def valid_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(np.ones((2, 4), np.float32).tobytes())
    return request


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=malformed_requests())
def test_malformed_requests_get_clean_errors(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest
) -> None:
    assert status_of(stub, request) in ALLOWED


def test_server_survives_and_memory_stays_bounded(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    strategy = malformed_requests()
    with warnings.catch_warnings():  # .example() is meant for exploring; here it is a corpus
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        examples = [strategy.example() for _ in range(150)]

    def round_trip() -> None:
        for request in examples:
            status_of(stub, request)
        assert status_of(stub, valid_request()) == grpc.StatusCode.OK

    round_trip()  # warm up caches, channels and lazily built objects
    gc.collect()
    tracemalloc.start()
    try:
        round_trip()
        gc.collect()
        first, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            round_trip()
        gc.collect()
        later, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Three more rounds of the same traffic may not keep what they allocated.
    assert later - first < 2 * 1024 * 1024, f"grew by {later - first} bytes"

"""Hostile clients through the real port: requests that cost the server far more than
they cost the client, malformed messages, refusals that must be counted, and answers
too large to send. Each test failed on the server before its fix."""

from __future__ import annotations

import re
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from tests.models import identity_model
from tests.processes import FerryProcess

MIB = 1024 * 1024
EMPTY_ELEMENTS = 4_000_000


@pytest.fixture
def text_model(tmp_path: Path) -> Path:
    return identity_model(tmp_path / "repo" / "t" / "1" / "model.onnx", "BYTES", ("batch", "n"))


@pytest.fixture
def text_server(text_model: Path) -> Iterator[FerryProcess]:
    server = FerryProcess(text_model.parents[2], "--metrics-port", "0")
    yield server
    server.close()


def empty_strings_typed(count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="t")
    tensor = request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, count])
    tensor.contents.bytes_contents.extend([b""] * count)
    return request


def empty_strings_raw(count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="t")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, count])
    request.raw_input_contents.append(struct.pack("<I", 0) * count)
    return request


def metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            total += float(match.group(2))
    return total


# Peak RSS rise per byte of request, at most. Raw contents: the message in gRPC's buffer,
# as Python bytes, and parsed. Typed contents: protobuf's parser alone spends about 16
# bytes per element (two on the wire) before Ferry sees the request; Ferry adds nothing
# per element. Before the element overhead was counted: about 160.
@pytest.mark.parametrize(
    ("build", "multiple"),
    [(empty_strings_typed, 20), (empty_strings_raw, 6)],
    ids=["typed", "raw"],
)
def test_millions_of_empty_bytes_elements_are_refused_before_decoding(
    text_server: FerryProcess, build: object, multiple: int
) -> None:
    request = build(EMPTY_ELEMENTS)  # type: ignore[operator]
    size = request.ByteSize()
    with grpc.insecure_channel(
        text_server.address, options=[("grpc.max_send_message_length", 64 * MIB)]
    ) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
        rss_before = text_server.status_kib("VmRSS")
        text_server.reset_peak()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=60)
        peak = text_server.status_kib("VmHWM")
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT0" in error.details() and "--max-tensor-bytes" in error.details()
    # The request is held once as bytes and once parsed; nothing per element beyond that.
    assert (peak - rss_before) * 1024 < multiple * size, (peak - rss_before, size)

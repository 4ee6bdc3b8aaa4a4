"""A bounded soak: many concurrent clients mixing valid, invalid, cancelled and
short-deadline requests. Every reply is the exact correct result or a clean error of the
expected kind, and the counts add up to the number sent.

About a minute by default; `pytest --soak-seconds 600 tests/test_soak.py` for longer, and
`-m "not slow"` skips it.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, soak_timeout_s
from tests.models import mlp_model, write_config

FEATURES = 32
CLIENTS = 32
# Hostile kinds too: bytes that are not protobuf, and a shape past the element limit.
KINDS = ("valid", "invalid", "cancelled", "short_deadline", "malformed", "huge_shape")
INFER = "/inference.GRPCInferenceService/ModelInfer"


def rss_mib() -> float:
    text = Path("/proc/self/status").read_text()
    line = next(line for line in text.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def request_for(x: np.ndarray, features: int = FEATURES) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[x.shape[0], features])
    request.raw_input_contents.append(x.tobytes())
    return request


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    index = [o.name for o in response.outputs].index("logits")
    shape = tuple(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], np.float32).reshape(shape)


def test_the_soak_timeout_follows_the_requested_length() -> None:
    for seconds in (60.0, 600.0, 3600.0):
        assert soak_timeout_s(seconds) > seconds + 60  # start-up and 30 s deadlines


@pytest.mark.slow
@pytest.mark.soak
@pytest.mark.asyncio
async def test_mixed_traffic_soak(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    seconds = float(request.config.getoption("--soak-seconds"))
    timeout = request.node.get_closest_marker("timeout")
    assert timeout is not None and timeout.args[0] == soak_timeout_s(seconds)
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES, hidden=64, classes=8)
    write_config(repo / "m", "max_batch_size: 16\ndynamic_batching { }\n")
    session = ort.InferenceSession(str(repo / "m" / "1" / "model.onnx"))
    server = RunningServer(repo)
    sent: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    wrong: list[str] = []
    end = time.monotonic() + seconds

    async def client(
        seed: int, stub: pb_grpc.GRPCInferenceServiceStub, channel: grpc.aio.Channel
    ) -> None:
        rng = random.Random(seed)
        malformed = channel.unary_unary(INFER)
        while time.monotonic() < end:
            kind = rng.choice(KINDS)
            x = np.asarray(
                [[rng.uniform(-1, 1) for _ in range(FEATURES)] for _ in range(rng.randint(1, 4))],
                dtype=np.float32,
            )
            sent[kind] += 1
            if kind == "invalid":
                call = stub.ModelInfer(request_for(x[:, :-1], FEATURES - 1))
            elif kind == "malformed":
                call = malformed(b"\xff" * rng.randint(1, 64), timeout=30)
            elif kind == "huge_shape":
                huge = pb.ModelInferRequest(model_name="m")
                huge.inputs.add(name="x", datatype="FP32", shape=[1, 1 << 40])
                call = stub.ModelInfer(huge, timeout=30)
            elif kind == "short_deadline":
                call = stub.ModelInfer(request_for(x), timeout=rng.uniform(0.0005, 0.05))
            else:
                call = stub.ModelInfer(request_for(x), timeout=30)
            if kind == "cancelled":
                await asyncio.sleep(rng.uniform(0, 0.01))
                call.cancel()
            try:
                response = await call
            except asyncio.CancelledError:
                outcomes[(kind, "CANCELLED")] += 1
                continue
            except grpc.aio.AioRpcError as error:
                outcomes[(kind, error.code().name)] += 1
                if not error.details():
                    wrong.append(f"{kind}: {error.code().name} without a message")
                continue
            expected = session.run(["logits"], {"x": x})[0]
            if not np.allclose(logits_of(response), expected, rtol=1e-5, atol=1e-6):
                wrong.append(f"{kind}: wrong result")
            outcomes[(kind, "OK")] += 1

    unread_written = 0

    async def unread_stream(channel: grpc.aio.Channel) -> None:
        """Writes requests and never reads an answer, for the whole soak."""
        nonlocal unread_written
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        x = np.zeros((4, FEATURES), np.float32)
        try:
            while time.monotonic() < end:
                left = max(0.01, end - time.monotonic())
                await asyncio.wait_for(call.write(request_for(x)), left)
                unread_written += 1
        except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        finally:
            call.cancel()

    rss_at_start = rss_mib()
    rss_samples: list[float] = []

    async def watch_memory() -> None:
        while time.monotonic() < end:
            rss_samples.append(rss_mib())
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))

    try:
        async with grpc.aio.insecure_channel(server.address) as channel, \
                grpc.aio.insecure_channel(server.address) as hostile_channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await asyncio.gather(
                *(client(seed, stub, channel) for seed in range(CLIENTS)),
                unread_stream(hostile_channel),
                watch_memory(),
            )
    finally:
        server.close()

    # The unread stream was held back (not all it wrote was read), and memory stayed flat.
    assert unread_written > 0
    late = rss_samples[len(rss_samples) // 4:]
    assert max(late, default=rss_at_start) - rss_at_start < 150, (rss_at_start, rss_samples)

    assert not wrong, wrong[:10]
    allowed = {
        "valid": {"OK"},
        "invalid": {"INVALID_ARGUMENT"},
        "cancelled": {"OK", "CANCELLED"},
        "short_deadline": {"OK", "DEADLINE_EXCEEDED"},
        "malformed": {"INVALID_ARGUMENT"},
        "huge_shape": {"INVALID_ARGUMENT"},
    }
    for (kind, code), count in outcomes.items():
        assert code in allowed[kind], f"{count} {kind} requests ended {code}"
    for kind in KINDS:
        answered = sum(n for (k, _), n in outcomes.items() if k == kind)
        assert answered == sent[kind], f"{kind}: sent {sent[kind]}, answered {answered}"
        assert sent[kind] > 0
    assert outcomes[("valid", "OK")] > 0

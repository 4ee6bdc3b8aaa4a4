"""A stream that writes requests and never reads the answers: the server stops reading
it at its limit (gRPC flow control then holds the client back), its memory stays
bounded, and comes back when the client leaves."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest

from ferry.proto import grpc_service_pb2 as pb
from tests.process import FerryProcess
from tests.test_hardening import tile_model, tile_request
from tests.waiting import wait_until

MIB = 1024 * 1024
PENDING = 128  # --max-stream-pending's default
HELD = 64  # answers that fill --max-stream-pending-bytes' default, 16 MiB
# What the stream may hold: PENDING answers of 256 KiB (32 MiB), as the README says, plus
# the interpreter's and gRPC's own buffers. Before backpressure: 475 MiB and growing.
BOUND_MIB = 80


def answered(server: FerryProcess) -> int:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('ferry_requests_total{code="OK",model="tile",protocol="grpc"}'):
            return int(float(line.split()[-1]))
    return 0


@pytest.mark.asyncio
async def test_unread_stream_is_held_back_and_released(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tile_model(repo / "tile" / "1" / "model.onnx", repeats=65536)  # 4 bytes in, 256 KiB out
    server = FerryProcess(repo, "--metrics-port", "0")
    try:
        baseline = server.status_value("VmRSS")
        server.reset_peak()
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.stream_stream(
                "/inference.GRPCInferenceService/ModelStreamInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelStreamInferResponse.FromString,
            )()
            written = 0

            async def write_all() -> None:
                nonlocal written
                try:
                    for index in range(2000):
                        await call.write(tile_request(1, str(index)))
                        written += 1
                except (asyncio.InvalidStateError, grpc.RpcError):
                    pass  # the test cancelled the call

            writer = asyncio.get_running_loop().create_task(write_all())
            await asyncio.to_thread(
                wait_until, lambda: answered(server) >= HELD, 60, "the first answers"
            )
            peak_mib = server.status_value("VmHWM") / 1024
            # Answered but unsent: the limit, plus the few answers the client's transport
            # took before its flow-control window filled (a few MiB); before backpressure
            # all 2000 (500 MiB) were answered and queued.
            held = answered(server)
            assert held <= PENDING + 24, held
            assert peak_mib - baseline / 1024 < BOUND_MIB, (peak_mib, baseline / 1024)
            print(f"held {held} answers, peak {peak_mib - baseline / 1024:.0f} MiB over the start")
            call.cancel()
            await writer
        # The client has left: its stream's answers are gone with it.
        await asyncio.to_thread(
            wait_until,
            lambda: server.status_value("VmRSS") < baseline + 32 * 1024,
            30,
            "memory to come back",
        )
    finally:
        server.close()

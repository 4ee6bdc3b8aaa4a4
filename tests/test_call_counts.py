"""`--max-concurrent-rpcs` with `--workers N`: one limit for the whole server, however the
kernel spreads the connections over the frontends, and a frontend killed with calls in
flight gives its places back."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.call_counts import CallCounts, SharedCallSlots, create_call_counts
from tests.models import mlp_model, write_config
from tests.waiting import wait_until
from tests.workers import Workers, channels_by_frontend, infer_request

# Held until four rows have come, or for 30 s: the test decides when calls end.
HELD = "max_batch_size: 4\ndynamic_batching { max_queue_delay_microseconds: 30000000 }\n"


def test_frontends_share_one_count_and_take_places_only_under_the_limit() -> None:
    fd = create_call_counts(2)
    try:
        first, second = CallCounts(fd), CallCounts(fd)  # as two frontends map it
        a, b = SharedCallSlots(3, first, 0), SharedCallSlots(3, second, 1)
        assert a.take() and a.take() and b.take()
        assert (a.in_use, b.in_use) == (3, 3)
        assert not b.take() and not a.take()  # refused, and nothing left counted
        assert (first.of(0), first.of(1)) == (2, 1)
        a.give_back()
        assert b.take() and not a.take()
        assert (second.of(0), second.of(1)) == (1, 2)
        second.reset(0)  # the supervisor, once frontend 0 has died
        assert a.take() and not b.take()
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 12])
def test_a_descriptor_that_is_not_a_table_of_counts_is_refused(size: int) -> None:
    fd = os.memfd_create("not-counts")
    try:
        os.ftruncate(fd, size)
        with pytest.raises(ValueError, match="not a table of call counts"):
            CallCounts(fd)
    finally:
        os.close(fd)


def test_a_frontend_without_a_count_is_refused() -> None:
    fd = create_call_counts(2)
    try:
        with pytest.raises(ValueError, match="frontend 2 has no count"):
            SharedCallSlots(3, CallCounts(fd), 2)
    finally:
        os.close(fd)


def _stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def _refused(channel: grpc.Channel) -> grpc.RpcError:
    x = np.ones((1, 16), np.float32)
    with pytest.raises(grpc.RpcError) as refusal:
        _stub(channel).ModelInfer(infer_request("held", x), timeout=10)
    assert refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 3 concurrent RPCs" in (refusal.value.details() or "")
    return refusal.value


def test_the_limit_counts_every_frontends_calls_and_a_killed_frontends_are_given_back(
    tmp_path: Path,
) -> None:
    """--max-concurrent-rpcs 3 with two frontends: two calls held through one frontend and
    one through the other fill the server; a fourth is refused through either, while the
    probes still answer. One call ended: one more place, wherever it is taken. The
    frontend holding a call is killed with `kill -9`: once it is back, its place is free
    again (one more call is admitted, the next refused)."""
    mlp_model(tmp_path / "held" / "1" / "model.onnx")
    write_config(tmp_path / "held", HELD)
    server = Workers(tmp_path, 2, "--max-concurrent-rpcs", "3")
    try:
        by_frontend = channels_by_frontend(server, 1)
        (victim, [doomed]), (_, [kept]) = by_frontend.items()
        x = np.ones((1, 16), np.float32)

        def held(channel: grpc.Channel) -> grpc.Future:
            return _stub(channel).ModelInfer.future(infer_request("held", x), timeout=60)

        calls = [held(doomed), held(doomed), held(kept)]
        wait_until(lambda: server.metric("ferry_queue_depth") == 3, 20, "3 queued")
        _refused(kept)
        _refused(doomed)
        for channel in (doomed, kept):
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        calls[0].cancel()
        wait_until(lambda: server.metric("ferry_queue_depth") == 2, 20, "one withdrawn")
        calls.append(held(kept))  # the place the other frontend gave back
        wait_until(lambda: server.metric("ferry_queue_depth") == 3, 20, "3 queued again")
        _refused(kept)
        # kill -9 of the frontend that holds one call: the supervisor starts it again.
        os.kill(victim, signal.SIGKILL)
        server.wait_for("frontend process .* exited with -9; restarting it")
        server.wait_for_frontends(1, after=2)
        wait_until(lambda: server.metric("ferry_queue_depth") == 2, 20, "its call withdrawn")
        with grpc.insecure_channel(server.address) as fresh:
            calls.append(held(fresh))
            wait_until(lambda: server.metric("ferry_queue_depth") == 3, 20, "3 queued")
            _refused(fresh)
        for call in calls:
            call.cancel()
        for channel in (doomed, kept):
            channel.close()
        assert server.stop() == 0
    finally:
        server.close()

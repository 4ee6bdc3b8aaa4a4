"""Hostile clients of the hand-off between `ferry serve --workers 2`'s frontends and its
executor: large requests held while others flow, cancellation storms and dropped
connections, deadlines from the `timeout` parameter, large outputs, a frontend or the
executor killed under large requests, and the memory given back after. Real processes
on 127.0.0.1, real clients; whether a tensor crossed in shared memory or inline in the
socket's messages is read from what each process wrote (/proc/PID/io), never from
timing."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from tests.models import save_graph, spin_model, write_config
from tests.waiting import wait_until
from tests.workers import Workers, established, shm_names

MIB = 1024 * 1024
# Held until four rows have come, or for 30 s: a test decides when it runs.
HELD = (
    "max_batch_size: 4\n"
    "dynamic_batching { max_queue_delay_microseconds: 30000000 }\n"
)


def sum_model(path: Path, features: int) -> Path:
    """x [batch, features] -> total [batch, 1]: a large input, a tiny output."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1)],
        "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return save_graph(graph, path)


def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def sum_request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def total_of(response: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], np.float32)


def connect(server: Workers) -> tuple[grpc.Channel, int]:
    """A connection of its own, and the frontend process that holds it."""
    frontends = server.children()["frontend"]
    before = {pid: established(pid, server.port) for pid in frontends}
    channel = grpc.insecure_channel(
        server.address,
        options=[("grpc.use_local_subchannel_pool", 1),
                 ("grpc.max_send_message_length", 64 * MIB),
                 ("grpc.max_receive_message_length", 64 * MIB)],
    )
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    gained = [pid for pid in frontends if established(pid, server.port) > before[pid]]
    assert len(gained) == 1, gained
    return channel, gained[0]


def written(pid: int) -> int:
    """Bytes process `pid` has written so far, sockets included."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar for {pid}")


def bytes_written_for(pid: int, send: object) -> int:
    before = written(pid)
    send()  # type: ignore[operator]
    return written(pid) - before


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    sum_model(tmp_path / "held" / "1" / "model.onnx", 1024)
    write_config(tmp_path / "held", HELD)
    sum_model(tmp_path / "wide" / "1" / "model.onnx", 2 * MIB)  # 8 MiB a row
    write_config(tmp_path / "wide", "max_batch_size: 1\n")
    sum_model(tmp_path / "whole" / "1" / "model.onnx", WHOLE_ROW // 4)
    write_config(tmp_path / "whole", "max_batch_size: 1\n")
    return tmp_path


# A row of model "whole" needs nearly all of a 32 MiB region: it crosses in shared memory
# only when no block anywhere in the region is still taken.
WHOLE_ROW = 30 * MIB


def crosses_in_shared_memory(channel: grpc.Channel, frontend: int) -> bool:
    """Whether a 30 MiB request through this connection went into the frontend's region
    (so that nothing of the region leaked) rather than inline over the socket."""
    x = np.full((1, WHOLE_ROW // 4), 0.5, np.float32)

    def send() -> None:
        reply = stub(channel).ModelInfer(sum_request("whole", x), timeout=30)
        assert total_of(reply)[0] == WHOLE_ROW // 8

    return bytes_written_for(frontend, send) < MIB


def cpu_seconds(pid: int) -> float:
    """User and system CPU time process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memfd_mappings(pid: int) -> list[str]:
    """The hand-off's shared-memory regions process `pid` maps: inode and name, one each
    (a frontend also maps the supervisor's tables of counts, which are not regions)."""
    regions = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "memfd:ferry-frontend" in line:
            _, _, _, _, inode, name = line.split(None, 5)
            regions.add(f"{inode} {name}")
    return sorted(regions)


def test_one_request_held_in_a_queue_does_not_push_every_later_tensor_out_of_shared_memory(
    repository: Path, workers: list[Workers]
) -> None:
    """A caller parks one small request in a queue that waits 30 s; meanwhile another
    sends 8 MiB requests one after the other through the same frontend, 80 MiB in all:
    more than the 32 MiB request region, so the space of the answered ones must be used
    again around the held one. Each then crosses in shared memory: the frontend writes
    a small descriptor to the executor, not 8 MiB."""
    server = Workers(repository, 2)
    workers.append(server)
    channel, frontend = connect(server)
    held = stub(channel).ModelInfer.future(sum_request("held", np.ones((1, 1024), np.float32)))
    wait_until(lambda: server.metric("ferry_queue_depth") == 1, 20, "the held request queued")
    x = np.ones((1, 2 * MIB), np.float32)
    costs = []
    for i in range(10):
        def send(value: float = float(i)) -> None:
            reply = stub(channel).ModelInfer(sum_request("wide", x * value), timeout=30)
            assert total_of(reply)[0] == value * 2 * MIB
        costs.append(bytes_written_for(frontend, send))
    assert max(costs) < MIB, [c // 1024 for c in costs]  # KiB written per request
    assert not held.done()
    held.cancel()
    wait_until(lambda: server.metric("ferry_queue_depth") == 0, 20, "the held request withdrawn")
    channel.close()
    assert server.stop() == 0


def test_a_large_request_once_answered_leaves_the_whole_region_to_the_next(
    repository: Path, workers: list[Workers]
) -> None:
    """Requests that each need nearly the whole 32 MiB region, one after the other through
    one frontend, to one model: once a request is answered its block is free, so each
    crosses in shared memory; none is pushed inline by the one before it (which the
    model's execution thread still references until its next batch)."""
    server = Workers(repository, 2)
    workers.append(server)
    channel, frontend = connect(server)
    crossed = [crosses_in_shared_memory(channel, frontend) for _ in range(3)]
    assert crossed == [True, True, True]
    channel.close()
    assert server.stop() == 0


def test_a_request_cancelled_while_its_batch_runs_leaves_its_block_once_the_batch_ends(
    repository: Path, workers: list[Workers]
) -> None:
    """A 16 MiB request whose caller cancels while its batch runs: the batch still reads
    the request's block, so it stays taken until the batch ends, and no longer. The
    model's execution thread kept its latest batch until the next one, so the block stayed
    taken and the next 30 MiB request through that frontend went inline."""
    spin_model(repository / "spin" / "1" / "model.onnx", features=4 * MIB)
    write_config(repository / "spin", "max_batch_size: 1\n")
    server = Workers(repository, 2)
    workers.append(server)
    channel, frontend = connect(server)
    batches = server.metric("ferry_batches_total")
    x = np.zeros((1, 4 * MIB), np.float32)
    x[0, 0] = 3e6  # spins long enough to cancel while it runs
    request = pb.ModelInferRequest(model_name="spin")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    executor = server.children()["executor"][0]
    spent = cpu_seconds(executor)
    call = stub(channel).ModelInfer.future(request, timeout=60)
    # Running: the executor spins (its CPU time climbs) and the caller has no answer yet.
    wait_until(lambda: cpu_seconds(executor) - spent > 0.3, 30, "the request running")
    assert not call.done()
    call.cancel()
    wait_until(lambda: server.metric("ferry_batches_total") > batches, 60, "the batch over")
    assert crosses_in_shared_memory(channel, frontend)
    channel.close()
    assert server.stop() == 0


def test_thousands_of_requests_cancelled_after_the_hand_off_leave_no_block_taken(
    repository: Path, workers: list[Workers]
) -> None:
    """Rounds of 60 requests queued in the executor through both frontends, then all
    cancelled; and rounds of 64 requests to a model that runs them at once, half of them
    cancelled as they run or are answered; then 20 callers that drop their connections
    with requests queued. After 1,500 of them: the queue is empty, none of the queued
    ones ran, no descriptor is left open, the statistics count each request once,
    and every block of every region is free again (a request that needs the whole
    region crosses in it)."""
    write_config(repository / "held", HELD.replace("max_batch_size: 4", "max_batch_size: 64"))
    sum_model(repository / "quick" / "1" / "model.onnx", 1024)
    write_config(repository / "quick", "max_batch_size: 64\ndynamic_batching { }\n")
    server = Workers(repository, 2)
    workers.append(server)
    # The kernel spreads connections over the frontends at random: connect until both
    # hold some (six at least); all of them stay open, so the descriptor count is stable.
    connections = [connect(server) for _ in range(6)]
    while len({frontend for _, frontend in connections}) < 2 and len(connections) < 64:
        connections.append(connect(server))
    by_frontend = {frontend: channel for channel, frontend in connections}
    assert len(by_frontend) == 2, "both frontends take connections"
    executor = server.children()["executor"][0]
    processes = [executor, *by_frontend]
    descriptors = {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in processes}
    x = np.ones((1, 1024), np.float32)
    answered = 0
    for round_ in range(24):
        queued = round_ % 3 != 0
        model = "held" if queued else "quick"
        calls = [stub(connections[i % len(connections)][0]).ModelInfer.future(sum_request(model, x))
                 for i in range(60 if queued else 64)]
        if queued:
            wait_until(lambda: server.metric("ferry_queue_depth") == 60, 20, "60 queued")
        for index, call in enumerate(calls):
            if queued or index % 2:
                call.cancel()
        for call in calls:
            try:
                assert total_of(call.result(30))[0] == 1024
            except grpc.FutureCancelledError:
                continue
            answered += 1
        wait_until(lambda: server.metric("ferry_queue_depth") == 0, 20, "queue empty")
    assert answered >= 8 * 32
    # Callers that drop their connection with requests queued, 20 connections at once.
    dropped = [connect(server)[0] for _ in range(20)]
    calls = [stub(c).ModelInfer.future(sum_request("held", x)) for c in dropped for _ in range(3)]
    wait_until(lambda: server.metric("ferry_queue_depth") == 60, 20, "60 queued")
    for channel in dropped:
        channel.close()
    wait_until(lambda: server.metric("ferry_queue_depth") == 0, 20, "withdrawn")
    assert all(call.done() for call in calls)
    statistics = {
        m.name: m for m in stub(connections[0][0]).ModelStatistics(
            pb.ModelStatisticsRequest(), timeout=10).model_stats
    }
    held = statistics["held"].inference_stats
    assert statistics["held"].execution_count == 0  # none of the queued ones ran
    assert (held.success.count, held.fail.count) == (0, 17 * 60)  # each counted once
    # A call cancelled as its answer crosses the wire is cancelled for the caller and a
    # success for the server, as in one process: between the two.
    quick = statistics["quick"].inference_stats
    assert answered <= quick.success.count <= quick.success.count + quick.fail.count <= 8 * 64
    for frontend, channel in by_frontend.items():
        assert crosses_in_shared_memory(channel, frontend), f"frontend {frontend}"
    # Two regions for each frontend, and no more: none was created again; no descriptor
    # is left open (the dropped connections' sockets are closed).
    assert len(memfd_mappings(executor)) == 4, memfd_mappings(executor)
    wait_until(lambda: {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in processes}
               == descriptors, 10, "descriptors back to where they were")
    assert "Traceback" not in server.log
    for channel, _ in connections:
        channel.close()
    assert server.stop() == 0


def test_executor_killed_under_large_requests_answers_each_and_frees_every_region(
    repository: Path, workers: list[Workers]
) -> None:
    """Three 16 MiB requests queued through one frontend (two in its region, one inline),
    then `kill -9` of the executor: each caller is answered UNAVAILABLE, nothing is left
    in /dev/shm, the frontend maps only the regions of its new connection, and a request
    that needs a whole region crosses in it once the executor is back."""
    sum_model(repository / "heldwide" / "1" / "model.onnx", 4 * MIB)
    write_config(repository / "heldwide", HELD)
    shm_before = shm_names()
    server = Workers(repository, 2)
    workers.append(server)
    channel, frontend = connect(server)
    executor = server.children()["executor"][0]
    x = np.ones((1, 4 * MIB), np.float32)
    calls = [stub(channel).ModelInfer.future(sum_request("heldwide", x)) for _ in range(3)]
    wait_until(lambda: server.metric("ferry_queue_depth") == 3, 20, "3 queued")
    os.kill(executor, signal.SIGKILL)
    for call in calls:
        with pytest.raises(grpc.RpcError) as lost:
            call.result(10)
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    server.wait_for("executor ready", 2)
    wait_until(lambda: len(memfd_mappings(frontend)) == 2 and stub(channel).ServerReady(
        pb.ServerReadyRequest(), timeout=10).ready, 30, "the frontend reconnected")
    assert crosses_in_shared_memory(channel, frontend)
    assert len(memfd_mappings(frontend)) == 2, memfd_mappings(frontend)
    assert shm_names() == shm_before
    channel.close()
    assert server.stop() == 0


def tile_model(path: Path, repeats: int) -> Path:
    """x [batch, 1] -> y [batch, repeats]: 4 bytes in, 4 x repeats bytes out a row."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"])],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", repeats])],
        [numpy_helper.from_array(np.array([1, repeats], dtype=np.int64), "repeats")],
    )
    return save_graph(graph, path)


def test_a_timeout_parameter_expires_in_the_executors_queue_and_large_outputs_come_back(
    repository: Path, workers: list[Workers]
) -> None:
    """A request whose `timeout` parameter (0.3 s) ends while it waits in the executor's
    queue is answered DEADLINE_EXCEEDED at its deadline, naming the model, and never
    runs. Outputs 2 million times larger than their inputs (8 MiB a row, batches of 4:
    more than the 32 MiB response region) come back intact, a too large one is refused
    RESOURCE_EXHAUSTED naming the limit, and the response region is given back: the
    executor writes small descriptors, not the tensors, once the burst is over."""
    tile_model(repository / "tile" / "1" / "model.onnx", 2 * MIB)
    write_config(repository / "tile", "max_batch_size: 8\ndynamic_batching { }\n")
    server = Workers(repository, 2, "--max-message-size", str(40 * MIB))
    workers.append(server)
    channel, _ = connect(server)
    executor = server.children()["executor"][0]
    request = sum_request("held", np.ones((1, 1024), np.float32))
    request.parameters["timeout"].int64_param = 300_000  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as expired:
        stub(channel).ModelInfer(request, timeout=20)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert "'held'" in expired.value.details()  # type: ignore[attr-defined]
    held = stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name="held"), timeout=10)
    assert held.model_stats[0].execution_count == 0

    def tile(rows: int) -> np.ndarray:
        x = np.arange(rows, dtype=np.float32).reshape(rows, 1)
        reply = stub(channel).ModelInfer(sum_request("tile", x), timeout=30)
        return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(rows, -1)

    with ThreadPoolExecutor(8) as pool:
        for rows, y in zip([1] * 8, pool.map(tile, [1] * 8), strict=True):
            assert y.shape == (rows, 2 * MIB) and (y == np.arange(rows)[:, None]).all()
    with pytest.raises(grpc.RpcError) as too_large:
        tile(8)  # 64 MiB: over --max-message-size
    assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert str(40 * MIB) in too_large.value.details()  # type: ignore[attr-defined]
    costs = [bytes_written_for(executor, lambda: tile(3)) for _ in range(4)]
    assert max(costs) < MIB, [c // 1024 for c in costs]
    assert "Traceback" not in server.log
    channel.close()
    assert server.stop() == 0


def test_a_frontend_killed_after_a_large_request_gives_its_regions_back_at_once(
    repository: Path, workers: list[Workers]
) -> None:
    """A frontend that a huge request brought down (`kill -9` here, the OOM killer in
    life) leaves its two regions, 30 MiB of them written, mapped in the executor: they go
    as soon as the executor sees it gone, not at some later garbage collection. Its
    replacement connects with regions of its own."""
    server = Workers(repository, 2)
    workers.append(server)
    executor = server.children()["executor"][0]
    channel, frontend = connect(server)
    assert crosses_in_shared_memory(channel, frontend)
    before = memfd_mappings(executor)
    assert len(before) == 4, before
    os.kill(frontend, signal.SIGKILL)
    server.wait_for(r"frontend \d disconnected")
    server.wait_for_frontends(1, after=2)
    wait_until(lambda: len(memfd_mappings(executor)) == 4, 10,
               "the dead frontend's regions unmapped")
    assert len(set(memfd_mappings(executor)) - set(before)) == 2  # the new frontend's
    channel.close()
    assert server.stop() == 0


def resident(pid: int) -> int:
    """Bytes of memory process `pid` holds now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_the_executor_gives_back_the_memory_of_large_inline_requests_once_answered(
    repository: Path, workers: list[Workers]
) -> None:
    """A batch of four 48 MiB requests (each too large for a region: they cross inline, in
    the executor's own memory): once they are answered the executor holds no more than
    it did before, rather than the last batch's 192 MiB until the model's next one."""
    sum_model(repository / "huge" / "1" / "model.onnx", 12 * MIB)
    write_config(repository / "huge", HELD)
    server = Workers(repository, 2)
    workers.append(server)
    executor = server.children()["executor"][0]
    channel, _ = connect(server)
    before = resident(executor)
    x = np.full((1, 12 * MIB), 0.25, np.float32)
    calls = [stub(channel).ModelInfer.future(sum_request("huge", x)) for _ in range(4)]
    for call in calls:
        assert total_of(call.result(60))[0] == 3 * MIB
    wait_until(lambda: resident(executor) - before < 64 * MIB, 10,
               "the executor's memory back to what it was")
    channel.close()
    assert server.stop() == 0

"""Clients that leave mid-request leave nothing behind.

A leak hunt (a few minutes of mixed traffic on `ferry serve`, one process and `--workers 2`)
found RSS, descriptors, threads and shared memory flat; this guards the pattern that holds
the most per-request state at once: callers that vanish while their request is on its way,
queued or running, on both front doors. After them the server is back where it began: no
connection, upload or loop task more, no connection held after its client closed it, an
empty queue, and every place of `--max-concurrent-rpcs` free again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import struct
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc._cython.cygrpc import ExecuteBatchError

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from ferry.server.logs import LostAnswerLog, quiet_lost_answers
from ferry.server.scheduler import ModelScheduler
from ferry.server.security import SecurityOptions
from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, write_config
from tests.process import infer
from tests.waiting import wait_until

FEATURES = 8
PLACES = 16  # --max-concurrent-rpcs
CALLERS = 2000  # half over REST, half over gRPC (a unary call and a stream each)
CLIENTS = 8


def request_for(x: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def abandoned_server_connections(ports: set[int]) -> int:
    """Connections the server still holds (a socket of this process on one of its ports)
    whose client has closed its end. The clients share this process: a connection whose
    client end is still open here (gRPC may keep a closed channel's connection a while
    for reuse) is the client's to close, not a leak of the server's."""
    ours: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                ours.add(target[8:-1])
    open_ends: set[tuple[str, str]] = set()
    served: list[tuple[str, str]] = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            for row in rows.read().splitlines()[1:]:
                fields = row.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if inode not in ours:
                    continue
                open_ends.add((local, remote))
                if int(remote.rsplit(":", 1)[1], 16) and int(local.rsplit(":", 1)[1], 16) in ports:
                    served.append((local, remote))
    return sum((remote, local) not in open_ends for local, remote in served)


async def rest_then_reset(port: int, x: np.ndarray, rng: random.Random) -> None:
    """An inference over raw HTTP whose client resets the connection: half-way through the
    headers, half-way through the body, or once all is sent (its request queued or running)."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()
    head = (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: ferry\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sent = rng.choice([head[: len(head) // 2], head + body[: len(body) // 2], head + body])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(sent)
    await writer.drain()
    await asyncio.sleep(rng.uniform(0, 0.002))
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def grpc_then_leave(address: str, x: np.ndarray, rng: random.Random) -> None:
    """A unary call cancelled, and a stream with a request written, then the connection
    closed under both without a goodbye."""
    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    call = stub.ModelInfer(request_for(x), timeout=30)
    stream = stub.ModelStreamInfer(timeout=30)
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await stream.write(request_for(x))  # refused at the limit: ended already
    await asyncio.sleep(rng.uniform(0, 0.002))
    call.cancel()
    await channel.close(grace=None)
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await call
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await stream.read()


@pytest.mark.asyncio
async def test_callers_leaving_mid_request_leave_no_state_behind(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    gated: Callable[..., GatedInstance],
) -> None:
    repo = tmp_path / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES, hidden=16, classes=4)
    write_config(repo / "m", "max_batch_size: 8\ndynamic_batching { }\n")
    server = start_server(repo, wrap_instance=gated,
                          security=SecurityOptions(max_concurrent_rpcs=PLACES))
    gate: GatedInstance = gated.instances[0]  # type: ignore[attr-defined]
    rest = server.server.rest
    http_port = int(server.http_address.rsplit(":", 1)[1])
    x = np.ones((2, FEATURES), np.float32)
    assert infer(server.address, x, output_name="logits")[0] == "OK"  # warm

    async def loop_tasks() -> int:
        return len(asyncio.all_tasks())

    async def scheduler_idle() -> bool:
        scheduler = server.server.manager.get("m", "").scheduler
        assert isinstance(scheduler, ModelScheduler)
        return not scheduler.busy  # nothing queued, nothing running

    ports = {http_port, int(server.address.rsplit(":", 1)[1])}
    tasks_before = server.call(loop_tasks())

    async def leaver(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(CALLERS // CLIENTS):
            if rng.random() < 0.5:
                await rest_then_reset(http_port, x, rng)
            else:
                await grpc_then_leave(server.address, x, rng)

    await asyncio.gather(*(leaver(seed) for seed in range(CLIENTS)))

    # The connections first: until the server has read a closed connection to its end, a
    # call its client sent just before leaving may still start there, and take a place.
    wait_until(lambda: abandoned_server_connections(ports) == 0,
               what="no connection held after its client closed it")
    wait_until(lambda: rest.open_connections == 0 and rest.uploads_in_progress == 0,
               what="every REST connection and upload given back")
    wait_until(lambda: server.call(scheduler_idle()), what="the queue empty")
    wait_until(lambda: server.call(loop_tasks()) <= tasks_before,
               what=f"no loop task left behind (before: {tasks_before})")
    places = server.server.call_places
    assert places is not None
    # A call its client left ends in the server a moment later: its place is then free.
    # And none comes after: a call sent just before its client left, on a connection
    # still shared with others, may still sit unread while a busy loop catches up.
    dataplane = server.server.dataplane
    wait_until(lambda: places.in_use == 0 and dataplane.quiet_for() > 0.5,
               what="every place of --max-concurrent-rpcs free, no call arriving")

    # Every place of --max-concurrent-rpcs is free: PLACES callers held in the server at
    # once (one running in the held model, the others queued behind it) are all admitted;
    # a place still taken would refuse one at once.
    async def queued() -> int:
        return server.server.manager.get("m", "").scheduler.queue_depth

    while gate.entered.acquire(blocking=False):  # the batches run so far
        pass
    gate.hold()
    with ThreadPoolExecutor(PLACES) as pool:
        first = pool.submit(infer, server.address, x, output_name="logits")
        assert gate.entered.acquire(timeout=10), first.result()  # refused: a place taken
        others = [pool.submit(infer, server.address, x, output_name="logits")
                  for _ in range(PLACES - 1)]
        wait_until(lambda: server.call(queued()) + sum(a.done() for a in others) == PLACES - 1,
                   what="every caller queued or answered")
        gate.release()
        codes = [a.result()[0] for a in [first, *others]]
    assert codes == ["OK"] * PLACES, codes


def test_answers_to_clients_that_left_are_logged_once_a_minute_without_a_traceback() -> None:
    """grpc.aio logs each answer it could not send to a client that had gone at ERROR
    with a traceback; a server started here reports them once per method and minute."""
    quiet_lost_answers()
    logger = logging.getLogger("grpc._cython.cygrpc")
    assert sum(isinstance(f, LostAnswerLog) for f in logger.filters) == 1
    now = [0.0]
    lost = LostAnswerLog(interval_s=60.0, clock=lambda: now[0])

    def record(error: BaseException, method: str) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            return logging.LogRecord(
                logger.name, logging.ERROR, "server.pyx.pxi", 1,
                "ExecuteBatchError raised in core by servicer method [%s]", (method,),
                sys.exc_info(),
            )

    infer = "/inference.GRPCInferenceService/ModelInfer"
    first = record(ExecuteBatchError("Failed execute_batch"), infer)
    assert lost.filter(first)
    assert first.levelno == logging.WARNING and first.exc_info is None
    assert first.getMessage() == f"an answer on {infer} was not sent: its client had gone"
    assert not any(lost.filter(record(ExecuteBatchError("x"), infer)) for _ in range(5))
    now[0] = 61.0
    again = record(ExecuteBatchError("x"), infer)
    assert lost.filter(again) and "5 more since the last report" in again.getMessage()
    other = record(RuntimeError("a servicer's own bug"), infer)
    assert lost.filter(other) and other.levelno == logging.ERROR and other.exc_info


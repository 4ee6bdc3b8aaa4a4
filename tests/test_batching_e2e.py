"""Dynamic batching end to end: a real server, tritonclient, and onnxruntime as the judge.

Every answer is compared with a direct `session.run` on the caller's own rows. Batches are
made to form deterministically with the `gated` fixture: the model's only instance is
held inside a run while requests queue up behind it, then released; the rows of each
executed batch are recorded by the gate and cross-checked with ModelStatistics.

Batched and single-request results are compared with a tight tolerance rather than bit
for bit: a MatMul over more rows may sum in a different order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from ferry.server.executor import Runner
from tests.conftest import GatedInstance, RunningServer
from tests.models import OPSET, mlp_model, two_input_model
from tests.process import FerryProcess

FEATURES = 16
MAX_BATCH_SIZE = 32  # the default for a model without config.pbtxt
RTOL, ATOL = 1e-5, 1e-6

StartServer = Callable[..., RunningServer]


# Helpers --------------------------------------------------------------------------


class Reference:
    """The model run by onnxruntime directly, one request at a time."""

    def __init__(self, model_file: Path) -> None:
        self.session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, inputs), strict=True))


def rows_of(seed: int, rows: int, width: int = FEATURES) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def fp32_input(name: str, array: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def assert_answer(
    result: tc.InferResult, expected: dict[str, np.ndarray], names: Sequence[str] | None = None
) -> None:
    """The result holds exactly the wanted outputs, each equal to the direct run."""
    wanted = list(expected) if names is None else list(names)
    assert [o.name for o in result.get_response().outputs] == wanted
    for name in wanted:
        got = result.as_numpy(name)
        assert got is not None and got.shape == expected[name].shape
        np.testing.assert_allclose(got, expected[name], rtol=RTOL, atol=ATOL)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll a condition of the server's state (not a sleep standing in for a wait)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.002)


def send_async(
    client: tc.InferenceServerClient, model: str, inputs: list[tc.InferInput], **kwargs: Any
) -> Future[tc.InferResult]:
    """Send without waiting (tritonclient's async_infer); the future gets the answer."""
    answer: Future[tc.InferResult] = Future()

    def settle(result: tc.InferResult | None, error: Exception | None) -> None:
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result)

    client.async_infer(model, inputs, callback=settle, **kwargs)
    return answer


def queue_depth(server: RunningServer, model: str) -> int:
    async def read() -> int:
        return server.server.manager.get(model).scheduler.queue_depth

    return server.call(read())


def statistics(client: tc.InferenceServerClient, model: str) -> Any:
    return client.get_inference_statistics(model).model_stats[0]


def batch_sizes(stats: Any) -> Counter[int]:
    return Counter({b.batch_size: b.compute_infer.count for b in stats.batch_stats})


class Held:
    """A server whose one instance is held: queue requests behind a running blocker."""

    def __init__(self, server: RunningServer, gate: GatedInstance, model: str) -> None:
        self.server = server
        self.gate = gate
        self.model = model
        self.client = tc.InferenceServerClient(server.address)
        self.pool = ThreadPoolExecutor(max_workers=16)

    def submit(self, inputs: list[tc.InferInput], **kwargs: Any) -> Future[tc.InferResult]:
        return send_async(self.client, self.model, inputs, **kwargs)

    def hold_with(self, inputs: list[tc.InferInput]) -> Future[tc.InferResult]:
        """Hold the instance, and start a blocker request that stays inside its run."""
        self.gate.hold()
        blocker = self.submit(inputs)
        assert self.gate.entered.acquire(timeout=20), "the blocker never reached the model"
        return blocker

    def wait_queued(self, count: int) -> None:
        wait_until(lambda: queue_depth(self.server, self.model) == count, f"{count} requests queue")

    def close(self) -> None:
        self.gate.release()
        self.pool.shutdown(wait=True)
        self.client.close()


@pytest.fixture
def mlp_file(tmp_path: Path) -> Path:
    return mlp_model(tmp_path / "repo" / "mlp" / "1" / "model.onnx")


@pytest.fixture
def held_mlp(
    start_server: StartServer, gated: Callable[[str, Runner], GatedInstance], mlp_file: Path
) -> Iterator[Held]:
    server = start_server(mlp_file.parents[2], wrap_instance=gated)
    (gate,) = gated.instances  # type: ignore[attr-defined]
    held = Held(server, gate, "mlp")
    yield held
    held.close()


# Plain requests -------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 7, MAX_BATCH_SIZE])
def test_request_equals_a_direct_run(start_server: StartServer, mlp_file: Path, rows: int) -> None:
    server = start_server(mlp_file.parents[2])
    reference = Reference(mlp_file)
    x = rows_of(seed=rows, rows=rows)
    with tc.InferenceServerClient(server.address) as client:
        result = client.infer("mlp", [fp32_input("x", x)])
        assert_answer(result, reference({"x": x}))


@pytest.mark.asyncio
async def test_200_concurrent_requests_each_get_their_own_rows(
    start_server: StartServer, mlp_file: Path
) -> None:
    server = start_server(mlp_file.parents[2])
    reference = Reference(mlp_file)
    sent = [rows_of(seed=i, rows=1 + i % 3) for i in range(200)]
    async with tc_aio.InferenceServerClient(server.address) as client:
        results = await asyncio.gather(
            *(
                client.infer("mlp", [fp32_input("x", x)], request_id=str(i))
                for i, x in enumerate(sent)
            )
        )
        stats = (await client.get_inference_statistics("mlp")).model_stats[0]
    for i, (x, result) in enumerate(zip(sent, results, strict=True)):
        assert result.get_response().id == str(i)
        assert_answer(result, reference({"x": x}))

    total_rows = sum(len(x) for x in sent)
    sizes = batch_sizes(stats)
    assert stats.inference_stats.success.count == 200
    assert stats.inference_count == total_rows
    assert sum(size * count for size, count in sizes.items()) == total_rows
    assert stats.execution_count == sum(sizes.values())
    assert max(sizes) <= MAX_BATCH_SIZE


def test_batches_larger_than_one_form_under_concurrency(held_mlp: Held) -> None:
    """200 requests queue behind a held instance; once released they run in full batches
    of at most max_batch_size rows, and every caller still gets its own rows."""
    reference = Reference(held_mlp.server.server.manager.repository.path / "mlp/1/model.onnx")
    blocker_x = rows_of(seed=999, rows=1)
    blocker = held_mlp.hold_with([fp32_input("x", blocker_x)])
    sent = [rows_of(seed=i, rows=1 + i % 3) for i in range(200)]
    futures = [held_mlp.submit([fp32_input("x", x)]) for x in sent]
    held_mlp.wait_queued(len(sent))
    held_mlp.gate.release()

    assert_answer(blocker.result(30), reference({"x": blocker_x}))
    for x, future in zip(sent, futures, strict=True):
        assert_answer(future.result(30), reference({"x": x}))

    rows = held_mlp.gate.batch_rows
    total = sum(len(x) for x in sent)
    assert rows[0] == 1
    assert sum(rows[1:]) == total
    assert max(rows) <= MAX_BATCH_SIZE
    # Everything was queued at release: each batch but the last is (nearly) full, since
    # a request that does not fit waits for the next one. 399 rows need >= 13 batches.
    assert all(r > MAX_BATCH_SIZE - 3 for r in rows[1:-1])
    assert len(rows) - 1 <= 16
    stats = statistics(held_mlp.client, "mlp")
    assert batch_sizes(stats) == Counter(rows)
    assert stats.execution_count == len(rows)
    assert stats.inference_stats.success.count == len(sent) + 1


def test_queued_requests_merge_into_one_batch(held_mlp: Held) -> None:
    reference = Reference(held_mlp.server.server.manager.repository.path / "mlp/1/model.onnx")
    blocker = held_mlp.hold_with([fp32_input("x", rows_of(seed=0, rows=2))])
    sent = [rows_of(seed=10 + i, rows=rows) for i, rows in enumerate([1, 4, 2, 3])]
    futures = []
    for queued, x in enumerate(sent, start=1):  # one queued, then the next: a known order
        futures.append(held_mlp.submit([fp32_input("x", x)]))
        held_mlp.wait_queued(queued)
    held_mlp.gate.release()
    blocker.result(30)
    for x, future in zip(sent, futures, strict=True):
        assert_answer(future.result(30), reference({"x": x}))
    assert held_mlp.gate.batch_rows == [2, 10]
    # The merged batch is the callers' rows, in arrival order.
    np.testing.assert_array_equal(held_mlp.gate.batches[1]["x"], np.concatenate(sent))
    assert batch_sizes(statistics(held_mlp.client, "mlp")) == Counter({2: 1, 10: 1})


def test_requests_for_different_outputs_share_a_batch(held_mlp: Held) -> None:
    reference = Reference(held_mlp.server.server.manager.repository.path / "mlp/1/model.onnx")
    blocker = held_mlp.hold_with([fp32_input("x", rows_of(seed=0, rows=1))])
    asks: list[list[str]] = [["logits"], ["probs"], ["probs", "logits"], []]
    sent = [rows_of(seed=20 + i, rows=2) for i in range(len(asks))]
    futures = [
        held_mlp.submit(
            [fp32_input("x", x)], outputs=[tc.InferRequestedOutput(n) for n in names] or None
        )
        for x, names in zip(sent, asks, strict=True)
    ]
    held_mlp.wait_queued(len(sent))
    held_mlp.gate.release()
    blocker.result(30)
    for x, names, future in zip(sent, asks, futures, strict=True):
        result = future.result(30)
        expected = reference({"x": x})
        assert_answer(result, expected, names or ["logits", "probs"])
    assert held_mlp.gate.batch_rows == [1, 8]


def test_different_non_batch_dims_are_never_merged(
    start_server: StartServer, gated: Callable[[str, Runner], GatedInstance], tmp_path: Path
) -> None:
    model_file = two_input_model(tmp_path / "repo" / "add" / "1" / "model.onnx")
    server = start_server(model_file.parents[2], wrap_instance=gated)
    (gate,) = gated.instances  # type: ignore[attr-defined]
    held = Held(server, gate, "add")
    try:
        blocker = held.hold_with(_pair(rows=1, width=3, seed=0)[0])
        widths = [2, 5, 2, 5, 7, 2]
        sent = [_pair(rows=1 + i % 2, width=w, seed=30 + i) for i, w in enumerate(widths)]
        futures = [held.submit(inputs) for inputs, _ in sent]
        held.wait_queued(len(sent))
        gate.release()
        blocker.result(30)
        for (_, expected), future in zip(sent, futures, strict=True):
            np.testing.assert_array_equal(future.result(30).as_numpy("sum"), expected)
    finally:
        held.close()

    # One batch per width, each made of requests of that width only: (rows, width).
    executed = [(len(batch["a"]), batch["a"].shape[1]) for batch in gate.batches]
    assert executed[0] == (1, 3)
    assert sorted(executed[1:]) == [(1, 7), (4, 2), (4, 5)]


def _pair(rows: int, width: int, seed: int) -> tuple[list[tc.InferInput], np.ndarray]:
    """Inputs a and b of one shape, and their sum as onnxruntime would give it."""
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal((rows, width)).astype(np.float32) for _ in range(2))
    return [fp32_input("a", a), fp32_input("b", b)], a + b


def test_invalid_requests_in_the_same_moment_do_not_disturb_valid_ones(held_mlp: Held) -> None:
    reference = Reference(held_mlp.server.server.manager.repository.path / "mlp/1/model.onnx")
    blocker = held_mlp.hold_with([fp32_input("x", rows_of(seed=0, rows=1))])
    valid = [rows_of(seed=40 + i, rows=1 + i % 2) for i in range(6)]
    wide64 = tc.InferInput("x", [1, FEATURES], "FP64")
    wide64.set_data_from_numpy(rows_of(seed=1, rows=1).astype(np.float64))
    invalid = {
        "narrow": [fp32_input("x", rows_of(seed=2, rows=1, width=FEATURES - 1))],
        "fp64": [wide64],
        "misnamed": [fp32_input("y", rows_of(seed=3, rows=1))],
        "too many rows": [fp32_input("x", rows_of(seed=4, rows=MAX_BATCH_SIZE + 1))],
    }
    requests = [[fp32_input("x", x)] for x in valid] + list(invalid.values())
    start = threading.Barrier(len(requests))

    def send(inputs: list[tc.InferInput]) -> tc.InferResult:
        start.wait(20)  # all at once
        return held_mlp.client.infer("mlp", inputs)

    futures = [held_mlp.pool.submit(send, inputs) for inputs in requests]
    bad_futures = futures[len(valid) :]
    # Refused before queueing: answered while the instance is still held.
    for name, future in zip(invalid, bad_futures, strict=True):
        with pytest.raises(InferenceServerException) as caught:
            future.result(30)
        assert "INVALID_ARGUMENT" in str(caught.value.status()), name
        assert "'x'" in caught.value.message() or "'y'" in caught.value.message(), name
    held_mlp.wait_queued(len(valid))
    held_mlp.gate.release()
    blocker.result(30)
    for x, future in zip(valid, futures[: len(valid)], strict=True):
        assert_answer(future.result(30), reference({"x": x}))
    assert held_mlp.gate.batch_rows == [1, sum(len(x) for x in valid)]
    stats = statistics(held_mlp.client, "mlp")
    assert stats.inference_stats.fail.count == len(invalid)
    assert stats.inference_stats.success.count == len(valid) + 1


# Failures inside a batch ----------------------------------------------------------

POISON = 666.0


class Poisoned:
    """Raises inside the run when a batch holds the poison value, as a model might."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner

    def run(self, inputs: Any, output_names: Sequence[str]) -> dict[str, np.ndarray]:
        if (inputs["x"] == POISON).any():
            raise RuntimeError("poisoned batch: the model refused it")
        return self.inner.run(inputs, output_names)


def test_a_failing_run_fails_only_the_request_that_fails_alone_and_the_model_keeps_serving(
    start_server: StartServer, gated: Callable[[str, Runner], GatedInstance], mlp_file: Path
) -> None:
    server = start_server(mlp_file.parents[2], wrap_instance=lambda n, i: gated(n, Poisoned(i)))
    (gate,) = gated.instances  # type: ignore[attr-defined]
    held = Held(server, gate, "mlp")
    reference = Reference(mlp_file)
    try:
        first = rows_of(seed=0, rows=2)
        blocker = held.hold_with([fp32_input("x", first)])
        poison = rows_of(seed=1, rows=1)
        poison[0, 3] = POISON
        batch_mates = [rows_of(seed=50 + i, rows=2) for i in range(3)]
        doomed = [held.submit([fp32_input("x", x)]) for x in [*batch_mates, poison]]
        held.wait_queued(4)
        gate.release()

        assert_answer(blocker.result(30), reference({"x": first}))  # the batch before
        # The poisoned batch runs again in halves: the poison fails alone, and its batch
        # mates get their answers.
        for x, future in zip(batch_mates, doomed, strict=False):
            assert_answer(future.result(30), reference({"x": x}))
        with pytest.raises(InferenceServerException) as caught:
            doomed[-1].result(30)
        assert "INTERNAL" in str(caught.value.status())
        assert "poisoned batch" in caught.value.message()

        # The batches after it run as usual, alone or merged.
        assert held.client.is_model_ready("mlp")
        later = [rows_of(seed=60 + i, rows=1 + i) for i in range(5)]
        answers = [held.submit([fp32_input("x", x)]) for x in later]
        for x, future in zip(later, answers, strict=True):
            assert_answer(future.result(30), reference({"x": x}))
        stats = statistics(held.client, "mlp")
    finally:
        held.close()
    # The batch of 7 rows, then its halves: 4 rows (run), 3 (failed), then 2 and 1.
    assert gate.batch_rows[:6] == [2, 7, 4, 3, 2, 1]
    assert stats.inference_stats.fail.count == 1
    assert stats.inference_stats.success.count == 1 + len(batch_mates) + len(later)


def even_rows_model(path: Path) -> Path:
    """x [batch, 4] -> Reshape [-1, 8] -> Reshape [-1, 4] -> y: the identity for an even
    number of rows, an onnxruntime error at run time for an odd number."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "pairs"], ["h"]),
            helper.make_node("Reshape", ["h", "rows"], ["y"]),
        ],
        "even_rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [
            numpy_helper.from_array(np.array([-1, 8], np.int64), "pairs"),
            numpy_helper.from_array(np.array([-1, 4], np.int64), "rows"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def test_an_onnxruntime_error_is_internal_with_its_message(
    start_server: StartServer, gated: Callable[[str, Runner], GatedInstance], tmp_path: Path
) -> None:
    model_file = even_rows_model(tmp_path / "repo" / "even" / "1" / "model.onnx")
    server = start_server(model_file.parents[2], wrap_instance=gated)
    (gate,) = gated.instances  # type: ignore[attr-defined]
    held = Held(server, gate, "even")
    rng = np.random.default_rng(7)
    try:
        first = rng.standard_normal((2, 4)).astype(np.float32)
        blocker = held.hold_with([fp32_input("x", first)])
        # 2 rows + 1 row: fine apart, but merged into 3 rows onnxruntime refuses them.
        doomed = [held.submit([fp32_input("x", np.ones((n, 4), np.float32))]) for n in (2, 1)]
        held.wait_queued(2)
        gate.release()
        np.testing.assert_array_equal(blocker.result(30).as_numpy("y"), first)
        # Run again in halves: the two rows pass, the odd row fails on its own, with
        # onnxruntime's FAIL (not its InvalidArgument): INTERNAL.
        np.testing.assert_array_equal(doomed[0].result(30).as_numpy("y"), np.ones((2, 4)))
        with pytest.raises(InferenceServerException) as caught:
            doomed[1].result(30)
        assert "INTERNAL" in str(caught.value.status())
        assert "onnxruntime" in caught.value.message()
        assert "reshape" in caught.value.message().lower()
        # Still serving.
        again = rng.standard_normal((4, 4)).astype(np.float32)
        result = held.client.infer("even", [fp32_input("x", again)])
        np.testing.assert_array_equal(result.as_numpy("y"), again)
    finally:
        held.close()
    assert gate.batch_rows == [2, 3, 2, 1, 4]


# Gathering: no queue delay, a fast model, callers that wait for their answers -----------


async def closed_loop(
    address: str, model: str, reference: Reference, callers: int, each: int
) -> Any:
    """`callers` callers, each sending its next request when its last is answered (as
    load tools and most services do); every answer checked. The model's statistics."""
    async with tc_aio.InferenceServerClient(address) as client:

        async def caller(index: int) -> None:
            for turn in range(each):
                x = rows_of(seed=index * 1000 + turn, rows=1)
                answer = await client.infer("mlp", [fp32_input("x", x)])
                assert_answer(answer, reference({"x": x}))

        await asyncio.gather(*(caller(index) for index in range(callers)))
        return (await client.get_inference_statistics(model)).model_stats[0]


@pytest.mark.asyncio
async def test_callers_that_wait_for_answers_each_get_their_own_rows_from_gathered_batches(
    ferry_process: Callable[..., FerryProcess], mlp_file: Path
) -> None:
    """A fast model with no queue delay, 16 callers in a closed loop: batches gather
    several callers' rows (server.gathering) and each caller still gets exactly its own."""
    server = ferry_process(mlp_file.parents[2])
    stats = await closed_loop(server.address, "mlp", Reference(mlp_file), callers=16, each=25)
    assert stats.inference_count == stats.inference_stats.success.count == 16 * 25
    assert stats.execution_count < stats.inference_count  # some batches held several rows


def test_a_lone_caller_of_a_fast_model_is_never_held(
    ferry_process: Callable[..., FerryProcess], mlp_file: Path
) -> None:
    """One caller at a time, its requests of 1 and 2 rows in turn: the gather target
    counts requests, so it stays at one and no request waits for company that is not
    coming (a held request would queue for the 1 ms adaptive delay)."""
    server = ferry_process(mlp_file.parents[2])
    reference = Reference(mlp_file)
    with tc.InferenceServerClient(server.address) as client:
        for turn in range(40):
            x = rows_of(seed=turn, rows=1 + turn % 2)
            assert_answer(client.infer("mlp", [fp32_input("x", x)]), reference({"x": x}))
        stats = statistics(client, "mlp")
    assert stats.execution_count == 40 and stats.inference_count == 60
    queue = stats.inference_stats.queue
    assert queue.count == 40
    assert queue.ns / queue.count < 500_000, f"mean queue time {queue.ns / queue.count} ns"


def test_a_lone_caller_with_short_timeouts_is_not_failed_by_gathering(
    ferry_process: Callable[..., FerryProcess], mlp_file: Path
) -> None:
    """After a request of many rows, requests with a 500 us queue timeout on an idle
    server: none may wait for company and expire (an instance is free)."""
    server = ferry_process(mlp_file.parents[2])
    with tc.InferenceServerClient(server.address) as client:
        for turn in range(20):  # the model's batch cost is learnt: its batches run inline
            client.infer("mlp", [fp32_input("x", rows_of(seed=turn, rows=1))])
        client.infer("mlp", [fp32_input("x", rows_of(seed=99, rows=8))])
        failed = []
        for turn in range(10):
            try:
                client.infer("mlp", [fp32_input("x", rows_of(seed=turn, rows=1))], timeout=500)
            except InferenceServerException as error:
                failed.append(f"{error.status()}: {error.message()}")
    assert failed == []

"""Hostile clients of `ferry serve --workers 2`: a padded batch that fails for one caller
while the others' requests share it, cancellation, deadlines and signals while a batch is
held for gathering, and the executor killed under held requests. Real processes, real
clients (tritonclient, the generated stubs); every wait is on the server's state (its
metrics, its log), bounded by generous timeouts for a loaded 2-core machine."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from ferry.proto import grpc_service_pb2 as pb
from ferry.proto import grpc_service_pb2_grpc as pb_grpc
from tests.models import (
    masked_encoder_model,
    mlp_model,
    slow_start_repository,
    spin_model,
    write_config,
)
from tests.process import FerryProcess
from tests.test_padding_e2e import (
    MAX_LENGTH,
    VOCAB,
    Reference,
    assert_equal_to_alone,
    infer_inputs,
    request_of,
)
from tests.waiting import wait_until
from tests.workers import Workers, infer_request, shm_names

# Batches form when three rows are queued (preferred size 3), or after 30 s: a test
# decides which requests share a batch by what it sends, not by timing.
PADDED_IN_THREES = """
max_batch_size: 16
dynamic_batching { max_queue_delay_microseconds: 30000000 preferred_batch_size: [3] }
parameters { key: "padding_inputs" value { string_value: "input_ids=0,attention_mask=0" } }
"""


def stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def encoder_request(arrays: dict[str, np.ndarray], request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="encoder", id=request_id)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    found = {}
    for index, tensor in enumerate(response.outputs):
        found[tensor.name] = np.frombuffer(
            response.raw_output_contents[index], np.float32
        ).reshape(tuple(tensor.shape))
    return found


@pytest.fixture
def encoder_workers(tmp_path: Path) -> tuple[Workers, Reference]:
    masked_encoder_model(tmp_path / "encoder" / "1" / "model.onnx", vocab=VOCAB,
                         max_length=MAX_LENGTH)
    write_config(tmp_path / "encoder", PADDED_IN_THREES)
    server = Workers(tmp_path, 2)
    return server, Reference(tmp_path / "encoder" / "1" / "model.onnx")


def test_a_request_too_long_fails_alone_and_its_batch_mates_are_answered_across_processes(
    encoder_workers: tuple[Workers, Reference],
) -> None:
    """Three callers on three connections, one batch in the executor: lengths 64, 65 (one
    past the model's positions) and 63 pad together to 128 (3 x 128 <= 2 x 192); the
    batch fails in onnxruntime, runs again one request at a time, and the answers and the
    error cross back from the executor process to each caller. Then a batch of three
    requests that all fail, and one of three valid ones."""
    server, reference = encoder_workers
    try:

        def infer(arrays: dict[str, np.ndarray]) -> tc.InferResult:
            with tc.InferenceServerClient(server.address) as client:
                return client.infer("encoder", infer_inputs(arrays), client_timeout=60)

        def batch_of_three(sent: list[dict[str, np.ndarray]]) -> list[object]:
            """Each request on its own connection, queued one after the other."""
            with ThreadPoolExecutor(3) as pool:
                futures = []
                for count, arrays in enumerate(sent, start=1):
                    futures.append(pool.submit(infer, arrays))
                    if count < 3:
                        wait_until(lambda c=count: server.metric("ferry_queue_depth") == c,  # type: ignore[misc]
                                   30, f"{count} queued")
                outcomes: list[object] = []
                for future in futures:
                    try:
                        outcomes.append(future.result(60))
                    except InferenceServerException as error:
                        outcomes.append(error)
                return outcomes

        valid = [request_of(seed=1, length=MAX_LENGTH), request_of(seed=3, length=MAX_LENGTH - 1)]
        too_long = request_of(seed=2, length=MAX_LENGTH + 1)
        with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type
            reference(too_long)
        good, bad, also_good = batch_of_three([valid[0], too_long, valid[1]])
        assert isinstance(bad, InferenceServerException), bad
        assert bad.status() == "StatusCode.INTERNAL", bad
        assert "onnxruntime" in (bad.message() or ""), bad
        for arrays, result in ((valid[0], good), (valid[1], also_good)):
            assert isinstance(result, tc.InferResult), result
            assert_equal_to_alone(result, reference(arrays))

        # Three that all fail (65, 66 and 70 pad to 128: 384 <= 2 x 201), then three that
        # all run: the model goes on serving, padded.
        failing = [request_of(seed=10 + n, length=n) for n in (65, 66, 70)]
        assert all(isinstance(o, InferenceServerException)
                   for o in batch_of_three(failing))
        fine = [request_of(seed=20 + n, length=n) for n in (64, 63, 62)]
        for arrays, result in zip(fine, batch_of_three(fine), strict=True):
            assert isinstance(result, tc.InferResult), result
            assert_equal_to_alone(result, reference(arrays))

        # The statistics extension counts successful inferences (Triton's
        # inference_count): the five valid rows, never the four rows that failed.
        with tc.InferenceServerClient(server.address) as client:
            stats = client.get_inference_statistics("encoder").model_stats[0]
        assert stats.inference_stats.fail.count == 4
        assert stats.inference_stats.success.count == 5
        assert stats.inference_count == 5, (
            f"inference_count {stats.inference_count} (execution_count "
            f"{stats.execution_count}) counts the rows that failed"
        )
        assert server.metric("ferry_inferences_total") == 5
    finally:
        assert server.stop() == 0


def test_one_stream_mixing_a_failing_request_with_valid_ones_gets_each_its_own_answer(
    encoder_workers: tuple[Workers, Reference],
) -> None:
    """The same batch, all three requests from one ModelStreamInfer stream through a
    frontend: the stream goes on, the failing request gets its own error_message with its
    id, the others their outputs."""
    server, reference = encoder_workers
    try:
        sent = {
            "ok-64": request_of(seed=1, length=MAX_LENGTH),
            "bad-65": request_of(seed=2, length=MAX_LENGTH + 1),
            "ok-63": request_of(seed=3, length=MAX_LENGTH - 1),
        }
        requests = [encoder_request(arrays, key) for key, arrays in sent.items()]
        with grpc.insecure_channel(server.address) as channel:
            replies = list(stub(channel).ModelStreamInfer(iter(requests), timeout=60))
        by_id = {reply.infer_response.id: reply for reply in replies}
        assert sorted(by_id) == sorted(sent), [r.error_message for r in replies]
        assert "onnxruntime" in by_id["bad-65"].error_message, by_id["bad-65"]
        for key in ("ok-64", "ok-63"):
            assert by_id[key].error_message == "", by_id[key].error_message
            expected = reference(sent[key])
            got = outputs_of(by_id[key].infer_response)
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5)
    finally:
        assert server.stop() == 0


def read_into(stream: object, replies: queue.Queue[object]) -> None:
    """Put each reply of a stream into `replies`; the stream's end (even an error) too,
    as the exception, so that a test waiting on the queue sees it."""
    try:
        for reply in stream:  # type: ignore[attr-defined]
            replies.put(reply)
    except grpc.RpcError as error:
        replies.put(error)


def queued_mlp(root: Path, delay_s: float) -> Path:
    """mlp whose batches of 4 rows wait up to `delay_s` for company."""
    mlp_model(root / "mlp" / "1" / "model.onnx")
    write_config(
        root / "mlp",
        "max_batch_size: 4\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {round(delay_s * 1e6)} }}\n",
    )
    return root


def test_sigterm_to_every_process_at_once_still_drains_the_accepted_requests(
    tmp_path: Path,
) -> None:
    """`systemctl stop` (KillMode=control-group, systemd's default) and `pkill -f ferry`
    send SIGTERM to every process of the server, so each frontend gets it twice: once
    directly and once from the supervisor passing it on. That is one stop: the requests
    it accepted, waiting in the queue, are drained and answered, and the exit code is 0.
    The children are signalled first and the supervisor once they have started draining,
    so that the kernel cannot merge the two signals into one (it does when both arrive
    before a frontend runs, which makes the outcome depend on scheduling)."""
    server = Workers(queued_mlp(tmp_path, delay_s=3), 2)
    try:
        x = np.ones((1, 16), np.float32)
        with grpc.insecure_channel(server.address) as channel:
            calls = [stub(channel).ModelInfer.future(infer_request("mlp", x * i), timeout=60)
                     for i in range(2)]
            wait_until(lambda: server.metric("ferry_queue_depth") == 2, 30, "2 queued")
            children = [pid for pids in server.children().values() for pid in pids]
            for pid in children:
                os.kill(pid, signal.SIGTERM)
            server.wait_for("SIGTERM received: draining", 2, timeout=30)  # both frontends
            os.kill(server.pid, signal.SIGTERM)
            outcomes = []
            for call in calls:
                try:
                    outcomes.append(("OK", str(len(call.result(60).outputs))))
                except grpc.RpcError as error:
                    outcomes.append((error.code().name, error.details() or ""))
        assert outcomes == [("OK", "2"), ("OK", "2")], outcomes
        assert server.process.wait(60) == 0
    finally:
        server.stop()


def test_executor_killed_under_held_stream_requests_answers_each_and_the_stream_goes_on(
    tmp_path: Path,
) -> None:
    """Two streams on connections of their own, with three rows queued in the executor
    (a batch of 4 would run); kill -9 of the executor: every queued request gets its own
    UNAVAILABLE error_message at once (none hangs), the streams stay open, and once the
    executor is back the same streams are served. Nothing is left in /dev/shm."""
    before = shm_names()
    server = Workers(queued_mlp(tmp_path, delay_s=60), 2)
    channels = [grpc.insecure_channel(server.address,
                                      options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(2)]
    outboxes: list[queue.Queue[pb.ModelInferRequest | None]] = []
    replies: queue.Queue[pb.ModelStreamInferResponse] = queue.Queue()
    readers = []
    try:
        executor = server.children()["executor"][0]
        x = np.ones((1, 16), np.float32)
        for channel in channels:
            outbox: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
            outboxes.append(outbox)
            stream = stub(channel).ModelStreamInfer(iter(outbox.get, None), timeout=120)
            reader = threading.Thread(target=read_into, args=(stream, replies), daemon=True)
            reader.start()
            readers.append(reader)

        def send(index: int, request_id: str) -> None:
            request = infer_request("mlp", x)
            request.id = request_id
            outboxes[index].put(request)

        for index, request_id in ((0, "a0"), (0, "a1"), (1, "b0")):
            send(index, request_id)
        wait_until(lambda: server.metric("ferry_queue_depth") == 3, 30, "3 rows queued")
        started = time.monotonic()
        os.kill(executor, signal.SIGKILL)
        lost = {}
        for _ in range(3):
            reply = replies.get(timeout=30)
            lost[reply.infer_response.id] = reply.error_message
        assert time.monotonic() - started < 10
        assert sorted(lost) == ["a0", "a1", "b0"], lost
        assert all("executor" in message for message in lost.values()), lost
        # The streams are still open: once the executor is back and both frontends have
        # its catalog again, four rows on them run (a full batch: no queue delay).
        server.wait_for(r"frontend \d: executor \S+ serves 1 models", 4, timeout=90)
        for n in range(4):
            send(n % 2, f"again-{n}")
        served = {}
        for _ in range(4):
            reply = replies.get(timeout=60)
            served[reply.infer_response.id] = reply.error_message
        assert served == {f"again-{n}": "" for n in range(4)}, served
    finally:
        for outbox in outboxes:
            outbox.put(None)
        for channel in channels:
            channel.close()
        server.stop()
    assert shm_names() == before


GATHERING_MLP = """
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 0 }
parameters { key: "adaptive_queue_delay_microseconds" value { string_value: "1000000" } }
"""


def test_sigterm_under_load_answers_every_call_ok_or_unavailable_and_exits_zero(
    tmp_path: Path,
) -> None:
    """Six unary callers and two streams keep a gathering model (holds of up to 1 s) busy
    through both frontends; SIGTERM to the supervisor mid-load. Every request is answered
    OK or UNAVAILABLE (a caller stops at its first UNAVAILABLE), never CANCELLED, INTERNAL
    or a hang; the answers that are OK are right; the server exits 0 with no traceback."""
    mlp_model(tmp_path / "mlp" / "1" / "model.onnx")
    write_config(tmp_path / "mlp", GATHERING_MLP)
    import onnxruntime as ort

    reference = ort.InferenceSession(str(tmp_path / "mlp" / "1" / "model.onnx"))
    server = Workers(tmp_path, 2)
    statuses: list[str] = []
    wrong: list[str] = []
    lock = threading.Lock()
    going = threading.Event()

    def check(x: np.ndarray, response: pb.ModelInferResponse) -> None:
        index = [o.name for o in response.outputs].index("logits")
        got = np.frombuffer(response.raw_output_contents[index], np.float32).reshape(-1, 4)
        if not np.allclose(got, reference.run(["logits"], {"x": x})[0], rtol=1e-5, atol=1e-5):
            with lock:
                wrong.append(response.id)

    def unary(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with grpc.insecure_channel(
            server.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            while True:
                x = rng.standard_normal((1 + seed % 2, 16)).astype(np.float32)
                try:
                    check(x, stub(channel).ModelInfer(infer_request("mlp", x), timeout=60))
                    status = "OK"
                except grpc.RpcError as error:
                    status = error.code().name
                    if status != "UNAVAILABLE":
                        status += f" (unary: {error.details()})"
                with lock:
                    statuses.append(status)
                going.set()
                if status != "OK":
                    return

    def streaming(seed: int) -> None:
        """Four requests in flight; a new one for each OK answer; none after the first
        error; the stream closed once every request sent is answered."""
        rng = np.random.default_rng(seed)
        sent: dict[str, np.ndarray] = {}
        outbox: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
        numbers = iter(range(1_000_000))

        def send() -> None:
            x = rng.standard_normal((1, 16)).astype(np.float32)
            message = infer_request("mlp", x)
            message.id = f"{seed}-{next(numbers)}"
            sent[message.id] = x
            outbox.put(message)

        with grpc.insecure_channel(
            server.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            replies = stub(channel).ModelStreamInfer(iter(outbox.get, None), timeout=60)
            for _ in range(4):
                send()
            stopped = False
            try:
                for reply in replies:
                    x = sent.pop(reply.infer_response.id)
                    status = "OK"
                    if reply.error_message:
                        status = ("UNAVAILABLE" if "shutting down" in reply.error_message
                                  else reply.error_message)
                    else:
                        check(x, reply.infer_response)
                    with lock:
                        statuses.append(status)
                    stopped = stopped or status != "OK"
                    if not stopped:
                        send()
                    elif not sent:
                        outbox.put(None)
            except grpc.RpcError as error:
                if sent:  # an answer lost with the stream
                    with lock:
                        statuses.append(f"stream {error.code().name}: {len(sent)} unanswered")
            outbox.put(None)

    try:
        with ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(unary, seed) for seed in range(6)]
            calls += [pool.submit(streaming, 100 + seed) for seed in range(2)]
            going.wait(60)
            wait_until(lambda: len(statuses) > 300, 60, "load")
            server.process.send_signal(signal.SIGTERM)
            for call in calls:
                call.result(120)
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    assert set(counts) <= {"OK", "UNAVAILABLE"}, counts
    assert not wrong, wrong
    assert "Traceback" not in server.log


def test_a_signal_while_the_executor_still_loads_stops_the_server_at_once(
    tmp_path: Path,
) -> None:
    """As a single process does (tests/test_shutdown.py), `ferry serve --workers 2` told
    SIGTERM while its executor still warms a model up (one that would spin for minutes)
    stops there and exits 0, without waiting for the load."""
    repo = slow_start_repository(tmp_path / "slow-start")
    server = FerryProcess(repo, "--workers", "2", "--metrics-port", "0", wait_ready=False)
    try:
        # The executor serves /metrics before it loads its models.
        server.wait_for(r"serving Prometheus metrics on", timeout=60)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except Exception:
            pytest.fail(f"still running 30 s after SIGTERM during start-up:\n{server.log}")
        assert code == 0, server.log
        assert time.monotonic() - signalled < 10, server.log
    finally:
        server.close()


def gathering_workers(root: Path) -> tuple[Workers, list[grpc.Channel]]:
    """`--workers 2` serving GATHERING_MLP, and four connections of their own."""
    mlp_model(root / "mlp" / "1" / "model.onnx")
    write_config(root / "mlp", GATHERING_MLP)
    server = Workers(root, 2)
    connect = [
        grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    return server, connect


def held_lone(
    server: Workers, connect: list[grpc.Channel]
) -> tuple[grpc.Future[pb.ModelInferResponse], float]:
    """A lone request (on connect[0]) that the executor holds for gathering, seen held
    (queue depth 1) early enough to act before the hold ends (1 s after it arrived), and
    the monotonic time it was sent (before it arrived, so the hold ends after sent + 1 s);
    the test is skipped if no burst raised the target. Each try first teaches the load
    with a burst of 16 requests over the four connections."""
    x = np.ones((1, 16), np.float32)
    for _ in range(20):
        burst = [stub(connect[i % 4]).ModelInfer.future(infer_request("mlp", x), timeout=60)
                 for i in range(16)]
        for call in burst:
            call.result(60)
        sent_at = time.monotonic()
        lone = stub(connect[0]).ModelInfer.future(infer_request("mlp", x), timeout=60)
        try:
            wait_until(lambda: server.metric("ferry_queue_depth") == 1 or lone.done(),  # noqa: B023
                       1.0, "held")
        except AssertionError:
            pass
        if (not lone.done() and server.metric("ferry_queue_depth") == 1
                and time.monotonic() - sent_at < 0.5):
            return lone, sent_at
        lone.result(60)
    pytest.skip("never saw a request held (machine too slow for a 1 s hold)")


def test_deadlines_and_cancellation_cross_to_a_batch_held_for_gathering(
    tmp_path: Path,
) -> None:
    """The executor holds a lone request for company (up to 1 s) after a burst taught it
    the load. A request with a 300 ms timeout parameter then arrives through the other
    frontend: the batch goes at once and both are answered OK (holding would have failed
    it). Next, a held request whose caller cancels: it leaves the executor's queue and
    never runs, and the next lone caller is not held."""
    server, connect = gathering_workers(tmp_path)
    x = np.ones((1, 16), np.float32)
    try:
        lone, _ = held_lone(server, connect)
        hurried = infer_request("mlp", x * 2)
        hurried.parameters["timeout"].int64_param = 300_000
        quick = stub(connect[3]).ModelInfer.future(hurried, timeout=60)
        assert quick.result(60).outputs[0].name == "logits"
        assert lone.result(60).outputs[0].name == "logits"

        lone, _ = held_lone(server, connect)
        ran = server.metric("ferry_inferences_total")
        lone.cancel()
        wait_until(lambda: server.metric("ferry_queue_depth") == 0, 10, "withdrawn")
        assert server.metric("ferry_inferences_total") == ran
        # Time in the queue as the server counts it, not the client's round trip, which
        # a busy machine can stretch past any bound; a held lone caller would add 1 s.
        queued = server.metric("ferry_queue_duration_seconds_sum")
        stub(connect[1]).ModelInfer(infer_request("mlp", x), timeout=60)
        held = server.metric("ferry_queue_duration_seconds_sum") - queued
        assert held < 0.9, f"a lone caller was held {held:.2f} s after the cancel"
    finally:
        for channel in connect:
            channel.close()
        assert server.stop() == 0


def test_a_second_signal_stops_workers_at_once_even_with_a_batch_running(
    tmp_path: Path,
) -> None:
    """As tests/test_shutdown.py asks of one process: a busy server (a batch that would
    run for minutes, three requests queued) told SIGTERM twice answers everyone
    UNAVAILABLE and exits 0 at once, not after the 600 s grace: the supervisor tells
    every child to stop at once (ABORT_SIGNAL), the executor included."""
    spin_model(tmp_path / "m" / "1" / "model.onnx", offset=0.5)
    write_config(tmp_path / "m", "max_batch_size: 1\n")
    server = Workers(tmp_path, 2, "--shutdown-grace", "600")
    try:
        forever = np.full((1, 4), 1e9, np.float32)

        def spin() -> str:
            data = tc.InferInput("x", [1, 4], "FP32")
            data.set_data_from_numpy(forever)
            with tc.InferenceServerClient(server.address) as client:
                try:
                    client.infer("m", [data], client_timeout=120)
                    return "OK"
                except InferenceServerException as error:
                    return str(error.status())

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(spin) for _ in range(4)]
            wait_until(lambda: server.metric("ferry_queue_depth") == 3, 30, "three queued")
            server.process.send_signal(signal.SIGTERM)
            server.wait_for("SIGTERM received: draining", 2, timeout=30)
            assert not any(f.done() for f in futures)  # the drain waits for them
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            outcomes = [f.result(timeout=60) for f in futures]
            try:
                code = server.process.wait(30)
            except Exception:
                pytest.fail(f"still running 30 s after the second signal:\n{server.log}")
        elapsed = time.monotonic() - signalled
        assert outcomes == ["StatusCode.UNAVAILABLE"] * 4, outcomes
        assert code == 0, server.log
        assert elapsed < 10, f"exited {elapsed:.1f} s after the second signal"
    finally:
        server.close()  # kill -9 if it is still running: its children follow


def test_sigterm_lets_a_batch_held_for_gathering_go_at_once_as_one_process_does(
    tmp_path: Path,
) -> None:
    """One process drains a batch held for gathering at once ("no more are coming":
    ModelScheduler.close). With --workers the executor is told when the drain begins, so
    the held request goes at once instead of waiting out the whole adaptive delay (here
    1 s) while its frontend waits for it (its caller's next request would then race the
    closing port: CANCELLED instead of UNAVAILABLE)."""
    server, connect = gathering_workers(tmp_path)
    try:
        lone, sent_at = held_lone(server, connect)  # seen held within 0.5 s of sent_at
        server.process.send_signal(signal.SIGTERM)
        assert lone.result(30).outputs[0].name == "logits"
        # It arrived after sent_at, so waiting out the 1 s hold would answer it later
        # than sent_at + 1 s, however fast or slow the machine.
        waited = time.monotonic() - sent_at
        assert waited < 1.0, (
            f"the held request was answered {waited:.2f} s after it was sent: "
            "it waited out the 1 s hold though the server was draining"
        )
        assert server.process.wait(30) == 0
    finally:
        for channel in connect:
            channel.close()
        server.stop()

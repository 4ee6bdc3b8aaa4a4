"""Variable-length inputs end to end: a real server, a masked transformer-style encoder made
by tests/models.py, tritonclient as the independent client, and onnxruntime run on each
request alone as the judge.

Tolerance: the padded batch computes the same sums as the lone request plus masked terms
whose attention weight is exactly 0 (exp(-1e9) underflows), but its MatMuls run over more
rows and longer rows, so they may sum in another order: rtol 1e-5, atol 1e-5 on values of
order 1.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from ferry.server.executor import Runner
from ferry.server.security import SecurityOptions
from tests.conftest import EXPLICIT_MODEL_CONTROL, GatedInstance, RunningServer
from tests.models import identity_model, masked_encoder_model, write_config
from tests.test_batching_e2e import send_async
from tests.workers import Workers

MAX_LENGTH = 64
VOCAB = 64
OUTPUTS = ("token_states", "pooled")
RTOL, ATOL = 1e-5, 1e-5

StartServer = Callable[..., RunningServer]

PADDING = """
max_batch_size: 16
dynamic_batching { max_queue_delay_microseconds: 2000 }
parameters { key: "padding_inputs" value { string_value: "input_ids=0,attention_mask=0" } }
"""


def encoder_repo(root: Path, config: str | None = PADDING, name: str = "encoder") -> Path:
    repo = root / "repo"
    masked_encoder_model(repo / name / "1" / "model.onnx", vocab=VOCAB, max_length=MAX_LENGTH)
    if config is not None:
        write_config(repo / name, config)
    return repo


def request_of(seed: int, length: int, rows: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(1, VOCAB, (rows, length)).astype(np.int64),
        "attention_mask": np.ones((rows, length), np.int64),
    }


def infer_inputs(arrays: dict[str, np.ndarray]) -> list[tc.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = tc.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class Reference:
    def __init__(self, model_file: Path) -> None:
        self.session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), inputs), strict=True))


def assert_equal_to_alone(result: tc.InferResult, expected: dict[str, np.ndarray]) -> None:
    for name in OUTPUTS:
        got = result.as_numpy(name)
        assert got is not None and got.shape == expected[name].shape, name
        np.testing.assert_allclose(got, expected[name], rtol=RTOL, atol=ATOL, err_msg=name)


def metric_samples(server: RunningServer) -> dict[tuple[str, str], float]:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model") == "encoder"
    }


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return encoder_repo(tmp_path)


@pytest.mark.asyncio
async def test_every_caller_gets_its_unbatched_answer_under_concurrency(
    start_server: StartServer, repo: Path
) -> None:
    """192 concurrent requests, lengths 1 to the maximum (each three times, some with two
    rows): every answer equals onnxruntime on that request alone, and batches of mixed
    lengths did form."""
    server = start_server(repo)
    reference = Reference(repo / "encoder" / "1" / "model.onnx")
    sent = [
        request_of(seed=i, length=1 + i % MAX_LENGTH, rows=2 if i % 7 == 0 else 1)
        for i in range(3 * MAX_LENGTH)
    ]
    async with tc_aio.InferenceServerClient(server.address) as client:
        results = await asyncio.gather(
            *(client.infer("encoder", infer_inputs(arrays)) for arrays in sent)
        )
        stats = (await client.get_inference_statistics("encoder")).model_stats[0]
    for arrays, result in zip(sent, results, strict=True):
        assert_equal_to_alone(result, reference(arrays))
    # The statistics extension counts real inferences: rows sent, not padded ones.
    rows = sum(len(arrays["input_ids"]) for arrays in sent)
    assert stats.inference_count == rows
    assert stats.inference_stats.success.count == len(sent)
    assert stats.execution_count < len(sent), "no requests of different lengths were merged"

    samples = metric_samples(server)
    assert samples["ferry_inferences_total", ""] == rows
    assert samples["ferry_padded_elements_total", ""] > 0
    batches = samples["ferry_batches_total", ""]
    assert samples["ferry_padding_fill_ratio_count", ""] == batches
    # With powers of two and at most 2x padding, no batch is under half real.
    assert samples["ferry_padding_fill_ratio_bucket", "0.25"] == 0
    assert 0.5 * batches <= samples["ferry_padding_fill_ratio_sum", ""] <= batches


@pytest.fixture
def held(
    start_server: StartServer, gated: Callable[[str, Runner], GatedInstance], repo: Path
) -> Iterator[tuple[RunningServer, GatedInstance]]:
    server = start_server(repo, wrap_instance=gated)
    (gate,) = gated.instances  # type: ignore[attr-defined]
    yield server, gate
    gate.release()


def test_queued_requests_of_different_lengths_run_as_one_padded_batch(
    held: tuple[RunningServer, GatedInstance], repo: Path
) -> None:
    server, gate = held
    reference = Reference(repo / "encoder" / "1" / "model.onnx")
    lengths = [9, 16, 11, 13, 10]  # all pad to 16 (80 <= 2 * 59)
    with tc.InferenceServerClient(server.address) as client:
        answers: list[tuple[dict[str, np.ndarray], tc.InferResult]] = []
        gate.hold()
        blocker = request_of(seed=100, length=5)
        pending = [(blocker, submit(client, blocker))]
        assert gate.entered.acquire(timeout=20)
        # One at a time, each seen queued before the next: the rows below are checked
        # in arrival order, and calls sent together may arrive in either order.
        for i, length in enumerate(lengths):
            arrays = request_of(seed=i, length=length)
            pending.append((arrays, submit(client, arrays)))
            wait_for_queue(server, i + 1)
        gate.release()
        for arrays, future in pending:
            answers.append((arrays, future.result(timeout=30)))
    for arrays, result in answers:
        assert_equal_to_alone(result, reference(arrays))
    batch = gate.batches[-1]
    assert batch["input_ids"].shape == (len(lengths), 16)
    # Each row is its request's ids followed by the pad id, with the mask to match.
    np.testing.assert_array_equal(batch["attention_mask"].sum(axis=1), lengths)
    assert (batch["input_ids"][0, 9:] == 0).all()


def test_without_the_setting_different_lengths_never_share_a_batch(
    start_server: StartServer, gated: Callable[[str, Runner], GatedInstance], tmp_path: Path
) -> None:
    repo = encoder_repo(tmp_path, config="max_batch_size: 16\ndynamic_batching { }\n")
    server = start_server(repo, wrap_instance=gated)
    (gate,) = gated.instances  # type: ignore[attr-defined]
    with tc.InferenceServerClient(server.address) as client:
        gate.hold()
        pending = [submit(client, request_of(seed=100, length=5))]
        assert gate.entered.acquire(timeout=20)
        for i, length in enumerate([9, 12]):  # in this order (one queued, then the next)
            pending.append(submit(client, request_of(seed=i, length=length)))
            wait_for_queue(server, i + 1)
        gate.release()
        for future in pending:
            future.result(timeout=30)
    assert [b["input_ids"].shape for b in gate.batches] == [(1, 5), (1, 9), (1, 12)]


def test_inputs_that_disagree_on_their_length_are_refused(
    start_server: StartServer, repo: Path
) -> None:
    server = start_server(repo)
    arrays = request_of(seed=0, length=8)
    arrays["attention_mask"] = np.ones((1, 7), np.int64)
    with tc.InferenceServerClient(server.address) as client:
        with pytest.raises(InferenceServerException) as info:
            client.infer("encoder", infer_inputs(arrays))
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert (
            "inputs 'input_ids' and 'attention_mask' must have the same length along axis 1 "
            "(the padded axis), got 8 and 7" in (info.value.message() or "")
        )
        assert client.infer("encoder", infer_inputs(request_of(seed=1, length=8)))


def test_a_bad_setting_fails_the_load_naming_the_input_and_axis(
    start_server: StartServer, tmp_path: Path
) -> None:
    repo = encoder_repo(tmp_path, config=PADDING.replace("input_ids=0", "input_ids=0:x") + (
        'parameters { key: "padding_axis" value { string_value: "2" } }\n'
    ))
    server = start_server(repo, security=EXPLICIT_MODEL_CONTROL)
    with tc.InferenceServerClient(server.address) as client:
        with pytest.raises(InferenceServerException) as info:
            client.load_model("encoder")
        message = info.value.message() or ""
        assert "input 'input_ids' has shape ['batch', -1], which has no axis 2 to pad" in message
        assert not client.is_model_ready("encoder")


def test_model_config_shows_the_outputs_found_at_load(
    start_server: StartServer, repo: Path
) -> None:
    server = start_server(repo)
    with tc.InferenceServerClient(server.address) as client:
        parameters = client.get_model_config("encoder").config.parameters
    assert parameters["padding_outputs"].string_value == "token_states=1"
    assert parameters["padding_inputs"].string_value == "input_ids=0,attention_mask=0"


# Helpers -----------------------------------------------------------------------------


def submit(
    client: tc.InferenceServerClient, arrays: dict[str, np.ndarray]
) -> Future[tc.InferResult]:
    return send_async(client, "encoder", infer_inputs(arrays))


def wait_for_queue(server: RunningServer, count: int) -> None:
    """Poll the server's queue depth (a wait on its state, not a sleep standing in)."""
    async def depth() -> int:
        return server.server.manager.get("encoder").scheduler.queue_depth

    deadline = time.monotonic() + 20
    while server.call(depth()) != count:
        assert time.monotonic() < deadline, f"{count} requests never queued"
        time.sleep(0.002)


def test_the_readme_config_example_serves_the_encoder(
    start_server: StartServer, tmp_path: Path
) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Variable-length inputs", 1)[1]
    example = section.split("```\n", 2)[1]
    assert "padding_inputs" in example
    repo = encoder_repo(tmp_path, config=example)
    server = start_server(repo)
    reference = Reference(repo / "encoder" / "1" / "model.onnx")
    arrays = request_of(seed=5, length=37)
    with tc.InferenceServerClient(server.address) as client:
        assert_equal_to_alone(client.infer("encoder", infer_inputs(arrays)), reference(arrays))


# Hostile callers and models -------------------------------------------------------


def drained(gate: GatedInstance) -> GatedInstance:
    """Forget the entries of runs made at load (the probe, warm-up)."""
    while gate.entered.acquire(blocking=False):
        pass
    return gate


def test_a_request_the_model_runs_alone_is_not_padded_past_the_models_own_length(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A model whose longest sequence is not a power of two (48 positions here; CLIP's
    text encoder has 77, RoBERTa 514): a request of length 40 runs alone in onnxruntime,
    but Ferry pads it to the power-of-two bucket 64, past the model's position table, and
    the caller gets INTERNAL. Same for any length 33..48."""
    repo = tmp_path / "repo"
    masked_encoder_model(repo / "encoder" / "1" / "model.onnx", vocab=VOCAB, max_length=48)
    write_config(repo / "encoder", PADDING)
    server = start_server(repo)
    reference = Reference(repo / "encoder" / "1" / "model.onnx")
    arrays = request_of(seed=3, length=40)
    expected = reference(arrays)  # the model takes it alone
    with tc.InferenceServerClient(server.address) as client:
        result = client.infer("encoder", infer_inputs(arrays))
    assert_equal_to_alone(result, expected)


def test_a_request_too_long_for_the_model_does_not_fail_the_callers_padded_with_it(
    start_server: StartServer, gated: Callable[[str, Runner], GatedInstance], tmp_path: Path
) -> None:
    """Without padding, [1, 65] and [1, 64] never share a batch. With it, a caller's length
    65 (one past the model's 64 positions, which the model refuses alone) joins a valid
    length-64 request (2 x 128 <= 2 x 129 padded elements), the batch fails in
    onnxruntime, and the valid caller gets INTERNAL for a request it sent correctly."""
    repo = encoder_repo(tmp_path)
    server = start_server(repo, wrap_instance=gated)
    gate = drained(gated.instances[0])  # type: ignore[attr-defined]
    reference = Reference(repo / "encoder" / "1" / "model.onnx")
    valid = request_of(seed=1, length=MAX_LENGTH)
    too_long = request_of(seed=2, length=MAX_LENGTH + 1)
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type
        reference(too_long)
    with tc.InferenceServerClient(server.address) as client:
        gate.hold()
        blocker = submit(client, request_of(seed=0, length=5))
        assert gate.entered.acquire(timeout=20)
        good = submit(client, valid)
        bad = submit(client, too_long)
        wait_for_queue(server, 2)
        gate.release()
        blocker.result(timeout=30)
        with pytest.raises(InferenceServerException) as info:
            bad.result(timeout=30)
        assert info.value.status() == "StatusCode.INTERNAL"
        assert_equal_to_alone(good.result(timeout=30), reference(valid))
        # The statistics count what was answered: the blocker and the valid request.
        stats = client.get_inference_statistics("encoder").model_stats[0]
    assert stats.inference_count == 2 and stats.execution_count == 2
    assert stats.inference_stats.success.count == 2 and stats.inference_stats.fail.count == 1
    assert stats.inference_stats.compute_infer.count == 2


def test_a_zero_length_request_cannot_make_the_server_allocate_past_the_tensor_limit(
    start_server: StartServer, gated: Callable[[str, Runner], GatedInstance], tmp_path: Path
) -> None:
    """A padded input [batch, time, features] with features variable: shape
    [16, 0, 250000] has no element, so --max-tensor-elements/--max-tensor-bytes (checked
    on math.prod(shape) == 0) let it through, and the padding pads time 0 to the bucket 1:
    the server fills and runs a 16 MB tensor for a request of 0 bytes, 16x the 1 MiB
    per-tensor limit. Any `features` passes the check, so the allocation is unbounded."""
    repo = tmp_path / "repo"
    identity_model(repo / "frames" / "1" / "model.onnx", "FP32", ("batch", "time", "features"))
    write_config(
        repo / "frames",
        'max_batch_size: 16\n'
        'parameters { key: "padding_inputs" value { string_value: "INPUT0=0" } }\n',
    )
    limit = 1 << 20
    server = start_server(
        repo, wrap_instance=gated, security=SecurityOptions(max_tensor_bytes=limit)
    )
    gate: GatedInstance = gated.instances[0]  # type: ignore[attr-defined]
    already = len(gate.batches)
    sent = np.zeros((16, 0, 250_000), np.float32)
    tensor = tc.InferInput("INPUT0", list(sent.shape), "FP32")
    tensor.set_data_from_numpy(sent)
    with tc.InferenceServerClient(server.address) as client:
        try:
            client.infer("frames", [tensor])
        except InferenceServerException as error:  # a refusal is a fine answer
            assert error.status() == "StatusCode.INVALID_ARGUMENT", error
            assert "INPUT0" in (error.message() or ""), error
    ran = [(batch["INPUT0"].nbytes, list(batch["INPUT0"].shape))
           for batch in gate.batches[already:]]
    nbytes, shape = max(ran, default=(0, []))
    assert nbytes <= limit, (
        f"a request of {sent.nbytes} bytes made the model run on INPUT0 {shape} "
        f"({nbytes} bytes), over the {limit}-byte tensor limit"
    )


def test_length_zero_is_answered_as_onnxruntime_answers_it_alone_and_in_a_batch(
    start_server: StartServer, gated: Callable[[str, Runner], GatedInstance], tmp_path: Path
) -> None:
    repo = encoder_repo(tmp_path)
    server = start_server(repo, wrap_instance=gated)
    gate: GatedInstance = gated.instances[0]  # type: ignore[attr-defined]
    reference = Reference(repo / "encoder" / "1" / "model.onnx")
    empty = request_of(seed=1, length=0, rows=2)
    with tc.InferenceServerClient(server.address) as client:
        assert_equal_to_alone(client.infer("encoder", infer_inputs(empty)), reference(empty))
        drained(gate).hold()
        blocker = submit(client, request_of(seed=0, length=5))
        assert gate.entered.acquire(timeout=20)
        sent = [request_of(seed=2, length=4), empty, request_of(seed=3, length=3)]
        pending = [submit(client, arrays) for arrays in sent]
        wait_for_queue(server, len(sent))
        gate.release()
        blocker.result(timeout=30)
        for arrays, future in zip(sent, pending, strict=True):
            assert_equal_to_alone(future.result(timeout=30), reference(arrays))


def test_padding_across_two_frontends_gives_each_caller_its_own_answer(tmp_path: Path) -> None:
    """`--workers 2`: the frontends compute each request's length, the executor pads;
    mismatched lengths are refused by the frontend, and padding happened."""
    masked_encoder_model(tmp_path / "encoder" / "1" / "model.onnx", vocab=VOCAB,
                         max_length=MAX_LENGTH)
    write_config(tmp_path / "encoder", PADDING)
    reference = Reference(tmp_path / "encoder" / "1" / "model.onnx")
    server = Workers(tmp_path, 2)
    try:
        def one(i: int) -> bool:
            arrays = request_of(seed=i, length=1 + (7 * i) % MAX_LENGTH, rows=1 + i % 2)
            with tc.InferenceServerClient(server.address) as client:
                assert_equal_to_alone(client.infer("encoder", infer_inputs(arrays)),
                                      reference(arrays))
            return True

        with ThreadPoolExecutor(12) as pool:
            assert all(pool.map(one, range(48)))
        assert server.metric("ferry_padded_elements_total") > 0
        assert server.metric("ferry_batches_total") < 48
        arrays = request_of(seed=1, length=8)
        arrays["attention_mask"] = np.ones((1, 7), np.int64)
        with tc.InferenceServerClient(server.address) as client:
            with pytest.raises(InferenceServerException) as info:
                client.infer("encoder", infer_inputs(arrays))
            assert "must have the same length along axis 1" in (info.value.message() or "")
            parameters = client.get_model_config("encoder").config.parameters
            assert parameters["padding_outputs"].string_value == "token_states=1"
    finally:
        assert server.stop() == 0

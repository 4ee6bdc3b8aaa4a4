"""One caller's request that makes the model fail (values the model cannot take: a token
id past its vocabulary) fails only that caller, not everyone whose rows rode in the same
batch. Before, a model without padding failed the whole batch: eight callers got
INTERNAL for one bad token id."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from ferry.server.errors import ErrorKind, FerryError
from ferry.server.executor import BatchItem, InstanceExecutor, RunOnly
from ferry.server.rows import Array, Tensors
from tests.conftest import GatedInstance, RunningServer
from tests.models import masked_encoder_model, write_config
from tests.test_batching_e2e import send_async
from tests.test_padding_e2e import OUTPUTS, Reference, infer_inputs, request_of

VOCAB = 64
LENGTH = 8


class Picky:
    """Runs a batch of x [rows, 1] unless one of its rows is negative, as a model fails
    on a value it cannot take; counts its runs and the rows they carried."""

    def __init__(self) -> None:
        self.runs = 0
        self.rows = 0

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> Tensors:
        x = inputs["x"]
        self.runs += 1
        self.rows += len(x)
        if (x < 0).any():
            raise RuntimeError("a negative row")
        return {"y": x * 2}


def items_of(values: Sequence[float]) -> list[BatchItem]:
    return [BatchItem({"x": np.array([[v]], np.float32)}, 1, ("y",)) for v in values]


@pytest.mark.parametrize("bad", [(), (0,), (63,), (17,), (3, 40), tuple(range(0, 64, 2))])
def test_the_requests_that_fail_alone_fail_and_the_others_get_their_rows(
    bad: tuple[int, ...],
) -> None:
    runner = Picky()
    executor = InstanceExecutor(RunOnly(runner))
    values = [-1.0 if i in bad else float(i) for i in range(64)]
    outcome = executor.execute(items_of(values), ("y",))
    for index, result in enumerate(outcome.outputs):
        if index in bad:
            assert isinstance(result, RuntimeError), index
        else:
            assert isinstance(result, dict), index
            np.testing.assert_array_equal(result["y"], [[2.0 * index]])
    if len(bad) == 1:
        # One bad request costs about twice the batch's rows again, not a run per request.
        assert runner.runs <= 1 + 2 * 6 and runner.rows <= 3 * 64


def test_a_batch_that_runs_is_run_once() -> None:
    runner = Picky()
    outcome = InstanceExecutor(RunOnly(runner)).execute(items_of([1.0, 2.0, 3.0]), ("y",))
    assert runner.runs == 1
    assert [r["y"].item() for r in outcome.outputs] == [2.0, 4.0, 6.0]  # type: ignore[index]


def test_a_lone_request_that_fails_raises_as_before() -> None:
    with pytest.raises(RuntimeError, match="a negative row"):
        InstanceExecutor(RunOnly(Picky())).execute(items_of([-1.0]), ("y",))


def test_a_token_id_past_the_vocabulary_fails_only_its_own_caller(
    start_server: Callable[..., RunningServer],
    gated: Callable[[str, object], GatedInstance],
    tmp_path: Path,
) -> None:
    """Eight callers of an encoder without padding (equal lengths, so one batch); one sends
    a token id past the vocabulary. That caller gets INVALID_ARGUMENT with onnxruntime's
    reason; the seven
    others get the answer onnxruntime gives their request alone; the statistics count
    seven successes and one failure."""
    model_file = masked_encoder_model(
        tmp_path / "repo" / "encoder" / "1" / "model.onnx", vocab=VOCAB, max_length=LENGTH
    )
    # Held until all eight have come: one batch.
    write_config(
        tmp_path / "repo" / "encoder",
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 30000000 }\n",
    )
    server = start_server(tmp_path / "repo", wrap_instance=gated)
    gate = gated.instances[0]  # type: ignore[attr-defined]
    reference = Reference(model_file)
    sent = [request_of(seed=i, length=LENGTH) for i in range(8)]
    sent[5]["input_ids"][0, 3] = VOCAB + 1000
    with tc.InferenceServerClient(server.address) as client:
        answers = [send_async(client, "encoder", infer_inputs(arrays)) for arrays in sent]
        for index, (arrays, answer) in enumerate(zip(sent, answers, strict=True)):
            if index == 5:
                with pytest.raises(InferenceServerException) as refusal:
                    answer.result(30)
                # onnxruntime's InvalidArgument, from the caller's own values.
                assert refusal.value.status() == "StatusCode.INVALID_ARGUMENT"
                assert "indices element out of data bounds" in refusal.value.message()
                continue
            result = answer.result(30)
            expected = reference(arrays)
            for name in OUTPUTS:
                np.testing.assert_allclose(result.as_numpy(name), expected[name],
                                           rtol=1e-5, atol=1e-5)
        stats = client.get_inference_statistics("encoder").model_stats[0]
    assert max(gate.batch_rows) == 8, gate.batch_rows  # they did ride in one batch
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (7, 1)
    assert stats.inference_count == 7


class PickyWithServerErrors(Picky):
    """As Picky, but failing as the runtime reports onnxruntime's FAIL: INTERNAL."""

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> Tensors:
        try:
            return super().run(inputs, output_names)
        except RuntimeError as exc:
            raise FerryError(ErrorKind.INTERNAL, str(exc)) from None


def test_a_request_that_fails_alone_with_a_server_error_is_found_while_one_half_runs() -> None:
    """One bad row among 16, reported as INTERNAL: while one half of each split runs, the
    other is split again, so only the bad request fails; bad rows in both halves fail the
    whole batch, as one error (every part might fail the same way)."""
    runner = PickyWithServerErrors()
    outcome = InstanceExecutor(RunOnly(runner)).execute(
        items_of([-1.0 if i == 9 else float(i) for i in range(16)]), ("y",)
    )
    assert [isinstance(r, FerryError) for r in outcome.outputs] == [i == 9 for i in range(16)]
    runner = PickyWithServerErrors()
    with pytest.raises(FerryError, match="a negative row"):  # the whole batch's, as before
        InstanceExecutor(RunOnly(runner)).execute(
            items_of([-1.0 if i in (2, 12) else float(i) for i in range(16)]), ("y",)
        )
    assert runner.runs == 3

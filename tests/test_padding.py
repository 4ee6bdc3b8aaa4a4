"""Padding of variable-length inputs, below the server: the batching policy with an explicit
clock, padding and cutting back arrays, the config's checks against the graph, the probe
that finds the outputs to cut back, and the IO-binding path fed padded shapes (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ferry.server.batching import Batch, BatchPolicy, BatchQueue, PendingRequest
from ferry.server.config import ConfigError, read_config_file, settings_from
from ferry.server.errors import ErrorKind, FerryError
from ferry.server.executor import (
    BUCKET_RETRY_AFTER_S,
    BUCKET_RETRY_MAX_S,
    BatchItem,
    InstanceExecutor,
)
from ferry.server.loading import with_output_axes
from ferry.server.padding import LengthBuckets, PaddingSettings, probe_output_axes
from ferry.server.rows import gather_padded, scatter_unpadded
from ferry.server.runtime import OnnxInstance, SessionSettings
from ferry.server.signatures import read_signature
from tests.models import identity_model, masked_encoder_model, mlp_model, write_config

LONG = 100.0  # a queue delay no test reaches unless it means to
# Padded and unpadded runs sum in different orders (longer rows, masked terms that are
# exactly zero): equal to float32 rounding.
RTOL, ATOL = 1e-5, 1e-5


def req(name: str, length: int, at: float = 0.0, *, rows: int = 1) -> PendingRequest[str]:
    return PendingRequest(payload=name, rows=rows, shape_key=(), arrival_s=at, length=length)


def padded_queue(
    max_batch_size: int = 8, delay: float = LONG, lengths: tuple[int, ...] = (), ratio: float = 2.0
) -> BatchQueue[str]:
    return BatchQueue(
        BatchPolicy(
            max_batch_size=max_batch_size,
            max_queue_delay_s=delay,
            padding=LengthBuckets(lengths, ratio),
        )
    )


def names(batch: Batch[str] | None) -> list[str]:
    assert batch is not None, "expected a batch, got None (wait)"
    return [r.payload for r in batch.requests]


# -- lengths and buckets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"), [(0, 1), (1, 1), (2, 2), (3, 4), (8, 8), (9, 16), (100, 128)]
)
def test_lengths_round_up_to_powers_of_two_by_default(length: int, expected: int) -> None:
    assert LengthBuckets().padded_length(length) == expected


def test_listed_length_buckets_are_used_and_a_longer_request_keeps_its_length() -> None:
    buckets = LengthBuckets((16, 48, 128))
    assert [buckets.padded_length(n) for n in (1, 16, 17, 48, 100, 200)] == [
        16, 16, 48, 48, 128, 200,
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lengths": (8, 4)}, "must be distinct positive lengths, got [8, 4]"),
        ({"lengths": (0, 4)}, "must be distinct positive lengths"),
        ({"max_padding_ratio": 0.5}, "max_padding_ratio must be a finite number >= 1"),
        # inf would turn off the bound that keeps a short request from a long one's batch
        ({"max_padding_ratio": float("inf")}, "max_padding_ratio must be a finite number >= 1"),
        ({"max_padding_ratio": float("nan")}, "max_padding_ratio must be a finite number >= 1"),
    ],
)
def test_bad_length_buckets_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LengthBuckets(**fields)  # type: ignore[arg-type]


# -- the batching policy ----------------------------------------------------------------


def test_requests_of_different_lengths_share_a_batch() -> None:
    q = padded_queue(max_batch_size=4, delay=0.0)
    for name, length in [("a", 5), ("b", 7), ("c", 8), ("d", 6)]:
        q.submit(req(name, length))
    batch = q.take_batch(now=0.0)
    assert names(batch) == ["a", "b", "c", "d"]


def test_a_short_request_does_not_ride_with_a_long_one() -> None:
    """With ratio 1.5, 8 and 128 together would run 256 elements for 136 real ones: the
    long one is passed over, keeps its place, and runs next."""
    q = padded_queue(delay=0.0, ratio=1.5)
    q.submit(req("short", 8))
    q.submit(req("long", 128))
    q.submit(req("short2", 7))
    assert names(q.take_batch(now=0.0)) == ["short", "short2"]
    assert names(q.take_batch(now=0.0)) == ["long"]


def test_the_waste_bound_counts_the_whole_batch() -> None:
    """Ratio 2: head 100 (bucket 128) takes a 30 (2*128 <= 2*130) but then no 20
    (3*128 > 2*150); the 20 waits for a batch of its own size."""
    q = padded_queue(delay=0.0)
    for name, length in [("a", 100), ("b", 30), ("c", 20), ("d", 90)]:
        q.submit(req(name, length))
    assert names(q.take_batch(now=0.0)) == ["a", "b", "d"]
    assert names(q.take_batch(now=0.0)) == ["c"]


def test_a_passed_over_request_waits_no_longer_than_the_queue_delay() -> None:
    q = padded_queue(max_batch_size=4, delay=0.010, ratio=1.5)
    q.submit(req("long", 128, at=0.0))
    q.submit(req("short", 4, at=0.001))
    assert q.take_batch(now=0.005) is None
    assert q.next_wakeup(now=0.005) == pytest.approx(0.010)
    assert names(q.take_batch(now=0.010)) == ["long"]
    assert q.next_wakeup(now=0.010) == pytest.approx(0.011)
    assert q.take_batch(now=0.0105) is None
    assert names(q.take_batch(now=0.011)) == ["short"]


def test_rows_still_bound_the_batch_and_a_request_that_does_not_fit_sends_it() -> None:
    """As without padding: a request of the group that does not fit in rows keeps its
    place and the batch goes at once, however long the queue delay."""
    q = padded_queue(max_batch_size=4, delay=LONG)
    q.submit(req("a", 10, rows=3))
    q.submit(req("b", 12, rows=2))
    q.submit(req("c", 9, rows=1))
    batch = q.take_batch(now=0.0)
    assert names(batch) == ["a"] and batch is not None and batch.rows == 3
    assert q.take_batch(now=0.0) is None  # b and c: 3 rows of 4, waiting for the delay
    q.submit(req("d", 11, rows=1))
    assert names(q.take_batch(now=0.0)) == ["b", "c", "d"]


def test_shapes_other_than_the_padded_axis_still_separate_groups() -> None:
    q = padded_queue(delay=0.0)
    q.submit(PendingRequest("a", rows=1, shape_key=((3,),), arrival_s=0.0, length=5))
    q.submit(PendingRequest("b", rows=1, shape_key=((4,),), arrival_s=0.0, length=5))
    q.submit(PendingRequest("c", rows=1, shape_key=((3,),), arrival_s=0.0, length=7))
    assert names(q.take_batch(now=0.0)) == ["a", "c"]
    assert names(q.take_batch(now=0.0)) == ["b"]


def test_without_padding_different_lengths_never_merge() -> None:
    """The default policy keeps grouping by the exact shape."""
    q: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=8))
    q.submit(PendingRequest("a", rows=1, shape_key=((5,),), arrival_s=0.0))
    q.submit(PendingRequest("b", rows=1, shape_key=((7,),), arrival_s=0.0))
    assert names(q.take_batch(now=0.0)) == ["a"]


# -- padding and cutting back arrays ------------------------------------------------------


def test_gather_padded_pads_each_part_to_the_target_with_its_value() -> None:
    parts = [
        {"ids": np.array([[1, 2]], np.int64), "bias": np.array([[0.5]], np.float32)},
        {"ids": np.array([[3, 4, 5], [6, 7, 8]], np.int64), "bias": np.ones((2, 1), np.float32)},
    ]
    batch = gather_padded(parts, [2, 3], 4, 1, {"ids": -1})
    np.testing.assert_array_equal(
        batch["ids"], [[1, 2, -1, -1], [3, 4, 5, -1], [6, 7, 8, -1]]
    )
    np.testing.assert_array_equal(batch["bias"], [[0.5], [1.0], [1.0]])


def test_gather_padded_pads_an_inner_axis() -> None:
    frames = np.arange(2 * 3 * 2, dtype=np.float32).reshape(1, 2, 3, 2)  # axis 2 is time
    batch = gather_padded([{"x": frames}], [3], 4, 2, {"x": 9.0})
    assert batch["x"].shape == (1, 2, 4, 2)
    np.testing.assert_array_equal(batch["x"][:, :, :3], frames)
    assert (batch["x"][:, :, 3] == 9.0).all()


def test_a_lone_request_already_at_its_bucket_is_not_copied() -> None:
    part = {"ids": np.zeros((1, 8), np.int64)}
    assert gather_padded([part], [8], 8, 1, {"ids": 0}) is part


def test_scatter_unpadded_cuts_following_outputs_back_to_each_length() -> None:
    states = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    pooled = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    results = scatter_unpadded(
        {"states": states, "pooled": pooled}, [1, 2], [2, 3], 4,
        [("states", "pooled"), ("states",)], {"states": 1},
    )
    np.testing.assert_array_equal(results[0]["states"], states[0:1, :2])
    np.testing.assert_array_equal(results[0]["pooled"], pooled[0:1])
    np.testing.assert_array_equal(results[1]["states"], states[1:3, :3])
    assert "pooled" not in results[1]


def test_an_output_that_does_not_follow_the_padded_length_is_an_internal_error() -> None:
    with pytest.raises(Exception, match="axis 1 should follow the padded length 4"):
        scatter_unpadded({"y": np.zeros((1, 3))}, [1], [2], 4, [("y",)], {"y": 1})


# -- config ---------------------------------------------------------------------------------

PADDING_CONFIG = """
max_batch_size: 8
parameters { key: "padding_inputs" value { string_value: "input_ids=0, attention_mask=0" } }
"""


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return masked_encoder_model(tmp_path_factory.mktemp("enc") / "model.onnx", max_length=64)


def settings_with(tmp_path: Path, model_file: Path, text: str):  # type: ignore[no-untyped-def]
    path = write_config(tmp_path / "m", text)
    config = read_config_file(path)
    return settings_from(
        "m", read_signature(model_file), config.message, config.set_fields, config.warnings
    )


def test_config_reads_padding_with_defaults(tmp_path: Path, encoder_file: Path) -> None:
    settings = settings_with(tmp_path, encoder_file, PADDING_CONFIG)
    padding = settings.padding
    assert padding is not None
    assert padding.axis == 1
    assert dict(padding.inputs) == {"input_ids": 0, "attention_mask": 0}
    assert padding.buckets == LengthBuckets((), 2.0)
    assert padding.outputs is None  # found at load
    # The ModelConfig RPC shows the settings back.
    parameters = settings.to_proto().parameters
    assert parameters["padding_inputs"].string_value == "input_ids=0,attention_mask=0"


def test_a_model_without_the_setting_does_not_pad(tmp_path: Path, encoder_file: Path) -> None:
    assert settings_with(tmp_path, encoder_file, "max_batch_size: 8").padding is None


def test_config_reads_every_padding_parameter(tmp_path: Path, encoder_file: Path) -> None:
    text = PADDING_CONFIG + """
parameters { key: "padding_axis" value { string_value: "1" } }
parameters { key: "length_buckets" value { string_value: "64,16,32" } }
parameters { key: "max_padding_ratio" value { string_value: "1.5" } }
parameters { key: "padding_outputs" value { string_value: "token_states=1" } }
"""
    padding = settings_with(tmp_path, encoder_file, text).padding
    assert padding is not None
    assert padding.buckets == LengthBuckets((16, 32, 64), 1.5)
    assert padding.outputs == {"token_states": 1}


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"padding_inputs": "tokens=0"},
            "padding_inputs: 'tokens' is not an input of the model, whose inputs are "
            "'input_ids', 'attention_mask'",
        ),
        (
            {"padding_inputs": "input_ids=0", "padding_axis": "2"},
            "input 'input_ids' has shape ['batch', -1], which has no axis 2 to pad",
        ),
        (
            {"padding_inputs": "input_ids=0", "padding_axis": "0"},
            "input 'input_ids' has shape ['batch', -1], which has no axis 0 to pad "
            "(axis 0 is the batch axis",
        ),
        ({"padding_inputs": "input_ids=zero"}, "pad value 'zero' of input 'input_ids' is not"),
        ({"padding_inputs": "input_ids"}, "must be input=pad value pairs"),
        (
            {"padding_inputs": "input_ids=0", "padding_outputs": "pooled=1"},
            "output 'pooled' has shape ['batch', 16], whose axis 1 is fixed at 16",
        ),
        (
            {"padding_inputs": "input_ids=0", "padding_outputs": "logits=1"},
            "'logits' is not an output of the model",
        ),
        ({"length_buckets": "8"}, "length_buckets need parameter padding_inputs"),
        (
            {"padding_inputs": "input_ids=0", "max_padding_ratio": "lots"},
            "max_padding_ratio must be a number >= 1, got 'lots'",
        ),
        # str.isdigit() takes a superscript two, which int() refuses
        (
            {"padding_inputs": "input_ids=0", "padding_axis": "\u00b2"},
            "parameter padding_axis must be a whole number, got '\u00b2'",
        ),
        (
            {"padding_inputs": "input_ids=0", "padding_outputs": "token_states=\u00b2"},
            "output 'token_states' needs a whole axis number, got '\u00b2'",
        ),
        (
            {"padding_inputs": "input_ids=0,attention_mask=0,input_ids=1"},
            "input 'input_ids' is named twice",
        ),
    ],
)
def test_bad_padding_settings_are_refused_naming_input_and_axis(
    tmp_path: Path, encoder_file: Path, parameters: dict[str, str], message: str
) -> None:
    text = "max_batch_size: 8\n" + "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
        for k, v in parameters.items()
    )
    with pytest.raises(ConfigError) as info:
        settings_with(tmp_path, encoder_file, text)
    assert message in str(info.value)


def test_a_fixed_axis_is_refused(tmp_path: Path) -> None:
    model_file = mlp_model(tmp_path / "mlp.onnx")  # x [batch, 16]
    text = 'max_batch_size: 8\nparameters { key: "padding_inputs" value { string_value: "x=0" } }'
    message = r"input 'x' has shape \['batch', 16\], whose axis 1 is fixed at 16; padding needs"
    with pytest.raises(ConfigError, match=message):
        settings_with(tmp_path, model_file, text)


def test_padding_needs_a_model_that_batches(tmp_path: Path, encoder_file: Path) -> None:
    with pytest.raises(ConfigError, match="needs a model that batches"):
        settings_with(
            tmp_path, encoder_file, PADDING_CONFIG.replace("max_batch_size: 8", "max_batch_size: 0")
        )


def test_a_pad_value_must_fit_the_datatype(tmp_path: Path) -> None:
    model_file = identity_model(tmp_path / "u8.onnx", "UINT8", ("batch", "n"))
    text = (
        'max_batch_size: 8\n'
        'parameters { key: "padding_inputs" value { string_value: "INPUT0=300" } }'
    )
    with pytest.raises(ConfigError, match="pad value 300 of input 'INPUT0' is outside UINT8"):
        settings_with(tmp_path, model_file, text)


def test_warm_up_covers_each_batch_bucket_at_each_listed_length(
    tmp_path: Path, encoder_file: Path
) -> None:
    text = PADDING_CONFIG + """
parameters { key: "batch_buckets" value { string_value: "4,8" } }
parameters { key: "length_buckets" value { string_value: "16,32" } }
"""
    settings = settings_with(tmp_path, encoder_file, text)
    shapes = [(s.batch_size, dict(s.inputs)["input_ids"].dims) for s in settings.warmup]
    assert shapes == [(4, (32,)), (8, (32,)), (4, (16,)), (8, (16,))]


# -- finding the outputs to cut back ----------------------------------------------------------


class Session:
    def __init__(self, model_file: Path) -> None:
        self.session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])

    def run(self, inputs, output_names):  # type: ignore[no-untyped-def]
        values = self.session.run(list(output_names), dict(inputs))
        return dict(zip(output_names, values, strict=True))


def test_probe_finds_the_per_token_output_and_leaves_the_pooled_one(
    tmp_path: Path, encoder_file: Path
) -> None:
    settings = settings_with(tmp_path, encoder_file, PADDING_CONFIG)
    found = with_output_axes(settings, Session(encoder_file))
    assert found.padding is not None and found.padding.outputs == {"token_states": 1}


def test_probe_refuses_an_output_that_changes_shape_some_other_way() -> None:
    class Doubling:
        def run(self, inputs, output_names):  # type: ignore[no-untyped-def]
            n = inputs["x"].shape[1]
            return {"y": np.zeros((1, 2 * n), np.float32)}

    padding = PaddingSettings(1, {"x": 0.0}, LengthBuckets())
    with pytest.raises(ValueError, match=r"output 'y' has shape \[1, 6\] for inputs of length 3 "
                       r"and \[1, 10\] for length 5: no single axis follows"):
        probe_output_axes(Doubling(), padding, [("x", "FP32", (-1,))], ["y"])


# -- the executor and the IO-binding path -----------------------------------------------------


def encoder_inputs(rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(1, 64, (1, length)).astype(np.int64),
        "attention_mask": np.ones((1, length), np.int64),
    }


@pytest.mark.parametrize("io_binding", [False, True])
def test_executor_pads_runs_and_cuts_back_exactly(encoder_file: Path, io_binding: bool) -> None:
    """Through plain session.run and through IO binding with batch buckets: the bound
    shapes are keyed by the padded shape, and each request's answer equals its own run."""
    instance = OnnxInstance(
        encoder_file,
        SessionSettings(
            intra_op_threads=1,
            max_batch_size=8,
            io_binding=io_binding,
            batch_buckets=(4, 8) if io_binding else (),
        ),
    )
    padding = PaddingSettings(
        1, {"input_ids": 0, "attention_mask": 0}, LengthBuckets(), {"token_states": 1}
    )
    executor = InstanceExecutor(instance, padding=padding)
    reference = Session(encoder_file)
    rng = np.random.default_rng(3)
    for lengths in ([3, 7, 5], [9, 16, 1, 12, 2], [5, 6]):
        requests = [encoder_inputs(rng, n) for n in lengths]
        items = [
            BatchItem(r, 1, ("token_states", "pooled"), n)
            for r, n in zip(requests, lengths, strict=True)
        ]
        executed = executor.execute(items, ["token_states", "pooled"])
        target = 1 << (max(lengths) - 1).bit_length()
        assert executed.real_elements == sum(lengths)
        assert executed.padded_elements == len(lengths) * target
        for request, result in zip(requests, executed.outputs, strict=True):
            expected = reference.run(request, ["token_states", "pooled"])
            for name in ("token_states", "pooled"):
                np.testing.assert_allclose(result[name], expected[name], rtol=RTOL, atol=ATOL)
    if io_binding:
        counters = instance.counters
        assert counters is not None
        assert counters.padded_rows == (4 - 3) + (8 - 5) + (4 - 2)
        # Batch buckets combine with length buckets: the bindings are kept per padded
        # shape (4x8, 8x16), so the same batches again bind nothing new.
        bindings = counters.bindings
        for lengths in ([4, 8, 6], [16, 9, 10, 11, 12], [7, 8]):
            items = [BatchItem(encoder_inputs(rng, n), 1, ("pooled",), n) for n in lengths]
            executor.execute(items, ["pooled"])
        assert counters.bindings == bindings


class ShortModel:
    """Takes sequences of at most `longest` positions, like a model with a position table
    of that size; records the length of every run."""

    may_run_on_loop = True

    def __init__(self, longest: int) -> None:
        self.longest = longest
        self.runs: list[int] = []

    def run_batch(
        self, parts: list[dict[str, np.ndarray]], rows: int, output_names: list[str]
    ) -> tuple[dict[str, np.ndarray], int]:
        ids = np.concatenate([part["ids"] for part in parts])
        self.runs.append(ids.shape[1])
        if ids.shape[1] > self.longest:
            raise RuntimeError(f"length {ids.shape[1]} is past the model's {self.longest}")
        return {"states": ids * 2}, 0


def items_of(*lengths: int) -> list[BatchItem]:
    return [
        BatchItem({"ids": np.full((1, n), n, np.int64)}, 1, ("states",), n) for n in lengths
    ]


def test_a_bucket_past_the_models_longest_sequence_costs_one_failed_run() -> None:
    """48 positions, power-of-two buckets: the batch padded to 64 fails, its requests run
    alone and are answered, and later batches stop at their longest request."""
    model = ShortModel(longest=48)
    padding = PaddingSettings(1, {"ids": 0}, LengthBuckets(), {"states": 1})
    executor = InstanceExecutor(model, padding=padding)
    first = executor.execute(items_of(40, 38), ["states"])
    assert [r["states"].shape for r in first.outputs] == [(1, 40), (1, 38)]  # type: ignore[index]
    assert model.runs == [64, 40, 38]
    second = executor.execute(items_of(45, 33), ["states"])
    assert model.runs[3:] == [45]  # one padded run, to the longest request
    assert second.outputs[1]["states"].tolist() == [[66] * 33]  # type: ignore[index]
    executor.execute(items_of(20, 30), ["states"])
    assert model.runs[4:] == [32]  # buckets below the failed length still apply


class FlakyModel(ShortModel):
    """A ShortModel whose next `failures` runs past `flaky_from` positions fail, as a
    device out of memory for a moment would."""

    def __init__(self, longest: int, flaky_from: int, failures: int) -> None:
        super().__init__(longest)
        self.flaky_from = flaky_from
        self.failures = failures

    def run_batch(
        self, parts: list[dict[str, np.ndarray]], rows: int, output_names: list[str]
    ) -> tuple[dict[str, np.ndarray], int]:
        length = parts[0]["ids"].shape[1]
        if self.failures and length >= self.flaky_from:
            self.failures -= 1
            self.runs.append(length)
            raise RuntimeError(f"out of memory at length {length}")
        return super().run_batch(parts, rows, output_names)


class Clock:
    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns


def test_a_bucket_that_failed_once_is_tried_again_after_a_while() -> None:
    """A padded batch that failed for a moment (the device short of memory) while its
    requests then ran alone must not turn bucketing off past that length for good: after
    BUCKET_RETRY_AFTER_S a batch is padded to the bucket again, and when it runs, the
    mark is gone."""
    model = FlakyModel(longest=128, flaky_from=64, failures=1)
    padding = PaddingSettings(1, {"ids": 0}, LengthBuckets(), {"states": 1})
    clock = Clock()
    executor = InstanceExecutor(model, padding=padding, timer=clock)
    executor.execute(items_of(40, 38), ["states"])
    assert model.runs == [64, 40, 38]  # failed padded, then each alone
    executor.execute(items_of(45, 33), ["states"])
    assert model.runs[3:] == [45]  # within the wait: to the longest request only
    clock.now_ns += int(BUCKET_RETRY_AFTER_S * 1e9)
    executor.execute(items_of(45, 33), ["states"])
    assert model.runs[4:] == [64]  # tried again, and it runs
    executor.execute(items_of(50, 35), ["states"])
    assert model.runs[5:] == [64]  # the bucket is back


def test_a_bucket_past_the_models_length_is_tried_again_ever_more_rarely() -> None:
    """A length the model can never take costs one failed run per try, and the waits
    between tries double, up to BUCKET_RETRY_MAX_S."""
    model = ShortModel(longest=48)
    padding = PaddingSettings(1, {"ids": 0}, LengthBuckets(), {"states": 1})
    clock = Clock()
    executor = InstanceExecutor(model, padding=padding, timer=clock)
    waits = []
    wait_s = BUCKET_RETRY_AFTER_S
    while wait_s <= BUCKET_RETRY_MAX_S:
        waits.append(wait_s)
        wait_s *= 2
    waits += [BUCKET_RETRY_MAX_S] * 2
    executor.execute(items_of(40, 38), ["states"])
    assert model.runs == [64, 40, 38]
    for wait in waits:
        clock.now_ns += int(wait * 1e9) - 1
        executor.execute(items_of(40, 38), ["states"])
        assert model.runs[-1] == 40, wait  # not yet
        clock.now_ns += 1
        executor.execute(items_of(40, 38), ["states"])
        assert model.runs[-3:] == [64, 40, 38], wait  # tried, failed, each alone


class MemoryCappedModel(ShortModel):
    """A ShortModel whose runs of more than `cap` elements are refused as past
    --max-run-memory (the runtime's TOO_LARGE)."""

    def __init__(self, cap: int) -> None:
        super().__init__(longest=1024)
        self.cap = cap

    def run_batch(
        self, parts: list[dict[str, np.ndarray]], rows: int, output_names: list[str]
    ) -> tuple[dict[str, np.ndarray], int]:
        ids = parts[0]["ids"]
        if ids.size > self.cap:
            self.runs.append(ids.shape[1])
            raise FerryError(ErrorKind.TOO_LARGE, "the run needs more than --max-run-memory")
        return super().run_batch(parts, rows, output_names)


def test_a_padded_batch_too_large_for_the_run_memory_teaches_nothing_of_its_length() -> None:
    """Two requests padded to 64 are over the memory cap together and fit alone: they are
    answered one at a time, and the bucket of 64 stays (the failure was the batch's
    size, not its length: concurrent large requests must not turn bucketing off)."""
    model = MemoryCappedModel(cap=100)
    padding = PaddingSettings(1, {"ids": 0}, LengthBuckets(), {"states": 1})
    executor = InstanceExecutor(model, padding=padding)
    first = executor.execute(items_of(40, 38), ["states"])
    assert [r["states"].shape for r in first.outputs] == [(1, 40), (1, 38)]  # type: ignore[index]
    assert model.runs == [64, 40, 38]
    executor.execute(items_of(45), ["states"])
    assert model.runs[3:] == [64]  # still padded to its bucket


def test_one_request_the_model_refuses_fails_alone_and_teaches_nothing() -> None:
    model = ShortModel(longest=64)
    padding = PaddingSettings(1, {"ids": 0}, LengthBuckets(), {"states": 1})
    executor = InstanceExecutor(model, padding=padding)
    batch = executor.execute(items_of(64, 65, 10), ["states"])
    good, bad, short = batch.outputs
    assert isinstance(bad, RuntimeError) and "length 65" in str(bad)
    assert good["states"].shape == (1, 64) and short["states"].shape == (1, 10)  # type: ignore[index]
    executor.execute(items_of(60, 50), ["states"])
    assert model.runs[-1] == 64  # the bucket of 64 still pads: it was not what failed


def test_requests_that_send_different_optional_inputs_have_different_keys() -> None:
    """A padded model with an optional input beside the padded one: a request that sends
    it and one that leaves it out must not share a batch (their inputs could not be
    stacked), so their shape keys differ, as in the unpadded key (`tensors.batch_key`)."""
    padding = PaddingSettings(1, {"ids": 0}, LengthBuckets())
    ids = np.zeros((1, 5), np.int64)
    extra = np.zeros((1, 3), np.float32)
    order = ["ids", "extra", "more"]
    with_extra = padding.request_key({"ids": ids, "extra": extra}, order)
    with_more = padding.request_key({"ids": ids, "more": extra}, order)
    alone = padding.request_key({"ids": ids}, order)
    assert len({with_extra, with_more, alone}) == 3, (with_extra, with_more, alone)
    longer = padding.request_key({"ids": np.zeros((1, 9)), "extra": extra}, order)
    assert longer[1] == with_extra[1]  # another length, the same group

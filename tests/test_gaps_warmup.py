"""Warm-up samples read from `<model>/warmup/<input_data_file>` (Triton's file data), and
the fills a config may ask for: what the instance is given, and how a file that cannot
serve fails the model's load (and only that model's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from ferry.server.errors import ErrorKind, FerryError
from ferry.server.executor import Runner
from ferry.server.warmup import WarmupInput, WarmupSample, sample_arrays
from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, write_config

StartServer = Callable[..., RunningServer]


def warm_model(root: Path, name: str, data_file: str, *, count: int = 1) -> Path:
    """An mlp (x FP32 [batch, 16]) whose one warm-up sample of 2 rows reads `data_file`."""
    mlp_model(root / name / "1" / "model.onnx")
    write_config(root / name, f"""
        max_batch_size: 4
        model_warmup [ {{ name: "w" batch_size: 2 count: {count} inputs {{ key: "x" value {{
            data_type: TYPE_FP32 dims: [ 16 ] input_data_file: "{data_file}" }} }} }} ]
    """)
    (root / name / "warmup").mkdir(exist_ok=True)
    return root / name / "warmup" / data_file


@pytest.fixture
def gates() -> Iterator[tuple[Callable[[str, Runner], Runner], dict[str, GatedInstance]]]:
    """A wrap_instance hook recording each model's runs (warm-up included), by model."""
    by_model: dict[str, GatedInstance] = {}

    def wrap(model: str, inner: Runner) -> Runner:
        by_model[model] = GatedInstance(inner)
        return by_model[model]

    yield wrap, by_model


def index(server: RunningServer) -> dict[str, tuple[str, str]]:
    with triton.InferenceServerClient(server.address) as client:
        models = client.get_model_repository_index(as_json=True)["models"]
    return {m["name"]: (m.get("state", ""), m.get("reason", "")) for m in models}


def test_a_warm_up_file_gives_every_row_its_values_little_endian(
    tmp_path: Path,
    start_server: StartServer,
    gates: tuple[Callable[[str, Runner], Runner], dict[str, GatedInstance]],
) -> None:
    """The file holds one row's values (little-endian FP32; bytes past them are
    ignored): each of the sample's 2 rows gets them, the sample runs `count` times
    before the model is ready."""
    values = np.arange(16, dtype=np.float32) - 7.5
    warm_model(tmp_path, "m", "x.bin", count=2).write_bytes(
        values.astype("<f4").tobytes() + b"trailing bytes"
    )
    wrap, by_model = gates
    server = start_server(tmp_path, wrap_instance=wrap)
    assert index(server)["m"][0] == "READY"
    runs = by_model["m"].batches
    assert len(runs) == 2
    for run in runs:
        np.testing.assert_array_equal(run["x"], np.stack([values, values]))


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        (np.arange(2, dtype="<f4").tobytes(),
         "warm-up input 'x': warmup/x.bin has 8 bytes, 64 needed for FP32 [16]"),
        (None, "warm-up input 'x': cannot read warmup/x.bin: No such file or directory"),
    ],
    ids=["short", "missing"],
)
def test_a_warm_up_file_that_cannot_serve_fails_that_model_only(
    tmp_path: Path,
    start_server: StartServer,
    gates: tuple[Callable[[str, Runner], Runner], dict[str, GatedInstance]],
    written: bytes | None,
    reason: str,
) -> None:
    """A data file too short for one row, or missing, fails the model's load with a
    reason naming the file and what was needed; the model never runs and is not
    served, while another model of the repository is."""
    path = warm_model(tmp_path, "bad", "x.bin")
    if written is not None:
        path.write_bytes(written)
    mlp_model(tmp_path / "good" / "1" / "model.onnx")
    wrap, by_model = gates
    server = start_server(tmp_path, wrap_instance=wrap)
    assert index(server) == {"bad": ("UNAVAILABLE", reason), "good": ("READY", "")}
    assert by_model["bad"].batches == []
    with triton.InferenceServerClient(server.address) as client:
        assert not client.is_model_ready("bad")
        assert not client.is_server_ready()  # a model of the start-up set failed
        tensor = triton.InferInput("x", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 16), np.float32))
        assert client.infer("good", [tensor]).as_numpy("probs").shape == (1, 4)


@pytest.mark.parametrize(
    ("datatype", "low", "high"),
    [("FP32", 0.0, 1.0), ("INT32", 0, 7), ("UINT8", 0, 7), ("BOOL", False, True)],
)
def test_random_warm_up_data_has_the_input_type_and_stays_in_range(
    datatype: str, low: object, high: object
) -> None:
    """random_data: floats in [0, 1), integers in [0, 8), booleans both ways; shaped as
    the batch (rows first) and the same every time (seeded), so a warm-up is repeatable."""
    sample = WarmupSample("r", 3, (("x", WarmupInput(datatype, (5,), "random")),))
    first = sample_arrays(sample)["x"]
    assert first.shape == (3, 5)
    assert first.dtype == np.dtype({"FP32": np.float32, "INT32": np.int32,
                                    "UINT8": np.uint8, "BOOL": np.bool_}[datatype])
    assert first.min() >= low and first.max() <= high  # type: ignore[operator]
    np.testing.assert_array_equal(sample_arrays(sample)["x"], first)


def test_bytes_warm_up_inputs_are_strings_of_the_sample_shape() -> None:
    """BYTES inputs are filled with strings: "" for zero data, "0" otherwise."""
    zero = WarmupSample("z", 2, (("s", WarmupInput("BYTES", (3,), "zero")),))
    random = WarmupSample("r", 0, (("s", WarmupInput("BYTES", (3,), "random")),))
    assert sample_arrays(zero)["s"].tolist() == [["", "", ""], ["", "", ""]]
    assert sample_arrays(random)["s"].tolist() == ["0", "0", "0"]


def test_a_file_sample_without_the_models_folder_is_refused() -> None:
    """File data is read from the model's folder: without one, the sample is refused
    INVALID_INPUT by input name rather than read from the working directory."""
    sample = WarmupSample("f", 1, (("x", WarmupInput("FP32", (4,), "file", "x.bin")),))
    with pytest.raises(FerryError) as caught:
        sample_arrays(sample)
    assert caught.value.kind is ErrorKind.INVALID_INPUT
    assert caught.value.message == "warm-up input 'x' needs its data file"

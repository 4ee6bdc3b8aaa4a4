"""A JSON answer that may pass `--max-message-size` is rendered a slice at a time and
refused as soon as it does: the same bytes as rendering it whole when it fits, and no
more memory than the limit when it does not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from ferry.proto import grpc_service_pb2 as pb
from ferry.server import rest_codec
from ferry.server.config import ModelSettings, TensorSpec
from ferry.server.errors import ErrorKind, FerryError
from ferry.server.rest_codec import (
    JSON_SLICE,
    RestRequest,
    encode_infer,
    json_ceiling,
    json_floor,
)
from tests.process import FerryProcess
from tests.test_answer_size_limits import json_body, rest_infer, tile_repository

MIB = 1024 * 1024
DATATYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT8": np.int8,
             "INT64": np.int64, "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_}


def outputs_of(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    outputs: dict[str, np.ndarray] = {}
    for datatype, dtype in DATATYPES.items():
        if datatype == "BYTES":
            words = [bytes(rng.integers(0, 256, rng.integers(0, 6)).astype(np.uint8))
                     for _ in range(count)]
            outputs[datatype] = np.array(words, dtype=object).reshape(count, 1)
        elif datatype == "BOOL":
            outputs[datatype] = rng.random((count, 1)) < 0.5
        elif np.dtype(dtype).kind == "f":
            reach = int(np.log10(np.finfo(dtype).max)) - 1  # no overflow to infinity
            scale = 10.0 ** rng.integers(-reach, reach, (count, 1))
            outputs[datatype] = (rng.standard_normal((count, 1)) * scale).astype(dtype)
        else:
            info = np.iinfo(dtype)
            outputs[datatype] = rng.integers(info.min, info.max, (count, 1), dtype=dtype,
                                             endpoint=True)
    return outputs


def settings_for(outputs: dict[str, np.ndarray]) -> ModelSettings:
    return ModelSettings(
        name="m",
        max_batch_size=0,
        inputs=(TensorSpec("x", "FP32", (-1,)),),
        outputs=tuple(TensorSpec(name, name, (-1, 1)) for name in outputs),
    )


@pytest.mark.parametrize("binary", [None, frozenset(), frozenset({"FP32", "BYTES"})],
                         ids=["all binary", "all json", "some binary"])
@pytest.mark.parametrize("count", [0, 3, JSON_SLICE + 5])
def test_sliced_rendering_writes_the_same_bytes(
    binary: frozenset[str] | None, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    outputs = outputs_of(np.random.default_rng(count), count)
    settings = settings_for(outputs)
    request = RestRequest(pb.ModelInferRequest(id="r\u00e9\"q"), binary, True)
    whole, whole_header = encode_infer(request, settings, "1", outputs)
    bounded = rest_codec._bounded_header
    calls: list[int] = []

    def counted(*args: Any) -> bytes:
        calls.append(1)
        return bounded(*args)

    monkeypatch.setattr(rest_codec, "_bounded_header", counted)
    sliced, sliced_header = encode_infer(request, settings, "1", outputs, len(whole))
    assert calls, "the answer was rendered whole"
    assert sliced == whole and sliced_header == whole_header
    with pytest.raises(FerryError) as refused:
        encode_infer(request, settings, "1", outputs, len(whole) - 1)
    assert refused.value.kind is ErrorKind.TOO_LARGE
    assert f"more than {len(whole) - 1} bytes" in refused.value.message
    if binary is not None and count:
        body = json.loads(whole[:whole_header] if whole_header else whole)
        assert [o["name"] for o in body["outputs"]] == list(outputs)


def test_the_ceiling_holds_every_element_orjson_writes() -> None:
    rng = np.random.default_rng(1)
    for name, array in outputs_of(rng, 5000).items():
        data = array.reshape(-1)
        if name == "BYTES":
            text = [e.decode("utf-8", "replace") for e in data.tolist()]
            rendered = orjson.dumps(text)
        else:
            rendered = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
        assert json_floor(array) <= len(rendered) <= json_ceiling(array), name
    extremes = {
        "FP32": [np.finfo(np.float32).min, -np.finfo(np.float32).tiny, np.nan],
        "FP64": [np.finfo(np.float64).min, -np.finfo(np.float64).tiny, -1.2345678901234567e-300],
        "INT64": [np.iinfo(np.int64).min], "UINT64": [np.iinfo(np.uint64).max],
        "FP16": [np.finfo(np.float16).min, -np.finfo(np.float16).tiny],
        "BYTES": [b"\x01\x02", "\u00e9".encode()],
    }
    for name, values in extremes.items():
        array = np.array(values, dtype=DATATYPES[name])
        data = [v.decode() if isinstance(v, bytes) else v for v in values] if name == "BYTES" \
            else array
        rendered = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
        assert len(rendered) <= json_ceiling(array), (name, rendered)


def test_a_json_answer_refused_while_rendered_takes_no_more_than_the_limit(
    tmp_path: Path,
) -> None:
    """16 Mi FP32 values (64 MiB of output) whose JSON text takes 11 bytes each, 176 MiB,
    against a limit of 80 MiB: over it, though the floor (4 bytes each, 64 MiB) fits.
    Rendered whole before the check, peak RSS rose by 236 MiB (measured); a slice at a
    time, 147 MiB."""
    repo = tile_repository(tmp_path / "repo")
    limit = 80 * MIB
    with FerryProcess(repo, "--max-message-size", str(limit), "--http-port", "0",
                      "--shutdown-grace", "0") as server:
        http_port = int(server.wait_for(r"REST binding on http://\S+:(\d+)")[0].group(1))
        address = f"127.0.0.1:{http_port}"
        status, _ = rest_infer(address, json_body(1, value=0.123456789))
        assert status == 200
        body = json_body(64, values=4, value=0.12345678)
        status, answer = rest_infer(address, json_body(2, values=4, value=0.12345678))
        assert status == 200, answer[:200]
        rss_before = server.status_value("VmRSS")
        server.reset_peak()
        status, answer = rest_infer(address, body)
        peak = server.status_value("VmHWM")
        assert status == 503, answer[:200]
        message = json.loads(answer)["error"]
        assert str(limit) in message and "binary_data_output" in message
        status, _ = rest_infer(address, json_body(1))
        assert status == 200
    rise = (peak - rss_before) * 1024
    output_bytes = 64 * 4 * 4 * 65536
    print(f"peak rise {rise / MIB:.0f} MiB for {output_bytes / MIB:.0f} MiB of output")
    # The model's output (64 MiB) and the text up to the limit (80 MiB), not 176 MiB of it.
    assert rise < output_bytes + limit + 24 * MIB, rise / MIB

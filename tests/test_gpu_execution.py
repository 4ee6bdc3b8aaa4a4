"""GPU execution, as far as a CPU can check it: batch buckets and padding, IO binding with
reused host buffers, execution-provider selection and the fallback to the CPU, warm-up
before ready, and their config settings."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from ferry.client import FerryClient
from ferry.server.binding import BindingPlan, BoundExecutor, bucket_for, pinned_allocator
from ferry.server.config import ConfigError, ModelSettings, read_config_file, settings_from
from ferry.server.errors import FerryError
from ferry.server.executor import Runner
from ferry.server.providers import GpuFallback, create_instances, placements
from ferry.server.repository import ModelControl, ModelControlMode
from ferry.server.runtime import OnnxInstance, SessionSettings, available_providers
from ferry.server.security import SecurityOptions
from ferry.server.signatures import GraphSignature, TensorSignature
from ferry.server.warmup import WarmupInput, WarmupSample, sample_arrays
from tests.conftest import GatedInstance, RunningServer
from tests.models import mlp_model, write_config
from tests.waiting import wait_until

StartServer = Callable[..., RunningServer]
OUTPUTS = ["logits", "probs"]
MLP_GRAPH = GraphSignature(
    inputs=(TensorSignature("x", "FP32", (-1, 16)),),
    outputs=(
        TensorSignature("logits", "FP32", (-1, 4)),
        TensorSignature("probs", "FP32", (-1, 4)),
    ),
)


def settings_of(text: str, graph: GraphSignature = MLP_GRAPH) -> ModelSettings:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.pbtxt"
        path.write_text(text)
        config, fields, warnings = read_config_file(path)
    return settings_from("m", graph, config, fields, warnings)


def rows_of(rng: np.random.Generator, sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal((n, 16)).astype(np.float32)} for n in sizes]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_model(tmp_path_factory.mktemp("mlp") / "model.onnx")


@pytest.fixture(scope="module")
def reference(mlp: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    session = ort.InferenceSession(str(mlp), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(OUTPUTS, session.run(OUTPUTS, {"x": x}), strict=True))

    return run


# Buckets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "padded"),
    [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (7, 8), (8, 8), (9, 16), (16, 16), (17, 32),
     (31, 32), (32, 32)],
)
def test_each_batch_size_pads_to_the_nearest_bucket(rows: int, padded: int) -> None:
    assert bucket_for(rows, (1, 2, 4, 8, 16, 32)) == padded


def test_without_buckets_or_past_the_largest_a_batch_keeps_its_size() -> None:
    assert bucket_for(5, ()) == 5
    assert bucket_for(40, (8, 32)) == 40


@pytest.mark.parametrize("rows", range(1, 17))
def test_padded_batches_give_the_unpadded_outputs_and_only_their_rows(
    mlp: Path, reference: Callable[[np.ndarray], dict[str, np.ndarray]], rows: int
) -> None:
    instance = OnnxInstance(mlp, SessionSettings(max_batch_size=16, batch_buckets=(4, 16)))
    parts = rows_of(np.random.default_rng(rows), [1] * rows)
    outputs, padded_rows = instance.run_batch(parts, rows, OUTPUTS)
    expected = reference(np.concatenate([p["x"] for p in parts]))
    assert padded_rows == bucket_for(rows, (4, 16)) - rows
    for name in OUTPUTS:
        assert outputs[name].shape == (rows, 4)  # the padding rows are not there
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-6)
    assert instance.counters is not None
    assert instance.counters.padded_rows == padded_rows


def test_padding_rows_are_zeros_whatever_ran_before(mlp: Path) -> None:
    """Padding is written every batch: a short batch after a full one does not rerun the
    full one's rows (which would leak one caller's data into another's batch)."""
    instance = OnnxInstance(mlp, SessionSettings(max_batch_size=8, batch_buckets=(8,)))
    rng = np.random.default_rng(3)
    instance.run_batch(rows_of(rng, [8]), 8, OUTPUTS)
    instance.run_batch(rows_of(rng, [1, 1]), 2, OUTPUTS)
    executor = instance._executor
    assert executor is not None
    (shape,) = executor._shapes.values()
    assert not shape.host["x"][2:].any()


# IO binding and buffer reuse ---------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        SessionSettings(max_batch_size=32, io_binding=True),
        SessionSettings(max_batch_size=32, batch_buckets=(1, 2, 4, 8, 16, 32)),
        # The GPU's way, on CPU OrtValues: outputs bound to buffers made once per shape.
        SessionSettings(max_batch_size=32, batch_buckets=(8, 32), preallocate_outputs=True),
    ],
    ids=["io-binding", "buckets", "preallocated-outputs"],
)
def test_host_buffers_are_reused_across_many_batches(
    mlp: Path,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    settings: SessionSettings,
) -> None:
    instance = OnnxInstance(mlp, settings)
    executor = instance._executor
    assert executor is not None and instance.counters is not None
    rng = np.random.default_rng(0)
    kept = []
    memory = None
    for index in range(200):
        sizes = [int(n) for n in rng.integers(1, 5, size=int(rng.integers(2, 9)))]
        parts = rows_of(rng, sizes)
        outputs, _ = instance.run_batch(parts, sum(sizes), OUTPUTS)
        if index < 20:
            kept.append((outputs, reference(np.concatenate([p["x"] for p in parts]))))
        if memory is None:
            memory = executor._host["x"].memory
        assert executor._host["x"].memory is memory  # the very same buffer every batch
    counters = instance.counters
    assert counters.batches == 200
    assert counters.host_allocations == 1
    # one binding per batch shape, not per batch
    assert counters.bindings <= (32 if not settings.batch_buckets else len(settings.batch_buckets))
    # Earlier results are the callers' own: later batches did not write into them.
    for outputs, expected in kept:
        for name in OUTPUTS:
            np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-6)


def test_the_gpu_plan_on_cpu_ortvalues(
    mlp: Path, reference: Callable[[np.ndarray], dict[str, np.ndarray]]
) -> None:
    """The GPU's path, with "cpu" for the device: gathered rows copied into OrtValues made
    once per shape, outputs preallocated, one graph id per shape; lone requests too."""
    session = ort.InferenceSession(str(mlp), providers=["CPUExecutionProvider"])
    plan = BindingPlan(device="cpu", max_rows=16, buckets=(4, 16), device_inputs=True,
                       preallocate_outputs=True, cuda_graphs=True)
    executor = BoundExecutor(session, ort, plan)
    rng = np.random.default_rng(5)
    kept = []
    for sizes in ([1], [4], [2, 1], [3, 3, 3], [16], [1, 2, 1], [4]):
        parts = rows_of(rng, sizes)
        outputs, padded_rows = executor.run(parts, sum(sizes), OUTPUTS)
        assert padded_rows == bucket_for(sum(sizes), (4, 16)) - sum(sizes)
        kept.append((outputs, reference(np.concatenate([p["x"] for p in parts]))))
    for outputs, expected in kept:
        for name in OUTPUTS:
            np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-6)
    counters = executor.counters
    assert (counters.bindings, counters.host_allocations, counters.direct_batches) == (2, 1, 0)
    assert counters.device_allocations == 2 * 3  # per shape: one input and two outputs
    graph_ids = {s.run_options.get_run_config_entry("gpu_graph_id") for s in
                 executor._shapes.values()}
    assert graph_ids == {"1", "2"}


def test_a_lone_request_is_bound_where_it_lies(mlp: Path) -> None:
    instance = OnnxInstance(mlp, SessionSettings(max_batch_size=8, io_binding=True))
    for _ in range(5):
        instance.run_batch(rows_of(np.random.default_rng(1), [3]), 3, OUTPUTS)
    assert instance.counters is not None
    assert instance.counters.direct_batches == 5
    assert instance.counters.host_allocations == 0


def test_the_cpu_uses_session_run_unless_asked(mlp: Path) -> None:
    assert OnnxInstance(mlp, SessionSettings(max_batch_size=8)).counters is None
    assert OnnxInstance(mlp, SessionSettings(max_batch_size=8, io_binding=True)).counters


def test_a_model_with_string_tensors_is_never_bound(tmp_path: Path) -> None:
    from tests.models import identity_model

    path = identity_model(tmp_path / "model.onnx", "BYTES")
    instance = OnnxInstance(path, SessionSettings(max_batch_size=8, io_binding=True))
    assert instance.counters is None
    text = np.array([["a", "b", "c", "d"]], dtype=object)
    assert instance.run({"INPUT0": text}, ["OUTPUT0"])["OUTPUT0"].tolist() == text.tolist()


def test_pinned_memory_falls_back_to_ordinary_memory_without_a_gpu() -> None:
    assert pinned_allocator("/nonexistent/libcudart.so.12") is None
    cudart = sorted(Path(__file__).resolve().parent.parent.glob(
        ".tools/perf-venv/lib/python*/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12"
    ))
    if cudart:  # a real CUDA runtime without a device: cudaHostAlloc fails, cleanly
        assert pinned_allocator(str(cudart[0])) is None


# Providers and the fallback to the CPU ---------------------------------------------


def test_gpu_groups_place_count_sessions_on_each_listed_gpu() -> None:
    settings = settings_of(
        "instance_group [ { kind: KIND_GPU count: 2 gpus: [ 0, 1 ] }, { kind: KIND_CPU } ]"
    )
    found = [(p.gpu, p.providers[0].name, p.providers[0].option("device_id")) for p in
             placements(settings.devices)]
    assert found == [
        (0, "CUDAExecutionProvider", "0"),
        (0, "CUDAExecutionProvider", "0"),
        (1, "CUDAExecutionProvider", "1"),
        (1, "CUDAExecutionProvider", "1"),
        (None, "CPUExecutionProvider", ""),
    ]
    assert placements(settings_of("instance_group [ { kind: KIND_GPU } ]").devices)[0].gpu == 0


def test_tensorrt_and_cuda_graphs_become_provider_options(tmp_path: Path) -> None:
    settings = settings_of(
        f"""
        max_batch_size: 16
        instance_group [ {{ kind: KIND_GPU gpus: [ 1 ] }} ]
        optimization {{
          cuda {{ graphs: true }}
          execution_accelerators {{ gpu_execution_accelerator [ {{
            name: "tensorrt"
            parameters {{ key: "precision_mode" value: "FP16" }}
            parameters {{ key: "trt_engine_cache_path" value: "{tmp_path}" }}
          }} ] }}
        }}
        """
    )
    (placement,) = placements(settings.devices)
    trt, cuda, cpu = placement.providers
    assert trt.name == "TensorrtExecutionProvider"
    assert dict(trt.options) == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path),
        "trt_cuda_graph_enable": "True",
    }
    assert dict(cuda.options) == {"device_id": "1", "enable_cuda_graph": "1"}
    assert cpu.name == "CPUExecutionProvider"
    # CUDA graphs and TensorRT want few shapes: the powers of two become the buckets.
    assert settings.batch_buckets == (1, 2, 4, 8, 16)
    assert [s.batch_size for s in settings.warmup] == [1, 2, 4, 8, 16]
    assert {s.count for s in settings.warmup} == {2}  # captured on the second run


def base_settings(settings: ModelSettings) -> SessionSettings:
    return SessionSettings(
        max_batch_size=settings.max_batch_size, batch_buckets=settings.batch_buckets
    )


def test_a_gpu_config_without_cuda_loads_on_the_cpu_with_one_warning(mlp: Path) -> None:
    assert "CUDAExecutionProvider" not in available_providers()  # this machine
    settings = settings_of("instance_group [ { kind: KIND_GPU count: 2 gpus: [ 0, 1 ] } ]")
    created = create_instances(
        mlp, settings.devices, base_settings(settings), GpuFallback.CPU, available_providers()
    )
    assert len(created.instances) == 4
    assert {i.device for i in created.instances} == {"cpu"}
    assert {i.providers for i in created.instances} == {("CPUExecutionProvider",)}
    (warning,) = created.warnings
    assert "GPU instances run on the CPU" in warning
    assert "no CUDAExecutionProvider" in warning and "ferry-inference[gpu]" in warning


def test_a_gpu_config_without_cuda_fails_with_gpu_fallback_fail(mlp: Path) -> None:
    settings = settings_of("instance_group [ { kind: KIND_GPU } ]")
    with pytest.raises(FerryError, match="asks for a GPU but this onnxruntime has no CUDA"):
        create_instances(
        mlp, settings.devices, base_settings(settings), GpuFallback.FAIL, ("CPU",))


def test_a_cuda_provider_that_does_not_start_falls_back_to_the_cpu(mlp: Path) -> None:
    """onnxruntime carries on without a provider that fails; Ferry notices and says so.
    (Here the provider is claimed available but is not: the session runs on the CPU.)"""
    settings = settings_of(
        """
        max_batch_size: 8
        instance_group [ { kind: KIND_GPU count: 2 } ]
        optimization { cuda { graphs: true } }
        """
    )
    claimed = ("CUDAExecutionProvider", "CPUExecutionProvider")
    created = create_instances(
        mlp, settings.devices, base_settings(settings), GpuFallback.CPU, claimed)
    assert [i.device for i in created.instances] == ["cpu", "cpu"]
    (warning,) = created.warnings
    assert "CUDAExecutionProvider did not start on GPU 0" in warning
    assert created.instances[0].binding_plan is not None
    assert not created.instances[0].binding_plan.cuda_graphs
    with pytest.raises(FerryError, match=r"did not start on GPU 0.*--gpu-fallback fail"):
        create_instances(
        mlp, settings.devices, base_settings(settings), GpuFallback.FAIL, claimed)


def test_tensorrt_without_its_provider_warns_or_fails(mlp: Path) -> None:
    settings = settings_of(
        """
        instance_group [ { kind: KIND_GPU } ]
        optimization { execution_accelerators { gpu_execution_accelerator [
          { name: "tensorrt" } ] } }
        """
    )
    claimed = ("CUDAExecutionProvider", "CPUExecutionProvider")
    created = create_instances(
        mlp, settings.devices, base_settings(settings), GpuFallback.CPU, claimed)
    assert any("TensorRT is not used" in w for w in created.warnings)
    with pytest.raises(FerryError, match="asks for TensorRT"):
        create_instances(
        mlp, settings.devices, base_settings(settings), GpuFallback.FAIL, claimed)


def test_kind_cpu_stays_on_the_cpu_without_a_warning(mlp: Path) -> None:
    settings = settings_of("instance_group [ { kind: KIND_CPU count: 2 } ]")
    created = create_instances(
        mlp, settings.devices, base_settings(settings), GpuFallback.FAIL, ())
    assert [i.device for i in created.instances] == ["cpu", "cpu"]
    assert created.warnings == []


# Config -------------------------------------------------------------------------------


def test_batch_buckets_parameter() -> None:
    settings = settings_of(
        'max_batch_size: 32 parameters { key: "batch_buckets" value { string_value: "8, 1,4" } }'
    )
    assert settings.batch_buckets == (1, 4, 8, 32)  # max_batch_size always closes the list
    assert settings.to_proto().parameters["batch_buckets"].string_value == "1,4,8,32"
    assert [s.batch_size for s in settings.warmup] == [1, 4, 8, 32]
    assert settings_of("max_batch_size: 8").batch_buckets == ()


def test_preferred_sizes_become_the_buckets_of_cuda_graphs() -> None:
    settings = settings_of(
        "max_batch_size: 16 dynamic_batching { preferred_batch_size: [ 4, 8 ] } "
        "optimization { cuda { graphs: true } }"
    )
    assert settings.batch_buckets == (4, 8, 16)
    assert settings.to_proto().optimization.cuda.graphs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('max_batch_size: 8 parameters { key: "batch_buckets" value { string_value: "2,x" } }',
         "batch sizes separated by commas"),
        ('max_batch_size: 8 parameters { key: "batch_buckets" value { string_value: "0,16" } }',
         r"sizes \[0, 16\] are outside 1..8"),
        ('max_batch_size: 0 parameters { key: "batch_buckets" value { string_value: "2" } }',
         "needs a model that batches"),
        ('parameters { key: "io_binding" value { string_value: "maybe" } }',
         "io_binding must be true or false"),
        ("optimization { execution_accelerators { gpu_execution_accelerator [ { name: "
         '"tensorrt" parameters { key: "precision_mode" value: "INT4" } } ] } }',
         "precision_mode must be FP32 or FP16"),
        ('max_batch_size: 4 model_warmup [ { name: "w" batch_size: 8 inputs { key: "x" '
         "value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } } } ]",
         "batch_size 8 is over max_batch_size 4"),
        ('model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" '
         "value { data_type: TYPE_INT32 dims: [ 16 ] zero_data: true } } } ]",
         "is TYPE_INT32, but the model takes TYPE_FP32"),
        ('model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" '
         "value { data_type: TYPE_FP32 dims: [ 15 ] zero_data: true } } } ]",
         r"dims \[15\], which do not fit \[16\]"),
        ('model_warmup [ { name: "w" batch_size: 1 } ]', "leaves out inputs x"),
        ('model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value { data_type: '
         'TYPE_FP32 dims: [ 16 ] input_data_file: "../secret" } } } ]',
         "must name a file in the model's warmup folder"),
        ("instance_group [ { kind: KIND_MODEL } ]", "KIND_MODEL is not supported"),
    ],
)
def test_bad_gpu_settings_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_of(text)


def test_model_warmup_entries_are_read_and_written_back() -> None:
    settings = settings_of(
        """
        max_batch_size: 8
        model_warmup [
          { name: "zeros" batch_size: 4 count: 3
            inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } } },
          { name: "noise" batch_size: 2
            inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 16 ] random_data: true } } }
        ]
        """
    )
    zeros, noise = settings.warmup
    assert (zeros.name, zeros.batch_size, zeros.count) == ("zeros", 4, 3)
    assert zeros.inputs == (("x", WarmupInput("FP32", (16,), "zero")),)
    assert noise.inputs[0][1].fill == "random" and noise.count == 1
    again = settings_of(text_format.MessageToString(settings.to_proto()))
    assert again.warmup == settings.warmup


def test_warmup_data_zero_random_and_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    values = np.arange(16, dtype=np.float32)
    (tmp_path / "warmup" / "x.bin").write_bytes(values.tobytes())

    def sample(spec: WarmupInput) -> np.ndarray:
        return sample_arrays(WarmupSample("s", 3, (("x", spec),)), tmp_path)["x"]

    assert not sample(WarmupInput("FP32", (16,))).any()
    noise = sample(WarmupInput("FP32", (16,), "random"))
    assert noise.shape == (3, 16) and noise.dtype == np.float32 and noise.any()
    from_file = sample(WarmupInput("FP32", (16,), "file", "x.bin"))
    assert from_file.shape == (3, 16) and (from_file == values).all()
    with pytest.raises(FerryError, match="has 64 bytes, 128 needed"):
        sample(WarmupInput("FP64", (16,), "file", "x.bin"))


# Through the server -------------------------------------------------------------------


def test_a_gpu_model_serves_on_the_cpu_with_the_warning(
    tmp_path: Path,
    mlp: Path,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(mlp.read_bytes())
    write_config(tmp_path / "m", "max_batch_size: 8\ninstance_group [ { kind: KIND_GPU } ]\n")
    with caplog.at_level(logging.WARNING, logger="ferry"):
        server = start_server(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "run on the CPU" in r.getMessage()]
    assert len(warnings) == 1 and "model 'm'" in warnings[0]
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    with FerryClient(server.address) as client:
        got = client.infer("m", {"x": x})
    np.testing.assert_allclose(got["probs"], reference(x)["probs"], rtol=1e-5, atol=1e-6)


def test_gpu_fallback_fail_refuses_to_load_a_gpu_model(
    tmp_path: Path, mlp: Path, start_server: StartServer
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(mlp.read_bytes())
    write_config(tmp_path / "m", "instance_group [ { kind: KIND_GPU } ]\n")
    server = start_server(tmp_path, gpu_fallback=GpuFallback.FAIL)
    with FerryClient(server.address) as client:
        assert not client.is_model_ready("m")
    (entry,) = server.server.manager.index()
    assert "asks for a GPU" in entry.reason and "--gpu-fallback fail" in entry.reason


def test_padded_rows_never_reach_a_caller_and_are_counted(
    tmp_path: Path,
    mlp: Path,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    start_server: StartServer,
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(mlp.read_bytes())
    write_config(
        tmp_path / "m",
        'max_batch_size: 8\nparameters { key: "batch_buckets" value { string_value: "4" } }\n',
    )
    server = start_server(tmp_path)
    rng = np.random.default_rng(4)
    sent = 0
    with FerryClient(server.address) as client:
        for rows in (1, 3, 5, 8):  # padded to 4, 4, 8, 8
            x = rng.standard_normal((rows, 16)).astype(np.float32)
            got = client.infer("m", {"x": x})
            sent += rows
            for name in OUTPUTS:
                assert got[name].shape == (rows, 4)
                np.testing.assert_allclose(got[name], reference(x)[name], rtol=1e-5, atol=1e-6)
    text = server.server.metrics.render().decode()
    assert 'ferry_padded_rows_total{model="m"} 7.0' in text
    assert f'ferry_inferences_total{{model="m"}} {float(sent)}' in text


class HeldWarmup(GatedInstance):
    """Holds every run until released, from the first one: the warm-up runs."""

    def __init__(self, inner: Runner) -> None:
        super().__init__(inner)
        self.hold()


def test_model_ready_is_false_until_warm_up_has_finished(
    tmp_path: Path, mlp: Path, start_server: StartServer
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(mlp.read_bytes())
    write_config(
        tmp_path / "m",
        'max_batch_size: 8\nparameters { key: "batch_buckets" value { string_value: "2,4" } }\n'
        "instance_group [ { count: 2 } ]\n",
    )
    held: list[HeldWarmup] = []

    def wrap(model: str, inner: Runner) -> HeldWarmup:
        gate = HeldWarmup(inner)
        held.append(gate)
        return gate

    explicit = SecurityOptions(model_control=ModelControl(ModelControlMode.EXPLICIT, ()))
    server = start_server(tmp_path, wrap_instance=wrap, security=explicit)
    loading = asyncio.run_coroutine_threadsafe(server.server.manager.load("m"), server.loop)
    wait_until(lambda: len(held) == 2, what="the instances to be made")
    for gate in held:
        assert gate.entered.acquire(timeout=30), "warm-up never started"
    with FerryClient(server.address) as client:
        assert not client.is_model_ready("m")  # warm-up is running, and held
        assert not loading.done()
        for gate in held:
            gate.release()
        loading.result(30)
        assert client.is_model_ready("m")
    # Each instance ran every bucket once, before the model was ready.
    assert [sorted(g.batch_rows) for g in held] == [[2, 4, 8], [2, 4, 8]]


def test_model_warmup_from_the_config_runs_on_every_instance(
    tmp_path: Path, mlp: Path, start_server: StartServer
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(mlp.read_bytes())
    write_config(
        tmp_path / "m",
        """
        max_batch_size: 8
        instance_group [ { count: 2 } ]
        model_warmup [ { name: "w" batch_size: 3 count: 2
          inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 16 ] random_data: true } } } ]
        """,
    )
    seen: list[GatedInstance] = []

    def wrap(model: str, inner: Runner) -> GatedInstance:
        seen.append(GatedInstance(inner))
        return seen[-1]

    start_server(tmp_path, wrap_instance=wrap)
    assert [g.batch_rows for g in seen] == [[3, 3], [3, 3]]


def test_a_failing_warm_up_fails_the_load(
    tmp_path: Path, mlp: Path, start_server: StartServer
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(mlp.read_bytes())
    write_config(
        tmp_path / "m",
        """
        max_batch_size: 8
        model_warmup [ { name: "from-file" batch_size: 1
          inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 16 ]
                                    input_data_file: "missing.bin" } } } ]
        """,
    )
    server = start_server(tmp_path)
    (entry,) = server.server.manager.index()
    assert "warmup/missing.bin" in entry.reason



def test_gpu_fallback_flag_and_option(tmp_path: Path) -> None:
    from ferry.server.app import ServerOptions
    from ferry.server.cli import build_parser

    args = build_parser().parse_args(["serve", str(tmp_path), "--gpu-fallback", "fail"])
    assert args.gpu_fallback == "fail"
    assert build_parser().parse_args(["serve", str(tmp_path)]).gpu_fallback == "cpu"
    with pytest.raises(ValueError, match="gpu fallback must be one of cpu, fail"):
        ServerOptions(model_path=tmp_path, gpu_fallback="gpu")

"""The runtime: onnxruntime sessions that turn input arrays into output arrays.

Knows nothing of requests, batching or gRPC. One `OnnxInstance` is one session, used by
one worker thread at a time; its execution providers come from `server.providers`, its
IO binding and shape buckets from `server.binding`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from .binding import BindingCounters, BindingPlan, BoundExecutor, bindable
from .errors import ErrorKind, FerryError
from .rows import gather
from .signatures import datatype_of_runtime_type, stored_bytes

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "Ferry needs an ONNX Runtime: install 'ferry-inference[cpu]' (onnxruntime) on a "
        "CPU machine or 'ferry-inference[gpu]' (onnxruntime-gpu) on an NVIDIA GPU machine"
    ) from exc

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]
_T = TypeVar("_T")

@dataclass(frozen=True, slots=True)
class ExecutionProvider:
    """An onnxruntime execution provider and its options (all values as text)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str, default: str = "") -> str:
        return dict(self.options).get(key, default)


CPU_PROVIDER = ExecutionProvider("CPUExecutionProvider")
# Providers that put a session on an NVIDIA GPU.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """How each session is built and fed. Thread counts of 0 let onnxruntime choose.

    With `max_batch_size` > 0 and IO binding or buckets on, batches go through
    `server.binding`: host buffers sized for `max_batch_size` rows, padded up to the
    nearest of `batch_buckets`.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization_level: int = 99  # onnxruntime's ORT_ENABLE_ALL
    # onnxruntime's intra-op threads spin while they wait for work by default; in a server
    # that spinning takes the cores the gRPC event loop needs (measured: about 20% fewer
    # requests per second on 2 cores with a small model), so it is off unless asked for.
    allow_spinning: bool = False
    providers: tuple[ExecutionProvider, ...] = (CPU_PROVIDER,)
    max_batch_size: int = 0
    # None: on a GPU only. On the CPU, IO binding measured about 1.5 us slower per batch
    # than session.run for a small model (benchmarks/README.md), so it is opt-in there.
    io_binding: bool | None = None
    batch_buckets: tuple[int, ...] = ()
    preallocate_outputs: bool | None = None  # None: on a GPU only
    cuda_graphs: bool = False
    # The working memory (intermediate and output tensors) that the runs of every CPU
    # session of the process may hold together, in bytes; 0: no limit. Weights are not
    # counted. See `_share_run_memory`.
    max_run_memory: int = 0

    def __post_init__(self) -> None:
        if list(self.batch_buckets) != sorted(set(self.batch_buckets)) or any(
            b < 1 for b in self.batch_buckets
        ):
            raise ValueError(
                f"batch buckets must be distinct positive sizes in ascending order, "
                f"got {list(self.batch_buckets)}"
            )


def available_providers() -> tuple[str, ...]:
    """The execution providers this onnxruntime build has."""
    return tuple(ort.get_available_providers())


def default_max_run_memory() -> int:
    """Three quarters of the memory this process may have: the machine's, or its
    cgroup's limit when lower. What a run may not take, the rest of the server keeps."""
    return _memory_bytes() * 3 // 4


def _memory_bytes(root: Path = Path("/")) -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in _cgroup_limit_files(root):
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # cgroup v2's "max": none
            total = min(total, int(text))
    return total


def _cgroup_limit_files(root: Path) -> list[Path]:
    """The memory limits of this process's cgroup and of each one above it (a limit on a
    parent holds too: a systemd slice, a pod), cgroup v2's and v1's. /sys/fs/cgroup's own
    files are the root cgroup's: a container's only when it has a cgroup namespace."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    files = []
    for line in lines:  # "0::/system.slice/x.service" (v2), "4:memory:/docker/id" (v1)
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if not controllers:
            base, name = root / "sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [part for part in path.split("/") if part]
        if ".." in parts:  # a cgroup outside this namespace: its root is all there is
            parts = []
        files += [base.joinpath(*parts[:depth], name) for depth in range(len(parts) + 1)]
    return files


# The limit of the arena that CPU sessions created from now on share (None: none yet).
_shared_run_memory: int | None = None
_shared_run_memory_lock = threading.RLock()


def _share_run_memory(limit: int) -> None:
    """Register onnxruntime's shared CPU arena, capped at `limit` bytes, for the sessions
    created after it (a session keeps the arena it was created with). A run that would
    take the arena past its cap fails at that allocation, before the memory is touched,
    instead of growing the process until the kernel kills it (a model whose output size
    is an input value: Range, Expand, ConstantOfShape)."""
    global _shared_run_memory
    with _shared_run_memory_lock:
        if _shared_run_memory == limit:
            return
        ort.create_and_register_allocator(
            ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            ),
            ort.OrtArenaCfg({"max_mem": limit}),
        )
        _shared_run_memory = limit
        # The arena never gives back its first region, shrunk or not, and the first
        # allocation sizes it: a tiny one now, before any session on it can run, or a
        # first run of half the cap would keep half for good.
        _free_run_memory()


# A one-value session on the shared arena whose runs give its wholly free regions back.
_arena_shrinker: tuple[ort.InferenceSession, ort.RunOptions] | None = None
# The IO-binding executors on the shared arena, whose bindings hold their last outputs.
_capped_executors: weakref.WeakSet[BoundExecutor] = weakref.WeakSet()


def _may_fit_after_freeing(exc: Exception, memory_limit: int) -> bool:
    """Did a run fail for want of room in the capped arena, asking for no more than the
    cap (a run asking for more is refused at once, however empty the arena)?"""
    full = _ARENA_FULL.search(str(exc)) if memory_limit else None
    return full is not None and int(full.group(2)) <= memory_limit


def _free_run_memory() -> None:
    """Give back to the system the regions of the shared CPU arena that no run holds
    (onnxruntime shrinks an arena at the end of a run that asks for it)."""
    global _arena_shrinker
    with _shared_run_memory_lock:
        if _arena_shrinker is None:
            from onnx import TensorProto, helper

            graph = helper.make_graph(
                [helper.make_node("Identity", ["x"], ["y"])], "shrink",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
            model.ir_version = 8
            options = ort.SessionOptions()
            options.add_session_config_entry("session.use_env_allocators", "1")
            options.log_severity_level = 4
            session = ort.InferenceSession(
                model.SerializeToString(), options, providers=[CPU_PROVIDER.name]
            )
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
            _arena_shrinker = (session, run_options)
        session, run_options = _arena_shrinker
    session.run(None, {"x": np.zeros(1, np.float32)}, run_options)


# An output over this share of --max-run-memory is copied out of the capped arena as soon
# as its run ends (see _out_of_the_arena).
ARENA_COPY_SHARE = 16


def _out_of_the_arena(values: list[Array], memory_limit: int) -> list[Array]:
    """The outputs of a run, the large ones copied: onnxruntime hands outputs over as
    views of the arena, which would hold their place in --max-run-memory until the answer
    is encoded and let go, while the next runs have started (8 callers of 48 MiB runs
    against a 64 MiB cap: 3 answered). A copy of an output over 1/ARENA_COPY_SHARE of the
    cap (with the default cap on a 24 GiB machine, over 1.1 GiB) costs far less than
    refusing the next callers. Outputs that are not arrays (sequences, maps) stay."""
    large = memory_limit // ARENA_COPY_SHARE
    for value in values:  # a loop, not all(): this runs after every run
        if getattr(value, "nbytes", 0) > large:
            break
    else:
        return values
    return [
        value.copy() if isinstance(value, np.ndarray) and value.nbytes > large else value
        for value in values
    ]


def usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_intra_op_threads(instances: int, processes: int = 1) -> int:
    """Threads per session: the cores split between the server processes and each one's
    instances, at least one each.

    Measured on 2 cores with the load generator beside it (benchmarks/README.md): one
    thread instead of two gave a lower p99 at concurrency 64 on a compute-bound MLP, but
    a 50% slower single request (2.4 against 1.6 ms), so the default keeps every core
    and `--session-threads 1` is the choice for a server that is always busy.
    """
    return max(1, usable_cores() // (max(1, instances) * max(1, processes)))


# Models bigger than this (external data files counted) are not calibrated: a second
# session would cost their load time and memory again, and a model that size gains from
# every thread anyway.
CALIBRATION_MAX_FILE_BYTES = 64 * 1024 * 1024
CALIBRATION_BUDGET_NS = 100_000_000  # per sample and candidate
# One thread wins when it is within this factor of the pool (see calibrated_intra_op_threads).
CALIBRATION_TOLERANCE = 1.2


def calibrated_intra_op_threads(
    model_file: Path,
    base: SessionSettings,
    samples: Sequence[Mapping[str, Array]],
    output_names: Sequence[str],
    runs: int = 15,
    timer: Callable[[], int] = time.perf_counter_ns,
    cpu_timer: Callable[[], int] = time.process_time_ns,
) -> int:
    """`base.intra_op_threads`, or 1 where one thread serves the model as well.

    One thread wins when a lone request (the first sample) runs about as fast on it as on
    the pool (the best of `runs` wall times), and no sample costs more CPU on it (the best
    of `runs`, every thread of the process counted). A busy server has no idle core for
    the pool: there a batch's CPU is what counts, and waking the pool's threads costs CPU
    the event loop needs. An idle server runs one request at a time: there the lone
    request's latency is what counts, so a model whose lone request gains from the pool
    keeps it. Measured on 2 cores: an MLP of 256x256 ran a lone request in 8.9 us on one
    thread against 10.7 us on two, and a batch of 32 at 48 against 66 us of CPU (34 us
    against 47 us of wall time on the pool, which the earlier wall-time rule chose it
    for); served at concurrency 64, one thread cost 341 against 400 us of CPU per request.
    A 4-layer MLP of 2048 runs a lone request in 1.45 ms on one thread against 0.57 ms on
    two (best of 15 runs in a row), and keeps both.
    """
    threads = base.intra_op_threads
    if (
        threads <= 1
        or not samples
        or stored_bytes(model_file, CALIBRATION_MAX_FILE_BYTES) > CALIBRATION_MAX_FILE_BYTES
    ):
        return threads
    measured: dict[int, list[tuple[int, int]]] = {}
    try:
        for candidate in (threads, 1):
            instance = OnnxInstance(
                model_file, dataclasses.replace(base, intra_op_threads=candidate)
            )
            measured[candidate] = [
                _measure_runs(instance, sample, output_names, runs, timer, cpu_timer)
                for sample in samples
            ]
    except FerryError as exc:  # the load itself reports what is wrong with the model
        log.debug("not calibrating the threads of %s: %s", model_file.name, exc.message)
        return threads
    single, pool = measured[1], measured[threads]
    lone_as_fast = single[0][0] <= pool[0][0] * CALIBRATION_TOLERANCE
    no_more_cpu = all(
        s[1] <= p[1] * CALIBRATION_TOLERANCE for s, p in zip(single, pool, strict=True)
    )
    return 1 if lone_as_fast and no_more_cpu else threads


def _measure_runs(
    instance: OnnxInstance,
    inputs: Mapping[str, Array],
    output_names: Sequence[str],
    runs: int,
    timer: Callable[[], int],
    cpu_timer: Callable[[], int],
) -> tuple[int, int]:
    """The best wall time and the best CPU time (every thread) of `runs` runs: the best,
    so that whatever else the machine does shows as noise, not as a preference."""
    instance.run(inputs, output_names)  # the first run allocates
    best_wall = best_cpu = None
    spent = 0
    for _ in range(runs):
        cpu_start = cpu_timer()
        start = timer()
        instance.run(inputs, output_names)
        elapsed = timer() - start
        cpu = cpu_timer() - cpu_start
        best_wall = elapsed if best_wall is None else min(best_wall, elapsed)
        best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
        spent += elapsed
        if spent > CALIBRATION_BUDGET_NS:  # a slow model: a few runs tell enough
            break
    assert best_wall is not None and best_cpu is not None
    return best_wall, best_cpu


class OnnxInstance:
    """One onnxruntime session of a model file."""

    # run() only computes, so a short batch may run on the event loop (scheduler.py).
    may_run_on_loop = True

    def __init__(self, model_path: Path, settings: SessionSettings) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0"
        )
        options.graph_optimization_level = ort.GraphOptimizationLevel(
            _optimization_level(settings.graph_optimization_level)
        )
        # Fatal only: Ferry reports load and run errors itself, and its log of refused
        # requests is rate-limited, where onnxruntime would write a line per failed run.
        options.log_severity_level = 4
        # On a GPU, onnxruntime's own gpu_mem_limit applies instead.
        self._memory_limit = settings.max_run_memory if all(
            p.name == CPU_PROVIDER.name for p in settings.providers
        ) else 0
        if self._memory_limit:
            _share_run_memory(self._memory_limit)
            options.add_session_config_entry("session.use_env_allocators", "1")
        providers = [(p.name, dict(p.options)) for p in settings.providers]
        try:
            with warnings.catch_warnings():
                # onnxruntime warns of a provider it lacks and carries on without it;
                # Ferry compares the providers it got with those it asked for instead.
                warnings.simplefilter("ignore")
                self.session = ort.InferenceSession(
                    str(model_path), sess_options=options, providers=providers
                )
        except Exception as exc:  # onnxruntime's own exception types, one per failure
            # The caller may see this message: name the file, not where it lives.
            reason = _load_reason(_first_line(exc).replace(str(model_path), model_path.name))
            raise FerryError(
                ErrorKind.INVALID_INPUT, f"onnxruntime cannot load {model_path.name}: {reason}"
            ) from exc
        self.settings = settings
        # What onnxruntime actually started, which may be less than was asked for.
        self.providers: tuple[str, ...] = tuple(self.session.get_providers())
        gpu = next(
            (p for p in settings.providers if p.name in GPU_PROVIDERS and p.name in self.providers),
            None,
        )
        self.device = "cuda" if gpu is not None else "cpu"
        self.device_id = int(gpu.option("device_id", "0")) if gpu is not None else 0
        self._executor: BoundExecutor | None = None
        types = [arg.type for arg in (*self.session.get_inputs(), *self.session.get_outputs())]
        datatypes = [datatype_of_runtime_type(name) for name in types]
        on_gpu = self.device != "cpu"
        # Buckets need the host buffers to pad in, whatever io_binding says.
        wants_binding = bool(settings.batch_buckets) or (
            on_gpu if settings.io_binding is None else settings.io_binding
        )
        if settings.max_batch_size > 0 and wants_binding and bindable(datatypes):
            preallocate = settings.preallocate_outputs
            plan = BindingPlan(
                device=self.device,
                device_id=self.device_id,
                max_rows=max(settings.max_batch_size, *settings.batch_buckets, 1),
                buckets=settings.batch_buckets,
                device_inputs=on_gpu,
                preallocate_outputs=on_gpu if preallocate is None else preallocate,
                cuda_graphs=settings.cuda_graphs and on_gpu,
                pinned=on_gpu,
            )
            self._executor = BoundExecutor(self.session, ort, plan)
            if self._memory_limit:
                with _shared_run_memory_lock:
                    _capped_executors.add(self._executor)

    @property
    def counters(self) -> BindingCounters | None:
        """The IO-binding executor's counters; None when batches use plain session.run."""
        return self._executor.counters if self._executor is not None else None

    @property
    def binding_plan(self) -> BindingPlan | None:
        return self._executor.plan if self._executor is not None else None

    def run(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> dict[str, Array]:
        if self._executor is not None:
            rows = len(next(iter(inputs.values())))
            return self.run_batch([inputs], rows, output_names)[0]
        names = output_names if isinstance(output_names, list) else list(output_names)
        feeds = inputs if isinstance(inputs, dict) else dict(inputs)
        try:
            values = self._with_room(self.session.run, names, feeds)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
            raise _run_error(exc, self._memory_limit) from exc
        if self._memory_limit:
            values = _out_of_the_arena(values, self._memory_limit)
        return dict(zip(output_names, values, strict=True))

    def run_batch(
        self, parts: Sequence[Mapping[str, Array]], rows: int, output_names: Sequence[str]
    ) -> tuple[dict[str, Array], int]:
        """Run the requests' inputs (same non-batch dimensions) as one batch of `rows`
        rows: the outputs, `rows` long, and the padding rows that ran and were dropped."""
        if self._executor is None:
            return self.run(gather(parts), output_names), 0
        try:
            return self._with_room(self._executor.run, parts, rows, output_names)
        except FerryError:
            raise
        except Exception as exc:  # onnxruntime's exceptions, or a buffer that does not fit
            raise _run_error(exc, self._memory_limit) from exc

    def _with_room(self, run: Callable[..., _T], *args: Any) -> _T:
        """`run(*args)`, tried once more if it found no room in the capped arena though
        it asks for no more than the cap: the arena cannot join its free regions, so
        after runs of growing sizes it may hold the whole cap in regions no larger run
        fits. The free ones are given back first."""
        try:
            return run(*args)
        except FerryError:
            raise
        except Exception as exc:
            if not _may_fit_after_freeing(exc, self._memory_limit):
                raise
            with _shared_run_memory_lock:  # not while a load adds one
                executors = list(_capped_executors)
            for executor in executors:
                executor.forget_bindings()
            _free_run_memory()
            return run(*args)


def _optimization_level(level: int) -> int:
    """Map Triton's graph level (-1, 0, 1, 2...) or onnxruntime's (0, 1, 2, 99)."""
    if level < 0:
        return 0  # disabled
    return {0: 99, 1: 1, 2: 2}.get(level, 99)


# onnxruntime's messages name the C++ function that failed, with its source path and
# signature: "...failed:/onnxruntime_src/.../model.cc:256 onnxruntime::Model::Model(...)
# Unsupported model IR version: 14, max supported IR version: 13".
_SOURCE_LOCATION = re.compile(r"/onnxruntime_src/\S+:\d+ (?:[\w:~<>]+\(.*?\) )?")
# Some name the function alone: "failed:void onnxruntime::model_load_utils::
# ValidateOpsetForDomain(const std::unordered_map<...>&, ...) ONNX Runtime only...".
_SIGNATURE = re.compile(r"(?:\w+ )?onnxruntime::[\w:~<>]+\([^()]*\) ")
_IR_VERSION = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
_UNKNOWN_OPERATOR = re.compile(r"(\S+?)(?:\(-?\d+\))? is not a registered function/op")


def _load_reason(reason: str) -> str:
    """onnxruntime's reason without its source location, and for the commonest trap (an
    onnx newer than the onnxruntime: its default IR version is too new), what to do."""
    reason = _SIGNATURE.sub("", _SOURCE_LOCATION.sub("", reason))
    unknown = _UNKNOWN_OPERATOR.search(reason)
    if unknown is not None:
        reason += (
            "; Ferry loads no custom-operator libraries: export the model with standard "
            f"ONNX operators in place of {unknown.group(1)}"
        )
    too_new = _IR_VERSION.search(reason)
    if too_new is not None:
        reason += (
            f"; save the model with IR version {too_new.group(2)} or lower "
            f"(onnx.helper.make_model(..., ir_version={too_new.group(2)}), or set "
            "model.ir_version before onnx.save)"
        )
    return reason


# What onnxruntime's Python binding says of a run without one of the graph's inputs.
_MISSING_INPUTS = re.compile(r"Required inputs \(\[(.*?)\]\) are missing")
# What onnxruntime's capped arena says when a run's allocation does not fit.
_ARENA_FULL = re.compile(r"Available memory of (\d+) is smaller than requested bytes of (\d+)")


def _run_error(exc: Exception, memory_limit: int = 0) -> FerryError:
    """A failed run, for its callers. onnxruntime's InvalidArgument from a run whose inputs
    passed validation comes from their values (a token id past the embedding table, say):
    the caller's error. A run past the memory limit is TOO_LARGE (RESOURCE_EXHAUSTED).
    The scheduler runs a failed batch again in parts, so only the requests that fail on
    their own get either. Anything else is the server's."""
    full = _ARENA_FULL.search(str(exc)) if memory_limit else None
    if full is not None:
        return FerryError(
            ErrorKind.TOO_LARGE,
            f"the run needs {int(full.group(2))} bytes at once, more than the "
            f"{int(full.group(1))} left of --max-run-memory ({memory_limit} bytes for the "
            "runs of every model together)",
        )
    missing = _MISSING_INPUTS.search(str(exc)) if isinstance(exc, ValueError) else None
    if missing is not None:  # an input the config calls optional, left out
        return FerryError(
            ErrorKind.INVALID_INPUT,
            f"the model needs input {missing.group(1)} on every run: its graph has no "
            "default for it, though its config calls it optional",
        )
    invalid = type(exc).__name__ == "InvalidArgument" and type(exc).__module__.startswith(
        "onnxruntime"
    )
    kind = ErrorKind.INVALID_INPUT if invalid else ErrorKind.INTERNAL
    return FerryError(kind, f"onnxruntime: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

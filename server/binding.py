"""Batches that reach onnxruntime through IO binding, with optional shape buckets.

Owns the per-instance buffers: each input is gathered once per batch into a reusable host
buffer (page-locked on a GPU when libcudart can provide it), padded up to the nearest
allowed batch size, bound once per batch shape and, on a GPU, copied to device buffers
whose addresses never change (what CUDA graphs need). Outputs are copied back to the host
once per batch. Used by `OnnxInstance` from its one worker thread.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ferry.proto.codec import NUMPY_DTYPES

from .signatures import datatype_of_runtime_type

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]
Allocator = Callable[[int], npt.NDArray[np.uint8]]

# Batch shapes whose bindings are kept; past this (inputs whose non-batch dimensions vary
# from batch to batch) the cache starts over rather than growing without bound.
MAX_BOUND_SHAPES = 64


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest allowed batch size that holds `rows` (buckets sorted ascending);
    `rows` itself when there are no buckets or it is past the largest."""
    index = bisect.bisect_left(buckets, rows)
    return buckets[index] if index < len(buckets) else rows


def plain_allocator(nbytes: int) -> npt.NDArray[np.uint8]:
    return np.empty(nbytes, dtype=np.uint8)


def pinned_allocator(library: str | None = None) -> Allocator | None:
    """An allocator of page-locked host memory through libcudart's cudaHostAlloc, or None
    when there is no CUDA runtime or it cannot pin memory (no device, no driver)."""
    names = (
        [library]
        if library
        else ["libcudart.so.12", "libcudart.so", ctypes.util.find_library("cudart")]
    )
    cudart = None
    for name in names:
        if not name:
            continue
        try:
            cudart = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if cudart is None:
        return None
    cudart.cudaHostAlloc.argtypes = [
        ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint
    ]
    cudart.cudaHostAlloc.restype = ctypes.c_int
    cudart.cudaFreeHost.argtypes = [ctypes.c_void_p]
    cudart.cudaFreeHost.restype = ctypes.c_int

    def allocate(nbytes: int) -> npt.NDArray[np.uint8]:
        pointer = ctypes.c_void_p()
        status = cudart.cudaHostAlloc(ctypes.byref(pointer), max(1, nbytes), 0)
        if status != 0 or not pointer.value:
            raise MemoryError(f"cudaHostAlloc of {nbytes} bytes failed with CUDA error {status}")
        memory = (ctypes.c_uint8 * max(1, nbytes)).from_address(pointer.value)
        # Freed when the last view of the memory is gone: views keep `memory` alive.
        weakref.finalize(memory, cudart.cudaFreeHost, pointer.value)
        return np.ctypeslib.as_array(memory)[:nbytes]

    try:
        allocate(1)
    except MemoryError as exc:
        log.info("page-locked host memory is not available (%s); using ordinary memory", exc)
        return None
    return allocate


@dataclass(slots=True)
class BindingCounters:
    """What the executor did, for tests and logs: reuse shows as allocations that stop
    growing while batches keep counting."""

    batches: int = 0
    padded_rows: int = 0
    host_allocations: int = 0
    device_allocations: int = 0
    bindings: int = 0  # IOBinding objects made, one per batch shape
    direct_batches: int = 0  # lone requests bound where they lie, uncopied


class HostBuffer:
    """The reusable host memory of one input: it grows to the largest batch, never shrinks."""

    def __init__(self, allocate: Allocator, counters: BindingCounters) -> None:
        self._allocate = allocate
        self._counters = counters
        self._memory: npt.NDArray[np.uint8] | None = None

    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...], reserve_rows: int) -> Array:
        """A C-contiguous array of `shape` over the buffer. When it must grow, room is made
        for `reserve_rows` rows of this shape at once, so that it grows rarely."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self._memory is None or self._memory.nbytes < nbytes:
            rows = max(reserve_rows, shape[0] if shape else 1, 1)
            row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
            self._memory = self._allocate(max(nbytes, rows * row_bytes))
            self._counters.host_allocations += 1
        return self._memory[:nbytes].view(dtype).reshape(shape)

    @property
    def memory(self) -> npt.NDArray[np.uint8] | None:
        return self._memory


@dataclass(slots=True)
class _BoundShape:
    """One batch shape: its binding, made once, and the buffers it points at."""

    rows: int  # the padded batch size
    binding: Any  # onnxruntime.IOBinding
    host: dict[str, Array]  # gathered into, per input
    device_inputs: dict[str, Any]  # OrtValues the host rows are copied to (GPU only)
    device_outputs: dict[str, Any]  # preallocated output OrtValues (empty: ORT allocates)
    run_options: Any  # onnxruntime.RunOptions, or None
    memories: tuple[object, ...] = field(default=())  # keeps the host memory alive


@dataclass(frozen=True, slots=True)
class BindingPlan:
    """How an instance binds its batches."""

    device: str = "cpu"  # onnxruntime's device name: "cpu" or "cuda"
    device_id: int = 0
    max_rows: int = 1  # rows the host buffers are sized for at first
    buckets: tuple[int, ...] = ()
    # Copy the gathered rows into OrtValues made once per shape (a GPU's device buffers);
    # False binds the host buffer itself, which is all a CPU needs.
    device_inputs: bool = False
    preallocate_outputs: bool = False  # bind outputs to buffers made once per shape
    cuda_graphs: bool = False  # one CUDA graph per batch shape (gpu_graph_id)
    pinned: bool = False  # page-locked host buffers, when libcudart allows


class BoundExecutor:
    """Runs batches of one session through IO binding (one worker thread at a time)."""

    def __init__(self, session: Any, ort: Any, plan: BindingPlan) -> None:
        self._session = session
        self._ort = ort
        self.plan = plan
        self.counters = BindingCounters()
        allocate = (pinned_allocator() if plan.pinned else None) or plain_allocator
        self.pinned = allocate is not plain_allocator
        self._inputs = [arg.name for arg in session.get_inputs()]
        outputs = session.get_outputs()
        self._outputs = [arg.name for arg in outputs]
        self._output_dims: dict[str, tuple[int, ...] | None] = {}
        for arg in outputs:
            dims = tuple(arg.shape[1:]) if arg.shape else ()
            static = all(isinstance(d, int) and d >= 0 for d in dims)
            self._output_dims[arg.name] = dims if static else None  # type: ignore[assignment]
        self._output_types = {arg.name: _numpy_type(arg.type) for arg in outputs}
        self._host = {name: HostBuffer(allocate, self.counters) for name in self._inputs}
        self._shapes: dict[tuple[object, ...], _BoundShape] = {}
        self._direct: dict[tuple[object, ...], Any] = {}  # lone CPU requests, per shape
        self._next_graph_id = 1  # 0 is onnxruntime's own; -1 turns capture off

    def run(
        self, parts: Sequence[Mapping[str, Array]], rows: int, output_names: Sequence[str]
    ) -> tuple[dict[str, Array], int]:
        """Run the rows of `parts` (same non-batch dimensions) as one batch; returns the
        outputs, `rows` long, and how many padding rows were run and dropped."""
        padded = bucket_for(rows, self.plan.buckets)
        first = parts[0]
        key = (padded, *[(first[name].dtype, first[name].shape[1:]) for name in self._inputs])
        if len(parts) == 1 and padded == rows and not self.plan.device_inputs:
            outputs = self._run_direct(key, first, rows, output_names)
            self.counters.batches += 1
            return outputs, 0
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._bind(key, padded, first)
        for name in self._inputs:
            host = shape.host[name]
            device = shape.device_inputs.get(name)
            if len(parts) == 1 and padded == rows and device is not None:
                device.update_inplace(np.ascontiguousarray(first[name]))
                continue
            if len(parts) == 1:
                np.copyto(host[:rows], first[name])
            else:
                np.concatenate([part[name] for part in parts], out=host[:rows])
            if padded > rows:
                host[rows:] = 0
            if device is not None:
                device.update_inplace(host)
        self._session.run_with_iobinding(shape.binding, shape.run_options)
        # Counted once the run is done: a run that found the capped arena full is tried
        # again (runtime's _with_room), and counts once.
        self.counters.batches += 1
        self.counters.padded_rows += padded - rows
        return self._read_outputs(shape, rows, output_names), padded - rows

    def forget_bindings(self) -> None:
        """Drop the bindings kept per shape, and so the outputs onnxruntime allocated for
        each one's last run, which stay bound (in the capped arena of --max-run-memory)
        until the next run of that shape. Any thread may call this: a run in progress
        keeps its own binding."""
        self._shapes.clear()
        self._direct.clear()

    def _run_direct(
        self,
        key: tuple[object, ...],
        inputs: Mapping[str, Array],
        rows: int,
        output_names: Sequence[str],
    ) -> dict[str, Array]:
        """A lone CPU request needs no gathering: bind its own arrays. Its binding is kept
        per shape all the same, since onnxruntime reuses the outputs it allocated."""
        binding = self._direct.get(key)
        if binding is None:
            if len(self._direct) >= MAX_BOUND_SHAPES:
                self._direct.clear()
            binding = self._direct[key] = self._session.io_binding()
            self.counters.bindings += 1
            for name in self._outputs:
                binding.bind_output(name, "cpu")
        for name in self._inputs:
            binding.bind_cpu_input(name, np.ascontiguousarray(inputs[name]))
        self._session.run_with_iobinding(binding)
        self.counters.direct_batches += 1
        values = dict(zip(self._outputs, binding.copy_outputs_to_cpu(), strict=True))
        return {name: values[name] for name in output_names}

    def _bind(
        self, key: tuple[object, ...], padded: int, first: Mapping[str, Array]
    ) -> _BoundShape:
        ort = self._ort
        plan = self.plan
        reserve = max(plan.max_rows, padded)
        before = self.counters.host_allocations
        host = {
            name: self._host[name].view(
                first[name].dtype, (padded, *first[name].shape[1:]), reserve
            )
            for name in self._inputs
        }
        if self.counters.host_allocations != before or len(self._shapes) >= MAX_BOUND_SHAPES:
            # Earlier bindings point at memory that is no longer the buffer's.
            self._shapes.clear()
        binding = self._session.io_binding()
        self.counters.bindings += 1
        device_inputs: dict[str, Any] = {}
        for name, array in host.items():
            if not plan.device_inputs:
                # An OrtValue over the host buffer itself: gathering is all the copying.
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
            else:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(array.shape), array.dtype, plan.device, plan.device_id
                )
                self.counters.device_allocations += 1
                device_inputs[name] = value
                binding.bind_ortvalue_input(name, value)
        device_outputs: dict[str, Any] = {}
        static = all(dims is not None for dims in self._output_dims.values())
        for name in self._outputs:
            dims = self._output_dims[name]
            if plan.preallocate_outputs and static and dims is not None:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    [padded, *dims], self._output_types[name], plan.device, plan.device_id
                )
                self.counters.device_allocations += 1
                device_outputs[name] = value
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name, plan.device, plan.device_id)
        run_options = None
        if plan.cuda_graphs:
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(self._next_graph_id))
            self._next_graph_id += 1
        memories = tuple(self._host[name].memory for name in self._inputs)
        shape = _BoundShape(
            padded, binding, host, device_inputs, device_outputs, run_options, memories
        )
        self._shapes[key] = shape
        return shape

    def _read_outputs(
        self, shape: _BoundShape, rows: int, output_names: Sequence[str]
    ) -> dict[str, Array]:
        if shape.device_outputs:
            result = {}
            for name in output_names:
                array = shape.device_outputs[name].numpy()
                # A CPU OrtValue's numpy() is a view of the buffer the next batch writes;
                # a device one's is a fresh host copy already.
                result[name] = array[:rows].copy() if self.plan.device == "cpu" else array[:rows]
            return result
        values = dict(zip(self._outputs, shape.binding.copy_outputs_to_cpu(), strict=True))
        if rows == shape.rows:
            return {name: values[name] for name in output_names}
        return {name: values[name][:rows] for name in output_names}


def bindable(datatypes: Sequence[str | None]) -> bool:
    """Whether every tensor has a fixed-size numeric type (string tensors cannot be bound)."""
    return all(datatype is not None and datatype != "BYTES" for datatype in datatypes)


def _numpy_type(type_name: str) -> np.dtype[np.generic]:
    datatype = datatype_of_runtime_type(type_name)
    if datatype is None or datatype == "BYTES":
        raise ValueError(f"a {type_name} tensor cannot be bound to a buffer")
    return NUMPY_DTYPES[datatype]

"""Model configuration: config.pbtxt and the ONNX graph, merged into frozen settings.

`config.pbtxt` is protobuf text of Triton's ModelConfig. Settings Ferry honours are read
into `ModelSettings`; Triton fields Ferry has no use for are listed in one warning, never a
failure. Without a config, everything comes from the graph.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from google.protobuf import json_format, text_format

from ferry.proto import model_config_pb2 as mc
from ferry.proto.codec import CONFIG_TYPE_NAMES, DATATYPES_BY_CONFIG_NAME, NUMPY_DTYPES

from .devices import DeviceSettings, InstanceGroup, TensorRtSettings
from .errors import cut
from .padding import (
    LENGTH_BUCKETS_PARAMETER,
    PaddingConfigError,
    PaddingSettings,
    parse_padding,
    to_parameters,
)
from .signatures import GraphSignature, TensorSignature
from .warmup import WarmupInput, WarmupSample, bucket_samples

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_SIZE = 1024
DEFAULT_INSTANCE_COUNT = 1
DEFAULT_MODEL_FILENAME = "model.onnx"
# A queued request of any priority that has waited this long is served before every
# level, so low priorities are never starved. Ferry's own setting (Triton has none): the
# config parameter "priority_aging_microseconds".
DEFAULT_PRIORITY_AGING_S = 1.0
_PRIORITY_AGING_PARAMETER = "priority_aging_microseconds"
MAX_PRIORITY_AGING_US = 86_400_000_000  # a day
# With max_queue_delay 0, how long a fast model's batch may wait for the requests it
# expects (server.gathering); Ferry's own setting, the parameter
# "adaptive_queue_delay_microseconds" (0 turns it off). It serves models whose batches
# take microseconds: a second is far past any use.
DEFAULT_ADAPTIVE_QUEUE_DELAY_S = 0.001
_ADAPTIVE_QUEUE_DELAY_PARAMETER = "adaptive_queue_delay_microseconds"
MAX_ADAPTIVE_QUEUE_DELAY_US = 1_000_000
# Ferry's own parameters for GPU execution (see the README's GPU section).
_BATCH_BUCKETS_PARAMETER = "batch_buckets"  # "1,2,4,8": allowed batch sizes
_IO_BINDING_PARAMETER = "io_binding"  # "true" / "false"
# Bounds on what one config may ask of the server: each level is a queue, each instance a
# session and a thread, each warm-up run a full inference before the model is ready. A
# load request (with --allow-load-overrides) sends any config it likes, so a number far
# past any use is refused by name rather than allocated.
MAX_PRIORITY_LEVELS = 1000
MAX_INSTANCES = 256
MAX_WARMUP_COUNT = 1000
# As the default --max-tensor-bytes: a warm-up input no request could send is refused.
MAX_WARMUP_TENSOR_BYTES = 64 * 1024 * 1024
# Parameters of the "tensorrt" gpu_execution_accelerator, as in Triton's onnxruntime
# backend, and the onnxruntime provider options they become.
_TENSORRT_PARAMETERS = ("precision_mode", "max_workspace_size_bytes", "trt_engine_cache_path")

# Fields of Triton's ModelConfig that Ferry reads but does not act on: setting them is
# worth a warning, since the user expects an effect.
_IGNORED_BUT_KNOWN = {
    "dynamic_batching.preserve_ordering": "responses are sent as soon as each is ready",
    "dynamic_batching.priority_queue_policy": "every level uses default_queue_policy",
    "optimization.execution_accelerators.cpu_execution_accelerator": "",
    "optimization.input_pinned_memory": "",
    "optimization.output_pinned_memory": "",
}


class ConfigError(ValueError):
    """A model configuration that cannot be served; the message says why."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor the model takes or gives; `dims` exclude the batch dimension when the
    model batches. -1 marks a variable dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False
    # An input whose rank the graph does not give and no config fixes: requests may send
    # it at any rank (its dims show as one variable dimension, KServe's -1).
    any_rank: bool = False
    # Triton's reshape: the dims the model itself has (clients see `dims`); None: `dims`.
    reshape: tuple[int, ...] | None = None
    # An output's labels for the classification extension: a file in the model's folder.
    label_filename: str = ""

    @property
    def model_dims(self) -> tuple[int, ...]:
        """The dims as the model has them, the batch dimension excluded when it batches."""
        return self.dims if self.reshape is None else self.reshape


@dataclass(frozen=True, slots=True)
class ModelSettings:
    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    priority_levels: int = 1
    default_priority_level: int = 1
    default_timeout_s: float | None = None
    allow_timeout_override: bool = True
    instance_count: int = DEFAULT_INSTANCE_COUNT
    instance_kind: str = "KIND_CPU"
    gpus: tuple[int, ...] = ()
    graph_optimization_level: int = 0
    priority_aging_s: float = DEFAULT_PRIORITY_AGING_S
    adaptive_queue_delay_s: float = DEFAULT_ADAPTIVE_QUEUE_DELAY_S
    instance_groups: tuple[InstanceGroup, ...] = (InstanceGroup(),)
    tensorrt: TensorRtSettings | None = None
    cuda_graphs: bool = False
    # Allowed batch sizes: a batch is padded up to the nearest (the largest is always
    # max_batch_size); () runs each batch at its own size.
    batch_buckets: tuple[int, ...] = ()
    io_binding: bool | None = None  # None: on a GPU only (and wherever buckets pad)
    warmup: tuple[WarmupSample, ...] = ()
    # Variable-length inputs padded to a common length (server/padding.py); None: off.
    padding: PaddingSettings | None = None
    # Each output's class labels (its label_filename, read at load), by index.
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # Derived once here, so that no request rebuilds them.
    inputs_by_name: Mapping[str, TensorSpec] = field(init=False, repr=False, compare=False)
    client_shapes: Mapping[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)
    input_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    output_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    output_datatypes: Mapping[str, str] = field(init=False, repr=False, compare=False)
    # name -> (datatype, client shape, element size) of each fixed-size input: what the
    # decoder's fast path for raw requests checks.
    raw_inputs: Mapping[str, tuple[str, tuple[int, ...], int]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        derived = {
            "inputs_by_name": {spec.name: spec for spec in self.inputs},
            "client_shapes": {
                spec.name: tuple(self.client_shape(spec)) for spec in (*self.inputs, *self.outputs)
            },
            "input_names": tuple(spec.name for spec in self.inputs),
            "output_names": tuple(spec.name for spec in self.outputs),
            "output_datatypes": {spec.name: spec.datatype for spec in self.outputs},
            "raw_inputs": {
                spec.name: (
                    spec.datatype,
                    tuple(self.client_shape(spec)),
                    NUMPY_DTYPES[spec.datatype].itemsize,
                )
                for spec in self.inputs
                if spec.datatype != "BYTES"
            },
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @property
    def devices(self) -> DeviceSettings:
        return DeviceSettings(self.instance_groups, self.tensorrt, self.cuda_graphs)

    @property
    def batchable(self) -> bool:
        return self.max_batch_size > 0

    def client_shape(self, spec: TensorSpec) -> list[int]:
        """The shape of an input or output as a client sees it in metadata: with the batch
        dimension as -1 when the model batches."""
        return [-1, *spec.dims] if self.batchable else list(spec.dims)

    def to_proto(self) -> mc.ModelConfig:
        """The complete configuration as Triton's ModelConfig, for the ModelConfig RPC."""
        config = mc.ModelConfig(
            name=self.name,
            platform="onnxruntime_onnx",
            backend="onnxruntime",
            max_batch_size=self.max_batch_size,
            default_model_filename=DEFAULT_MODEL_FILENAME,
        )
        self._tensors_to_proto(config)
        if self.batchable:
            self._batching_to_proto(config)
        self._devices_to_proto(config)
        self._parameters_to_proto(config)
        self._warmup_to_proto(config)
        return config

    def _tensors_to_proto(self, config: mc.ModelConfig) -> None:
        for spec in self.inputs:
            tensor = config.input.add(
                name=spec.name,
                data_type=CONFIG_TYPE_NAMES[spec.datatype],  # type: ignore[arg-type]
                dims=spec.dims,
                optional=spec.optional,
            )
            if spec.reshape is not None:
                tensor.reshape.shape.extend(spec.reshape)
        for spec in self.outputs:
            tensor = config.output.add(  # type: ignore[assignment]
                name=spec.name,
                data_type=CONFIG_TYPE_NAMES[spec.datatype],  # type: ignore[arg-type]
                dims=spec.dims,
                label_filename=spec.label_filename,
            )
            if spec.reshape is not None:
                tensor.reshape.shape.extend(spec.reshape)

    def _batching_to_proto(self, config: mc.ModelConfig) -> None:
        batching = config.dynamic_batching
        batching.max_queue_delay_microseconds = round(self.max_queue_delay_s * 1e6)
        batching.preferred_batch_size.extend(self.preferred_batch_sizes)
        levels = self.priority_levels
        batching.priority_levels = levels if levels > 1 else 0
        batching.default_priority_level = self.default_priority_level if levels > 1 else 0
        policy = batching.default_queue_policy
        policy.max_queue_size = self.max_queue_size
        policy.allow_timeout_override = self.allow_timeout_override
        if self.default_timeout_s is not None:
            policy.default_timeout_microseconds = round(self.default_timeout_s * 1e6)
        if levels > 1 or self.priority_aging_s != DEFAULT_PRIORITY_AGING_S:
            config.parameters[_PRIORITY_AGING_PARAMETER].string_value = str(
                round(self.priority_aging_s * 1e6)
            )
        if self.adaptive_queue_delay_s != DEFAULT_ADAPTIVE_QUEUE_DELAY_S:
            config.parameters[_ADAPTIVE_QUEUE_DELAY_PARAMETER].string_value = str(
                round(self.adaptive_queue_delay_s * 1e6)
            )

    def _devices_to_proto(self, config: mc.ModelConfig) -> None:
        for index, group in enumerate(self.instance_groups):
            config.instance_group.add(
                name=f"{self.name}_{index}",
                count=group.count,
                kind=mc.ModelInstanceGroup.Kind.Value(group.kind),
                gpus=group.gpus,
            )
        if self.graph_optimization_level:
            config.optimization.graph.level = self.graph_optimization_level
        if self.cuda_graphs:
            config.optimization.cuda.graphs = True
        if self.tensorrt is not None:
            trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
                name="tensorrt"
            )
            trt.parameters["precision_mode"] = self.tensorrt.precision
            if self.tensorrt.max_workspace_bytes:
                trt.parameters["max_workspace_size_bytes"] = str(
                    self.tensorrt.max_workspace_bytes
                )
            if self.tensorrt.engine_cache_path:
                trt.parameters["trt_engine_cache_path"] = self.tensorrt.engine_cache_path

    def _parameters_to_proto(self, config: mc.ModelConfig) -> None:
        """Ferry's own settings, as `parameters` (the priority aging goes with batching)."""
        if self.batch_buckets:
            config.parameters[_BATCH_BUCKETS_PARAMETER].string_value = ",".join(
                str(size) for size in self.batch_buckets
            )
        if self.io_binding is not None:
            config.parameters[_IO_BINDING_PARAMETER].string_value = str(self.io_binding).lower()
        if self.padding is not None:
            for key, value in to_parameters(self.padding).items():
                config.parameters[key].string_value = value

    def _warmup_to_proto(self, config: mc.ModelConfig) -> None:
        for sample in self.warmup:
            entry = config.model_warmup.add(
                name=sample.name, batch_size=sample.batch_size, count=sample.count
            )
            for name, warm in sample.inputs:
                tensor = entry.inputs[name]
                tensor.data_type = mc.DataType.Value(CONFIG_TYPE_NAMES[warm.datatype])  # type: ignore[assignment]
                tensor.dims.extend(warm.dims)
                if warm.fill == "file":
                    tensor.input_data_file = warm.data_file
                elif warm.fill == "random":
                    tensor.random_data = True
                else:
                    tensor.zero_data = True


class ParsedConfig(NamedTuple):
    """A model's config.pbtxt, read once per load."""

    message: mc.ModelConfig
    set_fields: set[str]  # the top-level fields written, explicit zeros included
    warnings: list[str]


# What a Triton config may name for an ONNX model served by onnxruntime ("" when unset).
_ONNX_PLATFORMS = ("", "onnxruntime_onnx")
_ONNX_BACKENDS = ("", "onnxruntime", "onnx")


def check_onnx_backend(config: mc.ModelConfig) -> None:
    """Refuse, by name, a config written for another of Triton's backends: its model has
    no model.onnx, or is not meant for onnxruntime (a platform Ferry would silently
    ignore)."""
    named = [
        f"{field} '{value[:60]}'"
        for field, value, allowed in (
            ("platform", config.platform, _ONNX_PLATFORMS),
            ("backend", config.backend, _ONNX_BACKENDS),
        )
        if value not in allowed
    ]
    if named:
        raise ConfigError(
            f"the config names {' and '.join(named)}: Ferry serves ONNX models with "
            "onnxruntime only (platform 'onnxruntime_onnx', backend 'onnxruntime', or "
            "neither)"
        )


def parse_config_json(text: str) -> ParsedConfig:
    """A JSON ModelConfig (Triton's load parameter 'config'), used instead of config.pbtxt."""
    try:
        config = json_format.Parse(text, mc.ModelConfig())
    except json_format.ParseError as exc:
        raise ConfigError(f"load parameter 'config' is not a JSON ModelConfig: {exc}") from exc
    except RecursionError:  # json.loads of deeply nested lists
        raise ConfigError(
            "load parameter 'config' is not a JSON ModelConfig: it is nested too deeply"
        ) from None
    return ParsedConfig(config, {f.name for f, _ in config.ListFields()}, [])


def read_config_file(path: Path) -> ParsedConfig:
    """Parse config.pbtxt: the message, the top-level fields set, and warnings."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path.name} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    set_fields, unknown, known_text = _written_fields(text)
    config = mc.ModelConfig()
    try:
        # Unknown fields are cut out first: protobuf cannot skip an unknown field whose
        # value is a list of messages (`batch_input [ {...} ]`), common in Triton configs.
        text_format.Parse(known_text, config, allow_unknown_field=True)
    except text_format.ParseError as exc:
        # protobuf quotes the whole line, which may be the whole (huge) file
        raise ConfigError(f"{path.name}: {cut(str(exc), _QUOTED_CHARS)}") from exc
    # One warning names them all: those the parser does not know and those it reads but
    # Ferry does not act on.
    ignored = [
        *unknown,
        *(
            f"{dotted} ({why})" if why else dotted
            for dotted, why in _IGNORED_BUT_KNOWN.items()
            if _is_set(config, dotted)
        ),
    ]
    warnings = []
    if ignored:
        warnings.append(f"ignoring Triton settings Ferry does not support: {', '.join(ignored)}")
    return ParsedConfig(config, set_fields, warnings)


def _written_fields(text: str) -> tuple[set[str], list[str], str]:
    """The known fields written at the outermost level of a config.pbtxt; the dotted
    paths of the fields, at any depth, that Ferry's ModelConfig does not have; and the
    text with those fields blanked out (lines and columns kept, for parse errors).

    A word is a field name unless it is a value: after a colon, or inside a list.
    """
    top: set[str] = set()
    unknown: set[str] = set()
    # (descriptor of the message or list elements, or None inside an unknown field;
    #  dotted path; whether this level is a [list])
    stack: list[tuple[Any, str, bool]] = [(mc.ModelConfig.DESCRIPTOR, "", False)]
    pending: tuple[Any, str] = (None, "")  # what the next { opens
    expect_value = after_name = False
    cut: list[tuple[int, int]] = []  # spans of unknown fields, name to end of value
    skipping: tuple[int, int] | None = None  # (start, stack depth) of the field being cut
    for match in _TOKEN.finditer(text):
        item = match.group()
        descriptor, path, in_list = stack[-1]
        if item[0] == "#":
            continue
        named, after_name = after_name, False
        value_ended = False
        if item in ("{", "<"):
            stack.append((descriptor, path, False) if in_list else (*pending, False))
            expect_value = False
        elif item == "[":
            # a list after a field name (its colon is optional), or an extension or Any
            # type name where a field name would be
            stack.append((*pending, True) if expect_value or named else (None, path, True))
            expect_value = False
        elif item in ("}", ">", "]"):
            if len(stack) > 1:
                stack.pop()
            expect_value = False
            value_ended = True
        elif item == ":":
            expect_value = True
        elif expect_value:
            expect_value = item == "-"  # a sign: the number is still to come
            value_ended = not expect_value
        elif not in_list and (item[0].isalpha() or item[0] == "_"):
            dotted = f"{path}.{item}" if path else item
            field_descriptor = descriptor.fields_by_name.get(item) if descriptor else None
            if descriptor is not None and field_descriptor is None:
                unknown.add(dotted)
                skipping = (match.start(), len(stack))
            elif field_descriptor is not None and len(stack) == 1:
                top.add(item)
            pending = (field_descriptor.message_type if field_descriptor else None, dotted)
            after_name = True
        if skipping is not None and value_ended and len(stack) == skipping[1]:
            cut.append((skipping[0], match.end()))
            skipping = None
    known_text = text
    for start, end in reversed(cut):
        blank = re.sub(r"[^\n]", " ", known_text[start:end])
        known_text = known_text[:start] + blank + known_text[end:]
    return top, sorted(unknown), known_text


_TOKEN = re.compile(
    r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|#[^\n]*'  # strings, comments
    r"|\d(?:[eE][-+]|[\w.])*"  # numbers, 1.5e-3 included
    r"|[{}\[\]<>:]|[A-Za-z_][\w.]*|[^\s]"
)


def _is_set(message: Any, dotted: str) -> bool:
    """Whether a field holds a non-default value; through a repeated field, in any element."""
    name, _, rest = dotted.partition(".")
    value = getattr(message, name)
    if hasattr(value, "ListFields"):  # a message
        return bool(value.ListFields()) and (not rest or _is_set(value, rest))
    if rest:  # a repeated message field
        return any(_is_set(item, rest) for item in value)
    return bool(value)  # a scalar, or a repeated field or map: non-empty


def settings_from(
    name: str,
    graph: GraphSignature,
    config: mc.ModelConfig | None,
    set_fields: set[str] = frozenset(),  # type: ignore[assignment]
    warnings: list[str] | None = None,
) -> ModelSettings:
    """Merge a model's graph and its optional config into validated settings."""
    config = config or mc.ModelConfig()
    if config.name and config.name != name:
        raise ConfigError(
            f"config names the model '{cut(config.name, _QUOTED_CHARS)}' but its folder is '{name}'"
        )
    max_batch_size = _max_batch_size(graph, config, set_fields)
    batching = max_batch_size > 0
    inputs = _merge_tensors("input", graph.inputs, config.input, batching)
    outputs = _merge_tensors("output", graph.outputs, config.output, batching)
    warnings = list(warnings or ())  # the caller's list is left as it was
    optional = [f"'{spec.name}'" for spec in inputs if spec.optional]
    if optional:
        # Every input of the graph is one onnxruntime needs: one with a default is an
        # initializer, a weight that is not an input at all.
        warnings.append(
            f"config marks input {', '.join(optional)} optional, but the graph has no "
            "default for it: a request that leaves it out is refused (INVALID_ARGUMENT)"
        )
    queue = _queue_settings(config, max_batch_size, warnings)
    devices = _device_settings(config, warnings)
    buckets = _batch_buckets(
        config,
        max_batch_size,
        queue["preferred_batch_sizes"],  # type: ignore[arg-type]
        bool(devices["cuda_graphs"]) or devices["tensorrt"] is not None,
    )
    try:
        padding = parse_padding(
            {key: value.string_value for key, value in config.parameters.items()},
            [(t.name, t.datatype, t.dims) for t in inputs],
            [(t.name, t.datatype, t.dims) for t in outputs],
            max_batch_size,
        )
    except PaddingConfigError as exc:
        raise ConfigError(str(exc)) from None
    if padding is not None:
        reshaped = [t.name for t in (*inputs, *outputs) if t.reshape is not None]
        if reshaped:
            raise ConfigError(
                f"reshape ({', '.join(repr(n) for n in reshaped)}) cannot be combined with "
                "parameter padding_inputs: padding works on the shapes the model has"
            )
        warnings.extend(_unpadded_variable_inputs(padding, inputs))
    if config.model_warmup:
        warmup = tuple(_warmup_sample(w, inputs, max_batch_size) for w in config.model_warmup)
    else:
        _check_padded_warmup_count(buckets, padding)
        # CUDA graphs are captured on the second run of a shape: warm each bucket twice.
        warmup = bucket_samples(
            buckets,
            [(t.name, t.datatype, t.dims) for t in inputs],
            2 if devices["cuda_graphs"] else 1,
            _padded_lengths(padding),
        )
    for sample in warmup:
        _check_warmup_size(sample)
    return ModelSettings(
        name=name,
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        **queue,  # type: ignore[arg-type]
        **devices,  # type: ignore[arg-type]
        batch_buckets=buckets,
        io_binding=_bool_parameter(config, _IO_BINDING_PARAMETER),
        warmup=warmup,
        padding=padding,
        warnings=tuple(warnings),
    )


def _check_reshape(label: str, dims: tuple[int, ...], reshape: tuple[int, ...]) -> None:
    """`dims` and `reshape` must hold the same elements whatever a request sends: both
    fixed, or one variable dimension each (the rest equal in size), so that every request
    `dims` admits reshapes, without a check per request."""
    fixed = math.prod(d for d in dims if d != -1)
    reshaped = math.prod(d for d in reshape if d != -1)
    variable = (dims.count(-1), reshape.count(-1))
    # A variable dimension against others of size 0 would leave it unknown.
    if (variable == (0, 0) or (variable == (1, 1) and fixed > 0)) and fixed == reshaped:
        return
    raise ConfigError(
        f"{label} has dims {list(dims)} and reshape {list(reshape)}, which do not hold the "
        "same elements for every request: give both fixed sizes of one product, or one "
        "variable (-1) dimension in each and the rest of one product"
    )


def _unpadded_variable_inputs(padding: PaddingSettings, inputs: Sequence[TensorSpec]) -> list[str]:
    """A warning for each input that padding leaves out but whose padded axis is variable
    too: if it has each request's length (a BERT export's token_type_ids), requests of
    different lengths never share a batch, and nothing else would say so."""
    axis = padding.axis
    return [
        f"parameter padding_inputs leaves out input '{spec.name}', whose axis {axis} is "
        "variable too: if it has each request's length, requests of different lengths "
        f"never share a batch; add it with its pad value ('{spec.name}=0')"
        for spec in inputs
        if spec.name not in padding.inputs and len(spec.dims) >= axis
        and spec.dims[axis - 1] == -1
    ]


def _max_batch_size(graph: GraphSignature, config: mc.ModelConfig, set_fields: set[str]) -> int:
    """The config's max_batch_size, checked against the graph; else 32 for a graph whose
    every tensor has a variable first dimension, 0 (no batching) for others."""
    tensors = (*graph.inputs, *graph.outputs)
    graph_batchable = all(t.shape[:1] == (-1,) for t in tensors)
    if "max_batch_size" not in set_fields:
        return DEFAULT_MAX_BATCH_SIZE if graph_batchable else 0
    max_batch_size = config.max_batch_size
    if max_batch_size < 0:
        raise ConfigError(f"max_batch_size must be >= 0, got {max_batch_size}")
    # A tensor of unknown rank may have one: batching it is the config's to say.
    fixed = [
        f"'{t.name}' {list(t.shape)}" for t in tensors if t.rank_known and t.shape[:1] != (-1,)
    ]
    if max_batch_size > 0 and fixed:
        raise ConfigError(
            f"max_batch_size {max_batch_size} needs a variable first dimension on every "
            f"input and output, but the graph has {', '.join(fixed)}"
        )
    return max_batch_size


def _queue_settings(
    config: mc.ModelConfig, max_batch_size: int, warnings: list[str]
) -> dict[str, object]:
    """dynamic_batching: the queue delay, preferred sizes, queue policy and priorities."""
    db = config.dynamic_batching
    policy = db.default_queue_policy
    preferred = tuple(sorted(set(db.preferred_batch_size)))
    for size in preferred:
        if not 1 <= size <= max(1, max_batch_size):
            raise ConfigError(
                f"preferred_batch_size {size} is outside 1..{max_batch_size} (max_batch_size)"
            )
    if db.priority_levels > MAX_PRIORITY_LEVELS:
        raise ConfigError(
            f"dynamic_batching priority_levels {db.priority_levels} is over "
            f"{MAX_PRIORITY_LEVELS} (one queue each)"
        )
    priority_levels = max(1, db.priority_levels)
    default_priority = db.default_priority_level or (priority_levels + 1) // 2
    if db.priority_levels and not 1 <= default_priority <= priority_levels:
        raise ConfigError(
            f"default_priority_level {default_priority} is outside 1..{priority_levels}"
        )
    if policy.timeout_action == mc.ModelQueuePolicy.DELAY:
        warnings.append("default_queue_policy.timeout_action DELAY is treated as REJECT")
    timeout_us = policy.default_timeout_microseconds
    return {
        "max_queue_delay_s": db.max_queue_delay_microseconds / 1e6,
        "preferred_batch_sizes": preferred,
        "max_queue_size": policy.max_queue_size or DEFAULT_MAX_QUEUE_SIZE,
        "priority_levels": priority_levels,
        "default_priority_level": default_priority if db.priority_levels else 1,
        "default_timeout_s": timeout_us / 1e6 if timeout_us else None,
        "allow_timeout_override": policy.allow_timeout_override or not timeout_us,
        "priority_aging_s": _microseconds_parameter(
            config, _PRIORITY_AGING_PARAMETER, DEFAULT_PRIORITY_AGING_S, MAX_PRIORITY_AGING_US
        ),
        "adaptive_queue_delay_s": _microseconds_parameter(
            config,
            _ADAPTIVE_QUEUE_DELAY_PARAMETER,
            DEFAULT_ADAPTIVE_QUEUE_DELAY_S,
            MAX_ADAPTIVE_QUEUE_DELAY_US,
        ),
    }


def _device_settings(config: mc.ModelConfig, warnings: list[str]) -> dict[str, object]:
    """instance_group and optimization: where the sessions run, and how."""
    groups = list(config.instance_group) or [mc.ModelInstanceGroup()]
    kind = mc.ModelInstanceGroup.Kind.Name(groups[0].kind)
    # a KIND_GPU group runs `count` instances on each of its GPUs
    total = sum(max(1, g.count) * max(1, len(g.gpus)) for g in groups)
    if total > MAX_INSTANCES:
        counts = [g.count for g in groups]
        raise ConfigError(
            f"instance_group count {counts[0] if len(counts) == 1 else counts} makes "
            f"{total} instances, over {MAX_INSTANCES} (each is a session and a thread)"
        )
    return {
        "instance_count": sum(max(1, g.count) for g in groups),
        "instance_kind": "KIND_CPU" if kind == "KIND_AUTO" else kind,
        "gpus": tuple(gpu for g in groups for gpu in g.gpus),
        "instance_groups": tuple(_instance_group(g) for g in groups),
        "graph_optimization_level": config.optimization.graph.level,
        "tensorrt": _tensorrt(config, warnings),
        "cuda_graphs": config.optimization.cuda.graphs,
    }


def _padded_lengths(padding: PaddingSettings | None) -> tuple[tuple[int, dict[str, int]], ...]:
    """For warm-up with batch buckets: each listed length bucket, longest first (so host
    buffers are sized once), as (length, {padded input: axis})."""
    if padding is None or not padding.buckets.lengths:
        return ()
    axes = {name: padding.axis for name in padding.inputs}
    return tuple((length, axes) for length in reversed(padding.buckets.lengths))


def _check_padded_warmup_count(buckets: tuple[int, ...], padding: PaddingSettings | None) -> None:
    """Warm-up runs each batch bucket at each listed length: bounded as a config's
    model_warmup count is, since a load request may send any config."""
    lengths = len(padding.buckets.lengths) if padding is not None else 0
    runs = len(buckets) * lengths
    if runs > MAX_WARMUP_COUNT:
        raise ConfigError(
            f"parameters {LENGTH_BUCKETS_PARAMETER} and {_BATCH_BUCKETS_PARAMETER}: "
            f"{lengths} lengths x {len(buckets)} batch sizes make {runs} warm-up runs, more "
            f"than {MAX_WARMUP_COUNT}; list fewer of either"
        )


def instance_groups_of(config: mc.ModelConfig | None) -> tuple[InstanceGroup, ...]:
    """The config's instance groups (one KIND_CPU instance when it has none, or no
    config at all)."""
    if config is None or not config.instance_group:
        return (InstanceGroup(),)
    return tuple(_instance_group(g) for g in config.instance_group)


def _instance_group(group: mc.ModelInstanceGroup) -> InstanceGroup:
    kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
    if kind not in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"):
        raise ConfigError(f"instance_group kind {kind} is not supported (KIND_CPU or KIND_GPU)")
    if any(gpu < 0 for gpu in group.gpus):
        raise ConfigError(f"instance_group gpus must be >= 0, got {list(group.gpus)}")
    return InstanceGroup(
        kind="KIND_CPU" if kind == "KIND_AUTO" else kind,
        count=max(1, group.count),
        gpus=tuple(group.gpus) if kind == "KIND_GPU" else (),
    )


def _tensorrt(config: mc.ModelConfig, warnings: list[str]) -> TensorRtSettings | None:
    """The "tensorrt" GPU accelerator, if the config asks for it."""
    result = None
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if accelerator.name != "tensorrt":
            warnings.append(
                f"ignoring gpu_execution_accelerator '{accelerator.name}' (only 'tensorrt')"
            )
            continue
        parameters = dict(accelerator.parameters)
        unknown = sorted(set(parameters) - set(_TENSORRT_PARAMETERS))
        if unknown:
            warnings.append(f"ignoring tensorrt parameters {', '.join(unknown)}")
        precision = parameters.get("precision_mode", "FP32").upper()
        if precision not in ("FP32", "FP16"):
            raise ConfigError(f"tensorrt precision_mode must be FP32 or FP16, got {precision!r}")
        workspace = parameters.get("max_workspace_size_bytes", "0")
        if not workspace.isdigit():
            raise ConfigError(
                f"tensorrt max_workspace_size_bytes must be a whole number, got {workspace!r}"
            )
        result = TensorRtSettings(
            precision=precision,
            max_workspace_bytes=int(workspace),
            engine_cache_path=parameters.get("trt_engine_cache_path", ""),
        )
    return result


def _batch_buckets(
    config: mc.ModelConfig, max_batch_size: int, preferred: tuple[int, ...], fixed_shapes: bool
) -> tuple[int, ...]:
    """The allowed batch sizes: the parameter batch_buckets; else, when CUDA graphs or
    TensorRT want few shapes, the preferred sizes or the powers of two. The largest is
    always max_batch_size, so that every batch has a bucket."""
    if _BATCH_BUCKETS_PARAMETER in config.parameters:
        text = config.parameters[_BATCH_BUCKETS_PARAMETER].string_value
        try:
            sizes = {int(part) for part in text.split(",") if part.strip()}
        except ValueError:
            raise ConfigError(
                f"parameter {_BATCH_BUCKETS_PARAMETER} must be batch sizes separated by "
                f"commas, got {text!r}"
            ) from None
        if not sizes:
            return ()
        if max_batch_size == 0:
            raise ConfigError(
                f"parameter {_BATCH_BUCKETS_PARAMETER} needs a model that batches "
                "(max_batch_size > 0)"
            )
        wrong = sorted(size for size in sizes if not 1 <= size <= max_batch_size)
        if wrong:
            raise ConfigError(
                f"parameter {_BATCH_BUCKETS_PARAMETER}: sizes {wrong} are outside "
                f"1..{max_batch_size} (max_batch_size)"
            )
    elif fixed_shapes and max_batch_size > 0:
        sizes = set(preferred) or {1 << n for n in range(max_batch_size.bit_length())}
    else:
        return ()
    return tuple(sorted(sizes | {max_batch_size}))


def _bool_parameter(config: mc.ModelConfig, key: str) -> bool | None:
    if key not in config.parameters:
        return None
    text = config.parameters[key].string_value.strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ConfigError(f"parameter {key} must be true or false, got {text!r}")
    return text in ("true", "1")


def _warmup_sample(
    entry: mc.ModelWarmup, inputs: tuple[TensorSpec, ...], max_batch_size: int
) -> WarmupSample:
    label = f"model_warmup '{entry.name}'"
    specs = {spec.name: spec for spec in inputs}
    batch_size = entry.batch_size
    if max_batch_size > 0:
        batch_size = max(1, batch_size)
        if batch_size > max_batch_size:
            raise ConfigError(
                f"{label}: batch_size {batch_size} is over max_batch_size {max_batch_size}"
            )
    else:
        batch_size = 0  # the dims are the whole shape
    missing = [
        name for name, spec in specs.items() if not spec.optional and name not in entry.inputs
    ]
    if missing:
        raise ConfigError(f"{label} leaves out inputs {', '.join(missing)}")
    samples = []
    for name, tensor in sorted(entry.inputs.items()):
        spec = specs.get(name)
        if spec is None:
            raise ConfigError(f"{label}: '{name}' is not an input of the model")
        datatype = DATATYPES_BY_CONFIG_NAME.get(mc.DataType.Name(tensor.data_type))
        if datatype != spec.datatype:
            raise ConfigError(
                f"{label}: input '{name}' is {mc.DataType.Name(tensor.data_type)}, "
                f"but the model takes {CONFIG_TYPE_NAMES[spec.datatype]}"
            )
        dims = tuple(tensor.dims)
        fits = (-1,) * len(dims) if spec.any_rank else spec.dims
        if len(dims) != len(fits) or any(
            d < 0 or (s != -1 and d != s) for d, s in zip(dims, fits, strict=True)
        ):
            raise ConfigError(
                f"{label}: input '{name}' has dims {list(dims)}, which do not fit "
                f"{list(spec.dims)}"
            )
        choice = tensor.WhichOneof("input_data_type")
        if choice == "input_data_file":
            data_file = tensor.input_data_file
            if not data_file or "/" in data_file or "\\" in data_file or data_file.startswith("."):
                raise ConfigError(
                    f"{label}: input_data_file must name a file in the model's warmup "
                    f"folder, got {data_file!r}"
                )
            samples.append((name, WarmupInput(datatype, dims, "file", data_file)))
        else:
            fill = "random" if choice == "random_data" else "zero"
            samples.append((name, WarmupInput(datatype, dims, fill)))
    if entry.count > MAX_WARMUP_COUNT:
        raise ConfigError(f"{label}: count {entry.count} is over {MAX_WARMUP_COUNT}")
    return WarmupSample(entry.name or "warmup", batch_size, tuple(samples), max(1, entry.count))


def _check_warmup_size(sample: WarmupSample) -> None:
    """Refuse a warm-up input larger than any request may be (before it is allocated)."""
    for name, warm in sample.inputs:
        shape = (sample.batch_size, *warm.dims) if sample.batch_size else warm.dims
        elements = 1
        for dim in shape:
            elements *= dim
        # BYTES inputs are arrays of object pointers
        size = elements * (8 if warm.datatype == "BYTES" else NUMPY_DTYPES[warm.datatype].itemsize)
        if size > MAX_WARMUP_TENSOR_BYTES:
            raise ConfigError(
                f"model_warmup '{sample.name}': input '{name}' {warm.datatype} {list(shape)} "
                f"is {size} bytes, over the {MAX_WARMUP_TENSOR_BYTES} a warm-up input may have"
            )


_DIGITS = re.compile(r"[0-9]+")
_QUOTED_CHARS = 300


def _microseconds_parameter(
    config: mc.ModelConfig, key: str, default_s: float, most_us: int
) -> float:
    """A whole number of microseconds, 0 to `most_us`, in a `parameters` entry."""
    if key not in config.parameters:
        return default_s
    text = config.parameters[key].string_value
    # ASCII digits only: int() would also take signs, spaces, "1_000" and other scripts'
    # digits, and any number of them.
    if not _DIGITS.fullmatch(text):
        raise ConfigError(
            f"parameter {key} must be a whole number of microseconds (0 to {most_us}), "
            f"got {text[:40]!r}"
        )
    if len(text) > len(str(most_us)) or int(text) > most_us:
        raise ConfigError(
            f"parameter {key} must be at most {most_us} microseconds, got {text[:40]}"
            + ("..." if len(text) > 40 else "")
        )
    return int(text) / 1e6


# A tensor whose rank the graph does not declare (onnxruntime, and so Triton, reads it
# as a scalar: Triton's autocomplete gives it dims [1]) is shown as one variable
# dimension, KServe's -1, rather than as a scalar; configured dims of any rank fit it.
# Such an input is taken at any rank unless a config gives its dims (TensorSpec.any_rank).
_ANY_RANK = (-1,)


def _graph_dims(sig: TensorSignature, batching: bool) -> tuple[int, ...]:
    if not sig.rank_known:
        return _ANY_RANK
    return sig.shape[1:] if batching else sig.shape


def _merge_tensors(
    role: str,
    graph: tuple[TensorSignature, ...],
    configured: object,
    batching: bool,
) -> tuple[TensorSpec, ...]:
    by_name = {t.name: t for t in graph}
    entries = list(configured)  # type: ignore[call-overload]
    if not entries:
        return tuple(
            TensorSpec(t.name, t.datatype, _graph_dims(t, batching),
                       any_rank=role == "input" and not t.rank_known)
            for t in graph
        )
    specs = []
    for entry in entries:
        sig = by_name.get(entry.name)
        if sig is None:
            raise ConfigError(
                f"config {role} '{entry.name}' is not in the graph, whose {role}s are "
                f"{', '.join(repr(n) for n in by_name)}"
            )
        graph_dims = _graph_dims(sig, batching)
        datatype = sig.datatype
        if entry.data_type:
            configured_type = DATATYPES_BY_CONFIG_NAME.get(mc.DataType.Name(entry.data_type))
            if configured_type != datatype:
                raise ConfigError(
                    f"config {role} '{entry.name}' is {mc.DataType.Name(entry.data_type)}, "
                    f"but the graph has {CONFIG_TYPE_NAMES[datatype]}"
                )
        dims = tuple(entry.dims) or graph_dims
        reshape = tuple(entry.reshape.shape) if entry.HasField("reshape") else None
        for what, values in (("dims", dims), ("reshape", reshape or ())):
            if any(d < -1 for d in values):
                raise ConfigError(
                    f"config {role} '{entry.name}' has {what} {list(values)}: each is -1 "
                    "(variable) or a size of at least 0"
                )
        model_dims = dims if reshape is None else reshape
        if sig.rank_known and (len(model_dims) != len(graph_dims) or any(
            g != -1 and c != g for c, g in zip(model_dims, graph_dims, strict=True)
        )):
            said = f"dims {list(dims)}" if reshape is None else f"reshape {list(reshape)}"
            raise ConfigError(
                f"config {role} '{entry.name}' has {said}, which do not fit the "
                f"graph's {list(graph_dims)}" + (" (batch dimension excluded)" if batching else "")
            )
        if reshape is not None:
            _check_reshape(f"config {role} '{entry.name}'", dims, reshape)
        specs.append(TensorSpec(
            entry.name, datatype, dims, optional=bool(getattr(entry, "optional", False)),
            any_rank=role == "input" and not sig.rank_known and not entry.dims,
            reshape=reshape if reshape != dims else None,
            label_filename=getattr(entry, "label_filename", ""),
        ))
    if role == "input":
        missing = [n for n in by_name if n not in {s.name for s in specs}]
        if missing:
            raise ConfigError(f"config leaves out graph inputs {', '.join(missing)}")
    return tuple(specs)

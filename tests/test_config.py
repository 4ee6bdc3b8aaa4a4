"""config.pbtxt parsing and its merge with the ONNX graph into ModelSettings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import text_format

from ferry.proto import model_config_pb2 as mc
from ferry.server.config import (
    DEFAULT_INSTANCE_COUNT,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_SIZE,
    ConfigError,
    ModelSettings,
    TensorSpec,
    read_config_file,
    settings_from,
)
from ferry.server.signatures import GraphSignature, TensorSignature

# A graph whose first dimension is variable everywhere: batchable.
VARIABLE = GraphSignature(
    inputs=(
        TensorSignature("pixels", "FP32", (-1, 3, 8)),
        TensorSignature("mask", "BOOL", (-1, -1)),
    ),
    outputs=(TensorSignature("scores", "FP32", (-1, 10)),),
)
# A graph with a fixed first dimension: it cannot batch.
FIXED = GraphSignature(
    inputs=(TensorSignature("image", "UINT8", (1, 28, 28)),),
    outputs=(TensorSignature("label", "INT64", (1,)),),
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.pbtxt"
    path.write_text(text, encoding="utf-8")
    return path


def read(tmp_path: Path, text: str) -> tuple[mc.ModelConfig, set[str], list[str]]:
    return read_config_file(write(tmp_path, text))


def settings(
    text: str | None, graph: GraphSignature = VARIABLE, name: str = "m"
) -> ModelSettings:
    if text is None:
        return settings_from(name, graph, None)
    config = mc.ModelConfig()
    text_format.Parse(text, config)
    set_fields = {f.name for f, _ in config.ListFields()}
    if "max_batch_size" in text:  # proto3 drops an explicit 0 from ListFields
        set_fields.add("max_batch_size")
    return settings_from(name, graph, config, set_fields)


def settings_via_file(tmp_path: Path, text: str, graph: GraphSignature = VARIABLE) -> ModelSettings:
    config, set_fields, warnings = read(tmp_path, text)
    return settings_from("m", graph, config, set_fields, warnings)


# -- read_config_file -------------------------------------------------------------------


def test_reads_a_plain_config(tmp_path: Path) -> None:
    config, set_fields, warnings = read(
        tmp_path,
        """
        name: "m"
        platform: "onnxruntime_onnx"
        max_batch_size: 16
        input [ { name: "pixels" data_type: TYPE_FP32 dims: [ 3, 8 ] } ]
        dynamic_batching { max_queue_delay_microseconds: 250 preferred_batch_size: [ 4, 8 ] }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        """,
    )
    assert warnings == []
    assert config.max_batch_size == 16
    assert [i.name for i in config.input] == ["pixels"]
    assert list(config.input[0].dims) == [3, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.instance_group[0].count == 2
    assert set_fields == {
        "name", "platform", "max_batch_size", "input", "dynamic_batching", "instance_group",
    }


def test_an_explicit_zero_max_batch_size_counts_as_set(tmp_path: Path) -> None:
    _, set_fields, _ = read(tmp_path, "max_batch_size: 0\n")
    assert "max_batch_size" in set_fields


def test_field_names_inside_strings_and_comments_are_not_fields(tmp_path: Path) -> None:
    config, set_fields, warnings = read(
        tmp_path,
        """
        # sequence_batching { } would be unsupported, but this is a comment
        name: "sequence_batching"
        default_model_filename: 'response_cache.onnx'
        """,
    )
    assert warnings == []
    assert set_fields == {"name", "default_model_filename"}
    assert config.name == "sequence_batching"


TRITON_CONFIG = """
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "pixels"
    data_type: TYPE_FP32
    dims: [ 3, 8 ]
    allow_ragged_batch: true
  },
  { name: "mask" data_type: TYPE_BOOL dims: [ -1 ] }
]
batch_input [
  { kind: BATCH_ELEMENT_COUNT target_name: "count" data_type: TYPE_FP32 source_input: [ "pixels" ] }
]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] }
  ]
}
instance_group [ { count: 1 kind: KIND_CPU profile: [ "a", "b" ] } ]
response_cache { enable: true }
dynamic_batching { max_queue_delay_microseconds: 100 }
"""


def test_unsupported_triton_fields_give_one_warning_naming_them(tmp_path: Path) -> None:
    config, set_fields, warnings = read(tmp_path, TRITON_CONFIG)
    assert len(warnings) == 1, warnings
    (warning,) = warnings
    for name in (
        "batch_input",
        "sequence_batching",
        "response_cache",
        "input.allow_ragged_batch",
        "instance_group.profile",
    ):
        assert name in warning
    # What Ferry does support is still read.
    assert config.max_batch_size == 8
    assert list(config.input[0].dims) == [3, 8]
    assert config.instance_group[0].count == 1
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert "sequence_batching" not in set_fields
    assert "max_batch_size" in set_fields


def test_a_config_with_unsupported_fields_still_serves(tmp_path: Path) -> None:
    settings = settings_via_file(tmp_path, TRITON_CONFIG)
    assert settings.max_batch_size == 8
    assert len(settings.warnings) == 1


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("dynamic_batching { preserve_ordering: true }", "dynamic_batching.preserve_ordering"),
        (
            "dynamic_batching { priority_queue_policy { key: 1 value { max_queue_size: 2 } } }",
            "dynamic_batching.priority_queue_policy",
        ),
        ("optimization { cuda { output_copy_stream: true } }", "optimization.cuda"),
        (
            "optimization { input_pinned_memory { enable: true } }",
            "optimization.input_pinned_memory",
        ),
    ],
)
def test_known_fields_ferry_ignores_are_named_in_a_warning(
    tmp_path: Path, text: str, named: str
) -> None:
    _, _, warnings = read(tmp_path, text + "\n")
    assert len(warnings) == 1, warnings
    assert named in warnings[0]


def test_a_known_field_left_at_its_default_is_not_worth_a_warning(tmp_path: Path) -> None:
    _, _, warnings = read(
        tmp_path,
        """
        optimization { input_pinned_memory { enable: false } }
        input [ { name: "pixels" }, { name: "mask" } ]
        dynamic_batching { preserve_ordering: false }
        """,
    )
    assert warnings == []


def test_unknown_and_ignored_fields_share_the_one_warning(tmp_path: Path) -> None:
    _, _, warnings = read(
        tmp_path,
        """
        response_cache { enable: true }
        dynamic_batching { preserve_ordering: true }
        input [ { name: "pixels" allow_ragged_batch: true reshape { shape: [ 24 ] } } ]
        """,
    )
    assert len(warnings) == 1, warnings
    assert "reshape" not in warnings[0]  # applied (tests/test_reshape.py)
    for name in (
        "response_cache", "dynamic_batching.preserve_ordering", "input.allow_ragged_batch",
    ):
        assert name in warnings[0]


@pytest.mark.parametrize(
    "text",
    [
        "max_batch_size: eight\n",
        'max_batch_size: "8"\n',
        'input [ { name: "x" }\n',  # unclosed
        "instance_group [ { kind: KIND_TPU } ]\n",  # no such enum value
        "dynamic_batching { max_queue_delay_microseconds: -1 }\n",
        'name: "m" }\n',
    ],
)
def test_malformed_text_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"config\.pbtxt"):
        read(tmp_path, text)


# -- settings_from: batching from the graph ---------------------------------------------


def test_without_config_a_variable_first_dimension_batches_with_the_default() -> None:
    s = settings(None)
    assert s.max_batch_size == DEFAULT_MAX_BATCH_SIZE == 32
    assert s.batchable
    assert s.inputs == (
        TensorSpec("pixels", "FP32", (3, 8)),
        TensorSpec("mask", "BOOL", (-1,)),
    )
    assert s.outputs == (TensorSpec("scores", "FP32", (10,)),)
    assert s.client_shape(s.inputs[0]) == [-1, 3, 8]
    assert s.max_queue_delay_s == 0.0
    assert s.preferred_batch_sizes == ()
    assert s.max_queue_size == DEFAULT_MAX_QUEUE_SIZE
    assert s.instance_count == DEFAULT_INSTANCE_COUNT == 1
    assert s.warnings == ()


def test_without_config_a_fixed_first_dimension_does_not_batch() -> None:
    s = settings(None, FIXED)
    assert s.max_batch_size == 0
    assert not s.batchable
    assert s.inputs == (TensorSpec("image", "UINT8", (1, 28, 28)),)
    assert s.client_shape(s.inputs[0]) == [1, 28, 28]


def test_a_config_without_max_batch_size_takes_the_default() -> None:
    assert settings('name: "m"').max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert settings('name: "m"', FIXED).max_batch_size == 0


def test_explicit_max_batch_size_is_honoured() -> None:
    assert settings("max_batch_size: 4").max_batch_size == 4


def test_explicit_zero_turns_batching_off_and_keeps_the_first_dimension() -> None:
    s = settings("max_batch_size: 0")
    assert not s.batchable
    assert s.inputs[0] == TensorSpec("pixels", "FP32", (-1, 3, 8))


def test_batching_a_fixed_shape_graph_is_an_error_naming_the_tensor() -> None:
    with pytest.raises(ConfigError) as caught:
        settings("max_batch_size: 8", FIXED)
    message = str(caught.value)
    assert "max_batch_size 8" in message
    assert "'image' [1, 28, 28]" in message and "'label' [1]" in message


def test_negative_max_batch_size_is_an_error() -> None:
    with pytest.raises(ConfigError, match="max_batch_size must be >= 0, got -1"):
        settings("max_batch_size: -1")


def test_a_config_naming_another_model_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"'other'.*'m'"):
        settings('name: "other"')


# -- settings_from: inputs and outputs --------------------------------------------------


def test_config_inputs_matching_the_graph_are_accepted() -> None:
    s = settings(
        """
        max_batch_size: 8
        input [
          { name: "mask" data_type: TYPE_BOOL dims: [ 5 ] },
          { name: "pixels" data_type: TYPE_FP32 dims: [ 3, 8 ] }
        ]
        output [ { name: "scores" data_type: TYPE_FP32 dims: [ 10 ] } ]
        """
    )
    # A graph's variable dimension may be narrowed by the config.
    assert s.inputs == (
        TensorSpec("mask", "BOOL", (5,)),
        TensorSpec("pixels", "FP32", (3, 8)),
    )
    assert s.outputs == (TensorSpec("scores", "FP32", (10,)),)


def test_a_config_input_without_type_or_dims_takes_them_from_the_graph() -> None:
    s = settings('input [ { name: "pixels" }, { name: "mask" } ]')
    assert s.inputs[0] == TensorSpec("pixels", "FP32", (3, 8))


def test_a_config_input_with_the_wrong_datatype_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        settings('input [ { name: "pixels" data_type: TYPE_INT32 }, { name: "mask" } ]')
    message = str(caught.value)
    assert "'pixels'" in message and "TYPE_INT32" in message and "TYPE_FP32" in message


def test_a_config_input_with_the_wrong_dims_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        settings('input [ { name: "pixels" dims: [ 3, 9 ] }, { name: "mask" } ]')
    message = str(caught.value)
    assert "'pixels'" in message and "[3, 9]" in message and "[3, 8]" in message
    assert "batch dimension excluded" in message


def test_a_config_input_that_includes_the_batch_dimension_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'pixels' has dims \\[-1, 3, 8\\]"):
        settings('input [ { name: "pixels" dims: [ -1, 3, 8 ] }, { name: "mask" } ]')


def test_a_config_output_with_the_wrong_dims_is_an_error() -> None:
    with pytest.raises(ConfigError, match="output 'scores'"):
        settings('output [ { name: "scores" dims: [ 11 ] } ]')


def test_a_config_tensor_the_graph_lacks_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        settings('input [ { name: "pixles" } ]')
    assert "'pixles'" in str(caught.value) and "'pixels'" in str(caught.value)


def test_a_config_that_leaves_out_a_graph_input_is_an_error() -> None:
    with pytest.raises(ConfigError, match="mask"):
        settings('input [ { name: "pixels" } ]')


# -- settings_from: batching and instances ----------------------------------------------


def test_dynamic_batching_fields() -> None:
    s = settings(
        """
        max_batch_size: 16
        dynamic_batching {
          max_queue_delay_microseconds: 1500
          preferred_batch_size: [ 8, 4, 8 ]
          default_queue_policy {
            max_queue_size: 7
            default_timeout_microseconds: 250000
            allow_timeout_override: true
          }
        }
        """
    )
    assert s.max_queue_delay_s == pytest.approx(0.0015)
    assert s.preferred_batch_sizes == (4, 8)
    assert s.max_queue_size == 7
    assert s.default_timeout_s == pytest.approx(0.25)
    assert s.allow_timeout_override is True


def test_a_preferred_size_above_max_batch_size_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"preferred_batch_size 32 is outside 1\.\.16"):
        settings("max_batch_size: 16 dynamic_batching { preferred_batch_size: [ 32 ] }")


def test_priority_levels() -> None:
    s = settings("dynamic_batching { priority_levels: 3 default_priority_level: 3 }")
    assert (s.priority_levels, s.default_priority_level) == (3, 3)
    s = settings("dynamic_batching { priority_levels: 4 }")
    assert s.default_priority_level == 2  # the middle level when none is named
    with pytest.raises(ConfigError, match=r"default_priority_level 5 is outside 1\.\.3"):
        settings("dynamic_batching { priority_levels: 3 default_priority_level: 5 }")


def test_timeout_action_delay_is_reported_as_a_warning() -> None:
    s = settings("dynamic_batching { default_queue_policy { timeout_action: DELAY } }")
    assert any("DELAY" in w for w in s.warnings)
    config = mc.ModelConfig()
    config.dynamic_batching.default_queue_policy.timeout_action = mc.ModelQueuePolicy.DELAY
    given = ["from the file"]
    s = settings_from("m", VARIABLE, config, set(), given)
    assert s.warnings[0] == "from the file" and "DELAY" in s.warnings[1]
    assert given == ["from the file"]  # the caller's list is not changed


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("", 1),
        ("instance_group [ { count: 3 } ]", 3),
        ("instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 kind: KIND_CPU } ]", 3),
        ("instance_group [ { kind: KIND_CPU } ]", 1),  # no count: one instance
    ],
)
def test_instance_group_count(text: str, count: int) -> None:
    s = settings(text)
    assert s.instance_count == count
    assert s.instance_kind == "KIND_CPU"


def test_instance_group_kind_and_gpus() -> None:
    s = settings("instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] } ]")
    assert (s.instance_count, s.instance_kind, s.gpus) == (2, "KIND_GPU", (0, 1))


def test_warnings_from_the_file_are_carried_in_the_settings(tmp_path: Path) -> None:
    s = settings_via_file(tmp_path, "max_batch_size: 4\nresponse_cache { enable: true }\n")
    assert len(s.warnings) == 1 and "response_cache" in s.warnings[0]


# -- to_proto ---------------------------------------------------------------------------


ROUND_TRIP_CONFIGS = [
    "",
    "max_batch_size: 0",
    """
    max_batch_size: 16
    input [
      { name: "pixels" data_type: TYPE_FP32 dims: [ 3, 8 ] },
      { name: "mask" data_type: TYPE_BOOL dims: [ 4 ] }
    ]
    dynamic_batching {
      max_queue_delay_microseconds: 2000
      preferred_batch_size: [ 4, 8 ]
      priority_levels: 2
      default_priority_level: 2
      default_queue_policy {
        max_queue_size: 9 default_timeout_microseconds: 5000 allow_timeout_override: false
      }
    }
    instance_group [ { count: 3 kind: KIND_CPU } ]
    optimization { graph { level: 1 } }
    parameters { key: "priority_aging_microseconds" value { string_value: "250000" } }
    """,
    """
    max_batch_size: 8
    parameters { key: "adaptive_queue_delay_microseconds" value { string_value: "0" } }
    """,
    """
    max_batch_size: 8
    parameters { key: "adaptive_queue_delay_microseconds" value { string_value: "2500" } }
    """,
]


def test_a_model_without_a_queue_delay_gathers_for_up_to_a_millisecond_by_default() -> None:
    assert settings(None).adaptive_queue_delay_s == 0.001
    assert settings(
        'parameters { key: "adaptive_queue_delay_microseconds" value { string_value: "2500" } }'
    ).adaptive_queue_delay_s == 0.0025


WHOLE_ADAPTIVE = (
    "parameter adaptive_queue_delay_microseconds must be a whole number of microseconds "
    "(0 to 1000000), got "
)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", WHOLE_ADAPTIVE + "'-1'"),
        ("1ms", WHOLE_ADAPTIVE + "'1ms'"),
        ("+5", WHOLE_ADAPTIVE + "'+5'"),
        (" 7 ", WHOLE_ADAPTIVE + "' 7 '"),
        ("1_000", WHOLE_ADAPTIVE + "'1_000'"),
        ("\uff17", WHOLE_ADAPTIVE + "'\uff17'"),  # a full-width 7: int() would take it
        ("", WHOLE_ADAPTIVE + "''"),
        ("1000001", "must be at most 1000000 microseconds, got 1000001"),
        # Past a float: must be refused by name, not raise OverflowError.
        ("1" + "0" * 400, "must be at most 1000000 microseconds, got 1" + "0" * 39 + "..."),
    ],
)
def test_a_bad_adaptive_queue_delay_is_refused_by_name(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings(
            'parameters { key: "adaptive_queue_delay_microseconds" '
            f'value {{ string_value: "{value}" }} }}'
        )


def test_the_longest_adaptive_queue_delay_is_a_second() -> None:
    model = settings(
        'parameters { key: "adaptive_queue_delay_microseconds" value { string_value: "1000000" } }'
    )
    assert model.adaptive_queue_delay_s == 1.0


@pytest.mark.parametrize("value", ["86400000001", "9" * 400, "-3"])
def test_a_bad_priority_aging_is_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError, match="parameter priority_aging_microseconds must be"):
        settings(
            'parameters { key: "priority_aging_microseconds" '
            f'value {{ string_value: "{value}" }} }}'
        )


@pytest.mark.parametrize("text", ROUND_TRIP_CONFIGS)
def test_to_proto_round_trips(text: str) -> None:
    original = settings(text)
    config = original.to_proto()
    again = settings_from("m", VARIABLE, config, {"max_batch_size"})
    assert again == original


@pytest.mark.parametrize("text", ROUND_TRIP_CONFIGS[::2])
def test_to_proto_round_trips_through_config_pbtxt(tmp_path: Path, text: str) -> None:
    original = settings(text)
    written = text_format.MessageToString(original.to_proto())
    again = settings_via_file(tmp_path, written)
    assert again == original
    assert again.warnings == ()


def test_to_proto_of_a_fixed_shape_model() -> None:
    config = settings(None, FIXED).to_proto()
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 28, 28]
    assert config.input[0].data_type == mc.TYPE_UINT8
    assert config.output[0].data_type == mc.TYPE_INT64
    assert settings_from("m", FIXED, config, {"max_batch_size"}) == settings(None, FIXED)


def test_to_proto_describes_the_model_as_triton_does() -> None:
    config = settings(None).to_proto()
    assert config.name == "m"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("pixels", mc.TYPE_FP32, [3, 8]),
        ("mask", mc.TYPE_BOOL, [-1]),
    ]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.default_queue_policy.max_queue_size == DEFAULT_MAX_QUEUE_SIZE
    groups = [(g.count, g.kind) for g in config.instance_group]
    assert groups == [(1, mc.ModelInstanceGroup.KIND_CPU)]

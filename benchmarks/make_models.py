"""The two benchmark models, made from fixed seeds into a Triton-style model repository.

- `mlp_small`: FP32 [batch, 256] -> 256 -> 10. Tiny arithmetic: per-request overhead
  (gRPC, decode, Python) dominates, so it measures the serving path.
- `mlp_large`: FP32 [batch, 1024] -> 2048 -> 2048 -> 2048 -> 10. About 40 MB of weights,
  read once per `session.run`: batch 1 is memory-bound and batching pays.

    python -m benchmarks.make_models benchmarks/.work/models
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MAX_BATCH_SIZE = 32
INPUT_NAME = "x"
OUTPUT_NAME = "logits"


@dataclass(frozen=True, slots=True)
class BenchModel:
    """One benchmark model: its name, layer widths and the seed of its weights."""

    name: str
    features: int
    hidden: tuple[int, ...]
    classes: int
    seed: int
    role: str  # "overhead-bound" or "compute-bound", for the report

    def scaled(self, divisor: int) -> BenchModel:
        """The same shape of network, narrower: the smoke run's quick stand-in."""
        return BenchModel(
            self.name,
            max(8, self.features // divisor),
            tuple(max(8, width // divisor) for width in self.hidden),
            self.classes,
            self.seed,
            self.role,
        )


OVERHEAD_BOUND = BenchModel("mlp_small", 256, (256,), 10, seed=1, role="overhead-bound")
COMPUTE_BOUND = BenchModel("mlp_large", 1024, (2048, 2048, 2048), 10, seed=2, role="compute-bound")
MODELS = (OVERHEAD_BOUND, COMPUTE_BOUND)


def build_graph(model: BenchModel) -> onnx.ModelProto:
    """A ReLU MLP with He-initialised weights from `model.seed` and a dynamic batch dim."""
    rng = np.random.default_rng(model.seed)
    widths = (model.features, *model.hidden, model.classes)
    nodes = []
    initializers = []
    current = INPUT_NAME
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        weight = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = (rng.standard_normal(fan_out) * 0.01).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{layer}"),
            numpy_helper.from_array(bias, f"b{layer}"),
        ]
        last = layer == len(widths) - 2
        product, summed = f"mm{layer}", OUTPUT_NAME if last else f"add{layer}"
        nodes += [
            helper.make_node("MatMul", [current, f"w{layer}"], [product]),
            helper.make_node("Add", [product, f"b{layer}"], [summed]),
        ]
        current = summed
        if not last:
            nodes.append(helper.make_node("Relu", [summed], [f"relu{layer}"]))
            current = f"relu{layer}"
    graph = helper.make_graph(
        nodes,
        model.name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", model.features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", model.classes])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 9
    onnx.checker.check_model(proto)
    return proto


def config_text(model: BenchModel) -> str:
    return f"""# Made by benchmarks/make_models.py ({model.role}); do not edit.
name: "{model.name}"
platform: "onnxruntime_onnx"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{ name: "{INPUT_NAME}", data_type: TYPE_FP32, dims: [ {model.features} ] }}
]
output [
  {{ name: "{OUTPUT_NAME}", data_type: TYPE_FP32, dims: [ {model.classes} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 0
}}
instance_group [
  {{ count: 1, kind: KIND_CPU }}
]
"""


def write_repository(root: Path, models: tuple[BenchModel, ...] = MODELS) -> Path:
    """Write <root>/<model>/config.pbtxt and <root>/<model>/1/model.onnx for each model."""
    for model in models:
        folder = root / model.name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        onnx.save(build_graph(model), str(folder / "1" / "model.onnx"))
        (folder / "config.pbtxt").write_text(config_text(model))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path, help="folder to write the model repository to")
    parser.add_argument(
        "--scale-down", type=int, default=1, metavar="N", help="divide every width by N"
    )
    args = parser.parse_args(argv)
    models = tuple(m.scaled(args.scale_down) for m in MODELS) if args.scale_down > 1 else MODELS
    write_repository(args.repository, models)
    print(f"wrote {', '.join(m.name for m in models)} to {args.repository}")


if __name__ == "__main__":
    main()

"""Train the example model: a digits classifier, exported to ONNX for Ferry to serve.

Uses scikit-learn's bundled 8x8 digits data set (no download) with a fixed seed and a
held-out test split, and writes into a new temporary folder (or --out DIR, or with
--overwrite-committed the committed files in examples/):

    model_repository/digits/1/model.onnx   pixels FP32 [batch, 64] -> label INT64 [batch],
                                           probabilities FP32 [batch, 10]
    model_repository/digits/config.pbtxt
    digits_test_split.npz                  the whole held-out split, for digits_client.py
    digits_samples.json                    its first 20 samples, for clients in other languages

The split, the samples and the config come out identical everywhere. The model's
coefficients are the solver's floating-point result: one thread and fixed solver settings make
a run repeat itself on one machine, but another CPU's BLAS kernels round differently (up to
about 2e-4 in a coefficient), so a retrained model.onnx need not equal the committed one byte
for byte; its predictions agree (tests/test_example.py checks how closely).

Needs the test extras (scikit-learn, skl2onnx):  .venv/bin/python examples/train_digits.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

SEED = 0
TEST_FRACTION = 0.2
SAMPLE_COUNT = 20
TARGET_OPSET = 17
MODEL_NAME = "digits"
EXAMPLES = Path(__file__).resolve().parent

CONFIG = f"""\
# The example model: a logistic regression over 8x8 digit images (examples/train_digits.py).
name: "{MODEL_NAME}"
platform: "onnxruntime_onnx"
max_batch_size: 32
input [
  {{ name: "pixels", data_type: TYPE_FP32, dims: [ 64 ] }}
]
output [
  # One label per row: no dimension besides the batch.
  {{ name: "label", data_type: TYPE_INT64 }},
  {{ name: "probabilities", data_type: TYPE_FP32, dims: [ 10 ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 500
}}
instance_group [
  {{ count: 1, kind: KIND_CPU }}
]
"""


def held_out_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train pixels, test pixels, train labels, test labels); pixels are 0..16."""
    pixels, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=TEST_FRACTION, random_state=SEED, stratify=labels
    )
    return train_x, test_x, train_y, test_y


def train(pixels: np.ndarray, labels: np.ndarray) -> Pipeline:
    # Every solver setting spelt out (a scikit-learn upgrade may change a default), and one
    # BLAS/OpenMP thread: a threaded reduction may add in another order on each run.
    solver = LogisticRegression(solver="lbfgs", C=1.0, tol=1e-4, max_iter=2000)
    classifier = make_pipeline(StandardScaler(), solver)
    with threadpool_limits(limits=1):
        classifier.fit(pixels.astype(np.float32), labels)
    return classifier


def export(classifier: Pipeline) -> onnx.ModelProto:
    """ONNX with Ferry's tensor names; zipmap off, so probabilities are a plain tensor."""
    model = to_onnx(
        classifier,
        initial_types=[("pixels", FloatTensorType([None, 64]))],
        options={id(classifier.steps[-1][1]): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    # skl2onnx names the outputs after the converter (output_label, label, ...): whichever
    # names it picks, the INT64 output is the label and the FLOAT one the probabilities.
    graph = model.graph
    wanted = {onnx.TensorProto.INT64: "label", onnx.TensorProto.FLOAT: "probabilities"}
    renames = {o.name: wanted[o.type.tensor_type.elem_type] for o in graph.output}
    if sorted(renames.values()) != sorted(wanted.values()):
        raise RuntimeError(f"unexpected skl2onnx outputs {[o.name for o in graph.output]}")
    for node in graph.node:
        for index, name in enumerate(node.output):
            node.output[index] = renames.get(name, name)
        for index, name in enumerate(node.input):
            node.input[index] = renames.get(name, name)
    for output in graph.output:
        output.name = renames[output.name]
    for tensor in (*graph.input, *graph.output):
        tensor.type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.name = MODEL_NAME
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_accuracy(model: onnx.ModelProto, pixels: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (predicted,) = session.run(["label"], {"pixels": pixels.astype(np.float32)})
    return float(np.mean(predicted == labels))


def output_folder(argv: list[str] | None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        type=Path,
        help="folder to write the model repository and the samples into "
        "(default: a new temporary folder; the checkout stays as it is)",
    )
    where.add_argument(
        "--overwrite-committed",
        action="store_true",
        help=f"write over the committed model and samples in {EXAMPLES}",
    )
    args = parser.parse_args(argv)
    if args.overwrite_committed:
        return EXAMPLES
    if args.out is None:
        return Path(tempfile.mkdtemp(prefix="ferry-digits-"))
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    return Path(args.out)


def main(argv: list[str] | None = None) -> None:
    out = output_folder(argv)
    train_x, test_x, train_y, test_y = held_out_split()
    classifier = train(train_x, train_y)
    model = export(classifier)
    accuracy = onnx_accuracy(model, test_x, test_y)
    sklearn_accuracy = classifier.score(test_x.astype(np.float32), test_y)

    model_folder = out / "model_repository" / MODEL_NAME
    (model_folder / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(model_folder / "1" / "model.onnx"))
    (model_folder / "config.pbtxt").write_text(CONFIG)
    np.savez_compressed(
        out / "digits_test_split.npz",
        pixels=test_x.astype(np.uint8),
        labels=test_y.astype(np.int64),
    )
    samples = {
        "pixels": test_x[:SAMPLE_COUNT].astype(np.float32).tolist(),
        "labels": test_y[:SAMPLE_COUNT].astype(int).tolist(),
    }
    (out / "digits_samples.json").write_text(json.dumps(samples) + "\n")

    size_kib = (model_folder / "1" / "model.onnx").stat().st_size / 1024
    print(f"trained on {len(train_y)} samples, held out {len(test_y)}")
    print(f"held-out accuracy: scikit-learn {sklearn_accuracy:.4f}, onnxruntime {accuracy:.4f}")
    print(f"wrote {model_folder} ({size_kib:.1f} KiB model) and samples into {out}")
    if out != EXAMPLES:
        print(f"serve it with: .venv/bin/ferry serve {out / 'model_repository'}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Triton's classification extension: an output asked for with the parameter
`classification: k` is answered as its k largest values, each a BYTES string
"value:index" (":label" added when the output's config names a `label_filename` holding
that index), in place of the tensor: [batch, k] for a model that batches (per row), [k]
for one that does not. As Triton does: values in C's %f (integers as they are), ranked
largest first by their exact values (64-bit integers too), ties by index, k cut to the
elements there are, an empty label line adding no label; numeric outputs other than
FP16/BF16/BOOL only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .config import ModelSettings, TensorSpec
from .errors import invalid_input
from .rows import Array, Tensors

CLASSIFICATION_PARAMETER = "classification"
# The datatypes Triton classifies (TRITONSERVER_DataTypeByteSize and its switch).
CLASSIFIABLE = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"}
)
# A label file larger than this is refused at load: one line per class.
MAX_LABEL_FILE_BYTES = 16 * 1024 * 1024
# Class strings one answer may hold (rows x k): each is a Python string before it is
# encoded, and k comes from the caller.
MAX_CLASS_RESULTS = 65_536


class ClassifiedOutputs(tuple[str, ...]):
    """The outputs a request asks for, some of them as classes: `classes` maps those to
    their k. A plain tuple for every other request, so that telling them apart costs a
    type() test."""

    classes: Mapping[str, int]

    def __new__(cls, names: tuple[str, ...], classes: Mapping[str, int]) -> ClassifiedOutputs:
        made = super().__new__(cls, names)
        made.classes = classes
        return made

    def __reduce__(self) -> tuple[type[tuple[str, ...]], tuple[tuple[str, ...]]]:
        # Sent to an executor process as the names alone: the frontend ranks the classes.
        return tuple, (tuple(self),)


def check_request(spec: TensorSpec, count: object) -> int:
    """The k a request asks of output `spec`, checked; FerryError (INVALID_ARGUMENT) for a
    k that is not a positive whole number or an output that cannot be ranked."""
    if type(count) is not int or count < 1:
        raise invalid_input(
            f"output '{spec.name}': parameter '{CLASSIFICATION_PARAMETER}' must be a whole "
            f"number of classes of at least 1, got {count!r}"
        )
    if spec.datatype not in CLASSIFIABLE:
        raise invalid_input(
            f"output '{spec.name}': class results are not available for its datatype "
            f"{spec.datatype} (classification ranks integer, FP32 and FP64 outputs)"
        )
    return count


def classify(outputs: Tensors, classes: Mapping[str, int], settings: ModelSettings) -> Tensors:
    """Each classified output replaced by its top-k strings."""
    labels = settings.labels
    batching = settings.batchable
    answered = dict(outputs)
    for name, count in classes.items():
        array = outputs[name]
        rows = array.reshape(array.shape[0], -1) if batching else array.reshape(1, -1)
        if rows.shape[0] * min(count, rows.shape[1]) > MAX_CLASS_RESULTS:
            raise invalid_input(
                f"output '{name}': {count} classes of {rows.shape[0]} rows is more than "
                f"{MAX_CLASS_RESULTS} class results in one answer; ask for fewer"
            )
        top = _top_classes(rows, count, labels.get(name, ()))
        answered[name] = top if batching else top.reshape(-1)
    return answered


def _top_classes(rows: Array, count: int, labels: tuple[str, ...]) -> Array:
    count = min(count, rows.shape[1])
    # Largest first, ties by index: a stable sort of the values reversed in their own
    # type (NaN last). As float64, 64-bit integers past 2**53 would tie; bitwise not
    # reverses integers exactly where negation overflows (a signed minimum, unsigned).
    reversed_values = np.invert(rows) if rows.dtype.kind in "iu" else np.negative(rows)
    order = np.argsort(reversed_values, axis=1, kind="stable")[:, :count]
    integers = rows.dtype.kind in "iu"
    answer = np.empty((rows.shape[0], count), dtype=object)
    for row in range(rows.shape[0]):
        for rank, index in enumerate(order[row].tolist()):
            value = rows[row, index]
            text = f"{int(value)}:{index}" if integers else f"{float(value):f}:{index}"
            if index < len(labels) and labels[index]:  # Triton skips an empty label
                text += f":{labels[index]}"
            answer[row, rank] = text
    return answer


def classified_settings(settings: ModelSettings, names: frozenset[str]) -> ModelSettings:
    """The settings an answer with `names` classified is encoded with: those outputs are
    BYTES. Kept per model and set of names, so that the encoders' caches, keyed by
    settings, see the same object each time; only the sets asked for last, since callers
    choose them and a model of n outputs has 2**n (a set asked for again after it went is
    made again, and answered the same)."""
    variants = _VARIANTS.setdefault(id(settings), (settings, {}))
    if variants[0] is not settings:  # a settings object gone, whose id() came back
        variants = _VARIANTS[id(settings)] = (settings, {})
    variant = variants[1].get(names)
    if variant is None:
        if len(_VARIANTS) > _VARIANTS_KEPT:
            del _VARIANTS[next(iter(_VARIANTS))]
        if len(variants[1]) >= _VARIANTS_PER_MODEL:
            del variants[1][next(iter(variants[1]))]
        outputs = tuple(
            dataclasses.replace(spec, datatype="BYTES") if spec.name in names else spec
            for spec in settings.outputs
        )
        variant = variants[1][names] = dataclasses.replace(settings, outputs=outputs)
    return variant


_VARIANTS: dict[int, tuple[ModelSettings, dict[frozenset[str], ModelSettings]]] = {}
_VARIANTS_KEPT = 64
# Sets of classified outputs kept per model: a few KB each.
_VARIANTS_PER_MODEL = 32


def read_labels(folder: Path, settings: ModelSettings) -> dict[str, tuple[str, ...]]:
    """The labels of each output whose config names a `label_filename` in the model's
    folder, one per line; raises ValueError naming a file that cannot serve."""
    labels: dict[str, tuple[str, ...]] = {}
    for spec in settings.outputs:
        if not spec.label_filename:
            continue
        path = folder / spec.label_filename
        try:
            inside = path.resolve().parent == folder.resolve()
        except (OSError, RuntimeError):
            inside = False
        if "/" in spec.label_filename or spec.label_filename.startswith(".") or not inside:
            raise ValueError(
                f"output '{spec.name}': label_filename must name a file in the model's "
                f"folder, got {spec.label_filename!r}"
            )
        try:
            size = path.stat().st_size
            if size > MAX_LABEL_FILE_BYTES:
                raise ValueError(
                    f"output '{spec.name}': label file {spec.label_filename} is {size} "
                    f"bytes, more than {MAX_LABEL_FILE_BYTES}"
                )
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"output '{spec.name}': cannot read label file {spec.label_filename}: {exc}"
            ) from None
        labels[spec.name] = _label_lines(text)
    return labels


def _label_lines(text: str) -> tuple[str, ...]:
    """One label per line, lines ended by "\n" alone (Triton reads the file with
    std::getline): splitlines() would also end one at a form feed or a Unicode line
    separator inside a label, moving every label after it to the next class. The "\r" of
    a CRLF line goes, as it did."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the file's last line ends with "\n"
    return tuple(line.removesuffix("\r") for line in lines)

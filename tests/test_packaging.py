"""What ships: the wheel's layout, the generated stubs, and wire compatibility with Triton."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor
from tritonclient.grpc import model_config_pb2 as triton_model_config
from tritonclient.grpc import service_pb2 as triton_service

from ferry.proto import grpc_service_pb2, model_config_pb2
from ferry.proto.generate import PROTO_DIR, generate

ROOT = Path(__file__).resolve().parent.parent

# Everything a build does not need: kept out of the copy the wheel is built from.
NOT_FOR_THE_BUILD = shutil.ignore_patterns(
    ".git", ".venv", ".tools", ".typecheck", "build", "dist", "*.egg-info", "__pycache__",
    ".*_cache", ".hypothesis", "benchmarks", "notes", "examples",
)


# The wheel ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build the wheel from a copy of the source tree, so the checkout stays untouched."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=NOT_FOR_THE_BUILD)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(work / "dist")],
        cwd=source, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (work / "dist").glob("ferry_inference-*.whl")
    yield built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_installs_everything_under_ferry(wheel: Path) -> None:
    names = _names(wheel)
    dist_info = [n for n in names if n.split("/")[0].endswith(".dist-info")]
    package = [n for n in names if n not in dist_info]
    stray = [n for n in package if not n.startswith("ferry/")]
    assert not stray, f"files outside ferry/: {stray}"
    tops = {n.split("/")[1] for n in package}
    assert tops == {"server", "client", "proto"}
    assert not any(n.startswith(("server/", "client/", "proto/", "tests/")) for n in names)


def test_wheel_has_protos_stubs_and_type_markers(wheel: Path) -> None:
    names = set(_names(wheel))
    for required in (
        "ferry/proto/grpc_service.proto",
        "ferry/proto/model_config.proto",
        "ferry/proto/grpc_service_pb2.py",
        "ferry/proto/grpc_service_pb2.pyi",
        "ferry/proto/grpc_service_pb2_grpc.py",
        "ferry/proto/model_config_pb2.py",
        "ferry/proto/model_config_pb2.pyi",
        "ferry/server/py.typed",
        "ferry/client/py.typed",
        "ferry/proto/py.typed",
        "ferry/server/cli.py",
    ):
        assert required in names, f"{required} missing from the wheel"
    # every module of the source tree ships
    for package in ("server", "client", "proto"):
        for module in (ROOT / package).glob("*.py"):
            assert f"ferry/{package}/{module.name}" in names


def test_wheel_metadata_and_entry_point(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        info = {Path(n).name: n for n in archive.namelist() if ".dist-info/" in n}
        entry_points = archive.read(info["entry_points.txt"]).decode()
        metadata = archive.read(info["METADATA"]).decode()
        top_level = archive.read(info["top_level.txt"]).decode().split()
    assert "ferry = ferry.server.cli:main" in entry_points
    assert "Name: ferry-inference" in metadata
    assert top_level == ["ferry"]


def test_wheel_imports_on_its_own(wheel: Path, tmp_path: Path) -> None:
    """The unpacked wheel, first on the path, provides every module it needs."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    code = (
        "import ferry.server.cli, ferry.server.app, ferry.client, ferry.proto.grpc_service_pb2\n"
        "print(ferry.server.app.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(tmp_path / "site"))


# The stubs ----------------------------------------------------------------------------


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    """proto/generate.py, run now, writes exactly the committed stubs, byte for byte.

    After editing a .proto file: `python proto/generate.py`, then commit the stubs."""
    written = {path.name: path for path in generate(tmp_path)}
    committed = {
        path.name: path
        for pattern in ("*_pb2*.py", "*_pb2*.pyi")
        for path in PROTO_DIR.glob(pattern)
    }
    assert sorted(written) == sorted(committed)
    stale = [
        name for name, path in written.items() if path.read_bytes() != committed[name].read_bytes()
    ]
    assert not stale, f"stale stubs, run `python proto/generate.py`: {stale}"


# Wire compatibility with Triton -------------------------------------------------------


def _messages(file: FileDescriptor) -> Iterator[Descriptor]:
    def walk(message: Descriptor) -> Iterator[Descriptor]:
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    for message in file.message_types_by_name.values():
        yield from walk(message)


def _enums(file: FileDescriptor) -> Iterator[EnumDescriptor]:
    yield from file.enum_types_by_name.values()
    for message in _messages(file):
        yield from message.enum_types


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    if field.enum_type is not None:
        return field.enum_type.full_name
    return ""


def _shape(field: FieldDescriptor) -> tuple[object, ...]:
    oneof = field.containing_oneof
    return (
        field.number,
        field.type,
        field.is_repeated,
        field.is_required,
        _type_name(field),
        oneof.name if oneof is not None else None,
    )


PAIRS = [(grpc_service_pb2, triton_service), (model_config_pb2, triton_model_config)]


@pytest.mark.parametrize(
    ("ours", "theirs"), PAIRS, ids=[ours.DESCRIPTOR.name for ours, _ in PAIRS]
)
def test_messages_match_tritons(ours: object, theirs: object) -> None:
    """Every field Ferry has matches Triton's field of the same name: number, type, label,
    message or enum type, and oneof. (Ferry's ModelConfig is a subset; Triton may have more.)"""
    ours_file: FileDescriptor = ours.DESCRIPTOR  # type: ignore[attr-defined]
    theirs_file: FileDescriptor = theirs.DESCRIPTOR  # type: ignore[attr-defined]
    pool = theirs_file.pool
    assert ours_file.package == theirs_file.package == "inference"
    problems = []
    checked = 0
    for message in _messages(ours_file):
        try:
            counterpart = pool.FindMessageTypeByName(message.full_name)
        except KeyError:
            problems.append(f"{message.full_name}: Triton has no such message")
            continue
        for field in message.fields:
            checked += 1
            other = counterpart.fields_by_name.get(field.name)
            if other is None:
                problems.append(f"{field.full_name}: Triton has no such field")
            elif _shape(field) != _shape(other):
                problems.append(
                    f"{field.full_name}: Ferry {_shape(field)} != Triton {_shape(other)}"
                )
    assert checked > 20
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("ours", "theirs"), PAIRS, ids=[ours.DESCRIPTOR.name for ours, _ in PAIRS]
)
def test_enums_match_tritons(ours: object, theirs: object) -> None:
    pool = theirs.DESCRIPTOR.pool  # type: ignore[attr-defined]
    problems = []
    for enum in _enums(ours.DESCRIPTOR):  # type: ignore[attr-defined]
        counterpart = pool.FindEnumTypeByName(enum.full_name)
        for value in enum.values:
            other = counterpart.values_by_name.get(value.name)
            if other is None or other.number != value.number:
                problems.append(f"{enum.full_name}.{value.name} = {value.number}")
    assert not problems, problems


def test_service_matches_tritons() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name.get(method.name)
        assert other is not None, f"Triton has no {method.name}"
        assert (
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ) == (
            other.input_type.full_name,
            other.output_type.full_name,
            other.client_streaming,
            other.server_streaming,
        ), method.name

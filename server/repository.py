"""The model repository on disk, and the policy of what may be loaded from it.

Layout: `<repository>/<model>/<version>/model.onnx`, with an optional
`<repository>/<model>/config.pbtxt`; or a single `model.onnx` served as version 1 of a
model named after the file. A model's config is read once per load, by `locate`.
Model control (Triton's --model-control-mode) says which models load at start and whether
callers may load and unload them.
"""

from __future__ import annotations

import enum
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.proto import model_config_pb2 as mc

from .config import (
    DEFAULT_MODEL_FILENAME,
    ConfigError,
    ParsedConfig,
    parse_config_json,
    read_config_file,
)
from .errors import ErrorKind, FerryError, cut, not_found


class ModelState(enum.Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


# The reason of a model of the repository that nobody asked to load.
NOT_LOADED = "not loaded"
# A version folder is named by a whole number in ASCII digits that fits int64, as in
# Triton; str.isdigit() would also take "²" (which int() refuses) and other scripts'
# digits (an Arabic-Indic one is read as 1).
_VERSION_FOLDER = re.compile(r"[0-9]{1,19}")
_MAX_VERSION = 2**63 - 1
# Most file systems' limit on one name, in bytes.
_MAX_NAME_BYTES = 255
# A name quoted in a message or log line is cut to this many characters: it came from a
# caller, and may be megabytes long.
_SHOWN_NAME_CHARS = 100


def shown(name: str) -> str:
    """A model name as messages quote it: cut when it is long."""
    return cut(name, _SHOWN_NAME_CHARS)


def is_model_name(name: str) -> bool:
    """Whether a folder of the repository may be served as a model: not hidden, and
    named in UTF-8 (no client could name it otherwise, nor could the index list it)."""
    if name.startswith("."):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, as os.fsdecode escapes them
        return False
    return True


def version_number(folder_name: str) -> int | None:
    """The version a folder holds, or None when its name is not a version."""
    if not _VERSION_FOLDER.fullmatch(folder_name):
        return None
    number = int(folder_name)
    return number if number <= _MAX_VERSION else None


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: ModelState
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where one model's files are."""

    name: str
    folder: Path
    config: ParsedConfig | None  # None: no config.pbtxt, everything from the graph
    versions: dict[int, Path]  # version -> model file
    # Version folders where something other than a file has the model file's name, in
    # words: "1/model.onnx is a directory, not a file".
    misplaced: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        """The model file's name in each version folder."""
        message = self.config.message if self.config is not None else None
        return (message.default_model_filename if message else "") or DEFAULT_MODEL_FILENAME

    def selected_versions(self) -> list[int]:
        """The versions its version_policy serves (latest 1 by default)."""
        return _select_versions(self, self.config.message if self.config else None)


class ModelRepository:
    """Finds models on disk; knows nothing of sessions."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.single_file = self.path.is_file()
        if not self.path.exists():
            raise FileNotFoundError(f"model repository {path} does not exist")

    def model_names(self) -> list[str]:
        if self.single_file:
            return [self.path.stem]
        return sorted(p.name for p in self.path.iterdir() if is_model_name(p.name) and p.is_dir())

    def holds(self, name: str) -> bool:
        """Whether `name` is a model of the repository (one stat, for an error message)."""
        if self.single_file:
            return name == self.path.stem
        if not is_model_name(name) or name in ("", "..") or "/" in name or "\0" in name:
            return False
        try:
            return (self.path / name).is_dir()
        except (OSError, ValueError):  # a name too long for the file system, say
            return False

    def location_of(self, name: str) -> Path:
        """Where a model's files are, for a log line: its folder, or the single file."""
        return self.path if self.single_file else self.path / name

    def locate(self, name: str, config_json: str | None = None) -> ModelSource:
        """A model's files and config: config.pbtxt, or `config_json`, a JSON override
        in its place (Triton's load parameter 'config'), whose default_model_filename
        then names the files too."""
        override = parse_config_json(config_json) if config_json is not None else None
        if self.single_file:
            if name != self.path.stem:
                raise not_found(f"unknown model '{shown(name)}'")
            return ModelSource(name, self.path.parent, override, {1: self.path})
        folder = self._model_folder(name)
        config_path = folder / "config.pbtxt"
        self._check_inside(name, config_path)
        config = override
        if config is None and config_path.is_file():
            config = read_config_file(config_path)
        filename = ModelSource(name, folder, config, {}).filename
        versions: dict[int, Path] = {}
        misplaced: list[str] = []
        for entry in folder.iterdir():
            number = version_number(entry.name)
            if number is not None and entry.is_dir():
                if (entry / filename).is_file():
                    versions[number] = entry / filename
                elif (found := _not_a_file(entry / filename)) is not None:
                    misplaced.append(f"{entry.name}/{filename} is {found}, not a file")
        for path in versions.values():
            self._check_inside(name, path)
        return ModelSource(name, folder, config, versions, tuple(sorted(misplaced)))

    def _check_inside(self, name: str, path: Path) -> None:
        """Refuse a model file or config that is a symlink out of the repository."""
        if path.exists() and not path.resolve().is_relative_to(self.path):
            raise FerryError(
                ErrorKind.INVALID_INPUT,
                f"model '{shown(name)}': {path.relative_to(self.path)} resolves outside the "
                "model repository",
            )

    def _model_folder(self, name: str) -> Path:
        """The folder of a model, refusing names that would leave the repository."""
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise FerryError(ErrorKind.INVALID_INPUT, f"invalid model name {shown(name)!r}")
        if len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
            raise FerryError(
                ErrorKind.INVALID_INPUT,
                f"invalid model name '{shown(name)}': longer than the {_MAX_NAME_BYTES} "
                "bytes of a folder name",
            )
        folder = self.path / name
        resolved = folder.resolve()
        if resolved.parent != self.path:
            raise FerryError(
                ErrorKind.INVALID_INPUT,
                f"model '{name}' resolves outside the model repository",
            )
        if not folder.is_dir():
            raise not_found(f"model '{shown(name)}' is not in the model repository")
        return folder


def _not_a_file(path: Path) -> str | None:
    """What is at `path`, which is not a regular file: None where there is nothing."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a symbolic link to nothing" if path.is_symlink() else None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def _select_versions(source: ModelSource, config: mc.ModelConfig | None) -> list[int]:
    available = sorted(source.versions)
    policy = config.version_policy if config is not None else mc.ModelVersionPolicy()
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return available
    if choice == "specific":
        # each version once: a list that names one a million times loads it once
        wanted = sorted(set(policy.specific.versions))
        missing = [v for v in wanted if v not in source.versions]
        if missing:
            shown_missing = ", ".join(str(v) for v in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ConfigError(
                f"version_policy names versions [{shown_missing}]{more} that have no model file"
            )
        return wanted
    count = policy.latest.num_versions if choice == "latest" else 1
    return available[-max(1, count) :]


# Model control ----------------------------------------------------------------------------


class ModelControlMode(enum.Enum):
    """As Triton's --model-control-mode."""

    NONE = "none"  # the repository loads at start; load/unload RPCs are refused
    EXPLICIT = "explicit"  # load/unload RPCs allowed; only --load-model models load at start
    POLL = "poll"  # the repository loads at start and is watched; load/unload RPCs refused


LOAD_ALL = "*"


@dataclass(frozen=True, slots=True)
class ModelControl:
    mode: ModelControlMode = ModelControlMode.NONE
    startup_models: tuple[str, ...] = ()  # explicit mode: names to load at start, or "*"
    allow_load_overrides: bool = False

    def __post_init__(self) -> None:
        if self.startup_models and self.mode is not ModelControlMode.EXPLICIT:
            raise ValueError(
                f"--load-model needs --model-control-mode=explicit "
                f"(got {self.mode.value}, which loads the whole repository)"
            )

    def models_at_start(self) -> tuple[str, ...] | None:
        """The models to load at start; None means every model of the repository."""
        if self.mode is not ModelControlMode.EXPLICIT or LOAD_ALL in self.startup_models:
            return None
        return self.startup_models

    def check_rpc(self, action: str) -> None:
        """Refuse RepositoryModelLoad/Unload unless the server runs in explicit mode."""
        if self.mode is not ModelControlMode.EXPLICIT:
            raise FerryError(
                ErrorKind.PERMISSION_DENIED,
                f"model {action} is turned off: the server runs with "
                f"--model-control-mode={self.mode.value}; "
                "--model-control-mode=explicit allows it",
            )

    def config_override(self, parameters: Mapping[str, Any]) -> str | None:
        """The JSON model config a load request sends to replace config.pbtxt, if it may.

        Without --allow-load-overrides every load parameter is refused; with it, only
        'config' (as Triton's, a JSON ModelConfig). File overrides are never accepted:
        a load may name only what is already inside the repository."""
        given = sorted(parameters)
        if not given:
            return None
        if not self.allow_load_overrides:
            raise FerryError(
                ErrorKind.PERMISSION_DENIED,
                f"load parameters ({', '.join(repr(n) for n in given)}) override the "
                "repository's config or files and are turned off; "
                "--allow-load-overrides allows a config override",
            )
        others = [name for name in given if name != "config"]
        if others:
            raise FerryError(
                ErrorKind.PERMISSION_DENIED,
                f"load parameters {', '.join(repr(n) for n in others)} are not accepted: "
                "Ferry takes model files only from its repository; 'config' is the one "
                "override it allows",
            )
        config = parameters["config"]
        if config.WhichOneof("parameter_choice") != "string_param":
            raise FerryError(
                ErrorKind.INVALID_INPUT, "load parameter 'config' must be a JSON string"
            )
        return str(config.string_param)

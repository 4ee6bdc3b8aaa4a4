"""Every ```python block of README.md runs, as the README tells a new user to run it: against
the example model served by Ferry, from an environment with only what the README has had
them install by then (the quick start's `.venv`: Ferry with its CPU runtime, plus what a
`pip install` line right above the block adds)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import RunningServer
from tests.external_tools import REPO

README = REPO / "README.md"
DOCUMENTED_ADDRESS = "127.0.0.1:8001"  # where scripts/serve-example.sh serves gRPC
DOCUMENTED_HTTP_ADDRESS = "127.0.0.1:8000"  # and REST
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[int, str, str]]:
    """(line number, block, README text between the previous code block and this one)."""
    text = README.read_text()
    blocks, previous_end = [], 0
    for match in FENCE.finditer(text):
        if match.group(1) == "python":
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((line, match.group(2), text[previous_end : match.start()]))
        previous_end = match.end()
    return blocks


BLOCKS = python_blocks()


def test_readme_has_the_client_examples() -> None:
    assert len(BLOCKS) >= 3
    assert all(
        DOCUMENTED_ADDRESS in block or DOCUMENTED_HTTP_ADDRESS in block
        for _, block, _ in BLOCKS
    )


def runtime_distributions() -> set[str]:
    """Ferry with the `cpu` extra and everything it requires, recursively: what the quick
    start (scripts/setup.sh without `test`) installs."""
    found: set[str] = set()
    visited: set[tuple[str, frozenset[str]]] = set()
    pending = [("ferry-inference", frozenset({"cpu"}))]
    while pending:
        name, extras = pending.pop()
        if (canonicalize_name(name), extras) in visited:
            continue
        visited.add((canonicalize_name(name), extras))
        found.add(canonicalize_name(name))
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in extras or {""}):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def imported_distributions(block: str) -> set[str]:
    """The distributions that provide the block's top-level imports (stdlib left out)."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    providers = metadata.packages_distributions()
    distributions = set()
    for module in modules - set(sys.stdlib_module_names):
        assert module in providers, f"no installed distribution provides {module!r}"
        distributions |= {canonicalize_name(d) for d in providers[module]}
    return distributions


def pip_installed(text: str) -> set[str]:
    """Distributions named by `pip install` commands (in backquotes) in a piece of README."""
    named = set()
    for command in re.findall(r"`([^`]*pip install[^`]*)`", text):
        words = command.split("pip install", 1)[1].split()
        skip_next = False
        for word in words:
            if skip_next:
                skip_next = False
            elif word in {"-c", "-r", "--constraint"}:
                skip_next = True
            elif not word.startswith("-"):
                named.add(canonicalize_name(Requirement(word.strip("\"'")).name))
    return named


@pytest.mark.parametrize(("line", "block", "before"), BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_block_needs_only_what_the_readme_installed(line: int, block: str, before: str) -> None:
    needed = imported_distributions(block) - runtime_distributions()
    missing = needed - pip_installed(before)
    assert not missing, (
        f"README.md:{line}: the block imports {sorted(missing)}, which the quick start does "
        "not install and no `pip install` line above the block names"
    )


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = RunningServer(REPO / "examples" / "model_repository")
    yield running
    running.close()


@pytest.mark.parametrize(("line", "block", "before"), BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_block_runs_against_the_example_model(
    line: int, block: str, before: str, server: RunningServer, tmp_path: Path
) -> None:
    script = tmp_path / f"readme_line{line}.py"
    script.write_text(
        block.replace(DOCUMENTED_ADDRESS, server.address).replace(
            DOCUMENTED_HTTP_ADDRESS, server.http_address
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"README.md:{line}:\n{done.stderr}"
    assert done.stderr == "", f"README.md:{line} printed to stderr:\n{done.stderr}"
    assert done.stdout.strip(), f"README.md:{line} printed nothing"

"""The README's curl examples of the REST port, run as written against the example model:
each command's output must be what the comment under it says. Only the port changes, since
tests listen on a free one."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import RunningServer
from tests.external_tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
README_PORT = "127.0.0.1:8000"


def readme_examples() -> list[tuple[str, str]]:
    """(command, expected output) pairs of the first sh block of the REST section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## REST (HTTP/JSON)", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the README's REST section has no sh block"
    examples: list[tuple[str, str]] = []
    command: list[str] = []
    for line in block.group(1).splitlines():
        if line.startswith("# "):
            examples.append(("\n".join(command), line[2:]))
            command = []
        else:
            command.append(line)
    assert not command, "every command is followed by its expected output"
    return examples


def test_readme_has_curl_examples() -> None:
    examples = readme_examples()
    assert len(examples) >= 4
    assert all(command.startswith("curl ") and README_PORT in command
               for command, _ in examples)


def test_readme_curl_examples_run_as_written(start_server: Callable[..., RunningServer]) -> None:
    require_tool("curl", "install curl (apt-get install curl)")
    server = start_server(ROOT / "examples" / "model_repository")
    for command, expected in readme_examples():
        run = command.replace(README_PORT, server.http_address)
        result = subprocess.run(["bash", "-c", run], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.strip() == expected, command

"""Find the external programs that integration tests drive: scripts/install-test-tools.sh puts
them in .tools/. A missing tool skips its test on a developer's machine and fails it in CI
(where the CI variable is set), so that CI can never pass by silently running nothing."""

from __future__ import annotations

import ctypes.util
import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools"
INSTALL_HINT = "run scripts/install-test-tools.sh"
SYSTEM_HINT = (
    "scripts/install-system-tools.sh installs it as root with apt-get"
    " (skipped when FERRY_SKIP_SYSTEM_TOOLS=1)"
)


def missing(message: str) -> NoReturn:
    """Skip locally, fail loudly in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message)


def require_tool(name: str, hint: str = INSTALL_HINT) -> str:
    """The path of an executable, from .tools/bin first, then PATH."""
    pinned = TOOLS / "bin" / name
    if pinned.is_file() and os.access(pinned, os.X_OK):
        return str(pinned)
    found = shutil.which(name)
    if found is None:
        missing(f"{name} not found in .tools/bin or on PATH: {hint}")
    return found


def require_system_library(name: str, package: str) -> None:
    """A shared library that a system package provides (found as the dynamic linker would)."""
    if ctypes.util.find_library(name) is None:
        missing(f"lib{name} not found (Debian package {package}): {SYSTEM_HINT}")

"""scripts/setup.sh installs Ferry in editable mode: the install must be a plain .pth line
(src/, where src/ferry/ links to server/, client/ and proto/), so that setuptools needs no
import hook and prints none of its multi-line "Editable installation" warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.external_tools import REPO

# The build reads only these; the copy keeps src/'s symlinks as symlinks, as a checkout does.
NOT_FOR_THE_BUILD = shutil.ignore_patterns(
    ".git", ".venv", ".tools", ".typecheck", "build", "dist", "*.egg-info", "__pycache__",
    ".*_cache", ".hypothesis", "benchmarks", "examples", "deploy", "tests", "node_modules",
)

# Every warning the backend emits becomes an error, as it would be shown by pip.
BUILD_EDITABLE = """\
import sys, warnings
warnings.simplefilter("error")
from setuptools import build_meta
print(build_meta.build_editable(sys.argv[1]))
"""


def test_src_links_to_the_three_packages() -> None:
    for package in ("server", "client", "proto"):
        link = REPO / "src" / "ferry" / package
        assert link.is_symlink(), link
        assert link.resolve() == (REPO / package).resolve()
    assert not (REPO / "src" / "ferry" / "__init__.py").exists()  # `ferry` stays a namespace


def test_editable_wheel_is_a_plain_pth_and_builds_without_warnings(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=NOT_FOR_THE_BUILD)
    (tmp_path / "dist").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", BUILD_EDITABLE, str(tmp_path / "dist")],
        cwd=source, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Editable installation" not in done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("ferry_inference-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if ".dist-info/" not in n]
        assert names == ["__editable__.ferry_inference-0.1.0.pth"], names
        pth = archive.read(names[0]).decode().split()
    assert pth == [str(source / "src")]


def test_installed_ferry_is_the_checkout() -> None:
    """In .venv, ferry.server is this checkout's server/ (through src/ferry/server)."""
    import ferry.server.app

    assert Path(ferry.server.app.__file__).resolve() == (REPO / "server" / "app.py").resolve()

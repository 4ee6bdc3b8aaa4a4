"""scripts/install-system-tools.sh, the only step of the test set-up that changes the machine
outside the repository: what it installs, that it says so, and that FERRY_SKIP_SYSTEM_TOOLS=1
or a non-root user keeps it from touching anything. apt-get, dpkg and id are stand-ins on a
PATH of their own, so the real script runs and nothing is installed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.external_tools import REPO

SCRIPTS = REPO / "scripts"
SYSTEM_SCRIPT = SCRIPTS / "install-system-tools.sh"


def fake_system(root: Path, *, uid: int, installed: bool) -> tuple[dict[str, str], Path]:
    """A PATH with recording stand-ins for the system's package tools; the calls log."""
    bin_dir, log = root / "bin", root / "calls.log"
    bin_dir.mkdir()
    stubs = {
        "apt-get": f'echo "apt-get $*" >> {log}',
        "systemctl": f'echo "systemctl $*" >> {log}',
        "deb-systemd-helper": f'echo "deb-systemd-helper $*" >> {log}',
        "dpkg": f"exit {0 if installed else 1}",
        "id": f'[ "$1" = -u ] && echo {uid}',
    }
    if installed:
        stubs |= {"prometheus": "exit 0", "promtool": "exit 0"}
    for name, body in stubs.items():
        stub = bin_dir / name
        stub.write_text(f"#!/bin/bash\n{body}\n")
        stub.chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(root)}, log


def run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", str(SYSTEM_SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_root_installs_the_packages_without_recommends_and_says_so(tmp_path: Path) -> None:
    env, log = fake_system(tmp_path, uid=0, installed=False)
    done = run_script(env)
    assert done.returncode == 0, done.stderr
    assert "installing Debian packages system-wide: libb64-0d prometheus" in done.stderr
    assert "FERRY_SKIP_SYSTEM_TOOLS=1 skips this step" in done.stderr
    made = calls(log)
    assert made[:2] == [
        "apt-get update -qq",
        "apt-get install -y -qq --no-install-recommends libb64-0d prometheus",
    ]
    # The package enables a system service; the script turns it off again.
    assert made[2:] in (
        ["deb-systemd-helper disable prometheus.service"],
        ["systemctl disable --now prometheus"],
    )


def test_skip_variable_installs_nothing(tmp_path: Path) -> None:
    env, log = fake_system(tmp_path, uid=0, installed=False)
    done = run_script({**env, "FERRY_SKIP_SYSTEM_TOOLS": "1"})
    assert done.returncode == 0, done.stderr
    assert calls(log) == []
    assert "FERRY_SKIP_SYSTEM_TOOLS=1, not installing libb64-0d prometheus" in done.stderr
    assert "will skip" in done.stderr


def test_a_user_gets_the_command_instead(tmp_path: Path) -> None:
    env, log = fake_system(tmp_path, uid=1000, installed=False)
    done = run_script(env)
    assert done.returncode == 0, done.stderr
    assert calls(log) == []
    assert "sudo apt-get install --no-install-recommends libb64-0d prometheus" in done.stderr


def test_nothing_happens_when_everything_is_there(tmp_path: Path) -> None:
    env, log = fake_system(tmp_path, uid=0, installed=True)
    done = run_script(env)
    assert (done.returncode, done.stdout, done.stderr, calls(log)) == (0, "", "", [])


@pytest.mark.parametrize("script", ["install-test-tools.sh", "setup.sh", "test.sh"])
def test_only_the_system_script_changes_the_system(script: str) -> None:
    """Every apt-get, systemctl or sudo of the set-up is in install-system-tools.sh."""
    code = [
        line
        for line in (SCRIPTS / script).read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    offending = [line for line in code if re.search(r"\b(apt-get|apt|systemctl|sudo)\b", line)]
    assert not offending, offending
    if script == "install-test-tools.sh":
        assert "scripts/install-system-tools.sh" in code

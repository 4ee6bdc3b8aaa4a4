"""The cpu image's install path, run without Docker (no Docker engine runs here): the
Dockerfile's own COPY and RUN steps of the build-cpu stage, with its ENV, in a fresh folder
that stands in for the image's file system, then the cpu stage's command and health check on
what they installed.

What differs from `docker build`, and only that: the image's root paths (/src, /opt/ferry)
are folders under a temporary directory, the base image's `python` is this machine's Python
3.11, and runtime-base's user and /models set-up (groupadd, useradd, mkdir /models as root)
is left out."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.server import healthcheck
from tests.external_tools import REPO
from tests.test_dockerfile import DOCKERFILE, instructions, stage
from tests.waiting import wait_until

MODEL_REPOSITORY = REPO / "examples" / "model_repository"
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")  # as .dockerignore says


def key_values(arguments: str) -> dict[str, str]:
    """ENV's `KEY=VALUE KEY2=VALUE2` form."""
    return dict(word.split("=", 1) for word in shlex.split(arguments))


class ImageRoot:
    """A folder standing in for the image's `/`: maps the stage's absolute paths into it."""

    def __init__(self, root: Path, image_paths: list[str]) -> None:
        self.root = root
        # Longest first, so that /opt/ferry/bin is not mapped through a shorter prefix.
        self.image_paths = sorted(set(image_paths), key=len, reverse=True)

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def command(self, text: str) -> str:
        for image_path in self.image_paths:
            text = re.sub(rf"(?<![\w/.]){re.escape(image_path)}(?=[/\s\"']|$)",
                          str(self.path(image_path)), text)  # fmt: skip
        return text


def base_python_dir(tmp_path: Path) -> Path:
    """A folder with `python` and `python3`: the base image's interpreter, stood in for."""
    folder = tmp_path / "base-image-bin"
    folder.mkdir()
    base = Path(getattr(sys, "_base_executable", sys.executable))
    for name in ("python", "python3"):
        (folder / name).symlink_to(base)
    return folder


def build_cpu_stage(tmp_path: Path) -> tuple[ImageRoot, dict[str, str]]:
    """Run build-cpu's steps; returns the image root and the stage's environment."""
    steps = stage(instructions(DOCKERFILE.read_text()), "build-cpu")
    workdirs = [arguments for keyword, arguments in steps if keyword == "WORKDIR"]
    venvs = [
        match.group(1)
        for keyword, arguments in steps
        if keyword == "RUN"
        for match in re.finditer(r"-m venv (/\S+)", arguments)
    ]
    assert workdirs and venvs, steps
    image = ImageRoot(tmp_path / "image", workdirs + venvs)
    python_dir = base_python_dir(tmp_path)
    env = {
        "PATH": f"{python_dir}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
    }
    workdir = image.path("/")
    for keyword, arguments in steps[1:]:  # steps[0] is the FROM
        if keyword == "ENV":
            env |= key_values(arguments)
        elif keyword == "WORKDIR":
            workdir = image.path(arguments)
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, destination = arguments.split()
            target = image.path(destination) if destination.startswith("/") else (
                workdir / destination
            )
            for source in sources:
                origin = REPO / source
                if origin.is_dir():
                    # Docker copies a folder's contents, symlinks as symlinks.
                    shutil.copytree(origin, target, symlinks=True, ignore=IGNORED,
                                    dirs_exist_ok=True)  # fmt: skip
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target / origin.name)
        elif keyword == "RUN":
            command = image.command(arguments)
            # No root path of the image is left for the command to write to.
            assert not re.search(r"(?<![\w/.])/(opt|src)\b", command), command
            done = subprocess.run(
                ["/bin/sh", "-c", command], cwd=workdir, env=env,
                capture_output=True, text=True, timeout=900, check=False,
            )  # fmt: skip
            assert done.returncode == 0, f"RUN {arguments}\n{done.stdout}{done.stderr}"
        else:
            pytest.fail(f"build-cpu has a {keyword} step that this test does not run")
    return image, env


@pytest.mark.timeout(1200)  # about 15 s here: pip downloads the pinned wheels (no cache)
def test_cpu_image_install_steps_serve_the_example(tmp_path: Path) -> None:
    image, build_env = build_cpu_stage(tmp_path)
    steps = instructions(DOCKERFILE.read_text())
    cpu = stage(steps, "cpu")
    # The cpu stage takes build-cpu's venv whole, at the same path.
    (copied,) = [a for k, a in cpu if k == "COPY"]
    assert copied == "--from=build-cpu /opt/ferry /opt/ferry"
    venv_bin = image.path("/opt/ferry/bin")
    # runtime-base puts the venv first on PATH; its CMD, with the example repository for
    # /models and an ephemeral port on loopback.
    runtime_path = key_values(dict(stage(steps, "runtime-base"))["ENV"])["PATH"]
    assert runtime_path.startswith("/opt/ferry/bin:")
    env = {**build_env, "PATH": f"{venv_bin}{os.pathsep}{build_env['PATH']}"}
    (command,) = [a for k, a in cpu if k == "CMD"]
    argv = [image.command(word) for word in shlex.split(command.strip("[]").replace(",", " "))]
    assert argv == ["ferry", "serve", "/models"]
    log = tmp_path / "ferry.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [str(venv_bin / "ferry"), "serve", str(MODEL_REPOSITORY), "--host", "127.0.0.1",
             "--grpc-port", "0", "--http-port", "0", "--metrics-port", "-1"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # The installed package is the image's, not this checkout's editable one.
        where = subprocess.run(
            [str(venv_bin / "python"), "-c", "import ferry.server.app as m; print(m.__file__)"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()
        assert where.startswith(str(image.path("/opt/ferry"))), where
        serving = re.compile(r"serving the Open Inference Protocol on 127\.0\.0\.1:(\d+)")
        wait_until(
            lambda: bool(serving.search(log.read_text())) or process.poll() is not None, 60
        )
        match = serving.search(log.read_text())
        assert match, log.read_text()
        address = f"127.0.0.1:{match.group(1)}"
        # The image's HEALTHCHECK, with the image's python.
        (health,) = [a for k, a in stage(steps, "runtime-base") if k == "HEALTHCHECK"]
        assert '"python", "-m", "ferry.server.healthcheck", "127.0.0.1:8001"' in health
        done = subprocess.run(
            ["python", "-m", "ferry.server.healthcheck", address],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert healthcheck.check(address, "digits") == "SERVING"
        process.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL: a graceful drain
        assert process.wait(60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

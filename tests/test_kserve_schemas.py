"""deploy/kserve/: the KServe manifests validate against deploy/kserve/schemas/ (KServe's own
fields, with the Kubernetes types they embed checked by kubernetes-validate's strict
schemas), and a typo or a wrong type anywhere in them fails."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.external_tools import REPO

KSERVE = REPO / "deploy" / "kserve"
VALIDATE = KSERVE / "schemas" / "validate.py"
Doc = dict[str, Any]


def load_validate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kserve_validate", VALIDATE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def schemas() -> Any:
    return load_validate().KServeSchemas()


def manifest(name: str) -> Doc:
    (doc,) = list(yaml.safe_load_all((KSERVE / name).read_text()))
    return dict(doc)


def test_every_kserve_manifest_validates(schemas: Any) -> None:
    files = sorted(KSERVE.glob("*.yaml"))
    kinds = set()
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.add(doc["kind"])
            assert list(schemas.errors(doc)) == [], path.name
    assert kinds == {"ServingRuntime", "InferenceService"}


def set_in(path: list[str | int], value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        node: Any = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def rename(path: list[str | int], old: str, new: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        node: Any = doc
        for key in path:
            node = node[key]
        node[new] = node.pop(old)

    return mutate


MUTATIONS = {
    # InferenceService: KServe's fields, the inlined Container and the inlined PodSpec.
    "isvc-storageURI": ("inferenceservice.yaml", rename(["spec", "predictor", "model"],
                        "storageUri", "storageURI"), "'storageURI' was unexpected"),
    "isvc-minReplicas-type": ("inferenceservice.yaml", set_in(["spec", "predictor",
                              "minReplicas"], "one"), "'one' is not of type 'integer'"),
    "isvc-protocol": ("inferenceservice.yaml", set_in(["spec", "predictor", "model",
                      "protocolVersion"], "grpc-v3"), "'grpc-v3' is not one of"),
    "isvc-predictor-typo": ("inferenceservice.yaml", rename(["spec"], "predictor",
                            "predicter"), "'predictor' is a required property"),
    "isvc-resources-typo": ("inferenceservice.yaml", rename(["spec", "predictor", "model",
                            "resources"], "requests", "request"), "'request' was unexpected"),
    "isvc-pod-field-type": ("inferenceservice.yaml", set_in(["spec", "predictor",
                            "serviceAccountName"], 7), "7 is not of type"),
    # ServingRuntime: its spec, a supported format, and the core Container inside.
    "sr-spec-typo": ("servingruntime.yaml", rename(["spec"], "supportedModelFormats",
                     "supportedModelFormat"), "'supportedModelFormat' was unexpected"),
    "sr-format-priority": ("servingruntime.yaml", set_in(["spec", "supportedModelFormats", 0,
                           "priority"], 0), "0 is less than the minimum of 1"),
    "sr-container-typo": ("servingruntime.yaml", rename(["spec", "containers", 0], "image",
                          "imagee"), "'imagee' was unexpected"),
    "sr-probe-type": ("servingruntime.yaml", set_in(["spec", "containers", 0, "readinessProbe",
                      "periodSeconds"], "5s"), "'5s' is not of type"),
    "sr-kind": ("servingruntime.yaml", set_in(["apiVersion"], "serving.kserve.io/v1beta1"),
                "no schema for serving.kserve.io/v1beta1 ServingRuntime"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_mutated_manifest_fails(name: str, schemas: Any) -> None:
    file, mutate, expected = MUTATIONS[name]
    doc = copy.deepcopy(manifest(file))
    assert list(schemas.errors(doc)) == []
    mutate(doc)
    errors = list(schemas.errors(doc))
    assert errors, f"{name}: the mutated manifest still validates"
    assert any(expected in error for error in errors), errors


def test_command_line_passes_the_manifests_and_names_a_broken_one(tmp_path: Path) -> None:
    good = subprocess.run(
        [sys.executable, str(VALIDATE), *map(str, sorted(KSERVE.glob("*.yaml")))],
        capture_output=True, text=True, timeout=60,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.count(": valid (KServe 0.15, Kubernetes 1.30.0)") == 2, good.stdout
    broken = manifest("servingruntime.yaml")
    broken["spec"]["containers"][0]["imagee"] = broken["spec"]["containers"][0].pop("image")
    path = tmp_path / "runtime.yaml"
    path.write_text(yaml.safe_dump(broken))
    bad = subprocess.run([sys.executable, str(VALIDATE), str(path)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 1
    assert f"{path}: ServingRuntime ferry-onnx: spec.containers.0:" in bad.stderr, bad.stderr
    assert "'imagee' was unexpected" in bad.stderr
    missing = subprocess.run([sys.executable, str(VALIDATE), str(tmp_path / "none.yaml")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "cannot read" in missing.stderr


PLACEHOLDER = "registry.example.com/ferry:cpu"


def test_manifests_name_the_placeholder_image_that_the_readme_replaces(schemas: Any) -> None:
    """Both manifests that run Ferry name the placeholder, and the README's own sed line,
    run as written, puts a registry in its place."""
    deployment = yaml.safe_load((REPO / "deploy/kubernetes/deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == PLACEHOLDER
    assert manifest("servingruntime.yaml")["spec"]["containers"][0]["image"] == PLACEHOLDER
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Kubernetes and KServe") :]
    assert 'docker push "$REGISTRY/ferry:cpu"' in section
    (sed,) = {line.split('"')[1] for line in section.splitlines() if line.startswith("sed ")}
    assert sed == f"s#{PLACEHOLDER}#$REGISTRY/ferry:cpu#"
    done = subprocess.run(
        ["bash", "-c", f'sed "{sed}" deploy/kserve/servingruntime.yaml'],
        cwd=REPO, env={"REGISTRY": "registry.test/team", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    applied = yaml.safe_load(done.stdout)
    assert applied["spec"]["containers"][0]["image"] == "registry.test/team/ferry:cpu"
    assert list(schemas.errors(applied)) == []

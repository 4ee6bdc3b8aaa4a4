#!/usr/bin/env python3
"""Check KServe manifests (ServingRuntime, InferenceService) against the schema beside this
script, strictly: an unknown field or a wrong type is an error. kubernetes-validate has no
schema for KServe's kinds (it only warns, and passes them); this fills that gap.

    .venv/bin/python deploy/kserve/schemas/validate.py deploy/kserve/*.yaml

Needs PyYAML, jsonschema and kubernetes-validate (scripts/setup.sh test). Exits 0 when every
document validates, 1 after printing each error, 2 on a file it cannot read.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

SCHEMA = Path(__file__).with_name("serving.kserve.io-v0.15.yaml")
KUBERNETES_ID = "https://kubernetes.io/api/_definitions.json"
Json = dict[str, Any]


def kubernetes_definitions(version: str) -> Json:
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    text = (folder / f"v{version}-local-strict" / "_definitions.json").read_text()
    definitions: Json = json.loads(text)
    assert definitions["$id"] == KUBERNETES_ID, definitions["$id"]
    return definitions


def absolute_refs(node: Any) -> Any:
    """Kubernetes schema parts copied out of their file, with their $refs made absolute."""
    if isinstance(node, dict):
        result = {key: absolute_refs(value) for key, value in node.items()}
        ref = result.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            result["$ref"] = KUBERNETES_ID + ref
        return result
    if isinstance(node, list):
        return [absolute_refs(item) for item in node]
    return node


class KServeSchemas:
    """One validator per (apiVersion, kind) that the schema file describes."""

    def __init__(self, path: Path = SCHEMA) -> None:
        document = yaml.safe_load(path.read_text())
        self.kserve_version = str(document["kserveVersion"])
        self.kubernetes_version = str(document["kubernetesVersion"])
        self._kubernetes = kubernetes_definitions(self.kubernetes_version)
        self._defs = document["$defs"]
        defs = {name: self._expand(schema) for name, schema in self._defs.items()}
        registry: Registry = Resource.from_contents(self._kubernetes) @ Registry()
        self.validators = {}
        for key, schema in document["kinds"].items():
            full = {"$schema": document["$schema"], "$defs": defs, **self._expand(schema)}
            jsonschema.Draft202012Validator.check_schema(full)
            self.validators[key] = jsonschema.Draft202012Validator(full, registry=registry)

    def _inline_properties(self, reference: str) -> Json:
        if reference.startswith("k8s:"):
            source = self._kubernetes["$defs"][reference.removeprefix("k8s:")]
            return dict(absolute_refs(source["properties"]))
        if reference.startswith("#/$defs/"):
            return dict(self._expand(self._defs[reference.removeprefix("#/$defs/")])["properties"])
        raise ValueError(f"x-inline {reference!r}: expected k8s:NAME or #/$defs/NAME")

    def _expand(self, node: Any) -> Any:
        """k8s:NAME refs made Kubernetes refs; x-inline objects given the inlined fields."""
        if isinstance(node, list):
            return [self._expand(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = copy.copy(node)
        inlined: Json = {}
        for reference in node.pop("x-inline", []):
            inlined |= self._inline_properties(reference)
        expanded = {key: self._expand(value) for key, value in node.items()}
        if inlined:
            expanded["properties"] = inlined | expanded.get("properties", {})
        ref = expanded.get("$ref")
        if isinstance(ref, str) and ref.startswith("k8s:"):
            expanded["$ref"] = f"{KUBERNETES_ID}#/$defs/{ref.removeprefix('k8s:')}"
        return expanded

    def errors(self, document: Json) -> Iterator[str]:
        """Every error of one manifest, each as `field.path: message`."""
        key = f"{document.get('apiVersion')} {document.get('kind')}"
        validator = self.validators.get(key)
        if validator is None:
            yield f"no schema for {key} (have: {', '.join(sorted(self.validators))})"
            return
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.path)):
            where = ".".join(str(part) for part in error.absolute_path) or "(top)"
            yield f"{where}: {error.message}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifests", nargs="+", type=Path, help="YAML files, one or more documents")
    args = parser.parse_args(argv)
    schemas = KServeSchemas()
    failed = 0
    for path in args.manifests:
        try:
            documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as error:
            print(f"{path}: cannot read: {error}", file=sys.stderr)
            return 2
        for document in documents:
            name = document.get("metadata", {}).get("name", "?")
            problems = list(schemas.errors(document))
            for problem in problems:
                print(f"{path}: {document.get('kind')} {name}: {problem}", file=sys.stderr)
            failed += bool(problems)
            if not problems:
                print(f"{path}: {document.get('kind')} {name}: valid "
                      f"(KServe {schemas.kserve_version}, Kubernetes {schemas.kubernetes_version})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

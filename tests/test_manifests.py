"""deploy/: every Kubernetes manifest validates offline against the Kubernetes schemas
(kubernetes-validate, strict), KServe's custom resources have the fields KServe needs, and
the manifests agree with each other and with Ferry (ports, drain timing, metric names)."""

from __future__ import annotations

import copy
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import RunningServer
from tests.external_tools import REPO, missing

DEPLOY = REPO / "deploy"
# The oldest Kubernetes these manifests claim (native gRPC probes are GA since 1.27, the
# HPA's autoscaling/v2 since 1.23) and the newest that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
Doc = dict[str, Any]


def documents(folder: Path) -> list[tuple[Path, Doc]]:
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            found.append((path, doc))
    return found


def manifests(folder: Path) -> list[tuple[Path, Doc]]:
    return [(path, doc) for path, doc in documents(folder) if "kind" in doc]


def one(kind: str, folder: Path = DEPLOY / "kubernetes", name: str | None = None) -> Doc:
    found = [
        doc
        for _, doc in manifests(folder)
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {folder}, found {len(found)}"
    return found[0]


def flag(args: list[str], name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    return value


def validate(doc: Doc, version: str) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not in .venv: run scripts/setup.sh test")
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version: str) -> None:
    docs = manifests(DEPLOY / "kubernetes")
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds
    for path, doc in docs:
        try:
            validate(doc, version)
        except Exception as error:  # the library raises several types: say which file
            pytest.fail(f"{path.relative_to(REPO)}: {doc['kind']} {error}")


def test_validation_rejects_a_broken_manifest() -> None:
    """The schemas are really applied: a misspelt field and a wrong type both fail."""
    import kubernetes_validate

    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_deployment_probes_drain_and_scraping_agree_with_ferry() -> None:
    pod = one("Deployment")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    grpc_port = int(flag(args, "grpc-port"))
    metrics_port = int(flag(args, "metrics-port"))
    http_port = int(flag(args, "http-port"))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
    for probe in ("startupProbe", "readinessProbe"):
        # Native gRPC probes: grpc.health.v1 with the default service "".
        assert container[probe]["grpc"] == {"port": grpc_port}, probe
    # Liveness: the REST port's /v2/health/live, 200 while draining or not ready.
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # The kubelet's SIGKILL must come after preStop's sleep plus Ferry's whole drain.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain_s = float(command[1]) + float(flag(args, "shutdown-grace"))
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain_s
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_services_expose_the_grpc_port_by_name() -> None:
    deployment = one("Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    for name, headless in (("ferry", False), ("ferry-headless", True)):
        service = one("Service", name=name)["spec"]
        assert service["selector"] == selector
        assert (service.get("clusterIP") == "None") is headless
        grpc = next(port for port in service["ports"] if port["name"] == "grpc")
        assert grpc["targetPort"] == "grpc"
        assert grpc["appProtocol"] == "kubernetes.io/h2c"


def test_hpa_scales_the_deployment_on_a_metric_the_adapter_serves() -> None:
    hpa = one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": one("Deployment")["metadata"]["name"],
    }
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    adapter_values = DEPLOY / "kubernetes" / "prometheus-adapter" / "values.yaml"
    values = yaml.safe_load(adapter_values.read_text())
    served = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    assert name in served
    assert served[name]["seriesQuery"].startswith(f"{name}{{")


def test_ferry_exports_the_autoscaling_metric(start_server) -> None:
    server: RunningServer = start_server(REPO / "examples" / "model_repository")
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert 'ferry_queue_depth{model="digits"}' in text


def test_kserve_serving_runtime_declares_ferry_for_onnx_over_grpc() -> None:
    runtime = one("ServingRuntime", folder=DEPLOY / "kserve")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert "onnx" in {fmt["name"] for fmt in spec["supportedModelFormats"]}
    assert "grpc-v2" in spec["protocolVersions"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    args = container["args"]
    assert args[:2] == ["serve", "/mnt/models"]  # where KServe's storage initializer puts it
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("h2c", int(flag(args, "grpc-port")))
    assert spec["annotations"] == {
        "prometheus.kserve.io/port": flag(args, "metrics-port"),
        "prometheus.kserve.io/path": "/metrics",
    }
    # The container is a core v1 Container: check it against the Pod schema.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
           "spec": {"containers": [container]}}  # fmt: skip
    for version in KUBERNETES_VERSIONS:
        validate(pod, version)


def test_kserve_inference_service_uses_the_runtime() -> None:
    service = one("InferenceService", folder=DEPLOY / "kserve")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["metadata"]["name"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == one("ServingRuntime", folder=DEPLOY / "kserve")["metadata"]["name"]
    assert model["modelFormat"]["name"] == "onnx"
    assert model["protocolVersion"] == "grpc-v2"
    assert model["storageUri"]

"""Ferry's metrics as Prometheus itself sees them: promtool's checks, a real Prometheus
server scraping a real Ferry over loopback, and the Grafana dashboard's queries.

promtool and prometheus come from Debian's `prometheus` package
(scripts/install-test-tools.sh). Where they are missing the tests skip, except in CI
(env CI set), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import RunningServer
from tests.external_tools import SYSTEM_HINT
from tests.models import mlp_model, write_config
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "ferry-dashboard.json"
FEATURES = 16


def require_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(ROOT / ".tools" / "bin"))
    if path is None:
        message = f"{name} not found (Debian package prometheus): {SYSTEM_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    mlp_model(repo / "m" / "1" / "model.onnx", features=FEATURES)
    write_config(repo / "m", "max_batch_size: 8\ndynamic_batching { }\n")
    return repo


def send_traffic(server: RunningServer, ok: int, invalid: int) -> None:
    with triton.InferenceServerClient(server.address) as client:
        for i in range(ok + invalid):
            dtype = np.float32 if i < ok else np.float64
            tensor = triton.InferInput("x", [2, FEATURES], "FP32" if i < ok else "FP64")
            tensor.set_data_from_numpy(np.zeros((2, FEATURES), dtype))
            if i < ok:
                client.infer("m", [tensor])
            else:
                with pytest.raises(InferenceServerException):
                    client.infer("m", [tensor])


def scrape_text(server: RunningServer) -> str:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def sample_names(text: str) -> set[str]:
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# promtool ----------------------------------------------------------------------------


def test_scrape_passes_promtool_check_metrics(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    promtool = require_tool("promtool")
    server = start_server(make_repo(tmp_path))
    send_traffic(server, ok=5, invalid=2)
    text = scrape_text(server)
    assert 'ferry_requests_total{code="OK",model="m",protocol="grpc"} 5.0' in text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


# A real Prometheus server --------------------------------------------------------------


def listening_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on, read from /proc (it was told port 0)."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        lines = Path(table).read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                return int(local.rsplit(":", 1)[1], 16)
    return None


class Prometheus:
    """A Prometheus server on a free loopback port, scraping the given targets."""

    def __init__(self, binary: str, folder: Path, targets: list[str]) -> None:
        config = folder / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 500ms\n"
            "  scrape_timeout: 400ms\n"
            "scrape_configs:\n"
            "  - job_name: ferry\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                 "--web.listen-address=127.0.0.1:0", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.port = 0
        try:
            wait_until(self._bound, timeout=30, what="Prometheus to listen")
            # It answers 503 to queries until its storage is open.
            wait_until(self._ready, timeout=30, what="Prometheus to be ready")
        except BaseException:
            self.close()
            raise

    def _bound(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()}")
        self.port = listening_port(self.process.pid) or 0
        return self.port != 0

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError as error:
            if error.code == 503:
                return False
            raise

    def query(self, promql: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return dict(json.load(response))
        except urllib.error.HTTPError as error:  # 400 for a bad query: the body says why
            return dict(json.load(error))

    def scalar(self, promql: str) -> float | None:
        """The value of a query that yields one series, or None while it yields none."""
        answer = self.query(promql)
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    binary = require_tool("prometheus")
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        folder = tmp_path / f"prometheus{len(started)}"
        folder.mkdir()
        server = Prometheus(binary, folder, targets)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    assert queries, "the dashboard has no queries"
    return queries


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*")


def test_prometheus_scrapes_ferry_and_answers_its_request_count(
    tmp_path: Path,
    start_server: Callable[..., RunningServer],
    prometheus_for: Callable[[list[str]], Prometheus],
) -> None:
    server = start_server(make_repo(tmp_path))
    send_traffic(server, ok=7, invalid=3)
    prometheus = prometheus_for([f"127.0.0.1:{server.server.metrics_port}"])

    def scraped(query: str, expected: float) -> Callable[[], bool]:
        return lambda: prometheus.scalar(query) == expected

    wait_until(scraped('up{job="ferry"}', 1), timeout=30, what="Prometheus to scrape Ferry")
    wait_until(
        scraped('ferry_requests_total{model="m",code="OK"}', 7),
        timeout=30, what="Ferry's request count in Prometheus",
    )
    assert prometheus.scalar('ferry_requests_total{model="m",code="INVALID_ARGUMENT"}') == 3
    assert prometheus.scalar('ferry_inferences_total{model="m"}') == 14
    assert prometheus.scalar('ferry_model_ready{model="m"}') == 1

    # Every query of the dashboard is valid PromQL to this Prometheus.
    for expr in dashboard_queries():
        answer = prometheus.query(concrete(expr))
        assert answer["status"] == "success", (expr, answer)


# The dashboard -----------------------------------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    expr = re.sub(r"(?<![\w:])\d[\d.]*(?:[eE][+-]?\d+)?", "", expr)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group()
        followed_by = expr[match.end() :].lstrip()[:1]
        if followed_by == "(" or word.lower() in PROMQL_WORDS:
            continue  # a function or a keyword
        names.add(word)
    return names


def test_metric_name_extraction() -> None:
    assert metric_names_in(
        'histogram_quantile(0.99, sum by (le, model) '
        '(rate(x_bucket{model=~"$model", code!="OK"}[$__rate_interval]))) / y_total / 1e9'
    ) == {"x_bucket", "y_total"}


def test_every_metric_in_the_dashboard_appears_in_a_scrape(
    tmp_path: Path, start_server: Callable[..., RunningServer]
) -> None:
    server = start_server(make_repo(tmp_path))
    send_traffic(server, ok=3, invalid=1)
    scraped = sample_names(scrape_text(server))
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for expr in dashboard_queries():
        used |= metric_names_in(expr)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"]["query"])
            assert match, variable
            used.add(match.group(1))
    assert {
        "ferry_requests_total",
        "ferry_request_duration_seconds_bucket",
        "ferry_queue_duration_seconds_bucket",
        "ferry_compute_duration_seconds_sum",
        "ferry_batch_size_bucket",
        "ferry_queue_depth",
        "ferry_inferences_total",
        "ferry_batches_total",
    } <= used
    assert used <= scraped, f"not in a scrape: {sorted(used - scraped)}"

"""What a real scrape of a running Ferry holds: no `*_created` series (prometheus_client's
default, which doubles the series count), and every metric of the README's table with the
type that the table gives it."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferry.client import FerryClient, FerryClientError
from tests.conftest import RunningServer
from tests.external_tools import REPO


def scrape(server: RunningServer) -> str:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def readme_metrics() -> dict[str, str]:
    """metric name -> type, from the README's metrics table (rows like
    | `ferry_inferences_total`, `ferry_batches_total` | counter | ... |)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| metric | type | what |") :].split("\n\n", 1)[0]
    found = {}
    for row in table.splitlines()[2:]:
        names, kind = (cell.strip() for cell in row.strip("|").split("|")[:2])
        for name in re.findall(r"`(ferry_\w+)(?:\{[^}]*\})?`", names):
            found[name] = kind
    return found


@pytest.fixture
def served(start_server) -> RunningServer:
    server: RunningServer = start_server(REPO / "examples" / "model_repository")
    with FerryClient(server.address) as client:
        client.infer("digits", {"pixels": np.zeros((3, 64), dtype=np.float32)})
        with pytest.raises(FerryClientError):
            client.infer("no-such-model", {"pixels": np.zeros((1, 64), dtype=np.float32)})
    return server


def test_scrape_has_no_created_series(served: RunningServer) -> None:
    text = scrape(served)
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "ferry_requests_total" in names and "ferry_batches_total" in names  # fed, so present
    assert "ferry_request_duration_seconds_count" in names
    created = sorted(name for name in names if name.endswith("_created"))
    assert not created, created
    assert "_created" not in text


def test_readme_metric_table_matches_a_scrape(served: RunningServer) -> None:
    documented = readme_metrics()
    assert len(documented) >= 10, documented
    families = {f.name: f.type for f in text_string_to_metric_families(scrape(served))}
    for name, kind in documented.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert families.get(family) == kind, f"README: {name} is a {kind}; scrape: {families}"
